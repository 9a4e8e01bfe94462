"""noVNC 1.7 in Debian's headless Chromium, driven by playwright-core from one node process.

:class:`NoVNCBrowser` owns, for a whole test session: a tiny HTTP server (a thread) that serves
``novnc_page.html`` and noVNC's ES modules, and ``node novnc_driver.mjs`` which launched one
Chromium.  :meth:`NoVNCBrowser.open` creates a viewer (:class:`NoVNCSession`: its own browser
context and page) connected to a websocket URL - websockify in front of the RFB server under
test (see :mod:`.websockify_proxy`).  Starting Chromium costs ~0.5 s; a viewer ~0.1 s more.

Input is real browser input: Playwright's keyboard and mouse dispatch trusted DOM events, so the
keysyms and XT scancodes the server receives are what noVNC computes from the browser's
``KeyboardEvent.key``/``code`` - exactly what a user's browser would send.
"""

from __future__ import annotations

import base64
import itertools
import json
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from . import JS_ROOT, NOVNC_ROOT, ClientError, assert_same_image, stop_process

HERE = Path(__file__).resolve().parent
PAGE = HERE / "novnc_page.html"
DRIVER = HERE / "novnc_driver.mjs"
CHROMIUM = "/usr/bin/chromium"

#: Browser start (node + Chromium) is ~1 s here; cold disks can be slower.
START_TIMEOUT = 60.0
#: Default bound for one driver command (page load, handshake, a key press...).
COMMAND_TIMEOUT = 20.0
#: Room around the framebuffer in the page viewport (the canvas sits at the top left, 1:1).
VIEWPORT_MARGIN = 16
MAX_FB_DIM = 4096


class NoVNCError(ClientError):
    """The driver or noVNC reported an error (the message carries the JS stack)."""


class _Handler(SimpleHTTPRequestHandler):
    """Serves the test page at / and noVNC's package under /novnc/; nothing else."""

    # ES modules must come with a JavaScript MIME type or Chromium refuses to run them.
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".js": "text/javascript",
                      ".mjs": "text/javascript"}

    def translate_path(self, path: str) -> str:
        path = path.split("?", 1)[0].split("#", 1)[0]
        if path in ("/", "/index.html"):
            return str(PAGE)
        if path.startswith("/novnc/"):
            root = NOVNC_ROOT.resolve()
            p = (root / path[len("/novnc/"):]).resolve()
            if p.is_relative_to(root):
                return str(p)
        return str(HERE / "does-not-exist")

    # Keep-alive and caching: the page pulls ~40 ES modules; a viewer per test must not pay for
    # 40 fresh TCP connections and downloads each time.
    protocol_version = "HTTP/1.1"

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "max-age=3600")
        super().end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class _StaticServer:
    def __init__(self) -> None:
        handler = partial(_Handler, directory=str(HERE))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="novnc-http",
                                       daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


