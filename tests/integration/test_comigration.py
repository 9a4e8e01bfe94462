"""Co-migration on two sim hosts: the sim guest and its RM agent move together.  A RawClient
viewer types continuously: every key arrives exactly once, in order, at the guest's kbdfront,
the viewer's socket is never closed, and it gets a full update equal to the guest's screen.
Failure injection at the start and end of every step: rollback (everything stays on the source
and keeps working) before the guest's commit point, restart of the agent at the destination
after it.  Also: the RM as a VM (migrated too, target of the guest there), the guest *program*
(a process with a shell console, driven through its control socket), a guest that does not
drain its ring (rollback), the held-input bound."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dmore_nova.rm_vm.agent import MAX_HELD_INPUT, RMAgent
from dmore_nova.rm_vm.comigration import STEPS, CoMigration, State
from dmore_nova.rm_vm.rfb.display import KeyInput
from dmore_nova.xen.io import keymap
from dmore_nova.xen.sim.guest.console import DEFAULT_BG
from dmore_nova.xen.sim.guest.control import GuestControl
from dmore_nova.xen.sim.guest.font import find_text
from dmore_nova.xen.sim.migration import SimMigrationPlatform
from tests.integration.migration_rig import GuestRunner, Hosts, Typist, create_guest, wait
from tests.integration.rawclient import RawClient
from tests.integration.rfb_harness import LoopThread

KC = keymap.LINUX_KEYCODES
SUSPEND_DELAY = 0.05
REPO = Path(__file__).resolve().parents[2]


def keycode(ch: str) -> int:
    return keymap.keysym_to_linux(ord(ch))[0]


def expected_events(chars) -> list[tuple[int, bool]]:
    out = []
    for ch in chars:
        out += [(keycode(ch), True), (keycode(ch), False)]
    return out


@pytest.fixture
def hosts():
    h = Hosts()
    yield h
    h.close()


class SlowSuspend:
    """The guest takes a while to suspend (Linux freezes its tasks first): the switchover
    window is long enough for the typist to be caught in it, every time."""

    def __init__(self, inner: GuestRunner) -> None:
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def suspend(self) -> None:
        time.sleep(SUSPEND_DELAY)
        self.inner.suspend()


class Rig:
    """Guest on host a with its devices served by the agent (dom0, or an RM VM), agent on its
    own loop, the sim guest on another."""

    def __init__(self, hosts: Hosts, *, rm_vm: bool = False) -> None:
        self.hosts = hosts
        a = hosts.a
        self.rm_domid = None
        if rm_vm:
            with a.toolstack() as ts:
                self.rm_domid = ts.create_domain("rm", 256)
        backend = self.rm_domid or 0
        self.domid = create_guest(a, backend=backend, target_of=self.rm_domid)
        self.guest = GuestRunner(a.run_dir, self.domid)
        self.lt = LoopThread()
        self.xen = a.xen(backend)
        self.agent = RMAgent(self.xen, self.domid)
        self.port = self.lt.run(self.agent.start("127.0.0.1", 0))
        wait(self.guest.connected, what="guest connected")
        self.agents = [self.agent]

    def comigrate(self, **kw) -> object:
        cm = CoMigration(self.agent, SimMigrationPlatform(self.hosts.a, self.hosts.b),
                         self.domid, kw.pop("guest", SlowSuspend(self.guest)),
                         rm_domid=self.rm_domid, **kw)
        report = self.lt.run(cm.run(), timeout=30)
        if report.agent is not self.agent:
            self.agents.append(report.agent)
        return report

    def close(self) -> None:
        for agent in self.agents:
            try:
                self.lt.run(agent.stop())
            except Exception:
                pass
            try:
                agent.xen.close()
            except Exception:
                pass
        errors = list(self.lt.errors) + list(self.guest.lt.errors)
        self.lt.stop()
        self.guest.close()
        assert errors == [], f"exceptions escaped a loop callback: {errors}"


@pytest.fixture
def rig(hosts):
    r = Rig(hosts)
    yield r
    r.close()


def assert_keys_exactly_once(guest: GuestRunner, chars, prefix: int = 0) -> None:
    want = expected_events(chars)
    wait(lambda: len(guest.keys()) >= prefix + len(want), what="all keys at the guest")
    time.sleep(0.05)  # nothing more (no duplicates) arrives later
    assert guest.keys()[prefix:] == want


def assert_full_update(c: RawClient, guest: GuestRunner) -> None:
    c.request(incremental=True)
    rects = c.wait_for_update()
    covered = np.zeros((c.height, c.width), bool)
    for x, y, w, h, _enc in rects:
        covered[y:y + h, x:x + w] = True
    assert covered.all(), f"not a full update: {rects}"
    np.testing.assert_array_equal(c.fb & 0xFFFFFF, guest.pixels() & 0xFFFFFF)


def test_comigration_keys_exactly_once_viewer_kept(rig):
    a, b = rig.hosts.a, rig.hosts.b
    c = RawClient("127.0.0.1", rig.port)
    c.full_frame()
    rig.guest.draw(8, 8, 100, 40, 0x00C0FFEE)
    typist = Typist(c)
    wait(lambda: len(typist.sent) > 20, what="typing")
    report = rig.comigrate()
    time.sleep(0.05)  # keep typing on the destination
    sent = typist.stop()

    assert report.outcome is State.DONE, report.summary()
    assert [r.state for r in report.steps] == list(STEPS)
    assert set(report.timings) == {s.value for s in STEPS}
    assert all(t >= 0 for t in report.timings.values())
    assert report.agent is rig.agent and rig.agent.rehomes == 1
    assert rig.agent.xen.host == "b" and rig.agent.xen.domid == 0
    replay = report.steps[STEPS.index(State.REPLAY)]
    assert replay.notes["held"] > 0  # the typist was caught in the switchover
    assert report.guest.downtime is not None and report.console_gap >= report.input_gap > 0
    assert rig.guest.run_dir == b.run_dir and rig.guest.domid == report.new_guest_domid

    # Exactly once, in order, at the kbdfront (which moved with the guest).
    assert_keys_exactly_once(rig.guest, sent)
    assert rig.agent.vkbd.dropped == 0 and rig.agent.held_dropped == 0
    # Same socket: a full update of the re-mapped framebuffer, then live updates.
    assert_full_update(c, rig.guest)
    assert (c.fb[8:48, 8:108] & 0xFFFFFF == 0xC0FFEE).all()
    c.request()
    rig.guest.draw(200, 100, 10, 10, 0x00123456)
    c.wait_for_update()
    assert (c.fb[100:110, 200:210] & 0xFFFFFF == 0x123456).all()
    c.close()
    # The source let go: guest reaped, dom0's backend dirs gone.
    with a.toolstack() as ts:
        wait(lambda: rig.domid not in {d.domid for d in ts.list_domains()}, what="reaped")
    xa = a.xen(0)
    assert xa.xenstore.directory("/local/domain/0/backend") == []
    xa.close()


def test_comigration_with_rm_vm(hosts):
    rig = Rig(hosts, rm_vm=True)
    try:
        c = RawClient("127.0.0.1", rig.port)
        c.full_frame()
        typist = Typist(c)
        wait(lambda: len(typist.sent) > 10, what="typing")
        report = rig.comigrate()
        sent = typist.stop()
        assert report.outcome is State.DONE, report.summary()
        new_rm, new_guest = report.new_rm_domid, report.new_guest_domid
        assert rig.agent.xen.host == "b" and rig.agent.xen.domid == new_rm
        assert report.rm is not None and report.rm.new_domid == new_rm
        with hosts.b.toolstack() as ts:
            assert ts.target_of(new_rm) == new_guest
        with hosts.a.toolstack() as ts:
            wait(lambda: {d.domid for d in ts.list_domains()} == {0}, what="source empty")
        xb = hosts.b.xen(0)
        assert xb.xenstore.read(f"/local/domain/{new_guest}/device/vfb/0/backend") == \
            f"/local/domain/{new_rm}/backend/vfb/{new_guest}/0".encode()
        xb.close()
        assert_keys_exactly_once(rig.guest, sent)
        assert_full_update(c, rig.guest)
        c.close()
    finally:
        rig.close()


@pytest.mark.parametrize("state,outcome", [(State.GUEST_SWITCHOVER, State.ROLLED_BACK),
                                           (State.REMAP_REBIND, State.RESTARTED)])
def test_rm_vm_failure_recovery(hosts, state, outcome):
    """With the RM as a VM: a rollback removes both new domains from the destination and the
    agent goes on as the RM VM on the source; a restart puts the new agent in the RM VM's new
    domain (its migration is completed first)."""
    rig = Rig(hosts, rm_vm=True)
    try:
        def fault(s: State, w: str) -> None:
            if (s, w) == (state, "start"):
                raise RuntimeError("injected")

        report = rig.comigrate(fault=fault)
        assert report.outcome is outcome, report.summary()
        agent = report.agent
        with hosts.b.toolstack() as tb, hosts.a.toolstack() as ta:
            if outcome is State.ROLLED_BACK:
                assert [d.domid for d in tb.list_domains()] == [0]
                assert agent is rig.agent and agent.xen.host == "a"
                assert agent.xen.domid == rig.rm_domid and ta.target_of(rig.rm_domid) == rig.domid
            else:
                rm = report.new_rm_domid
                assert agent.xen.host == "b" and agent.xen.domid == rm is not None
                assert tb.target_of(rm) == report.new_guest_domid
                wait(lambda: {d.domid for d in ta.list_domains()} == {0}, what="source empty")
        c = RawClient("127.0.0.1", agent.listen_addr[1])
        wait(lambda: rig.lt.call(agent.devices_connected), what="connected")
        before = len(rig.guest.keys())
        c.full_frame()
        c.key(ord("k"), True)
        c.key(ord("k"), False)
        wait(lambda: rig.guest.keys()[before:] == [(KC["KEY_K"], True), (KC["KEY_K"], False)],
             what="key")
        np.testing.assert_array_equal(c.full_frame() & 0xFFFFFF, rig.guest.pixels() & 0xFFFFFF)
        c.close()
    finally:
        rig.close()


ROLLBACK_POINTS = [(State.PREPARE, "start"), (State.PREPARE, "end"),
                   (State.GUEST_SWITCHOVER, "start")]
RESTART_POINTS = [(State.GUEST_SWITCHOVER, "end")] + [
    (s, w) for s in STEPS[2:] for w in ("start", "end")]


@pytest.mark.parametrize("state,when", ROLLBACK_POINTS,
                         ids=[f"{s.value}-{w}" for s, w in ROLLBACK_POINTS])
def test_failure_before_commit_rolls_back(rig, state, when):
    a, b = rig.hosts.a, rig.hosts.b
    c = RawClient("127.0.0.1", rig.port)
    c.full_frame()
    rig.guest.draw(0, 0, 50, 50, 0x00AA5500)
    typist = Typist(c)
    wait(lambda: len(typist.sent) > 10, what="typing")

    def fault(s: State, w: str) -> None:
        if (s, w) == (state, when):
            raise RuntimeError(f"injected at {s.value} {w}")

    report = rig.comigrate(fault=fault)
    time.sleep(0.05)
    sent = typist.stop()
    assert report.outcome is State.ROLLED_BACK, report.summary()
    assert "injected" in report.error
    failed = report.steps[-1]
    assert failed.state is state and failed.error is not None
    # Everything on the source, working together; the destination holds nothing.
    assert report.agent is rig.agent and rig.agent.xen.host == "a" and not rig.agent.frozen
    assert rig.guest.run_dir == a.run_dir and rig.guest.domid == rig.domid
    assert not rig.guest.suspended
    with b.toolstack() as ts:
        assert [d.domid for d in ts.list_domains()] == [0]
    with a.toolstack() as ts:
        info = ts.domain_info(rig.domid)
        assert info is not None and not info.paused
    assert_keys_exactly_once(rig.guest, sent)
    # The viewer never noticed: its picture is the guest's screen.
    c.full_frame()
    np.testing.assert_array_equal(c.fb & 0xFFFFFF, rig.guest.pixels() & 0xFFFFFF)
    c.close()


@pytest.mark.parametrize("state,when", RESTART_POINTS,
                         ids=[f"{s.value}-{w}" for s, w in RESTART_POINTS])
def test_failure_after_commit_restarts_agent_at_destination(rig, state, when):
    a, b = rig.hosts.a, rig.hosts.b
    c = RawClient("127.0.0.1", rig.port)
    c.full_frame()
    rig.guest.draw(0, 0, 50, 50, 0x0000AA55)
    for ch in "before":
        c.key(ord(ch), True)
        c.key(ord(ch), False)
    wait(lambda: len(rig.guest.keys()) == 12, what="keys before")
    injected = "held"

    def fault(s: State, w: str) -> None:
        if (s, w) == (state, when):
            # Input that arrives right before the failure (held while frozen, or queued once
            # thawed) must reach the guest through the restarted agent.
            for ch in injected:
                rig.agent.key(KeyInput(True, ord(ch)))
                rig.agent.key(KeyInput(False, ord(ch)))
                rig.agent.flush_input()
            raise RuntimeError(f"injected at {s.value} {w}")

    report = rig.comigrate(fault=fault)
    assert report.outcome is State.RESTARTED, report.summary()
    assert report.steps[-1].state is state and "injected" in report.error
    new = report.agent
    assert new is not rig.agent and new.xen.host == "b" and new.xen.domid == 0
    assert new.guest_domid == report.new_guest_domid == rig.guest.domid
    assert rig.guest.run_dir == b.run_dir
    # The old viewer was closed with the old agent (it reconnects, through the proxy).
    with pytest.raises((ConnectionError, OSError)):
        c.sock.settimeout(2)
        while c.sock.recv(65536):
            pass
        raise ConnectionError("closed")
    c.close()
    # Nothing typed was lost or doubled, and the new agent serves keys and the screen.
    c2 = RawClient("127.0.0.1", new.listen_addr[1])
    c2.full_frame()
    for ch in "after":
        c2.key(ord(ch), True)
        c2.key(ord(ch), False)
    assert_keys_exactly_once(rig.guest, "before" + injected + "after")
    wait(lambda: rig.lt.call(new.devices_connected), what="new agent connected")
    c2.full_frame()
    np.testing.assert_array_equal(c2.fb & 0xFFFFFF, rig.guest.pixels() & 0xFFFFFF)
    assert (c2.fb[0:50, 0:50] & 0xFFFFFF == 0x00AA55).all()
    c2.close()
    with a.toolstack() as ts:
        wait(lambda: rig.domid not in {d.domid for d in ts.list_domains()}, what="reaped")


def test_guest_not_draining_its_ring_rolls_back(rig):
    c = RawClient("127.0.0.1", rig.port)
    c.full_frame()
    rig.guest.lt.call(rig.guest._unwire)  # the guest no longer takes events
    for ch in "stuck":
        c.key(ord(ch), True)
        c.key(ord(ch), False)
    wait(lambda: not rig.lt.call(rig.agent.input_drained), what="ring has unread keys")
    typist = Typist(c)
    report = rig.comigrate(drain_timeout=0.3)
    assert report.outcome is State.ROLLED_BACK
    assert report.steps[-1].state is State.GUEST_SWITCHOVER
    assert "vkbd ring" in report.error
    sent = typist.stop()
    rig.guest.lt.call(rig.guest._wire)  # the guest recovers
    rig.guest.lt.call(rig.guest.guest.handle_events)
    # What sat in the ring, then what was typed during the attempt: once, in order.
    assert_keys_exactly_once(rig.guest, "stuck" + "".join(sent))
    c.close()


def test_held_input_is_bounded_and_counted(rig):
    def flood() -> tuple[int, int]:
        rig.agent.freeze()
        for _ in range(MAX_HELD_INPUT + 7):
            rig.agent.key(KeyInput(True, ord("a")))
        return len(rig.agent.held), rig.agent.held_dropped

    assert rig.lt.call(flood) == (MAX_HELD_INPUT, 7)

    def thaw_few() -> int:
        while len(rig.agent.held) > 3:
            rig.agent.held.pop()
        return rig.agent.thaw()

    assert rig.lt.call(thaw_few) == 3
    wait(lambda: rig.guest.keys() == [(KC["KEY_A"], True)] * 3, what="replayed")


def test_comigration_of_the_guest_program(hosts, tmp_path):
    """The guest is the sim guest *program* (its own process, a shell on its console), moved
    through its control socket: a command line typed across the migration runs on host b,
    and the viewer, on the same socket, sees the shell's output."""
    a, b = hosts.a, hosts.b
    domid = create_guest(a)
    ctl_path = str(tmp_path / "ctl.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dmore_nova.xen.sim.guest", "--host-dir", str(a.run_dir),
         "--domid", str(domid), "--control", ctl_path, "--shell", "/bin/sh -i"],
        stdout=subprocess.PIPE, stderr=open(tmp_path / "guest.log", "wb"),  # noqa: SIM115
        env={**os.environ, "PYTHONPATH": str(REPO), "PS1": "$ "}, text=True)
    lt = LoopThread()
    xen = a.xen(0)
    agent = RMAgent(xen, domid)
    ctl = GuestControl(ctl_path)
    agents = [agent]
    try:
        ready = json.loads(proc.stdout.readline() or "{}")
        assert ready.get("ready"), (tmp_path / "guest.log").read_text()
        port = lt.run(agent.start("127.0.0.1", 0))
        c = RawClient("127.0.0.1", port)
        c.full_frame()

        def screen_has(text: str) -> bool:
            lines = ctl.screen() or []
            return any(text in line for line in lines)

        wait(lambda: screen_has("$"), timeout=10, what="the prompt")
        start = len(ctl.keys())
        for ch in "echo ":
            c.key(ord(ch), True)
            c.key(ord(ch), False)
        typist = Typist(c, period=0.004)
        wait(lambda: len(typist.sent) > 5, what="typing")
        cm = CoMigration(agent, SimMigrationPlatform(a, b), domid, SlowSuspend(ctl))
        report = lt.run(cm.run(), timeout=30)
        sent = typist.stop()
        assert report.outcome is State.DONE, report.summary()
        assert ctl.status()["domid"] == report.new_guest_domid
        assert report.steps[STEPS.index(State.REPLAY)].notes["held"] > 0
        c.key(0xFF0D, True)   # Enter: the shell runs the line on host b
        c.key(0xFF0D, False)
        line = "".join(sent)
        want = expected_events("echo " + line) + [(KC["KEY_ENTER"], True),
                                                  (KC["KEY_ENTER"], False)]
        wait(lambda: len(ctl.keys()) >= start + len(want), what="keys at the guest")
        assert ctl.keys()[start:] == want
        # The command line and, below it, its output (rows may wrap: compare joined rows).
        wait(lambda: "".join(ctl.screen() or []).count(line) >= 2, timeout=10,
             what="the shell's output")
        # The viewer (same socket) sees it: its picture is the guest's framebuffer.
        deadline = time.monotonic() + 5
        while True:
            c.request()
            c.wait_for_update()
            fb = c.fb.copy()
            mapped = lt.call(lambda: agent.display.live().copy())
            hits = find_text((fb & 0xFFFFFF) != DEFAULT_BG, line[:40])
            # The output starts a row (the command line has it after "$ echo ").
            if np.array_equal(fb & 0xFFFFFF, mapped & 0xFFFFFF) and any(
                    col == 0 for _row, col in hits):
                break
            assert time.monotonic() < deadline, "viewer picture != guest framebuffer"
        c.close()
    finally:
        ctl.close()
        for ag in agents:
            try:
                lt.run(ag.stop())
            except Exception:
                pass
            ag.xen.close()
        lt.stop()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
