"""Event-channel state machine: Xen's port states and libxenevtchn's delivery/mask rules."""

from __future__ import annotations

import errno

import pytest

from dmore_nova.xen.api import XenError
from dmore_nova.xen.sim.evtchn import (
    ECS_INTERDOMAIN,
    ECS_UNBOUND,
    EventChannelSwitch,
    EVTCHNSTAT_closed,
    EVTCHNSTAT_interdomain,
    EVTCHNSTAT_unbound,
)

FE, BE = "frontend-handle", "backend-handle"


@pytest.fixture
def sw() -> EventChannelSwitch:
    s = EventChannelSwitch(max_ports=8)
    s.add_domain(0)
    s.add_domain(5)
    return s


def _connect(sw: EventChannelSwitch) -> tuple[int, int]:
    fe_port = sw.alloc_unbound(5, 0, FE)
    be_port, initial = sw.bind_interdomain(0, 5, fe_port, BE)
    assert initial == [(BE, be_port)]  # Xen's conservative event on the new local port
    return fe_port, be_port


def test_port_zero_is_reserved_and_ports_are_per_domain(sw):
    assert sw.alloc_unbound(5, 0, FE) == 1
    assert sw.alloc_unbound(0, 5, BE) == 1
    assert sw.alloc_unbound(5, 0, FE) == 2
    assert sw.status(5, 0) == (EVTCHNSTAT_closed, 0, 0)


def test_bind_links_both_ends(sw):
    fe_port, be_port = _connect(sw)
    assert sw.status(5, fe_port) == (EVTCHNSTAT_interdomain, 0, be_port)
    assert sw.status(0, be_port) == (EVTCHNSTAT_interdomain, 5, fe_port)
    assert sw.channel(5, fe_port).state == ECS_INTERDOMAIN


@pytest.mark.parametrize("case", ["wrong-domid", "not-unbound", "free", "out-of-range"])
def test_bind_interdomain_checks_like_xen(sw, case):
    sw.add_domain(7)
    port = sw.alloc_unbound(5, 0, FE)
    if case == "wrong-domid":
        args = (7, 5, port)            # dom7 binds a port meant for dom0
    elif case == "not-unbound":
        sw.bind_interdomain(0, 5, port, BE)
        args = (0, 5, port)            # already interdomain
    elif case == "free":
        args = (0, 5, 6)
    else:
        args = (0, 5, 10_000)
    with pytest.raises(XenError) as e:
        sw.bind_interdomain(*args, BE)
    assert e.value.errno == errno.EINVAL


def test_bind_to_unknown_domain_is_esrch(sw):
    with pytest.raises(XenError) as e:
        sw.bind_interdomain(0, 42, 1, BE)
    assert e.value.errno == errno.ESRCH


def test_notify_delivers_once_until_unmask_then_redelivers_if_pending(sw):
    fe_port, be_port = _connect(sw)
    assert sw.send(0, be_port, BE) == [(FE, fe_port)]
    # Delivered and now disabled: more notifies only set pending, nothing is delivered.
    assert sw.send(0, be_port, BE) == []
    assert sw.send(0, be_port, BE) == []
    assert sw.channel(5, fe_port).pending
    # Unmask re-delivers exactly once for the coalesced notifies.
    assert sw.unmask(5, fe_port, FE) == [(FE, fe_port)]
    assert sw.unmask(5, fe_port, FE) == []   # already disabled again by the delivery
    assert not sw.channel(5, fe_port).pending


def test_unmask_without_pending_rearms_silently(sw):
    fe_port, be_port = _connect(sw)
    assert sw.send(0, be_port, BE) == [(FE, fe_port)]
    assert sw.unmask(5, fe_port, FE) == []
    assert sw.send(0, be_port, BE) == [(FE, fe_port)]


def test_ownership_is_per_handle(sw):
    fe_port, be_port = _connect(sw)
    with pytest.raises(XenError) as e:
        sw.send(0, be_port, "someone-else")
    assert e.value.errno == errno.ENOTCONN
    with pytest.raises(XenError) as e:
        sw.close(0, be_port, "someone-else")
    assert e.value.errno == errno.ENOTCONN
    assert sw.unmask(0, be_port, "someone-else") == []   # ignored, like the driver's write()
    assert not sw.channel(0, be_port).enabled


def test_closing_one_end_makes_the_other_unbound_and_notify_a_no_op(sw):
    fe_port, be_port = _connect(sw)
    sw.close(5, fe_port, FE)
    assert sw.channel(5, fe_port) is None
    ch = sw.channel(0, be_port)
    assert (ch.state, ch.remote_domid) == (ECS_UNBOUND, 5)
    assert sw.status(0, be_port) == (EVTCHNSTAT_unbound, 5, 0)
    assert sw.send(0, be_port, BE) == []             # silently dropped, as Xen does
    # ... and the frontend can re-bind the survivor (it names dom5 now), as Xen allows.
    port, initial = sw.bind_interdomain(5, 0, be_port, FE)
    assert initial == [(FE, port)]


def test_send_on_closed_port_is_enotconn(sw):
    fe_port, be_port = _connect(sw)
    sw.close(0, be_port, BE)
    with pytest.raises(XenError) as e:
        sw.send(0, be_port, BE)
    assert e.value.errno == errno.ENOTCONN


def test_remove_domain_unbinds_peers(sw):
    fe_port, be_port = _connect(sw)
    sw.remove_domain(5)
    assert sw.channel(0, be_port).state == ECS_UNBOUND
    assert sw.send(0, be_port, BE) == []
    with pytest.raises(XenError) as e:
        sw.alloc_unbound(5, 0, FE)
    assert e.value.errno == errno.ESRCH


def test_close_owner_closes_all_its_ports(sw):
    fe_port, be_port = _connect(sw)
    other = sw.alloc_unbound(0, 5, BE)
    assert sorted(sw.close_owner(0, BE)) == sorted([be_port, other])
    assert sw.ports_in_use(0) == 0
    assert sw.channel(5, fe_port).state == ECS_UNBOUND


def test_port_limit_is_enospc(sw):
    for _ in range(7):
        sw.alloc_unbound(5, 0, FE)
    with pytest.raises(XenError) as e:
        sw.alloc_unbound(5, 0, FE)
    assert e.value.errno == errno.ENOSPC
    sw.close(5, 3, FE)
    assert sw.alloc_unbound(5, 0, FE) == 3


def test_loopback_within_one_domain(sw):
    p = sw.alloc_unbound(5, 5, FE)
    q, initial = sw.bind_interdomain(5, 5, p, BE)
    assert initial == [(BE, q)]
    assert sw.send(5, q, BE) == [(FE, p)]
