"""dom0's co-migration of an RM VM and its guest (dmore_nova.virt.xl_rmvm), sans-IO: the state
machine driven by scripted observations (what xl, xenstore and the agent answered on the
xenbox), every failure branch with what it undoes; the set-target halves with fakes."""

from __future__ import annotations

import ctypes
import errno
import itertools
import json
import subprocess

import pytest

from dmore_nova.rm_vm.control import Request, Verb
from dmore_nova.virt.xl_rmvm import (
    AckMissing,
    AckSeen,
    CoMigration,
    Finish,
    Granted,
    GrantTarget,
    IncomingSeen,
    Migrate,
    MigrateEnded,
    ProtocolError,
    SendRequest,
    Sent,
    State,
    TargetResult,
    Unpause,
    Unpaused,
    WaitAck,
    WaitMigrate,
    grant_target,
    xl_migrate_argv,
)
from dmore_nova.xen import api
from dmore_nova.xen.real import libs, toolstack

R_OLD, G_OLD, R_NEW, INCOMING = 3, 4, 5, 6
OK_GRANT = TargetResult(R_NEW, INCOMING, "ok", "ok", "ok")


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def machine(clock: Clock | None = None) -> CoMigration:
    seqs = itertools.count(1)
    return CoMigration("rmvm", "guest", R_OLD, G_OLD, clock=clock or Clock(),
                       seq=lambda: next(seqs), prepare_timeout=10, migrate_timeout=20,
                       plug_timeout=30, rehome_timeout=40)


def ack(seq: str, state: str, **kw) -> AckSeen:
    return AckSeen({"seq": seq, "state": state, **kw})


def drive(m: CoMigration, script: list) -> tuple[list, dict]:
    """Feed the scripted observations; return every command and the report.  Each script
    entry is (expected command, observation); the last command must be Finish."""
    cmds = [m.start()]
    for expected, obs in script:
        assert cmds[-1] == expected, (cmds[-1], expected)
        cmds.append(m.observe(obs))
    assert isinstance(cmds[-1], Finish), cmds[-1]
    return cmds, cmds[-1].report


def happy_until_incoming() -> list:
    return [
        (SendRequest(R_OLD, Request("1", Verb.PREPARE)), Sent()),
        (WaitAck(R_OLD, "1", ("prepared",), 10), ack("1", "prepared", seconds=0.2)),
        (Migrate("rmvm", False, 20), MigrateEnded(0, "Migration successful.", R_NEW)),
        (Migrate("guest", True, 20, paused=True), IncomingSeen(INCOMING)),
        (GrantTarget(R_NEW, INCOMING), Granted(OK_GRANT)),
        (SendRequest(R_NEW, Request("2", Verb.INCOMING, INCOMING, "guest")), Sent()),
        (WaitAck(R_NEW, "2", ("plugged", "done", "devices-not-connected"), 30),
         ack("2", "plugged")),
    ]


def test_the_whole_protocol_in_order_with_timings():
    clock = Clock()
    m = machine(clock)
    cmds = [m.start()]
    durations = iter([0.5, 1.0, 60.0, 3.0, 0.1, 0.2, 0.3, 90.0, 0.4, 5.0])
    script = happy_until_incoming() + [
        (WaitMigrate("guest", 20), MigrateEnded(0, "Migration successful.", 7)),
        (Unpause(7), Unpaused(0, "")),
        (WaitAck(R_NEW, "2", ("done", "devices-not-connected"), 40),
         ack("2", "done", replayed=12)),
    ]
    for expected, obs in script:
        assert cmds[-1] == expected
        clock.t += next(durations)
        cmds.append(m.observe(obs))
    report = cmds[-1].report
    assert report["ok"] is True and report["state"] == "done" and report["error"] is None
    assert (report["rmvm_new"], report["guest_new"], report["incoming"]) == (R_NEW, 7, INCOMING)
    assert report["grant"] == {"rmvm": R_NEW, "guest": INCOMING, "xen": "ok", "xenstore": "ok",
                               "vfb_dirs": "ok"}
    steps = [(s["what"], s["seconds"]) for s in report["steps"]]
    assert steps == [("prepare", 1.5), ("migrate-rmvm", 60.0), ("migrate-guest", 3.0),
                     ("target-incoming", 0.1), ("agent-incoming", 0.5),
                     ("guest-switchover", 90.0), ("guest-unpause", 0.4),
                     ("agent-rehome", 5.0)]
    assert report["steps"][-1]["ack"]["replayed"] == 12
    assert report["seconds"] == 160.5
    assert m.state is State.DONE


