"""dom0's part of an RM VM under xl: privilege over its guest, and co-migration of the pair.

Why this exists: on real Xen the RM VM (the paper's "Domain M") is a PV domU running
``dmore-rm-agent`` with ``[agent] xenstore_control``; xl can create and migrate it, but xl has
no command to give it privilege over its guest, and no notion that two domains must move
together in a fixed order with the agent told what happens.  This module is that toolstack
part, for an operator in dom0 (``dmore-xl-rmvm``, :mod:`dmore_nova.cmd.xl_rmvm`).

Privilege (:func:`grant_target`), what libxl does for a stub-domain device model
(``libxl__spawn_stub_dm``), the RM VM being in the same position -- the backend domain of one
guest's console devices:

* ``XEN_DOMCTL_set_target`` (``xc_domain_set_target``, :mod:`dmore_nova.xen.real.toolstack`):
  Xen lets the RM VM do to the guest what the XSM policy allows a device model
  (``XSM_TARGET``): foreign-map its memory (the vfb's ``page-ref`` and framebuffer pages are
  frame numbers, not grants), ``XEN_DOMCTL_getdomaininfo``.
* ``XS_SET_TARGET`` (xs_wire.h): xenstored treats the RM VM as the owner of the guest's
  nodes; and ``/local/domain/<rmvm>/target`` = the guest's domid, as libxl writes it for a
  stub domain, written last: the RM VM's agent, configured without a guest
  (``[agent] guest_domid`` unset: one RM VM image for any guest), serves the guest it names.
* the vfb's parent directories, owned so that the RM VM may create the device itself: libxl
  creates ``/local/domain/<guest>/device`` and ``/local/domain/<rmvm>/backend`` owned by dom0,
  so even with ``XS_SET_TARGET`` the agent got ``EACCES`` on ``MKDIR .../device/vfb/0`` (seen on
  4.17).

**Xen 4.17 refuses a PV target.**  ``xc_domain_set_target`` fails with ``EOPNOTSUPP``
("Operation not supported") when the guest is PV, measured on the xenbox and in Xen's source:
``xen/common/domctl.c``, ``do_domctl()``, ``case XEN_DOMCTL_set_target``::

    ret = -EOPNOTSUPP;
    if ( is_hvm_domain(e) )
        ret = xsm_set_target(XSM_HOOK, d, e);

(read in xcp-ng/xen, a Xen 4.17 tree -- its ``xen/Makefile`` says 4.17.3 -- at commit
0416f3075fa0d122b92813c07fdd87643d4a3a1e; the check is absent from older trees, e.g.
xen-project/xen at 011a612f, where any domain could be a target).  A PVH guest is an HVM
container (``is_hvm_domain`` is true), so the RM VM serves PVH guests: same kernel, same PV
frontends, no device model.  xenstored's half (``XS_SET_TARGET``) works for either.

Neither half survives migration: the new domains are new domids, and Xen's target pointer and
xenstored's target table are per domain (and Xen takes one target per domain, for its life).
After the RM VM moved, dom0 gives the *new* RM VM privilege over the guest's *incoming* domain.

**Co-migration** (:class:`CoMigration`, issue 5 §3), a protocol with named states, each logged
with its timing, every failure reported with what was and was not undone:

1. ``prepare`` -- the agent holds viewers' input and unmaps/unbinds everything of the guest
   (a PV domain with foreign mappings cannot be saved); the RFB server and the viewers' TCP
   connections stay in the RM VM's memory and move with it.
2. ``migrate-rmvm`` -- ``xl migrate`` of the RM VM, *first*: libxl re-creates a migrating
   guest's devices by backend *name* (``vkb=[backend=rmvm,...]``), so the guest must move after
   the RM VM has its new domid and its name back (the other order leaves the guest's backends
   under the old RM VM's directory, which libxl deletes with it).  The RM VM's address moves
   with its vif.
3. ``migrate-guest`` -- ``xl migrate -p`` of the guest starts; dom0 waits for its incoming
   domain (``<guest>--incoming``).
4. ``target-incoming`` -- :func:`grant_target` for the new RM VM over the incoming domain.
5. ``agent-incoming`` -- the agent is told ``incoming <domid> <guest>``: it plugs the vfb of
   the incoming domain before it resumes and acknowledges ``plugged``.
6. ``guest-switchover`` -- ``xl migrate`` of the guest completes; ``-p`` leaves it paused at
   the destination.
7. ``guest-unpause`` -- ``xl unpause``: the guest resumes only now.  Why not let xl unpause
   it: a resumed xen-fbfront re-reads ``device/vfb/<devid>`` once, so the vfb must be plugged
   (step 5) before the guest runs; left to xl, that was a race between the agent (in an RM VM
   that had just migrated) and the end of the restore.  The guest is unpaused whatever
   happened to its console: a paused guest would be worse than a blank one.
8. ``agent-rehome`` -- the agent saw xl rename the domain, re-homed, re-mapped and re-bound
   both devices, replayed the held input, refreshed the viewers: ack ``done``.

Failures: a failed ``prepare`` (error ack or none in time) and a failed ``xl migrate`` of the
RM VM are *rolled back*: the agent is asked to ``resume`` (same pages, same ports, held input
replayed) wherever the RM VM now runs, and the report says ``rolled-back`` with the reason.
From step 3 on the RM VM has moved and the guest's old backends went with the old RM VM:
nothing can be undone from here; the report says ``failed``, at which state and why, and the
guest's migration is always waited for (never killed half-way).

:class:`CoMigration` is the sans-IO part: it turns observations (acks, xl's exit, the
incoming domain, the grant's result) into the next command and keeps the states and timings;
the unit tests drive it with scripted observations.  :class:`XlToolstack` runs the commands:
``xl`` subprocesses and dom0's xenstore.

Limits: a localhost migration (``xl migrate -s "" NAME "xl migrate-receive"``, as the xenbox
does; to another host the destination's dom0 would have to grant the target on the incoming
guest); one guest per RM VM; xl's ``--incoming`` naming (xl 4.17, ``migrate_receive``).
The RM VM plugging the guest's vfb itself (``[agent] plug_vfb``) needs oxenstored (the
xenstored Debian's xen.service starts, the xenbox's): C xenstored makes an unprivileged domain
the owner of every node it creates (``construct_node``) and refuses to give one away
(``do_set_perms``: "Unprivileged domains may not change the owner"), so the agent's ``SET_PERMS``
of ``device/vfb/<devid>`` to the guest fails with ``EPERM`` there (the sim, which follows C
xenstored, shows it); with C xenstored dom0 has to create the vfb's nodes.
"""

