"""Event channels for a whole sim host: a sans-IO state machine (no sockets, no loop).

It models two layers at once, because a process using the sim sees both of them:

* **Xen** (``xen/common/event_channel.c``): per-domain port spaces, port 0 reserved,
  ``ECS_FREE`` / ``ECS_UNBOUND`` (waiting for one named remote domain) / ``ECS_INTERDOMAIN``;
  ``bind_interdomain`` needs the remote port unbound *and* naming the binder's domid (else
  EINVAL), and conservatively sets the new local port pending ("we may have lost
  notifications on the remote unbound port"); ``send`` on an unbound port is silently dropped,
  on a free port it is EINVAL; closing one end of an interdomain channel puts the other end
  back to ``ECS_UNBOUND`` naming the closer, so the survivor's notifies become no-ops.
* **Linux's evtchn driver as libxenevtchn sees it** (``drivers/xen/evtchn.c``): ports belong to
  the handle (``/dev/xen/evtchn`` open file) that bound them; a fired port is delivered once
  and then stays disabled until the owner unmasks it; a notify that arrives while disabled is
  remembered (the Xen pending bit) and re-delivered at unmask.  ``notify``/``unbind`` on a port
  the handle does not own fail with ENOTCONN; ``unmask`` of such a port is ignored.

Every mutating call returns the deliveries it caused as ``(owner, port)`` pairs; the host
writes each one to the owner's delivery socket.  Owners are opaque hashable handle ids.
"""

from __future__ import annotations

import errno
from collections.abc import Hashable
from dataclasses import dataclass

from dmore_nova.xen.api import XenError

EVTCHN_MAX_PORTS = 1024
"""Ports per domain (port 0 is reserved, so 1023 usable).  Xen's 2-level ABI allows 4096 on
64-bit; a sim domain that needs more than a thousand channels is a bug worth hearing about."""

ECS_FREE = 0
ECS_RESERVED = 1
ECS_UNBOUND = 2
ECS_INTERDOMAIN = 3

# EVTCHNSTAT_* (xen/include/public/event_channel.h), what EVTCHNOP_status reports.
EVTCHNSTAT_closed = 0
EVTCHNSTAT_unbound = 1
EVTCHNSTAT_interdomain = 2

Owner = Hashable
Delivery = tuple[Owner, int]


def _err(code: int, msg: str) -> XenError:
    return XenError(code, msg)


@dataclass
class Channel:
    port: int
    state: int = ECS_FREE
    remote_domid: int = 0   # ECS_UNBOUND: who may bind; ECS_INTERDOMAIN: the peer
    remote_port: int = 0    # ECS_INTERDOMAIN only
    owner: Owner | None = None
    pending: bool = False   # Xen's pending bit, while the driver has the port disabled
    enabled: bool = True    # Linux driver: False from delivery until the owner unmasks


class _PortSpace:
    def __init__(self, domid: int, max_ports: int) -> None:
        self.domid = domid
        self.max_ports = max_ports
        self.chans: dict[int, Channel] = {0: Channel(0, ECS_RESERVED)}

    def get(self, port: int) -> Channel | None:
        if not 0 <= port < self.max_ports:
            return None
        return self.chans.get(port)

    def alloc(self) -> Channel:
        for port in range(1, self.max_ports):
            if port not in self.chans:
                ch = Channel(port)
                self.chans[port] = ch
                return ch
        raise _err(errno.ENOSPC, f"dom{self.domid}: all {self.max_ports - 1} ports in use")

    def free(self, port: int) -> None:
        self.chans.pop(port, None)


