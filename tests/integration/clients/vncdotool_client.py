"""vncdotool 1.4 (a Twisted RFB client) as a synchronous test peer, with a forced encoding list.

vncdotool's own client sends ``SetEncodings([cls.encoding] + pseudo-encodings)`` from
``VNCDoToolClient.vncConnectionMade`` (``encoding`` is RAW by default).  To make one run decode
exactly one encoding we subclass the client and send our own list instead (e.g. ``["zrle"]``,
``["hextile"]``, ``["copyrect", "raw"]``): an RFB server must fall back to Raw for anything it
cannot send in the listed encodings, so a list of one real encoding forces that encoding (plus
Raw, which every server may always use).  vncdotool decodes Raw, CopyRect, RRE, CoRRE, Hextile
and ZRLE, but no Tight.

The pixel format is the server's own when vncdotool knows how to render it (32/24 bpp true
colour, RGB or BGR order); ``pixel_format="rgbx32"``/``"bgrx32"`` makes the client send
SetPixelFormat so the server has to translate.

Threading: vncdotool runs the Twisted reactor in a background thread that cannot be restarted;
:func:`shutdown` must be called once per process (the ``vncdotool_reactor`` session fixture does
it).  Every call here goes through vncdotool's ``ThreadedVNCClientProxy`` with a timeout, and
screen copies are taken *on the reactor thread*, so a test never reads a half-painted image.
"""

from __future__ import annotations

import itertools
import struct

import numpy as np
from twisted.internet.defer import Deferred
from vncdotool import api
from vncdotool import rfb as vrfb
from vncdotool.client import AuthenticationError, VNCDoToolClient, VNCDoToolFactory

from . import ClientError, assert_same_image, wait_until

__all__ = ["AuthenticationError", "VncdotoolClient", "ENCODINGS", "shutdown"]

#: Names accepted in ``encodings=`` -> RFB encoding numbers (what vncdotool can decode).
ENCODINGS: dict[str, int] = {
    "raw": vrfb.Encoding.RAW,
    "copyrect": vrfb.Encoding.COPY_RECTANGLE,
    "rre": vrfb.Encoding.RRE,
    "corre": vrfb.Encoding.CORRE,
    "hextile": vrfb.Encoding.HEXTILE,
    "zrle": vrfb.Encoding.ZRLE,
}
_NAMES = {v: k for k, v in ENCODINGS.items()}
_PSEUDO = {
    "desktop-size": vrfb.Encoding.PSEUDO_DESKTOP_SIZE,
    "last-rect": vrfb.Encoding.PSEUDO_LAST_RECT,
    "qemu-extended-key": vrfb.Encoding.PSEUDO_QEMU_EXTENDED_KEY_EVENT,
    "cursor": vrfb.Encoding.PSEUDO_CURSOR,
}
_PIXEL_FORMATS = {
    # RFB PixelFormat(bpp, depth, big-endian, true-colour, maxes, shifts): little-endian 32 bpp.
    "rgbx32": vrfb.PixelFormat(32, 24, False, True, 255, 255, 255, 0, 8, 16),
    "bgrx32": vrfb.PixelFormat(32, 24, False, True, 255, 255, 255, 16, 8, 0),
}
#: Default bound on one round trip through the reactor thread (connect, capture, input).
DEFAULT_TIMEOUT = 10.0
_ids = itertools.count()


class _Client(VNCDoToolClient):
    """vncdotool's client with our encoding list, pixel format and thread-safe snapshots."""

    def vncConnectionMade(self) -> None:  # noqa: N802 (Twisted/vncdotool naming)
        pf = self.factory.dmore_pixel_format
        if pf is None:
            self.setImageMode()
        else:
            self.setPixelFormat(_PIXEL_FORMATS[pf])
            self._image_mode = {"rgbx32": "RGBX", "bgrx32": "BGRX"}[pf]
        self.dmore_updates = 0
        self.dmore_rects: dict[str, int] = {}
        self.setEncodings(self.factory.dmore_encodings)
        self.factory.clientConnectionMade(self)

    def _handleRectangle(self, block: bytes) -> None:  # noqa: N802
        # Count rect headers per encoding, so a test can prove which encoding the server used
        # (vncdotool itself only logs them).  LastRect ends an update and is not counted.
        (encoding,) = struct.unpack_from("!i", block, 8)
        if self.rectangles and encoding != vrfb.Encoding.PSEUDO_LAST_RECT:
            name = _NAMES.get(encoding, str(encoding))
            self.dmore_rects[name] = self.dmore_rects.get(name, 0) + 1
        super()._handleRectangle(block)

    def commitUpdate(self, rectangles=None) -> None:  # noqa: N802
        self.dmore_updates = getattr(self, "dmore_updates", 0) + 1
        super().commitUpdate(rectangles)

    # Methods below are called through the proxy, i.e. on the reactor thread.  The proxy chains
    # every call on one Deferred whose value must stay the protocol (vncdotool's own methods
    # return ``self``), so results travel in ``dmore_result`` and the methods return ``self``.
    dmore_result: object = None

    def dmore_ready(self) -> _Client:
        return self

    def dmore_snapshot(self) -> _Client:
        self.dmore_result = (None if self.screen is None
                             else np.asarray(self.screen.convert("RGB")).copy())
        return self

    def dmore_refresh(self, incremental: bool = False) -> Deferred:
        d = self.refreshScreen(incremental)
        d.addCallback(lambda _: self.dmore_snapshot())
        return d

    def dmore_info(self) -> _Client:
        self.dmore_result = {
            "width": self.width, "height": self.height, "name": bytes(self.name),
            "updates": self.dmore_updates, "rects": dict(self.dmore_rects),
            "qemu_ext_key": vrfb.Encoding.PSEUDO_QEMU_EXTENDED_KEY_EVENT
            in self.negotiated_encodings}
        return self


