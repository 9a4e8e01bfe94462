"""Live migration between two sim hosts (``xl migrate`` style): the sim guest moves with its
memory, gets a new domid, re-attaches on the destination and its frontends resume the Linux way;
the source is released.  Pre-copy rounds over a busy guest, the host's log-dirty operation,
rollback at every phase, a hostile guest dirty log."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from dmore_nova.rm_vm.agent import RMAgent
from dmore_nova.xen.api import XenError
from dmore_nova.xen.io import keymap
from dmore_nova.xen.sim import devices
from dmore_nova.xen.sim import hypercall as hc
from dmore_nova.xen.sim.migration import (
    LiveMigration,
    MigrationError,
    Phase,
    log_dirty_clean,
    log_dirty_disable,
    log_dirty_enable,
    migrate,
)
from tests.integration.manual_frontend import ManualKbd
from tests.integration.migration_rig import (
    GuestRunner,
    Hosts,
    create_guest,
    domain_memory,
    wait,
)
from tests.integration.rawclient import RawClient
from tests.integration.rfb_harness import LoopThread

KC = keymap.LINUX_KEYCODES
PAGES = 2048


@pytest.fixture
def hosts():
    h = Hosts()
    yield h
    h.close()


class Backend:
    """An RM agent as dom0 of one host, serving one guest, on its own loop."""

    def __init__(self, host, guest: int) -> None:
        self.xen = host.xen(0)
        self.lt = LoopThread()
        self.agent = RMAgent(self.xen, guest)
        self.port = self.lt.run(self.agent.start("127.0.0.1", 0))

    def close(self) -> None:
        self.lt.run(self.agent.stop())
        self.lt.stop()
        self.xen.close()


def domains(host) -> dict[int, object]:
    with host.toolstack() as ts:
        return {d.domid: d for d in ts.list_domains()}


def test_migrate_sim_guest(hosts):
    """Memory identical at the switchover, new domid, devices re-created for it, frontends
    resumed against a backend on the destination (keys in, pixels out), source released."""
    a, b = hosts.a, hosts.b
    domid = create_guest(a, pages=PAGES)
    with b.toolstack() as ts:
        ts.create_domain("already-there", 16)  # so the new domid differs from the old one
    guest = GuestRunner(a.run_dir, domid, scribble=True)
    backend = Backend(a, domid)
    try:
        wait(guest.connected, what="guest connected on a")
        guest.draw(0, 0, 64, 32, 0x00336699)
        before = guest.status()
        watch0 = a.xen(0)
        watch0.xenstore.watch("@releaseDomain", "rel")
        wait(lambda: watch0.xenstore.read_watch_events() != [], what="initial watch event")

        compared = []

        def check_memory(phase: Phase) -> None:
            if phase is Phase.DEVICES:  # after stop-and-copy, before the guest resumes
                src = domain_memory(a, domid, PAGES)
                dst = domain_memory(b, mig.new_domid, PAGES)
                compared.append(src == dst)

        with LiveMigration(a, b, domid, guest, fault=check_memory) as mig:
            report = mig.run()
        assert compared == [True]
        assert report.new_domid == mig.new_domid and report.nr_pages == PAGES
        assert report.rounds[0].pages == PAGES and report.final is not None
        assert report.downtime is not None and 0 < report.downtime < report.total
        assert set(report.phases) == {p.value for p in Phase}
        assert {(d.kind, d.devid, d.backend_domid) for d in report.devices} == {
            ("vkbd", 0, 0), ("vfb", 0, 0)}

        # Source: the domain is gone from xenstore and released (a zombie for as long as the
        # source backend still maps its pages: Xen keeps a dying domain until the last
        # reference goes; this backend lets go when it sees the frontend dir vanish).
        assert watch0.xenstore.read(f"/local/domain/{domid}/name") is None
        wait(lambda: any(p == "@releaseDomain" for p, _ in watch0.xenstore.read_watch_events()),
             what="@releaseDomain")
        assert domid not in domains(a) or domains(a)[domid].dying
        assert devices.find_device(watch0.xenstore, "vkbd", domid) is None
        assert watch0.xenstore.directory("/libxl") == []
        assert watch0.xenstore.directory("/local/domain/0/backend/vkbd") == []
        backend.close()
        backend = None
        wait(lambda: domid not in domains(a), what="source reaped")
        watch0.close()

        # Destination: new domain running, devices for the new domid served by dom0 there.
        new = report.new_domid
        info = domains(b)[new]
        assert not info.paused and not info.dying and info.max_pages == PAGES
        assert guest.domid == new != domid and guest.run_dir == b.run_dir
        xb = b.xen(0)
        assert devices.find_device(xb.xenstore, "vfb", new).backend == \
            f"/local/domain/0/backend/vfb/{new}/0"
        xb.close()

        # The frontends resumed as Linux's do: new grant/port/frames, Initialised, and they
        # connect to a backend on the destination.
        after = guest.status()
        assert after["vkbd"]["resumes"] == 1 and after["vfb"]["resumes"] == 1
        assert after["vkbd"]["state"] == "Initialised"
        assert after["vfb"]["page_frame"] != before["vfb"]["page_frame"]
        backend = Backend(b, new)
        wait(guest.connected, what="guest connected on b")
        c = RawClient("127.0.0.1", backend.port)
        fb = c.full_frame()
        np.testing.assert_array_equal(fb & 0xFFFFFF, guest.pixels() & 0xFFFFFF)
        assert (fb[0:32, 0:64] & 0xFFFFFF == 0x336699).all()
        c.key(ord("m"), True)
        c.key(ord("m"), False)
        wait(lambda: guest.keys()[-2:] == [(KC["KEY_M"], True), (KC["KEY_M"], False)],
             what="key on b")
        c.close()
    finally:
        if backend is not None:
            backend.close()
        guest.close()


class BusyGuest:
    """The scribbling guest, made deterministic: before each dirty-log read it has written
    at least twice since the last one (a busy guest always has), so no round comes back empty
    just because a round was quicker than the scribbler's period."""

    def __init__(self, inner: GuestRunner) -> None:
        self.inner = inner
        self.seen = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def take_dirty_log(self):
        if not self.inner.suspended:
            wait(lambda: self.inner.scribbles >= self.seen + 2, what="scribbles")
            self.seen = self.inner.scribbles
        return self.inner.take_dirty_log()


