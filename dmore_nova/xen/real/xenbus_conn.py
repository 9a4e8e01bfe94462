"""pyxs connections for the RM VM: the xenbus device (inside a domU) and a unix socket (dom0),
both able to tell their owner when the router thread has dropped them.

Why a new xenbus connection class
---------------------------------
pyxs 0.4.1's ``Client.monitor()`` refuses any connection that ``isinstance(...,
XenBusConnection)`` ("XenBus does not obey XenStore protocol specification", citing xen-devel
2016-02/msg03737).  An RM VM is a domU: its only path to xenstore is the kernel's xenbus device,
and a backend without watches cannot follow the frontend's state.  :class:`XenBusDeviceConnection`
speaks exactly pyxs's packet framing over the same device but derives from pyxs's
``PacketConnection``, not from ``XenBusConnection``, so ``monitor()`` accepts it.

Why this is safe (Linux ``drivers/xen/xenbus/xenbus_dev_frontend.c``, mainline, e.g. the copy in
``Kingxukai/linux``; ``xenbus_comms.c``; ``xenbus_xs.c``):

* **Framing.**  ``xenbus_file_write`` accumulates bytes into ``u->u.buffer`` until a whole
  ``xsd_sockmsg`` header plus ``hdr.len`` bytes of body is present, then acts on it.  That
  buffer is ``XENSTORE_PAYLOAD_MAX`` bytes *including* the 16-byte header, so through the device
  a body may carry at most 4080 bytes (``E2BIG`` beyond; the socket allows 4096):
  :attr:`XenBusDeviceConnection.max_payload`.  We write each packet with one ``write()``
  (header and body together) so a message is never split.  Reads
  return queued reply bytes (``xenbus_file_read``), a message possibly spread over several
  ``read()`` calls; pyxs's transport loops until it has the full header and body.
* **Replies carry our req_id/tx_id.**  Ordinary requests go to xenstored through
  ``xenbus_dev_request_and_reply``; ``xs_send`` saves ``caller_req_id`` and ``process_msg``
  (xenbus_comms.c) restores it into the reply before ``xenbus_dev_queue_reply`` queues the header
  for us.  Replies the driver synthesises itself (``XS_WATCH``/``XS_UNWATCH`` "OK", errors such
  as ``EINVAL``/``ENOENT``) are built by ``xenbus_command_reply``, which starts from a copy of our
  request header (``msg.hdr = u->u.msg``), so ``req_id`` and ``tx_id`` are echoed too.  This is
  what pyxs's router needs to match replies to requests.
* **Watch events are delivered.**  ``XS_WATCH`` on the device registers a kernel watch whose
  callback ``watch_fired`` queues an ``XS_WATCH_EVENT`` message with body ``path\\0token\\0``
  (the *caller's* token) on the same file; pyxs's router dispatches ``WATCH_EVENT`` packets by
  token and ignores their (uninitialised) ``req_id``.  xenstored fires each new watch once at
  registration, as over the socket.
* **Migration.**  The file keeps working across save/restore of the RM VM: ``xs_resume``
  (xenbus_xs.c) re-registers every kernel watch, which makes xenstored fire each once more (a
  "check now" for our backends), and a transaction that spans a resume fails its commit with
  ``EAGAIN`` (``xb_dev_generation_id`` check in ``xenbus_write_transaction``), i.e. it is
  retried like any conflict.

Older kernels (e.g. the ``torvalds/linux`` copy of this file at 05e5bd0f, before
``xenbus_command_reply`` existed) answered ``XS_WATCH`` and ``XS_UNWATCH`` with a header built
from scratch, ``req_id``/``tx_id`` zero, which is the bug pyxs's check was written against (pyxs
PR #18 reports ``rq_id`` always zero).  For those we remember the request ids of outstanding
WATCH/UNWATCH requests and give a zero-id WATCH/UNWATCH reply the oldest one: the driver answers
these synchronously inside ``write()``, so their replies come back in request order.
pyxs issue #19 reports monitors over the device working with Linux 5.4 once the check is removed.
"""

from __future__ import annotations

import collections
import errno
import os
import platform
import threading
from collections.abc import Callable

from pyxs._internal import Op, Packet
from pyxs.connection import PacketConnection, UnixSocketConnection
from pyxs.exceptions import ConnectionError as PyxsConnectionError

#: ``XENSTORE_PAYLOAD_MAX`` (xen/include/public/io/xs_wire.h): the largest body a packet may carry.
XENSTORE_PAYLOAD_MAX = 4096
#: The xenbus device nodes Linux offers, in the order libxenstore tries them.
XENBUS_DEVICE_PATHS = ("/dev/xen/xenbus", "/proc/xen/xenbus")