def test_agent_already_done_when_the_plug_ack_is_read():
    """The plugged ack was overwritten by done before dom0 read it: no second wait."""
    script = happy_until_incoming()[:-1] + [
        (WaitAck(R_NEW, "2", ("plugged", "done", "devices-not-connected"), 30),
         ack("2", "done")),
        (WaitMigrate("guest", 20), MigrateEnded(0, "", 7)),
        (Unpause(7), Unpaused(0, "")),
    ]
    _cmds, report = drive(machine(), script)
    assert report["ok"] and [s["what"] for s in report["steps"]][-3:] == [
        "guest-switchover", "guest-unpause", "agent-rehome"]


# -- rollback: nothing moved yet -----------------------------------------------------------

def test_refused_prepare_is_rolled_back_with_resume():
    script = [
        (SendRequest(R_OLD, Request("1", Verb.PREPARE)), Sent()),
        (WaitAck(R_OLD, "1", ("prepared",), 10), ack("1", "error", error="busy with 0")),
        (SendRequest(R_OLD, Request("2", Verb.RESUME)), Sent()),
        (WaitAck(R_OLD, "2", ("resumed",), 10), ack("2", "resumed", noop=True)),
    ]
    _cmds, report = drive(machine(), script)
    assert report["state"] == "rolled-back" and report["ok"] is False
    assert report["error"] == ("the agent refused prepare: busy with 0; rolled back: the agent "
                               "resumed (input replayed)")
    assert [s["what"] for s in report["steps"]] == ["prepare", "rollback"]


def test_prepare_without_ack_is_rolled_back():
    script = [
        (SendRequest(R_OLD, Request("1", Verb.PREPARE)), Sent()),
        (WaitAck(R_OLD, "1", ("prepared",), 10), AckMissing("no prepared ack after 10 s")),
        (SendRequest(R_OLD, Request("2", Verb.RESUME)), Sent()),
        (WaitAck(R_OLD, "2", ("resumed",), 10), ack("2", "resumed", noop=False, replayed=3)),
    ]
    _cmds, report = drive(machine(), script)
    assert report["state"] == "rolled-back"
    assert report["error"].startswith("prepare: no prepared ack after 10 s; rolled back")


@pytest.mark.parametrize("resume_obs, why", [
    (AckMissing("no resumed ack after 10 s"), "no resumed ack after 10 s"),
    (AckSeen({"seq": "2", "state": "error", "error": "busy with request 1 (prepare)"}),
     "busy with request 1 (prepare)"),
])
def test_failed_rollback_says_input_may_stay_held(resume_obs, why):
    script = [
        (SendRequest(R_OLD, Request("1", Verb.PREPARE)), Sent()),
        (WaitAck(R_OLD, "1", ("prepared",), 10), AckMissing("no prepared ack")),
        (SendRequest(R_OLD, Request("2", Verb.RESUME)), Sent()),
        (WaitAck(R_OLD, "2", ("resumed",), 10), resume_obs),
    ]
    _cmds, report = drive(machine(), script)
    assert report["state"] == "failed"
    assert report["error"] == (f"prepare: no prepared ack; and the rollback failed (resume: "
                               f"{why}): the agent in dom{R_OLD} may still hold input")


