"""``api.EventChannels`` over libxenevtchn (``/dev/xen/evtchn``).

The handle's fd is made non-blocking: libxenevtchn's Linux ``xenevtchn_pending`` is a plain
``read()`` of one ``evtchn_port_t``, which would block the event loop when nothing is pending;
with ``O_NONBLOCK`` the driver answers ``EAGAIN`` and :meth:`RealEventChannels.pending` returns
None, as the API promises.  ``unmask`` is a ``write()`` to the same fd and never blocks.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from collections.abc import Sequence

from dmore_nova.xen import api
from dmore_nova.xen.real import libs

#: ``DOMID_FIRST_RESERVED`` (xen/include/public/xen.h): domids from here on are special
#: (DOMID_SELF, DOMID_IO, ...), never a guest an RM VM talks to.
DOMID_FIRST_RESERVED = 0x7FF0
#: ``evtchn_port_t`` is a uint32_t.
EVTCHN_PORT_MAX = 0xFFFFFFFF
PORT_SIZE = 4
#: Ports taken or unmasked in one system call at most: the device copies at most a page
#: (``evtchn_write`` truncates to ``PAGE_SIZE``).
PENDING_MAX = 4096 // PORT_SIZE


def check_domid(domid: int) -> int:
    """A guest domid (0 .. DOMID_FIRST_RESERVED-1), or :class:`api.XenError` EINVAL."""
    if not isinstance(domid, int) or not 0 <= domid < DOMID_FIRST_RESERVED:
        raise api.XenError(errno.EINVAL, f"domid {domid!r} is not a guest domain id")
    return domid


def check_port(port: int) -> int:
    if not isinstance(port, int) or not 0 <= port <= EVTCHN_PORT_MAX:
        raise api.XenError(errno.EINVAL, f"event channel port {port!r} out of range")
    return port


class RealEventChannels(api.EventChannels):
    """One ``xenevtchn_handle``.  Opening fails with :class:`api.XenUnavailable` when
    ``/dev/xen/evtchn`` is absent, :class:`api.XenError` for other errors."""

    def __init__(self, lib: libs.XenLibrary | None = None) -> None:
        self._lib = lib or libs.EVTCHN
        self._handle: int | None = None
        ctypes.set_errno(0)
        handle = self._lib.call("xenevtchn_open", None, 0)
        if not handle:
            raise libs.open_error("xenevtchn_open", "/dev/xen/evtchn", "xen_evtchn",
                                  ctypes.get_errno() or errno.ENOENT)
        self._handle = handle
        try:
            fd = self._lib.call("xenevtchn_fd", handle)
            if fd < 0:  # type: ignore[operator]
                raise libs.last_error("xenevtchn_fd")
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        except BaseException:
            self.close()
            raise
        self._fd: int = fd  # type: ignore[assignment]
        self._bound: set[int] = set()

    def __repr__(self) -> str:
        return f"RealEventChannels(fd={self._fd if self._handle else None}, bound={self._bound})"

    def _h(self) -> int:
        if self._handle is None:
            raise api.XenError(errno.EBADF, "event channel handle is closed")
        return self._handle

    def fileno(self) -> int:
        self._h()
        return self._fd

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        check_domid(domid)
        check_port(remote_port)
        ctypes.set_errno(0)
        port = self._lib.call("xenevtchn_bind_interdomain", self._h(), domid, remote_port)
        if port < 0:  # type: ignore[operator]
            raise libs.last_error(f"xenevtchn_bind_interdomain(dom{domid}, port {remote_port})")
        self._bound.add(port)  # type: ignore[arg-type]
        return port  # type: ignore[return-value]

    def notify(self, port: int) -> None:
        check_port(port)
        ctypes.set_errno(0)
        if self._lib.call("xenevtchn_notify", self._h(), port) < 0:  # type: ignore[operator]
            raise libs.last_error(f"xenevtchn_notify({port})")

    def pending(self) -> int | None:
        ctypes.set_errno(0)
        port = self._lib.call("xenevtchn_pending", self._h())
        if port < 0:  # type: ignore[operator]
            if ctypes.get_errno() in (errno.EAGAIN, errno.EWOULDBLOCK):
                return None
            raise libs.last_error("xenevtchn_pending")
        return port  # type: ignore[return-value]

    def unmask(self, port: int) -> None:
        check_port(port)
        ctypes.set_errno(0)
        if self._lib.call("xenevtchn_unmask", self._h(), port) < 0:  # type: ignore[operator]
            raise libs.last_error(f"xenevtchn_unmask({port})")

    def pending_ports(self, limit: int = 64) -> list[int]:
        """Up to ``limit`` fired ports in one ``read()`` of the handle's fd.

        libxenevtchn's Linux ``xenevtchn_pending`` is ``read(fd, &port, sizeof(port))``; the
        device (drivers/xen/evtchn.c ``evtchn_read``) hands out as many queued
        ``evtchn_port_t`` as the read asks for, so one system call takes them all.  A
        ring overflow (``EFBIG``) and other errors are raised as libxenevtchn's would be."""
        if not 0 < limit <= PENDING_MAX:
            raise ValueError(f"limit {limit} outside 1..{PENDING_MAX}")
        try:
            data = os.read(self.fileno(), limit * PORT_SIZE)
        except BlockingIOError:
            return []
        except OSError as e:
            raise api.XenError(e.errno or errno.EIO, f"xenevtchn_pending: {e.strerror}") from e
        if len(data) % PORT_SIZE:
            raise api.XenError(errno.EPROTO, f"event channel device returned {len(data)} bytes,"
                                             f" not a whole number of ports")
        return list(struct.unpack(f"={len(data) // PORT_SIZE}I", data))

    def unmask_ports(self, ports: Sequence[int]) -> None:
        """Unmask ``ports`` in one ``write()``: ``evtchn_write`` unmasks each
        ``evtchn_port_t`` of the buffer that this handle bound (libxenevtchn's
        ``xenevtchn_unmask`` writes one)."""
        if not ports:
            return
        for port in ports:
            check_port(port)
        if len(ports) > PENDING_MAX:
            raise ValueError(f"{len(ports)} ports: more than {PENDING_MAX} in one write")
        data = struct.pack(f"={len(ports)}I", *ports)
        try:
            n = os.write(self.fileno(), data)
        except OSError as e:
            raise api.XenError(e.errno or errno.EIO, f"xenevtchn_unmask: {e.strerror}") from e
        if n != len(data):
            raise api.XenError(errno.EIO, f"xenevtchn_unmask: wrote {n} of {len(data)} bytes")

    def unbind(self, port: int) -> None:
        check_port(port)
        ctypes.set_errno(0)
        if self._lib.call("xenevtchn_unbind", self._h(), port) < 0:  # type: ignore[operator]
            raise libs.last_error(f"xenevtchn_unbind({port})")
        self._bound.discard(port)

    def close(self) -> None:
        """Close the handle (idempotent); the driver unbinds every port still bound to it."""
        handle, self._handle = self._handle, None
        if handle is not None:
            self._lib.call("xenevtchn_close", handle)
            self._bound.clear()
