"""Co-migration: a guest and its RM agent move to another host together, as one protocol.

D-MORE's point is that the console survives a live migration: the RM agent (in the RM VM, or in
dom0) goes where the guest goes, keeps its viewers' connections, and reconnects to the guest's
devices on the other side.  The order of operations is explicit, with named states, each logged
with its timing:

1. **prepare** -- the destination gets the guest's new domain (and the RM VM's, when the RM is a
   VM: its new domid becomes the backend of the guest's devices there and the guest's *target*),
   and guest memory is pre-copied while the agent keeps serving;
2. **guest switchover** -- input is frozen (held in order, bounded) and the agent waits until
   the guest consumed its vkbd ring (a resuming Linux frontend throws away what is left in its
   old page); then stop-and-copy, the destination toolstack re-creates the devices and the
   guest resumes there as the new domid (the commit point);
3. **RM re-home** -- the agent swaps its ``Xen`` to the destination (as the RM VM's new domid, or
   as dom0 there) and re-creates its vkbd/vfb backends for the new guest domid; its RFB server
   and viewer sockets stay (same process, as a migrating VM keeps its TCP connections);
4. **re-map / re-bind** -- the resumed frontends published new grants, frames and ports; the
   backends map and bind them (waited for, woken by watch and event-channel activity);
5. **replay** -- what was queued before and held during the switchover goes to the guest, in
   order, exactly once;
6. **refresh** -- every viewer gets a full update of the re-mapped framebuffer.

Then the source domains (the guest's, and the RM VM's) are released: their destruction is
not on the path from the guest's resume to the viewers' refresh, so it waits until the console
is back.

**Failures.**  Before the guest's commit point everything is rolled back: the guest is told its
suspend was cancelled and runs on the source, the destination domains go, and the agent, which
never left, replays the held input into the old ring.  After it, the guest's migration is
completed regardless, and if the RM side cannot follow (re-home, re-map, replay or refresh
failed) a *new* agent is started at the destination for the guest, with the pending input
handed over; its viewers reconnect (through the console proxy).  :class:`CoMigrationProtocol`
is the sans-IO part (states, order, timings, which recovery a failure calls for);
:class:`CoMigration` drives it through a :class:`MigrationPlatform` -- the toolstack of the two
hosts; on the sim :class:`dmore_nova.xen.sim.migration.SimMigrationPlatform` (rm_vm imports no
hypervisor implementation, only these interfaces and ``xen.api``).  ``fault``
``(state, "start" | "end")`` is the failure-injection hook.

Ownership: :class:`CoMigration` takes over the agent's ``Xen`` objects.  Each one the agent
leaves behind (the source's after a re-home, both after a restart) is closed; the one in use at
the end belongs with ``report.agent``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from dmore_nova.rm_vm.agent import RMAgent
from dmore_nova.xen.api import Xen

LOG = logging.getLogger(__name__)

DRAIN_TIMEOUT = 2.0
"""Seconds the guest gets to consume its vkbd ring once input is frozen (else: rollback)."""
CONNECT_TIMEOUT = 5.0
"""Seconds the re-created backends get to re-map and re-bind (else: restart)."""
VIEWER_DRAIN_TIMEOUT = 0.5
"""Seconds a restart waits for the old agent's viewers to close their half-closed connections
(the input they sent until then is carried to the new agent)."""
VIEWER_DRAIN_POLL = 0.005
"""Check interval of that bounded wait (a viewer's close wakes nothing the agent waits on)."""
REPLAY_TIMEOUT = 2.0
"""Seconds to wait for replayed input to be in the ring (a slow guest is not a failure: the
rest stays queued and goes out as it consumes)."""


class State(enum.Enum):
    IDLE = "idle"
    PREPARE = "prepare"
    GUEST_SWITCHOVER = "guest-switchover"
    RM_REHOME = "rm-rehome"
    REMAP_REBIND = "remap-rebind"
    REPLAY = "replay"
    REFRESH = "refresh"
    DONE = "done"
    ROLLED_BACK = "rolled-back"
    RESTARTED = "restarted-at-destination"
    FAILED = "failed"


STEPS: tuple[State, ...] = (State.PREPARE, State.GUEST_SWITCHOVER, State.RM_REHOME,
                            State.REMAP_REBIND, State.REPLAY, State.REFRESH)
TERMINAL = frozenset({State.DONE, State.ROLLED_BACK, State.RESTARTED, State.FAILED})


class Recovery(enum.Enum):
    ROLLBACK = "rollback"
    """The guest has not left: undo everything, guest and agent go on at the source."""
    RESTART_AT_DESTINATION = "restart-at-destination"
    """The guest runs at the destination: finish its migration, start a new agent there."""


class GuestMover(Protocol):
    """One domain's live migration, phase by phase (``xl migrate``'s; on the sim
    :class:`dmore_nova.xen.sim.migration.LiveMigration`)."""

    domid: int
    new_domid: int | None
    committed: bool
    released: bool
    backend_map: dict[int, int]
    report: Any

    def prepare(self) -> int: ...

    def precopy(self) -> None: ...

    def switch_over(self) -> None:
        """Stop-and-copy, devices at the destination, resume there (the commit point)."""

    def release(self) -> None: ...

    def rollback(self) -> None: ...

    def close(self) -> None: ...


class MigrationPlatform(Protocol):
    """The toolstack of the source and destination hosts, as co-migration needs it."""

    def guest_migration(self, domid: int, guest: Any) -> GuestMover: ...

    def vm_migration(self, domid: int) -> GuestMover:
        """The RM VM's own domain (its state moves with the agent, not in its pages)."""

    def set_target(self, domid: int, target: int) -> None:
        """On the destination: ``domid`` gets privilege over ``target``."""

    def open_xen(self, domid: int) -> Xen:
        """``api.Xen`` acting as ``domid`` on the destination."""

    def close(self) -> None: ...


class ProtocolViolation(Exception):
    """A step was driven out of order (a bug in the driver, never a runtime condition)."""


class CoMigrationError(Exception):
    """A co-migration step could not complete (timeouts, refusals)."""


@dataclass
class StepRecord:
    state: State
    started: float
    ended: float | None = None
    error: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float | None:
        return None if self.ended is None else self.ended - self.started


class CoMigrationProtocol:
    """The co-migration's states, order, timings and failure policy, without any I/O.

    ``begin(state)`` must name the next step of :data:`STEPS`; ``end()`` completes it;
    ``commit_guest()`` marks the guest's point of no return (only inside guest switchover);
    ``fail(error)`` records a failure and says which :class:`Recovery` it calls for;
    ``finish(outcome)`` enters a terminal state consistent with what happened.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.state = State.IDLE
        self.history: list[StepRecord] = []
        self.guest_committed = False
        self.recovery: Recovery | None = None
        self.error: str | None = None
        self.outcome: State | None = None
        self._current: StepRecord | None = None
        self._t0: float | None = None
        self._t_end: float | None = None

    @property
    def completed(self) -> list[State]:
        return [r.state for r in self.history if r.ended is not None and r.error is None]

    @property
    def in_progress(self) -> State | None:
        return self._current.state if self._current is not None else None

    def begin(self, state: State) -> StepRecord:
        if self.outcome is not None:
            raise ProtocolViolation(f"already finished ({self.outcome.value})")
        if self.recovery is not None:
            raise ProtocolViolation(f"failed, recovering by {self.recovery.value}")
        if self._current is not None:
            raise ProtocolViolation(f"{state.value} while {self._current.state.value} runs")
        done = len(self.completed)
        if done >= len(STEPS) or STEPS[done] is not state:
            nxt = STEPS[done].value if done < len(STEPS) else "-"
            raise ProtocolViolation(f"{state.value} out of order (next is {nxt})")
        now = self.clock()
        if self._t0 is None:
            self._t0 = now
        self._current = StepRecord(state, now)
        self.history.append(self._current)
        self.state = state
        LOG.info("co-migration: %s", state.value)
        return self._current

    def end(self, **notes: Any) -> StepRecord:
        rec = self._current
        if rec is None:
            raise ProtocolViolation("no step in progress")
        if rec.state is State.GUEST_SWITCHOVER and not self.guest_committed:
            raise ProtocolViolation("guest switchover ends with the guest committed there")
        rec.ended = self.clock()
        rec.notes.update(notes)
        self._current = None
        LOG.info("co-migration: %s done in %.1f ms %s", rec.state.value,
                 (rec.seconds or 0) * 1e3, rec.notes or "")
        return rec

    def commit_guest(self) -> None:
        if self.in_progress is not State.GUEST_SWITCHOVER:
            raise ProtocolViolation("the guest commits during its switchover only")
        self.guest_committed = True

    def fail(self, error: BaseException | str) -> Recovery:
        if self.outcome is not None:
            raise ProtocolViolation(f"already finished ({self.outcome.value})")
        text = str(error) or type(error).__name__
        rec = self._current
        if rec is not None:
            rec.ended = self.clock()
            rec.error = text
            self._current = None
        self.error = text
        self.recovery = (Recovery.RESTART_AT_DESTINATION if self.guest_committed
                         else Recovery.ROLLBACK)
        LOG.warning("co-migration: %s failed (%s): %s", rec.state.value if rec else "-",
                    self.recovery.value, text)
        return self.recovery

    def finish(self, outcome: State) -> None:
        if outcome not in TERMINAL:
            raise ProtocolViolation(f"{outcome.value} is not a terminal state")
        if self.outcome is not None:
            raise ProtocolViolation(f"already finished ({self.outcome.value})")
        if self._current is not None:
            raise ProtocolViolation(f"{self._current.state.value} still runs")
        ok = {State.DONE: self.recovery is None and self.completed == list(STEPS),
              State.ROLLED_BACK: self.recovery is Recovery.ROLLBACK,
              State.RESTARTED: self.recovery is Recovery.RESTART_AT_DESTINATION,
              State.FAILED: self.recovery is not None}[outcome]
        if not ok:
            raise ProtocolViolation(f"cannot finish as {outcome.value} "
                                    f"(recovery {self.recovery}, done {self.completed})")
        self.outcome = self.state = outcome
        self._t_end = self.clock()
        LOG.info("co-migration: %s in %.1f ms", outcome.value, (self.total or 0) * 1e3)

    @property
    def total(self) -> float | None:
        if self._t0 is None or self._t_end is None:
            return None
        return self._t_end - self._t0

    def timings(self) -> dict[str, float]:
        return {r.state.value: r.seconds for r in self.history if r.seconds is not None}


@dataclass
class CoMigrationReport:
    outcome: State
    agent: RMAgent
    """The agent serving the guest now: the same object, or the one restarted at the
    destination."""
    steps: list[StepRecord]
    timings: dict[str, float]
    total: float | None
    error: str | None
    guest: Any
    """The guest migration's report (rounds, downtime): the platform's type."""
    rm: Any
    new_guest_domid: int | None
    new_rm_domid: int | None
    input_gap: float | None
    """Seconds input was held (freeze -> replay)."""
    console_gap: float | None
    """Seconds from freezing input to the full refresh."""
    warnings: list[str]

    def summary(self) -> str:
        steps = ", ".join(f"{r.state.value} {r.seconds * 1e3:.1f}ms"
                          + (f" ({r.error})" if r.error else "")
                          for r in self.steps if r.seconds is not None)
        gap = f"{self.console_gap * 1e3:.1f}ms" if self.console_gap is not None else "-"
        return f"{self.outcome.value}: {steps}; console gap {gap}"


class CoMigration:
    """Move ``agent``'s guest (``guest_domid`` on the source of ``platform``) and the agent
    itself to the destination.  ``guest`` is the guest's process (what the platform's guest
    migration drives: a :class:`dmore_nova.xen.sim.migration.MigratingGuest` on the sim).
    ``rm_domid``: the RM VM's domid on the source (it migrates too); None when the agent is
    dom0's on both hosts.  Run :meth:`run` on the agent's event loop; the platform's blocking
    toolstack calls run in worker threads meanwhile, so viewers keep being served.
    """

    def __init__(self, agent: RMAgent, platform: MigrationPlatform, guest_domid: int,
                 guest: Any, *, rm_domid: int | None = None,
                 fault: Callable[[State, str], None] | None = None,
                 drain_timeout: float = DRAIN_TIMEOUT, connect_timeout: float = CONNECT_TIMEOUT,
                 replay_timeout: float = REPLAY_TIMEOUT,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.agent = agent
        self.platform = platform
        self.guest_domid = guest_domid
        self.guest = guest
        self.rm_domid = rm_domid
        self.fault = fault
        self.drain_timeout = drain_timeout
        self.connect_timeout = connect_timeout
        self.replay_timeout = replay_timeout
        self.protocol = CoMigrationProtocol(clock)
        self.clock = clock
        self.guest_mig: GuestMover | None = None
        self.rm_mig: GuestMover | None = None
        self.warnings: list[str] = []
        self._abandoned: list[Xen] = []
        self._t_freeze: float | None = None
        self._t_thaw: float | None = None
        self._t_refresh: float | None = None

    # -- driver ----------------------------------------------------------------------------------
    async def run(self) -> CoMigrationReport:
        p = self.protocol
        steps = ((State.PREPARE, self._prepare), (State.GUEST_SWITCHOVER, self._switchover),
                 (State.RM_REHOME, self._rehome), (State.REMAP_REBIND, self._remap_rebind),
                 (State.REPLAY, self._replay), (State.REFRESH, self._refresh))
        try:
            try:
                for state, step in steps:
                    p.begin(state)
                    self._inject(state, "start")
                    notes = await step()
                    self._inject(state, "end")
                    p.end(**notes)
            except Exception as exc:
                recovery = p.fail(exc)
                if recovery is Recovery.ROLLBACK:
                    await self._rollback()
                else:
                    await self._restart()
            else:
                await self._release_sources()
                p.finish(State.DONE)
        finally:
            await asyncio.to_thread(self._close)
        return self._report()

    def _inject(self, state: State, when: str) -> None:
        if self.fault is not None:
            self.fault(state, when)

    def _warn(self, text: str) -> None:
        LOG.warning("co-migration: %s", text)
        self.warnings.append(text)

    # -- steps -----------------------------------------------------------------------------------
    async def _prepare(self) -> dict[str, Any]:
        def blocking() -> None:
            self.guest_mig = self.platform.guest_migration(self.guest_domid, self.guest)
            self.guest_mig.prepare()
            if self.rm_domid is not None:
                self.rm_mig = self.platform.vm_migration(self.rm_domid)
                self.rm_mig.prepare()
                assert self.rm_mig.new_domid is not None and self.guest_mig.new_domid
                # The guest's devices there are served by the RM VM's new domain, which may
                # foreign-map the guest's framebuffer (it is the guest's target).
                self.guest_mig.backend_map[self.rm_domid] = self.rm_mig.new_domid
                self.platform.set_target(self.rm_mig.new_domid, self.guest_mig.new_domid)
            self.guest_mig.precopy()
            if self.rm_mig is not None:
                self.rm_mig.precopy()

        await asyncio.to_thread(blocking)
        assert self.guest_mig is not None
        return {"new_guest_domid": self.guest_mig.new_domid,
                "new_rm_domid": self.rm_mig.new_domid if self.rm_mig else None,
                "rounds": len(self.guest_mig.report.rounds)}

    async def _switchover(self) -> dict[str, Any]:
        agent, gm = self.agent, self.guest_mig
        assert gm is not None
        agent.freeze()
        self._t_freeze = self.clock()
        if not await agent.wait_until(agent.input_drained, self.drain_timeout):
            raise CoMigrationError(f"the guest did not consume its vkbd ring within "
                                   f"{self.drain_timeout}s")
        t_drained = self.clock()
        try:
            await asyncio.to_thread(gm.switch_over)
        finally:
            if gm.committed:
                self.protocol.commit_guest()
        # The source domain is released once the console is back (_release_sources): its
        # destruction is not on the path from the guest's resume to the viewers' refresh.
        return {"drain_ms": round((t_drained - self._t_freeze) * 1e3, 3),
                "downtime_ms": round((gm.report.downtime or 0) * 1e3, 3),
                "final_pages": gm.report.final.pages if gm.report.final else 0,
                "held": len(agent.held)}

    async def _backend_xen(self) -> Xen:
        """The agent's ``Xen`` at the destination: the RM VM's new domain (its migration
        completed first), or dom0."""
        if self.rm_mig is None:
            return await asyncio.to_thread(self.platform.open_xen, 0)
        rm = self.rm_mig
        await asyncio.to_thread(rm.switch_over)
        assert rm.new_domid is not None
        return await asyncio.to_thread(self.platform.open_xen, rm.new_domid)

    async def _release_sources(self) -> None:
        """After the refresh: destroy the guest's and the RM VM's source domains (``xl``
        releases the source once the destination runs).  A failure is a warning: both run
        on the destination already."""
        gm = self.guest_mig
        if gm is not None and gm.committed and not gm.released:
            try:
                await asyncio.to_thread(gm.release)
            except Exception as exc:
                self._warn(f"guest runs as dom{gm.new_domid}, but releasing the source failed: "
                           f"{exc}")
        await self._release_rm()

    async def _release_rm(self) -> None:
        if self.rm_mig is not None and self.rm_mig.committed and not self.rm_mig.released:
            try:
                await asyncio.to_thread(self.rm_mig.release)
            except Exception as exc:
                self._warn(f"releasing the RM VM's source domain failed: {exc}")

    async def _rehome(self) -> dict[str, Any]:
        gm = self.guest_mig
        assert gm is not None and gm.new_domid is not None
        xen = await self._backend_xen()
        try:
            old = self.agent.rehome(xen, gm.new_domid)
        except BaseException:
            await asyncio.to_thread(xen.close)
            raise
        self._abandoned.append(old)
        return {"backend_domid": xen.domid, "queued": self.agent.queued_input,
                "held": len(self.agent.held)}

    async def _remap_rebind(self) -> dict[str, Any]:
        agent = self.agent
        if not await agent.wait_until(agent.devices_connected, self.connect_timeout):
            raise CoMigrationError(
                f"backends not re-connected within {self.connect_timeout}s: vkbd "
                f"{agent.vkbd.state.name} ({agent.vkbd.closed_reason or 'open'}), vfb "
                f"{agent.vfb.state.name} ({agent.vfb.closed_reason or 'open'})")
        return {"vkbd_gref": (agent.vkbd.connected_values or (None,))[0],
                "vkbd_port": agent.vkbd.port, "vfb_port": agent.vfb.port}

    async def _replay(self) -> dict[str, Any]:
        agent = self.agent
        queued = agent.queued_input
        replayed = agent.thaw()
        self._t_thaw = self.clock()
        if not await agent.wait_until(lambda: not agent.vkbd.queue, self.replay_timeout):
            self._warn(f"{len(agent.vkbd.queue)} replayed events still queued after "
                       f"{self.replay_timeout}s (the guest reads slowly; they stay queued)")
        return {"queued": queued, "held": replayed, "dropped": agent.held_dropped}

    async def _refresh(self) -> dict[str, Any]:
        viewers = self.agent.refresh()
        self._t_refresh = self.clock()
        return {"viewers": viewers}

    # -- recovery --------------------------------------------------------------------------------
    async def _rollback(self) -> None:
        """Nothing left the source: undo the migrations, let the agent's input flow again."""
        ok = True
        for mig in (self.guest_mig, self.rm_mig):
            if mig is None:
                continue
            try:
                await asyncio.to_thread(mig.rollback)
            except Exception as exc:
                ok = False
                self._warn(f"rollback of dom{mig.domid}: {exc}")
        replayed = self.agent.thaw()
        self._t_thaw = self.clock()
        LOG.info("co-migration: rolled back; agent serves dom%d on the source, %d held "
                 "events replayed", self.guest_domid, replayed)
        self.protocol.finish(State.ROLLED_BACK if ok else State.FAILED)

    async def _restart(self) -> None:
        """The guest runs at the destination but the agent could not follow: complete the
        guest's migration, stop this agent (its viewers must reconnect), start a new one there
        with the pending input."""
        gm = self.guest_mig
        assert gm is not None and gm.new_domid is not None
        if not gm.released:
            try:
                await asyncio.to_thread(gm.release)
            except Exception as exc:
                self._warn(f"releasing the guest's source domain failed: {exc}")
        old = self.agent
        await self._drain_viewers(old)
        state = old.export_input()
        try:
            await old.stop(close_devices=False)
        except Exception as exc:
            self._warn(f"stopping the old agent: {exc}")
        self._abandoned.append(old.xen)
        try:
            xen = await self._backend_xen()
            await self._release_rm()
            new = RMAgent(xen, gm.new_domid, old.server.options, devid=old.devid,
                          width=old.width, height=old.height, videoram_mb=old.videoram_mb)
            new.import_input(state)
            host, port = old.listen_addr or ("127.0.0.1", 0)
            try:
                await new.start(host, port)
            except OSError as exc:
                self._warn(f"port {port} not available again ({exc}); listening elsewhere")
                await new.start(host, 0)
            new.thaw()
        except Exception as exc:
            self._warn(f"restarting the agent at the destination failed: {exc}")
            self.protocol.finish(State.FAILED)
            return
        self.agent = new
        self._t_thaw = self.clock()
        LOG.info("co-migration: new agent for dom%d at the destination on %s",
                 gm.new_domid, new.listen_addr)
        self.protocol.finish(State.RESTARTED)

    async def _drain_viewers(self, agent: RMAgent) -> None:
        """Before the old agent closes its viewers: stop listening, half-close each connection
        (FIN, no more output) and keep reading until the viewer closes its side, at most
        :data:`VIEWER_DRAIN_TIMEOUT` seconds.  Input a viewer (or the console proxy) sent before
        it saw the FIN is then read and held -- handed to the new agent, not lost in a socket
        buffer.  The proxy closes its side at once when its backend ends, so this is quick."""
        # First no new connection: the proxy re-attaches at once when its connection ends,
        # and must find nothing listening until the new agent does.
        agent.server.stop_listening()
        viewers = [v for v in agent.server.viewers
                   if not v.closed and getattr(v, "transport", None) is not None]
        for v in viewers:
            v.paused = True  # no update on a connection whose write side is shut
            sock = v.transport.get_extra_info("socket")
            try:
                sock.shutdown(socket.SHUT_WR)
            except (OSError, AttributeError) as exc:
                LOG.info("co-migration: half-closing viewer %s: %s", v.peer, exc)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + VIEWER_DRAIN_TIMEOUT
        while any(not v.closed for v in viewers) and loop.time() < deadline:
            await asyncio.sleep(VIEWER_DRAIN_POLL)
        left = sum(1 for v in viewers if not v.closed)
        if left:
            self._warn(f"{left} viewer(s) did not close within {VIEWER_DRAIN_TIMEOUT}s of the "
                       "agent's restart; input they sent after that is lost")

    # -- teardown / report -----------------------------------------------------------------------
    def _close(self) -> None:
        for xen in self._abandoned:
            if xen is not self.agent.xen:
                with contextlib.suppress(Exception):
                    xen.close()
        self._abandoned.clear()
        for obj in (self.guest_mig, self.rm_mig, self.platform):
            if obj is not None:
                with contextlib.suppress(Exception):
                    obj.close()

    def _report(self) -> CoMigrationReport:
        p = self.protocol
        assert p.outcome is not None
        gm, rm = self.guest_mig, self.rm_mig
        t0 = self._t_freeze
        return CoMigrationReport(
            outcome=p.outcome, agent=self.agent, steps=list(p.history), timings=p.timings(),
            total=p.total, error=p.error,
            guest=gm.report if gm else None, rm=rm.report if rm else None,
            new_guest_domid=gm.new_domid if gm and gm.committed else None,
            new_rm_domid=rm.new_domid if rm and rm.committed else None,
            input_gap=(self._t_thaw - t0) if t0 is not None and self._t_thaw else None,
            console_gap=(self._t_refresh - t0) if t0 is not None and self._t_refresh else None,
            warnings=list(self.warnings))
