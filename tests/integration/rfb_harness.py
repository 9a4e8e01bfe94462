"""Runs the real RFB server with the demo display on a background event loop, for real clients.

The test talks to it only through sockets (like any viewer) plus a few read-only probes that are
evaluated *on the server's loop*, so a snapshot is never taken halfway through an update.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from dmore_nova.rm_vm.rfb.demo import DemoDisplay
from dmore_nova.rm_vm.rfb.display import KeyInput, PointerInput
from dmore_nova.rm_vm.rfb.server import RFBServer, ServerOptions


class LoopThread:
    """An asyncio loop in a daemon thread; ``call(fn)`` runs fn on it and returns its result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        #: Anything that escaped a callback on the loop (a test fails if this is not empty).
        self.errors: list[dict] = []
        self.loop.set_exception_handler(lambda _loop, ctx: self.errors.append(ctx))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                       name="rfb-server-loop")
        self.thread.start()

    def run(self, coro, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        async def _call():
            return fn()
        return self.run(_call(), timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def rgb(fb: np.ndarray) -> np.ndarray:
    """0x00RRGGBB uint32 (h, w) -> (h, w, 3) uint8."""
    fb = np.ascontiguousarray(fb)
    out = np.empty(fb.shape + (3,), np.uint8)
    out[..., 0] = (fb >> 16) & 0xFF
    out[..., 1] = (fb >> 8) & 0xFF
    out[..., 2] = fb & 0xFF
    return out


class DemoServerHandle:
    def __init__(self, *, width: int = 800, height: int = 600, host: str = "127.0.0.1",
                 password: str | None = None, security_types: list[str] | None = None,
                 plain_users: dict[str, str] | None = None, tls_cert_file: str | None = None,
                 tls_key_file: str | None = None, view_only: bool = False,
                 **options: Any) -> None:
        if security_types is None:
            security_types = ["vnc"] if password else ["none"]
        self.opts = ServerOptions(security_types=security_types, password=password,
                                  plain_users=plain_users, tls_cert_file=tls_cert_file,
                                  tls_key_file=tls_key_file, view_only=view_only, **options)
        self.lt = LoopThread()
        self.display = DemoDisplay(width, height)
        self.server = RFBServer(self.display, self.display, self.opts)
        self.host = host
        self.port = self.lt.run(self.server.listen(host, 0))

    # -- probes (evaluated on the server loop) --------------------------------------------
    def framebuffer_rgb(self) -> np.ndarray:
        return self.lt.call(lambda: rgb(self.display.framebuffer().copy()))

    def keys(self) -> list[KeyInput]:
        return self.lt.call(lambda: list(self.display.keys))

    def pointers(self) -> list[PointerInput]:
        return self.lt.call(lambda: list(self.display.pointers))

    def text(self) -> str:
        return self.lt.call(lambda: self.display.text)

    def viewer_count(self) -> int:
        return self.lt.call(lambda: len(self.server.viewers))

    def on_loop(self, fn: Callable[[], Any]) -> Any:
        return self.lt.call(fn)

    def wait_for(self, pred: Callable[[], Any], timeout: float = 5.0, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = pred()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what or pred}")
            time.sleep(0.02)

    def stop(self) -> None:
        try:
            self.lt.run(self.server.close())
        finally:
            self.lt.stop()
