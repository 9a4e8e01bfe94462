"""A sans-IO RFB splice: one browser session kept alive across changing RM endpoints.

The console proxy sits between noVNC (over a websocket) and the RFB server of an RM VM.  When
the RM VM's endpoint changes or its TCP connection drops, the proxy connects to the new
endpoint and *hides the RFB re-handshake* from the browser: noVNC sees a pause in the stream,
never a disconnect.  Everything that needs RFB knowledge for that lives here, as two state
machines over bytes (h11 style: bytes in, events and bytes out, no sockets, no clock):

:class:`BackendHandshake`
    The proxy acting as an RFB *client* towards one RM endpoint: version, security (None, or
    VNC Authentication with a password the proxy holds for the console token), ClientInit
    (always shared), ServerInit.  Used for the first connection and for every re-attach.

:class:`RFBSplice`
    The proxy acting as an RFB *server* towards the browser, splicing the post-handshake
    streams of whichever backend is attached.

Design decisions, and why
-------------------------
**The proxy terminates the browser's handshake itself** (as Nova's RFBSecurityProxy does):
it offers the browser security type None (the console token already authenticated the user)
and builds the browser's ServerInit from the first backend's.  The alternative - letting the
first backend's handshake through and only faking later ones - would make the first attach and
a re-attach different code paths, and would put the RM's password in the browser.

**The splice keeps the state a re-handshake loses**: the browser's pixel format (ServerInit's
native one until it sends SetPixelFormat), its SetEncodings list, whether it enabled continuous
updates (and for which area), and the framebuffer size and desktop name it believes in.  On
re-attach it replays SetPixelFormat, SetEncodings, the input typed during the pause and a
non-incremental FramebufferUpdateRequest for the whole screen, so the browser gets a full
update from the new backend.  If the new backend's size differs, an ExtendedDesktopSize (or
DesktopSize) rectangle is injected first - only one the browser advertised; if it advertised
neither, the browser is closed with a reason rather than sent rectangles outside its
framebuffer.  Continuous updates are re-enabled once the new backend announces them
(EndOfContinuousUpdates); that announcement is swallowed, because the browser already had one
and noVNC turns continuous updates *off* on a second one.

**Server-to-browser bytes are cut at rectangle boundaries.**  The splice parses the backend's
messages (FramebufferUpdate rectangles of every encoding it lets the backend use, and every
other server message) and forwards only complete units: a FramebufferUpdate header, one whole
rectangle, or one whole other message.  A unit that is still arriving when the backend goes
away was never shown to the browser, so it is simply dropped.  If the cut falls inside a
FramebufferUpdate, the rectangles the browser still expects are padded with empty (0x0) Raw
rectangles, or one LastRect where the update announced LastRect use - no pixels are invented,
and the full update after re-attach repaints whatever the lost rectangles carried.  Holding a
rectangle costs no latency the browser would not pay anyway (noVNC decodes a rectangle only
once it has all of it) and at most one rectangle of memory; a single unit larger than
``max_held_unit`` is streamed instead, and a cut inside *that* closes the browser (the one
case a resume is impossible).

**Only encodings the splice can frame and resume are let through.**  The browser's
SetEncodings is filtered before it reaches a backend: Raw, CopyRect, RRE, CoRRE, Hextile, Tight
and TightPNG, and the pseudo-encodings whose payloads are known.  Dropped on purpose: ZRLE,
ZYWRLE, Zlib and ZlibHex, whose zlib stream the browser keeps inflating for the whole session
with no rectangle boundary the splice could exploit; TRLE, JPEG and H.264 (stateful or
unframeable here); ExtendedMouseButtons (changes PointerEvent framing once a backend
acknowledges it) and anything unknown.  Tight is kept, and its four zlib streams are spliced:
each Tight rectangle ends on a deflate sync flush, so a new backend's stream can continue the
browser's inflater once its 2-byte zlib header is stripped (and its reset bits cleared - resets
are not an option, noVNC's inflater cannot continue a stream after a reset; see
``_ServerFramer._tight``).  A backend that sends something
outside that set desynchronises the framing: the session is closed with a reason.

**Browser-to-server bytes are forwarded message by message.**  While no backend is attached,
input messages are queued in order (consecutive pointer moves with the same buttons are
coalesced, keys never are) up to ``max_pending_input`` bytes; more closes the browser with a
reason instead of losing keys silently.  Messages that were queued for a backend but never
written to it (the transport reports how far it got) are queued again for the next one;
a message half-written into a dying connection cannot be taken back and is not repeated.

What this cannot do: bytes a dying backend had accepted into its socket buffer but not
processed are lost with it (the RM agent queues input across co-migration for that reason);
server messages that had not arrived (a Bell, a clipboard update) are not replayed.

Every input is untrusted.  Malformed browser input closes the session with a reason; nothing
here raises for any byte sequence from either side.
"""

from __future__ import annotations

import enum
import re
import struct
from collections import deque
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field

from dmore_nova.rm_vm.rfb import constants as C
from dmore_nova.rm_vm.rfb.pixelformat import PixelFormat, PixelFormatError
from dmore_nova.rm_vm.rfb.protocol import (
    desktop_size_rect,
    extended_desktop_size_rect,
    last_rect_rect,
    rect_header,
)
from dmore_nova.rm_vm.rfb.security import vnc_auth_response

__all__ = [
    "ALLOWED_ENCODINGS",
    "Attached",
    "BackendHandshake",
    "ClientReady",
    "Closed",
    "Detached",
    "Event",
    "HandshakeState",
    "RFBSplice",
    "ServerInit",
    "SpliceConfig",
    "SpliceState",
    "filter_encodings",
]

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_S32 = struct.Struct(">i")
_RECT = struct.Struct(">HHHHi")
_VERSION_RE = re.compile(rb"RFB (\d{3})\.(\d{3})\n")

#: Encodings the splice can frame *and* resume on another backend (see the module docstring).
ALLOWED_ENCODINGS: frozenset[int] = frozenset({
    C.ENC_RAW, C.ENC_COPYRECT, C.ENC_RRE, C.ENC_CORRE, C.ENC_HEXTILE, C.ENC_TIGHT,
    C.ENC_TIGHT_PNG,
    C.PSEUDO_DESKTOP_SIZE, C.PSEUDO_LAST_RECT, C.PSEUDO_POINTER_POS, C.PSEUDO_CURSOR,
    C.PSEUDO_X_CURSOR, C.PSEUDO_QEMU_POINTER_MOTION_CHANGE, C.PSEUDO_QEMU_EXTENDED_KEY_EVENT,
    C.PSEUDO_QEMU_LED_STATE, C.PSEUDO_DESKTOP_NAME, C.PSEUDO_EXTENDED_DESKTOP_SIZE,
    C.PSEUDO_XVP, C.PSEUDO_FENCE, C.PSEUDO_CONTINUOUS_UPDATES, C.PSEUDO_EXTENDED_CLIPBOARD,
    C.PSEUDO_VMWARE_CURSOR,
    *range(C.PSEUDO_QUALITY_LEVEL_0, C.PSEUDO_QUALITY_LEVEL_9 + 1),
    *range(C.PSEUDO_COMPRESS_LEVEL_0, C.PSEUDO_COMPRESS_LEVEL_9 + 1),
})
#: Pseudo-rectangles that carry no payload at all.
_EMPTY_PSEUDO = frozenset({
    C.PSEUDO_DESKTOP_SIZE, C.PSEUDO_LAST_RECT, C.PSEUDO_POINTER_POS,
    C.PSEUDO_QEMU_POINTER_MOTION_CHANGE, C.PSEUDO_QEMU_EXTENDED_KEY_EVENT,
    C.PSEUDO_EXTENDED_MOUSE_BUTTONS,
})
_TIGHT_FAMILY = frozenset({C.ENC_TIGHT, C.ENC_TIGHT_PNG})
#: A browser may send nothing unasked before its ServerInit; this much is tolerated.
_MAX_EARLY_CLIENT_DATA = 4096
#: Tight sends data shorter than this uncompressed (rfbproto 7.7.6).
_TIGHT_MIN_TO_COMPRESS = 12


