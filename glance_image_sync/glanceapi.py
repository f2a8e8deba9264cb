"""Glance's API, asked one question: does this image still exist?

Used where a file may only be removed on evidence that the image is gone
(``reconcile --prune``; the sync worker's deletes may use it too). The answer
is one of three, and only ``GONE`` is evidence:

``ACTIVE``
    Glance has the image (any status but a gone one: active, queued, saving,
    importing, deactivated, ...): keep the file.
``GONE``
    ``GET /v2/images/{id}`` answered 404, or the image's status is
    ``deleted``, ``pending_delete`` or ``killed``.
``CANNOT_TELL``
    no credentials configured, Keystone or Glance unreachable or refusing
    (401, 403, 5xx), no image endpoint in the catalog, an answer that is not
    an image: never evidence of anything.

``image_state`` never raises for what the network or the services do; it
raises ``Rejected`` only for an id that is not a canonical UUID.

Glance answers 404 for an image the credentials may not see as well as for a
deleted one: the user must see every project's images (Glance's own service
user, with the admin role, does).

Authentication is keystoneauth1's (token, catalog, re-authentication), with
the options it loads from ``[keystone_authtoken]`` (``Settings.glance_api``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from keystoneauth1 import adapter
from keystoneauth1 import exceptions as ks_exceptions

from glance_image_sync import events

GONE_STATUSES = frozenset({"deleted", "pending_delete", "killed"})


class ImageState(enum.Enum):
    ACTIVE = "active"
    GONE = "gone"
    CANNOT_TELL = "cannot tell"


@dataclass(frozen=True)
class Answer:
    state: ImageState
    detail: str  # what Glance said, or why it could not be asked, in words

    @property
    def gone(self) -> bool:
        return self.state is ImageState.GONE


class GlanceApi:
    def __init__(self, settings):
        """``settings``: a ``GlanceApiSettings``."""
        self.settings = settings
        self._adapter = None
        if settings.configured:
            self._adapter = adapter.Adapter(
                settings.session, auth=settings.auth, service_type="image",
                interface=settings.interface, region_name=settings.region_name,
                endpoint_override=settings.endpoint_override)

    @property
    def configured(self) -> bool:
        return self._adapter is not None

    def image_state(self, image_id: str) -> Answer:
        """What Glance says of ``image_id``; see the module's contract."""
        image_id = events.image_id(image_id)
        if self._adapter is None:
            return Answer(ImageState.CANNOT_TELL, "no Glance API credentials configured")
        try:
            response = self._adapter.get(f"/v2/images/{image_id}", raise_exc=False,
                                         headers={"Accept": "application/json"})
        except ks_exceptions.ClientException as exc:
            return Answer(ImageState.CANNOT_TELL, f"cannot ask Glance's API: {_short(exc)}")
        if response.status_code == 404:
            return Answer(ImageState.GONE, "Glance's API: no such image (404)")
        if response.status_code != 200:
            return Answer(ImageState.CANNOT_TELL,
                          f"Glance's API answered {response.status_code}")
        try:
            status = response.json().get("status")
        except (ValueError, AttributeError):
            status = None
        if not isinstance(status, str):
            return Answer(ImageState.CANNOT_TELL, "Glance's API answered without a status")
        status = status[:40]
        if status in GONE_STATUSES:
            return Answer(ImageState.GONE, f"Glance's API: status {status}")
        return Answer(ImageState.ACTIVE, f"Glance's API: status {status}")


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
