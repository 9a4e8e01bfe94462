"""The domain side of the sim: :class:`SimXen` is ``api.Xen`` for a process acting as a domain.

A backend (in dom0, or in the RM VM) builds ``SimXen(run_dir, domid)`` and gets what
``dmore_nova.xen.real`` gives on a Xen host: grant mapping (``xengnttab_map_grant_ref``),
foreign mapping (``xenforeignmemory_map``), event-channel handles (``xenevtchn_*``) with a
pollable fd each, domain info, and xenstore over the domain's xenstore socket.

Everything goes through :class:`HypercallConnection`, a blocking client of the domain's
``hypercall.sock`` (one outstanding request at a time, serialised by a lock so threads may
share it).  Event delivery does *not* share that stream: each event-channel handle has its own
``SOCK_SEQPACKET`` socket, handed over by the host, carrying one fired port per datagram, so
its readability is exactly "a port has fired" and a synchronous call can never swallow an
event.  The same socket carries the handle's notifies the other way (one local port per
datagram, no reply), as libxenevtchn notifies with an ioctl on the evtchn fd.

:class:`SimToolstack` is the dom0 toolstack (``xl``'s role): create, destroy, pause, set target.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dmore_nova.xen import api
from dmore_nova.xen.api import DomainInfo, XenError, XenUnavailable
from dmore_nova.xen.sim import hypercall as hc
from dmore_nova.xen.sim.host import hypercall_path, xenstore_path
from dmore_nova.xen.sim.hypercall import SimOp
from dmore_nova.xen.sim.memory import FrameMapping

LOG = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
"""Seconds one request may wait for the host's reply before ETIMEDOUT.  The host answers in
microseconds; seconds mean it is wedged."""

_RECV_SIZE = 65536
_ANC_SIZE = socket.CMSG_SPACE(hc.SIM_MAX_FDS * array.array("i").itemsize)


class HypercallConnection:
    """Blocking, thread-safe client of one domain's hypercall socket."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = str(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.path)
        except OSError as e:
            self._sock.close()
            raise XenUnavailable(e.errno or errno.ENOENT,
                                 f"no sim host at {self.path}: {e.strerror or e}") from e
        self._lock = threading.Lock()
        self._decoder = hc.Decoder()
        self._replies: list[hc.Reply] = []
        self._fds: list[int] = []
        self._next_id = 1
        self.closed = False
        info, _ = self.call(SimOp.hello, version=hc.SIM_PROTOCOL_VERSION)
        self.domid: int = info["domid"]
        self.host: str = info["host"]

    def call(self, op: SimOp, **args: Any) -> tuple[dict[str, Any], list[int]]:
        """One request; returns the result fields and the fds that came with the reply (the
        caller owns and must close them).  Failures raise :class:`XenError` with the host's
        errno; a dead or misbehaving host raises XenError(EPIPE / EPROTO / ETIMEDOUT)."""
        with self._lock:
            if self.closed:
                raise XenError(errno.EPIPE, "hypercall connection closed")
            req_id = self._next_id
            self._next_id = (self._next_id + 1) & 0xFFFFFFFF or 1
            data = hc.encode_request(op, req_id, **args)
            try:
                self._sock.sendall(data)
                reply, fds = self._wait(req_id)
            except TimeoutError as e:
                self._fail()
                raise XenError(errno.ETIMEDOUT, f"{op.name}: no reply from sim host") from e
            except (OSError, hc.ProtocolError) as e:
                self._fail()
                code = errno.EPROTO if isinstance(e, hc.ProtocolError) else errno.EPIPE
                raise XenError(code, f"{op.name}: sim host connection failed: {e}") from e
        if reply.op != op:
            for fd in fds:
                os.close(fd)
            raise XenError(errno.EPROTO, f"reply for {reply.op.name} to {op.name}")
        if reply.rc < 0:
            raise XenError(-reply.rc, reply.reason or os.strerror(-reply.rc))
        return reply.result, fds

    def _receive(self) -> None:
        """Read what the host sent (blocking): replies, and the fds that came with them."""
        data, anc, _flags, _ = self._sock.recvmsg(_RECV_SIZE, _ANC_SIZE)
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                self._fds.extend(fds)
        if not data:
            raise ConnectionResetError("sim host closed the connection")
        for msg in self._decoder.feed(data):
            if not isinstance(msg, hc.Reply):
                raise hc.ProtocolError("host sent a request")
            self._replies.append(msg)

    def _wait(self, req_id: int) -> tuple[hc.Reply, list[int]]:
        while not self._replies:
            self._receive()
        reply = self._replies.pop(0)
        if reply.req_id != req_id or reply.nr_fds > len(self._fds):
            raise hc.ProtocolError(f"reply {reply.req_id} ({reply.nr_fds} fds) does not match "
                                   f"request {req_id} ({len(self._fds)} fds received)")
        fds, self._fds = self._fds[:reply.nr_fds], self._fds[reply.nr_fds:]
        return reply, fds

    def _fail(self) -> None:
        self.closed = True
        self._sock.close()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def close(self) -> None:
        with self._lock:
            if not self.closed:
                self._fail()


