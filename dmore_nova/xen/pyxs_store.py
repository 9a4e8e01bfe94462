"""``api.XenStore`` over pyxs 0.4.1: dom0's xenstored socket, the kernel's xenbus device inside
a domU (the RM VM), or the simulator's pyxs-compatible socket.

What is pyxs's and what is ours
-------------------------------
pyxs gives us the connection classes, the packet type, and its ``Router``: one background thread
that owns the connection, matches replies to requests by ``req_id`` and hands ``WATCH_EVENT``
packets, by token, to a ``Monitor``'s ``events`` queue.  We use those unmodified.  We do not use
``Client.execute_command`` for requests, for three reasons:

* it rejects any argument that is not non-empty 7-bit ASCII, so it cannot write an empty value
  (how a xenstore directory node is created: ``xenstore-write $B ""``) or any byte >= 0x80;
* ``RVar.get()`` waits forever: if xenstored goes away the router thread dies and every caller
  blocks for good.  We wait on the same ``RVar`` with an explicit limit and notice a dead router;
* pyxs keeps the transaction id in the ``Client`` (one transaction per client); a transaction
  here is an object carrying its own ``tx_id`` through the same router, which is what the wire
  protocol does anyway.

Watches for asyncio
-------------------
The router thread puts events into ``Monitor.events`` (a ``queue.Queue``).  We replace that queue
with :class:`_SignallingQueue`, whose ``put`` also writes one byte into a socketpair; the read end
is :meth:`PyxsXenStore.watch_fileno`.  :meth:`PyxsXenStore.read_watch_events` first drains the
socket, then the queue, so an event that lands between the two leaves a byte behind (a spurious
wake-up, never a lost one).  The connection's close hook writes a byte too, so a reader learns
that the connection died (``read_watch_events`` then raises) instead of waiting forever.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pyxs._internal import NUL, Op, Packet, next_rq_id
from pyxs.client import Client, Router
from pyxs.exceptions import ConnectionError as PyxsConnectionError
from pyxs.exceptions import InvalidPath, InvalidPermission, PyXSError
from pyxs.helpers import check_path, check_perms, check_watch_path

from dmore_nova.xen import api
from dmore_nova.xen.real.xenbus_conn import (
    NotifyingUnixSocketConnection,
    XenBusDeviceConnection,
    default_xenbus_path,
)

LOG = logging.getLogger(__name__)

#: How long one request may wait for xenstored's reply before ``ETIMEDOUT``.  xenstored answers
#: in microseconds; seconds mean it is wedged (or the RM VM is being suspended for migration,
#: which takes well under this).
DEFAULT_REQUEST_TIMEOUT = 30.0
#: Granularity of the dead-router check while waiting for a reply.
_POLL_INTERVAL = 0.5
#: Upper bound on events returned by one ``read_watch_events`` call; the rest stay queued and
#: keep the fd readable, so a flood cannot make one call unbounded.
MAX_EVENTS_PER_READ = 4096
#: Events held for a reader that is not reading; beyond this they collapse into "everything
#: fired" (see :class:`_SignallingQueue`), so memory stays bounded.
MAX_QUEUED_EVENTS = 65536


def _errno_from_name(name: bytes) -> int:
    """xenstored sends errors by name ("ENOENT"); unknown names become EIO."""
    text = name.rstrip(NUL).decode("ascii", "replace")
    code = getattr(errno, text, None) if text.startswith("E") else None
    return code if isinstance(code, int) else errno.EIO


def _to_bytes(value: bytes | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def _check(checker: Callable[[Any], object], what: str, value: Any) -> Any:
    """pyxs's validators raise InvalidPath/InvalidPermission (ValueError): make them XenError
    EINVAL, since paths often come from guest-written xenstore values."""
    try:
        checker(value)
    except (InvalidPath, InvalidPermission, ValueError) as e:
        raise api.XenError(errno.EINVAL, f"invalid xenstore {what}: {value!r}") from e
    return value


class _SignallingQueue(queue.Queue):
    """A ``queue.Queue`` whose every ``put`` also makes the ``wake`` socket's peer readable.

    Bounded without ever blocking the router thread (which must keep delivering replies): past
    ``limit`` items an event is dropped and :attr:`overflowed` set; the reader then treats every
    watch as fired, which is all a dropped event could have said.
    """

    def __init__(self, wake: socket.socket, limit: int = MAX_QUEUED_EVENTS) -> None:
        super().__init__()
        self._wake = wake
        self.limit = limit
        self.overflowed = False

    def put(self, item: object, block: bool = True, timeout: float | None = None) -> None:
        if self.qsize() >= self.limit:
            self.overflowed = True
        else:
            super().put(item, block, timeout)
        _poke(self._wake)


def _poke(sock: socket.socket) -> None:
    try:
        sock.send(b"\0")
    except (BlockingIOError, OSError):
        # Full: the reader has plenty of wake-ups pending already.  Closed: nobody to wake.
        pass


class _PyxsTransaction(api.Transaction):
    def __init__(self, store: PyxsXenStore, tx_id: int) -> None:
        self._store = store
        self.tx_id = tx_id

    def read(self, path: str) -> bytes | None:
        return self._store._read(path, self.tx_id)

    def write(self, path: str, value: bytes | str) -> None:
        self._store._write(path, value, self.tx_id)

    def rm(self, path: str) -> None:
        self._store._rm(path, self.tx_id)

    def directory(self, path: str) -> list[str]:
        return self._store._directory(path, self.tx_id)

    def mkdir(self, path: str) -> None:
        self._store._mkdir(path, self.tx_id)

    def set_perms(self, path: str, perms: Sequence[str]) -> None:
        self._store._set_perms(path, perms, self.tx_id)


class PyxsXenStore(api.XenStore):
    """xenstore through pyxs.

    :param unix_socket_path: xenstored's socket (dom0: pyxs's default, ``$XENSTORED_PATH`` or
        ``/var/run/xenstored/socket``; the simulator: its socket path).
    :param xen_bus_path: the xenbus device inside a domU; ``""`` picks
        :func:`~dmore_nova.xen.real.xenbus_conn.default_xenbus_path`.
    :param request_timeout: the limit on waiting for one reply.

    Give at most one of the two paths; with neither, pyxs's default socket is used.
    Connection failures raise :class:`api.XenUnavailable` (with the errno from the OS).
    """

    def __init__(self, unix_socket_path: str | None = None, xen_bus_path: str | None = None, *,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT) -> None:
        if unix_socket_path is not None and xen_bus_path is not None:
            raise ValueError("give unix_socket_path or xen_bus_path, not both")
        if request_timeout <= 0:
            raise ValueError("request_timeout must be positive")
        self._timeout = request_timeout
        self._closed = False
        if xen_bus_path is not None:
            connection = XenBusDeviceConnection(xen_bus_path or default_xenbus_path())
        else:
            connection = NotifyingUnixSocketConnection(unix_socket_path)
        self.path = connection.path
        self._max_payload: int = connection.max_payload
        self._r_wake, self._w_wake = socket.socketpair()
        self._r_wake.setblocking(False)
        self._w_wake.setblocking(False)
        connection.on_close = lambda: _poke(self._w_wake)
        self._router = Router(connection)
        # Same thread pyxs would start, but a dying router is logged instead of printing an
        # unhandled-exception traceback (xenstored going away is an expected event here).
        self._router.thread = threading.Thread(target=self._run_router, daemon=True,
                                               name=f"pyxs-router {self.path}")
        self._client = Client(router=self._router)
        try:
            self._client.connect()
        except PyxsConnectionError as e:
            self._close_wake()
            code = e.__cause__.errno if isinstance(e.__cause__, OSError) else None
            if code is None and isinstance(e.__context__, OSError):
                code = e.__context__.errno
            raise api.XenUnavailable(code or errno.ENOENT,
                                     f"cannot connect to xenstore at {self.path!r}: {e}") from e
        # pyxs's Monitor is the object its router delivers events to; our queue makes it
        # pollable.  (monitor() refuses pyxs's own XenBusConnection; see xenbus_conn.)
        self._monitor = self._client.monitor()
        self._monitor.events = _SignallingQueue(self._w_wake)
        self._watch_lock = threading.Lock()
        self._watches: dict[bytes, set[bytes]] = {}  # token -> watched paths

    def __repr__(self) -> str:
        return f"PyxsXenStore({self.path!r})"

    def _run_router(self) -> None:
        try:
            self._router()
        except Exception as e:
            if not self._closed:
                LOG.warning("xenstore connection %s lost: %s", self.path, e)

    # -- requests ----------------------------------------------------------------------------

    def _request(self, op: int, payload: bytes, tx_id: int = 0) -> bytes:
        """Send one request through pyxs's router and return the reply payload (raw)."""
        if self._closed:
            raise api.XenError(errno.EBADF, "xenstore connection is closed")
        if len(payload) > self._max_payload:
            raise api.XenError(errno.E2BIG, f"xenstore request of {len(payload)} bytes exceeds "
                                            f"the connection's limit ({self._max_payload})")
        if not self._router.thread.is_alive():
            raise api.XenError(errno.ECONNRESET, f"xenstore connection {self.path!r} lost")
        packet = Packet(op, payload, next_rq_id(), tx_id)
        try:
            rvar = self._router.send(packet)
        except PyXSError as e:
            raise api.XenError(errno.ECONNRESET, f"xenstore send failed: {e}") from e
        reply = self._wait(rvar)
        if reply.op == Op.ERROR:
            code = _errno_from_name(reply.payload)
            cls = api.XenstoreConflict if (code == errno.EAGAIN and
                                           op == Op.TRANSACTION_END) else api.XenError
            raise cls(code, f"xenstore {Op._fields[op]} failed: "
                            f"{errno.errorcode.get(code, code)}")
        if reply.op != op or reply.tx_id != tx_id:
            raise api.XenError(errno.EPROTO, f"unexpected xenstore reply {reply.op} "
                                             f"(tx {reply.tx_id}) to {op} (tx {tx_id})")
        return reply.payload

    def _wait(self, rvar: Any) -> Packet:
        """``RVar.get`` with a limit and a dead-router check (pyxs's waits forever)."""
        deadline = time.monotonic() + self._timeout
        with rvar.condition:
            while rvar.target is None:
                if not self._router.thread.is_alive():
                    raise api.XenError(errno.ECONNRESET,
                                       f"xenstore connection {self.path!r} lost")
                left = deadline - time.monotonic()
                if left <= 0:
                    # The rvar stays registered: a late reply must still find it, or pyxs's
                    # router would treat it as unexpected and drop the connection.
                    raise api.XenError(errno.ETIMEDOUT,
                                       f"no reply from xenstore in {self._timeout} s")
                rvar.condition.wait(min(left, _POLL_INTERVAL))
            return rvar.target

    @staticmethod
    def _path(path: str) -> bytes:
        return _check(check_path, "path", path.encode("ascii", "replace"))

    @staticmethod
    def _token(token: str) -> bytes:
        try:
            btoken = token.encode("ascii")
        except UnicodeEncodeError:
            btoken = b""
        if not btoken or NUL in btoken:
            raise api.XenError(errno.EINVAL, f"invalid watch token {token!r}")
        return btoken

    def _read(self, path: str, tx_id: int = 0) -> bytes | None:
        try:
            return self._request(Op.READ, self._path(path) + NUL, tx_id)
        except api.XenError as e:
            if e.errno == errno.ENOENT:
                return None
            raise

    def _write(self, path: str, value: bytes | str, tx_id: int = 0) -> None:
        self._request(Op.WRITE, self._path(path) + NUL + _to_bytes(value), tx_id)

    def _rm(self, path: str, tx_id: int = 0) -> None:
        try:
            self._request(Op.RM, self._path(path) + NUL, tx_id)
        except api.XenError as e:
            # ENOENT: the node, or its parent, is missing -- either way it is gone.
            if e.errno != errno.ENOENT:
                raise

    def _directory(self, path: str, tx_id: int = 0) -> list[str]:
        try:
            payload = self._request(Op.DIRECTORY, self._path(path) + NUL, tx_id)
        except api.XenError as e:
            if e.errno == errno.ENOENT:
                return []
            raise
        return [name.decode("ascii", "replace") for name in payload.split(NUL) if name]

    # -- api.XenStore ------------------------------------------------------------------------

    def read(self, path: str) -> bytes | None:
        return self._read(path)

    def write(self, path: str, value: bytes | str) -> None:
        self._write(path, value)

    def mkdir(self, path: str) -> None:
        self._mkdir(path)

    def _mkdir(self, path: str, tx_id: int = 0) -> None:
        self._request(Op.MKDIR, self._path(path) + NUL, tx_id)

    def rm(self, path: str) -> None:
        self._rm(path)

    def directory(self, path: str) -> list[str]:
        return self._directory(path)

    def get_perms(self, path: str) -> list[str]:
        payload = self._request(Op.GET_PERMS, self._path(path) + NUL)
        return [p.decode("ascii", "replace") for p in payload.split(NUL) if p]

    def set_perms(self, path: str, perms: Sequence[str]) -> None:
        self._set_perms(path, perms)

    def _set_perms(self, path: str, perms: Sequence[str], tx_id: int = 0) -> None:
        encoded = [p.encode("ascii", "replace") for p in perms]
        if not encoded:
            raise api.XenError(errno.EINVAL, "set_perms needs at least the owner entry")
        _check(check_perms, "permissions", encoded)  # type: ignore[arg-type]
        self._request(Op.SET_PERMS, self._path(path) + NUL + b"".join(p + NUL for p in encoded),
                      tx_id)

    def get_domain_path(self, domid: int) -> str:
        if not 0 <= domid < 0x10000:
            raise api.XenError(errno.EINVAL, f"domid {domid} out of range")
        payload = self._request(Op.GET_DOMAIN_PATH, str(domid).encode() + NUL)
        return payload.rstrip(NUL).decode("ascii", "replace")

    def set_target(self, domid: int, target: int) -> None:
        """``XS_SET_TARGET`` (xs_wire.h; dom0 only): xenstored lets ``domid`` act on
        ``target``'s nodes as their owner would -- what libxl does for a stub domain
        (``libxl__spawn_stub_dm``), and dom0 for an RM VM (:mod:`dmore_nova.virt.xl_rmvm`).
        Not part of :class:`api.XenStore`: only a toolstack in dom0 needs it."""
        for d in (domid, target):
            if not 0 <= d < 0x10000:
                raise api.XenError(errno.EINVAL, f"domid {d} out of range")
        self._request(Op.SET_TARGET, str(domid).encode() + NUL + str(target).encode() + NUL)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[api.Transaction]:
        payload = self._request(Op.TRANSACTION_START, NUL)
        try:
            tx_id = int(payload.rstrip(NUL))
        except ValueError as e:
            raise api.XenError(errno.EPROTO, f"bad transaction id {payload!r}") from e
        if tx_id <= 0 or tx_id > 0xFFFFFFFF:
            raise api.XenError(errno.EPROTO, f"bad transaction id {tx_id}")
        try:
            yield _PyxsTransaction(self, tx_id)
        except BaseException:
            with contextlib.suppress(api.XenError):
                self._request(Op.TRANSACTION_END, b"F" + NUL, tx_id)
            raise
        # EAGAIN here becomes XenstoreConflict in _request.
        self._request(Op.TRANSACTION_END, b"T" + NUL, tx_id)

    # -- watches ------------------------------------------------------------------------------

    def watch(self, path: str, token: str) -> None:
        wpath = _check(check_watch_path, "watch path", path.encode("ascii", "replace"))
        btoken = self._token(token)
        with self._watch_lock:
            # Subscribe the monitor once per token: pyxs's router puts an event into every
            # subscription, so a second subscription for a token would duplicate its events.
            paths = self._watches.get(btoken)
            if paths is None:
                self._router.subscribe(btoken, self._monitor)
                paths = self._watches[btoken] = set()
        try:
            self._request(Op.WATCH, wpath + NUL + btoken + NUL)
        except BaseException:
            self._forget_watch(wpath, btoken)
            raise
        with self._watch_lock:
            paths.add(wpath)

    def unwatch(self, path: str, token: str) -> None:
        wpath = _check(check_watch_path, "watch path", path.encode("ascii", "replace"))
        btoken = self._token(token)
        try:
            self._request(Op.UNWATCH, wpath + NUL + btoken + NUL)
        finally:
            self._forget_watch(wpath, btoken)

    def _forget_watch(self, wpath: bytes, btoken: bytes) -> None:
        with self._watch_lock:
            paths = self._watches.get(btoken)
            if paths is None:
                return
            paths.discard(wpath)
            if not paths:
                del self._watches[btoken]
                with contextlib.suppress(ValueError):
                    self._router.unsubscribe(btoken, self._monitor)

    def watch_fileno(self) -> int:
        return self._r_wake.fileno()

    def read_watch_events(self) -> list[tuple[str, str]]:
        """Pending events, oldest first, without blocking.

        Events for tokens no longer watched are dropped (they were queued before ``unwatch``);
        exact repeats within one batch are folded, since an event only means "look again".
        After an overflow (:data:`MAX_QUEUED_EVENTS`) every active watch is reported once.
        Raises :class:`api.XenError` (ECONNRESET) once the connection is gone.
        """
        with contextlib.suppress(BlockingIOError, OSError):
            while self._r_wake.recv(4096):
                pass
        events: list[tuple[str, str]] = []
        seen: set[tuple[bytes, bytes]] = set()
        q = self._monitor.events
        if q.overflowed:
            q.overflowed = False
            with contextlib.suppress(queue.Empty):
                while True:
                    q.get_nowait()
            with self._watch_lock:
                everything = sorted((p, t) for t, paths in self._watches.items() for p in paths)
            LOG.warning("%r: more than %d watch events unread; reporting every watch as fired",
                        self, q.limit)
            return [(p.decode("ascii", "replace"), t.decode("ascii", "replace"))
                    for p, t in everything]
        for _ in range(MAX_EVENTS_PER_READ):
            try:
                wpath, btoken = q.get_nowait()
            except queue.Empty:
                break
            with self._watch_lock:
                active = btoken in self._watches
            if not active or (wpath, btoken) in seen:
                continue
            seen.add((wpath, btoken))
            events.append((wpath.decode("ascii", "replace"), btoken.decode("ascii", "replace")))
        else:
            _poke(self._w_wake)  # more left: stay readable
        if not events and not self._closed and not self._router.thread.is_alive():
            raise api.XenError(errno.ECONNRESET, f"xenstore connection {self.path!r} lost")
        return events

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._client.close()  # terminates the router thread, which closes the connection
        finally:
            self._close_wake()

    def _close_wake(self) -> None:
        for sock in (self._r_wake, self._w_wake):
            with contextlib.suppress(OSError):
                sock.close()

    def __enter__(self) -> PyxsXenStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()



__all__ = ["DEFAULT_REQUEST_TIMEOUT", "MAX_EVENTS_PER_READ", "PyxsXenStore"]