class NoVNCBrowser:
    """One Chromium for many noVNC viewers.  Close it once (session fixture)."""

    def __init__(self, chromium: str = CHROMIUM) -> None:
        for what, path in (("noVNC", NOVNC_ROOT / "core" / "rfb.js"),
                           ("playwright-core", JS_ROOT / "node_modules" / "playwright-core"),
                           ("chromium", Path(chromium))):
            if not path.exists():
                raise ClientError(f"{what} missing at {path} (run scripts/install.sh)")
        if not shutil.which("node"):
            raise ClientError("node is not installed")
        self._dir = Path(tempfile.mkdtemp(prefix="dmore-novnc-"))
        self.log_path = self._dir / "driver.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in close())
        self._http = _StaticServer()
        self._ids = itertools.count(1)
        self._sessions = itertools.count(1)
        self._lock = threading.Lock()
        self._lines: queue.Queue[dict | None] = queue.Queue()
        env = {"DMORE_CHROMIUM": chromium, "PATH": "/usr/bin:/bin"}
        self.proc = subprocess.Popen(
            ["node", str(DRIVER), str(JS_ROOT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log, env=env, start_new_session=True)
        self._reader = threading.Thread(target=self._read, name="novnc-driver", daemon=True)
        self._reader.start()
        try:
            first = self._lines.get(timeout=START_TIMEOUT)
        except queue.Empty:
            self.close()
            raise ClientError(f"noVNC driver did not start; log: {self.driver_log()}") from None
        if not first or not first.get("ready"):
            self.close()
            raise ClientError(f"noVNC driver failed: {first}; log: {self.driver_log()}")
        self.version = first.get("version")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                self._lines.put(json.loads(raw))
            except ValueError:
                self._log.write(b"[stdout] " + raw)
        self._lines.put(None)

    def driver_log(self) -> str:
        try:
            self._log.flush()
            return self.log_path.read_text(errors="replace")[-2000:]
        except (OSError, ValueError):
            return ""

    def request(self, cmd: str, timeout: float = COMMAND_TIMEOUT, **args: object) -> object:
        """Send one command to the driver and wait for its answer."""
        with self._lock:
            if self.proc.poll() is not None:
                raise ClientError(f"noVNC driver exited; log: {self.driver_log()}")
            rid = next(self._ids)
            msg = {"id": rid, "cmd": cmd, **args}
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
            self.proc.stdin.flush()
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ClientError(f"noVNC driver: no answer to {cmd} within {timeout}s")
                try:
                    reply = self._lines.get(timeout=left)
                except queue.Empty:
                    continue
                if reply is None:
                    raise ClientError(f"noVNC driver exited; log: {self.driver_log()}")
                if reply.get("id") != rid:
                    continue  # a late answer to a command that timed out
                if not reply.get("ok"):
                    raise NoVNCError(f"{cmd}: {reply.get('error')}")
                return reply.get("result")

    def open(self, ws_url: str, *, password: str | None = None, username: str | None = None,
             encodings: list[str] | None = None, pseudo: list[str] | None = None,
             quality_level: int | None = None, compress_level: int | None = None,
             view_only: bool = False, shared: bool = True, width: int = 1024, height: int = 800,
             timeout: float = COMMAND_TIMEOUT) -> NoVNCSession:
        """A new viewer connected to ``ws_url``; returns once it is connected with a first
        update, or has failed (check :attr:`NoVNCSession.connected` / ``.failure``).

        ``encodings``: names in preference order (raw, copyrect, rre, hextile, zlib, tight,
        zrle, tightpng, jpeg); None keeps noVNC's own list.  ``quality_level`` (0-9) adds the
        JPEG quality pseudo-encoding (None: none is sent, so Tight must stay lossless) and
        ``compress_level`` the compression one.  ``pseudo``: pseudo-encoding names (see the
        page); None = noVNC's own set.  ``width``/``height``: the page viewport, which must hold
        the whole framebuffer for pixel reads and pointer positions to be 1:1.
        """
        if not (0 < width <= MAX_FB_DIM and 0 < height <= MAX_FB_DIM):
            raise ValueError("viewport out of range")
        creds = {}
        if password is not None:
            creds["password"] = password
        if username is not None:
            creds["username"] = username
        opts = {"url": ws_url, "credentials": creds or None, "shared": shared,
                "viewOnly": view_only, "qualityLevel": quality_level,
                "compressLevel": compress_level, "encodings": encodings, "pseudo": pseudo}
        sid = f"s{next(self._sessions)}"
        viewport = {"width": width + VIEWPORT_MARGIN, "height": height + VIEWPORT_MARGIN}
        try:
            state = self.request("open", timeout=timeout + 5, session=sid,
                                 pageUrl=self._http.url, opts=opts, viewport=viewport,
                                 timeoutMs=int(timeout * 1000))
        except ClientError:
            try:
                self.request("close", session=sid)
            except ClientError:
                pass
            raise
        return NoVNCSession(self, sid, state)

    def close(self) -> None:
        if getattr(self, "proc", None) is not None and self.proc.poll() is None:
            try:
                self.request("quit", timeout=10)
            except ClientError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        stop_process(getattr(self, "proc", None))
        if getattr(self, "proc", None) is not None:
            for f in (self.proc.stdin, self.proc.stdout):
                if f:
                    f.close()
        self._http.close()
        self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> NoVNCBrowser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NoVNCSession:
    """One noVNC viewer (a page).  Coordinates are framebuffer pixels."""

    def __init__(self, browser: NoVNCBrowser, sid: str, state: dict) -> None:
        self.browser = browser
        self.sid = sid
        self.initial_state = state

    def _req(self, cmd: str, timeout: float = COMMAND_TIMEOUT, **args: object) -> object:
        return self.browser.request(cmd, timeout=timeout, session=self.sid, **args)

    # -- state -------------------------------------------------------------------------------
    def state(self) -> dict:
        """state ('connecting', 'connected', 'failed', 'disconnected'), reason, updates,
        rects (per-encoding rect counts: raw, copyrect, hextile, zrle, tight, tight-jpeg,
        tight-basic, tight-fill, ...), width, height, qemuExtKey, console (page log)."""
        return self._req("state")

    @property
    def connected(self) -> bool:
        return self.state()["state"] == "connected"

    @property
    def failure(self) -> str | None:
        st = self.state()
        return st["reason"] if st["state"] == "failed" else None

    def wait_updates(self, target: int, timeout: float = 10.0) -> int:
        """Wait until ``target`` FramebufferUpdates have completed and are on the canvas."""
        return self._req("waitUpdates", timeout=timeout + 5, target=target,
                         timeoutMs=int(timeout * 1000))

    def wait_state(self, states: tuple[str, ...], timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            st = self.state()
            if st["state"] in states:
                return st
            if time.monotonic() > deadline:
                raise ClientError(f"noVNC state {st['state']!r}, wanted {states}")
            time.sleep(0.02)

    # -- screen ------------------------------------------------------------------------------
    def pixels(self) -> np.ndarray:
        """The visible canvas as (h, w, 3) RGB, after noVNC's render queue drained."""
        r = self._req("pixels")
        w, h = int(r["width"]), int(r["height"])
        if not (0 < w <= MAX_FB_DIM and 0 < h <= MAX_FB_DIM):
            raise ClientError(f"canvas size out of range: {w}x{h}")
        rgba = np.frombuffer(base64.b64decode(r["rgba"]), dtype=np.uint8)
        if rgba.size != w * h * 4:
            raise ClientError("canvas data has the wrong size")
        return rgba.reshape(h, w, 4)[..., :3].copy()

    def wait_for_screen(self, want: np.ndarray | Callable[[], np.ndarray], timeout: float = 5.0,
                        *, tolerance: int = 0, mean_tolerance: float | None = None
                        ) -> np.ndarray:
        """Read the canvas until it matches ``want`` (exactly, or within ``tolerance`` per
        channel and ``mean_tolerance`` on average); on timeout assert on the last difference.
        ``want`` may be a function, read again each time: the server's picture when it may
        still change (the demo draws a status line for every pointer event the browser sends)."""
        deadline = time.monotonic() + timeout
        current = want if callable(want) else (lambda: want)
        while True:
            want = current()
            got = self.pixels()
            if got.shape == want.shape:
                d = np.abs(got.astype(np.int16) - want.astype(np.int16))
                if int(d.max()) <= tolerance and (mean_tolerance is None
                                                  or float(d.mean()) <= mean_tolerance):
                    return got
            if time.monotonic() > deadline:
                assert_same_image(got, want, tolerance=tolerance, mean_tolerance=mean_tolerance)
                raise AssertionError("screen did not match")  # pragma: no cover
            time.sleep(0.05)

    # -- input (real browser events) ------------------------------------------------------------
    def press(self, key: str, delay_ms: int = 0) -> None:
        """Playwright key name: "a", "Enter", "ArrowLeft", "Shift+A", "Control+Alt+Delete"."""
        self._req("key", action="press", key=key, delayMs=delay_ms)

    def type(self, text: str, delay_ms: int = 0) -> None:
        self._req("key", action="type", text=text, delayMs=delay_ms)

    def key_down(self, key: str) -> None:
        self._req("key", action="down", key=key)

    def key_up(self, key: str) -> None:
        self._req("key", action="up", key=key)

    def move(self, x: int, y: int) -> None:
        self._req("mouse", action="move", x=x, y=y)

    def click(self, x: int, y: int, button: int = 1) -> None:
        self._req("mouse", action="click", x=x, y=y, button=button)

    def mouse_down(self, button: int = 1, x: int | None = None, y: int | None = None) -> None:
        self._req("mouse", action="down", x=x, y=y, button=button)

    def mouse_up(self, button: int = 1, x: int | None = None, y: int | None = None) -> None:
        self._req("mouse", action="up", x=x, y=y, button=button)

    def wheel(self, dy: float, dx: float = 0.0, x: int | None = None, y: int | None = None
              ) -> None:
        self._req("mouse", action="wheel", x=x, y=y, dx=dx, dy=dy)

    def disconnect(self) -> None:
        self._req("disconnect")

    def close(self) -> None:
        self._req("close")