def test_failed_rmvm_migration_resumes_the_agent_where_it_still_is():
    script = [
        (SendRequest(R_OLD, Request("1", Verb.PREPARE)), Sent()),
        (WaitAck(R_OLD, "1", ("prepared",), 10), ack("1", "prepared")),
        (Migrate("rmvm", False, 20), MigrateEnded(1, "migration sender: failed", R_OLD)),
        (SendRequest(R_OLD, Request("2", Verb.RESUME)), Sent()),
        (WaitAck(R_OLD, "2", ("resumed",), 10), ack("2", "resumed", replayed=4)),
    ]
    _cmds, report = drive(machine(), script)
    assert report["state"] == "rolled-back"
    assert report["error"].startswith("xl migrate rmvm failed (rc 1); rolled back")
    assert report["steps"][1]["output"] == "migration sender: failed"


def test_rmvm_moved_although_xl_failed_resumes_there_but_reports_failure():
    script = [
        (SendRequest(R_OLD, Request("1", Verb.PREPARE)), Sent()),
        (WaitAck(R_OLD, "1", ("prepared",), 10), ack("1", "prepared")),
        (Migrate("rmvm", False, 20), MigrateEnded(1, "", R_NEW)),
        (SendRequest(R_NEW, Request("2", Verb.RESUME)), Sent()),
        (WaitAck(R_NEW, "2", ("resumed",), 10), ack("2", "resumed")),
    ]
    _cmds, report = drive(machine(), script)
    assert report["state"] == "failed"
    assert report["error"] == (f"xl migrate rmvm failed (rc 1); the RM VM is now dom{R_NEW}, "
                               f"its agent resumed there")


def test_xl_success_without_a_new_domain_is_not_success():
    script = [
        (SendRequest(R_OLD, Request("1", Verb.PREPARE)), Sent()),
        (WaitAck(R_OLD, "1", ("prepared",), 10), ack("1", "prepared")),
        (Migrate("rmvm", False, 20), MigrateEnded(0, "", R_OLD)),
        (SendRequest(R_OLD, Request("2", Verb.RESUME)), Sent()),
        (WaitAck(R_OLD, "2", ("resumed",), 10), ack("2", "resumed")),
    ]
    _cmds, report = drive(machine(), script)
    assert report["state"] == "rolled-back"
    assert "succeeded but no new domain is named 'rmvm' (found 3)" in report["error"]


def test_rmvm_gone_after_failed_migration():
    script = [
        (SendRequest(R_OLD, Request("1", Verb.PREPARE)), Sent()),
        (WaitAck(R_OLD, "1", ("prepared",), 10), ack("1", "prepared")),
        (Migrate("rmvm", False, 20), MigrateEnded(255, "", None)),
    ]
    _cmds, report = drive(machine(), script)
    assert report["state"] == "failed"
    assert report["error"] == ("xl migrate rmvm failed (rc 255); no domain named 'rmvm' is "
                               "left to resume")


def test_rmvm_migration_still_running_after_timeout():
    script = [
        (SendRequest(R_OLD, Request("1", Verb.PREPARE)), Sent()),
        (WaitAck(R_OLD, "1", ("prepared",), 10), ack("1", "prepared")),
        (Migrate("rmvm", False, 20), MigrateEnded(None, "", R_OLD)),
    ]
    _cmds, report = drive(machine(), script)
    assert report["state"] == "failed" and "still running after 20 s" in report["error"]


# -- after the RM VM moved: reported, not undone ----------------------------------------------

def test_guest_migration_ends_before_its_incoming_domain_appears():
    script = happy_until_incoming()[:3] + [
        (Migrate("guest", True, 20, paused=True), MigrateEnded(1, "xl: cannot connect",
                                                            G_OLD)),
    ]
    _cmds, report = drive(machine(), script)
    assert report["state"] == "failed"
    assert report["error"] == (
        f"xl migrate guest ended (rc 1) before its incoming domain appeared; not rolled back: "
        f"the RM VM already moved (dom{R_OLD} -> dom{R_NEW}) and the guest's old backends went "
        f"with the old RM VM")