class EventChannelSwitch:
    """All domains' event channels on one host."""

    def __init__(self, max_ports: int = EVTCHN_MAX_PORTS) -> None:
        if max_ports < 2:
            raise ValueError("max_ports must leave at least one usable port")
        self.max_ports = max_ports
        self._doms: dict[int, _PortSpace] = {}

    # -- domains ---------------------------------------------------------------------------------

    def add_domain(self, domid: int) -> None:
        if domid in self._doms:
            raise ValueError(f"dom{domid} already has a port space")
        self._doms[domid] = _PortSpace(domid, self.max_ports)

    def remove_domain(self, domid: int) -> None:
        """Domain destruction (``evtchn_destroy``): close every port; peers become unbound."""
        space = self._doms.get(domid)
        if space is None:
            return
        for port in sorted(space.chans):
            ch = space.chans.get(port)
            if ch is not None and ch.state in (ECS_UNBOUND, ECS_INTERDOMAIN):
                self._close(space, ch)
        del self._doms[domid]

    def _space(self, domid: int) -> _PortSpace:
        space = self._doms.get(domid)
        if space is None:
            raise _err(errno.ESRCH, f"no domain {domid}")
        return space

    # -- operations ------------------------------------------------------------------------------

    def alloc_unbound(self, domid: int, remote_domid: int, owner: Owner) -> int:
        """``EVTCHNOP_alloc_unbound`` bound to ``owner`` (``xenevtchn_bind_unbound_port``)."""
        space = self._space(domid)
        ch = space.alloc()
        ch.state = ECS_UNBOUND
        ch.remote_domid = remote_domid
        ch.owner = owner
        return ch.port

    def bind_interdomain(self, domid: int, remote_domid: int, remote_port: int,
                         owner: Owner) -> tuple[int, list[Delivery]]:
        """``EVTCHNOP_bind_interdomain``: returns the new local port and the conservative
        initial event Xen raises on it."""
        local = self._space(domid)
        remote = self._doms.get(remote_domid)
        if remote is None:
            raise _err(errno.ESRCH, f"no domain {remote_domid}")
        rch = remote.get(remote_port)
        if rch is None or rch.state != ECS_UNBOUND or rch.remote_domid != domid:
            raise _err(errno.EINVAL, f"dom{remote_domid} port {remote_port} is not unbound "
                                     f"for dom{domid}")
        lch = local.alloc()
        lch.state = ECS_INTERDOMAIN
        lch.remote_domid, lch.remote_port = remote_domid, remote_port
        lch.owner = owner
        rch.state = ECS_INTERDOMAIN
        rch.remote_domid, rch.remote_port = domid, lch.port
        return lch.port, self._set_pending(lch)

    def send(self, domid: int, port: int, owner: Owner) -> list[Delivery]:
        """``xenevtchn_notify`` / ``EVTCHNOP_send``."""
        ch = self._owned(domid, port, owner)
        if ch.state == ECS_INTERDOMAIN:
            peer = self._doms[ch.remote_domid].chans[ch.remote_port]
            return self._set_pending(peer)
        # ECS_UNBOUND (never bound, or the peer closed): Xen drops it silently.
        return []

    def unmask(self, domid: int, port: int, owner: Owner) -> list[Delivery]:
        """``xenevtchn_unmask``: re-enable; re-deliver if it fired while disabled.  Ports not
        owned by ``owner`` are ignored, as the driver's write() ignores them."""
        space = self._doms.get(domid)
        ch = space.get(port) if space else None
        if ch is None or ch.owner != owner or ch.enabled:
            return []
        ch.enabled = True
        if ch.pending:
            ch.pending = False
            return self._deliver(ch)
        return []

    def close(self, domid: int, port: int, owner: Owner) -> None:
        """``xenevtchn_unbind`` / ``EVTCHNOP_close``."""
        ch = self._owned(domid, port, owner)
        self._close(self._doms[domid], ch)

    def close_owner(self, domid: int, owner: Owner) -> list[int]:
        """``xenevtchn_close`` (or the process died): unbind all of the handle's ports."""
        space = self._doms.get(domid)
        if space is None:
            return []
        ports = [p for p, ch in space.chans.items() if ch.owner == owner]
        for p in ports:
            self._close(space, space.chans[p])
        return ports

    def status(self, domid: int, port: int) -> tuple[int, int, int]:
        """``EVTCHNOP_status`` as ``(EVTCHNSTAT_*, remote_dom, remote_port)``."""
        space = self._space(domid)
        if not 0 <= port < space.max_ports:
            raise _err(errno.EINVAL, f"port {port} out of range")
        ch = space.chans.get(port)
        if ch is None or ch.state in (ECS_FREE, ECS_RESERVED):
            return (EVTCHNSTAT_closed, 0, 0)
        if ch.state == ECS_UNBOUND:
            return (EVTCHNSTAT_unbound, ch.remote_domid, 0)
        return (EVTCHNSTAT_interdomain, ch.remote_domid, ch.remote_port)

    def channel(self, domid: int, port: int) -> Channel | None:
        """Read-only peek for tests and diagnostics."""
        space = self._doms.get(domid)
        return space.get(port) if space else None

    def ports_in_use(self, domid: int) -> int:
        space = self._doms.get(domid)
        return 0 if space is None else len(space.chans) - 1

    # -- internals -------------------------------------------------------------------------------

    def _owned(self, domid: int, port: int, owner: Owner) -> Channel:
        space = self._space(domid)
        ch = space.get(port)
        if ch is None or ch.state in (ECS_FREE, ECS_RESERVED) or ch.owner != owner:
            raise _err(errno.ENOTCONN, f"port {port} is not bound by this handle")
        return ch

    def _close(self, space: _PortSpace, ch: Channel) -> None:
        if ch.state == ECS_INTERDOMAIN:
            peer_space = self._doms.get(ch.remote_domid)
            peer = peer_space.chans.get(ch.remote_port) if peer_space else None
            if peer is not None and peer.state == ECS_INTERDOMAIN:
                peer.state = ECS_UNBOUND
                peer.remote_domid = space.domid
                peer.remote_port = 0
        space.free(ch.port)

    def _set_pending(self, ch: Channel) -> list[Delivery]:
        if ch.owner is None:
            ch.pending = True
            return []
        if not ch.enabled:
            ch.pending = True
            return []
        return self._deliver(ch)

    @staticmethod
    def _deliver(ch: Channel) -> list[Delivery]:
        ch.enabled = False
        ch.pending = False
        return [(ch.owner, ch.port)]