def filter_encodings(encodings: Iterable[int]) -> tuple[int, ...]:
    """The browser's SetEncodings list as a backend may see it: order kept, duplicates and
    encodings the splice cannot frame or resume removed."""
    seen: set[int] = set()
    out: list[int] = []
    for e in encodings:
        if e in ALLOWED_ENCODINGS and e not in seen:
            seen.add(e)
            out.append(e)
    return tuple(out)


def _is_tpixel(pf: PixelFormat) -> bool:
    """Tight's 3-byte TPIXEL rule (rfbproto 7.7.6): true colour, 32 bpp, depth 24, 8-bit
    channels - the same rule the server's Tight encoder applies."""
    return (pf.true_colour and pf.bits_per_pixel == 32 and pf.depth == 24
            and pf.red_max == pf.green_max == pf.blue_max == 255)


# -- values and events ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ServerInit:
    """What a backend said in ServerInit (rfbproto 7.3.2)."""

    width: int
    height: int
    pixel_format: PixelFormat
    name: bytes

    def pack(self) -> bytes:
        return (struct.pack(">HH", self.width, self.height) + self.pixel_format.pack()
                + _U32.pack(len(self.name)) + self.name)


@dataclass(frozen=True)
class ClientReady:
    """The browser finished its handshake (the splice sent it ServerInit)."""

    version: tuple[int, int]


@dataclass(frozen=True)
class Attached:
    """A backend is now spliced in.  ``reattach`` is False only for the first one."""

    width: int
    height: int
    name: bytes
    reattach: bool
    resized: bool


@dataclass(frozen=True)
class Detached:
    """The backend was taken away; the browser is paused at a message boundary.

    ``padded``: empty rectangles sent to finish a cut FramebufferUpdate; ``dropped``: bytes of
    an unfinished backend message that were never shown; ``requeued``: input messages that had
    not been written to the old backend and will go to the next one."""

    reason: str
    padded: int
    dropped: int
    requeued: int


@dataclass(frozen=True)
class Closed:
    """The session is over: flush :meth:`RFBSplice.data_to_send_client`, then close both sides.

    ``by_client`` tells whether the browser caused it (bad input, or it left)."""

    reason: str
    error: bool
    by_client: bool


Event = ClientReady | Attached | Detached | Closed