def _one_fd(fds: list[int]) -> int:
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise XenError(errno.EPROTO, f"expected one fd, got {len(fds)}")
    return fds[0]


class SimEventChannels(api.EventChannels):
    """A ``xenevtchn_handle`` on the sim.  ``fileno()`` is readable while fired ports wait;
    each :meth:`pending` takes one of them (a datagram each)."""

    def __init__(self, conn: HypercallConnection) -> None:
        self._conn = conn
        res, fds = conn.call(SimOp.evtchn_open)
        self.handle: int = res["handle"]
        self._ports: set[int] = set()  # bound through this handle (as the driver's per-file list)
        self._sock = socket.socket(fileno=_one_fd(fds))
        self._sock.setblocking(False)
        self.closed = False

    def fileno(self) -> int:
        return self._sock.fileno()

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        res, _ = self._conn.call(SimOp.EVTCHNOP_bind_interdomain, handle=self.handle,
                                 remote_dom=domid, remote_port=remote_port)
        self._ports.add(res["local_port"])
        return res["local_port"]

    def bind_unbound_port(self, remote_domid: int) -> int:
        """``xenevtchn_bind_unbound_port``: a new port that ``remote_domid`` may bind to."""
        res, _ = self._conn.call(SimOp.EVTCHNOP_alloc_unbound, handle=self.handle,
                                 remote_dom=remote_domid)
        self._ports.add(res["port"])
        return res["port"]

    def notify(self, port: int) -> None:
        """``xenevtchn_notify``: one datagram on this handle's own socket, no reply.

        Why not a hypercall request: libxenevtchn notifies with an ioctl on the evtchn fd,
        a microsecond, and a key press pays for it; a request on the hypercall socket is a
        round trip (~45 us here) or leaves a reply to be read later.  The host executes the
        datagram as ``EVTCHNOP_send``.  If the host is so far behind that the socket is full,
        the notify falls back to the synchronous request: slower, never lost.
        """
        # Linux's evtchn driver refuses a port this file did not bind (ENOTCONN) before any
        # hypercall.
        if port not in self._ports:
            raise XenError(errno.ENOTCONN, f"port {port} is not bound by this handle")
        try:
            self._sock.send(hc.encode_delivery(port))
        except BlockingIOError:
            self._conn.call(SimOp.EVTCHNOP_send, handle=self.handle, port=port)
        except OSError as e:
            raise XenError(e.errno or errno.EPIPE, f"event channel notify: {e}") from e

    def pending(self) -> int | None:
        try:
            data = self._sock.recv(16)
        except BlockingIOError:
            return None
        except OSError as e:
            raise XenError(e.errno or errno.EPIPE, f"event channel delivery: {e}") from e
        if not data:
            # The host is gone; say so instead of leaving the fd readable for ever.
            raise XenError(errno.EPIPE, "event channel handle closed by the sim host")
        try:
            return hc.decode_delivery(data)
        except hc.ProtocolError as e:
            raise XenError(errno.EPROTO, str(e)) from e

    def unmask(self, port: int) -> None:
        self._conn.call(SimOp.EVTCHNOP_unmask, handle=self.handle, port=port)

    def unbind(self, port: int) -> None:
        self._conn.call(SimOp.EVTCHNOP_close, handle=self.handle, port=port)
        self._ports.discard(port)

    def status(self, domid: int, port: int) -> tuple[int, int, int]:
        """``EVTCHNOP_status``: ``(EVTCHNSTAT_*, remote_dom, remote_port)``."""
        res, _ = self._conn.call(SimOp.EVTCHNOP_status, dom=domid, port=port)
        return res["status"], res["remote_dom"], res["remote_port"]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if not self._conn.closed:
                self._conn.call(SimOp.evtchn_close_handle, handle=self.handle)
        except XenError:
            pass  # the host drops the handle when it sees our end close anyway
        finally:
            self._sock.close()


def _domain_info(res: dict[str, Any]) -> DomainInfo:
    return DomainInfo(domid=res["domid"], name=res["name"],
                      dying=bool(res["flags"] & hc.XEN_DOMINF_dying),
                      paused=bool(res["flags"] & hc.XEN_DOMINF_paused),
                      max_pages=res["max_pages"])