def test_refused_target_still_waits_for_the_guest_migration():
    enotsup = TargetResult(R_NEW, INCOMING, "xc_domain_set_target(5, 6) = -1: ENOTSUP "
                           "(Operation not supported)", "ok", "ok")
    script = happy_until_incoming()[:4] + [
        (GrantTarget(R_NEW, INCOMING), Granted(enotsup)),
        (WaitMigrate("guest", 20), MigrateEnded(0, "", 7)),
        (Unpause(7), Unpaused(0, "")),  # the guest runs, without its console
    ]
    _cmds, report = drive(machine(), script)
    assert report["state"] == "failed" and report["guest_new"] == 7
    assert report["error"].startswith(f"the guest migrated (dom7) but dom0 could not give "
                                      f"dom{R_NEW} privilege over the incoming dom{INCOMING}")
    assert "ENOTSUP" in report["error"]
    assert report["grant"]["xen"].endswith("ENOTSUP (Operation not supported)")


@pytest.mark.parametrize("obs, why", [
    (AckMissing("no plugged ack after 30 s"), "no plugged ack after 30 s"),
    (ack("2", "error", error="incoming is not allowed while serving"),
     "incoming is not allowed while serving"),
])
def test_agent_not_taking_the_incoming_guest(obs, why):
    script = happy_until_incoming()[:-1] + [
        (WaitAck(R_NEW, "2", ("plugged", "done", "devices-not-connected"), 30), obs),
        (WaitMigrate("guest", 20), MigrateEnded(0, "", 7)),
        (Unpause(7), Unpaused(0, "")),
    ]
    _cmds, report = drive(machine(), script)
    assert report["state"] == "failed"
    assert report["error"] == f"the guest migrated (dom7) but the agent did not take the " \
                              f"incoming guest: {why}"


@pytest.mark.parametrize("rc, what", [(1, "failed (rc 1)"), (None, "still running")])
def test_guest_migration_fails_after_the_plug(rc, what):
    script = happy_until_incoming() + [
        (WaitMigrate("guest", 20), MigrateEnded(rc, "", G_OLD)),
    ]
    _cmds, report = drive(machine(), script)
    assert report["state"] == "failed"
    assert report["error"].startswith(f"xl migrate guest {what}; not rolled back")


@pytest.mark.parametrize("obs, why", [
    (AckMissing("no done ack after 40 s"), "did not re-home: no done ack after 40 s"),
    (ack("2", "devices-not-connected"),
     ": re-homed, but the devices did not reconnect in time"),
    (ack("2", "error", error="RuntimeError: x"), ": RuntimeError: x"),
])
def test_agent_rehome_failures(obs, why):
    script = happy_until_incoming() + [
        (WaitMigrate("guest", 20), MigrateEnded(0, "", 7)),
        (Unpause(7), Unpaused(0, "")),
        (WaitAck(R_NEW, "2", ("done", "devices-not-connected"), 40), obs),
    ]
    _cmds, report = drive(machine(), script)
    assert report["state"] == "failed" and report["guest_new"] == 7
    assert report["error"].startswith("the guest migrated but the agent")
    assert report["error"].endswith(why)


@pytest.mark.parametrize("rc, failure", [(1, None), (None, None), (1, "grant")])
def test_guest_left_paused_when_xl_unpause_fails(rc, failure):
    """xl migrate -p left the guest paused; if xl unpause fails the report says so (and
    what else failed): the operator must unpause it."""
    enotsup = TargetResult(R_NEW, INCOMING, "ENOTSUP", "ok", "ok")
    script = (happy_until_incoming() if failure is None else happy_until_incoming()[:4] + [
        (GrantTarget(R_NEW, INCOMING), Granted(enotsup))]) + [
        (WaitMigrate("guest", 20), MigrateEnded(0, "", 7)),
        (Unpause(7), Unpaused(rc, "libxl: error: domain 7 unpause failed")),
    ]
    _cmds, report = drive(machine(), script)
    assert report["state"] == "failed"
    assert report["error"].startswith(f"the guest migrated (dom7) but xl unpause failed "
                                      f"(rc {rc}): it stays paused")
    assert ("privilege over the incoming" in report["error"]) == (failure is not None)
    assert report["steps"][-1]["output"] == "libxl: error: domain 7 unpause failed"