_HEADER = Packet._struct  # struct xsd_sockmsg { uint32 type, req_id, tx_id, len; }


def default_xenbus_path() -> str:
    """The xenbus device libxenstore would use: ``/dev/xen/xenbus`` if it can be opened for
    reading, else the xenfs ``/proc/xen/xenbus`` (older dom0s mount only xenfs)."""
    if platform.system() == "NetBSD":
        return "/kern/xen/xenbus"
    if os.access(XENBUS_DEVICE_PATHS[0], os.R_OK):
        return XENBUS_DEVICE_PATHS[0]
    return XENBUS_DEVICE_PATHS[1]


_HEADER_SIZE = _HEADER.size  # 16


class _NotifyOnClose:
    """Calls ``on_close`` when the connection is closed.  pyxs's router closes its connection
    when its thread ends (xenstored went away, or a garbled packet), and nothing else would tell
    a watcher blocked in an event loop that no more events will ever come."""

    on_close: Callable[[], None] | None = None

    def close(self, silent: bool = True) -> None:
        try:
            super().close(silent)  # type: ignore[misc]
        finally:
            callback, self.on_close = self.on_close, None
            if callback is not None:
                callback()


class _FdTransport:
    """A read/write file descriptor with pyxs's transport interface (``recv`` returns exactly
    ``size`` bytes or raises; ``send`` writes everything)."""

    def __init__(self, path: str) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as e:
            raise PyxsConnectionError(f"error while opening {path!r}: {e}") from e

    def fileno(self) -> int:
        return self.fd

    def recv(self, size: int) -> bytes:
        chunks = []
        while size:
            data = os.read(self.fd, size)
            if not data:
                raise OSError(errno.ECONNRESET, "xenbus device closed")
            chunks.append(data)
            size -= len(data)
        return b"".join(chunks)

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def close(self) -> None:
        os.close(self.fd)


class XenBusDeviceConnection(_NotifyOnClose, PacketConnection):
    """xenstore through the kernel's xenbus device, usable with pyxs monitors (see module doc).

    :param path: device node; default :func:`default_xenbus_path`.
    """

    #: The largest body the driver accepts: its buffer holds header and body together.
    max_payload = XENSTORE_PAYLOAD_MAX - _HEADER_SIZE

    def __init__(self, path: str | None = None) -> None:
        self.path = path or default_xenbus_path()
        self._watch_lock = threading.Lock()
        # rq_ids of WATCH/UNWATCH requests whose reply has not arrived yet (old-kernel fix-up).
        self._pending_watch_ids: collections.deque[int] = collections.deque()

    def create_transport(self) -> _FdTransport:
        return _FdTransport(self.path)

    def send(self, packet: Packet) -> None:
        """One ``write()`` per packet, so the driver never sees a message in pieces."""
        if not self.is_connected:
            raise PyxsConnectionError("not connected")
        if packet.size > self.max_payload:
            raise PyxsConnectionError(f"payload of {packet.size} bytes exceeds the xenbus "
                                      f"device's limit ({self.max_payload})")
        data = _HEADER.pack(packet.op, packet.rq_id, packet.tx_id, packet.size) + packet.payload
        is_watch = packet.op in (Op.WATCH, Op.UNWATCH)
        if is_watch:
            with self._watch_lock:
                self._pending_watch_ids.append(packet.rq_id)
        try:
            self.transport.send(data)
        except OSError as e:
            if is_watch:
                with self._watch_lock:
                    if packet.rq_id in self._pending_watch_ids:
                        self._pending_watch_ids.remove(packet.rq_id)
            if e.errno in (errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE):
                self.close()
            raise PyxsConnectionError(f"error while writing to {self.path!r}: {e}") from e

    def recv(self) -> Packet:
        packet = super().recv()
        if packet.op not in (Op.WATCH, Op.UNWATCH, Op.ERROR):
            return packet
        with self._watch_lock:
            pending = self._pending_watch_ids
            if packet.rq_id in pending:
                pending.remove(packet.rq_id)
            elif packet.op != Op.ERROR and packet.rq_id == 0 and pending:
                # Pre-xenbus_command_reply kernels: a zeroed header; replies are in order.
                packet = Packet(packet.op, packet.payload, pending.popleft(), packet.tx_id)
        return packet


class NotifyingUnixSocketConnection(_NotifyOnClose, UnixSocketConnection):
    """pyxs's unix-socket connection (dom0's xenstored, or the simulator) plus ``on_close``."""

    #: xenstored reads the header and then up to ``XENSTORE_PAYLOAD_MAX`` bytes of body.
    max_payload = XENSTORE_PAYLOAD_MAX