from __future__ import annotations

import enum
import json
import logging
import select
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dmore_nova.rm_vm.control import ACK_KEY, REQUEST_KEY, Request, Verb
from dmore_nova.xen.api import XenError, XenStore

LOG = logging.getLogger(__name__)

#: Seconds the agent gets to acknowledge ``prepare`` / ``resume`` (it unmaps or maps two
#: devices: milliseconds; seconds under TCG on a loaded machine).
PREPARE_TIMEOUT = 120.0
#: Seconds one ``xl migrate`` may take (measured 10-200 s under TCG, loaded machine: ~4x).
MIGRATE_TIMEOUT = 900.0
#: Seconds the agent gets to plug the incoming domain's vfb once asked.
PLUG_TIMEOUT = 120.0
#: Seconds the agent gets, after the guest's ``xl migrate`` ended, to re-home and reconnect.
REHOME_TIMEOUT = 600.0
#: Interval of the one polled wait: the incoming domain's name.  libxl writes a new domain's
#: directory (``name`` included) when it creates it and introduces the domain to xenstored
#: only after its memory arrived (``@introduceDomain``), which may be too late to plug the vfb
#: before xl starts it; a watch on ``/local/domain`` would wake dom0 for every write of every
#: domain.  So this wait (bounded by :data:`MIGRATE_TIMEOUT`) re-reads the names this often.
INCOMING_POLL = 0.2
#: Longest ack dom0 reads (the agent's JSON is ~400 bytes; the RM VM is not trusted blindly).
MAX_ACK = 4096
#: Tail of xl's output kept in the report.
OUTPUT_TAIL = 1500
INCOMING_SUFFIX = "--incoming"


# -- privilege -------------------------------------------------------------------------------

@dataclass
class TargetResult:
    """Each half of :func:`grant_target`: ``"ok"`` or the error, verbatim."""

    rmvm: int
    guest: int
    xen: str
    xenstore: str
    vfb_dirs: str

    @property
    def ok(self) -> bool:
        return self.xen == self.xenstore == self.vfb_dirs == "ok"

    def as_dict(self) -> dict[str, Any]:
        return {"rmvm": self.rmvm, "guest": self.guest, "xen": self.xen,
                "xenstore": self.xenstore, "vfb_dirs": self.vfb_dirs}


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}"