def test_guest_migrated_without_a_domain_by_its_name_is_not_unpaused():
    script = happy_until_incoming() + [(WaitMigrate("guest", 20), MigrateEnded(0, "", None))]
    _cmds, report = drive(machine(), script)
    assert report["state"] == "failed"
    assert report["error"] == "xl migrate guest succeeded but no domain is named 'guest'"


def test_xl_migrate_argv_leaves_the_guest_paused_at_the_destination():
    """With ``-s ""`` xl runs its host argument as the receiver: ``-p`` must be there."""
    assert xl_migrate_argv("rmvm") == ["xl", "migrate", "-s", "", "rmvm", "xl migrate-receive"]
    assert xl_migrate_argv("guest", True) == ["xl", "migrate", "-p", "-s", "", "guest",
                                              "xl migrate-receive -p"]


def test_observations_out_of_place_are_protocol_errors():
    m = machine()
    m.start()
    with pytest.raises(ProtocolError, match="IncomingSeen is not expected in state prepare"):
        m.observe(IncomingSeen(9))
    _cmds, _report = drive(m2 := machine(), happy_until_incoming() + [
        (WaitMigrate("guest", 20), MigrateEnded(0, "", 7)),
        (Unpause(7), Unpaused(0, "")),
        (WaitAck(R_NEW, "2", ("done", "devices-not-connected"), 40), ack("2", "done"))])
    with pytest.raises(ProtocolError, match="after the co-migration ended"):
        m2.observe(Sent())


# -- set-target -----------------------------------------------------------------------------

class FakeStore:
    """What grant_target asks of dom0's xenstore; ``fail`` maps an op to an errno."""

    def __init__(self, fail: dict[str, int] | None = None) -> None:
        self.fail = fail or {}
        self.calls: list[tuple] = []

    def _do(self, op: str, *args) -> None:
        self.calls.append((op, *args))
        if op in self.fail:
            raise api.XenError(self.fail[op], f"xenstore {op.upper()} failed: "
                                              f"{errno.errorcode[self.fail[op]]}")

    def write(self, path, value):
        self._do("write", path, value)

    def set_target(self, domid, target):
        self._do("set_target", domid, target)

    def mkdir(self, path):
        self._do("mkdir", path)

    def set_perms(self, path, perms):
        self._do("set_perms", path, perms)


def test_grant_target_does_all_three_parts_as_libxl_would():
    xs, calls = FakeStore(), []
    res = grant_target(xs, 5, 6, set_target=lambda d, t: calls.append((d, t)))
    assert res.ok and calls == [(5, 6)]
    assert xs.calls == [
        ("set_target", 5, 6),
        ("mkdir", "/local/domain/6/device/vfb"),
        ("set_perms", "/local/domain/6/device/vfb", ["n6", "r5"]),
        ("mkdir", "/local/domain/5/backend/vfb"),
        ("set_perms", "/local/domain/5/backend/vfb", ["n5", "r6"]),
        ("write", "/local/domain/5/target", "6")]   # last: an agent may act on it at once


def test_grant_target_reports_each_failure_and_still_tries_the_rest():
    def refuse(d, t):
        raise api.XenError(errno.EOPNOTSUPP, f"xc_domain_set_target({d}, {t}) = -1: ENOTSUP "
                                             f"(Operation not supported)")
    xs = FakeStore({"set_target": errno.EACCES, "mkdir": errno.EACCES})
    res = grant_target(xs, 5, 6, set_target=refuse)
    assert not res.ok
    assert res.xen == "xc_domain_set_target(5, 6) = -1: ENOTSUP (Operation not supported)"
    assert res.xenstore == "XS_SET_TARGET(5, 6): xenstore SET_TARGET failed: EACCES"
    assert res.vfb_dirs == "vfb dirs: xenstore MKDIR failed: EACCES"
    assert xs.calls[-1] == ("write", "/local/domain/5/target", "6")  # written all the same
    res = grant_target(FakeStore({"write": errno.EACCES}), 5, 6, set_target=lambda d, t: None)
    assert (res.xen, res.vfb_dirs) == ("ok", "ok")
    assert res.xenstore == "write target: xenstore WRITE failed: EACCES"