def test_precopy_rounds_follow_the_dirty_log(hosts):
    """A busy guest: every round after round 0 sends only what was dirtied, and memory is
    identical once the source is paused."""
    a, b = hosts.a, hosts.b
    domid = create_guest(a, pages=PAGES)
    inner = GuestRunner(a.run_dir, domid, scribble=True)
    guest = BusyGuest(inner)
    try:
        wait(lambda: inner.scribbles > 10, what="scribbling")
        same = []

        def check(phase: Phase) -> None:
            if phase is Phase.DEVICES:
                same.append(domain_memory(a, domid, PAGES) == domain_memory(b, mig.new_domid,
                                                                             PAGES))

        with LiveMigration(a, b, domid, guest, max_iterations=3, dirty_threshold=0,
                           fault=check) as mig:
            report = mig.run()
        assert same == [True]
        assert [r.index for r in report.rounds] == [0, 1, 2, 3]
        for r in report.rounds[1:]:
            assert 0 < r.pages < PAGES  # the scribbler's pages, not everything
        assert report.final.pages >= 1
        assert report.pages_sent == sum(r.pages for r in report.rounds) + report.final.pages
        scribbled = inner.scribbles
        wait(lambda: inner.scribbles > scribbled, what="guest runs on b")
    finally:
        inner.close()


@pytest.mark.parametrize("phase", [Phase.PREPARE, Phase.PRECOPY, Phase.STOP_AND_COPY,
                                   Phase.DEVICES, Phase.RESUME])
