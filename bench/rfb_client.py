"""A small, blocking, stdlib-only RFB 3.8 viewer for benchmarks (not part of the product).

Why a client of our own: the key -> echo benchmark must run the *same* client code against QEMU's
VNC server and ours, and it must know exactly when a FramebufferUpdate has been completely
received.  GUI viewers and noVNC hide that moment behind rendering; vncdotool hides it behind
Twisted.  This client reads whole messages, stamps them with ``time.perf_counter_ns()`` the moment
the last byte is in, and only then decodes them into a local framebuffer.

What it speaks (rfbproto): versions 3.3/3.7/3.8; security None (1) and VNC Authentication (2, the
DES comes from ``dmore_nova.rm_vm.rfb.security``, imported only when a password is given);
SetPixelFormat, SetEncodings, FramebufferUpdateRequest, KeyEvent, PointerEvent; server messages
FramebufferUpdate (Raw, CopyRect, DesktopSize, LastRect), SetColourMapEntries, Bell,
ServerCutText.  Anything else from the server is an :class:`RFBError`, never a crash or an
out-of-bounds write: the framebuffer size and every rectangle are checked against explicit limits.
"""

from __future__ import annotations

import select
import socket
import struct
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ENC_COPYRECT",
    "ENC_DESKTOPSIZE",
    "ENC_LASTRECT",
    "ENC_RAW",
    "Bell",
    "ColourMap",
    "CutText",
    "RFBClient",
    "RFBError",
    "Rect",
    "Update",
]

ENC_RAW = 0
ENC_COPYRECT = 1
ENC_LASTRECT = -224
ENC_DESKTOPSIZE = -223

SEC_INVALID, SEC_NONE, SEC_VNC = 0, 1, 2

#: Limits: a hostile or broken server gets an RFBError, never an unbounded allocation.
MAX_WIDTH = MAX_HEIGHT = 8192
MAX_REASON = 64 * 1024
MAX_NAME = 64 * 1024
MAX_CUT_TEXT = 1024 * 1024
MAX_COLOURS = 65536

#: 32 bpp, depth 24, little-endian true colour, red at bit 16: what noVNC asks for too, so the
#: server encodes the same bytes a browser viewer would make it encode.
PIXEL_FORMAT_RGB888 = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
BYTES_PER_PIXEL = 4


def _vnc_auth_response():
    """The project's VNC-auth DES, found even when this file runs as a script from bench/."""
    try:
        from dmore_nova.rm_vm.rfb.security import vnc_auth_response
    except ImportError:
        sys.path.append(str(Path(__file__).resolve().parent.parent))
        from dmore_nova.rm_vm.rfb.security import vnc_auth_response
    return vnc_auth_response


class RFBError(Exception):
    """The server broke the protocol, refused us, or went away."""


@dataclass(frozen=True, slots=True)
class Rect:
    x: int
    y: int
    w: int
    h: int
    encoding: int
    changed: bool = False  # did this rectangle change any pixel of our copy?


@dataclass(slots=True)
class Update:
    """One FramebufferUpdate; ``t_done_ns`` is when its last byte had been received."""

    rects: list[Rect]
    t_done_ns: int
    nbytes: int

    @property
    def changed(self) -> bool:
        return any(r.changed for r in self.rects)


@dataclass(frozen=True, slots=True)
class ColourMap:
    first: int
    colours: list[tuple[int, int, int]]


@dataclass(frozen=True, slots=True)
class Bell:
    pass


@dataclass(frozen=True, slots=True)
class CutText:
    text: bytes


ServerMessage = Update | ColourMap | Bell | CutText


@dataclass(slots=True)
class _PendingRect:
    x: int
    y: int
    w: int
    h: int
    encoding: int
    payload: bytes = b""
    src: tuple[int, int] = (0, 0)


