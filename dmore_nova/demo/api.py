"""The demo's HTTP server: the page, noVNC, and a small JSON control API.

Routes (all on ``[demo] listen``:``port``, 6080 by default)::

    GET  /                 the demo page (web/index.html): noVNC + status panel + Migrate button
    GET  /novnc/<path>     noVNC's ES modules (the page imports ./novnc/core/rfb.js)
    GET  /api/status       everything dmore-nova status shows, as JSON
    POST /api/migrate      {"guest": "guest", "host": "b"[, "fail_at": "remap-rebind:start"]}
                           -> 200 with the migration's record once it is over; 400 bad request,
                           404 unknown guest/host, 409 cannot migrate now (already there, one in
                           progress), 500 the orchestrator failed

The websockets are the console proxy's (its own port): the page connects noVNC there.

Why a thread (``ThreadingHTTPServer``) rather than the orchestrator's loop: http.server
parses requests robustly and a slow client then costs a thread, not the RM agent's loop; each
request hands its work to the loop with ``run_coroutine_threadsafe`` and waits for it.

The guest runs a real shell, so the API is careful about who may drive it: requests must name
this host (``Host``: no DNS rebinding), a POST must be JSON (a cross-site page cannot send that
without a CORS preflight, which is never granted) and, if it carries an ``Origin``, come from
this very origin.  Bodies are bounded (:data:`MAX_BODY`).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from dmore_nova.demo.orchestrator import MIGRATION_TIMEOUT, Demo, parse_fail_at
from dmore_nova.demo.runtime import DemoError

LOG = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent / "web"
#: Largest request body accepted.
MAX_BODY = 4096
#: Seconds a status request may take (it lists every host's domains).
STATUS_TIMEOUT = 10.0
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript",
          ".mjs": "text/javascript", ".css": "text/css", ".json": "application/json",
          ".svg": "image/svg+xml", ".png": "image/png", ".ico": "image/x-icon",
          ".woff": "font/woff", ".woff2": "font/woff2"}


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    control: ControlServer


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "dmore-nova-demo"
    protocol_version = "HTTP/1.1"
    #: Seconds to send a request (a silent client cannot hold a thread for ever).
    timeout = 30

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        LOG.debug("%s - %s", self.client_address[0], format % args)

    # -- helpers ----------------------------------------------------------------------------
    def _send(self, code: int, body: bytes, ctype: str, *, cache: str = "no-store") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, doc: Any) -> None:
        self._send(code, json.dumps(doc).encode(), "application/json")

    def _error(self, code: int, message: str) -> None:
        self._json(code, {"error": message})

    def _host_ok(self) -> bool:
        """DNS rebinding defence: on a loopback listener, the Host must be a loopback name."""
        if not _is_loopback(self.server.control.listen):
            return True
        host = urlsplit("//" + (self.headers.get("Host") or "")).hostname
        return host in _LOOPBACK_NAMES

    def _same_origin(self) -> bool:
        origin = self.headers.get("Origin")
        if origin is None:
            return True  # not a browser (curl, dmore-nova migrate)
        o = urlsplit(origin)
        h = urlsplit("//" + (self.headers.get("Host") or ""))
        try:
            return (o.hostname, o.port) == (h.hostname, h.port)
        except ValueError:  # a malformed port
            return False

    def _call(self, coro: Any, timeout: float) -> Any:
        return self.server.control.call(coro, timeout)

    # -- GET ------------------------------------------------------------------------------------
    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        if not self._host_ok():
            self._error(403, "unexpected Host header")
            return
        path = unquote(urlsplit(self.path).path)
        if path in ("/", "/index.html"):
            self._file(WEB_DIR / "index.html", WEB_DIR)
        elif path.startswith("/novnc/"):
            root = self.server.control.demo.novnc_root
            if root is None:
                self._error(404, "noVNC is not served")
                return
            self._file(root / path[len("/novnc/"):], root, cache="max-age=3600")
        elif path == "/api/status":
            try:
                doc = self._call(self.server.control.demo.status(), STATUS_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - reported to the client
                LOG.exception("status failed")
                self._error(500, f"status failed: {exc}")
                return
            self._json(200, doc)
        else:
            self._error(404, "not found")

    def _file(self, path: Path, root: Path, *, cache: str = "no-cache") -> None:
        try:
            p = path.resolve()
        except OSError:
            p = None
        if p is None or not p.is_relative_to(root.resolve()) or not p.is_file():
            self._error(404, "not found")
            return
        try:
            body = p.read_bytes()
        except OSError as exc:
            self._error(500, f"cannot read: {exc.strerror}")
            return
        self._send(200, body, _TYPES.get(p.suffix, "application/octet-stream"), cache=cache)

    # -- POST -----------------------------------------------------------------------------------
    def do_POST(self) -> None:  # noqa: N802
        if not self._host_ok():
            self._error(403, "unexpected Host header")
            return
        if urlsplit(self.path).path != "/api/migrate":
            self._error(404, "not found")
            return
        if not self._same_origin():
            self._error(403, "cross-origin request refused")
            return
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            self._error(415, "send the request as application/json")
            return
        try:
            length = int(self.headers.get("Content-Length") or "-1")
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self._error(400, f"Content-Length must be 0..{MAX_BODY}")
            return
        try:
            req = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(req, dict):
                raise ValueError("the body must be a JSON object")
            guest, host = req.get("guest"), req.get("host")
            if not isinstance(guest, str) or not isinstance(host, str):
                raise ValueError('give "guest" and "host" as strings')
            fail = req.get("fail_at")
            if fail is not None and not isinstance(fail, str):
                raise ValueError('"fail_at" must be a string')
            fail_at = parse_fail_at(fail) if fail else None
        except ValueError as exc:
            self._error(400, str(exc))
            return
        demo = self.server.control.demo
        try:
            record = self._call(demo.migrate(guest, host, fail_at=fail_at), MIGRATION_TIMEOUT)
        except KeyError as exc:
            self._error(404, str(exc.args[0]) if exc.args else "not found")
            return
        except DemoError as exc:
            self._error(409, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - reported to the client
            LOG.exception("migration of %s to %s failed", guest, host)
            self._error(500, f"migration failed: {exc}")
            return
        self._json(200, record)


class ControlServer:
    """The HTTP server of one :class:`Demo`.  Construct it on the demo's loop (it binds at
    once, so a taken port fails before anything else starts); :meth:`start` serves in a
    thread; :meth:`stop` shuts it down."""

    def __init__(self, demo: Demo, listen: str, port: int) -> None:
        self.demo = demo
        self.listen = listen
        self.loop = asyncio.get_running_loop()
        server_class = _Server6 if ":" in listen else _Server
        try:
            self.httpd = server_class((listen, port), _Handler)
        except OSError as exc:
            raise DemoError(f"cannot serve the demo page on {listen}:{port}: {exc.strerror}"
                            + ("; free the port or choose another one (--port)"
                               if exc.errno == errno.EADDRINUSE else "")) from None
        self.httpd.control = self
        self.port: int = self.httpd.server_address[1]
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="demo-api",
                                        daemon=True)
        self._thread.start()

    def call(self, coro: Any, timeout: float) -> Any:
        """Run ``coro`` on the demo's loop and wait for its result (from a handler thread)."""
        try:
            fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError:  # the loop is gone: the demo is stopping
            coro.close()
            raise DemoError("the demo is stopping") from None
        return fut.result(timeout)

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(5)
            self._thread = None
        self.httpd.server_close()