def grant_target(xs: XenStore, rmvm: int, guest: int, *,
                 set_target: Callable[[int, int], None] | None = None) -> TargetResult:
    """Give ``rmvm`` privilege over ``guest`` (module docstring).  All three parts are tried
    even when one fails (the report says which did); ``xs`` must be dom0's and have
    ``set_target`` (:class:`dmore_nova.xen.pyxs_store.PyxsXenStore`)."""
    if set_target is None:
        from dmore_nova.xen.real.toolstack import set_target as xc_set_target
        set_target = xc_set_target
    try:
        set_target(rmvm, guest)
        xen = "ok"
    except OSError as exc:
        xen = _error_text(exc)
    try:
        xs.set_target(rmvm, guest)  # type: ignore[attr-defined]
        xenstore = "ok"
    except (OSError, AttributeError) as exc:
        xenstore = f"XS_SET_TARGET({rmvm}, {guest}): {_error_text(exc)}"
    fe = f"/local/domain/{guest}/device/vfb"
    be = f"/local/domain/{rmvm}/backend/vfb"
    try:
        for path, perms in ((fe, [f"n{guest}", f"r{rmvm}"]), (be, [f"n{rmvm}", f"r{guest}"])):
            xs.mkdir(path)
            xs.set_perms(path, perms)
        vfb_dirs = "ok"
    except OSError as exc:
        vfb_dirs = f"vfb dirs: {_error_text(exc)}"
    try:
        # Last (libxl writes it before XS_SET_TARGET, which does not read it): an agent that
        # names no guest serves the guest as soon as it reads this node, so all it needs is
        # in place by then.
        xs.write(f"/local/domain/{rmvm}/target", str(guest))
    except OSError as exc:
        err = f"write target: {_error_text(exc)}"
        xenstore = err if xenstore == "ok" else f"{xenstore}; {err}"
    res = TargetResult(rmvm, guest, xen, xenstore, vfb_dirs)
    (LOG.info if res.ok else LOG.warning)("target dom%d -> dom%d: %s", rmvm, guest,
                                          res.as_dict())
    return res


# -- co-migration: commands and observations (sans-IO) --------------------------------------

@dataclass(frozen=True)
class SendRequest:
    """Write ``request`` to the RM VM's request key."""

    domid: int
    request: Request


@dataclass(frozen=True)
class WaitAck:
    """Until the RM VM's ack has this ``seq`` and one of ``states`` (or ``error``)."""

    domid: int
    seq: str
    states: tuple[str, ...]
    timeout: float


@dataclass(frozen=True)
class Migrate:
    """Start ``xl migrate NAME``; with ``report_incoming``, answer :class:`IncomingSeen` as soon
    as ``<NAME>--incoming`` exists (xl goes on), else :class:`MigrateEnded`.  ``paused``: the
    domain stays paused at the destination (``xl migrate -p``)."""

    name: str
    report_incoming: bool
    timeout: float
    paused: bool = False


@dataclass(frozen=True)
class WaitMigrate:
    """Until the running ``xl migrate`` ends."""

    name: str
    timeout: float


@dataclass(frozen=True)
class Unpause:
    """``xl unpause DOMID``."""

    domid: int


@dataclass(frozen=True)
class GrantTarget:
    rmvm: int
    guest: int


@dataclass(frozen=True)
class Finish:
    report: dict[str, Any]


Command = SendRequest | WaitAck | Migrate | WaitMigrate | GrantTarget | Unpause | Finish


@dataclass(frozen=True)
class Sent:
    pass


@dataclass(frozen=True)
class AckSeen:
    ack: dict[str, Any]


@dataclass(frozen=True)
class AckMissing:
    reason: str


@dataclass(frozen=True)
class IncomingSeen:
    domid: int


@dataclass(frozen=True)
class MigrateEnded:
    """``rc`` None: still running after the timeout (xl is not killed: that could lose the
    domain).  ``domid``: the domain named like the migrated one afterwards (None: none)."""

    rc: int | None
    output: str
    domid: int | None


@dataclass(frozen=True)
class Granted:
    result: TargetResult


@dataclass(frozen=True)
class Unpaused:
    """``was_paused``: what ``xl list`` said before (None: could not tell)."""

    rc: int | None
    output: str
    was_paused: bool | None = None


Observation = Sent | AckSeen | AckMissing | IncomingSeen | MigrateEnded | Granted | Unpaused


class State(enum.Enum):
    PREPARE = "prepare"
    MIGRATE_RMVM = "migrate-rmvm"
    MIGRATE_GUEST = "migrate-guest"
    TARGET_INCOMING = "target-incoming"
    AGENT_INCOMING = "agent-incoming"
    GUEST_SWITCHOVER = "guest-switchover"
    GUEST_UNPAUSE = "guest-unpause"
    AGENT_REHOME = "agent-rehome"
    ROLLBACK = "rollback"
    DONE = "done"
    ROLLED_BACK = "rolled-back"
    FAILED = "failed"