class FakeXenctrl:
    def __init__(self, rc: int = 0, err: int = 0, handle: int = 0x77) -> None:
        self.rc, self.err, self.handle = rc, err, handle
        self.calls: list[tuple] = []

    def call(self, fname, *args):
        self.calls.append((fname, *args))
        assert fname in libs.XENCTRL_PROTOTYPES
        if fname == "xc_interface_open":
            if not self.handle:
                ctypes.set_errno(errno.EACCES)
            return self.handle
        if fname == "xc_domain_set_target":
            ctypes.set_errno(self.err)
            return self.rc
        return 0


def test_xc_set_target_calls_libxenctrl_and_closes():
    lib = FakeXenctrl()
    toolstack.set_target(5, 6, lib)  # type: ignore[arg-type]
    assert lib.calls == [("xc_interface_open", None, None, 0),
                         ("xc_domain_set_target", 0x77, 5, 6), ("xc_interface_close", 0x77)]


def test_xc_set_target_error_is_xens_errno_and_closes():
    lib = FakeXenctrl(rc=-1, err=errno.EOPNOTSUPP)
    with pytest.raises(api.XenError) as ei:
        toolstack.set_target(5, 6, lib)  # type: ignore[arg-type]
    assert ei.value.errno == errno.EOPNOTSUPP
    assert ei.value.strerror == (f"xc_domain_set_target(5, 6) = -1: "
                                 f"{errno.errorcode[errno.EOPNOTSUPP]} (Operation not supported)")
    assert lib.calls[-1] == ("xc_interface_close", 0x77)


def test_xc_set_target_without_an_interface():
    lib = FakeXenctrl(handle=0)
    with pytest.raises(api.XenError, match="xc_interface_open: EACCES"):
        toolstack.set_target(5, 6, lib)  # type: ignore[arg-type]
    assert [c[0] for c in lib.calls] == ["xc_interface_open"]


def test_set_target_prototype_matches_xenctrl_h():
    restype, argtypes = libs.XENCTRL_PROTOTYPES["xc_domain_set_target"]
    assert restype.c == "int"
    assert [a.c for a in argtypes] == ["xc_interface *", "uint32_t", "uint32_t"]


def test_xs_set_target_on_the_wire(tmp_path):
    """PyxsXenStore.set_target sends XS_SET_TARGET (the sim xenstored implements it as
    xenstored does: dom0 only, both domains introduced)."""
    from dmore_nova.xen.pyxs_store import PyxsXenStore
    from tests.unit.test_pyxs_store import SimDaemon

    sim = SimDaemon(str(tmp_path))
    xs = PyxsXenStore(unix_socket_path=sim.path, request_timeout=5)
    try:
        with pytest.raises(api.XenError) as ei:
            xs.set_target(5, 6)
        assert ei.value.errno == errno.ENOENT  # not introduced
        for d in (5, 6):
            sim.call(lambda d=d: sim.server.introduce_domain(d))
        xs.set_target(5, 6)
        assert sim.call(lambda: sim.server.store.target_of(5)) == 6
        with pytest.raises(api.XenError, match="out of range"):
            xs.set_target(5, 70000)
    finally:
        xs.close()
        sim.close()


# -- the driver (XlToolstack) with an in-memory dom0 xenstore and a scripted agent -------------

