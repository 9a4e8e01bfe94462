"""The sans-IO RFB (VNC) server protocol core (rfbproto, versions 3.3, 3.7 and 3.8).

In the h11 style: the transport feeds raw TCP bytes to :meth:`ServerConnection.receive_data`,
gets :mod:`~dmore_nova.rm_vm.rfb.events` back in order, and writes whatever
:meth:`ServerConnection.data_to_send` returns.  No sockets, no clock, no threads: every decision
of the protocol (version and security negotiation, VNC Authentication, VeNCrypt with TLS inside
``ssl.MemoryBIO``, message framing, limits) is here and testable byte by byte.

The client is untrusted.  Every length field is bounded by an explicit limit of
:class:`ServerConfig`; a malformed or over-limit message ends the connection with a
:class:`~events.ConnectionClosed` whose reason says why.  :meth:`receive_data` never raises for
any input; :class:`LocalProtocolError` is raised only when the *server side* misuses the API
(e.g. sending a FramebufferUpdate before the handshake finished).

Things the core does by itself because the protocol leaves no choice: the handshake replies,
SecurityResult, ServerInit, answering Fence requests, EndOfContinuousUpdates when continuous
updates are disabled, and the capability advertisements that some pseudo-encodings need before
the client may use them (QEMU Extended Key Event ack, Fence, ContinuousUpdates).
"""

from __future__ import annotations

import enum
import os
import re
import ssl
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NoReturn

from dmore_nova.rm_vm.rfb import constants as C
from dmore_nova.rm_vm.rfb import events as ev
from dmore_nova.rm_vm.rfb.display import KeyInput, PointerInput, Rect
from dmore_nova.rm_vm.rfb.pixelformat import NATIVE, PixelFormat, PixelFormatError
from dmore_nova.rm_vm.rfb.security import quiet_tls_context, vnc_auth_check

__all__ = [
    "ConnState",
    "LocalProtocolError",
    "ServerConfig",
    "ServerConnection",
    "cursor_rect",
    "desktop_size_rect",
    "ext_key_event_ack_rect",
    "extended_desktop_size_rect",
    "last_rect_rect",
    "led_state_rect",
    "rect_header",
]

#: VeNCrypt Plain user name and password are each at most this many bytes.  rfbproto sets no
#: limit; 1 KiB is far above any real credential and keeps a hostile client from making us
#: buffer 8 GiB before authentication.
PLAIN_MAX_FIELD = 1024

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_S32 = struct.Struct(">i")
_MSG_KEY_EVENT = C.MSG_KEY_EVENT
_RECT_HEADER = struct.Struct(">HHHHi")
_SCREEN = struct.Struct(">IHHHHI")
_VERSION_RE = re.compile(rb"RFB (\d{3})\.(\d{3})\n")
_KNOWN_VERSIONS = frozenset({C.RFB_VERSION_3_3, C.RFB_VERSION_3_7, C.RFB_VERSION_3_8})
_SUPPORTED_SECURITY = frozenset({C.SEC_NONE, C.SEC_VNC_AUTH, C.SEC_VENCRYPT})


class LocalProtocolError(Exception):
    """The server side used the API wrongly (wrong state, out-of-range value)."""


class ConnState(enum.Enum):
    """Where the connection is.  The handshake states name what the core is waiting for."""

    VERSION = "version"                    # the client's ProtocolVersion
    SECURITY = "security"                  # 3.7+: the client's choice of security type
    VNC_AUTH = "vnc-auth"                  # the 16-byte VNC Authentication response
    VENCRYPT_VERSION = "vencrypt-version"  # the client's VeNCrypt version (must be 0.2)
    VENCRYPT_SUBTYPE = "vencrypt-subtype"  # the client's choice of VeNCrypt subtype
    TLS_HANDSHAKE = "tls-handshake"        # the TLS handshake inside VeNCrypt
    PLAIN_AUTH = "plain-auth"              # VeNCrypt Plain user name and password
    INIT = "init"                          # ClientInit
    NORMAL = "normal"                      # client messages
    CLOSED = "closed"                      # nothing more; data_to_send may still hold bytes


