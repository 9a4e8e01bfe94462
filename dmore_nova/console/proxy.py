"""The console proxy: noVNC over websockify in front of RM VMs, re-attaching across moves.

One HTTP server (websockify's request handler: WebSocket upgrade plus static files) serves
the console page (``/console.html``, with noVNC under ``/novnc/``) and the websockets.  Each
websocket is a :class:`_Session`: one thread with one ``select`` loop over the browser's
socket, the attached backend (the RM VM's RFB server), at most one backend being connected
and a wake-up socket.  All RFB knowledge is in the sans-IO :mod:`.rfb_splice`; this module
only moves bytes, keeps time and decides *when* to (re-)attach:

* the backend's connection drops -> the token is looked up again (the endpoint may have
  changed) and connecting is retried with exponential backoff until ``reattach_timeout``;
  meanwhile the browser's websocket stays open and its input is queued by the splice;
* an explicit signal (:meth:`ConsoleProxy.reattach`, or ``POST /reattach?token=...|key=...``
  from a control host) when the orchestrator knows the RM moved -> make-before-break: the new
  backend is connected and handshaken while the old one still serves, then switched over.

Threads, as websockify's LibProxyServer does (``ThreadingMixIn``), rather than websockify's
forking server: an explicit re-attach must reach a running session, which a forked child
cannot be signalled for without extra plumbing.  Every buffer is bounded: websocket messages
(:class:`_BoundedWebSocket`), output towards each side (reading the other side pauses above
``max_buffer``), queued input (the splice), connections (``max_connections``).
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from http.server import HTTPServer
from pathlib import Path
from socketserver import ThreadingMixIn
from urllib.parse import parse_qs, urlsplit

from websockify.websocket import WebSocketWantReadError, WebSocketWantWriteError
from websockify.websockifyserver import CompatibleWebSocket, WebSockifyRequestHandler

from dmore_nova.console import rfb_splice as rs
from dmore_nova.console.token_plugins import ConsoleTarget, TargetPlugin, valid_token

LOG = logging.getLogger(__name__)

#: The console page and its assets (served at /).
WEB_DIR = Path(__file__).resolve().parent / "web"
#: Bytes read from a socket at once.
RECV_SIZE = 256 << 10
#: WebSocket close codes (RFC 6455 7.4.1).
WS_NORMAL, WS_POLICY, WS_TOO_BIG, WS_INTERNAL = 1000, 1008, 1009, 1011
#: How long a closing session may spend flushing its last bytes to the browser.
FINAL_FLUSH_TIMEOUT = 2.0
#: Largest request body accepted on the control endpoint.
MAX_CONTROL_BODY = 4096


@dataclass
class ProxyOptions:
    """Timing and limits of the proxy (``[console]`` in the configuration)."""

    #: How long a session waits for a backend after losing one, before closing the browser.
    reattach_timeout: float = 60.0
    #: First retry delay; doubled per failed attempt up to reattach_backoff_max.
    reattach_backoff_initial: float = 0.05
    reattach_backoff_max: float = 1.0
    #: One attempt: TCP connect plus the backend's RFB handshake.
    connect_timeout: float = 10.0
    #: The browser must finish its RFB handshake within this.
    handshake_timeout: float = 30.0
    #: HTTP connections (websockets included) served at once; more get 503.
    max_connections: int = 256
    #: Bytes queued towards one side before reading from the other side pauses.
    max_buffer: int = 8 << 20
    #: Origins (host names) allowed besides the proxy's own host.
    allowed_origins: tuple[str, ...] = ()
    #: Client addresses allowed to POST /reattach.
    control_hosts: tuple[str, ...] = ("127.0.0.1", "::1")
    #: Directory of noVNC (holding core/rfb.js), served under /novnc/; None: not served.
    novnc_root: str | None = None
    #: PEM certificate (and key, if not in the same file) for https/wss; None: plain http/ws.
    cert_file: str | None = None
    key_file: str | None = None
    splice: rs.SpliceConfig = field(default_factory=rs.SpliceConfig)

    @property
    def max_ws_message(self) -> int:
        """The largest RFB message a browser sends is ClientCutText; nothing else comes near."""
        return self.splice.max_cut_text + (64 << 10)

    def check(self) -> None:
        self.splice.check()
        for name in ("reattach_timeout", "reattach_backoff_initial", "reattach_backoff_max",
                     "connect_timeout", "handshake_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if self.max_buffer < 64 << 10:
            raise ValueError("max_buffer below 64 KiB would stall ordinary updates")


@dataclass(frozen=True)
class SessionInfo:
    """A snapshot of one session, for operators and tests."""

    id: int
    token: str
    endpoint: tuple[str, int]
    attached: bool
    client_ready: bool
    reattaches: int
    last_pause: float | None
    pending_input: int
    client_size: tuple[int, int]


class _WebSocketTooBig(Exception):
    pass


class _BoundedWebSocket(CompatibleWebSocket):
    """websockify's server-side WebSocket, made safe for a non-blocking loop.

    * Bounded: websockify buffers a frame of any announced length (up to 2**63) and any number
      of continuation frames; a hostile browser could exhaust memory.  Here a frame that
      announces more than ``max_message``, or a fragmented message that grows beyond it, ends
      the connection (close code 1009) at once.
    * Non-blocking TLS (wss): websockify maps only EWOULDBLOCK to its want-read/want-write
      errors, not ``ssl.SSLWantReadError``/``SSLWantWriteError``, and its read loop can drop
      the fact that it already buffered data when a later read would block.
    """

    max_message = 1 << 20

    def _recv(self) -> bool:
        """Read what the socket has (all of it for TLS, whose records hide in the SSL object);
        False at end of stream with nothing read."""
        assert self.socket is not None
        got = False
        while True:
            try:
                data = self.socket.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError,
                    ssl.SSLWantWriteError):
                if got:
                    return True
                raise WebSocketWantReadError from None
            if not data:
                return got
            self._recv_buffer += data
            got = True
            # A frame header is at most 14 bytes; one read adds at most RECV_SIZE past it.
            if len(self._recv_buffer) > self.max_message + 14 + RECV_SIZE:
                self._check_size(force=True)
            pending = getattr(self.socket, "pending", None)
            if pending is None or not pending():
                return True

    def _recv_frames(self) -> bool:
        ok = super()._recv_frames()
        # Complete frames were taken out: the buffer now starts with the next frame's header.
        self._check_size()
        return ok

    def _check_size(self, force: bool = False) -> None:
        """Refuse as soon as a frame *announces* more than max_message (RFC 6455 5.2), and
        bound what continuation frames can accumulate."""
        buf = self._recv_buffer
        announced = 0
        if len(buf) >= 2:
            n = buf[1] & 0x7F
            if n < 126:
                announced = n
            elif n == 126 and len(buf) >= 4:
                announced = int.from_bytes(buf[2:4], "big")
            elif n == 127 and len(buf) >= 10:
                announced = int.from_bytes(buf[2:10], "big")
        if force or announced > self.max_message or len(self._partial_msg) > self.max_message:
            raise _WebSocketTooBig(f"websocket message larger than {self.max_message} bytes")

    def handle_ping(self, data: bytes) -> None:
        """Queue the pong behind whatever is pending.  websockify's ``pong()`` would raise
        from inside a read when the socket is full, and with a data message pending it raises
        ValueError - either would end a healthy session."""
        self._send_buffer += self._encode_hybi(0xA, data)

    def _flush(self) -> None:
        try:
            super()._flush()
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError,
                ssl.SSLWantWriteError):
            raise WebSocketWantWriteError from None


class _Backend:
    """One TCP connection to an RM endpoint: non-blocking connect, then the RFB handshake."""

    def __init__(self, target: ConsoleTarget, options: ProxyOptions, now: float) -> None:
        self.target = target
        self.deadline = now + options.connect_timeout
        self.started = now
        self.handshake = rs.BackendHandshake(target.password,
                                             max_name=options.splice.max_name,
                                             max_reason=options.splice.max_reason)
        self.connected = False
        self.out = bytearray()
        self.error: str | None = None
        self.sock: socket.socket | None = None
        try:
            infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            self.error = f"cannot resolve {target.host}: {exc}"
            return
        family, stype, proto, _, addr = infos[0]
        sock = socket.socket(family, stype, proto)
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.sock = sock
        err = sock.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            self.error = f"cannot connect to {self.where}: {os.strerror(err)}"

    @property
    def where(self) -> str:
        return f"{self.target.host}:{self.target.port}"

    @property
    def ready(self) -> bool:
        return self.handshake.done and self.error is None

    @property
    def wants_write(self) -> bool:
        return self.error is None and (not self.connected or bool(self.out))

    @property
    def wants_read(self) -> bool:
        return self.error is None and self.connected and not self.handshake.done

    def on_writable(self) -> None:
        assert self.sock is not None
        if not self.connected:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.error = f"cannot connect to {self.where}: {os.strerror(err)}"
                return
            self.connected = True
        self._flush()

    def on_readable(self) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.error = f"{self.where}: {exc.strerror or exc}"
            return
        self.handshake.receive_data(data)
        self.out += self.handshake.data_to_send()
        if self.handshake.failed:
            self.error = f"{self.where}: {self.handshake.error}"
            return
        self._flush()

    def _flush(self) -> None:
        assert self.sock is not None
        if not self.out:
            return
        try:
            n = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.error = f"{self.where}: {exc.strerror or exc}"
            return
        del self.out[:n]

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None


class _Session:
    """One browser websocket spliced to a sequence of backends (see the module docstring)."""

    _ids = itertools.count(1)

    def __init__(self, proxy: ConsoleProxy, handler: _Handler, token: str,
                 target: ConsoleTarget) -> None:
        self.id = next(self._ids)
        self.proxy = proxy
        self.options = proxy.options
        self.handler = handler
        self.ws: _BoundedWebSocket = handler.request
        self.token = token
        self.target = target
        self.splice = rs.RFBSplice(self.options.splice)
        self.backend: _Backend | None = None
        self.attempt: _Backend | None = None
        self.reattach_deadline: float | None = None
        self.next_attempt_at = 0.0
        self.backoff = self.options.reattach_backoff_initial
        self.last_error = ""
        self.detached_since: float | None = None
        self.reattaches = 0
        self.last_pause: float | None = None
        self.ever_attached = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._lock = threading.Lock()
        self._reattach_requested = False
        self._stop_reason: str | None = None
        self._done = False
        self._close_code = WS_NORMAL
        self._close_reason = ""

    @property
    def label(self) -> str:
        return f"console session {self.id} (token {self.token[:8]}...)"

    def info(self) -> SessionInfo:
        return SessionInfo(self.id, self.token, self.target.endpoint, self.splice.attached,
                           self.splice.client_ready, self.reattaches, self.last_pause,
                           self.splice.pending_input, self.splice.client_size)

    # -- signals from other threads ----------------------------------------------------------
    def request_reattach(self) -> None:
        with self._lock:
            self._reattach_requested = True
        self._wake()

    def stop(self, reason: str) -> None:
        with self._lock:
            self._stop_reason = reason
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # the buffer is full (a wake-up is pending anyway) or the session ended

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        csock = self.ws.socket
        csock.setblocking(False)
        now = time.monotonic()
        client_deadline = now + self.options.handshake_timeout
        self._start_attempt(now, self.target)
        LOG.info("%s: browser connected, backend %s", self.label, self.attempt.where
                 if self.attempt else "?")
        try:
            while not self._done:
                now = time.monotonic()
                self._timers(now, client_deadline)
                if self._done:
                    break
                rlist: list = [self._wake_r]
                wlist: list = []
                backend, attempt = self.backend, self.attempt
                # Browser input is read even while updates queue towards it (keys must not
                # wait behind a big update); it pauses only when the backend does not read.
                if backend is None or self.splice.server_output_size < self.options.max_buffer:
                    rlist.append(csock)
                if self._ws_backlog():
                    wlist.append(csock)
                if backend is not None and backend.sock is not None:
                    if self._ws_backlog() < self.options.max_buffer:
                        rlist.append(backend.sock)
                    if self.splice.server_output_size:
                        wlist.append(backend.sock)
                if attempt is not None and attempt.sock is not None and attempt.error is None:
                    if attempt.wants_read:
                        rlist.append(attempt.sock)
                    if attempt.wants_write:
                        wlist.append(attempt.sock)
                timeout = self._next_timeout(now, client_deadline)
                try:
                    readable, writable, _ = select.select(rlist, wlist, [], timeout)
                except InterruptedError:
                    continue
                now = time.monotonic()
                if self._wake_r in readable:
                    self._on_wake(now)
                if csock in writable:
                    self._flush_ws()
                if csock in readable and not self._done:
                    self._read_browser()
                backend = self.backend
                if backend is not None and backend.sock is not None and not self._done:
                    if backend.sock in writable:
                        self._write_backend(backend, now)
                    if self.backend is backend and backend.sock in readable:
                        self._read_backend(backend, now)
                attempt = self.attempt
                if attempt is not None and attempt.sock is not None and not self._done:
                    if attempt.sock in writable:
                        attempt.on_writable()
                    if attempt.sock in readable:
                        attempt.on_readable()
                    self._check_attempt(now)
                self._send_client_output()
        except Exception as exc:  # noqa: BLE001 - one session's failure must not kill the proxy
            LOG.exception("%s: internal error", self.label)
            self._handle(self.splice.close(f"console proxy internal error: {exc!r}"))
        finally:
            self._finish()

    def _next_timeout(self, now: float, client_deadline: float) -> float:
        times = [now + 5.0]
        if not self.splice.client_ready:
            times.append(client_deadline)
        if self.attempt is not None:
            times.append(self.attempt.deadline)
        elif self.reattach_deadline is not None:
            times.append(max(now, min(self.next_attempt_at, self.reattach_deadline)))
        if self.attempt is not None and self.attempt.ready:
            times.append(now + 0.05)  # a switch-over waiting for a safe cut point
        return max(0.0, min(times) - now)

    def _timers(self, now: float, client_deadline: float) -> None:
        if not self.splice.client_ready and now > client_deadline:
            self._handle(self.splice.close("browser did not finish the RFB handshake in "
                                           f"{self.options.handshake_timeout:g} s",
                                           by_client=True))
            return
        if self.attempt is not None:
            self._check_attempt(now)
        if self.attempt is None and self.reattach_deadline is not None:
            if now >= self.reattach_deadline:
                self._reattach_gave_up(now)
            elif now >= self.next_attempt_at:
                self._start_reattach_attempt(now)

    def _on_wake(self, now: float) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        with self._lock:
            stop, self._stop_reason = self._stop_reason, None
            requested, self._reattach_requested = self._reattach_requested, False
        if stop is not None:
            self._handle(self.splice.close(stop))
            return
        if requested and self.ever_attached:
            LOG.info("%s: re-attach requested", self.label)
            self.reattach_deadline = now + self.options.reattach_timeout
            self.next_attempt_at = now
            self.backoff = self.options.reattach_backoff_initial
            if self.attempt is None:
                self._start_reattach_attempt(now)

    # -- browser side ------------------------------------------------------------------------
    def _ws_backlog(self) -> int:
        return sum(len(p) for p in self.handler.send_parts) + len(self.ws._send_buffer)

    def _read_browser(self) -> None:
        try:
            bufs, closed = self.handler.recv_frames()
        except _WebSocketTooBig as exc:
            self._close_code, self._close_reason = WS_TOO_BIG, str(exc)
            self._handle(self.splice.receive_client_data(b""), note=str(exc))
            return
        except OSError as exc:
            bufs, closed = [], {"code": None, "reason": f"browser connection error: {exc}"}
        for buf in bufs:
            self._handle(self.splice.receive_client_data(buf))
            if self._done:
                return
        if not closed and self.ws._sent_close:
            # websockify refused the browser's framing (text frame, unmasked, bad opcode...)
            # and already sent its close frame: this browser is done.
            closed = {"code": self.ws.close_code, "reason": "websocket protocol error"}
            self._close_code = 0
        if closed:
            if self._close_code == WS_NORMAL:
                self._close_code = 0  # the browser closed: the websocket answered already
            self._handle(self.splice.receive_client_data(b""),
                         note=f"websocket closed ({closed.get('code')} {closed.get('reason')})")

    def _send_client_output(self) -> None:
        data = self.splice.data_to_send_client()
        if data and not (self.ws._sent_close or self.ws._received_close):
            try:
                self.handler.send_frames([data])
            except OSError as exc:
                self._handle(self.splice.receive_client_data(b""),
                             note=f"browser connection error: {exc}")

    def _flush_ws(self) -> None:
        try:
            self.handler.send_frames()
            if not self.handler.send_parts and self.ws._send_buffer:
                self.ws._flush()  # control frames (pongs) queued outside send_frames
        except WebSocketWantWriteError:
            pass
        except OSError as exc:
            self._handle(self.splice.receive_client_data(b""),
                         note=f"browser connection error: {exc}")

    # -- backend side ------------------------------------------------------------------------
    def _read_backend(self, backend: _Backend, now: float) -> None:
        assert backend.sock is not None
        try:
            data = backend.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._backend_lost(f"backend {backend.where}: {exc.strerror or exc}", now)
            return
        if not data:
            self._backend_lost(f"backend {backend.where} closed the connection", now)
            return
        self._handle(self.splice.receive_server_data(data))

    def _write_backend(self, backend: _Backend, now: float) -> None:
        assert backend.sock is not None
        out = self.splice.server_output()
        if not out:
            return
        try:
            n = backend.sock.send(out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._backend_lost(f"backend {backend.where}: {exc.strerror or exc}", now)
            return
        self.splice.server_output_written(n)

    def _backend_lost(self, reason: str, now: float) -> None:
        backend, self.backend = self.backend, None
        if backend is not None:
            backend.close()
        LOG.warning("%s: %s; re-attaching", self.label, reason)
        self._handle(self.splice.detach(reason))
        if self._done:
            return
        self.detached_since = now
        self.last_error = reason
        deadline = now + self.options.reattach_timeout
        self.reattach_deadline = max(self.reattach_deadline or 0.0, deadline)
        if self.attempt is None:
            self.next_attempt_at = now
            self.backoff = self.options.reattach_backoff_initial
            self._start_reattach_attempt(now)

    def _start_attempt(self, now: float, target: ConsoleTarget) -> None:
        self.attempt = _Backend(target, self.options, now)
        if self.reattach_deadline is not None:
            # The overall re-attach budget bounds each attempt too.
            self.attempt.deadline = min(self.attempt.deadline,
                                        max(self.reattach_deadline, now + 0.1))
        if self.attempt.error:
            self._attempt_failed(self.attempt.error, now)

    def _start_reattach_attempt(self, now: float) -> None:
        try:
            target = self.proxy.plugin.reresolve(self.token, self.target)
        except Exception as exc:  # noqa: BLE001 - a plugin bug is a failed attempt
            LOG.exception("%s: token plugin failed", self.label)
            target, self.last_error = None, f"token lookup failed: {exc!r}"
        else:
            if target is None:
                self.last_error = "the console token no longer resolves to an endpoint"
        if target is None:
            self._schedule_retry(now)
            return
        self._start_attempt(now, target)

    def _check_attempt(self, now: float) -> None:
        attempt = self.attempt
        if attempt is None:
            return
        if attempt.error is None and not attempt.ready and now > attempt.deadline:
            attempt.error = (f"{attempt.where}: no RFB handshake within "
                             f"{self.options.connect_timeout:g} s")
        if attempt.error is not None:
            self._attempt_failed(attempt.error, now)
        elif attempt.ready:
            if self.backend is not None and not self.splice.cut_is_safe:
                return  # switch once the oversized unit in flight has been forwarded
            self._switch_to(attempt, now)

    def _attempt_failed(self, reason: str, now: float) -> None:
        attempt, self.attempt = self.attempt, None
        if attempt is not None:
            attempt.close()
        self.last_error = reason
        if not self.ever_attached:
            LOG.warning("%s: %s", self.label, reason)
            self._handle(self.splice.close(f"cannot reach the console: {reason}"))
            return
        LOG.info("%s: re-attach attempt failed: %s", self.label, reason)
        self._schedule_retry(now)

    def _schedule_retry(self, now: float) -> None:
        if self.reattach_deadline is None:
            return
        self.next_attempt_at = now + self.backoff
        self.backoff = min(self.backoff * 2, self.options.reattach_backoff_max)

    def _reattach_gave_up(self, now: float) -> None:
        self.reattach_deadline = None
        if self.backend is not None:
            LOG.warning("%s: requested re-attach gave up (%s); staying on %s", self.label,
                        self.last_error, self.backend.where)
            return
        self._handle(self.splice.close(
            f"the console could not be re-attached within {self.options.reattach_timeout:g} s"
            f": {self.last_error}"))

    def _switch_to(self, attempt: _Backend, now: float) -> None:
        self.attempt = None
        old = self.backend
        if old is not None:
            self.backend = None
            old.close()
            self._handle(self.splice.detach(f"switched from {old.where} to {attempt.where}"))
            if self._done:
                attempt.close()
                return
            self.detached_since = now
        result = attempt.handshake.result
        assert result is not None
        self.backend = attempt
        self.target = attempt.target
        self.reattach_deadline = None
        self.backoff = self.options.reattach_backoff_initial
        self._handle(self.splice.attach(result, attempt.handshake.leftover))
        if self._done:
            return
        if self.ever_attached:
            self.reattaches += 1
            self.last_pause = now - (self.detached_since or now)
            LOG.info("%s: re-attached to %s after %.1f ms", self.label, attempt.where,
                     1000 * self.last_pause)
        self.ever_attached = True
        self.detached_since = None

    # -- events and the end ------------------------------------------------------------------
    def _handle(self, events: list[rs.Event], note: str | None = None) -> None:
        for event in events:
            if isinstance(event, rs.Closed):
                if not event.by_client or event.error:
                    log = LOG.warning if event.error else LOG.info
                    log("%s: closed: %s", self.label, note or event.reason)
                else:
                    LOG.info("%s: closed: %s", self.label, note or event.reason)
                if self._close_code == WS_NORMAL and event.error:
                    self._close_code = WS_POLICY if event.by_client else WS_INTERNAL
                if not self._close_reason:
                    self._close_reason = event.reason
                self._done = True
            elif isinstance(event, rs.Detached):
                LOG.info("%s: detached (%s): %d rects padded, %d bytes dropped, %d inputs "
                         "kept", self.label, event.reason, event.padded, event.dropped,
                         event.requeued)
            elif isinstance(event, rs.Attached) and not event.reattach:
                LOG.info("%s: attached, %dx%d", self.label, event.width, event.height)

    def _finish(self) -> None:
        for b in (self.backend, self.attempt):
            if b is not None:
                b.close()
        self.backend = self.attempt = None
        deadline = time.monotonic() + FINAL_FLUSH_TIMEOUT
        try:
            self._send_client_output()
            if self._close_code and not self.ws._sent_close:
                reason = self._close_reason.encode("utf-8", "replace")[:120]
                self.ws.shutdown(socket.SHUT_RDWR, self._close_code,
                                 reason.decode("utf-8", "ignore"))
        except Exception:  # noqa: BLE001 - WantWrite or a dead socket: flushed below or moot
            pass
        try:
            while time.monotonic() < deadline and self._ws_backlog():
                try:
                    self.handler.send_frames()
                    self.ws._flush()
                except Exception:  # noqa: BLE001
                    pass
                if not self._ws_backlog():
                    break
                select.select([], [self.ws.socket], [], 0.05)
        except (OSError, ValueError):
            pass
        for s in (self._wake_r, self._wake_w):
            s.close()


class _Handler(WebSockifyRequestHandler):
    """websockify's handler: static files, the control endpoint, and websocket sessions."""

    SocketClass = _BoundedWebSocket
    #: Seconds to send a request line and headers (slow clients cannot hold a thread forever).
    timeout = 30
    extensions_map = {**WebSockifyRequestHandler.extensions_map, ".js": "text/javascript",
                      ".mjs": "text/javascript", ".html": "text/html; charset=utf-8"}
    server: _HTTPServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        LOG.debug("%s - %s", self.client_address[0] if self.client_address else "-",
                  _redact(format % args))

    def log_error(self, format: str, *args: object) -> None:  # noqa: A002
        LOG.info("%s - %s", self.client_address[0] if self.client_address else "-",
                 _redact(format % args))

    # -- static files ------------------------------------------------------------------------
    def translate_path(self, path: str) -> str:
        path = urlsplit(path).path
        if path in ("/", "/console.html", "/vnc.html", "/vnc_auto.html"):
            return str(WEB_DIR / "console.html")
        roots: list[tuple[str, Path]] = []
        novnc = self.server.proxy.options.novnc_root
        if novnc:
            roots.append(("/novnc/", Path(novnc).resolve()))
        roots.append(("/", WEB_DIR.resolve()))
        for prefix, root in roots:
            if path.startswith(prefix):
                p = (root / path[len(prefix):]).resolve()
                if p.is_relative_to(root) and p.is_file():
                    return str(p)
        return str(WEB_DIR / "does-not-exist")

    def list_directory(self, path):  # noqa: ANN001, ANN201 - http.server's signature
        self.send_error(404, "no directory listings")
        return None

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] == "/":
            # Nova-style URLs carry ?path=...: keep the query for the console page.
            query = urlsplit(self.path).query
            self.send_response(302)
            self.send_header("Location", "/console.html" + (f"?{query}" if query else ""))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    # -- control -----------------------------------------------------------------------------
    def do_POST(self) -> None:
        url = urlsplit(self.path)
        if url.path != "/reattach":
            self.send_error(404)
            return
        host = self.client_address[0] if self.client_address else ""
        if host not in self.server.proxy.options.control_hosts:
            self.send_error(403, "not a control host")
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_CONTROL_BODY:
            self.send_error(400, "bad Content-Length")
            return
        if length:
            self.rfile.read(length)
        query = parse_qs(url.query)
        token = (query.get("token") or [None])[0]
        key = (query.get("key") or [None])[0]
        if token is None and key is None:
            self.send_error(400, "give token= or key=")
            return
        n = self.server.proxy.reattach(token=token, key=key)
        body = json.dumps({"sessions": n}).encode()
        self.send_response(200 if n else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    # -- websocket ---------------------------------------------------------------------------
    def _token(self) -> str | None:
        query = parse_qs(urlsplit(self.path).query)
        if "token" in query:
            return query["token"][0]
        cookie_header = self.headers.get("Cookie")
        if cookie_header:
            try:
                morsel = SimpleCookie(cookie_header).get("token")
            except CookieError:
                return None
            if morsel is not None:
                return morsel.value
        return None

    def _origin_allowed(self) -> bool:
        """As Nova's proxy: a browser's Origin must be this host or an allowed one (a page
        elsewhere must not drive a console with a token it obtained)."""
        origin = self.headers.get("Origin")
        if not origin or origin == "null":
            return origin is None
        origin_host = urlsplit(origin).hostname
        host_header = self.headers.get("Host") or ""
        own = urlsplit("//" + host_header).hostname
        allowed = {h.lower() for h in self.server.proxy.options.allowed_origins}
        return origin_host is not None and (origin_host == own or origin_host.lower() in allowed)

    def handle_upgrade(self) -> None:
        proxy = self.server.proxy
        token = self._token()
        if not valid_token(token):
            self.send_error(403, "missing or malformed console token")
            return
        assert token is not None
        if not self._origin_allowed():
            self.send_error(403, "origin not allowed")
            return
        try:
            target = proxy.plugin.resolve(token)
        except Exception:  # noqa: BLE001
            LOG.exception("token plugin failed")
            self.send_error(500, "token lookup failed")
            return
        if target is None:
            LOG.info("refused a websocket with an unknown token %s...", token[:8])
            self.send_error(403, "invalid console token")
            return
        self._dmore_token, self._dmore_target = token, target
        self.SocketClass = self.server.ws_class
        super().handle_upgrade()

    def new_websocket_client(self) -> None:
        proxy = self.server.proxy
        session = _Session(proxy, self, self._dmore_token, self._dmore_target)
        proxy._register(session)
        try:
            session.run()
        finally:
            proxy._unregister(session)


_TOKEN_IN_URL = re.compile(r"(token(?:=|%3[dD]))[^&\s\"']+")


def _redact(text: str) -> str:
    """Console tokens are credentials: never write one to a log (request lines carry them)."""
    return _TOKEN_IN_URL.sub(r"\1***", text)


class _HTTPServer(ThreadingMixIn, HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], proxy: ConsoleProxy) -> None:
        self.proxy = proxy
        self.logger = LOG
        self._slots = threading.BoundedSemaphore(proxy.options.max_connections)
        self.ws_class = type("SessionWebSocket", (_BoundedWebSocket,),
                             {"max_message": proxy.options.max_ws_message})
        self.ssl_context: ssl.SSLContext | None = None
        if proxy.options.cert_file:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(proxy.options.cert_file, proxy.options.key_file)
            self.ssl_context = ctx
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def get_request(self):  # noqa: ANN201 - socketserver's signature
        """Accept; with TLS the handshake is left to the handler's thread (its first read),
        so a slow or silent client never blocks the accept loop."""
        sock, addr = super().get_request()
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(sock, server_side=True,
                                                do_handshake_on_connect=False)
        return sock, addr

    def process_request(self, request, client_address):  # noqa: ANN001
        if not self._slots.acquire(blocking=False):
            LOG.warning("refusing %s: %d connections already", client_address,
                        self.proxy.options.max_connections)
            try:
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                                b"Connection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):  # noqa: ANN001
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class ConsoleProxy:
    """The proxy service.  ``start()`` serves in a background thread (tests, embedding);
    ``serve_forever()`` in the calling one (the daemon)."""

    def __init__(self, plugin: TargetPlugin, options: ProxyOptions | None = None, *,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.plugin = plugin
        self.options = options or ProxyOptions()
        self.options.check()
        self._lock = threading.Lock()
        self._sessions: set[_Session] = set()
        self._httpd = _HTTPServer((host, port), self)
        self.host = host
        self.port = self._httpd.server_address[1]
        self._thread: threading.Thread | None = None
        #: Called with a session's id when it ends (tests wait on it).
        self.on_session_end: Callable[[int], None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self.options.cert_file else "http"
        return f"{scheme}://{host}:{self.port}/"

    def ws_url(self, token: str, path: str = "websockify") -> str:
        return "ws" + self.url[4:] + f"{path}?token={token}"

    def start(self) -> int:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="console-proxy",
                                        daemon=True)
        self._thread.start()
        LOG.info("console proxy listening on %s", self.url)
        return self.port

    def serve_forever(self) -> None:
        LOG.info("console proxy listening on %s", self.url)
        self._httpd.serve_forever()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every session (browsers get a close frame), wait a little."""
        if self._thread is not None:
            self._httpd.shutdown()
        self._httpd.server_close()
        for s in self._snapshot():
            s.stop("console proxy shutting down")
        deadline = time.monotonic() + timeout
        while self._snapshot() and time.monotonic() < deadline:
            time.sleep(0.02)
        if self._thread is not None:
            self._thread.join(timeout)

    def reattach(self, *, token: str | None = None, key: str | None = None) -> int:
        """Ask the sessions of ``token`` (or of every token whose target has ``key``) to
        re-attach now: the endpoint is looked up again and the new backend switched in.
        Returns how many sessions were asked."""
        n = 0
        for s in self._snapshot():
            if (token is not None and s.token == token) or (
                    key is not None and s.target.key == key):
                s.request_reattach()
                n += 1
        return n

    def sessions(self) -> list[SessionInfo]:
        return [s.info() for s in self._snapshot()]

    def _snapshot(self) -> list[_Session]:
        with self._lock:
            return list(self._sessions)

    def _register(self, session: _Session) -> None:
        with self._lock:
            self._sessions.add(session)

    def _unregister(self, session: _Session) -> None:
        with self._lock:
            self._sessions.discard(session)
        if self.on_session_end is not None:
            self.on_session_end(session.id)