class VncdotoolClient:
    """One vncdotool connection.

    ``encodings``: names from :data:`ENCODINGS` in preference order (default ``["raw"]``);
    ``pseudo``: pseudo-encodings to add (default desktop-size and last-rect: no QEMU extended
    keys, so key events are plain KeyEvents with keysyms only - noVNC covers the extended ones).
    Raises :class:`AuthenticationError` when the server refuses the password.
    """

    def __init__(self, host: str, port: int, *, password: str | None = None,
                 encodings: list[str] | tuple[str, ...] = ("raw",),
                 pseudo: list[str] | tuple[str, ...] = ("desktop-size", "last-rect"),
                 pixel_format: str | None = None, shared: bool = True,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        try:
            encs = [ENCODINGS[e] for e in encodings] + [_PSEUDO[p] for p in pseudo]
        except KeyError as e:
            raise ValueError(f"unknown encoding {e.args[0]!r}") from None
        if pixel_format is not None and pixel_format not in _PIXEL_FORMATS:
            raise ValueError(f"unknown pixel format {pixel_format!r}")
        factory = type(f"_Factory{next(_ids)}", (VNCDoToolFactory,), {
            "protocol": _Client, "dmore_encodings": encs, "dmore_pixel_format": pixel_format,
            "shared": shared, "pseudodesktop": False, "last_rect": False,
            "qemu_extended_key": False})
        self.timeout = timeout
        self._proxy = api.connect(f"{host}::{port}", password=password, factory_class=factory,
                                  timeout=timeout)
        try:
            self._proxy.dmore_ready()  # raises the connect/auth failure, if any
        except BaseException:
            self._proxy = None
            raise

    # -- screen ------------------------------------------------------------------------------
    def capture(self) -> np.ndarray:
        """Ask for a full (non-incremental) update and return the client's screen as RGB."""
        img = self._proxy.dmore_refresh(False).dmore_result
        if img is None:
            raise ClientError("vncdotool has no screen after a full update")
        return img

    def wait_for_screen(self, want: np.ndarray, timeout: float = 5.0, *, tolerance: int = 0
                        ) -> np.ndarray:
        """Capture until the client's screen equals ``want`` (within ``tolerance``); on timeout
        fail with a description of the last difference."""
        last: list[np.ndarray] = []

        def matches() -> bool:
            got = self.capture()
            last[:] = [got]
            if got.shape != want.shape:
                return False
            return int(np.abs(got.astype(np.int16) - want.astype(np.int16)).max()) <= tolerance

        try:
            wait_until(matches, timeout, interval=0.05, what="vncdotool screen")
        except ClientError:
            if last:
                assert_same_image(last[0], want, tolerance=tolerance)
            raise
        return last[0]

    def info(self) -> dict:
        """width, height, desktop name, number of completed updates, rect counts per encoding
        name ("raw", "hextile", ...; pseudo-encodings by number), QEMU ext-key ack."""
        return self._proxy.dmore_info().dmore_result

    # -- input -------------------------------------------------------------------------------
    def key(self, key: str) -> None:
        """Press and release one key: a character, or a vncdotool name ("enter", "left",
        "shift-a", "ctrl-alt-del", ...)."""
        self._proxy.keyPress(key)

    def type(self, text: str) -> None:
        """One key press per character (what ``vncdo type`` does)."""
        for ch in text:
            self._proxy.keyPress(ch)

    def key_down(self, key: str) -> None:
        self._proxy.keyDown(key)

    def key_up(self, key: str) -> None:
        self._proxy.keyUp(key)

    def move(self, x: int, y: int) -> None:
        self._proxy.mouseMove(x, y)

    def mouse_down(self, button: int = 1) -> None:
        self._proxy.mouseDown(button)

    def mouse_up(self, button: int = 1) -> None:
        self._proxy.mouseUp(button)

    def click(self, x: int, y: int, button: int = 1) -> None:
        self._proxy.mouseMove(x, y)
        self._proxy.mousePress(button)

    def close(self) -> None:
        if self._proxy is not None:
            proxy, self._proxy = self._proxy, None
            proxy.disconnect()

    def __enter__(self) -> VncdotoolClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def shutdown() -> None:
    """Stop vncdotool's reactor thread (once per process; it cannot be restarted)."""
    api.shutdown()
