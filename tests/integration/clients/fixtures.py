"""pytest fixtures for the real-client peers.

Import them where they are needed (``from tests.integration.clients.fixtures import *``), in a
test module or in ``tests/integration/conftest.py``.  The expensive ones (one Chromium, one
Xvfb, vncdotool's reactor) are process-wide and reference counted, so importing the fixtures
in several modules (or in a module *and* the conftest) still starts each of them once and
stops it when the last user is done.

No fixture here skips: a missing client is an install problem (scripts/install.sh) and must
fail loudly, never count as a pass.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from . import vncdotool_client
from .novnc import NoVNCBrowser, NoVNCSession
from .qemu_vnc import QemuVnc
from .tigervnc import VncViewer
from .tls import TestPKI, make_test_pki
from .vncdotool_client import VncdotoolClient
from .websockify_proxy import Websockify
from .xvfb import Xvfb

__all__ = ["novnc_browser", "novnc_connect", "qemu_vnc_factory", "vnc_pki",
           "tigervnc_viewer", "vncdotool_connect", "vncdotool_reactor", "xvfb_display"]


class _Shared:
    """A process-wide resource with a reference count (see the module docstring)."""

    def __init__(self, make: Callable[[], Any], close: Callable[[Any], None]) -> None:
        self._make, self._close = make, close
        self._lock = threading.Lock()
        self._obj: Any = None
        self._refs = 0

    def acquire(self) -> Any:
        with self._lock:
            if self._refs == 0:
                self._obj = self._make()
            self._refs += 1
            return self._obj

    def release(self) -> None:
        with self._lock:
            self._refs -= 1
            if self._refs == 0:
                obj, self._obj = self._obj, None
                self._close(obj)


_BROWSER = _Shared(NoVNCBrowser, lambda b: b.close())
_XVFB = _Shared(lambda: Xvfb(1280, 1024), lambda x: x.close())
# vncdotool's reactor starts on first connect and cannot be restarted: stop it only at the end.
_REACTOR = _Shared(lambda: True, lambda _: vncdotool_client.shutdown())


@pytest.fixture(scope="session")
def novnc_browser() -> Iterator[NoVNCBrowser]:
    """One headless Chromium (noVNC driver) for the whole session."""
    yield _BROWSER.acquire()
    _BROWSER.release()


@pytest.fixture
def novnc_connect(novnc_browser: NoVNCBrowser) -> Iterator[Callable[..., NoVNCSession]]:
    """``novnc_connect(host, port, **NoVNCBrowser.open kwargs) -> NoVNCSession`` through a
    fresh websockify; viewers and proxies are closed at the end of the test."""
    opened: list[tuple[Websockify, NoVNCSession | None]] = []

    def connect(host: str, port: int, **kw: Any) -> NoVNCSession:
        ws = Websockify(host, port)
        opened.append((ws, None))
        session = novnc_browser.open(ws.url, **kw)
        opened[-1] = (ws, session)
        return session

    yield connect
    for ws, session in reversed(opened):
        try:
            if session is not None:
                session.close()
        finally:
            ws.close()


@pytest.fixture(scope="session")
def vncdotool_reactor() -> Iterator[None]:
    """Keeps vncdotool's Twisted reactor alive for the session; stops it once at the end."""
    _REACTOR.acquire()
    yield
    _REACTOR.release()


@pytest.fixture
def vncdotool_connect(vncdotool_reactor: None) -> Iterator[Callable[..., VncdotoolClient]]:
    """``vncdotool_connect(host, port, **VncdotoolClient kwargs)``; closed after the test."""
    clients: list[VncdotoolClient] = []

    def connect(host: str, port: int, **kw: Any) -> VncdotoolClient:
        c = VncdotoolClient(host, port, **kw)
        clients.append(c)
        return c

    yield connect
    for c in clients:
        c.close()


@pytest.fixture(scope="session")
def xvfb_display() -> Iterator[Xvfb]:
    """One 1280x1024 Xvfb for the session (viewers are closed by their tests)."""
    yield _XVFB.acquire()
    _XVFB.release()


@pytest.fixture
def tigervnc_viewer(xvfb_display: Xvfb) -> Iterator[Callable[..., VncViewer]]:
    """``tigervnc_viewer(host, port, **VncViewer kwargs)`` on the session Xvfb."""
    viewers: list[VncViewer] = []

    def start(host: str, port: int, **kw: Any) -> VncViewer:
        v = VncViewer(xvfb_display, host, port, **kw)
        viewers.append(v)
        return v

    yield start
    for v in viewers:
        v.close()


@pytest.fixture(scope="session")
def vnc_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    """A CA and a server certificate for 127.0.0.1/localhost (ca-cert.pem, server-cert.pem,
    server-key.pem)."""
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def qemu_vnc_factory() -> Iterator[Callable[..., QemuVnc]]:
    """``qemu_vnc_factory(**QemuVnc kwargs)``: QEMU's VNC server showing the test card."""
    started: list[QemuVnc] = []

    def make(**kw: Any) -> QemuVnc:
        q = QemuVnc(**kw)
        started.append(q)
        q.wait_testcard()
        return q

    yield make
    for q in started:
        q.close()
