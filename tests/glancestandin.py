"""A stand-in for Keystone's token API and Glance's ``GET /v2/images/{id}``, on 127.0.0.1.

One HTTP server plays both: ``/v3`` is Keystone (version discovery, ``POST
/v3/auth/tokens`` with a password, a catalog naming ``/glance`` as the image
service's endpoint), ``/glance/v2/images/<id>`` is Glance, answering from
``images`` ({id: status}; absent ids get 404) with the token checked. Every
request is kept in ``requests`` as (method, path, token).
"""

from __future__ import annotations

import datetime
import http.server
import json
import threading
import uuid

USER, PASSWORD = "glance", "glance-secret"


class StandIn:
    def __init__(self, region="RegionOne"):
        self.images = {}  # image id -> status; anything else is 404
        self.requests = []
        self.glance_status = None  # an HTTP status Glance answers everything with
        self.token = uuid.uuid4().hex
        self.region = region
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)

    def config(self, **extra) -> dict:
        """[keystone_authtoken] as Glance's glance-api.conf has it."""
        return {"auth_type": "password", "auth_url": f"{self.url}/v3", "username": USER,
                "password": PASSWORD, "project_name": "service", "user_domain_name": "Default",
                "project_domain_name": "Default", **extra}

    def _handler(self):
        standin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, doc=None, headers=()):
                body = json.dumps(doc).encode() if doc is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                standin.requests.append(("GET", self.path, self.headers.get("X-Auth-Token")))
                if self.path.rstrip("/") == "/v3":
                    return self._send(200, {"version": _version(standin.url)})
                if self.path.rstrip("/") == "":
                    return self._send(300, {"versions": {"values": [_version(standin.url)]}})
                prefix = "/glance/v2/images/"
                if not self.path.startswith(prefix):
                    return self._send(404, {"error": "not found"})
                if self.headers.get("X-Auth-Token") != standin.token:
                    return self._send(401, {"error": "unauthorized"})
                if standin.glance_status is not None:
                    return self._send(standin.glance_status, {"error": "as told"})
                image_id = self.path[len(prefix):]
                status = standin.images.get(image_id)
                if status is None:
                    return self._send(404, {"message": "No image found with ID " + image_id})
                return self._send(200, {"id": image_id, "status": status})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                doc = json.loads(self.rfile.read(length) or b"{}")
                standin.requests.append(("POST", self.path, None))
                if self.path != "/v3/auth/tokens":
                    return self._send(404, {"error": "not found"})
                user = doc["auth"]["identity"]["password"]["user"]
                if (user.get("name"), user.get("password")) != (USER, PASSWORD):
                    return self._send(401, {"error": {"code": 401, "message": "bad password"}})
                return self._send(201, {"token": standin._token_body()},
                                  headers=[("X-Subject-Token", standin.token)])

        return Handler

    def _token_body(self) -> dict:
        now = datetime.datetime.now(datetime.timezone.utc)
        stamp = "%Y-%m-%dT%H:%M:%S.000000Z"
        return {
            "methods": ["password"],
            "issued_at": now.strftime(stamp),
            "expires_at": (now + datetime.timedelta(hours=1)).strftime(stamp),
            "user": {"id": "u1", "name": USER, "domain": {"id": "default", "name": "Default"}},
            "project": {"id": "p1", "name": "service",
                        "domain": {"id": "default", "name": "Default"}},
            "roles": [{"id": "r1", "name": "admin"}],
            "catalog": [{
                "type": "image", "name": "glance", "id": "s1",
                "endpoints": [{"id": f"e{n}", "interface": interface, "region": self.region,
                               "region_id": self.region, "url": f"{self.url}/glance"}
                              for n, interface in enumerate(("public", "internal", "admin"))],
            }],
        }


def _version(url) -> dict:
    return {"id": "v3.14", "status": "stable", "updated": "2020-04-07T00:00:00Z",
            "links": [{"rel": "self", "href": f"{url}/v3/"}],
            "media-types": [{"base": "application/json",
                             "type": "application/vnd.openstack.identity-v3+json"}]}
