"""The asyncio transport of the RFB server: sockets in, :mod:`protocol` events, encoders out.

One :class:`Viewer` per TCP connection, all on one event loop with the devices.  The protocol
decisions live in the sans-IO :class:`~dmore_nova.rm_vm.rfb.protocol.ServerConnection`; this layer
only moves bytes, keeps each viewer's dirty region, and decides *when* to encode:

* an update is produced only when the viewer has asked for one (or enabled ContinuousUpdates) and
  something changed: damage is pushed by the display, nothing polls;
* a viewer whose socket buffer is above ``max_write_buffer`` gets nothing new until it drains; its
  damage keeps accumulating (bounded by :class:`Region`), so a slow viewer costs the others nothing
  and never makes the device side wait.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from dmore_nova.rm_vm.rfb import constants as C
from dmore_nova.rm_vm.rfb import events as ev
from dmore_nova.rm_vm.rfb.display import (
    DisplaySource,
    InputSink,
    KeyInput,
    PointerInput,
    Rect,
)
from dmore_nova.rm_vm.rfb.encodings import Encoder, choose_encoding, copyrect_rect, make_encoder
from dmore_nova.rm_vm.rfb.pixelformat import convert
from dmore_nova.rm_vm.rfb.protocol import (
    ConnState,
    ServerConfig,
    ServerConnection,
    cursor_rect,
    desktop_size_rect,
    extended_desktop_size_rect,
    led_state_rect,
)
from dmore_nova.rm_vm.rfb.region import Region
from dmore_nova.rm_vm.rfb.security import make_anon_tls_context, make_x509_tls_context

LOG = logging.getLogger(__name__)

#: Security type names used in configuration -> (RFB security type, VeNCrypt subtype or None).
SECURITY_NAMES: dict[str, tuple[int, int | None]] = {
    "none": (C.SEC_NONE, None),
    "vnc": (C.SEC_VNC_AUTH, None),
    "vencrypt-plain": (C.SEC_VENCRYPT, C.VENCRYPT_PLAIN),
    "vencrypt-tlsnone": (C.SEC_VENCRYPT, C.VENCRYPT_TLSNONE),
    "vencrypt-x509none": (C.SEC_VENCRYPT, C.VENCRYPT_X509NONE),
    "vencrypt-x509vnc": (C.SEC_VENCRYPT, C.VENCRYPT_X509VNC),
}


#: Bytes one read from a viewer's socket may take (its own buffer, :meth:`Viewer.get_buffer`):
#: a FramebufferUpdateRequest is 10 bytes, a KeyEvent 8; a long ClientCutText takes several reads.
READ_BUFFER = 64 * 1024


class ConfigError(ValueError):
    """The server options are inconsistent (e.g. 'vnc' offered without a password)."""


@dataclass
class ServerOptions:
    security_types: list[str] = field(default_factory=lambda: ["none"])
    password: str | None = None
    view_only_password: str | None = None  # VNC auth with it admits a view-only viewer
    plain_users: dict[str, str] | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    max_viewers: int = 16
    max_cut_text: int = 1 << 20
    max_write_buffer: int = 4 << 20
    handshake_timeout: float = 30.0
    view_only: bool = False

    def protocol_config(self) -> ServerConfig:
        """Turn names into the sans-IO core's config, failing loudly on what cannot work."""
        types: list[int] = []
        subtypes: list[int] = []
        for name in self.security_types:
            if name not in SECURITY_NAMES:
                raise ConfigError(
                    f"unknown security type {name!r}; known: {sorted(SECURITY_NAMES)}")
            sec, sub = SECURITY_NAMES[name]
            if name in ("vnc", "vencrypt-x509vnc") and not self.password:
                raise ConfigError(f"security type {name!r} needs a password")
            if name == "vencrypt-plain" and not self.plain_users:
                raise ConfigError("security type 'vencrypt-plain' needs plain users")
            if name.startswith("vencrypt-x509") and not (self.tls_cert_file and self.tls_key_file):
                raise ConfigError(f"security type {name!r} needs tls_cert_file and tls_key_file")
            if sec not in types:
                types.append(sec)
            if sub is not None:
                subtypes.append(sub)
        if not types:
            raise ConfigError("no security type offered")
        x509 = None
        if self.tls_cert_file and self.tls_key_file:
            x509 = make_x509_tls_context(self.tls_cert_file, self.tls_key_file)
        users = dict(self.plain_users or {})
        return ServerConfig(
            security_types=types,
            vencrypt_subtypes=subtypes,
            password=self.password.encode() if self.password else None,
            view_only_password=(self.view_only_password.encode()
                                if self.view_only_password else None),
            plain_auth=(lambda u, p: users.get(u) == p) if users else None,
            tls_anon_context=make_anon_tls_context() if C.VENCRYPT_TLSNONE in subtypes else None,
            tls_x509_context=x509,
            max_cut_text=self.max_cut_text,
        )