class Dom0Store:
    """dom0's xenstore: a dict, watches signalled through a socketpair; ``agent`` answers
    requests written to an RM VM's request key as the agent would (or not at all)."""

    def __init__(self, domains: dict[int, str], agent=None, fail_writes: bool = False) -> None:
        import socket
        self.data = {f"/local/domain/{d}/name": n.encode() for d, n in domains.items()}
        self.agent = agent
        self.fail_writes = fail_writes
        self.watches: dict[str, str] = {}
        self.pending: list[tuple[str, str]] = []
        self.r, self.w = socket.socketpair()

    def read(self, path):
        return self.data.get(path)

    def write(self, path, value):
        if self.fail_writes:
            raise api.XenError(errno.EACCES, "xenstore WRITE failed: EACCES")
        self.data[path] = value.encode() if isinstance(value, str) else value
        for wpath, token in self.watches.items():
            if path == wpath:
                self.pending.append((path, token))
                self.w.send(b"x")
        if path.endswith("/data/dmore-migrate") and self.agent is not None:
            seq, verb = value.split(" ")[:2]
            answer = self.agent(verb)
            if answer is not None:
                self.write(path + "-ack", answer if isinstance(answer, bytes) else
                           json.dumps({"seq": seq, "state": answer}))

    def directory(self, path):
        assert path == "/local/domain"
        return sorted({k.split("/")[3] for k in self.data if k.startswith("/local/domain/")})

    def watch(self, path, token):
        self.watches[path] = token
        self.pending.append((path, token))
        self.w.send(b"x")

    def unwatch(self, path, token):
        self.watches.pop(path, None)

    def watch_fileno(self):
        return self.r.fileno()

    def read_watch_events(self):
        self.r.recv(4096)
        ev, self.pending = self.pending, []
        return ev


def agent_answering(verb):
    return {"prepare": "prepared", "resume": "resumed"}.get(verb)


def fast_machine(ts) -> CoMigration:
    return CoMigration("rmvm", "guest", ts.domid_of("rmvm"), ts.domid_of("guest"),
                       prepare_timeout=0.5, migrate_timeout=20, plug_timeout=0.5,
                       rehome_timeout=0.5)


def test_driver_xl_missing_rolls_back():
    from dmore_nova.virt.xl_rmvm import XlToolstack
    xs = Dom0Store({3: "rmvm", 4: "guest"}, agent_answering)
    ts = XlToolstack(xs, migrate_argv=lambda n, p: ["/nonexistent/xl", "migrate", n])
    report = ts.run(fast_machine(ts))
    assert report["state"] == "rolled-back", report
    assert report["steps"][1]["rc"] == 127
    assert "/nonexistent/xl migrate rmvm: [Errno 2]" in report["steps"][1]["output"]
    assert [s["what"] for s in report["steps"]] == ["prepare", "migrate-rmvm", "rollback"]


def test_driver_xl_failure_output_and_rollback():
    from dmore_nova.virt.xl_rmvm import XlToolstack
    xs = Dom0Store({3: "rmvm", 4: "guest"}, agent_answering)
    ts = XlToolstack(xs, migrate_argv=lambda n, p: [
        "sh", "-c", f"echo 'migration sender: {n} failed'; exit 3"])
    report = ts.run(fast_machine(ts))
    assert report["state"] == "rolled-back"
    assert report["error"].startswith("xl migrate rmvm failed (rc 3); rolled back")
    assert report["steps"][1]["output"] == "migration sender: rmvm failed\n"
    assert xs.watches == {}  # every ack watch removed


def test_driver_agent_silent_then_rollback_unanswered():
    from dmore_nova.virt.xl_rmvm import XlToolstack
    xs = Dom0Store({3: "rmvm", 4: "guest"}, lambda verb: None)
    ts = XlToolstack(xs, migrate_argv=lambda n, p: ["true"])
    report = ts.run(fast_machine(ts))
    assert report["state"] == "failed"
    assert report["error"].startswith("prepare: no prepared ack to request ")
    assert "and the rollback failed (resume: no resumed ack" in report["error"]