def test_rollback_leaves_guest_running_on_source(hosts, phase):
    a, b = hosts.a, hosts.b
    domid = create_guest(a, pages=PAGES)
    guest = GuestRunner(a.run_dir, domid)
    backend = Backend(a, domid)
    try:
        wait(guest.connected, what="connected")
        before = domains(b)

        def fault(p: Phase) -> None:
            if p is phase:
                raise RuntimeError(f"injected in {p.value}")

        with pytest.raises(MigrationError) as ei:
            migrate(a, b, domid, guest, fault=fault)
        assert ei.value.phase is phase and not ei.value.committed
        assert "injected" in str(ei.value)
        # Destination: nothing left (domain, device dirs, toolstack record).
        assert set(domains(b)) == set(before)
        xb = b.xen(0)
        assert xb.xenstore.directory("/libxl") == []
        assert xb.xenstore.directory("/local/domain/0/backend") == []
        xb.close()
        # Source: running, unpaused, devices untouched; input still reaches the guest.
        info = domains(a)[domid]
        assert not info.paused and not info.dying
        assert not guest.suspended and guest.domid == domid
        assert guest.cancelled == (1 if phase in (Phase.DEVICES, Phase.RESUME) else 0)
        c = RawClient("127.0.0.1", backend.port)
        c.full_frame()
        c.key(ord("r"), True)
        c.key(ord("r"), False)
        wait(lambda: guest.keys()[-2:] == [(KC["KEY_R"], True), (KC["KEY_R"], False)],
             what="key after rollback")
        c.close()
        # And the migration can be done again.
        report = migrate(a, b, domid, guest)
        assert guest.domid == report.new_domid
    finally:
        backend.close()
        guest.close()


class SuspendThenFail:
    """A guest that suspends fine but whose dirty log fails once suspended: the failure hits
    in the middle of stop-and-copy, with the source paused."""

    def __init__(self, inner: GuestRunner) -> None:
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def take_dirty_log(self):
        if self.inner.suspended:
            raise XenError(errno.EIO, "guest died while suspended")
        return self.inner.take_dirty_log()


def test_failure_mid_stop_and_copy_resumes_source(hosts):
    a, b = hosts.a, hosts.b
    domid = create_guest(a, pages=PAGES)
    inner = GuestRunner(a.run_dir, domid, scribble=True)
    try:
        with pytest.raises(MigrationError) as ei:
            migrate(a, b, domid, SuspendThenFail(inner))
        assert ei.value.phase is Phase.STOP_AND_COPY and not ei.value.committed
        assert not domains(a)[domid].paused
        assert inner.cancelled == 1 and not inner.suspended
        assert list(domains(b)) == [0]
        n = inner.scribbles
        wait(lambda: inner.scribbles > n, what="guest runs again")
    finally:
        inner.close()


class JunkDirtyLog:
    def __init__(self, inner: GuestRunner) -> None:
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def take_dirty_log(self):
        return [*self.inner.take_dirty_log(), -1, PAGES, 1 << 62, "7", True]


def test_hostile_dirty_log_is_ignored_and_counted(hosts):
    a, b = hosts.a, hosts.b
    domid = create_guest(a, pages=PAGES)
    inner = GuestRunner(a.run_dir, domid)
    try:
        report = migrate(a, b, domid, JunkDirtyLog(inner))
        assert report.bad_dirty_frames >= 5
        assert inner.domid == report.new_domid
    finally:
        inner.close()


def test_failure_after_commit_leaves_source_paused(hosts):
    a, b = hosts.a, hosts.b
    domid = create_guest(a, pages=PAGES)
    guest = GuestRunner(a.run_dir, domid)
    try:
        def fault(p: Phase) -> None:
            if p is Phase.RELEASE:
                raise RuntimeError("injected in release")

        with pytest.raises(MigrationError) as ei:
            migrate(a, b, domid, guest, fault=fault)
        assert ei.value.committed and ei.value.phase is Phase.RELEASE
        info = domains(a)[domid]
        assert info.paused and not info.dying  # xl leaves it for the admin
        assert guest.run_dir == b.run_dir
    finally:
        guest.close()


# -- the host's log-dirty operation -------------------------------------------------------------