class Viewer(asyncio.BufferedProtocol):
    """One connected RFB client.

    A :class:`asyncio.BufferedProtocol`: the loop reads the socket into this viewer's own
    buffer (``recv_into``).  A plain Protocol gets ``recv(256 KiB)`` per read: a fresh 256 KiB
    object for an 8-byte KeyEvent, which malloc may map and then shrink -- system calls that in
    a PV domain update page tables through the hypervisor.  In a loopback ping-pong in the
    xenbox's dom0 that was 1-2 ms per read; in the agent, whose malloc had apparently stopped
    mapping objects that size, an A/B of key -> echo could not tell the two apart
    (BENCHMARKS.md, agent-ab).  Kept because it allocates nothing per read.
    """

    def __init__(self, server: RFBServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.conn: ServerConnection | None = None
        self.peer = "?"
        self.dirty = Region()
        self.copies: list[tuple[int, int, Rect]] = []
        self.pending_request = False
        self.pending_resize: int | None = None  # ExtendedDesktopSize reason to announce
        self.resize_status = 0
        self.cursor_pending = False  # send the display's cursor shape with the next update
        self.leds_pending = False
        self.paused = False
        self.encoder: Encoder | None = None
        self.encoders: dict[int, Encoder] = {}
        self.copyrect = False
        self.view_only = server.options.view_only
        self._send_handle: asyncio.Handle | None = None
        self._handshake_timer: asyncio.TimerHandle | None = None
        self.closed = False
        self.updates_sent = 0
        self.last_update_time = 0.0
        self._read_buffer = memoryview(bytearray(READ_BUFFER))

    # -- asyncio.BufferedProtocol ----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        transport.set_write_buffer_limits(high=self.server.options.max_write_buffer)
        if len(self.server.viewers) >= self.server.options.max_viewers:
            LOG.warning("rfb %s: refused, %d viewers already", self.peer, len(self.server.viewers))
            transport.close()
            self.closed = True
            return
        display = self.server.display
        self.conn = ServerConnection(self.server.protocol_config, width=display.width,
                                     height=display.height, name=display.name)
        self.server.viewers.append(self)
        loop = asyncio.get_running_loop()
        self._handshake_timer = loop.call_later(self.server.options.handshake_timeout,
                                                self._handshake_timeout)
        LOG.info("rfb %s: connected", self.peer)
        self._flush()

    def get_buffer(self, sizehint: int) -> memoryview:  # noqa: ARG002 - always all of it
        return self._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(self._read_buffer[:nbytes]))

    def data_received(self, data: bytes) -> None:
        """What one read from the socket brought (:meth:`buffer_updated`), or test input."""
        if self.closed or self.conn is None:
            return
        for event in self.conn.receive_data(data):
            self._handle(event)
            if self.closed:
                return
        if self.server.sink is not None:
            self.server.sink.flush_input()
        self._flush()

    def eof_received(self) -> bool:
        self.close("client closed", error=False)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self._detach()
            self.closed = True
            LOG.info("rfb %s: connection lost%s", self.peer, f" ({exc})" if exc else "")

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._schedule_send()

    # -- DisplayListener -------------------------------------------------------------------
    def damage(self, rect: Rect) -> None:
        self.dirty.add(rect)
        if not self.server.display.batching:
            self._schedule_send()

    def flush(self) -> None:
        self._send_update()

    def resized(self, width: int, height: int, reason: int) -> None:
        if self.conn is None:
            return
        self.conn.set_size(width, height)
        if reason == 1 and self.server.resize_requester is not self:
            reason = 2
        self.pending_resize = reason
        self.resize_status = 0
        self.copies.clear()
        self.dirty.clear()
        self.dirty.add(Rect(0, 0, width, height))
        self._schedule_send()

    def leds_changed(self) -> None:
        self.leds_pending = True
        self._schedule_send()

    def copied(self, src_x: int, src_y: int, dst: Rect) -> None:
        if not self.copyrect:
            self.dirty.add(dst)
            self._schedule_send()
            return
        # The client copies *its* picture of ``src``, which is stale where damage is still
        # pending there: that damage moves with the copy.  Pending damage inside ``dst`` stays
        # (encoded after the copy, from the current framebuffer, so always correct).
        src = Rect(src_x, src_y, dst.w, dst.h)
        dx, dy = dst.x - src_x, dst.y - src_y
        moved = [_intersect(r, src) for r in self.dirty if r.intersects(src)]
        self.copies.append((src_x, src_y, dst))
        for r in moved:
            self.dirty.add(Rect(r.x + dx, r.y + dy, r.w, r.h))
        if len(self.copies) > 64:
            for _sx, _sy, d in self.copies:
                self.dirty.add(d)
            self.copies.clear()
        self._schedule_send()

    # -- protocol events -------------------------------------------------------------------
    def _handle(self, event: object) -> None:
        display = self.server.display
        match event:
            # Input first: it is what a viewer sends most, and the key press latency path.
            case KeyInput():
                if not self.view_only and self.server.sink is not None:
                    self.server.sink.key(event)
            case PointerInput():
                if not self.view_only and self.server.sink is not None:
                    self.server.sink.pointer(event)
            case ev.ClientInit(shared=shared):
                if self._handshake_timer:
                    self._handshake_timer.cancel()
                self.view_only = self.view_only or self.conn.view_only
                self._on_client_init(shared)
            case ev.SetEncodings():
                self._on_set_encodings()
            case ev.SetPixelFormat():
                # conn.pixel_format is current; the client follows with a full request.  The
                # cursor's pixels are in the client's format: send it again.
                self.cursor_pending = self.conn is not None and self.conn.supports_cursor
            case ev.FramebufferUpdateRequest(incremental=incremental, rect=rect):
                if not incremental:
                    self.dirty.add(rect.clip(display.width, display.height))
                self.pending_request = True
                self._schedule_send()
            case ev.ClientCutText():
                LOG.debug("rfb %s: cut text ignored (%d bytes)", self.peer, len(event.text))
            case ev.SetDesktopSize(width=w, height=h):
                self._on_set_desktop_size(w, h)
            case ev.EnableContinuousUpdates():
                self._schedule_send()
            case ev.AuthFailed(reason=reason):
                LOG.warning("rfb %s: authentication failed: %s", self.peer, reason)
            case ev.ConnectionClosed(reason=reason, error=error):
                self.close(reason, error=error)

    def _on_client_init(self, shared: bool) -> None:
        assert self.conn is not None
        if not shared:
            # RFB: a non-shared ClientInit asks for exclusive access; like QEMU's default
            # "allow-exclusive" policy, the other viewers are disconnected.
            for other in list(self.server.viewers):
                if other is not self and other.conn and other.conn.state is ConnState.NORMAL:
                    other.close("another viewer asked for exclusive access", error=False)
        self.server.display.add_listener(self)
        LOG.info("rfb %s: session started (security %s, user %s, shared %s, view-only %s)",
                 self.peer, self.conn.security_type, self.conn.username, shared, self.view_only)

    def _on_set_encodings(self) -> None:
        assert self.conn is not None
        encs = self.conn.encodings
        chosen = choose_encoding(encs)
        self.copyrect = C.ENC_COPYRECT in encs
        # Pixel format or capabilities may have changed: (re)send cursor and LEDs.
        self.cursor_pending = self.conn.supports_cursor
        self.leds_pending = self.conn.supports_led_state
        # One encoder per encoding for the whole connection: ZRLE's zlib stream has no reset
        # flag, so a client switching ZRLE -> other -> ZRLE must get the same stream back.
        encoder = self.encoders.get(chosen)
        if encoder is None:
            encoder = self.encoders[chosen] = make_encoder(
                chosen, quality=self.conn.quality, compression=self.conn.compression)
        else:
            encoder.set_levels(self.conn.quality, self.conn.compression)
        self.encoder = encoder

    def _on_set_desktop_size(self, width: int, height: int) -> None:
        assert self.conn is not None
        display = self.server.display
        if self.view_only:
            status = 1
        else:
            self.server.resize_requester = self
            try:
                status = display.request_resize(width, height)
            finally:
                self.server.resize_requester = None
        if status != 0:
            # Tell the requester why, with the unchanged size (rfbproto ExtendedDesktopSize).
            self.pending_resize = 1
            self.resize_status = status
            self._schedule_send()

    # -- sending ---------------------------------------------------------------------------
    def _schedule_send(self) -> None:
        if self._send_handle is None and not self.closed:
            self._send_handle = asyncio.get_running_loop().call_soon(self._send_update)

    def _send_update(self) -> None:
        if self._send_handle is not None:
            self._send_handle.cancel()  # a no-op when it is the handle running now
            self._send_handle = None
        conn = self.conn
        if self.closed or conn is None or conn.state is not ConnState.NORMAL or self.paused:
            return
        if not (self.pending_request or conn.continuous_updates is not None):
            return
        if not (self.dirty or self.copies or self.pending_resize is not None
                or self.cursor_pending or self.leds_pending):
            return
        display = self.server.display
        rects: list[bytes] = self._pseudo_rects(conn, display)
        if self.pending_resize is not None:
            w, h = display.width, display.height
            if conn.supports_ext_desktop_size:
                rects.append(extended_desktop_size_rect(self.pending_resize, self.resize_status,
                                                        w, h))
            elif conn.supports_desktop_size and self.resize_status == 0:
                rects.append(desktop_size_rect(w, h))
            self.pending_resize = None
            self.resize_status = 0
        for sx, sy, dst in self.copies:
            rects.append(copyrect_rect(sx, sy, dst))
        self.copies.clear()
        if self.dirty:
            encoder = self.encoder
            if encoder is None:  # no SetEncodings yet: Raw, which every client decodes
                encoder = self.encoder = self.encoders.setdefault(C.ENC_RAW,
                                                                  make_encoder(C.ENC_RAW))
            for rect in list(self.dirty):
                display.sync(rect)  # the freshest pixels (what changed also goes to the others)
            fb = display.framebuffer()
            limit = conn.continuous_updates
            for rect in self.dirty.take():
                if limit is not None and not self.pending_request:
                    rect = _intersect(rect, limit)
                rect = rect.clip(display.width, display.height)
                if not rect.empty:
                    rects.extend(encoder.encode(fb, rect, conn.pixel_format))
        if not rects:
            return
        self.pending_request = False
        conn.send_framebuffer_update(rects)
        self.updates_sent += 1
        self._flush()
        # After the write: reading the clock is a system call in a PV domain (no vDSO).
        self.last_update_time = time.monotonic()

    def _pseudo_rects(self, conn: ServerConnection, display: DisplaySource) -> list[bytes]:
        rects: list[bytes] = []
        if self.cursor_pending:
            self.cursor_pending = False
            cur = display.cursor()
            if cur is not None and conn.supports_cursor:
                h, w = cur.mask.shape
                mask = np.packbits(cur.mask, axis=1).tobytes()  # rows padded, MSB first
                rects.append(cursor_rect(cur.hot_x, cur.hot_y, w, h,
                                         convert(cur.pixels, conn.pixel_format), mask))
        if self.leds_pending:
            self.leds_pending = False
            leds = display.led_state
            if leds is not None and conn.supports_led_state:
                rects.append(led_state_rect(leds))
        return rects

    def _flush(self) -> None:
        if self.conn is None or self.transport is None:
            return
        data = self.conn.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)
        if self.conn.state is ConnState.CLOSED and not self.closed:
            self.close("protocol closed", error=False)

    # -- teardown --------------------------------------------------------------------------
    def close(self, reason: str, *, error: bool = True) -> None:
        if self.closed:
            return
        if self.conn is not None and self.conn.state is not ConnState.CLOSED:
            self.conn.close(reason)
        if self.conn is not None and self.transport is not None and not self.transport.is_closing():
            data = self.conn.data_to_send()
            if data:
                self.transport.write(data)
        (LOG.warning if error else LOG.info)("rfb %s: closed: %s", self.peer, reason)
        self._detach()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _handshake_timeout(self) -> None:
        if self.conn is not None and self.conn.state is not ConnState.NORMAL:
            self.close(f"handshake not finished within {self.server.options.handshake_timeout}s")

    def _detach(self) -> None:
        if self._handshake_timer:
            self._handshake_timer.cancel()
        self.server.display.remove_listener(self)
        if self in self.server.viewers:
            self.server.viewers.remove(self)