TERMINAL = frozenset({State.DONE, State.ROLLED_BACK, State.FAILED})


class ProtocolError(RuntimeError):
    """An observation the current state does not expect (a driver bug, not a Xen failure)."""


class CoMigration:
    """The co-migration of one RM VM and its guest, as a state machine (module docstring).

    ``start()`` returns the first command; ``observe(obs)`` takes what that command produced
    and returns the next, until :class:`Finish` carries the report.  ``clock`` and ``seq`` are
    injectable for tests.
    """

    def __init__(self, rmvm: str, guest: str, rmvm_domid: int, guest_domid: int, *,
                 clock: Callable[[], float] = time.monotonic,
                 seq: Callable[[], int] = time.time_ns,
                 prepare_timeout: float = PREPARE_TIMEOUT,
                 migrate_timeout: float = MIGRATE_TIMEOUT, plug_timeout: float = PLUG_TIMEOUT,
                 rehome_timeout: float = REHOME_TIMEOUT) -> None:
        self.rmvm, self.guest = rmvm, guest
        self.clock, self._seq = clock, seq
        self.prepare_timeout, self.migrate_timeout = prepare_timeout, migrate_timeout
        self.plug_timeout, self.rehome_timeout = plug_timeout, rehome_timeout
        self.state: State | None = None
        self._t_state = self._t0 = 0.0
        self._pending: Request | None = None
        self._failure: str | None = None
        self._rollback_target: int | None = None
        self._early_done: dict[str, Any] | None = None
        self.report: dict[str, Any] = {
            "rmvm": rmvm, "guest": guest, "rmvm_old": rmvm_domid, "guest_old": guest_domid,
            "rmvm_new": None, "guest_new": None, "incoming": None, "grant": None,
            "steps": [], "ok": False, "state": None, "error": None}

    # -- bookkeeping -------------------------------------------------------------------------
    def _enter(self, state: State) -> None:
        self.state = state
        self._t_state = self.clock()
        LOG.info("co-migration %s+%s: %s", self.rmvm, self.guest, state.value)

    def _step(self, **details: Any) -> None:
        """Record the current state as done (its time, what it saw)."""
        assert self.state is not None
        rec = {"what": self.state.value,
               "seconds": round(self.clock() - self._t_state, 3), **details}
        self.report["steps"].append(rec)
        LOG.info("co-migration %s+%s: %s", self.rmvm, self.guest, json.dumps(rec))

    def _request(self, to: int, verb: Verb, **kw: Any) -> SendRequest:
        self._pending = Request(str(self._seq()), verb, **kw)
        return SendRequest(to, self._pending)

    def _finish(self, state: State, error: str | None = None) -> Finish:
        self.state = state
        self.report.update(ok=state is State.DONE, state=state.value, error=error,
                           seconds=round(self.clock() - self._t0, 3))
        (LOG.info if error is None else LOG.error)(
            "co-migration %s+%s: %s%s", self.rmvm, self.guest, state.value,
            f": {error}" if error else "")
        return Finish(self.report)

    # -- the protocol ------------------------------------------------------------------------
    def start(self) -> Command:
        self._t0 = self.clock()
        self._enter(State.PREPARE)
        return self._request(self.report["rmvm_old"], Verb.PREPARE)

    def observe(self, obs: Observation) -> Command:
        if self.state is None or self.state in TERMINAL:
            raise ProtocolError(f"{obs!r} after the co-migration ended ({self.state})")
        handler = getattr(self, f"_on_{self.state.name.lower()}")
        return handler(obs)

    def _unexpected(self, obs: Observation) -> ProtocolError:
        return ProtocolError(f"{type(obs).__name__} is not expected in state "
                             f"{self.state.value if self.state else None}")

    def _ack_wait(self, domid: int, states: tuple[str, ...], timeout: float) -> WaitAck:
        assert self._pending is not None
        return WaitAck(domid, self._pending.seq, states, timeout)

    def _on_prepare(self, obs: Observation) -> Command:
        if isinstance(obs, Sent):
            return self._ack_wait(self.report["rmvm_old"], ("prepared",), self.prepare_timeout)
        if isinstance(obs, AckSeen) and obs.ack.get("state") == "prepared":
            self._step(ack=obs.ack)
            self._enter(State.MIGRATE_RMVM)
            return Migrate(self.rmvm, False, self.migrate_timeout)
        if isinstance(obs, AckSeen | AckMissing):
            why = (f"the agent refused prepare: {obs.ack.get('error')}"
                   if isinstance(obs, AckSeen) else f"prepare: {obs.reason}")
            self._step(error=why)
            return self._rollback(self.report["rmvm_old"], why)
        raise self._unexpected(obs)

    def _on_migrate_rmvm(self, obs: Observation) -> Command:
        if not isinstance(obs, MigrateEnded):
            raise self._unexpected(obs)
        old = self.report["rmvm_old"]
        self._step(rc=obs.rc, rmvm_new=obs.domid, output=obs.output[-OUTPUT_TAIL:])
        if obs.rc == 0 and obs.domid is not None and obs.domid != old:
            self.report["rmvm_new"] = obs.domid
            self._enter(State.MIGRATE_GUEST)
            return Migrate(self.guest, True, self.migrate_timeout, paused=True)
        if obs.rc is None:
            return self._finish(State.FAILED, f"xl migrate {self.rmvm} still running after "
                                              f"{self.migrate_timeout:.0f} s: input stays "
                                              f"held in the agent until it ends")
        why = (f"xl migrate {self.rmvm} failed (rc {obs.rc})" if obs.rc != 0 else
               f"xl migrate {self.rmvm} succeeded but no new domain is named {self.rmvm!r}"
               f" (found {obs.domid})")
        if obs.domid is None:
            return self._finish(State.FAILED, f"{why}; no domain named {self.rmvm!r} is "
                                              f"left to resume")
        return self._rollback(obs.domid, why)

    def _rollback(self, domid: int, why: str) -> Command:
        self._failure = why
        self._rollback_target = domid
        self._enter(State.ROLLBACK)
        return self._request(domid, Verb.RESUME)

    def _on_rollback(self, obs: Observation) -> Command:
        assert self._rollback_target is not None and self._failure is not None
        if isinstance(obs, Sent):
            return self._ack_wait(self._rollback_target, ("resumed",), self.prepare_timeout)
        if isinstance(obs, AckSeen) and obs.ack.get("state") == "resumed":
            self._step(ack=obs.ack)
            if self._rollback_target != self.report["rmvm_old"]:
                return self._finish(State.FAILED, f"{self._failure}; the RM VM is now "
                                                  f"dom{self._rollback_target}, its agent "
                                                  f"resumed there")
            return self._finish(State.ROLLED_BACK, f"{self._failure}; rolled back: the "
                                                   f"agent resumed (input replayed)")
        if isinstance(obs, AckSeen | AckMissing):
            why = (obs.ack.get("error") if isinstance(obs, AckSeen) else obs.reason)
            self._step(error=why)
            return self._finish(State.FAILED, f"{self._failure}; and the rollback failed "
                                              f"(resume: {why}): the agent in "
                                              f"dom{self._rollback_target} may still hold "
                                              f"input")
        raise self._unexpected(obs)

    def _on_migrate_guest(self, obs: Observation) -> Command:
        if isinstance(obs, IncomingSeen):
            self.report["incoming"] = obs.domid
            self._step(incoming=obs.domid)
            self._enter(State.TARGET_INCOMING)
            return GrantTarget(self.report["rmvm_new"], obs.domid)
        if isinstance(obs, MigrateEnded):
            self._step(rc=obs.rc, output=obs.output[-OUTPUT_TAIL:])
            return self._finish(State.FAILED, self._no_rollback(
                f"xl migrate {self.guest} ended (rc {obs.rc}) before its incoming domain "
                f"appeared"))
        raise self._unexpected(obs)

    def _no_rollback(self, why: str) -> str:
        return (f"{why}; not rolled back: the RM VM already moved (dom"
                f"{self.report['rmvm_old']} -> dom{self.report['rmvm_new']}) and the guest's "
                f"old backends went with the old RM VM")

    def _on_target_incoming(self, obs: Observation) -> Command:
        if not isinstance(obs, Granted):
            raise self._unexpected(obs)
        self.report["grant"] = obs.result.as_dict()
        self._step(**{k: v for k, v in obs.result.as_dict().items()
                      if k in ("xen", "xenstore", "vfb_dirs")})
        if not obs.result.ok:
            self._failure = (f"dom0 could not give dom{obs.result.rmvm} privilege over the "
                             f"incoming dom{obs.result.guest}: {obs.result.as_dict()}")
            self._enter(State.GUEST_SWITCHOVER)
            return WaitMigrate(self.guest, self.migrate_timeout)
        self._enter(State.AGENT_INCOMING)
        return self._request(self.report["rmvm_new"], Verb.INCOMING, domid=obs.result.guest,
                             name=self.guest)

    def _on_agent_incoming(self, obs: Observation) -> Command:
        if isinstance(obs, Sent):
            return self._ack_wait(self.report["rmvm_new"],
                                  ("plugged", "done", "devices-not-connected"),
                                  self.plug_timeout)
        if isinstance(obs, AckSeen) and obs.ack.get("state") != "error":
            self._step(ack=obs.ack)
            if obs.ack.get("state") != "plugged":
                self._early_done = obs.ack
        elif isinstance(obs, AckSeen | AckMissing):
            why = (obs.ack.get("error") if isinstance(obs, AckSeen) else obs.reason)
            self._step(error=why)
            self._failure = f"the agent did not take the incoming guest: {why}"
        else:
            raise self._unexpected(obs)
        self._enter(State.GUEST_SWITCHOVER)
        return WaitMigrate(self.guest, self.migrate_timeout)

    def _on_guest_switchover(self, obs: Observation) -> Command:
        if not isinstance(obs, MigrateEnded):
            raise self._unexpected(obs)
        self.report["guest_new"] = obs.domid
        self._step(rc=obs.rc, guest_new=obs.domid, output=obs.output[-OUTPUT_TAIL:])
        if obs.rc != 0:
            what = ("still running" if obs.rc is None else f"failed (rc {obs.rc})")
            return self._finish(State.FAILED, self._no_rollback(
                f"xl migrate {self.guest} {what}" + (f"; {self._failure}" if self._failure
                                                     else "")))
        if obs.domid is None:
            return self._finish(State.FAILED, f"xl migrate {self.guest} succeeded but no "
                                              f"domain is named {self.guest!r}")
        self._enter(State.GUEST_UNPAUSE)
        return Unpause(obs.domid)

    def _on_guest_unpause(self, obs: Observation) -> Command:
        if not isinstance(obs, Unpaused):
            raise self._unexpected(obs)
        self._step(rc=obs.rc, was_paused=obs.was_paused, output=obs.output[-OUTPUT_TAIL:])
        new = self.report["guest_new"]
        if obs.rc != 0:
            return self._finish(State.FAILED, f"the guest migrated (dom{new}) but xl unpause "
                                              f"failed (rc {obs.rc}): it stays paused"
                                + (f"; {self._failure}" if self._failure else ""))
        if self._failure is not None:
            return self._finish(State.FAILED, f"the guest migrated (dom{new}) but "
                                              f"{self._failure}")
        self._enter(State.AGENT_REHOME)
        if self._early_done is not None:
            return self._on_agent_rehome(AckSeen(self._early_done))
        assert self._pending is not None
        return WaitAck(self.report["rmvm_new"], self._pending.seq,
                       ("done", "devices-not-connected"), self.rehome_timeout)

    def _on_agent_rehome(self, obs: Observation) -> Command:
        if isinstance(obs, AckSeen):
            self._step(ack=obs.ack)
            state = obs.ack.get("state")
            if state == "done":
                return self._finish(State.DONE)
            why = (obs.ack.get("error") if state == "error" else
                   "re-homed, but the devices did not reconnect in time")
            return self._finish(State.FAILED, f"the guest migrated but the agent: {why}")
        if isinstance(obs, AckMissing):
            self._step(error=obs.reason)
            return self._finish(State.FAILED, f"the guest migrated but the agent did not "
                                              f"re-home: {obs.reason}")
        raise self._unexpected(obs)