def test_log_dirty_sees_other_domains_writable_mappings(hosts):
    a = hosts.a
    with a.toolstack() as ts:
        g = ts.create_domain("g", 8192)
    k = a.kernel(g)
    xen0 = a.xen(0)
    try:
        with pytest.raises(XenError) as ei:
            log_dirty_clean(xen0, g)
        assert ei.value.errno == errno.EINVAL  # not enabled
        log_dirty_enable(xen0, g)
        with pytest.raises(XenError):
            log_dirty_enable(xen0, g)
        assert log_dirty_clean(xen0, g) == set()
        # A writable grant mapping marks its frame at map and at unmap; read-only does not.
        kbd = ManualKbd(k, 0)
        ro_frame = k.alloc_page()
        ro = k.grant_foreign_access(0, ro_frame, readonly=True)
        m = xen0.map_grant(g, kbd.gref)
        r = xen0.map_grant(g, ro, writable=False)
        assert log_dirty_clean(xen0, g) == {kbd.frame}
        assert log_dirty_clean(xen0, g) == set()            # CLEAN forgot it
        assert log_dirty_clean(xen0, g, final=True) == {kbd.frame}  # still mapped writable
        m.unmap()
        r.unmap()
        assert log_dirty_clean(xen0, g) == {kbd.frame}
        assert log_dirty_clean(xen0, g, final=True) == set()
        # Writable foreign mappings: logged at map and at unmap, and in the final round while
        # they are mapped (privcmd_munmap / the mapper's exit ends them).  More than one
        # reply's worth: paged.
        frames = list(range(100, 100 + 5000))
        maps = [xen0.map_foreign(g, frames[i:i + 4096], writable=True)
                for i in range(0, len(frames), 4096)]
        xen0.map_foreign(g, [7], writable=False).unmap()
        assert log_dirty_clean(xen0, g) == set(frames)
        assert log_dirty_clean(xen0, g) == set()
        assert log_dirty_clean(xen0, g, final=True) == set(frames)  # still mapped writable
        for m in maps:
            m.unmap()
        assert log_dirty_clean(xen0, g) == set(frames)
        assert log_dirty_clean(xen0, g, final=True) == set()
        other = a.xen(0)  # a mapper that exits without unmapping: its mappings end with it
        other.map_foreign(g, [3, 4], writable=True)
        assert log_dirty_clean(xen0, g, final=True) == {3, 4}
        other.close()
        wait(lambda: log_dirty_clean(xen0, g, final=True) == set(), what="released on exit")
        with pytest.raises(XenError) as ei:
            xen0.connection.call(hc.SimOp.privcmd_munmap, dom=g, frames=[3, 4])
        assert ei.value.errno == errno.EINVAL  # no such mapping
        log_dirty_disable(xen0, g)
        with pytest.raises(XenError):
            log_dirty_clean(xen0, g)
    finally:
        k.close()
        xen0.close()


def test_log_dirty_is_dom0_only(hosts):
    a = hosts.a
    with a.toolstack() as ts:
        g = ts.create_domain("g", 64)
        r = ts.create_domain("r", 64)
        ts.set_target(r, g)
    xr = a.xen(r)
    try:
        with pytest.raises(XenError) as ei:
            xr.connection.call(hc.SimOp.XEN_DOMCTL_shadow_op, domid=g,
                               shadow_op=hc.XEN_DOMCTL_SHADOW_OP_ENABLE,
                               mode=hc.XEN_DOMCTL_SHADOW_ENABLE_LOG_DIRTY, start=0)
        assert ei.value.errno == errno.EPERM
    finally:
        xr.close()
    xen0 = a.xen(0)
    try:
        with pytest.raises(XenError) as ei:
            xen0.connection.call(hc.SimOp.XEN_DOMCTL_shadow_op, domid=g,
                                 shadow_op=hc.XEN_DOMCTL_SHADOW_OP_ENABLE, mode=0, start=0)
        assert ei.value.errno == errno.EOPNOTSUPP
        with pytest.raises(XenError) as ei:
            xen0.connection.call(hc.SimOp.XEN_DOMCTL_shadow_op, domid=g, shadow_op=99, mode=0,
                                 start=0)
        assert ei.value.errno == errno.EINVAL
        with pytest.raises(XenError) as ei:
            log_dirty_enable(xen0, 999)
        assert ei.value.errno == errno.ESRCH
    finally:
        xen0.close()


def test_migration_arguments_are_checked(hosts):
    with pytest.raises(ValueError):
        LiveMigration(hosts.a, hosts.a, 1, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        LiveMigration(hosts.a, hosts.b, 1, None, max_iterations=1000)  # type: ignore[arg-type]
    with pytest.raises(MigrationError) as ei:
        migrate(hosts.a, hosts.b, 42, None)  # type: ignore[arg-type]
    assert ei.value.errno == errno.ESRCH and list(domains(hosts.b)) == [0]