def test_driver_ignores_malformed_and_stale_acks():
    from dmore_nova.virt.xl_rmvm import XlToolstack
    answers = iter([b"\xff not json", b"[1, 2]", b"x" * 5000])
    xs = Dom0Store({3: "rmvm", 4: "guest"}, lambda verb: next(answers, None))
    ts = XlToolstack(xs)
    obs = ts.request(3, "prepare", 0.2)
    assert isinstance(obs, AckMissing) and obs.reason.endswith(r"(last value: b'\xff not json')")
    obs = ts.request(3, "prepare", 0.2)  # JSON, but not an object
    assert isinstance(obs, AckMissing) and obs.reason.endswith("(last value: b'[1, 2]')")
    obs = ts.request(3, "prepare", 0.2)  # longer than MAX_ACK: not parsed, shown cut
    assert isinstance(obs, AckMissing) and obs.reason.endswith("x" * 50 + "')")
    xs.write("/local/domain/3/data/dmore-migrate-ack", json.dumps({"seq": "1", "state": "done"}))
    obs = ts.wait_ack(3, "2", ("done",), 0.2)  # another request's ack: not ours
    assert isinstance(obs, AckMissing) and '"seq": "1"' in obs.reason


def test_driver_xenstore_write_refused():
    from dmore_nova.virt.xl_rmvm import XlToolstack
    xs = Dom0Store({3: "rmvm", 4: "guest"}, agent_answering, fail_writes=True)
    ts = XlToolstack(xs)
    report = ts.run(fast_machine(ts))
    assert report["state"] == "failed"
    assert "could not write the request" in report["error"] and "EACCES" in report["error"]


def test_domid_of_names_and_numbers():
    from dmore_nova.virt.xl_rmvm import XlToolstack
    ts = XlToolstack(Dom0Store({3: "rmvm", 4: "guest"}))
    assert (ts.domid_of("rmvm"), ts.domid_of("guest"), ts.domid_of("17")) == (3, 4, 17)
    with pytest.raises(LookupError, match="no domain named 'other'"):
        ts.domid_of("other")


def test_driver_unpause_runs_xl_and_reports_its_failure():
    from dmore_nova.virt.xl_rmvm import XlToolstack
    xs = Dom0Store({3: "rmvm", 4: "guest"}, agent_answering)
    ran: list[int] = []
    ok = XlToolstack(xs, unpause_argv=lambda d: ran.append(d) or ["true"],
                     is_paused=lambda d: True).unpause(7)
    assert ran == [7] and ok == Unpaused(0, "", True)
    bad = XlToolstack(xs, unpause_argv=lambda d: [
        "sh", "-c", f"echo 'libxl: error: unpausing dom{d}' >&2; exit 2"],
        is_paused=lambda d: None).unpause(7)
    assert bad == Unpaused(2, "libxl: error: unpausing dom7\n", None)
    missing = XlToolstack(xs, unpause_argv=lambda d: ["/nonexistent/xl", "unpause", str(d)],
                          is_paused=lambda d: False)
    obs = missing.unpause(7)
    assert obs.rc == 127 and "/nonexistent/xl unpause 7: [Errno 2]" in obs.output
    assert obs.was_paused is False


def test_xl_paused_reads_the_state_column(monkeypatch):
    from dmore_nova.virt import xl_rmvm

    def run(out: str, rc: int = 0):
        return lambda *a, **k: subprocess.CompletedProcess(a[0], rc, out, "")

    head = "Name                ID   Mem VCPUs\tState\tTime(s)\n"
    monkeypatch.setattr(xl_rmvm.subprocess, "run", run(head + "guest 7 256 1 --p--- 0.1\n"))
    assert xl_rmvm.xl_paused(7) is True
    monkeypatch.setattr(xl_rmvm.subprocess, "run", run(head + "guest 7 256 1 -b---- 0.1\n"))
    assert xl_rmvm.xl_paused(7) is False
    monkeypatch.setattr(xl_rmvm.subprocess, "run", run("", 1))
    assert xl_rmvm.xl_paused(7) is None