# -- the I/O: xl and dom0's xenstore ---------------------------------------------------------

def xl_migrate_argv(name: str, paused: bool = False) -> list[str]:
    """``xl migrate`` to this host (module docstring: Limits).  With ``-s ""`` xl runs the
    host argument as the receiver's command line, so ``-p`` goes into it too
    (``migrate-receive -p``: the domain is not unpaused at the end)."""
    if paused:
        return ["xl", "migrate", "-p", "-s", "", name, "xl migrate-receive -p"]
    return ["xl", "migrate", "-s", "", name, "xl migrate-receive"]


def xl_unpause_argv(domid: int) -> list[str]:
    return ["xl", "unpause", str(domid)]


def xl_paused(domid: int) -> bool | None:
    """Is the domain paused (``p`` in ``xl list``'s State column)?  None: could not tell."""
    try:
        p = subprocess.run(["xl", "list", str(domid)], capture_output=True, text=True,
                           timeout=UNPAUSE_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    rows = p.stdout.splitlines()
    if p.returncode != 0 or len(rows) < 2 or len(rows[1].split()) < 5:
        return None
    return "p" in rows[1].split()[4]


#: Seconds ``xl unpause`` may take.
UNPAUSE_TIMEOUT = 120.0


def argv_text(argv: Sequence[str]) -> str:
    return " ".join(repr(a) if not a or " " in a else a for a in argv)


class XlToolstack:
    """Runs :class:`CoMigration`'s commands in dom0: ``xl`` subprocesses, xenstore as dom0.

    :param xs: dom0's xenstore (with ``set_target``: :class:`PyxsXenStore` over xenstored's
        socket, :func:`dmore_nova.xen.real.xen.connect_xenstore`).
    """

    def __init__(self, xs: XenStore, *,
                 migrate_argv: Callable[[str, bool], Sequence[str]] = xl_migrate_argv,
                 unpause_argv: Callable[[int], Sequence[str]] = xl_unpause_argv,
                 is_paused: Callable[[int], bool | None] = xl_paused,
                 set_target: Callable[[int, int], None] | None = None) -> None:
        self.xs = xs
        self.migrate_argv, self.unpause_argv = migrate_argv, unpause_argv
        self.is_paused = is_paused
        self.set_target = set_target
        self._proc: subprocess.Popen | None = None
        self._out: list[bytes] = []
        self._reader: threading.Thread | None = None

    # -- domains -----------------------------------------------------------------------------
    def find_named(self, name: str) -> int | None:
        """The domid of the domain named ``name`` in xenstore (what ``xl domid`` answers)."""
        want = name.encode()
        for d in self.xs.directory("/local/domain"):
            if d.isdigit():
                try:
                    if self.xs.read(f"/local/domain/{d}/name") == want:
                        return int(d)
                except XenError:
                    continue  # went away meanwhile
        return None

    def domid_of(self, name_or_id: str) -> int:
        if name_or_id.isdigit():
            return int(name_or_id)
        d = self.find_named(name_or_id)
        if d is None:
            raise LookupError(f"no domain named {name_or_id!r}")
        return d

    # -- the commands ------------------------------------------------------------------------
    def run(self, machine: CoMigration) -> dict[str, Any]:
        """Drive ``machine`` to its end; the report.  A running ``xl migrate`` is always waited
        for (bounded) before returning."""
        cmd = machine.start()
        try:
            while not isinstance(cmd, Finish):
                cmd = machine.observe(self.execute(cmd))
        finally:
            if self._proc is not None and self._proc.poll() is None:
                LOG.warning("co-migration ended with xl migrate still running: waiting")
                self._wait_proc(MIGRATE_TIMEOUT)
        return cmd.report

    def execute(self, cmd: Command) -> Observation:
        """One command; a failure of xenstore or of starting xl becomes the observation the
        machine handles (no ack, xl failed), so that it can still roll back or report."""
        if isinstance(cmd, SendRequest):
            try:
                self.send(cmd.domid, cmd.request.encode())
            except OSError as exc:
                return AckMissing(f"could not write the request {cmd.request.encode()!r} "
                                  f"for dom{cmd.domid}: {exc}")
            return Sent()
        if isinstance(cmd, WaitAck):
            try:
                return self.wait_ack(cmd.domid, cmd.seq, cmd.states, cmd.timeout)
            except OSError as exc:
                return AckMissing(f"reading dom{cmd.domid}'s ack: {exc}")
        if isinstance(cmd, Migrate):
            try:
                return self.migrate(cmd.name, cmd.report_incoming, cmd.timeout, cmd.paused)
            except OSError as exc:  # xl missing, or xenstore while looking for the domain
                if self._proc is not None and self._proc.poll() is None:
                    return self._ended(cmd.name, cmd.timeout)
                argv = argv_text(self.migrate_argv(cmd.name, cmd.paused))
                return MigrateEnded(127, f"{argv}: {exc}", self._find_quietly(cmd.name))
        if isinstance(cmd, WaitMigrate):
            return self._ended(cmd.name, cmd.timeout)
        if isinstance(cmd, GrantTarget):
            return Granted(grant_target(self.xs, cmd.rmvm, cmd.guest,
                                        set_target=self.set_target))
        if isinstance(cmd, Unpause):
            return self.unpause(cmd.domid)
        raise TypeError(f"not a command: {cmd!r}")

    def send(self, domid: int, text: str) -> None:
        self.xs.write(f"/local/domain/{domid}/{REQUEST_KEY}", text)

    def read_ack(self, domid: int) -> tuple[dict[str, Any] | None, bytes | None]:
        """The ack as JSON (None if absent or not a JSON object), and the raw value."""
        raw = self.xs.read(f"/local/domain/{domid}/{ACK_KEY}")
        if raw is None or len(raw) > MAX_ACK:
            return None, raw[:200] if raw else raw
        try:
            ack = json.loads(raw)
        except ValueError:
            return None, raw[:200]
        return (ack if isinstance(ack, dict) else None), raw[:200]

    def wait_ack(self, domid: int, seq: str, states: tuple[str, ...],
                 timeout: float) -> AckSeen | AckMissing:
        """Woken by a xenstore watch on the ack key (no polling)."""
        path = f"/local/domain/{domid}/{ACK_KEY}"
        token = f"dmore-ack-{seq}"
        deadline = time.monotonic() + timeout
        last: bytes | None = None
        self.xs.watch(path, token)
        try:
            while True:
                ack, last = self.read_ack(domid)
                if ack is not None and ack.get("seq") == seq and (
                        ack.get("state") in states or ack.get("state") == "error"):
                    return AckSeen(ack)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return AckMissing(f"no {'/'.join(states)} ack to request {seq} from "
                                      f"dom{domid} after {timeout:.0f} s (last value: "
                                      f"{last!r})")
                ready, _, _ = select.select([self.xs.watch_fileno()], [], [], remaining)
                if ready:
                    self.xs.read_watch_events()
        finally:
            try:
                self.xs.unwatch(path, token)
            except XenError as exc:
                LOG.debug("unwatch %s: %s", path, exc)

    def unpause(self, domid: int) -> Unpaused:
        was_paused = self.is_paused(domid)
        argv = list(self.unpause_argv(domid))
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=UNPAUSE_TIMEOUT)
        except subprocess.TimeoutExpired:
            return Unpaused(None, f"{argv_text(argv)}: still running after "
                                  f"{UNPAUSE_TIMEOUT:.0f} s", was_paused)
        except OSError as exc:
            return Unpaused(127, f"{argv_text(argv)}: {exc}", was_paused)
        return Unpaused(p.returncode, p.stdout + p.stderr, was_paused)

    def migrate(self, name: str, report_incoming: bool, timeout: float,
                paused: bool = False) -> IncomingSeen | MigrateEnded:
        argv = list(self.migrate_argv(name, paused))
        LOG.info("running %s", argv)
        self._out = []
        self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        proc = self._proc
        self._reader = threading.Thread(target=lambda: self._out.append(proc.stdout.read()),
                                        name="xl-output", daemon=True)
        self._reader.start()
        if report_incoming:
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                incoming = self.find_named(name + INCOMING_SUFFIX)
                if incoming is not None:
                    return IncomingSeen(incoming)
                time.sleep(INCOMING_POLL)
        return self._ended(name, timeout)

    def _wait_proc(self, timeout: float) -> int | None:
        assert self._proc is not None
        try:
            rc = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        if self._reader is not None:
            self._reader.join(10)
        return rc

    def _find_quietly(self, name: str) -> int | None:
        try:
            return self.find_named(name)
        except OSError as exc:
            LOG.warning("looking for domain %r: %s", name, exc)
            return None

    def _ended(self, name: str, timeout: float) -> MigrateEnded:
        rc = self._wait_proc(timeout)
        output = b"".join(self._out).decode("utf-8", "replace")
        domid = self._find_quietly(name)
        LOG.info("xl migrate %s: rc %s, %s now dom%s", name, rc, name, domid)
        return MigrateEnded(rc, output, domid)

    def request(self, domid: int, text: str, timeout: float) -> AckSeen | AckMissing:
        """Send ``<seq> text`` and wait for the ack with that seq, whatever its state (for an
        operator: ``resume`` by hand, or checking the channel)."""
        seq = str(time.time_ns())
        self.send(domid, f"{seq} {text}")
        return self.wait_ack(domid, seq, ("prepared", "resumed", "plugged", "done",
                                          "devices-not-connected"), timeout)


def comigrate(xs: XenStore, rmvm: str, guest: str, **kw: Any) -> dict[str, Any]:
    """Co-migrate ``rmvm`` and ``guest`` on this host; the report (``ok``, ``state``,
    ``error``, ``steps`` with seconds each, old and new domids, the grant)."""
    ts = XlToolstack(xs, **kw)
    machine = CoMigration(rmvm, guest, ts.domid_of(rmvm), ts.domid_of(guest))
    return ts.run(machine)