def _intersect(a: Rect, b: Rect) -> Rect:
    x0, y0 = max(a.x, b.x), max(a.y, b.y)
    x1, y1 = min(a.x + a.w, b.x + b.w), min(a.y + a.h, b.y + b.h)
    return Rect(x0, y0, max(x1 - x0, 0), max(y1 - y0, 0))


class RFBServer:
    """Serves one display to many viewers. ``sink`` receives input (None: view-only server)."""

    def __init__(self, display: DisplaySource, sink: InputSink | None,
                 options: ServerOptions | None = None) -> None:
        self.display = display
        self.sink = sink
        self.options = options or ServerOptions()
        self.protocol_config = self.options.protocol_config()
        self.viewers: list[Viewer] = []
        self.resize_requester: Viewer | None = None
        self._servers: list[asyncio.base_events.Server] = []

    async def listen(self, host: str, port: int) -> int:
        """Start listening; returns the bound port (useful with port 0)."""
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(lambda: Viewer(self), host, port, reuse_address=True)
        self._servers.append(srv)
        bound = srv.sockets[0].getsockname()[1]
        LOG.info("rfb: listening on %s:%d (security %s)", host, bound,
                 ",".join(self.options.security_types))
        return bound

    def stop_listening(self) -> None:
        """Accept no more connections; the viewers already connected stay (an agent being
        replaced reads what they sent before it closes them)."""
        for srv in self._servers:
            srv.close()

    async def close(self) -> None:
        for viewer in list(self.viewers):
            viewer.close("server shutting down", error=False)
        for srv in self._servers:
            srv.close()
            await srv.wait_closed()
        self._servers.clear()


