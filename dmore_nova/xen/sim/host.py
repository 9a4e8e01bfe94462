"""The sim hypervisor: one process per simulated Xen host, one asyncio loop.

It runs the xenstored (:mod:`.xenstored`), the per-domain hypercall sockets (:mod:`.hypercall`)
and the domain registry with each domain's memory (:mod:`.memory`) and event channels
(:mod:`.evtchn`).  Run dir layout (``<run_dir>``, one per host)::

    host.json               name, pid, shm dir, protocol version: written once ready
    host.log                this process's log (when started by the supervisor)
    dom<N>/hypercall.sock   act as domain N: EVTCHNOP_*, GNTTABOP_*, foreign map, domctls
    dom<N>/xenstore.sock    act as domain N towards xenstored (dom0's is the daemon socket)

A process *is* domain N because it connected to ``dom<N>/``'s sockets, as a process inside a
domU is that domU because of the ``/dev/xen/*`` it opens.  Dom0 always exists and is the
toolstack; only it may use the ``XEN_DOMCTL_*`` operations.

Creating a domain writes what libxl's ``libxl__domain_make`` writes (``/local/domain/<N>`` owned
by dom0 and readable by N, N-owned ``data``/``drivers``/``feature``/``attr``/``error``/
``control/shutdown``, ``/vm/<uuid>``) and introduces it to xenstored; destroying it closes its
event channels (peers become unbound), drops its connections and grant pins, removes its
xenstore dirs, releases it (``@releaseDomain``) and keeps it *dying* while other domains still
hold grant mappings of its pages, as Xen keeps a zombie domain until the last page reference
goes.

Untrusted input: a malformed message closes that one connection with a logged reason; every
failing operation is an error reply carrying ``-errno``; the limits are the ``SIM_MAX_*`` and
``*_MAX_*`` constants below and in the sibling modules.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import collections
import contextlib
import errno
import json
import logging
import os
import resource
import shutil
import signal
import socket
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmore_nova.xen.api import XenError
from dmore_nova.xen.sim import hypercall as hc
from dmore_nova.xen.sim.evtchn import EVTCHN_MAX_PORTS, EventChannelSwitch
from dmore_nova.xen.sim.hypercall import SimOp
from dmore_nova.xen.sim.memory import (
    SIM_MAX_DOMAIN_PAGES,
    DomainMemory,
    GNTST_bad_domain,
    GNTST_bad_handle,
    GNTST_no_space,
    GrantError,
)
from dmore_nova.xen.sim.xenstore import DOMID_FIRST_RESERVED, Xenstore, XsError
from dmore_nova.xen.sim.xenstored import XenstoreServer

LOG = logging.getLogger(__name__)

SIM_MAX_DOMAINS = 256
"""Domains alive (or dying) at once on one host, dom0 included."""
SIM_MAX_CONNECTIONS = 512
"""Hypercall connections at once over all domains."""
SIM_MAX_EVTCHN_HANDLES = 64
"""Event-channel handles per connection (open ``/dev/xen/evtchn`` files per process)."""
SIM_MAX_EVTCHN_HANDLES_TOTAL = 2048
"""Event-channel handles over the whole host (each costs the host one fd)."""
ACCEPT_RETRY_DELAY = 0.5
SIM_MAX_MAPTRACK = 4096
"""Grant mappings one (mapper) domain may hold at once (Xen's maptrack table)."""
SIM_MAX_FOREIGN_WRITABLE_MAPS = 4096
"""Writable foreign mappings one connection may hold at once (each is remembered until
``privcmd_munmap`` or the connection's end)."""
SIM_MAX_QUEUED_REQUESTS = 1024
"""Decoded requests a connection may have waiting (behind a domain creation, or a blocked
reply); a client pipelining past this is dropped."""
RECV_SIZE = 4096
"""Bytes read per readiness event: at most 341 requests (12-byte header + 0..4 bytes), well
inside SIM_MAX_QUEUED_REQUESTS."""
SIM_MAX_NAME = 64
ASYNC_OPS = frozenset({SimOp.XEN_DOMCTL_createdomain, SimOp.XEN_DOMCTL_destroydomain})
"""Operations whose handlers wait (sockets to open or close); all others answer at once."""
DEFAULT_DOM0_PAGES = 1024

RUN_INFO = "host.json"
HYPERCALL_SOCK = "hypercall.sock"
XENSTORE_SOCK = "xenstore.sock"
UNIX_PATH_MAX = 107


def domain_dir(run_dir: Path, domid: int) -> Path:
    return run_dir / f"dom{domid}"


def hypercall_path(run_dir: Path, domid: int) -> Path:
    return domain_dir(run_dir, domid) / HYPERCALL_SOCK


def xenstore_path(run_dir: Path, domid: int) -> Path:
    return domain_dir(run_dir, domid) / XENSTORE_SOCK


def _xerr(code: int, msg: str) -> XenError:
    return XenError(code, msg)


# -- per-domain and per-connection state -----------------------------------------------------------

@dataclass(eq=False)
class Domain:
    domid: int
    name: str
    uuid: str
    memory: DomainMemory
    paused: bool = False
    dying: bool = False
    target: int | None = None       # XEN_DOMCTL_set_target: this domain is privileged over it
    connections: set[HcConnection] = field(default_factory=set)
    listener: socket.socket | None = None
    maptrack: int = 0               # grant mappings this domain holds of others' pages
    # Log-dirty (XEN_DOMCTL_shadow_op), for live migration: frames other domains wrote through
    # mappings the host handed out, while logging is on (None: off).  The guest's own writes
    # are logged by its kernel, which the host cannot trap.
    log_dirty: set[int] | None = None
    # Frames other domains map writable through privcmd_mmapbatch right now (frame -> live
    # mappings; released by privcmd_munmap or the mapper's connection closing, as Xen drops
    # the page references when the privcmd VMA goes): the final log-dirty round includes them.
    foreign_writable: collections.Counter[int] = field(default_factory=collections.Counter)

    @property
    def max_pages(self) -> int:
        return self.memory.nr_pages

    def dominf_flags(self) -> int:
        return (hc.XEN_DOMINF_dying if self.dying else 0) | \
            (hc.XEN_DOMINF_paused if self.paused else 0)


@dataclass(eq=False)
class GrantMap:
    granter: int
    ref: int
    readonly: bool


#: Notifies read from one evtchn socket before the loop serves others.
_NOTIFY_BATCH = 64


class EvtchnHandle:
    """One ``xenevtchn_open`` of one connection: the host end of its delivery socket."""

    def __init__(self, host: SimHost, conn: HcConnection, hid: int, sock: socket.socket) -> None:
        self.host = host
        self.conn = conn
        self.hid = hid
        self.sock = sock
        self.backlog: collections.deque[int] = collections.deque()
        self.closed = False
        self._writer = False
        host.loop.add_reader(sock.fileno(), self._on_readable)

    def __repr__(self) -> str:
        return f"<evtchn handle {self.hid} of {self.conn!r}>"

    def deliver(self, port: int) -> None:
        if self.closed:
            return
        if not self.backlog:
            try:
                self.sock.send(hc.encode_delivery(port))
                return
            except BlockingIOError:
                pass
            except OSError as e:
                self.host.close_evtchn_handle(self, f"delivery failed: {e}")
                return
        # At most one entry per port (a delivered port stays disabled until unmasked), so
        # the backlog is bounded by the domain's port limit.
        self.backlog.append(port)
        if not self._writer:
            self.host.loop.add_writer(self.sock.fileno(), self._flush)
            self._writer = True

    def _flush(self) -> None:
        while self.backlog:
            try:
                self.sock.send(hc.encode_delivery(self.backlog[0]))
            except BlockingIOError:
                return
            except OSError as e:
                self.host.close_evtchn_handle(self, f"delivery failed: {e}")
                return
            self.backlog.popleft()
        self.host.loop.remove_writer(self.sock.fileno())
        self._writer = False

    def _on_readable(self) -> None:
        """The client's notifies (``xenevtchn_notify``), one local port per datagram.

        Why on this socket and not as a hypercall request: libxenevtchn notifies with an ioctl
        on the evtchn fd that needs no answer, and a key press pays for this send; a request
        on the hypercall socket has a reply that someone must read.  A datagram of any other
        size is junk and closes the handle; end of stream means the client closed its end.
        """
        for _ in range(_NOTIFY_BATCH):  # bounded: other connections get their turn
            if self.closed:
                return
            try:
                data = self.sock.recv(16)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if len(data) != hc.EVTCHN_DELIVERY.size:
                reason = "client closed its end"
                if data:
                    reason = f"client wrote a {len(data)}-byte datagram to its evtchn socket"
                    LOG.warning("closing %r: %s", self, reason)
                self.host.close_evtchn_handle(self, reason)
                return
            port = hc.decode_delivery(data)
            try:
                self.host.notify(self, port)
            except XenError as e:
                # As the driver's ioctl would fail; the client checked the port is its own,
                # so this is a race with a close, which Xen resolves the same way (dropped).
                LOG.debug("%r notify of port %d: %s", self, port, e)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self.host.loop.remove_reader(self.sock.fileno())
        if self._writer:
            with contextlib.suppress(Exception):
                self.host.loop.remove_writer(self.sock.fileno())
        self.sock.close()


class HcConnection:
    """One process's hypercall connection, acting as ``dom``."""

    _seq = 0

    def __init__(self, host: SimHost, dom: Domain, sock: socket.socket) -> None:
        HcConnection._seq += 1
        self.cid = HcConnection._seq
        self.host = host
        self.dom = dom
        self.sock = sock
        self.decoder = hc.Decoder()
        self.requests: collections.deque[hc.Request] = collections.deque()
        self.out: collections.deque[tuple[bytes, list[int]]] = collections.deque()
        self.evtchn_handles: dict[int, EvtchnHandle] = {}
        self.grant_maps: dict[int, GrantMap] = {}
        self.foreign_maps: list[tuple[int, tuple[int, ...]]] = []  # writable (domid, frames)
        self.closed = False
        self._next_handle = 1
        self._next_map = 1
        self._writer = False
        self._worker: asyncio.Task[None] | None = None
        host.loop.add_reader(sock.fileno(), self._on_readable)

    def __repr__(self) -> str:
        return f"<hypercall conn #{self.cid} dom{self.dom.domid}>"

    @property
    def domid(self) -> int:
        return self.dom.domid

    def new_handle_id(self) -> int:
        hid = self._next_handle
        self._next_handle += 1
        return hid

    def new_map_id(self) -> int:
        mid = self._next_map
        self._next_map += 1
        return mid

    # -- input -----------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        if self.closed:
            return
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as e:
            self.host.close_connection(self, f"recv failed: {e}")
            return
        if not data:
            if self.decoder.buffered:
                LOG.info("%r went away mid-message (%d bytes)", self, self.decoder.buffered)
            self.host.close_connection(self, "peer closed")
            return
        try:
            messages = self.decoder.feed(data)
        except hc.ProtocolError as e:
            LOG.warning("dropping %r: protocol error: %s", self, e)
            self.host.close_connection(self, f"protocol error: {e}")
            return
        for msg in messages:
            if not isinstance(msg, hc.Request):
                LOG.warning("dropping %r: sent a reply", self)
                self.host.close_connection(self, "protocol error: client sent a reply")
                return
            if len(self.requests) >= SIM_MAX_QUEUED_REQUESTS:
                LOG.warning("dropping %r: more than %d queued requests", self,
                            SIM_MAX_QUEUED_REQUESTS)
                self.host.close_connection(self, "request flood")
                return
            self.requests.append(msg)
        self._run()

    def _run(self) -> None:
        """Answer queued requests in order: synchronous ones right here (the common case: an
        event-channel notify must not pay for a task switch), and from the first one that
        has to wait (domain creation, destruction) on in a task, which keeps the order.
        While a reply cannot be sent (the client does not read), nothing more is processed
        or read: see :meth:`_flush`."""
        while self.requests and self._worker is None and not self.closed and not self._writer:
            req = self.requests[0]
            if req.op in ASYNC_OPS:
                self._worker = self.host.loop.create_task(self._work())
                return
            self.requests.popleft()
            self.send(*self.host.dispatch(self, req))

    async def _work(self) -> None:
        try:
            while self.requests and not self.closed:
                req = self.requests.popleft()
                if req.op in ASYNC_OPS:
                    data, fds = await self.host.dispatch_async(self, req)
                else:
                    data, fds = self.host.dispatch(self, req)
                self.send(data, fds)
                if self._writer:
                    break           # output blocked: _flush resumes with _run
        finally:
            self._worker = None

    # -- output ----------------------------------------------------------------------------------

    def send(self, data: bytes, fds: list[int]) -> None:
        """Queue one reply; ``fds`` are dup'ed so they stay valid until actually sent."""
        if self.closed:
            return
        self.out.append((data, [os.dup(fd) for fd in fds]))
        if not self._writer:
            self._flush()

    def _flush(self) -> None:
        while self.out and not self.closed:
            data, fds = self.out[0]
            try:
                if fds:
                    n = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                    array.array("i", fds))])
                else:
                    n = self.sock.send(data)
            except BlockingIOError:
                n = 0
            except OSError as e:
                self.host.close_connection(self, f"send failed: {e}")
                return
            if n:
                for fd in fds:
                    os.close(fd)
                data = data[n:]
                if data:
                    self.out[0] = (data, [])
                else:
                    self.out.popleft()
                    continue
            if not self._writer:
                # Backpressure: a client that does not read its replies is neither read from
                # nor served until it does, so it can make us hold one blocked reply and at
                # most one recv's worth of decoded requests.
                self.host.loop.remove_reader(self.sock.fileno())
                self.host.loop.add_writer(self.sock.fileno(), self._flush)
                self._writer = True
            return
        if self._writer and not self.closed:
            self.host.loop.remove_writer(self.sock.fileno())
            self.host.loop.add_reader(self.sock.fileno(), self._on_readable)
            self._writer = False
            self._run()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self.host.loop.remove_reader(self.sock.fileno())
        if self._writer:
            with contextlib.suppress(Exception):
                self.host.loop.remove_writer(self.sock.fileno())
        for _, fds in self.out:
            for fd in fds:
                os.close(fd)
        self.out.clear()
        self.requests.clear()
        self.sock.close()