@dataclass
class ServerConfig:
    """What the server offers and the limits it enforces; shared by all connections."""

    security_types: Sequence[int]
    vencrypt_subtypes: Sequence[int] = ()
    password: bytes | None = None
    #: A second VNC password that admits a *view-only* viewer (TigerVNC's vncpasswd second line).
    view_only_password: bytes | None = None
    plain_auth: Callable[[str, str], bool] | None = None
    tls_anon_context: ssl.SSLContext | None = None
    tls_x509_context: ssl.SSLContext | None = None
    max_cut_text: int = 1 << 20
    max_encodings: int = 1024
    max_screens: int = 16
    randbytes: Callable[[int], bytes] = os.urandom
    versions: Sequence[tuple[int, int]] = ((3, 8), (3, 7), (3, 3))

    def check(self) -> None:
        """Raise ValueError for a configuration that could not complete any handshake it offers
        (better at start-up than as a puzzling failure in front of the first viewer).

        Also turns off TLS 1.3 session tickets on the given TLS contexts
        (:func:`~dmore_nova.rm_vm.rfb.security.quiet_tls_context`), without which TigerVNC's
        viewer hangs right after an X509 handshake."""
        if not self.security_types:
            raise ValueError("no security type offered")
        for sec in self.security_types:
            if sec not in _SUPPORTED_SECURITY:
                raise ValueError(f"security type {sec} is not supported")
        if not self.versions or any(tuple(v) not in _KNOWN_VERSIONS for v in self.versions):
            raise ValueError(f"versions must be among 3.3, 3.7, 3.8: {list(self.versions)}")
        if C.SEC_VNC_AUTH in self.security_types and self.password is None:
            raise ValueError("VNC Authentication offered without a password")
        if C.SEC_VENCRYPT in self.security_types:
            if not self.vencrypt_subtypes:
                raise ValueError("VeNCrypt offered without subtypes")
            if (3, 7) not in self.versions and (3, 8) not in self.versions:
                raise ValueError("VeNCrypt needs protocol version 3.7 or 3.8")
        for sub in self.vencrypt_subtypes:
            if sub not in C.VENCRYPT_SUPPORTED:
                raise ValueError(f"VeNCrypt subtype {sub} is not supported")
            if sub == C.VENCRYPT_PLAIN and self.plain_auth is None:
                raise ValueError("VeNCrypt Plain offered without plain_auth")
            if sub in C.VENCRYPT_TLS_ANON and self.tls_anon_context is None:
                raise ValueError(f"VeNCrypt subtype {sub} needs tls_anon_context")
            if sub in C.VENCRYPT_TLS_X509 and self.tls_x509_context is None:
                raise ValueError(f"VeNCrypt subtype {sub} needs tls_x509_context")
            if sub == C.VENCRYPT_X509VNC and self.password is None:
                raise ValueError("VeNCrypt X509Vnc offered without a password")
        for ctx in (self.tls_anon_context, self.tls_x509_context):
            if ctx is not None:
                quiet_tls_context(ctx)  # TLS 1.3 tickets hang TigerVNC: see its docstring
        for name in ("max_cut_text", "max_encodings", "max_screens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.max_screens > 255:
            raise ValueError("max_screens above 255 cannot be expressed on the wire")


# -- rectangle builders (server -> client) ----------------------------------------------------

def rect_header(x: int, y: int, w: int, h: int, encoding: int) -> bytes:
    """The 12-byte rectangle header of a FramebufferUpdate (rfbproto 7.6.1)."""
    try:
        return _RECT_HEADER.pack(x, y, w, h, encoding)
    except struct.error as exc:
        raise LocalProtocolError(f"rectangle ({x},{y},{w},{h},{encoding}) out of range") from exc


def desktop_size_rect(w: int, h: int) -> bytes:
    """DesktopSize pseudo-rectangle: the framebuffer is now w x h (rfbproto 7.8.2)."""
    return rect_header(0, 0, w, h, C.PSEUDO_DESKTOP_SIZE)


ScreenSpec = ev.Screen | tuple[int, int, int, int, int, int]


def _screen_fields(screen: ScreenSpec) -> tuple[int, int, int, int, int, int]:
    if isinstance(screen, ev.Screen):
        return screen.id, screen.x, screen.y, screen.w, screen.h, screen.flags
    sid, x, y, w, h, flags = screen
    return sid, x, y, w, h, flags


def extended_desktop_size_rect(reason: int, status: int, w: int, h: int,
                               screens: Iterable[ScreenSpec] | None = None) -> bytes:
    """ExtendedDesktopSize pseudo-rectangle (rfbproto 7.8.11): x carries the reason (0 server,
    1 this client, 2 another client), y the status; one full-size screen unless given."""
    if screens is None:
        screens = ((0, 0, 0, w, h, 0),)
    fields = [_screen_fields(s) for s in screens]
    if len(fields) > 255:
        raise LocalProtocolError("at most 255 screens")
    try:
        body = b"".join(_SCREEN.pack(*f) for f in fields)
    except struct.error as exc:
        raise LocalProtocolError(f"screen out of range: {fields}") from exc
    return (rect_header(reason, status, w, h, C.PSEUDO_EXTENDED_DESKTOP_SIZE)
            + bytes((len(fields), 0, 0, 0)) + body)


def last_rect_rect() -> bytes:
    """LastRect pseudo-rectangle: ends an update announced with 65535 rectangles."""
    return rect_header(0, 0, 0, 0, C.PSEUDO_LAST_RECT)


def cursor_rect(hot_x: int, hot_y: int, w: int, h: int, pixels_client_format: bytes,
                bitmask: bytes) -> bytes:
    """Cursor pseudo-rectangle (rfbproto 7.8.1): w*h pixels in the client's pixel format, then
    a 1-bpp mask with rows padded to whole bytes (MSB = leftmost pixel)."""
    if len(bitmask) != (w + 7) // 8 * h:
        raise LocalProtocolError(f"cursor bitmask is {len(bitmask)} bytes, expected "
                                 f"{(w + 7) // 8 * h}")
    n = w * h
    if (n == 0 and pixels_client_format) or (
            n and (len(pixels_client_format) // n not in (1, 2, 4)
                   or len(pixels_client_format) % n)):
        raise LocalProtocolError(f"cursor pixel data of {len(pixels_client_format)} bytes "
                                 f"does not fit {w}x{h}")
    return rect_header(hot_x, hot_y, w, h, C.PSEUDO_CURSOR) + pixels_client_format + bitmask


def led_state_rect(state: int) -> bytes:
    """QEMU LED state pseudo-rectangle: bit 0 Scroll, 1 Num, 2 Caps Lock."""
    if not 0 <= state <= 0xFF:
        raise LocalProtocolError(f"LED state {state} out of range")
    return rect_header(0, 0, 0, 0, C.PSEUDO_QEMU_LED_STATE) + bytes((state,))


def ext_key_event_ack_rect(w: int = 0, h: int = 0) -> bytes:
    """QEMU Extended Key Event pseudo-rectangle: tells the client it may send scancodes.
    QEMU fills in the framebuffer size; clients ignore the geometry."""
    return rect_header(0, 0, w, h, C.PSEUDO_QEMU_EXTENDED_KEY_EVENT)


# -- the connection -----------------------------------------------------------------------------

class _Closed(Exception):
    """Internal: the connection was closed while a handler ran (unwinds the parse loop)."""


class ServerConnection:
    """One RFB client connection, server side, as a state machine over bytes."""

    def __init__(self, config: ServerConfig, *, width: int, height: int, name: str) -> None:
        config.check()
        _check_size(width, height)
        self.config = config
        self.width = width
        self.height = height
        self.name = name
        self.state = ConnState.VERSION
        #: The negotiated protocol version, once known.
        self.version: tuple[int, int] | None = None
        self.security_type: int | None = None
        self.vencrypt_subtype: int | None = None
        self.username: str | None = None
        #: Authenticated with the view-only password: the transport must ignore its input.
        self.view_only = False
        self.shared = False
        self.pixel_format: PixelFormat = NATIVE
        self.encodings: tuple[int, ...] = ()
        self._encoding_set: frozenset[int] = frozenset()
        self.quality: int | None = None
        self.compression: int | None = None
        self.continuous_updates: Rect | None = None

        self._in = bytearray()
        self._pos = 0
        self._out = bytearray()
        self._events: list[ev.Event] = []
        self._challenge = b""
        # TLS (VeNCrypt): once on, every byte in and out goes through the SSLObject.
        self._tls: ssl.SSLObject | None = None
        self._tls_in: ssl.MemoryBIO | None = None
        self._tls_out: ssl.MemoryBIO | None = None
        self._tls_ready = False
        self._tls_pending = bytearray()  # plaintext queued before the handshake finished
        self._tls_then: int = C.SEC_NONE  # what follows the handshake: None or VNC auth
        self._peer_eof = False

        top = max(tuple(v) for v in config.versions)
        self._write(b"RFB %03d.%03d\n" % top)

    # -- capability flags (from the last SetEncodings) --------------------------------------
    @property
    def supports_desktop_size(self) -> bool:
        return C.PSEUDO_DESKTOP_SIZE in self._encoding_set

    @property
    def supports_ext_desktop_size(self) -> bool:
        return C.PSEUDO_EXTENDED_DESKTOP_SIZE in self._encoding_set

    @property
    def supports_ext_key_event(self) -> bool:
        return C.PSEUDO_QEMU_EXTENDED_KEY_EVENT in self._encoding_set

    @property
    def supports_led_state(self) -> bool:
        return C.PSEUDO_QEMU_LED_STATE in self._encoding_set

    @property
    def supports_fence(self) -> bool:
        return C.PSEUDO_FENCE in self._encoding_set

    @property
    def supports_continuous_updates(self) -> bool:
        return C.PSEUDO_CONTINUOUS_UPDATES in self._encoding_set

    @property
    def supports_last_rect(self) -> bool:
        return C.PSEUDO_LAST_RECT in self._encoding_set

    @property
    def supports_cursor(self) -> bool:
        return C.PSEUDO_CURSOR in self._encoding_set

    @property
    def tls_active(self) -> bool:
        """True once a VeNCrypt TLS session carries the connection."""
        return self._tls is not None

    @property
    def tls_cipher(self) -> tuple[str, str, int] | None:
        return self._tls.cipher() if self._tls is not None and self._tls_ready else None

    # -- bytes in / out ------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> list[ev.Event]:
        """Feed bytes from the client (``b""`` = end of stream); return the resulting events.

        Never raises: anything wrong with the input closes the connection and is reported as
        :class:`~events.ConnectionClosed`.
        """
        if self.state is ConnState.CLOSED:
            return []
        self._events = []
        try:
            if not data:
                self._peer_eof = True
            if self._tls is not None:
                assert self._tls_in is not None
                if data:
                    self._tls_in.write(data)
                else:
                    self._tls_in.write_eof()
                self._tls_pump()
            elif data:
                self._in += data
            self._process()
            if self._peer_eof:
                self._on_eof()
        except _Closed:
            pass
        except Exception as exc:  # noqa: BLE001 - the promise is: untrusted bytes never raise
            # Defence in depth: a bug here must cost one connection, not the agent.  The
            # "internal error" prefix lets tests (the fuzzer) detect that this net was used.
            self._events.append(ev.ConnectionClosed(f"internal error: {exc!r}", True))
            self._shutdown()
        if self._pos:
            del self._in[:self._pos]
            self._pos = 0
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> bytes:
        """Bytes to write to the socket now (TLS records once VeNCrypt TLS is on)."""
        if self._tls_out is not None:
            self._out += self._tls_out.read()
        if not self._out:
            return b""
        out = bytes(self._out)
        self._out.clear()
        return out

    # -- server -> client messages ----------------------------------------------------------
    def send_framebuffer_update(self, rects: Sequence[bytes]) -> None:
        """Send one FramebufferUpdate; each element is one complete rectangle (header + data)."""
        self._require_normal("FramebufferUpdate")
        if len(rects) > 0xFFFF:
            raise LocalProtocolError(f"{len(rects)} rectangles do not fit one update")
        for r in rects:
            if len(r) < _RECT_HEADER.size:
                raise LocalProtocolError("a rectangle is at least its 12-byte header")
        self._write(b"".join([bytes((C.MSG_FRAMEBUFFER_UPDATE, 0)), _U16.pack(len(rects)),
                              *rects]))

    def send_bell(self) -> None:
        self._require_normal("Bell")
        self._write(bytes((C.MSG_BELL,)))

    def send_server_cut_text(self, text: bytes) -> None:
        """ServerCutText: Latin-1 text, LF line ends (rfbproto 7.6.4)."""
        self._require_normal("ServerCutText")
        if len(text) > 0x7FFFFFFF:
            raise LocalProtocolError("cut text too long")
        self._write(bytes((C.MSG_SERVER_CUT_TEXT, 0, 0, 0)) + _U32.pack(len(text)) + text)

    def send_end_of_continuous_updates(self) -> None:
        self._require_normal("EndOfContinuousUpdates")
        self._write(bytes((C.MSG_END_OF_CONTINUOUS_UPDATES,)))

    def send_fence(self, flags: int, payload: bytes) -> None:
        self._require_normal("Fence")
        if not 0 <= flags <= 0xFFFFFFFF:
            raise LocalProtocolError(f"fence flags {flags:#x} out of range")
        if len(payload) > C.FENCE_MAX_PAYLOAD:
            raise LocalProtocolError(f"fence payload of {len(payload)} bytes exceeds 64")
        self._write_fence(flags, payload)

    def set_size(self, width: int, height: int) -> None:
        """The framebuffer changed size: later requests are cropped to it.  Announcing the new
        size (DesktopSize / ExtendedDesktopSize rectangles) is the caller's update to send."""
        try:
            _check_size(width, height)
        except ValueError as exc:
            raise LocalProtocolError(str(exc)) from exc
        self.width, self.height = width, height
        if self.continuous_updates is not None:
            cu = self.continuous_updates
            self.continuous_updates = self._crop(cu.x, cu.y, cu.w, cu.h)

    def close(self, reason: str) -> None:
        """Close from the server side (no event).  Where the handshake has a place for a failure
        the client is about to read, it is sent: SecurityResult "failed" (with ``reason`` in 3.8)
        while an authentication answer is awaited, a VeNCrypt failure/reject byte while VeNCrypt
        is being negotiated.  Idempotent."""
        state = self.state
        if state is ConnState.CLOSED:
            return
        try:
            if state in (ConnState.VNC_AUTH, ConnState.PLAIN_AUTH):
                self._security_result_failed(reason)
            elif state is ConnState.VENCRYPT_VERSION:
                self._write(b"\xff")
            elif state is ConnState.VENCRYPT_SUBTYPE:
                self._write(b"\x00")
        finally:
            self._shutdown()

    # -- internals: plumbing -----------------------------------------------------------------
    def _require_normal(self, what: str) -> None:
        if self.state is not ConnState.NORMAL:
            raise LocalProtocolError(f"cannot send {what} in state {self.state.name}")

    def _write(self, data: bytes) -> None:
        if self._tls is None:
            self._out += data
        elif self._tls_ready:
            self._tls.write(data)
        else:
            self._tls_pending += data

    def _avail(self) -> int:
        return len(self._in) - self._pos

    def _take(self, n: int) -> bytes:
        data = bytes(self._in[self._pos:self._pos + n])
        self._pos += n
        return data

    def _shutdown(self) -> None:
        """Enter CLOSED; with TLS, queue a close_notify so the client sees an orderly end."""
        self.state = ConnState.CLOSED
        if self._tls is not None and self._tls_ready:
            try:
                self._tls.unwrap()
            except (ssl.SSLError, OSError, ValueError):
                pass  # close_notify is queued; the peer's reply is not awaited

    def _fail(self, reason: str, *, auth: bool = False) -> NoReturn:
        """Close because of the client: report it and unwind the current handler."""
        if auth:
            self._events.append(ev.AuthFailed(reason))
        self._events.append(ev.ConnectionClosed(reason, True))
        self._shutdown()
        raise _Closed

    def _on_eof(self) -> None:
        if self.state is ConnState.CLOSED:
            return
        where = "" if self.state is ConnState.NORMAL else f" during {self.state.value}"
        if self._avail():
            reason = f"client closed the connection inside a message{where}"
            error = True
        else:
            reason = f"client closed the connection{where}"
            error = False
        self._events.append(ev.ConnectionClosed(reason, error))
        self._shutdown()

    def _process(self) -> None:
        if self.state is ConnState.NORMAL:  # the common case: input on the latency path
            while self._h_message():
                if self.state is not ConnState.NORMAL:
                    break
            else:
                return
        handlers = _STATE_HANDLERS
        while (handler := handlers.get(self.state)) is not None and handler(self):
            pass

    # -- internals: TLS ----------------------------------------------------------------------
    def _start_tls(self, context: ssl.SSLContext, then: int) -> None:
        """Switch to TLS: the accept byte goes out in clear, everything after is TLS.  Bytes
        the client already sent beyond the subtype (its ClientHello) move into the TLS input."""
        self._write(b"\x01")
        self._tls_in, self._tls_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._tls_in, self._tls_out, server_side=True)
        self._tls_then = then
        self.state = ConnState.TLS_HANDSHAKE
        rest = self._take(self._avail())
        if rest:
            self._tls_in.write(rest)
        if self._peer_eof:
            self._tls_in.write_eof()
        self._tls_pump()

    def _tls_pump(self) -> None:
        """Advance the handshake, then decrypt everything available into the input buffer."""
        tls = self._tls
        assert tls is not None
        if not self._tls_ready:
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                return
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                self._peer_eof = True
                return
            except ssl.SSLError as exc:
                self._fail(f"TLS handshake failed: {exc.reason or exc}")
            self._tls_ready = True
            if self._tls_pending:
                tls.write(bytes(self._tls_pending))
                self._tls_pending.clear()
            if self._tls_then == C.SEC_VNC_AUTH:
                self._send_challenge()
            else:
                self._security_result_ok()
        while True:
            try:
                chunk = tls.read(65536)
            except ssl.SSLWantReadError:
                return
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self._peer_eof = True
                return
            except ssl.SSLError as exc:
                self._fail(f"TLS error: {exc.reason or exc}")
            if not chunk:
                self._peer_eof = True
                return
            self._in += chunk

    # -- internals: handshake ----------------------------------------------------------------
    def _connection_failed(self, version: tuple[int, int], reason: str) -> NoReturn:
        """The handshake's own failure message (rfbproto 7.1.2): security type 0 (U32 in 3.3,
        an empty U8 list in 3.7+) followed by the reason string."""
        head = _U32.pack(0) if version == C.RFB_VERSION_3_3 else b"\x00"
        text = reason.encode("utf-8", "replace")
        self._write(head + _U32.pack(len(text)) + text)
        self._fail(reason)

    def _h_version(self) -> bool:
        n = min(self._avail(), 4)
        if self._in[self._pos:self._pos + n] != b"RFB "[:n]:
            self._fail("not an RFB client (bad ProtocolVersion)")
        if self._avail() < C.PROTOCOL_VERSION_LEN:
            return False
        raw = self._take(C.PROTOCOL_VERSION_LEN)
        m = _VERSION_RE.fullmatch(raw)
        if m is None:
            self._fail(f"malformed ProtocolVersion {raw!r}")
        major, minor = int(m.group(1)), int(m.group(2))
        if major != 3:
            self._connection_failed(C.RFB_VERSION_3_8,
                                    f"unsupported RFB protocol version {major}.{minor}")
        # rfbproto: 3.5 (and any other unknown 3.x below 3.7) must be treated as 3.3.  Above
        # 3.8 (Apple's 3.889) the client speaks the 3.8 framing, as TigerVNC and LibVNCServer
        # assume, so it is treated as 3.8.
        version = (3, minor) if minor in (3, 7, 8) else (3, 8) if minor > 8 else (3, 3)
        if version not in {tuple(v) for v in self.config.versions}:
            self._connection_failed(version, f"RFB protocol version 3.{minor} not accepted")
        self.version = version
        offered = list(self.config.security_types)
        if version == C.RFB_VERSION_3_3:
            # 3.3: the server picks, and only None or VNC Authentication can be expressed.
            usable = [t for t in offered if t in (C.SEC_NONE, C.SEC_VNC_AUTH)]
            if not usable:
                self._connection_failed(version, "no security type usable with RFB 3.3 "
                                                 "(VeNCrypt needs 3.7 or later)")
            self.security_type = usable[0]
            self._write(_U32.pack(usable[0]))
            if usable[0] == C.SEC_NONE:
                self.state = ConnState.INIT  # 3.3/3.7 None: no SecurityResult
            else:
                self._send_challenge()
        else:
            self._write(bytes((len(offered), *offered)))
            self.state = ConnState.SECURITY
        return True

    def _h_security(self) -> bool:
        if self._avail() < 1:
            return False
        chosen = self._take(1)[0]
        if chosen not in self.config.security_types:
            reason = f"security type {chosen} was not offered"
            self._security_result_failed(reason)
            self._fail(reason)
        self.security_type = chosen
        if chosen == C.SEC_NONE:
            if self.version == C.RFB_VERSION_3_8:
                self._security_result_ok()
            else:
                self.state = ConnState.INIT
        elif chosen == C.SEC_VNC_AUTH:
            self._send_challenge()
        else:  # VeNCrypt: the server announces its version, 0.2
            self._write(bytes(C.VENCRYPT_VERSION))
            self.state = ConnState.VENCRYPT_VERSION
        return True

    def _send_challenge(self) -> None:
        challenge = bytes(self.config.randbytes(C.VNC_AUTH_CHALLENGE_LEN))
        if len(challenge) != C.VNC_AUTH_CHALLENGE_LEN:
            raise LocalProtocolError("randbytes returned a challenge of the wrong length")
        self._challenge = challenge
        self._write(challenge)
        self.state = ConnState.VNC_AUTH

    def _h_vnc_auth(self) -> bool:
        if self._avail() < C.VNC_AUTH_CHALLENGE_LEN:
            return False
        response = self._take(C.VNC_AUTH_CHALLENGE_LEN)
        assert self.config.password is not None  # checked by ServerConfig.check
        if not vnc_auth_check(self.config.password, self._challenge, response):
            vo = self.config.view_only_password
            if vo is None or not vnc_auth_check(vo, self._challenge, response):
                self._auth_failed("VNC authentication failed (wrong password)")
            self.view_only = True
        self._security_result_ok()
        return True

    def _h_vencrypt_version(self) -> bool:
        if self._avail() < 2:
            return False
        major, minor = self._take(2)
        if (major, minor) != C.VENCRYPT_VERSION:
            self._write(b"\xff")  # VeNCrypt: non-zero status = version not supported
            self._fail(f"unsupported VeNCrypt version {major}.{minor}")
        subs = list(self.config.vencrypt_subtypes)
        self._write(b"\x00" + bytes((len(subs),)) + b"".join(_U32.pack(s) for s in subs))
        self.state = ConnState.VENCRYPT_SUBTYPE
        return True

    def _h_vencrypt_subtype(self) -> bool:
        if self._avail() < 4:
            return False
        sub = _U32.unpack(self._take(4))[0]
        if sub not in self.config.vencrypt_subtypes:
            self._write(b"\x00")  # reject, as QEMU does; the client's TLS setup reads it
            self._fail(f"VeNCrypt subtype {sub} was not offered", auth=True)
        self.vencrypt_subtype = sub
        if sub == C.VENCRYPT_PLAIN:
            self.state = ConnState.PLAIN_AUTH
        elif sub == C.VENCRYPT_TLSNONE:
            assert self.config.tls_anon_context is not None
            self._start_tls(self.config.tls_anon_context, C.SEC_NONE)
        elif sub == C.VENCRYPT_X509NONE:
            assert self.config.tls_x509_context is not None
            self._start_tls(self.config.tls_x509_context, C.SEC_NONE)
        else:  # X509Vnc
            assert self.config.tls_x509_context is not None
            self._start_tls(self.config.tls_x509_context, C.SEC_VNC_AUTH)
        return True

    def _h_plain_auth(self) -> bool:
        if self._avail() < 8:
            return False
        ulen, plen = struct.unpack_from(">II", self._in, self._pos)
        if ulen > PLAIN_MAX_FIELD or plen > PLAIN_MAX_FIELD:
            self._fail(f"VeNCrypt Plain credentials too long ({ulen}/{plen} bytes, "
                       f"limit {PLAIN_MAX_FIELD})")
        if self._avail() < 8 + ulen + plen:
            return False
        self._pos += 8
        user_b, pass_b = self._take(ulen), self._take(plen)
        try:
            user, password = user_b.decode("utf-8"), pass_b.decode("utf-8")
        except UnicodeDecodeError:
            self._auth_failed("VeNCrypt Plain credentials are not UTF-8")
        assert self.config.plain_auth is not None
        try:
            ok = bool(self.config.plain_auth(user, password))
        except Exception as exc:  # noqa: BLE001 - a broken backend refuses, never crashes
            self._auth_failed(f"authentication backend error for user {user!r}: {exc!r}")
        if not ok:
            self._auth_failed(f"VeNCrypt Plain authentication failed for user {user!r}")
        self.username = user
        self._security_result_ok()
        return True

    def _security_result_ok(self) -> None:
        self._write(_U32.pack(C.SECURITY_RESULT_OK))
        self.state = ConnState.INIT

    def _security_result_failed(self, reason: str) -> None:
        """SecurityResult "failed": the reason string only exists from 3.8 on (rfbproto 7.1.3)."""
        msg = _U32.pack(C.SECURITY_RESULT_FAILED)
        if self.version == C.RFB_VERSION_3_8:
            text = reason.encode("utf-8", "replace")
            msg += _U32.pack(len(text)) + text
        self._write(msg)

    def _auth_failed(self, reason: str) -> NoReturn:
        self._security_result_failed(reason)
        self._fail(reason, auth=True)

    def _h_init(self) -> bool:
        if self._avail() < 1:
            return False
        self.shared = self._take(1)[0] != 0
        name = self.name.encode("utf-8", "replace")
        self._write(struct.pack(">HH", self.width, self.height) + NATIVE.pack()
                    + _U32.pack(len(name)) + name)
        self.state = ConnState.NORMAL
        self._events.append(ev.ClientInit(self.shared))
        return True

    # -- internals: normal messages ----------------------------------------------------------
    def _h_message(self) -> bool:
        """Parse one client message if complete; False when more bytes are needed."""
        avail = self._avail()
        if avail < 1:
            return False
        buf, p = self._in, self._pos
        mtype = buf[p]
        if mtype == _MSG_KEY_EVENT:  # tested first: the key press latency path
            if avail < 8:
                return False
            down = buf[p + 1] != 0
            keysym = _U32.unpack_from(buf, p + 4)[0]
            self._pos += 8
            self._events.append(KeyInput(down, keysym))
        elif mtype == C.MSG_SET_PIXEL_FORMAT:
            if avail < 20:
                return False
            pf = PixelFormat.unpack(bytes(buf[p + 4:p + 20]))
            self._pos += 20
            try:
                pf.validate()
            except PixelFormatError as exc:
                self._fail(f"SetPixelFormat refused: {exc}")
            self.pixel_format = pf
            self._events.append(ev.SetPixelFormat(pf))
        elif mtype == C.MSG_SET_ENCODINGS:
            if avail < 4:
                return False
            count = _U16.unpack_from(buf, p + 2)[0]
            if count > self.config.max_encodings:
                self._fail(f"SetEncodings with {count} encodings "
                           f"(limit {self.config.max_encodings})")
            if avail < 4 + 4 * count:
                return False
            encs = struct.unpack_from(f">{count}i", buf, p + 4)
            self._pos += 4 + 4 * count
            self._set_encodings(encs)
        elif mtype == C.MSG_FRAMEBUFFER_UPDATE_REQUEST:
            if avail < 10:
                return False
            incremental = buf[p + 1] != 0
            x, y, w, h = struct.unpack_from(">HHHH", buf, p + 2)
            self._pos += 10
            rect = self._crop(x, y, w, h)
            self._events.append(ev.FramebufferUpdateRequest(incremental, rect))
        elif mtype == C.MSG_POINTER_EVENT:
            if avail < 6:
                return False
            buttons = buf[p + 1]
            x, y = struct.unpack_from(">HH", buf, p + 2)
            self._pos += 6
            # Clamped: the input backend maps positions onto the framebuffer and must never
            # see a point outside it, whatever a client claims.
            x = max(0, min(x, self.width - 1))
            y = max(0, min(y, self.height - 1))
            self._events.append(PointerInput(x, y, buttons))
        elif mtype == C.MSG_CLIENT_CUT_TEXT:
            return self._client_cut_text(avail)
        elif mtype == C.MSG_ENABLE_CONTINUOUS_UPDATES:
            if avail < 10:
                return False
            if not self.supports_continuous_updates:
                self._fail("EnableContinuousUpdates without the ContinuousUpdates "
                           "pseudo-encoding")
            enable = buf[p + 1] != 0
            x, y, w, h = struct.unpack_from(">HHHH", buf, p + 2)
            self._pos += 10
            rect = self._crop(x, y, w, h)
            if enable:
                self.continuous_updates = rect
            else:
                self.continuous_updates = None
                # rfbproto: the server must answer a disable with EndOfContinuousUpdates.
                self._write(bytes((C.MSG_END_OF_CONTINUOUS_UPDATES,)))
            self._events.append(ev.EnableContinuousUpdates(enable, rect))
        elif mtype == C.MSG_CLIENT_FENCE:
            if avail < 9:
                return False
            length = buf[p + 8]
            if length > C.FENCE_MAX_PAYLOAD:
                self._fail(f"Fence payload of {length} bytes (limit {C.FENCE_MAX_PAYLOAD})")
            if avail < 9 + length:
                return False
            flags = _U32.unpack_from(buf, p + 4)[0]
            payload = bytes(buf[p + 9:p + 9 + length])
            self._pos += 9 + length
            if flags & C.FENCE_REQUEST:
                # We handle messages strictly in order and queue the answer at once, which
                # satisfies BlockBefore/BlockAfter/SyncNext; echo those, drop the unknown.
                self._write_fence(flags & C.FENCE_SUPPORTED, payload)
            # A response (no Request bit) to our advertisement needs nothing.
        elif mtype == C.MSG_SET_DESKTOP_SIZE:
            if avail < 8:
                return False
            nscreens = buf[p + 6]
            if nscreens > self.config.max_screens:
                self._fail(f"SetDesktopSize with {nscreens} screens "
                           f"(limit {self.config.max_screens})")
            if avail < 8 + 16 * nscreens:
                return False
            width, height = struct.unpack_from(">HH", buf, p + 2)
            screens = tuple(ev.Screen(*_SCREEN.unpack_from(buf, p + 8 + 16 * i))
                            for i in range(nscreens))
            self._pos += 8 + 16 * nscreens
            self._events.append(ev.SetDesktopSize(width, height, screens))
        elif mtype == C.MSG_QEMU_CLIENT:
            if avail < 2:
                return False
            sub = buf[p + 1]
            if sub != C.QEMU_EXTENDED_KEY_EVENT:
                self._fail(f"unknown QEMU client message sub-type {sub}")
            if avail < 12:
                return False
            down, keysym, keycode = struct.unpack_from(">HII", buf, p + 2)
            self._pos += 12
            # Keycode 0 means "no scancode" (clients send a plain KeyEvent then, but be
            # lenient): the backend falls back to the keysym.
            self._events.append(KeyInput(down != 0, keysym, keycode or None))
        else:
            self._fail(f"unknown client message type {mtype}")
        return True

    def _crop(self, x: int, y: int, w: int, h: int) -> Rect:
        """Crop a client rectangle (U16 fields) to the framebuffer, as rfbproto 7.5.3 says;
        a rectangle wholly outside becomes an empty one at the nearest edge, never an error."""
        x0, y0 = min(x, self.width), min(y, self.height)
        return Rect(x0, y0, min(x + w, self.width) - x0, min(y + h, self.height) - y0)

    def _client_cut_text(self, avail: int) -> bool:
        if avail < 8:
            return False
        length = _S32.unpack_from(self._in, self._pos + 4)[0]
        size = abs(length)
        if size > self.config.max_cut_text:
            self._fail(f"ClientCutText of {size} bytes (limit {self.config.max_cut_text})")
        if length < 0 and size < 4:
            self._fail(f"extended ClientCutText of {size} bytes has no flags field")
        if avail < 8 + size:
            return False
        text = bytes(self._in[self._pos + 8:self._pos + 8 + size])
        self._pos += 8 + size
        if length >= 0:
            self._events.append(ev.ClientCutText(text))
        # Negative length = Extended Clipboard, which we never advertise: consumed, ignored.
        return True

    def _set_encodings(self, encs: tuple[int, ...]) -> None:
        old = self._encoding_set
        self.encodings = encs
        self._encoding_set = new = frozenset(encs)
        # The last level listed wins, as in QEMU's and TigerVNC's servers (and
        # encodings.requested_levels).
        self.quality = next((e - C.PSEUDO_QUALITY_LEVEL_0 for e in reversed(encs)
                             if C.PSEUDO_QUALITY_LEVEL_0 <= e <= C.PSEUDO_QUALITY_LEVEL_9), None)
        self.compression = next((e - C.PSEUDO_COMPRESS_LEVEL_0 for e in reversed(encs)
                                 if C.PSEUDO_COMPRESS_LEVEL_0 <= e <= C.PSEUDO_COMPRESS_LEVEL_9),
                                None)
        added = new - old
        # Extensions whose client messages may only be used after the server confirmed them.
        # Order matters: TigerVNC turns continuous updates on at the end of the *first*
        # FramebufferUpdate only if EndOfContinuousUpdates came before it, so the
        # advertisements go out before the ext-key ack (itself an update).
        if C.PSEUDO_CONTINUOUS_UPDATES in added:
            self._write(bytes((C.MSG_END_OF_CONTINUOUS_UPDATES,)))
        if C.PSEUDO_FENCE in added:
            self._write_fence(C.FENCE_REQUEST, b"")
        if C.PSEUDO_QEMU_EXTENDED_KEY_EVENT in added:
            # As QEMU: an update holding only the ack rectangle, sent right away.
            self._write(bytes((C.MSG_FRAMEBUFFER_UPDATE, 0)) + _U16.pack(1)
                        + ext_key_event_ack_rect(self.width, self.height))
        self._events.append(ev.SetEncodings(encs))

    def _write_fence(self, flags: int, payload: bytes) -> None:
        self._write(bytes((C.MSG_SERVER_FENCE, 0, 0, 0)) + _U32.pack(flags)
                    + bytes((len(payload),)) + payload)


#: What :meth:`ServerConnection._process` runs in each state (built once, not per call).
_STATE_HANDLERS: dict[ConnState, Callable[[ServerConnection], bool]] = {
    ConnState.VERSION: ServerConnection._h_version,
    ConnState.SECURITY: ServerConnection._h_security,
    ConnState.VNC_AUTH: ServerConnection._h_vnc_auth,
    ConnState.VENCRYPT_VERSION: ServerConnection._h_vencrypt_version,
    ConnState.VENCRYPT_SUBTYPE: ServerConnection._h_vencrypt_subtype,
    ConnState.PLAIN_AUTH: ServerConnection._h_plain_auth,
    ConnState.INIT: ServerConnection._h_init,
    ConnState.NORMAL: ServerConnection._h_message,
}


def _check_size(width: int, height: int) -> None:
    if not (0 <= width <= C.MAX_DIMENSION and 0 <= height <= C.MAX_DIMENSION):
        raise ValueError(f"framebuffer size {width}x{height} does not fit RFB's U16 fields")