@dataclass
class SpliceConfig:
    """Limits of one session.  Every buffer the untrusted browser can fill is bounded here."""

    #: Largest ClientCutText accepted from the browser (bytes).
    max_cut_text: int = 1 << 20
    #: Most encodings in one SetEncodings.
    max_encodings: int = 1024
    #: Most screens in one SetDesktopSize.
    max_screens: int = 16
    #: Browser input (bytes) queued while no backend is attached.
    max_pending_input: int = 256 << 10
    #: A backend unit (rectangle or message) larger than this is streamed, not held; a cut
    #: inside a streamed unit cannot be resumed.
    max_held_unit: int = 64 << 20
    #: Longest desktop name accepted from a backend's ServerInit.
    max_name: int = 4096
    #: Longest failure reason read from a backend.
    max_reason: int = 4096

    def check(self) -> None:
        for name in ("max_cut_text", "max_encodings", "max_screens", "max_pending_input",
                     "max_name", "max_reason"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.max_screens > 255:
            raise ValueError("max_screens above 255 cannot be expressed on the wire")
        if self.max_held_unit < 4096:
            raise ValueError("max_held_unit below 4096 would stream even rectangle headers")


# -- the proxy as an RFB client ------------------------------------------------------------------

class HandshakeState(enum.Enum):
    VERSION = "version"                  # the server's ProtocolVersion
    SECURITY_33 = "security-3.3"         # 3.3: the server's chosen type (U32)
    SECURITY_TYPES = "security-types"    # 3.7+: count and list of types
    VNC_CHALLENGE = "vnc-challenge"      # the 16-byte challenge
    SECURITY_RESULT = "security-result"  # U32 status
    REASON = "reason"                    # U32 length + failure text
    SERVER_INIT = "server-init"          # ServerInit
    DONE = "done"
    FAILED = "failed"


class BackendHandshake:
    """The RFB client handshake with one backend, up to and including ServerInit.

    Feed bytes with :meth:`receive_data` (``b""`` = the server closed), write
    :meth:`data_to_send`.  When :attr:`state` is DONE, :attr:`result` holds the ServerInit and
    :attr:`leftover` whatever the server sent after it (post-handshake stream, to be fed to
    :meth:`RFBSplice.attach`).  When FAILED, :attr:`error` says why.  Never raises for any
    input.  Security: None when offered, else VNC Authentication when a password is known;
    VeNCrypt and the rest are refused with a reason.
    """

    def __init__(self, password: str | bytes | None = None, *, max_name: int = 4096,
                 max_reason: int = 4096) -> None:
        self._password = password.encode() if isinstance(password, str) else password
        self.max_name = max_name
        self.max_reason = max_reason
        self.state = HandshakeState.VERSION
        self.version: tuple[int, int] | None = None
        self.security_type: int | None = None
        self.result: ServerInit | None = None
        self.error: str | None = None
        self.leftover = b""
        self._in = bytearray()
        self._out = bytearray()
        self._reason_context = ""

    @property
    def done(self) -> bool:
        return self.state is HandshakeState.DONE

    @property
    def failed(self) -> bool:
        return self.state is HandshakeState.FAILED

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> None:
        if self.state in (HandshakeState.DONE, HandshakeState.FAILED):
            if self.state is HandshakeState.DONE and data:
                self.leftover += data
            return
        if not data:
            where = self.state.value
            self._fail(f"server closed the connection during the RFB handshake ({where})")
            return
        self._in += data
        handlers = {
            HandshakeState.VERSION: self._h_version,
            HandshakeState.SECURITY_33: self._h_security_33,
            HandshakeState.SECURITY_TYPES: self._h_security_types,
            HandshakeState.VNC_CHALLENGE: self._h_challenge,
            HandshakeState.SECURITY_RESULT: self._h_security_result,
            HandshakeState.REASON: self._h_reason,
            HandshakeState.SERVER_INIT: self._h_server_init,
        }
        try:
            while self.state in handlers and handlers[self.state]():
                pass
        except Exception as exc:  # noqa: BLE001 - a bug costs this attempt, not the proxy
            self._fail(f"internal error in the RFB handshake: {exc!r}")

    # -- internals ---------------------------------------------------------------------------
    def _fail(self, reason: str) -> bool:
        self.state = HandshakeState.FAILED
        self.error = reason
        return False

    def _take(self, n: int) -> bytes:
        data = bytes(self._in[:n])
        del self._in[:n]
        return data

    def _h_version(self) -> bool:
        if self._in[:4] != b"RFB "[:len(self._in[:4])]:
            return self._fail("not an RFB server (bad ProtocolVersion)")
        if len(self._in) < C.PROTOCOL_VERSION_LEN:
            return False
        raw = self._take(C.PROTOCOL_VERSION_LEN)
        m = _VERSION_RE.fullmatch(raw)
        if m is None:
            return self._fail(f"malformed server ProtocolVersion {raw!r}")
        major, minor = int(m.group(1)), int(m.group(2))
        if major < 3 or (major == 3 and minor < 3):
            return self._fail(f"unsupported RFB protocol version {major}.{minor}")
        # rfbproto: unknown 3.x below 3.7 means 3.3; RealVNC 4/5 and Apple's 3.889 speak 3.8.
        if major == 3 and minor < 7:
            version = C.RFB_VERSION_3_3
        elif major == 3 and minor == 7:
            version = C.RFB_VERSION_3_7
        else:
            version = C.RFB_VERSION_3_8
        self.version = version
        self._out += b"RFB %03d.%03d\n" % version
        self.state = (HandshakeState.SECURITY_33 if version == C.RFB_VERSION_3_3
                      else HandshakeState.SECURITY_TYPES)
        return True

    def _h_security_33(self) -> bool:
        if len(self._in) < 4:
            return False
        sec = _U32.unpack(self._take(4))[0]
        if sec == C.SEC_INVALID:
            self._reason_context = "server refused the connection"
            self.state = HandshakeState.REASON
            return True
        return self._use_security(sec, [sec])

    def _h_security_types(self) -> bool:
        if not self._in:
            return False
        n = self._in[0]
        if n == 0:
            self._take(1)
            self._reason_context = "server refused the connection"
            self.state = HandshakeState.REASON
            return True
        if len(self._in) < 1 + n:
            return False
        offered = list(self._take(1 + n)[1:])
        if C.SEC_NONE in offered:
            chosen = C.SEC_NONE
        elif C.SEC_VNC_AUTH in offered and self._password is not None:
            chosen = C.SEC_VNC_AUTH
        elif C.SEC_VNC_AUTH in offered:
            return self._fail("the server requires VNC authentication and no password is "
                              "configured for this console")
        else:
            return self._fail(f"no security type the proxy supports (server offers {offered})")
        self._out.append(chosen)
        return self._use_security(chosen, offered)

    def _use_security(self, sec: int, offered: list[int]) -> bool:
        self.security_type = sec
        if sec == C.SEC_NONE:
            if self.version == C.RFB_VERSION_3_8:
                self.state = HandshakeState.SECURITY_RESULT
            else:
                self._client_init()
            return True
        if sec == C.SEC_VNC_AUTH:
            if self._password is None:
                return self._fail("the server requires VNC authentication and no password is "
                                  "configured for this console")
            self.state = HandshakeState.VNC_CHALLENGE
            return True
        return self._fail(f"no security type the proxy supports (server offers {offered})")

    def _h_challenge(self) -> bool:
        if len(self._in) < C.VNC_AUTH_CHALLENGE_LEN:
            return False
        challenge = self._take(C.VNC_AUTH_CHALLENGE_LEN)
        assert self._password is not None
        self._out += vnc_auth_response(self._password, challenge)
        self.state = HandshakeState.SECURITY_RESULT
        return True

    def _h_security_result(self) -> bool:
        if len(self._in) < 4:
            return False
        status = _U32.unpack(self._take(4))[0]
        if status == C.SECURITY_RESULT_OK:
            self._client_init()
            return True
        what = ("VNC authentication failed" if self.security_type == C.SEC_VNC_AUTH
                else "security handshake failed")
        if self.version == C.RFB_VERSION_3_8:
            self._reason_context = what
            self.state = HandshakeState.REASON
            return True
        return self._fail(what)

    def _h_reason(self) -> bool:
        if len(self._in) < 4:
            return False
        n = _U32.unpack_from(self._in, 0)[0]
        if n > self.max_reason:
            return self._fail(f"{self._reason_context} (reason of {n} bytes not read)")
        if len(self._in) < 4 + n:
            return False
        text = self._take(4 + n)[4:].decode("utf-8", "replace")
        return self._fail(f"{self._reason_context}: {text}")

    def _client_init(self) -> None:
        # Always shared: the proxy must never make the RM's server disconnect other viewers,
        # and on a re-attach the browser's own choice was made long ago.
        self._out.append(1)
        self.state = HandshakeState.SERVER_INIT

    def _h_server_init(self) -> bool:
        if len(self._in) < 24:
            return False
        name_len = _U32.unpack_from(self._in, 20)[0]
        if name_len > self.max_name:
            return self._fail(f"server desktop name of {name_len} bytes exceeds the limit of "
                              f"{self.max_name}")
        if len(self._in) < 24 + name_len:
            return False
        raw = self._take(24 + name_len)
        width, height = struct.unpack_from(">HH", raw, 0)
        pf = PixelFormat.unpack(raw[4:20])
        try:
            pf.validate()
        except PixelFormatError as exc:
            return self._fail(f"server pixel format not supported: {exc}")
        self.result = ServerInit(width, height, pf, raw[24:])
        self.leftover = bytes(self._in)
        self._in.clear()
        self.state = HandshakeState.DONE
        return False


# -- the splice ------------------------------------------------------------------------------------

class SpliceState(enum.Enum):
    """Where the browser side is."""

    VERSION = "version"      # waiting for the browser's ProtocolVersion
    WAIT = "wait"            # browser version known, waiting for a backend to offer security
    SECURITY = "security"    # 3.7+: waiting for the browser's choice (None)
    INIT = "init"            # waiting for ClientInit (and a backend for ServerInit)
    NORMAL = "normal"
    CLOSED = "closed"


class _FramingError(Exception):
    """The backend's stream cannot be framed (unknown message or encoding, bad values)."""


class _ClientError(Exception):
    """The browser sent something malformed or over a limit."""


class _Skip:
    """A framer request: the next ``n`` payload bytes need not be looked at."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n


class _End:
    """A framer request: the current unit ends here."""

    __slots__ = ("kind", "info")

    def __init__(self, kind: str, info: tuple = ()) -> None:
        self.kind = kind
        self.info = info


_Request = int | _Skip | _End
_Parser = Generator[_Request, bytes | None, None]


class _ServerFramer:
    """Cuts one backend's post-handshake stream into units (see the module docstring).

    The parser is a generator that yields what it needs next: ``n`` (show me n bytes),
    :class:`_Skip` (n opaque bytes) or :class:`_End` (the unit is complete).  That keeps a
    Hextile rectangle resumable tile by tile however the bytes arrive, with no re-scanning.
    """

    def __init__(self, splice: RFBSplice, max_held: int) -> None:
        self._splice = splice
        self._max_held = max_held
        self._buf = bytearray()
        self._pos = 0            # parse position; _buf[:_pos] is the current unit so far
        self.streaming = False   # part of the current unit was already forwarded
        #: Per Tight zlib stream: the backend's compressor (re)starts it, so its next chunk
        #: begins with a zlib header.  A new backend starts all four.
        self.server_fresh = [True] * 4
        self._gen: _Parser = self._stream()
        self._req: _Request = next(self._gen)

    @property
    def held(self) -> int:
        """Bytes of the unfinished unit that were not forwarded."""
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        """Raises _FramingError when the stream cannot be parsed."""
        self._buf += data
        buf = self._buf
        while True:
            req = self._req
            if isinstance(req, int):
                if len(buf) - self._pos < req:
                    return
                chunk = bytes(buf[self._pos:self._pos + req])
                self._pos += req
                self._req = self._gen.send(chunk)
            elif isinstance(req, _Skip):
                take = min(req.n, len(buf) - self._pos)
                self._pos += take
                req.n -= take
                if req.n:
                    if self._pos + req.n > self._max_held or self.streaming:
                        self._splice._server_stream_part(bytes(buf[:self._pos]))
                        del buf[:self._pos]
                        self._pos = 0
                        self.streaming = True
                    return
                self._req = self._gen.send(None)
            else:
                unit = bytes(buf[:self._pos])
                del buf[:self._pos]
                self._pos = 0
                streamed, self.streaming = self.streaming, False
                self._splice._server_unit(unit, req.kind, req.info, streamed)
                self._req = next(self._gen)

    def _patch_last(self, value: int) -> None:
        """Rewrite the byte the parser just looked at (it is always still held)."""
        self._buf[self._pos - 1] = value

    # -- the parser --------------------------------------------------------------------------
    def _stream(self) -> _Parser:
        while True:
            head = yield 1
            assert head is not None
            mtype = head[0]
            if mtype == C.MSG_FRAMEBUFFER_UPDATE:
                hdr = yield 3
                assert hdr is not None
                nrects = _U16.unpack_from(hdr, 1)[0]
                # The pixel format of a whole update is fixed when its header arrives.
                pf = self._splice._parse_pf
                yield _End("fbu", (nrects,))
                for _ in range(nrects):
                    rh = yield 12
                    assert rh is not None
                    x, y, w, h, enc = _RECT.unpack(rh)
                    effect = yield from self._rect(x, y, w, h, enc, pf)
                    yield _End("rect", (x, y, w, h, enc, effect))
                    if enc == C.PSEUDO_LAST_RECT:
                        break
            elif mtype == C.MSG_SET_COLOUR_MAP_ENTRIES:
                hdr = yield 5
                assert hdr is not None
                yield _Skip(6 * _U16.unpack_from(hdr, 3)[0])
                yield _End("message", (mtype,))
            elif mtype in (C.MSG_BELL, C.MSG_END_OF_CONTINUOUS_UPDATES):
                yield _End("message", (mtype,))
            elif mtype == C.MSG_SERVER_CUT_TEXT:
                hdr = yield 7
                assert hdr is not None
                yield _Skip(abs(_S32.unpack_from(hdr, 3)[0]))
                yield _End("message", (mtype,))
            elif mtype == C.MSG_SERVER_FENCE:
                hdr = yield 8
                assert hdr is not None
                if hdr[7] > C.FENCE_MAX_PAYLOAD:
                    raise _FramingError(f"server Fence payload of {hdr[7]} bytes (limit 64)")
                yield _Skip(hdr[7])
                yield _End("message", (mtype,))
            elif mtype == C.MSG_XVP_SERVER:
                yield 3
                yield _End("message", (mtype,))
            else:
                raise _FramingError(f"unknown server message type {mtype}")

    def _rect(self, x: int, y: int, w: int, h: int, enc: int, pf: PixelFormat
              ) -> Generator[_Request, bytes | None, tuple[int, int] | None]:
        """Frame one rectangle's payload; Tight returns its effect on the browser's zlib
        streams (streams reset, stream used), applied when the rectangle is forwarded."""
        bpp = pf.bytes_per_pixel
        if enc == C.ENC_RAW:
            yield _Skip(w * h * bpp)
        elif enc == C.ENC_COPYRECT:
            yield _Skip(4)
        elif enc in (C.ENC_RRE, C.ENC_CORRE):
            hdr = yield 4
            assert hdr is not None
            n = _U32.unpack(hdr)[0]
            yield _Skip(bpp + n * (bpp + (8 if enc == C.ENC_RRE else 4)))
        elif enc == C.ENC_HEXTILE:
            yield from self._hextile(w, h, bpp)
        elif enc in _TIGHT_FAMILY:
            return (yield from self._tight(w, h, pf, enc))
        elif enc in _EMPTY_PSEUDO:
            pass
        elif enc == C.PSEUDO_CURSOR:
            yield _Skip(w * h * bpp + (w + 7) // 8 * h)
        elif enc == C.PSEUDO_X_CURSOR:
            if w and h:
                yield _Skip(6 + 2 * ((w + 7) // 8) * h)
        elif enc == C.PSEUDO_QEMU_LED_STATE:
            yield _Skip(1)
        elif enc == C.PSEUDO_DESKTOP_NAME:
            hdr = yield 4
            assert hdr is not None
            yield _Skip(_U32.unpack(hdr)[0])
        elif enc == C.PSEUDO_EXTENDED_DESKTOP_SIZE:
            hdr = yield 4
            assert hdr is not None
            yield _Skip(16 * hdr[0])
        elif enc == C.PSEUDO_VMWARE_CURSOR:
            hdr = yield 2
            assert hdr is not None
            if hdr[0] == 0:
                yield _Skip(2 * w * h * bpp)
            elif hdr[0] == 1:
                yield _Skip(w * h * 4)
            else:
                raise _FramingError(f"VMware cursor type {hdr[0]} unknown")
        else:
            raise _FramingError(f"server used encoding {enc}, which the proxy did not offer")
        return None

    def _hextile(self, w: int, h: int, bpp: int) -> _Parser:
        for ty in range(0, h, 16):
            th = min(16, h - ty)
            for tx in range(0, w, 16):
                tw = min(16, w - tx)
                got = yield 1
                assert got is not None
                sub = got[0]
                if sub & 1:  # Raw tile
                    yield _Skip(tw * th * bpp)
                    continue
                if sub & ~0x1F:
                    raise _FramingError(f"Hextile subencoding {sub:#x} has unknown bits")
                colours = bpp * (bool(sub & 2) + bool(sub & 4))
                if colours:
                    yield _Skip(colours)
                if sub & 8:  # AnySubrects
                    got = yield 1
                    assert got is not None
                    per = bpp + 2 if sub & 16 else 2
                    if got[0]:
                        yield _Skip(got[0] * per)

    def _tight(self, w: int, h: int, pf: PixelFormat, enc: int
               ) -> Generator[_Request, bytes | None, tuple[int, int]]:
        """Frame a Tight rectangle and keep the browser's zlib streams continuous.

        The browser inflates each of Tight's four zlib streams for the whole session, while
        each backend deflates its own.  Tight's reset bits would let a new backend's stream
        restart the browser's inflater - but noVNC's pako ``inflateReset`` keeps a stale window
        (it sets wsize to 0 without dropping the window), so the *second* chunk after a reset
        of a used stream fails to inflate.  Instead, the browser's started streams are never
        reset: a backend's stream (re)start is spliced on as a continuation, by clearing its
        reset bit and stripping the 2-byte zlib header from its first chunk.  That is valid
        deflate: every Tight rectangle ends on a sync flush (a block boundary), and a fresh
        compressor only refers back to its own output, which the browser then holds at the
        same distances.
        """
        got = yield 1
        assert got is not None
        ctl = got[0]
        browser_started = self._splice._tight_started
        resets = ctl & 0x0F
        forwarded_resets = resets
        if enc == C.ENC_TIGHT and resets:
            for i in range(4):
                if resets >> i & 1:
                    self.server_fresh[i] = True
                    if browser_started[i]:
                        forwarded_resets &= ~(1 << i)
            if forwarded_resets != resets:
                self._patch_last((ctl & 0xF0) | forwarded_resets)
        kind = ctl >> 4
        tpix = 3 if _is_tpixel(pf) else pf.bytes_per_pixel
        used = -1
        if kind == 0x8:  # FillCompression
            yield _Skip(tpix)
        elif kind == 0x9 or (kind == 0xA and enc == C.ENC_TIGHT_PNG):  # JPEG / PNG
            n = yield from self._compact()
            yield _Skip(n)
        elif kind < 0x8:  # BasicCompression
            stream = kind & 0x3
            filt = 0
            if kind & 0x4:
                got = yield 1
                assert got is not None
                filt = got[0]
            if filt in (0, 2):  # copy, gradient
                size = w * h * tpix
            elif filt == 1:  # palette
                got = yield 1
                assert got is not None
                ncol = got[0] + 1
                yield _Skip(ncol * tpix)
                size = (w + 7) // 8 * h if ncol <= 2 else w * h
            else:
                raise _FramingError(f"Tight filter {filt} unknown")
            if size < _TIGHT_MIN_TO_COMPRESS:  # sent as is, no length, no zlib stream
                yield _Skip(size)
            else:
                start = self._pos
                n = yield from self._compact()
                used = stream
                if enc == C.ENC_TIGHT and self.server_fresh[stream]:
                    self.server_fresh[stream] = False
                    if browser_started[stream] and not forwarded_resets >> stream & 1:
                        n = yield from self._strip_zlib_header(start, n, stream)
                yield _Skip(n)
        else:
            raise _FramingError(f"Tight compression control {ctl:#04x} invalid")
        return forwarded_resets, used

    def _strip_zlib_header(self, start: int, n: int, stream: int
                           ) -> Generator[_Request, bytes | None, int]:
        """Drop the zlib header (RFC 1950) opening a backend's stream, rewriting the compact
        length in front of it; returns the new data length."""
        if n < 2:
            raise _FramingError(f"Tight stream {stream} restarts with {n} bytes of data")
        head = yield 2
        assert head is not None
        cmf, flg = head
        if cmf & 0x0F != 8 or (cmf << 8 | flg) % 31 or flg & 0x20:
            raise _FramingError(f"Tight stream {stream} does not start with a plain zlib "
                                f"header ({cmf:#04x} {flg:#04x})")
        new_len = _compact_length(n - 2)
        self._buf[start:self._pos] = new_len
        self._pos = start + len(new_len)
        return n - 2

    def _compact(self) -> Generator[_Request, bytes | None, int]:
        got = yield 1
        assert got is not None
        n = got[0] & 0x7F
        if got[0] & 0x80:
            got = yield 1
            assert got is not None
            n |= (got[0] & 0x7F) << 7
            if got[0] & 0x80:
                got = yield 1
                assert got is not None
                n |= got[0] << 14
        return n


@dataclass
class _Outgoing:
    """Bytes queued for the attached backend, with message boundaries kept."""

    data: bytearray = field(default_factory=bytearray)
    #: (length, is_input) per message, oldest first; the first may be partly written.
    msgs: deque[tuple[int, bool]] = field(default_factory=deque)
    head_written: int = 0


class RFBSplice:
    """The browser's side of one console session, spliced to whichever backend is attached.

    Browser side: :meth:`receive_client_data` / :meth:`data_to_send_client`.  Backend side:
    :meth:`attach` a completed :class:`BackendHandshake`'s ServerInit, feed
    :meth:`receive_server_data`, write :meth:`server_output` and report it with
    :meth:`server_output_written`, and :meth:`detach` when the backend goes away (or is
    switched).  Each input method returns the events it caused.
    """

    def __init__(self, config: SpliceConfig | None = None) -> None:
        self.config = config or SpliceConfig()
        self.config.check()
        self.state = SpliceState.VERSION
        self.version: tuple[int, int] | None = None
        self.close_reason: str | None = None

        self._cin = bytearray()
        self._cout = bytearray()
        self._events: list[Event] = []

        # The backend.
        self._server: ServerInit | None = None
        self._framer: _ServerFramer | None = None
        self._out = _Outgoing()
        self._attachments = 0
        #: Backend units that arrived before the browser's ServerInit: (bytes, kind, info).
        self._backlog: list[tuple[bytes, str, tuple]] = []

        # What the browser believes (replayed on every re-attach).
        self._client_init: ServerInit | None = None
        self._client_pf: PixelFormat | None = None
        self._client_encodings: tuple[int, ...] | None = None
        self._client_encoding_set: frozenset[int] = frozenset()
        self._client_size = (0, 0)
        self._client_name = b""
        self._saw_eocu = False
        self._cu_enabled = False
        self._cu_rect = (0, 0, 0, 0)
        self._swallow_eocu = False
        #: Per Tight zlib stream: the browser's inflater has data (a stream restart must be
        #: spliced on as a continuation, see _ServerFramer._tight).
        self._tight_started = [False] * 4
        #: The pixel format backend updates are parsed with.
        self._parse_pf: PixelFormat | None = None
        # An unfinished FramebufferUpdate, as the browser sees it.
        self._fbu_remaining = 0
        self._fbu_lastrect = False

        # Browser input waiting for a backend.
        self._pending: deque[bytes] = deque()
        self._pending_bytes = 0

        self._cout += b"RFB %03d.%03d\n" % C.RFB_VERSION_3_8

    # -- status ------------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return self._server is not None

    @property
    def closed(self) -> bool:
        return self.state is SpliceState.CLOSED

    @property
    def client_size(self) -> tuple[int, int]:
        """The framebuffer size the browser believes in (after its handshake)."""
        return self._client_size

    @property
    def client_encodings(self) -> tuple[int, ...] | None:
        return self._client_encodings

    @property
    def server_output_size(self) -> int:
        """Bytes queued for the attached backend and not yet written."""
        return len(self._out.data)

    @property
    def client_ready(self) -> bool:
        """True once the browser has its ServerInit (stays True after a close)."""
        return self._client_init is not None

    @property
    def pending_input(self) -> int:
        """Bytes of browser input waiting for a backend."""
        return self._pending_bytes

    @property
    def cut_is_safe(self) -> bool:
        """False while a streamed (oversized) backend unit is half forwarded."""
        return self._framer is None or not self._framer.streaming

    # -- browser side ------------------------------------------------------------------------
    def receive_client_data(self, data: bytes) -> list[Event]:
        """Bytes from the browser (``b""``: it closed).  Never raises."""
        self._events = []
        if self.state is SpliceState.CLOSED:
            return []
        try:
            if not data:
                where = "" if self.state is SpliceState.NORMAL else f" during {self.state.value}"
                self._close(f"browser closed the connection{where}", error=False,
                            by_client=True)
            else:
                self._cin += data
                self._process_client()
                if (self.state is not SpliceState.NORMAL
                        and len(self._cin) > _MAX_EARLY_CLIENT_DATA):
                    raise _ClientError("browser sent data the RFB handshake does not allow")
        except _ClientError as exc:
            self._close(str(exc), error=True, by_client=True)
        except Exception as exc:  # noqa: BLE001 - untrusted bytes never raise
            self._close(f"internal error: {exc!r}", error=True, by_client=False)
        return self._take_events()

    def data_to_send_client(self) -> bytes:
        out = bytes(self._cout)
        self._cout.clear()
        return out

    def close(self, reason: str, *, by_client: bool = False) -> list[Event]:
        """End the session from the proxy's side (a backend could not be reached, shutdown,
        or - ``by_client`` - the browser was too slow).

        Where the browser's handshake has a place for a failure, the reason is sent there
        (rfbproto "connection failed": no security types, then the reason string)."""
        self._events = []
        if self.state is SpliceState.CLOSED:
            return []
        if self.state in (SpliceState.VERSION, SpliceState.WAIT):
            version = self.version or C.RFB_VERSION_3_8
            text = reason.encode("utf-8", "replace")
            head = _U32.pack(0) if version == C.RFB_VERSION_3_3 else b"\x00"
            self._cout += head + _U32.pack(len(text)) + text
        self._close(reason, error=True, by_client=by_client)
        return self._take_events()

    # -- backend side ------------------------------------------------------------------------
    def attach(self, init: ServerInit, leftover: bytes = b"") -> list[Event]:
        """Splice in a backend whose handshake completed (``leftover``: bytes it sent after
        ServerInit).  For the first backend, the browser's handshake proceeds; for later ones,
        the browser's state is replayed to it (see the module docstring)."""
        self._events = []
        if self.state is SpliceState.CLOSED:
            return []
        if self._server is not None:
            raise RuntimeError("attach() while a backend is attached; detach() it first")
        try:
            self._attach(init)
            if leftover and self._server is not None:
                self._feed_server(leftover)
            if self.state is not SpliceState.CLOSED:
                self._process_client()
        except _ClientError as exc:
            self._close(str(exc), error=True, by_client=True)
        except Exception as exc:  # noqa: BLE001
            self._close(f"internal error: {exc!r}", error=True, by_client=False)
        return self._take_events()

    def detach(self, reason: str) -> list[Event]:
        """The attached backend is gone (dropped, or being replaced).  Whatever was not yet
        forwarded of it is discarded, a cut update is padded, unwritten input is kept."""
        self._events = []
        if self.state is SpliceState.CLOSED or self._server is None:
            return []
        framer = self._framer
        assert framer is not None
        self._server = None
        self._framer = None
        if framer.streaming:
            self._close(f"{reason}: the backend was lost in the middle of a message larger "
                        f"than {self.config.max_held_unit} bytes, which cannot be resumed",
                        error=True, by_client=False)
            return self._take_events()
        dropped = framer.held
        padded = 0
        if self.state is SpliceState.NORMAL:
            padded = self._pad_update()
        else:
            # The browser has not seen this backend yet: nothing of it needs finishing.
            dropped += sum(len(b) for b, _, _ in self._backlog)
            self._backlog.clear()
        requeued = self._requeue_unwritten()
        self._events.append(Detached(reason, padded, dropped, requeued))
        return self._take_events()

    def receive_server_data(self, data: bytes) -> list[Event]:
        """Bytes from the attached backend.  (Its EOF is a :meth:`detach`.)"""
        self._events = []
        if self.state is SpliceState.CLOSED or self._server is None or not data:
            return []
        try:
            self._feed_server(data)
        except Exception as exc:  # noqa: BLE001
            self._close(f"internal error: {exc!r}", error=True, by_client=False)
        return self._take_events()

    def server_output(self) -> bytes:
        """Bytes to write to the attached backend (not consumed: report what was written with
        :meth:`server_output_written`, so unwritten messages can move to the next backend)."""
        return bytes(self._out.data)

    def server_output_written(self, n: int) -> None:
        out = self._out
        if not 0 <= n <= len(out.data):
            raise ValueError(f"{n} bytes written of {len(out.data)} queued")
        del out.data[:n]
        n += out.head_written
        while out.msgs and n >= out.msgs[0][0]:
            n -= out.msgs.popleft()[0]
        out.head_written = n

    # -- internals: common -------------------------------------------------------------------
    def _take_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def _close(self, reason: str, *, error: bool, by_client: bool) -> None:
        if self.state is SpliceState.CLOSED:
            return
        self.state = SpliceState.CLOSED
        self.close_reason = reason
        self._server = None
        self._framer = None
        self._pending.clear()
        self._pending_bytes = 0
        self._out = _Outgoing()
        self._events.append(Closed(reason, error, by_client))

    def _to_server(self, msg: bytes, is_input: bool) -> None:
        self._out.data += msg
        self._out.msgs.append((len(msg), is_input))

    def _client_has(self, enc: int) -> bool:
        return enc in self._client_encoding_set

    # -- internals: backend ------------------------------------------------------------------
    def _attach(self, init: ServerInit) -> None:
        self._server = init
        self._attachments += 1
        self._framer = _ServerFramer(self, self.config.max_held_unit)
        self._out = _Outgoing()
        reattach = self._attachments > 1
        if self.state is not SpliceState.NORMAL:
            # The browser has not been given a ServerInit yet: this backend's will be it.
            self._parse_pf = init.pixel_format
            self._events.append(Attached(init.width, init.height, init.name, reattach, False))
            if self.state is SpliceState.WAIT:
                self._offer_security()
            return
        resized = (init.width, init.height) != self._client_size
        inject: list[bytes] = []
        if resized:
            w, h = init.width, init.height
            if self._client_has(C.PSEUDO_EXTENDED_DESKTOP_SIZE):
                inject.append(extended_desktop_size_rect(C.EDS_REASON_SERVER,
                                                         C.EDS_STATUS_OK, w, h))
            elif self._client_has(C.PSEUDO_DESKTOP_SIZE):
                inject.append(desktop_size_rect(w, h))
            else:
                self._close(f"the new backend's framebuffer is {w}x{h}, not "
                            f"{self._client_size[0]}x{self._client_size[1]}, and the browser "
                            "supports neither DesktopSize nor ExtendedDesktopSize",
                            error=True, by_client=False)
                return
            self._client_size = (w, h)
        if init.name != self._client_name and self._client_has(C.PSEUDO_DESKTOP_NAME):
            inject.append(rect_header(0, 0, 0, 0, C.PSEUDO_DESKTOP_NAME)
                          + _U32.pack(len(init.name)) + init.name)
            self._client_name = init.name
        if inject:
            self._cout += bytes((C.MSG_FRAMEBUFFER_UPDATE, 0)) + _U16.pack(len(inject))
            self._cout += b"".join(inject)
        self._replay()
        self._events.append(Attached(init.width, init.height, init.name, reattach, resized))

    def _replay(self) -> None:
        """Give a new backend what the browser told the old ones, then the queued input, then
        ask for the whole screen."""
        assert self._client_pf is not None and self._framer is not None
        self._to_server(bytes((C.MSG_SET_PIXEL_FORMAT, 0, 0, 0)) + self._client_pf.pack(),
                        False)
        self._parse_pf = self._client_pf
        if self._client_encodings is not None:
            encs = filter_encodings(self._client_encodings)
            self._to_server(_pack_set_encodings(encs), False)
            self._swallow_eocu = self._saw_eocu and C.PSEUDO_CONTINUOUS_UPDATES in encs
        while self._pending:
            self._to_server(self._pending.popleft(), True)
        self._pending_bytes = 0
        w, h = self._client_size
        self._to_server(struct.pack(">BBHHHH", C.MSG_FRAMEBUFFER_UPDATE_REQUEST, 0, 0, 0, w, h),
                        False)

    def _pad_update(self) -> int:
        """Finish a FramebufferUpdate the browser is in the middle of, without pixels."""
        n = self._fbu_remaining
        if not n:
            return 0
        if self._fbu_lastrect and self._client_has(C.PSEUDO_LAST_RECT):
            self._cout += last_rect_rect()
        else:
            self._cout += rect_header(0, 0, 0, 0, C.ENC_RAW) * n
        self._fbu_remaining = 0
        return n

    def _requeue_unwritten(self) -> int:
        """Input messages never written to the old backend go first to the next one."""
        out, self._out = self._out, _Outgoing()
        msgs = list(out.msgs)
        if msgs and out.head_written:
            msgs.pop(0)  # partly written into a dead connection: cannot be taken back
        unwritten: list[bytes] = []
        offset = len(out.data) - sum(length for length, _ in msgs)
        for length, is_input in msgs:
            if is_input:
                unwritten.append(bytes(out.data[offset:offset + length]))
            offset += length
        for msg in reversed(unwritten):
            self._pending.appendleft(msg)
            self._pending_bytes += len(msg)
        return len(unwritten)

    def _feed_server(self, data: bytes) -> None:
        assert self._framer is not None
        try:
            self._framer.feed(data)
        except _FramingError as exc:
            self._close(f"backend protocol error: {exc}", error=True, by_client=False)

    def _server_stream_part(self, data: bytes) -> None:
        """Part of an oversized unit, forwarded as it arrives."""
        if self.state is SpliceState.NORMAL:
            self._cout += data
        else:
            self._backlog.append((data, "part", ()))

    def _server_unit(self, unit: bytes, kind: str, info: tuple, streamed: bool) -> None:
        if self.state is not SpliceState.NORMAL:
            self._backlog.append((unit, kind, info))
            return
        if (kind == "message" and info[0] == C.MSG_END_OF_CONTINUOUS_UPDATES
                and self._swallow_eocu and not streamed):
            # The new backend announcing ContinuousUpdates after our replayed SetEncodings:
            # the browser knows already; re-enable them for it instead.
            self._swallow_eocu = False
            if self._cu_enabled:
                x, y, w, h = self._cu_rect
                self._to_server(struct.pack(">BBHHHH", C.MSG_ENABLE_CONTINUOUS_UPDATES, 1,
                                            x, y, w, h), False)
            return
        self._cout += unit
        self._track_unit(kind, info)

    def _track_unit(self, kind: str, info: tuple) -> None:
        """Keep the browser's view (size, update framing, CU) in step with what it is sent."""
        if kind == "fbu":
            self._fbu_remaining = info[0]
            self._fbu_lastrect = info[0] == 0xFFFF
        elif kind == "rect":
            x, y, w, h, enc, effect = info
            if effect is not None and enc == C.ENC_TIGHT:
                resets, used = effect
                for i in range(4):
                    if resets >> i & 1:
                        self._tight_started[i] = False
                if used >= 0:
                    self._tight_started[used] = True
            self._fbu_remaining = 0 if enc == C.PSEUDO_LAST_RECT else self._fbu_remaining - 1
            if enc == C.PSEUDO_DESKTOP_SIZE:
                self._client_size = (w, h)
            elif enc == C.PSEUDO_EXTENDED_DESKTOP_SIZE and not (x == 1 and y != 0):
                self._client_size = (w, h)
        elif kind == "message" and info[0] == C.MSG_END_OF_CONTINUOUS_UPDATES:
            self._saw_eocu = True
            self._cu_enabled = False

    # -- internals: browser handshake --------------------------------------------------------
    def _process_client(self) -> None:
        handlers = {
            SpliceState.VERSION: self._h_version,
            SpliceState.SECURITY: self._h_security,
            SpliceState.INIT: self._h_init,
            SpliceState.NORMAL: self._h_message,
        }
        pos = 0
        while self.state in handlers:
            used = handlers[self.state](pos)
            if not used:
                break
            pos += used
        if pos:
            del self._cin[:pos]

    def _h_version(self, pos: int) -> int:
        buf = self._cin
        head = bytes(buf[pos:pos + 4])
        if head != b"RFB "[:len(head)]:
            raise _ClientError("not an RFB client (bad ProtocolVersion)")
        if len(buf) - pos < C.PROTOCOL_VERSION_LEN:
            return 0
        raw = bytes(buf[pos:pos + C.PROTOCOL_VERSION_LEN])
        m = _VERSION_RE.fullmatch(raw)
        if m is None:
            raise _ClientError(f"malformed ProtocolVersion {raw!r}")
        major, minor = int(m.group(1)), int(m.group(2))
        if major != 3:
            raise _ClientError(f"unsupported RFB protocol version {major}.{minor}")
        self.version = (3, minor) if minor in (3, 7, 8) else (3, 8) if minor > 8 else (3, 3)
        self.state = SpliceState.WAIT
        if self._server is not None:
            self._offer_security()
        return C.PROTOCOL_VERSION_LEN

    def _offer_security(self) -> None:
        """Security type None: the console token authenticated the user already."""
        if self.version == C.RFB_VERSION_3_3:
            self._cout += _U32.pack(C.SEC_NONE)
            self.state = SpliceState.INIT
        else:
            self._cout += bytes((1, C.SEC_NONE))
            self.state = SpliceState.SECURITY

    def _h_security(self, pos: int) -> int:
        if len(self._cin) - pos < 1:
            return 0
        chosen = self._cin[pos]
        if chosen != C.SEC_NONE:
            reason = f"security type {chosen} was not offered"
            if self.version == C.RFB_VERSION_3_8:
                text = reason.encode()
                self._cout += _U32.pack(C.SECURITY_RESULT_FAILED) + _U32.pack(len(text)) + text
            raise _ClientError(reason)
        if self.version == C.RFB_VERSION_3_8:
            self._cout += _U32.pack(C.SECURITY_RESULT_OK)
        self.state = SpliceState.INIT
        return 1

    def _h_init(self, pos: int) -> int:
        if len(self._cin) - pos < 1 or self._server is None:
            return 0  # without a backend there is no ServerInit to give yet
        init = self._server
        self._client_init = init
        self._client_pf = init.pixel_format
        self._parse_pf = init.pixel_format
        self._client_size = (init.width, init.height)
        self._client_name = init.name
        self._cout += init.pack()
        self.state = SpliceState.NORMAL
        assert self.version is not None
        self._events.append(ClientReady(self.version))
        backlog, self._backlog = self._backlog, []
        for unit, kind, info in backlog:
            if kind == "part":
                self._cout += unit
            else:
                self._server_unit(unit, kind, info, False)
        return 1

    # -- internals: browser messages ---------------------------------------------------------
    def _h_message(self, pos: int) -> int:
        """Frame one browser message; forward, queue or absorb it.  0 = incomplete."""
        buf = self._cin
        avail = len(buf) - pos
        if avail < 1:
            return 0
        mtype = buf[pos]
        is_input = True
        if mtype == C.MSG_SET_PIXEL_FORMAT:
            if avail < 20:
                return 0
            pf = PixelFormat.unpack(bytes(buf[pos + 4:pos + 20]))
            try:
                pf.validate()
            except PixelFormatError as exc:
                raise _ClientError(f"SetPixelFormat refused: {exc}") from None
            self._client_pf = pf
            if self._server is not None:
                self._to_server(bytes(buf[pos:pos + 20]), False)
                # Updates whose header arrives from now on are parsed in the new format: the
                # same assumption the browser itself must make (rfbproto gives no marker), and
                # exact for noVNC, which sets its format once, before its first request.
                self._parse_pf = pf
            return 20
        if mtype == C.MSG_SET_ENCODINGS:
            if avail < 4:
                return 0
            count = _U16.unpack_from(buf, pos + 2)[0]
            if count > self.config.max_encodings:
                raise _ClientError(f"SetEncodings with {count} encodings "
                                   f"(limit {self.config.max_encodings})")
            size = 4 + 4 * count
            if avail < size:
                return 0
            encs = struct.unpack_from(f">{count}i", buf, pos + 4)
            self._client_encodings = encs
            self._client_encoding_set = frozenset(encs)
            if self._server is not None:
                self._to_server(_pack_set_encodings(filter_encodings(encs)), False)
            return size
        if mtype == C.MSG_FRAMEBUFFER_UPDATE_REQUEST:
            if avail < 10:
                return 0
            if self._server is not None:
                self._to_server(bytes(buf[pos:pos + 10]), False)
            # While detached: absorbed; the re-attach asks for the whole screen anyway.
            return 10
        if mtype == C.MSG_ENABLE_CONTINUOUS_UPDATES:
            if avail < 10:
                return 0
            enable = buf[pos + 1] != 0
            self._cu_enabled = enable
            if enable:
                self._cu_rect = struct.unpack_from(">HHHH", buf, pos + 2)
            if self._server is not None:
                self._to_server(bytes(buf[pos:pos + 10]), False)
            elif not enable:
                # rfbproto: a disable is answered with EndOfContinuousUpdates; the next
                # backend only hears about the state, so answer for it.
                self._cout.append(C.MSG_END_OF_CONTINUOUS_UPDATES)
            return 10
        if mtype == C.MSG_KEY_EVENT:
            size = 8
        elif mtype == C.MSG_POINTER_EVENT:
            size = 6
        elif mtype == C.MSG_CLIENT_CUT_TEXT:
            if avail < 8:
                return 0
            length = abs(_S32.unpack_from(buf, pos + 4)[0])
            if length > self.config.max_cut_text:
                raise _ClientError(f"ClientCutText of {length} bytes "
                                   f"(limit {self.config.max_cut_text})")
            size = 8 + length
        elif mtype == C.MSG_CLIENT_FENCE:
            if avail < 9:
                return 0
            if buf[pos + 8] > C.FENCE_MAX_PAYLOAD:
                raise _ClientError(f"Fence payload of {buf[pos + 8]} bytes (limit 64)")
            size = 9 + buf[pos + 8]
        elif mtype == C.MSG_XVP_CLIENT:
            size = 4
        elif mtype == C.MSG_SET_DESKTOP_SIZE:
            if avail < 8:
                return 0
            if buf[pos + 6] > self.config.max_screens:
                raise _ClientError(f"SetDesktopSize with {buf[pos + 6]} screens "
                                   f"(limit {self.config.max_screens})")
            size = 8 + 16 * buf[pos + 6]
        elif mtype == C.MSG_QEMU_CLIENT:
            if avail < 2:
                return 0
            if buf[pos + 1] != C.QEMU_EXTENDED_KEY_EVENT:
                raise _ClientError(f"unknown QEMU client message sub-type {buf[pos + 1]}")
            size = 12
        else:
            raise _ClientError(f"unknown client message type {mtype}")
        if avail < size:
            return 0
        msg = bytes(buf[pos:pos + size])
        if self._server is not None:
            self._to_server(msg, is_input)
        else:
            self._queue_input(msg)
        return size

    def _queue_input(self, msg: bytes) -> None:
        pending = self._pending
        if (msg[0] == C.MSG_POINTER_EVENT and pending and pending[-1][0] == C.MSG_POINTER_EVENT
                and pending[-1][1] == msg[1]):
            # A move with the same buttons: only where the pointer ended up matters.
            pending[-1] = msg
            return
        if self._pending_bytes + len(msg) > self.config.max_pending_input:
            raise _ClientError(f"more than {self.config.max_pending_input} bytes of input "
                               "while the console was re-attaching")
        pending.append(msg)
        self._pending_bytes += len(msg)


def _compact_length(n: int) -> bytes:
    """Tight's 1-3 byte length (7 bits per byte, high bit = more)."""
    if n < 0x80:
        return bytes((n,))
    if n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    return bytes((n & 0x7F | 0x80, (n >> 7) & 0x7F | 0x80, n >> 14))


def _pack_set_encodings(encs: tuple[int, ...]) -> bytes:
    return (bytes((C.MSG_SET_ENCODINGS, 0)) + _U16.pack(len(encs))
            + struct.pack(f">{len(encs)}i", *encs))