class SimXen(api.Xen):
    """``api.Xen`` for a process acting as domain ``domid`` of the sim host at ``run_dir``.

    ``xenstore`` defaults to :class:`~dmore_nova.xen.pyxs_store.PyxsXenStore` on the domain's
    xenstore socket, created on first use; pass one to share or replace it.
    """

    def __init__(self, run_dir: str | os.PathLike[str], domid: int, *,
                 xenstore: api.XenStore | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.run_dir = Path(run_dir)
        self._conn = HypercallConnection(hypercall_path(self.run_dir, domid), timeout)
        if self._conn.domid != domid:
            self._conn.close()
            raise XenError(errno.EPROTO, f"socket of dom{domid} answered as dom{self._conn.domid}")
        self._domid = domid
        self._xenstore = xenstore

    @property
    def domid(self) -> int:
        return self._domid

    @property
    def host(self) -> str:
        return self._conn.host

    @property
    def xenstore(self) -> api.XenStore:  # type: ignore[override]
        if self._xenstore is None:
            from dmore_nova.xen.pyxs_store import PyxsXenStore
            self._xenstore = PyxsXenStore(
                unix_socket_path=str(xenstore_path(self.run_dir, self._domid)))
        return self._xenstore

    @property
    def connection(self) -> HypercallConnection:
        return self._conn

    def map_grant(self, domid: int, gref: int, writable: bool = True) -> api.Mapping:
        flags = hc.GNTMAP_host_map | (0 if writable else hc.GNTMAP_readonly)
        res, fds = self._conn.call(SimOp.GNTTABOP_map_grant_ref, dom=domid, ref=gref,
                                   flags=flags)
        fd = _one_fd(fds)
        handle = res["handle"]

        def release() -> None:
            if not self._conn.closed:
                self._conn.call(SimOp.GNTTABOP_unmap_grant_ref, handle=handle)

        try:
            return FrameMapping(fd, [res["frame"]], writable, on_unmap=release)
        except BaseException:
            release()
            raise
        finally:
            os.close(fd)

    def map_foreign(self, domid: int, frames: Sequence[int], writable: bool = False
                    ) -> api.Mapping:
        frames = [int(f) for f in frames]
        if not frames:
            raise XenError(errno.EINVAL, "no frames to map")
        if any(f < 0 for f in frames):
            raise XenError(errno.EINVAL, "negative frame number")
        _, fds = self._conn.call(SimOp.privcmd_mmapbatch, dom=domid, writable=int(writable),
                                 frames=frames)
        fd = _one_fd(fds)
        release = None
        if writable and domid != self._domid:
            # The host counts writable foreign mappings (live migration's last round copies
            # their frames): tell it when this one goes, as closing a privcmd VMA tells Xen.
            def release() -> None:
                if not self._conn.closed:
                    self._conn.call(SimOp.privcmd_munmap, dom=domid, frames=frames)

        try:
            return FrameMapping(fd, frames, writable, on_unmap=release)
        except BaseException:
            if release is not None:
                release()
            raise
        finally:
            os.close(fd)

    def event_channels(self) -> SimEventChannels:
        return SimEventChannels(self._conn)

    def domain_info(self, domid: int) -> DomainInfo | None:
        try:
            res, _ = self._conn.call(SimOp.XEN_DOMCTL_getdomaininfo, domid=domid)
        except XenError as e:
            if e.errno == errno.ESRCH:
                return None
            raise
        return _domain_info(res)

    def close(self) -> None:
        if self._xenstore is not None:
            self._xenstore.close()
        self._conn.close()


class SimToolstack:
    """The toolstack of one sim host (dom0's hypercall socket): what ``xl`` does to domains."""

    def __init__(self, run_dir: str | os.PathLike[str], timeout: float = DEFAULT_TIMEOUT) -> None:
        self.run_dir = Path(run_dir)
        self._conn = HypercallConnection(hypercall_path(self.run_dir, 0), timeout)

    @property
    def host(self) -> str:
        return self._conn.host

    def create_domain(self, name: str, max_pages: int, paused: bool = False) -> int:
        res, _ = self._conn.call(SimOp.XEN_DOMCTL_createdomain, name=name, max_pages=max_pages,
                                 flags=hc.SIM_CDF_paused if paused else 0)
        return res["domid"]

    def destroy_domain(self, domid: int) -> None:
        self._conn.call(SimOp.XEN_DOMCTL_destroydomain, domid=domid)

    def pause_domain(self, domid: int) -> None:
        self._conn.call(SimOp.XEN_DOMCTL_pausedomain, domid=domid)

    def unpause_domain(self, domid: int) -> None:
        self._conn.call(SimOp.XEN_DOMCTL_unpausedomain, domid=domid)

    def set_target(self, domid: int, target: int) -> None:
        """``XEN_DOMCTL_set_target`` + ``XS_SET_TARGET``: ``domid`` gets privilege over
        ``target`` (foreign mapping, target's xenstore nodes)."""
        self._conn.call(SimOp.XEN_DOMCTL_set_target, domid=domid, target=target)

    def domain_info(self, domid: int) -> DomainInfo | None:
        try:
            res, _ = self._conn.call(SimOp.XEN_DOMCTL_getdomaininfo, domid=domid)
        except XenError as e:
            if e.errno == errno.ESRCH:
                return None
            raise
        return _domain_info(res)

    def target_of(self, domid: int) -> int | None:
        res, _ = self._conn.call(SimOp.XEN_DOMCTL_getdomaininfo, domid=domid)
        return None if res["target"] == hc.DOMID_INVALID else res["target"]

    def list_domains(self) -> list[DomainInfo]:
        res, _ = self._conn.call(SimOp.XEN_SYSCTL_getdomaininfolist)
        out = []
        for domid in res["domids"]:
            info = self.domain_info(domid)
            if info is not None:
                out.append(info)
        return out

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> SimToolstack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