@dataclass
class RFBClient:
    """Connected, initialised viewer.  Use :meth:`connect` to make one."""

    sock: socket.socket
    version: tuple[int, int] = (3, 8)
    width: int = 0
    height: int = 0
    name: str = ""
    server_pixel_format: bytes = b""
    read_timeout: float = 10.0
    fb: bytearray = field(default_factory=bytearray)
    _buf: bytearray = field(default_factory=bytearray)
    _pos: int = 0
    _row_crc: list[int | None] = field(default_factory=list)
    bytes_received: int = 0

    # -- connection ---------------------------------------------------------------------------
    @classmethod
    def connect(cls, host: str, port: int, *, password: bytes | None = None,
                shared: bool = True, timeout: float = 10.0) -> RFBClient:
        """Open a TCP connection and run the handshake up to ServerInit.

        TCP_NODELAY matters: a 8-byte KeyEvent must leave at once, as every real viewer sends it.
        """
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = cls(sock=sock, read_timeout=timeout)
        try:
            client._handshake(password, shared)
        except BaseException:
            sock.close()
            raise
        return client

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RFBClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _handshake(self, password: bytes | None, shared: bool) -> None:
        banner = self._read(12)
        if not (banner.startswith(b"RFB ") and banner[7:8] == b"." and banner[11:12] == b"\n"):
            raise RFBError(f"not an RFB server: {banner!r}")
        try:
            major, minor = int(banner[4:7]), int(banner[8:11])
        except ValueError as exc:
            raise RFBError(f"bad ProtocolVersion {banner!r}") from exc
        if major != 3 or minor < 3:
            raise RFBError(f"unsupported ProtocolVersion {banner!r}")
        minor = 8 if minor >= 8 else 7 if minor >= 7 else 3
        self.version = (3, minor)
        self._send(b"RFB 003.%03d\n" % minor)
        if minor == 3:
            (sec,) = struct.unpack(">I", self._read(4))
            if sec == SEC_INVALID:
                raise RFBError(f"server refused: {self._read_reason()}")
        else:
            (n,) = self._read(1)
            if n == 0:
                raise RFBError(f"server refused: {self._read_reason()}")
            offered = set(self._read(n))
            want = SEC_VNC if password is not None else SEC_NONE
            if want not in offered:
                raise RFBError(f"server offers security types {sorted(offered)}, we need {want}")
            sec = want
            self._send(bytes([sec]))
        if sec == SEC_VNC:
            if password is None:
                raise RFBError("server wants VNC Authentication and no password was given")
            self._send(_vnc_auth_response()(password, self._read(16)))
        elif sec != SEC_NONE:
            raise RFBError(f"unsupported security type {sec}")
        if sec == SEC_VNC or minor == 8:
            (result,) = struct.unpack(">I", self._read(4))
            if result != 0:
                reason = self._read_reason() if minor == 8 else "(no reason in 3.3/3.7)"
                raise RFBError(f"security handshake failed: {reason}")
        self._send(bytes([1 if shared else 0]))
        w, h = struct.unpack(">HH", self._read(4))
        self.server_pixel_format = self._read(16)
        (nlen,) = struct.unpack(">I", self._read(4))
        if nlen > MAX_NAME:
            raise RFBError(f"desktop name of {nlen} bytes exceeds {MAX_NAME}")
        self.name = self._read(nlen).decode("utf-8", "replace")
        self._resize(w, h)

    def _read_reason(self) -> str:
        (n,) = struct.unpack(">I", self._read(4))
        if n > MAX_REASON:
            raise RFBError(f"reason of {n} bytes exceeds {MAX_REASON}")
        return self._read(n).decode("utf-8", "replace").rstrip("\0")

    # -- client messages ----------------------------------------------------------------------
    def set_pixel_format_rgb888(self) -> None:
        """Ask for 32 bpp little-endian true colour (the only format this client decodes)."""
        self._send(b"\x00\x00\x00\x00" + PIXEL_FORMAT_RGB888)

    def set_encodings(self, encodings: list[int]) -> None:
        for enc in encodings:
            if enc not in (ENC_RAW, ENC_COPYRECT, ENC_DESKTOPSIZE, ENC_LASTRECT):
                raise ValueError(f"this client cannot decode encoding {enc}")
        self._send(struct.pack(f">BxH{len(encodings)}i", 2, len(encodings), *encodings))

    def request_update(self, incremental: bool = True, x: int = 0, y: int = 0,
                       w: int | None = None, h: int | None = None) -> None:
        w = self.width - x if w is None else w
        h = self.height - y if h is None else h
        self._send(struct.pack(">BBHHHH", 3, int(incremental), x, y, w, h))

    def key_event(self, keysym: int, down: bool) -> int:
        """Send a KeyEvent; returns ``perf_counter_ns()`` taken just *before* the write, so a
        latency measured from it includes the client's own send syscall (the conservative end)."""
        msg = struct.pack(">BBxxI", 4, int(down), keysym)
        t = time.perf_counter_ns()
        self._send(msg)
        return t

    def pointer_event(self, x: int, y: int, buttons: int = 0) -> int:
        msg = struct.pack(">BBHH", 5, buttons, x, y)
        t = time.perf_counter_ns()
        self._send(msg)
        return t

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise RFBError(f"send failed: {exc}") from exc

    # -- server messages ----------------------------------------------------------------------
    def wait_readable(self, timeout: float) -> bool:
        """True if a message (or part of one) is ready within ``timeout`` seconds."""
        if self._pos < len(self._buf):
            return True
        r, _, _ = select.select([self.sock], [], [], max(timeout, 0.0))
        return bool(r)

    def read_message(self, timeout: float | None = None) -> ServerMessage | None:
        """Read one whole server message, or return None if none starts within ``timeout``.

        Once a message has begun, the rest must arrive within ``read_timeout``.
        """
        if timeout is not None and not self.wait_readable(timeout):
            return None
        (mtype,) = self._read(1)
        if mtype == 0:
            return self._read_update()
        if mtype == 1:
            first, n = struct.unpack(">xHH", self._read(5))
            if first + n > MAX_COLOURS:
                raise RFBError(f"colour map entries {first}+{n} exceed {MAX_COLOURS}")
            data = self._read(6 * n)
            colours = [struct.unpack_from(">HHH", data, 6 * i) for i in range(n)]
            return ColourMap(first, colours)
        if mtype == 2:
            return Bell()
        if mtype == 3:
            (n,) = struct.unpack(">3xI", self._read(7))
            if n > MAX_CUT_TEXT:
                raise RFBError(f"ServerCutText of {n} bytes exceeds {MAX_CUT_TEXT}")
            return CutText(self._read(n))
        raise RFBError(f"unknown server message type {mtype}")

    def _read_update(self) -> Update:
        start = self.bytes_received - (len(self._buf) - self._pos) - 1
        (n,) = struct.unpack(">xH", self._read(3))
        pending: list[_PendingRect] = []
        for _ in range(n):
            x, y, w, h, enc = struct.unpack(">HHHHi", self._read(12))
            if enc == ENC_LASTRECT:
                break
            r = _PendingRect(x, y, w, h, enc)
            if enc == ENC_DESKTOPSIZE:
                if not (0 < w <= MAX_WIDTH and 0 < h <= MAX_HEIGHT):
                    raise RFBError(f"DesktopSize {w}x{h} outside 1..{MAX_WIDTH}x{MAX_HEIGHT}")
                pending.append(r)
                continue
            width, height = self._size_after(pending)
            if x + w > width or y + h > height:
                raise RFBError(f"rectangle {w}x{h}+{x}+{y} outside the {width}x{height} screen")
            if enc == ENC_RAW:
                r.payload = self._read(w * h * BYTES_PER_PIXEL)
            elif enc == ENC_COPYRECT:
                sx, sy = struct.unpack(">HH", self._read(4))
                if sx + w > width or sy + h > height:
                    raise RFBError(f"CopyRect source {w}x{h}+{sx}+{sy} outside the screen")
                r.src = (sx, sy)
            else:
                raise RFBError(f"server used encoding {enc}, which we did not ask for")
            pending.append(r)
        t_done = time.perf_counter_ns()
        nbytes = self.bytes_received - (len(self._buf) - self._pos) - start
        return Update([self._apply(r) for r in pending], t_done, nbytes)

    def _size_after(self, pending: list[_PendingRect]) -> tuple[int, int]:
        for r in reversed(pending):
            if r.encoding == ENC_DESKTOPSIZE:
                return r.w, r.h
        return self.width, self.height

    # -- local framebuffer --------------------------------------------------------------------
    def _resize(self, w: int, h: int) -> None:
        if not (0 < w <= MAX_WIDTH and 0 < h <= MAX_HEIGHT):
            raise RFBError(f"framebuffer {w}x{h} outside 1..{MAX_WIDTH}x{MAX_HEIGHT}")
        self.width, self.height = w, h
        self.fb = bytearray(w * h * BYTES_PER_PIXEL)
        self._row_crc = [None] * h

    def _apply(self, r: _PendingRect) -> Rect:
        stride, rowlen = self.width * BYTES_PER_PIXEL, r.w * BYTES_PER_PIXEL
        changed = False
        if r.encoding == ENC_DESKTOPSIZE:
            self._resize(r.w, r.h)
            changed = True
        elif r.encoding == ENC_RAW:
            data = r.payload
            for row in range(r.h):
                off = (r.y + row) * stride + r.x * BYTES_PER_PIXEL
                src = data[row * rowlen:(row + 1) * rowlen]
                if self.fb[off:off + rowlen] != src:
                    self.fb[off:off + rowlen] = src
                    self._row_crc[r.y + row] = None
                    changed = True
        elif r.encoding == ENC_COPYRECT:
            sx, sy = r.src
            rows = [bytes(self.fb[(sy + i) * stride + sx * BYTES_PER_PIXEL:][:rowlen])
                    for i in range(r.h)]
            for i, src in enumerate(rows):
                off = (r.y + i) * stride + r.x * BYTES_PER_PIXEL
                if self.fb[off:off + rowlen] != src:
                    self.fb[off:off + rowlen] = src
                    self._row_crc[r.y + i] = None
                    changed = True
        return Rect(r.x, r.y, r.w, r.h, r.encoding, changed)

    def digest(self) -> int:
        """A cheap fingerprint of the whole local framebuffer (per-row CRC32s, recomputed only
        for rows that changed), so a benchmark can ask "have I seen this screen before?" after
        every update without hashing 2 MB each time."""
        stride = self.width * BYTES_PER_PIXEL
        crcs = self._row_crc
        fb = self.fb
        for y, c in enumerate(crcs):
            if c is None:
                crcs[y] = zlib.crc32(memoryview(fb)[y * stride:(y + 1) * stride])
        return hash((self.width, self.height, tuple(crcs)))

    def pixel(self, x: int, y: int) -> int:
        """0xRRGGBB at (x, y) of the local copy."""
        off = (y * self.width + x) * BYTES_PER_PIXEL
        return int.from_bytes(self.fb[off:off + 3], "little")

    # -- buffered reading ---------------------------------------------------------------------
    def _read(self, n: int) -> bytes:
        buf = self._buf
        while len(buf) - self._pos < n:
            if self._pos and self._pos >= len(buf) // 2:
                del buf[:self._pos]
                self._pos = 0
            try:
                self.sock.settimeout(self.read_timeout)
                chunk = self.sock.recv(max(1 << 16, n - (len(buf) - self._pos)))
            except TimeoutError as exc:
                raise RFBError(f"server stalled for {self.read_timeout} s mid-message") from exc
            except OSError as exc:
                raise RFBError(f"receive failed: {exc}") from exc
            if not chunk:
                raise RFBError("server closed the connection")
            self.bytes_received += len(chunk)
            buf += chunk
        out = bytes(buf[self._pos:self._pos + n])
        self._pos += n
        return out