# -- the host --------------------------------------------------------------------------------------

Handler = Callable[[HcConnection, dict[str, Any]], Any]


class SimHost:
    """A simulated Xen host.  All methods run on :attr:`loop`."""

    def __init__(self, name: str, run_dir: Path, shm_dir: Path, *,
                 dom0_pages: int = DEFAULT_DOM0_PAGES,
                 max_ports: int = EVTCHN_MAX_PORTS) -> None:
        self.name = name
        self.run_dir = Path(run_dir)
        self.shm_dir = Path(shm_dir)
        self.dom0_pages = dom0_pages
        self.domains: dict[int, Domain] = {}
        self.evtchn = EventChannelSwitch(max_ports)
        self.xenstored: XenstoreServer | None = None
        self.connections: set[HcConnection] = set()
        self.nr_evtchn_handles = 0
        self._next_domid = 1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handlers: dict[SimOp, Handler] = {
            SimOp.hello: self._op_hello,
            SimOp.evtchn_open: self._op_evtchn_open,
            SimOp.evtchn_close_handle: self._op_evtchn_close_handle,
            SimOp.EVTCHNOP_alloc_unbound: self._op_alloc_unbound,
            SimOp.EVTCHNOP_bind_interdomain: self._op_bind_interdomain,
            SimOp.EVTCHNOP_send: self._op_send,
            SimOp.EVTCHNOP_unmask: self._op_unmask,
            SimOp.EVTCHNOP_close: self._op_evtchn_close,
            SimOp.EVTCHNOP_status: self._op_evtchn_status,
            SimOp.GNTTABOP_setup_table: self._op_setup_table,
            SimOp.GNTTABOP_map_grant_ref: self._op_map_grant_ref,
            SimOp.GNTTABOP_unmap_grant_ref: self._op_unmap_grant_ref,
            SimOp.gnttab_end_foreign_access: self._op_end_foreign_access,
            SimOp.memory_map_own: self._op_memory_map_own,
            SimOp.privcmd_mmapbatch: self._op_mmapbatch,
            SimOp.privcmd_munmap: self._op_munmap,
            SimOp.XEN_DOMCTL_createdomain: self._op_createdomain,
            SimOp.XEN_DOMCTL_destroydomain: self._op_destroydomain,
            SimOp.XEN_DOMCTL_pausedomain: self._op_pausedomain,
            SimOp.XEN_DOMCTL_unpausedomain: self._op_unpausedomain,
            SimOp.XEN_DOMCTL_set_target: self._op_set_target,
            SimOp.XEN_DOMCTL_getdomaininfo: self._op_getdomaininfo,
            SimOp.XEN_SYSCTL_getdomaininfolist: self._op_getdomaininfolist,
            SimOp.XEN_DOMCTL_shadow_op: self._op_shadow_op,
        }

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "host not started"
        return self._loop

    @property
    def store(self) -> Xenstore:
        assert self.xenstored is not None
        return self.xenstored.store

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        longest = hypercall_path(self.run_dir, DOMID_FIRST_RESERVED - 1)
        if len(str(longest)) > UNIX_PATH_MAX:
            raise XenError(errno.ENAMETOOLONG,
                           f"run dir {self.run_dir} too long for unix socket paths")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.shm_dir.mkdir(parents=True, exist_ok=True)
        self.xenstored = XenstoreServer(Xenstore(domain_exists=self._domain_exists))
        dom0 = self._new_domain(0, "Domain-0", self.dom0_pages,
                                "00000000-0000-0000-0000-000000000000")
        domain_dir(self.run_dir, 0).mkdir(exist_ok=True)
        self._write_dom0_skeleton()
        await self.xenstored.serve(str(xenstore_path(self.run_dir, 0)))
        self._listen(dom0)
        info = {"name": self.name, "pid": os.getpid(), "shm_dir": str(self.shm_dir),
                "run_dir": str(self.run_dir), "protocol": hc.SIM_PROTOCOL_VERSION}
        tmp = self.run_dir / (RUN_INFO + ".tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(self.run_dir / RUN_INFO)
        LOG.info("sim host %s ready in %s (memory in %s)", self.name, self.run_dir, self.shm_dir)

    async def stop(self) -> None:
        for domid in sorted(self.domains, reverse=True):
            dom = self.domains.get(domid)
            if dom is not None and domid != 0:
                with contextlib.suppress(Exception):
                    await self.destroy_domain(domid)
        for conn in list(self.connections):
            self.close_connection(conn, "host stopping")
        for dom in list(self.domains.values()):
            self._stop_listening(dom)
            dom.memory.close(unlink=True)
        self.domains.clear()
        if self.xenstored is not None:
            await self.xenstored.close()
        with contextlib.suppress(FileNotFoundError):
            (self.run_dir / RUN_INFO).unlink()
        # The run dir itself stays: it holds host.log for whoever wants to know what happened.
        for d in self.run_dir.glob("dom*"):
            shutil.rmtree(d, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.shm_dir.rmdir()
        LOG.info("sim host %s stopped", self.name)

    def _domain_exists(self, domid: int) -> bool:
        dom = self.domains.get(domid)
        return dom is not None and not dom.dying

    # -- domains ---------------------------------------------------------------------------------

    def _new_domain(self, domid: int, name: str, max_pages: int, uuid: str) -> Domain:
        memory = DomainMemory(self.shm_dir, domid, max_pages)
        dom = Domain(domid, name, uuid, memory)
        self.domains[domid] = dom
        self.evtchn.add_domain(domid)
        return dom

    def _alloc_domid(self) -> int:
        for _ in range(DOMID_FIRST_RESERVED):
            domid = self._next_domid
            self._next_domid = domid + 1 if domid + 1 < DOMID_FIRST_RESERVED else 1
            if domid not in self.domains:
                return domid
        raise _xerr(errno.ENOSPC, "no free domid")

    async def create_domain(self, name: str, max_pages: int, paused: bool = False) -> int:
        """``xl create`` in short: domctl createdomain, memory, xenstore skeleton,
        introduce, sockets."""
        if not name or len(name) > SIM_MAX_NAME or not name.isprintable() or "/" in name:
            raise _xerr(errno.EINVAL, f"bad domain name {name!r}")
        if any(d.name == name and not d.dying for d in self.domains.values()):
            raise _xerr(errno.EEXIST, f"domain with name {name!r} already exists")
        if not 1 <= max_pages <= SIM_MAX_DOMAIN_PAGES:
            raise _xerr(errno.EINVAL, f"max_pages {max_pages} not in 1..{SIM_MAX_DOMAIN_PAGES}")
        if len(self.domains) >= SIM_MAX_DOMAINS:
            raise _xerr(errno.ENOSPC, f"{SIM_MAX_DOMAINS} domains already")
        domid = self._alloc_domid()
        dom = self._new_domain(domid, name, max_pages, str(uuidlib.uuid4()))
        dom.paused = paused
        try:
            self._write_domain_skeleton(dom)
            self.xenstored.introduce_domain(domid)
            domain_dir(self.run_dir, domid).mkdir(exist_ok=True)
            await self.xenstored.serve_domain_socket(domid, str(xenstore_path(self.run_dir,
                                                                              domid)))
            self._listen(dom)
        except BaseException:
            LOG.exception("creating dom%d failed; tearing it down", domid)
            await self.destroy_domain(domid)
            raise
        LOG.info("created dom%d %r (%d pages%s)", domid, name, max_pages,
                 ", paused" if paused else "")
        return domid

    async def destroy_domain(self, domid: int) -> None:
        dom = self.domains.get(domid)
        if dom is None:
            raise _xerr(errno.ESRCH, f"no domain {domid}")
        if domid == 0:
            raise _xerr(errno.EINVAL, "dom0 cannot be destroyed")
        if dom.dying:
            return
        dom.dying = True
        self.evtchn.remove_domain(domid)
        self._stop_listening(dom)
        for conn in list(dom.connections):
            self.close_connection(conn, f"domain {domid} destroyed")
        store = self.store
        with contextlib.suppress(XsError):
            store.dom0.rm(f"/local/domain/{domid}")
        with contextlib.suppress(XsError):
            store.dom0.rm(f"/vm/{dom.uuid}")
        with contextlib.suppress(XsError, ValueError):
            await self.xenstored.stop_socket(str(xenstore_path(self.run_dir, domid)))
        with contextlib.suppress(XsError):
            self.xenstored.release_domain(domid)
        for other in self.domains.values():
            if other.target == domid:
                other.target = None
        shutil.rmtree(domain_dir(self.run_dir, domid), ignore_errors=True)
        LOG.info("destroyed dom%d %r", domid, dom.name)
        self._maybe_reap(dom)

    def _maybe_reap(self, dom: Domain) -> None:
        """A dying domain goes once nobody holds a grant mapping of its pages."""
        if dom.dying and dom.memory.grant_table.nr_active == 0:
            self.domains.pop(dom.domid, None)
            dom.memory.close(unlink=True)
            LOG.info("dom%d reaped", dom.domid)

    def set_target(self, domid: int, target: int) -> None:
        dom, tgt = self._live(domid), self._live(target)
        if dom is tgt or dom.target is not None:
            raise _xerr(errno.EINVAL, f"dom{domid} already has a target or targets itself")
        dom.target = tgt.domid
        if domid != 0:
            self.xenstored.set_target(domid, target)
        LOG.info("dom%d now has target dom%d", domid, target)

    def _live(self, domid: int) -> Domain:
        dom = self.domains.get(domid)
        if dom is None or dom.dying:
            raise _xerr(errno.ESRCH, f"no domain {domid}")
        return dom

    def privileged_over(self, caller: Domain, domid: int) -> bool:
        """XSM_TARGET: the caller is dom0, the domain itself, or has it as target."""
        return caller.domid == 0 or caller.domid == domid or caller.target == domid

    # -- xenstore skeleton ----------------------------------------------------------------------

    def _write_dom0_skeleton(self) -> None:
        c = self.store.dom0
        tx = c.transaction_start()
        c.write("/local/domain/0/name", "Domain-0", tx_id=tx)
        c.write("/local/domain/0/domid", "0", tx_id=tx)
        c.set_perms("/local/domain/0", ["n0"], tx_id=tx)
        c.transaction_end(tx)

    def _write_domain_skeleton(self, dom: Domain) -> None:
        """What ``libxl__domain_make`` (+ build_post's memory keys) writes."""
        c, n = self.store.dom0, dom.domid
        dom_path, vm_path = f"/local/domain/{n}", f"/vm/{dom.uuid}"
        roperm, rwperm = ["n0", f"r{n}"], [f"n{n}"]
        tx = c.transaction_start()
        for path in (dom_path, vm_path):
            with contextlib.suppress(XsError):  # leftovers of an earlier domain, usually none
                c.rm(path, tx_id=tx)
            c.mkdir(path, tx_id=tx)
            c.set_perms(path, roperm, tx_id=tx)
        c.write(f"{vm_path}/uuid", dom.uuid, tx_id=tx)
        c.write(f"{vm_path}/name", dom.name, tx_id=tx)
        c.write(f"{dom_path}/vm", vm_path, tx_id=tx)
        c.write(f"{dom_path}/name", dom.name, tx_id=tx)
        c.write(f"{dom_path}/domid", str(n), tx_id=tx)
        kib = str(dom.max_pages * 4)
        c.write(f"{dom_path}/memory/static-max", kib, tx_id=tx)
        c.write(f"{dom_path}/memory/target", kib, tx_id=tx)
        for sub in ("device", "control"):
            c.mkdir(f"{dom_path}/{sub}", tx_id=tx)
            c.set_perms(f"{dom_path}/{sub}", roperm, tx_id=tx)
        for sub in ("control/shutdown", "data", "drivers", "feature", "attr", "error"):
            c.mkdir(f"{dom_path}/{sub}", tx_id=tx)
            c.set_perms(f"{dom_path}/{sub}", rwperm, tx_id=tx)
        c.transaction_end(tx)

    # -- sockets ---------------------------------------------------------------------------------

    def _listen(self, dom: Domain) -> None:
        path = hypercall_path(self.run_dir, dom.domid)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(64)
        sock.setblocking(False)
        dom.listener = sock
        self.loop.add_reader(sock.fileno(), self._accept, dom)

    def _stop_listening(self, dom: Domain) -> None:
        if dom.listener is None:
            return
        with contextlib.suppress(Exception):
            self.loop.remove_reader(dom.listener.fileno())
        dom.listener.close()
        dom.listener = None
        with contextlib.suppress(FileNotFoundError):
            hypercall_path(self.run_dir, dom.domid).unlink()

    def _accept(self, dom: Domain) -> None:
        if dom.listener is None:
            return
        try:
            sock, _ = dom.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            # EMFILE and friends: the pending connection stays queued and the listener stays
            # readable, so stop watching it for a moment instead of spinning.
            LOG.warning("accept on dom%d failed: %s; pausing accepts for %.1fs", dom.domid, e,
                        ACCEPT_RETRY_DELAY)
            listener = dom.listener
            self.loop.remove_reader(listener.fileno())

            def resume() -> None:
                if dom.listener is listener:
                    self.loop.add_reader(listener.fileno(), self._accept, dom)

            self.loop.call_later(ACCEPT_RETRY_DELAY, resume)
            return
        if len(self.connections) >= SIM_MAX_CONNECTIONS or dom.dying:
            LOG.warning("refusing hypercall connection for dom%d (%s)", dom.domid,
                        "dying" if dom.dying else f"{SIM_MAX_CONNECTIONS} connections")
            sock.close()
            return
        sock.setblocking(False)
        conn = HcConnection(self, dom, sock)
        self.connections.add(conn)
        dom.connections.add(conn)
        LOG.debug("%r connected", conn)

    def close_connection(self, conn: HcConnection, reason: str) -> None:
        """The process's handles and mappings die with its connection (process exit)."""
        if conn.closed:
            return
        LOG.debug("closing %r: %s", conn, reason)
        for h in list(conn.evtchn_handles.values()):
            self.close_evtchn_handle(h, reason)
        for mid in list(conn.grant_maps):
            with contextlib.suppress(XenError):
                self._unmap(conn, mid)
        for domid, frames in conn.foreign_maps:
            self._release_foreign(domid, frames)
        conn.foreign_maps.clear()
        conn.close()
        self.connections.discard(conn)
        conn.dom.connections.discard(conn)

    def close_evtchn_handle(self, h: EvtchnHandle, reason: str) -> None:
        if h.closed:
            return
        LOG.debug("closing %r: %s", h, reason)
        self.evtchn.close_owner(h.conn.domid, h)
        h.close()
        h.conn.evtchn_handles.pop(h.hid, None)
        self.nr_evtchn_handles -= 1

    # -- dispatch --------------------------------------------------------------------------------

    def dispatch(self, conn: HcConnection, req: hc.Request) -> tuple[bytes, list[int]]:
        """Run one synchronous request; always exactly one reply (error replies included)."""
        try:
            return self._ok(req, self._handlers[req.op](conn, req.args))
        except Exception as e:
            return self._failed(conn, req, e)

    async def dispatch_async(self, conn: HcConnection, req: hc.Request
                             ) -> tuple[bytes, list[int]]:
        """Run one of :data:`ASYNC_OPS`."""
        try:
            return self._ok(req, await self._handlers[req.op](conn, req.args))
        except Exception as e:
            return self._failed(conn, req, e)

    @staticmethod
    def _ok(req: hc.Request, out: Any) -> tuple[bytes, list[int]]:
        result, fds = out if out is not None else ({}, [])
        return hc.encode_reply(req.op, req.req_id, 0, **result), fds

    @staticmethod
    def _failed(conn: HcConnection, req: hc.Request, e: Exception) -> tuple[bytes, list[int]]:
        if isinstance(e, XenError):
            code = e.errno if isinstance(e.errno, int) and e.errno > 0 else errno.EIO
            LOG.debug("%r %s -> %s", conn, req.op.name, e)
            return hc.encode_reply(req.op, req.req_id, -code, reason=e.strerror or str(e)), []
        # A bug in the host: answer, log, keep serving.
        LOG.error("%r %s failed", conn, req.op.name, exc_info=e)
        return hc.encode_reply(req.op, req.req_id, -errno.EIO, reason=f"host error: {e}"), []

    def _need_dom0(self, conn: HcConnection, what: str) -> None:
        if conn.domid != 0:
            raise _xerr(errno.EPERM, f"{what}: dom{conn.domid} is not privileged")

    def _handle(self, conn: HcConnection, hid: int) -> EvtchnHandle:
        h = conn.evtchn_handles.get(hid)
        if h is None:
            raise _xerr(errno.EBADF, f"no event channel handle {hid}")
        return h

    def _deliver(self, deliveries: list[tuple[Any, int]]) -> None:
        for owner, port in deliveries:
            owner.deliver(port)

    # hello / memory
    def _op_hello(self, conn: HcConnection, a: dict[str, Any]):
        if a["version"] != hc.SIM_PROTOCOL_VERSION:
            raise _xerr(errno.EPROTO, f"protocol {a['version']} != {hc.SIM_PROTOCOL_VERSION}")
        return {"version": hc.SIM_PROTOCOL_VERSION, "domid": conn.domid, "host": self.name}, []

    def _op_memory_map_own(self, conn: HcConnection, a: dict[str, Any]):
        return {"nr_pages": conn.dom.max_pages}, [conn.dom.memory.mem_fd]

    def _op_setup_table(self, conn: HcConnection, a: dict[str, Any]):
        return {"nr_frames": conn.dom.memory.nr_grant_frames}, [conn.dom.memory.gnttab_fd]

    # event channels
    def _op_evtchn_open(self, conn: HcConnection, a: dict[str, Any]):
        if len(conn.evtchn_handles) >= SIM_MAX_EVTCHN_HANDLES:
            raise _xerr(errno.EMFILE, f"{SIM_MAX_EVTCHN_HANDLES} handles already open")
        if self.nr_evtchn_handles >= SIM_MAX_EVTCHN_HANDLES_TOTAL:
            raise _xerr(errno.ENFILE, f"{SIM_MAX_EVTCHN_HANDLES_TOTAL} handles open on host")
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as e:
            raise _xerr(e.errno or errno.ENFILE, f"no delivery socket: {e}") from e
        ours.setblocking(False)
        hid = conn.new_handle_id()
        conn.evtchn_handles[hid] = EvtchnHandle(self, conn, hid, ours)
        self.nr_evtchn_handles += 1
        # The reply path dups the fd when it queues the reply, right after this returns;
        # our copy of the client's end goes after that.
        self.loop.call_soon(theirs.close)
        return {"handle": hid}, [theirs.fileno()]

    def _op_evtchn_close_handle(self, conn: HcConnection, a: dict[str, Any]):
        self.close_evtchn_handle(self._handle(conn, a["handle"]), "closed by client")

    def _op_alloc_unbound(self, conn: HcConnection, a: dict[str, Any]):
        h = self._handle(conn, a["handle"])
        remote = conn.domid if a["remote_dom"] == hc.DOMID_SELF else a["remote_dom"]
        if remote >= DOMID_FIRST_RESERVED:
            raise _xerr(errno.EINVAL, f"bad remote domid {remote}")
        return {"port": self.evtchn.alloc_unbound(conn.domid, remote, h)}, []

    def _op_bind_interdomain(self, conn: HcConnection, a: dict[str, Any]):
        h = self._handle(conn, a["handle"])
        remote = conn.domid if a["remote_dom"] == hc.DOMID_SELF else a["remote_dom"]
        port, deliveries = self.evtchn.bind_interdomain(conn.domid, remote, a["remote_port"], h)
        # Reply first (queued below by the caller), then the conservative event: queue it
        # after the reply so the client learns its port before seeing it fire.
        self.loop.call_soon(self._deliver, deliveries)
        return {"local_port": port}, []

    def _op_send(self, conn: HcConnection, a: dict[str, Any]):
        self.notify(self._handle(conn, a["handle"]), a["port"])

    def notify(self, h: EvtchnHandle, port: int) -> None:
        """``EVTCHNOP_send`` on ``port`` bound through handle ``h``."""
        self._deliver(self.evtchn.send(h.conn.domid, port, h))

    def _op_unmask(self, conn: HcConnection, a: dict[str, Any]):
        self._deliver(self.evtchn.unmask(conn.domid, a["port"], self._handle(conn, a["handle"])))

    def _op_evtchn_close(self, conn: HcConnection, a: dict[str, Any]):
        self.evtchn.close(conn.domid, a["port"], self._handle(conn, a["handle"]))

    def _op_evtchn_status(self, conn: HcConnection, a: dict[str, Any]):
        if not self.privileged_over(conn.dom, a["dom"]):
            raise _xerr(errno.EPERM, f"dom{conn.domid} may not inspect dom{a['dom']}")
        status, rdom, rport = self.evtchn.status(a["dom"], a["port"])
        return {"status": status, "remote_dom": rdom, "remote_port": rport}, []

    # grants
    def _op_map_grant_ref(self, conn: HcConnection, a: dict[str, Any]):
        if conn.dom.maptrack >= SIM_MAX_MAPTRACK:
            raise GrantError(GNTST_no_space,
                             f"dom{conn.domid} holds {SIM_MAX_MAPTRACK} grant mappings")
        granter = self.domains.get(a["dom"])
        if granter is None or granter.dying:
            raise GrantError(GNTST_bad_domain, f"could not find domain {a['dom']}")
        readonly = bool(a["flags"] & hc.GNTMAP_readonly)
        frame = granter.memory.grant_table.map(conn.domid, a["ref"], readonly)
        if not readonly and granter.log_dirty is not None:
            granter.log_dirty.add(frame)
        mid = conn.new_map_id()
        conn.grant_maps[mid] = GrantMap(granter.domid, a["ref"], readonly)
        conn.dom.maptrack += 1
        return {"handle": mid, "frame": frame}, [granter.memory.fd_for(not readonly)]

    def _unmap(self, conn: HcConnection, mid: int) -> None:
        gm = conn.grant_maps.pop(mid, None)
        if gm is None:
            raise GrantError(GNTST_bad_handle, f"bad handle {mid:#x}")
        conn.dom.maptrack -= 1
        granter = self.domains.get(gm.granter)
        if granter is None:
            return
        act = granter.memory.grant_table.active(gm.ref)
        if act is not None and not gm.readonly and granter.log_dirty is not None:
            granter.log_dirty.add(act.frame)  # Xen's gnttab_mark_dirty at unmap
        granter.memory.grant_table.unmap(gm.ref, gm.readonly)
        self._maybe_reap(granter)

    def _op_unmap_grant_ref(self, conn: HcConnection, a: dict[str, Any]):
        self._unmap(conn, a["handle"])

    def _op_end_foreign_access(self, conn: HcConnection, a: dict[str, Any]):
        return {"ended": int(conn.dom.memory.grant_table.end_foreign_access(a["ref"]))}, []

    def _op_mmapbatch(self, conn: HcConnection, a: dict[str, Any]):
        domid, frames = a["dom"], a["frames"]
        target = self.domains.get(domid)
        if target is None or target.dying:
            raise _xerr(errno.ESRCH, f"no domain {domid}")
        if not self.privileged_over(conn.dom, domid):
            raise _xerr(errno.EPERM, f"dom{conn.domid} has no privilege over dom{domid}")
        if not frames:
            raise _xerr(errno.EINVAL, "no frames")
        bad = [f for f in frames if f >= target.max_pages]
        if bad:
            raise _xerr(errno.EINVAL, f"dom{domid} has no frame {bad[0]:#x} "
                                      f"({target.max_pages} pages)")
        if a["writable"] and conn.domid != domid:
            if len(conn.foreign_maps) >= SIM_MAX_FOREIGN_WRITABLE_MAPS:
                raise _xerr(errno.ENOMEM, f"{SIM_MAX_FOREIGN_WRITABLE_MAPS} writable foreign "
                                          "mappings held already")
            conn.foreign_maps.append((domid, tuple(frames)))
            target.foreign_writable.update(frames)  # keys bounded by max_pages
            if target.log_dirty is not None:
                target.log_dirty.update(frames)
        return {}, [target.memory.fd_for(bool(a["writable"]))]

    def _op_munmap(self, conn: HcConnection, a: dict[str, Any]):
        """The end of one writable foreign mapping (``privcmd_mmapbatch`` with the same domain
        and frames).  Read-only mappings are not tracked, so need no unmap."""
        key = (a["dom"], tuple(a["frames"]))
        try:
            conn.foreign_maps.remove(key)
        except ValueError:
            raise _xerr(errno.EINVAL, f"no writable mapping of those {len(key[1])} frames of "
                                      f"dom{key[0]}") from None
        self._release_foreign(*key)

    def _release_foreign(self, domid: int, frames: tuple[int, ...]) -> None:
        target = self.domains.get(domid)
        if target is None:
            return
        fw = target.foreign_writable
        for f in frames:
            left = fw[f] - 1
            if left > 0:
                fw[f] = left
            else:
                fw.pop(f, None)
        if target.log_dirty is not None:
            target.log_dirty.update(frames)  # written through it until now: dirty at unmap

    # toolstack
    async def _op_createdomain(self, conn: HcConnection, a: dict[str, Any]):
        self._need_dom0(conn, "createdomain")
        domid = await self.create_domain(a["name"], a["max_pages"],
                                         bool(a["flags"] & hc.SIM_CDF_paused))
        return {"domid": domid}, []

    async def _op_destroydomain(self, conn: HcConnection, a: dict[str, Any]):
        self._need_dom0(conn, "destroydomain")
        await self.destroy_domain(a["domid"])

    def _op_pausedomain(self, conn: HcConnection, a: dict[str, Any]):
        self._need_dom0(conn, "pausedomain")
        self._live(a["domid"]).paused = True

    def _op_unpausedomain(self, conn: HcConnection, a: dict[str, Any]):
        self._need_dom0(conn, "unpausedomain")
        self._live(a["domid"]).paused = False

    def _op_set_target(self, conn: HcConnection, a: dict[str, Any]):
        self._need_dom0(conn, "set_target")
        self.set_target(a["domid"], a["target"])

    def _op_getdomaininfo(self, conn: HcConnection, a: dict[str, Any]):
        dom = self.domains.get(a["domid"])
        if dom is None:
            raise _xerr(errno.ESRCH, f"no domain {a['domid']}")
        if not self.privileged_over(conn.dom, dom.domid):
            raise _xerr(errno.EPERM, f"dom{conn.domid} may not inspect dom{dom.domid}")
        return {"domid": dom.domid, "name": dom.name, "flags": dom.dominf_flags(),
                "max_pages": dom.max_pages,
                "target": dom.target if dom.target is not None else hc.DOMID_INVALID}, []

    def _op_getdomaininfolist(self, conn: HcConnection, a: dict[str, Any]):
        self._need_dom0(conn, "getdomaininfolist")
        return {"domids": sorted(self.domains)}, []

    def _op_shadow_op(self, conn: HcConnection, a: dict[str, Any]):
        """``XEN_DOMCTL_shadow_op``, log-dirty only (see :class:`Domain`).  CLEAN/PEEK page
        through the dirty set by ``start``; CLEAN forgets what it returned.  With
        ``XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL`` the frames other domains map writable right now
        (grants and foreign mappings) are included, as Xen adds the pages the hypervisor maps
        writable in the last round."""
        self._need_dom0(conn, "shadow_op")
        dom = self._live(a["domid"])
        op, mode = a["shadow_op"], a["mode"]
        if op == hc.XEN_DOMCTL_SHADOW_OP_ENABLE:
            if mode != hc.XEN_DOMCTL_SHADOW_ENABLE_LOG_DIRTY:
                raise _xerr(errno.EOPNOTSUPP, f"shadow mode {mode:#x}: only log-dirty")
            if dom.log_dirty is not None:
                raise _xerr(errno.EINVAL, f"dom{dom.domid}: log-dirty already enabled")
            dom.log_dirty = set()
            LOG.info("dom%d: log-dirty on", dom.domid)
            return {"frames": [], "next": 0, "dirty_count": 0}, []
        if op == hc.XEN_DOMCTL_SHADOW_OP_OFF:
            dom.log_dirty = None
            return {"frames": [], "next": 0, "dirty_count": 0}, []
        if op not in (hc.XEN_DOMCTL_SHADOW_OP_CLEAN, hc.XEN_DOMCTL_SHADOW_OP_PEEK):
            raise _xerr(errno.EINVAL, f"shadow op {op} not supported")
        if dom.log_dirty is None:
            raise _xerr(errno.EINVAL, f"dom{dom.domid}: log-dirty not enabled")
        dirty = set(dom.log_dirty)
        if mode & hc.XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL:
            dirty |= dom.memory.grant_table.write_pinned_frames() | set(dom.foreign_writable)
        todo = sorted(f for f in dirty if f >= a["start"])
        frames = todo[:hc.SIM_MAX_ARRAY]
        nxt = frames[-1] + 1 if len(todo) > len(frames) else 0
        if op == hc.XEN_DOMCTL_SHADOW_OP_CLEAN:
            dom.log_dirty.difference_update(frames)
        return {"frames": frames, "next": nxt, "dirty_count": len(dirty)}, []


# -- process entry point ---------------------------------------------------------------------------

def _raise_fd_limit() -> None:
    """Connections, delivery sockets and in-flight fds all cost the host descriptors: take
    what the hard limit allows (the SIM_MAX_* limits above are sized for a few thousand)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


async def _amain(args: argparse.Namespace) -> int:
    _raise_fd_limit()
    host = SimHost(args.name, Path(args.run_dir), Path(args.shm_dir), dom0_pages=args.dom0_pages)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await host.start()
    except Exception:
        LOG.exception("sim host %s failed to start", args.name)
        await host.stop()
        return 1
    await stop.wait()
    await host.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m dmore_nova.xen.sim.host --name H --run-dir D --shm-dir S``: one sim host in
    the foreground until SIGTERM/SIGINT (the supervisor starts it this way)."""
    p = argparse.ArgumentParser(description="dmore-nova simulated Xen host")
    p.add_argument("--name", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--shm-dir", required=True)
    p.add_argument("--dom0-pages", type=int, default=DEFAULT_DOM0_PAGES)
    p.add_argument("--log-level", default=os.environ.get("DMORE_SIM_LOG", "INFO"))
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _batch_scheduling()
    return asyncio.run(_amain(args))


def _batch_scheduling() -> None:
    """Run the host as SCHED_BATCH: it must not preempt the domain that just called it.

    Why: a hypercall is a write on a unix socket, which wakes us with a *sync* wake-up; Linux
    then likes to run us on the caller's CPU right away, so an event-channel notify (one write
    of a few bytes, ~1 us) cost the caller ~35 us of our processing.  A real hypervisor does not
    steal the calling vCPU for that long.  SCHED_BATCH keeps our wake-ups from preempting."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError) as exc:  # not Linux, or not allowed: only slower
        logging.getLogger(__name__).info("SCHED_BATCH not available: %s", exc)


if __name__ == "__main__":
    raise SystemExit(main())