def read_password_file(path: str) -> tuple[str, str | None]:
    """``(password, view-only password or None)`` from the first two lines of ``path`` (the
    convention of TigerVNC's passwd files).  VNC Authentication uses at most 8 bytes of each
    (rfbproto 7.2.2)."""
    with open(path, encoding="utf-8") as f:
        password = f.readline().rstrip("\r\n")
        view_only = f.readline().rstrip("\r\n") or None
    if not password:
        raise ConfigError(f"password file {path} is empty")
    if view_only is not None and view_only[:8] == password[:8]:
        raise ConfigError(f"password file {path}: the view-only password equals the password")
    return password, view_only


def read_plain_users(path: str) -> dict[str, str]:
    users: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line or line.startswith("#"):
                continue
            user, sep, password = line.partition(":")
            if not sep or not user:
                raise ConfigError(f"{path}:{n}: expected 'user:password'")
            users[user] = password
    return users


def options_from_conf(group) -> ServerOptions:
    """ServerOptions from the oslo.config [rfb] group. With a password, 'none' is dropped: a
    password that does not protect anything is a configuration mistake, not a choice."""
    password, view_only_password = (read_password_file(group.password_file)
                                    if group.password_file else (None, None))
    types = [t for t in group.security_types
             if (t not in ("vnc", "vencrypt-x509vnc") or password)
             and (t != "none" or not password)]
    return ServerOptions(
        security_types=types,
        password=password,
        view_only_password=view_only_password,
        plain_users=read_plain_users(group.plain_users_file) if group.plain_users_file else None,
        tls_cert_file=group.tls_cert_file,
        tls_key_file=group.tls_key_file,
        max_viewers=group.max_viewers,
        max_cut_text=group.max_cut_text,
        max_write_buffer=group.max_write_buffer,
        handshake_timeout=group.handshake_timeout,
        view_only=group.view_only,
    )
