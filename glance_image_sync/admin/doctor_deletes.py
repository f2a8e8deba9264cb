"""doctor's check of what stands between a delete message and the loss of an image.

A delete arrives as a message, and anyone who can publish to the broker can
send one. Two things protect the images from one that should not be:

* Glance's API, when credentials are configured: a delete is applied only
  once it says the image is gone. doctor asks it about an id that cannot
  exist (a fresh random UUID): "no such image" shows that the credentials, the
  catalog and the endpoint work;
* the trash (``deleted_image_grace``): for that long a deleted image can be
  put back (``glance-image-sync restore``).

PASS names what is in force. FAIL when neither is, or when the API is
configured but cannot be asked: every delete then waits, retried, until it
can.
"""

from __future__ import annotations

import uuid

from glance_image_sync.admin.checks import failed, passed
from glance_image_sync.admin.tables import plural, size_text, span
from glance_image_sync.exceptions import StoreError
from glance_image_sync.glanceapi import GlanceApi, ImageState
from glance_image_sync.store.images import ImageStore
from glance_image_sync.store.trash import Trash

NAME = "delete protection"


def checks(settings, api=None) -> list:
    return [protection_check(settings, api or GlanceApi(settings.glance_api))]


def protection_check(settings, api):
    grace = settings.deletes.grace
    trash = (f"deleted images stay in the trash for {span(grace)} (deleted_image_grace "
             f"{grace} s; 'glance-image-sync restore' puts one back){_holding(settings)}"
             if grace else "deleted_image_grace = 0: a delete removes the file for good")
    if not api.configured:
        if not grace:
            return failed(NAME, "none: no Glance API credentials and " + trash + ", whoever "
                          "sent the message (anyone who can publish to the broker can)",
                          "set deleted_image_grace (86400 s by default), or configure Glance's "
                          "API credentials in [keystone_authtoken] (README: Glance's API)")
        return passed(NAME, f"the trash: {trash}; no Glance API credentials, so a delete is "
                      "applied as its message says")
    answer = api.image_state(str(uuid.uuid4()))
    if answer.state is ImageState.GONE:
        return passed(NAME, "Glance's API is asked before each delete (about a random id "
                      f"it answered: {answer.detail}); {trash}")
    if answer.state is ImageState.ACTIVE:
        return failed(NAME, f"Glance's API calls a random id an existing image ({answer.detail})",
                      "point [glance_api] endpoint_override (or the catalog) at Glance's API")
    return failed(NAME, f"Glance's API is configured but cannot be asked ({answer.detail}): "
                  "every delete waits, retried, then parked in the failed queue, until it can",
                  "check [keystone_authtoken] (auth_url, username, password, project) and "
                  "[glance_api] (interface, region_name, endpoint_override)")


def _holding(settings) -> str:
    try:
        store = ImageStore(settings.store)
    except StoreError:
        return ""  # the image store check says why
    try:
        count, total = Trash(store).stats()
    except (OSError, StoreError) as exc:
        return f"; the trash cannot be listed: {exc}"
    finally:
        store.close()
    return f"; it holds {plural(count, 'image')} ({size_text(total)})" if count else ""
