"""Live migration of a guest between sim hosts, the way ``xl migrate`` does it.

The toolstack acts as dom0 on both hosts (``xl migrate`` on the source, ``xl migrate-receive``
on the destination) and goes through the phases of libxl/libxc's live save/restore:

1. **prepare** -- the destination creates a new domain (a new domid), *paused*, with the same
   memory size (``libxl__domain_make`` + ``xc_domain_setmaxmem``);
2. **precopy** -- log-dirty goes on, round 0 copies every page, then each round copies the pages
   dirtied during the previous one, until the dirty set is at most
   :data:`DEFAULT_DIRTY_THRESHOLD` pages or :data:`DEFAULT_MAX_ITERATIONS` rounds were done
   (libxc's ``send_memory_live``);
3. **stop-and-copy** -- the guest suspends (Linux: ``control/shutdown = suspend``), the source
   domain is paused and the last dirty pages are copied, including the pages other domains map
   writable (``XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL``).  The grant table is **not** carried (Xen
   never migrates it; Linux frontends re-grant on resume), nor are event channels;
4. **devices** -- the destination toolstack re-creates the guest's devices for the new domid
   from its own record (``/libxl/<domid>/device``, :mod:`.devices`), with the backend domain
   mapped to the destination's (dom0, or the RM VM's new domid);
5. **resume** -- the destination domain is unpaused and the guest re-attaches there as the new
   domid: its process connects to the destination host (:meth:`~.kernel.SimKernel.resume_on`)
   and its frontends resume the Linux way (new grants, ports, frames).  This is the commit
   point: from here on the migration can no longer be rolled back;
6. **release** -- the source domain is destroyed (``@releaseDomain``) and its device dirs are
   deleted, as xl does once the destination reported a successful start.

The pages go through the public mechanisms, as libxc's do: ``xenforeignmemory_map`` of the
source domain (read-only) and of the destination domain (writable), :data:`MAX_BATCH_SIZE` pages
at a time.  The dirty log has two halves because two kinds of writers exist: the guest's own
stores, which only its kernel can log in the sim (:class:`MigratingGuest`), and other domains'
writes through mappings the host handed out, which the host logs (``XEN_DOMCTL_shadow_op``).

**The guest process.**  A sim guest is a process acting as its domain; migrating it means that
process re-attaching elsewhere.  :class:`MigratingGuest` is what the toolstack asks of it (the
sim's stand-in for the suspend/resume path a PV kernel runs): dirty log on/take, suspend,
resume on (run dir, domid), or resume where it was when the migration is cancelled
(``suspend_cancel``).  Answers from the guest are untrusted: dirty frames outside the domain are
ignored and counted.

**Failures.**  Any failure before the commit point can be undone by :meth:`LiveMigration.rollback`
(destination domain and its device dirs destroyed, log-dirty off, source unpaused, guest told
its suspend was cancelled): the guest keeps running on the source.  A failure at or after the
commit point raises :class:`MigrationError` with ``committed=True`` and leaves the source
domain paused, not destroyed, as ``xl`` leaves it when the destination fails after "go".
``fault`` (a callable taking the :class:`Phase` about to run) is the test hook for failure
injection.

Every limit is explicit: :data:`MAX_ITERATIONS_LIMIT`, :data:`MAX_BATCH_SIZE`,
:data:`MAX_DEVICE_KEYS`, and the host's ``SIM_MAX_ARRAY`` per log-dirty call.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from dmore_nova.xen.api import XenError, XenStore
from dmore_nova.xen.sim import devices
from dmore_nova.xen.sim import hypercall as hc
from dmore_nova.xen.sim.client import SimToolstack, SimXen
from dmore_nova.xen.sim.hypercall import SimOp

LOG = logging.getLogger(__name__)

DEFAULT_MAX_ITERATIONS = 5
"""Pre-copy rounds after round 0, at most (libxc ``ctx->save.max_iterations``)."""
DEFAULT_DIRTY_THRESHOLD = 50
"""Stop iterating once a round leaves at most this many dirty pages (libxc
``ctx->save.dirty_threshold``)."""
MAX_ITERATIONS_LIMIT = 64
"""Largest ``max_iterations`` accepted."""
MAX_BATCH_SIZE = 1024
"""Pages mapped and copied at once (libxc's ``MAX_BATCH_SIZE`` per PAGE_DATA record)."""
MAX_DEVICE_KEYS = 64
"""Backend keys carried per device from the toolstack's record."""
_DEVICE_PLUMBING_KEYS = frozenset({"frontend", "backend", "frontend-id", "online", "state"})


class Phase(enum.Enum):
    """The phases, in order (see the module docstring)."""

    PREPARE = "prepare"
    PRECOPY = "precopy"
    STOP_AND_COPY = "stop-and-copy"
    DEVICES = "devices"
    RESUME = "resume"
    RELEASE = "release"


PHASES = tuple(Phase)


class MigrationError(XenError):
    """A migration failed in ``phase``; ``committed``: the guest may already run on the
    destination (no rollback possible)."""

    def __init__(self, code: int, msg: str, *, phase: Phase | None = None,
                 committed: bool = False) -> None:
        super().__init__(code, msg)
        self.phase = phase
        self.committed = committed


class MigratingGuest(Protocol):
    """What the toolstack asks of the guest being migrated (the process that *is* the domain).

    On real Xen this is the PV kernel's own suspend/resume path plus the hypervisor's log-dirty
    mode; in the sim the guest process does it when told (see the module docstring).
    """

    def enable_dirty_log(self) -> None:
        """Start logging the pages the guest writes."""

    def take_dirty_log(self) -> Sequence[int]:
        """Frames written since the last call (clears the log)."""

    def suspend(self) -> None:
        """Stop: no more writes to memory, no more hypercalls or xenstore requests, until
        :meth:`resume` or :meth:`resume_cancelled`.  Returns once the guest is quiescent."""

    def resume(self, run_dir: Path, domid: int) -> None:
        """Continue as domain ``domid`` of the host at ``run_dir`` (memory already there);
        frontends resume as Linux's do.  Returns once the guest runs there."""

    def resume_cancelled(self) -> None:
        """The suspend was cancelled: continue on the source, devices untouched
        (``suspend_cancel``)."""


@dataclass(frozen=True)
class DeviceSpec:
    """One device as the toolstack recorded it (``/libxl/<domid>/device/<kind>/<devid>``)."""

    kind: str
    devid: int
    backend_domid: int
    backend_keys: tuple[tuple[str, str], ...] = ()


@dataclass
class RoundStats:
    index: int
    pages: int
    seconds: float


@dataclass
class MigrationReport:
    """Timings and counts of one migration (what ``xl migrate -d`` prints, and downtime)."""

    name: str
    domid: int
    src_host: str
    dst_host: str
    nr_pages: int = 0
    new_domid: int | None = None
    rounds: list[RoundStats] = field(default_factory=list)
    final: RoundStats | None = None
    downtime: float | None = None
    """Seconds from pausing the source to the guest running on the destination."""
    total: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    devices: list[DeviceSpec] = field(default_factory=list)
    bad_dirty_frames: int = 0
    """Frames the guest reported dirty that it does not have (ignored)."""

    @property
    def pages_sent(self) -> int:
        return sum(r.pages for r in self.rounds) + (self.final.pages if self.final else 0)

    def summary(self) -> str:
        rounds = ", ".join(f"r{r.index}:{r.pages}p/{r.seconds * 1e3:.1f}ms" for r in self.rounds)
        final = (f"final:{self.final.pages}p/{self.final.seconds * 1e3:.1f}ms"
                 if self.final else "final:-")
        downtime = f"{self.downtime * 1e3:.1f}ms" if self.downtime is not None else "-"
        return (f"dom{self.domid}@{self.src_host} -> dom{self.new_domid}@{self.dst_host}: "
                f"{rounds}; {final}; downtime {downtime}; total {self.total * 1e3:.1f}ms")


def _run_dir(host: str | os.PathLike[str] | object) -> Path:
    """A host's run dir from a path or anything with ``run_dir`` (the supervisor's handle)."""
    run_dir = getattr(host, "run_dir", host)
    return Path(run_dir)  # type: ignore[arg-type]


# -- the toolstack's log-dirty calls -----------------------------------------------------------

def _shadow_op(xen0: SimXen, domid: int, op: int, mode: int = 0, start: int = 0
               ) -> dict[str, object]:
    res, _ = xen0.connection.call(SimOp.XEN_DOMCTL_shadow_op, domid=domid, shadow_op=op,
                                  mode=mode, start=start)
    return res


def log_dirty_enable(xen0: SimXen, domid: int) -> None:
    """``XEN_DOMCTL_SHADOW_OP_ENABLE`` with ``XEN_DOMCTL_SHADOW_ENABLE_LOG_DIRTY``."""
    _shadow_op(xen0, domid, hc.XEN_DOMCTL_SHADOW_OP_ENABLE,
               hc.XEN_DOMCTL_SHADOW_ENABLE_LOG_DIRTY)


def log_dirty_disable(xen0: SimXen, domid: int) -> None:
    _shadow_op(xen0, domid, hc.XEN_DOMCTL_SHADOW_OP_OFF)


def log_dirty_clean(xen0: SimXen, domid: int, *, final: bool = False) -> set[int]:
    """``XEN_DOMCTL_SHADOW_OP_CLEAN``: the frames other domains dirtied since the last call
    (and, ``final``, every frame they map writable)."""
    mode = hc.XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL if final else 0
    out: set[int] = set()
    start = 0
    while True:
        res = _shadow_op(xen0, domid, hc.XEN_DOMCTL_SHADOW_OP_CLEAN, mode, start)
        out.update(res["frames"])  # type: ignore[arg-type]
        nxt = int(res["next"])  # type: ignore[arg-type]
        if not nxt or nxt <= start:
            return out
        start = nxt


# -- device records ------------------------------------------------------------------------------

def read_devices(xs: XenStore, domid: int) -> list[DeviceSpec]:
    """The guest's devices from the toolstack's own record (never from the guest-writable
    frontend dirs), with the backend keys libxl wrote (``vnc``, ``feature-*``, ...)."""
    out: list[DeviceSpec] = []
    for dev in devices.list_devices(xs, domid):
        keys: list[tuple[str, str]] = []
        for key in xs.directory(dev.libxl):
            if key in _DEVICE_PLUMBING_KEYS:
                continue
            if len(keys) >= MAX_DEVICE_KEYS:
                raise XenError(errno.E2BIG, f"{dev.libxl}: more than {MAX_DEVICE_KEYS} keys")
            value = xs.read(f"{dev.libxl}/{key}")
            if value is not None:
                keys.append((key, value.decode("utf-8", "replace")))
        out.append(DeviceSpec(dev.kind, dev.devid, dev.be_domid, tuple(keys)))
    return out


# -- the migration -------------------------------------------------------------------------------

class LiveMigration:
    """One guest's live migration from the host at ``src`` to the host at ``dst``.

    ``src``/``dst``: run dirs (or supervisor handles).  ``backend_map``: source backend domid
    -> destination backend domid (identity by default: dom0 stays dom0); it may be changed
    until the devices phase (co-migration learns the RM VM's new domid only then).
    ``fault(phase)`` runs before each phase (tests raise from it).

    Use :meth:`run` for the whole thing, or the phase methods in order (co-migration
    interleaves its own steps between them); :meth:`rollback` undoes an uncommitted one;
    :meth:`close` drops the toolstack connections.
    """

    def __init__(self, src: str | os.PathLike[str] | object, dst: str | os.PathLike[str] | object,
                 domid: int, guest: MigratingGuest, *,
                 backend_map: Mapping[int, int] | None = None,
                 max_iterations: int = DEFAULT_MAX_ITERATIONS,
                 dirty_threshold: int = DEFAULT_DIRTY_THRESHOLD,
                 fault: Callable[[Phase], None] | None = None) -> None:
        if not 0 <= max_iterations <= MAX_ITERATIONS_LIMIT:
            raise ValueError(f"max_iterations {max_iterations} not in 0..{MAX_ITERATIONS_LIMIT}")
        if dirty_threshold < 0:
            raise ValueError("dirty_threshold must be >= 0")
        self.src_dir, self.dst_dir = _run_dir(src), _run_dir(dst)
        if self.src_dir.resolve() == self.dst_dir.resolve():
            raise ValueError("source and destination are the same host")
        self.domid = domid
        self.guest = guest
        self.backend_map: dict[int, int] = dict(backend_map or {})
        self.max_iterations = max_iterations
        self.dirty_threshold = dirty_threshold
        self.fault = fault
        self.phase: Phase | None = None
        self.done: set[Phase] = set()
        self.committed = False
        self.released = False
        self.new_domid: int | None = None
        self.devices: list[DeviceSpec] = []
        self.report = MigrationReport(name="", domid=domid, src_host=str(self.src_dir),
                                      dst_host=str(self.dst_dir))
        self._src0: SimXen | None = None
        self._dst0: SimXen | None = None
        self._src_ts: SimToolstack | None = None
        self._dst_ts: SimToolstack | None = None
        self._log_dirty = False
        self._guest_logging = False
        self._suspended = False
        self._paused = False
        self._plugged: list[DeviceSpec] = []
        self._pending: set[int] = set()
        self._t0 = 0.0
        self._t_pause = 0.0

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def src0(self) -> SimXen:
        assert self._src0 is not None, "prepare() first"
        return self._src0

    @property
    def dst0(self) -> SimXen:
        assert self._dst0 is not None, "prepare() first"
        return self._dst0

    def _enter(self, phase: Phase) -> float:
        expected = PHASES[len(self.done)] if len(self.done) < len(PHASES) else None
        if phase is not expected:
            raise MigrationError(errno.EINVAL, f"phase {phase.value} out of order "
                                               f"(next is {expected.value if expected else '-'})",
                                 phase=phase, committed=self.committed)
        self.phase = phase
        if self.fault is not None:
            self.fault(phase)
        return time.perf_counter()

    def _leave(self, phase: Phase, t0: float) -> None:
        dt = time.perf_counter() - t0
        self.report.phases[phase.value] = dt
        self.done.add(phase)
        LOG.info("migrate dom%d: %s done in %.1f ms", self.domid, phase.value, dt * 1e3)

    def _valid_frames(self, frames: Iterable[int]) -> set[int]:
        out: set[int] = set()
        bad = 0
        n = self.report.nr_pages
        for f in frames:
            if isinstance(f, int) and not isinstance(f, bool) and 0 <= f < n:
                out.add(f)
            else:
                bad += 1
        if bad:
            self.report.bad_dirty_frames += bad
            LOG.warning("migrate dom%d: guest reported %d dirty frames it does not have",
                        self.domid, bad)
        return out

    def _dirty(self, *, final: bool = False) -> set[int]:
        frames = self._valid_frames(self.guest.take_dirty_log())
        frames |= log_dirty_clean(self.src0, self.domid, final=final)
        return frames

    def _copy(self, frames: Sequence[int]) -> None:
        """Copy ``frames`` from the source domain to the same frames of the new one."""
        assert self.new_domid is not None
        for i in range(0, len(frames), MAX_BATCH_SIZE):
            batch = frames[i:i + MAX_BATCH_SIZE]
            with self.src0.map_foreign(self.domid, batch) as s, \
                    self.dst0.map_foreign(self.new_domid, batch, writable=True) as d:
                d.mem[:] = s.mem

    # -- phases ----------------------------------------------------------------------------------
    def prepare(self) -> int:
        """Create the destination domain, paused, with the source's memory size; returns the
        new domid."""
        t0 = self._t0 = self._enter(Phase.PREPARE)
        self._src0 = SimXen(self.src_dir, 0)
        self._dst0 = SimXen(self.dst_dir, 0)
        self._src_ts = SimToolstack(self.src_dir)
        self._dst_ts = SimToolstack(self.dst_dir)
        self.report.src_host, self.report.dst_host = self._src_ts.host, self._dst_ts.host
        info = self._src_ts.domain_info(self.domid)
        if info is None or info.dying:
            raise MigrationError(errno.ESRCH, f"no domain {self.domid} on {self.src_dir}",
                                 phase=Phase.PREPARE)
        if self.domid == 0:
            raise MigrationError(errno.EINVAL, "dom0 does not migrate", phase=Phase.PREPARE)
        self.report.name, self.report.nr_pages = info.name, info.max_pages
        self.devices = read_devices(self.src0.xenstore, self.domid)
        self.report.devices = list(self.devices)
        self.new_domid = self._dst_ts.create_domain(info.name, info.max_pages, paused=True)
        self.report.new_domid = self.new_domid
        LOG.info("migrate dom%d %r (%d pages, %d devices) from %s: dom%d created paused on %s",
                 self.domid, info.name, info.max_pages, len(self.devices),
                 self.report.src_host, self.new_domid, self.report.dst_host)
        self._leave(Phase.PREPARE, t0)
        return self.new_domid

    def precopy(self) -> None:
        """Log-dirty on; round 0 sends every page, later rounds what the previous one
        dirtied, until the dirty set is small or the round limit is reached."""
        t0 = self._enter(Phase.PRECOPY)
        log_dirty_enable(self.src0, self.domid)
        self._log_dirty = True
        self.guest.enable_dirty_log()
        self._guest_logging = True
        todo: list[int] = list(range(self.report.nr_pages))
        index = 0
        while True:
            t = time.perf_counter()
            self._copy(todo)
            stats = RoundStats(index, len(todo), time.perf_counter() - t)
            self.report.rounds.append(stats)
            LOG.info("migrate dom%d: round %d sent %d pages in %.1f ms", self.domid, index,
                     stats.pages, stats.seconds * 1e3)
            dirty = self._dirty()
            index += 1
            if len(dirty) <= self.dirty_threshold or index > self.max_iterations:
                self._pending = dirty
                break
            todo = sorted(dirty)
        self._leave(Phase.PRECOPY, t0)

    def stop_and_copy(self) -> None:
        """Suspend the guest, pause the source, send the last dirty pages."""
        t0 = self._enter(Phase.STOP_AND_COPY)
        self._t_pause = time.perf_counter()
        self._suspended = True  # from here on a rollback must resume it, whatever happened
        self.guest.suspend()
        self._src_ts.pause_domain(self.domid)  # type: ignore[union-attr]
        self._paused = True
        t = time.perf_counter()
        final = sorted(self._pending | self._dirty(final=True))
        self._copy(final)
        self.report.final = RoundStats(len(self.report.rounds), len(final),
                                       time.perf_counter() - t)
        log_dirty_disable(self.src0, self.domid)
        self._log_dirty = False
        LOG.info("migrate dom%d: stop-and-copy sent %d pages in %.1f ms", self.domid,
                 len(final), self.report.final.seconds * 1e3)
        self._leave(Phase.STOP_AND_COPY, t0)

    def plug_devices(self) -> None:
        """The destination toolstack re-creates the devices for the new domid."""
        t0 = self._enter(Phase.DEVICES)
        assert self.new_domid is not None
        xs = self.dst0.xenstore
        for spec in self.devices:
            backend = self.backend_map.get(spec.backend_domid, spec.backend_domid)
            if self._dst_ts.domain_info(backend) is None:  # type: ignore[union-attr]
                raise MigrationError(errno.ENODEV, f"{spec.kind}/{spec.devid}: backend domain "
                                                   f"{backend} does not exist on the destination",
                                     phase=Phase.DEVICES)
            self._plugged.append(spec)
            devices.add_device(xs, spec.kind, self.new_domid, backend, spec.devid,
                               backend_keys=dict(spec.backend_keys))
        self._leave(Phase.DEVICES, t0)

    def resume(self) -> None:
        """Unpause the destination domain and let the guest re-attach there: the commit
        point."""
        t0 = self._enter(Phase.RESUME)
        assert self.new_domid is not None
        self._dst_ts.unpause_domain(self.new_domid)  # type: ignore[union-attr]
        self.committed = True
        try:
            self.guest.resume(self.dst_dir, self.new_domid)
        except Exception as exc:
            raise MigrationError(errno.EIO, f"guest failed to resume as dom{self.new_domid}: "
                                            f"{exc}", phase=Phase.RESUME, committed=True) from exc
        self.report.downtime = time.perf_counter() - self._t_pause
        LOG.info("migrate dom%d: running as dom%d on %s; downtime %.1f ms", self.domid,
                 self.new_domid, self.report.dst_host, self.report.downtime * 1e3)
        self._leave(Phase.RESUME, t0)

    def release(self) -> None:
        """Destroy the source domain (``@releaseDomain``) and its device dirs."""
        t0 = self._enter(Phase.RELEASE)
        self._src_ts.destroy_domain(self.domid)  # type: ignore[union-attr]
        xs = self.src0.xenstore
        for spec in self.devices:
            devices.destroy_device(xs, spec.kind, self.domid, spec.devid)
        xs.rm(f"/libxl/{self.domid}")  # libxl__destroy_domid: the toolstack's record goes too
        self.released = True
        self._leave(Phase.RELEASE, t0)
        self.report.total = time.perf_counter() - self._t0
        LOG.info("migrated: %s", self.report.summary())

    def switch_over(self) -> None:
        """The phases from stop-and-copy to resume (those not done yet): the guest stops
        here and runs there."""
        for phase, step in ((Phase.STOP_AND_COPY, self.stop_and_copy),
                            (Phase.DEVICES, self.plug_devices), (Phase.RESUME, self.resume)):
            if phase not in self.done:
                step()

    def run(self) -> MigrationReport:
        """All phases; an uncommitted failure is rolled back before the error is raised."""
        try:
            self.prepare()
            self.precopy()
            self.switch_over()
        except BaseException as exc:
            if not self.committed:
                try:
                    self.rollback()
                except Exception:
                    LOG.exception("migrate dom%d: rollback failed", self.domid)
            if isinstance(exc, MigrationError):
                raise
            if isinstance(exc, Exception):
                raise MigrationError(getattr(exc, "errno", None) or errno.EIO,
                                     f"migration of dom{self.domid} failed in "
                                     f"{self.phase.value if self.phase else '-'}: {exc}",
                                     phase=self.phase, committed=self.committed) from exc
            raise
        try:
            self.release()
        except Exception as exc:
            raise MigrationError(getattr(exc, "errno", None) or errno.EIO,
                                 f"dom{self.domid} runs as dom{self.new_domid} on the "
                                 f"destination, but releasing the source failed: {exc}",
                                 phase=Phase.RELEASE, committed=True) from exc
        return self.report

    # -- undo / teardown -------------------------------------------------------------------------
    def rollback(self) -> None:
        """Undo an uncommitted migration: the guest goes on running on the source as if
        nothing happened; the destination keeps nothing.  Every step is attempted; the first
        error is raised at the end."""
        if self.committed:
            raise MigrationError(errno.EBUSY, "the guest runs on the destination: no rollback",
                                 phase=self.phase, committed=True)
        errors: list[BaseException] = []

        def attempt(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as exc:
                LOG.warning("migrate dom%d: rollback: %s: %s", self.domid, what, exc)
                errors.append(exc)

        if self._log_dirty and self._src0 is not None:
            attempt("log-dirty off", lambda: log_dirty_disable(self.src0, self.domid))
            self._log_dirty = False
        if self._paused and self._src_ts is not None:
            attempt("unpause source", lambda: self._src_ts.unpause_domain(self.domid))
            self._paused = False
        if self._suspended:
            attempt("guest resume_cancelled", self.guest.resume_cancelled)
            self._suspended = False
        if self.new_domid is not None and self._dst_ts is not None:
            new = self.new_domid
            attempt("destroy destination domain", lambda: self._dst_ts.destroy_domain(new))
            for spec in self._plugged:
                attempt(f"destroy {spec.kind}/{spec.devid}",
                        lambda s=spec: devices.destroy_device(self.dst0.xenstore, s.kind, new,
                                                              s.devid))
            if self._plugged:
                attempt("toolstack record", lambda: self.dst0.xenstore.rm(f"/libxl/{new}"))
            self._plugged.clear()
            self.new_domid = None
        LOG.info("migrate dom%d: rolled back (in %s)", self.domid,
                 self.phase.value if self.phase else "-")
        if errors:
            raise errors[0]

    def close(self) -> None:
        for obj in (self._src0, self._dst0, self._src_ts, self._dst_ts):
            if obj is not None:
                with contextlib.suppress(Exception):
                    obj.close()
        self._src0 = self._dst0 = None
        self._src_ts = self._dst_ts = None

    def __enter__(self) -> LiveMigration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def migrate(src: str | os.PathLike[str] | object, dst: str | os.PathLike[str] | object,
            domid: int, guest: MigratingGuest, **kw) -> MigrationReport:
    """``xl migrate``: the whole live migration of ``domid``; see :class:`LiveMigration`."""
    with LiveMigration(src, dst, domid, guest, **kw) as mig:
        return mig.run()


# -- what co-migration needs from the sim toolstack ---------------------------------------------

class StatelessDomain:
    """A domain whose process keeps no state in the domain's pages, as a
    :class:`MigratingGuest`: no dirty pages, nothing to do at suspend or resume.  In the sim
    that is the RM VM: its "process" is the RM agent, whose state lives in the agent's own
    process and moves with it (:meth:`RMAgent.rehome`), not in the RM VM's pages."""

    def enable_dirty_log(self) -> None:
        pass

    def take_dirty_log(self) -> Sequence[int]:
        return ()

    def suspend(self) -> None:
        pass

    def resume(self, run_dir: Path, domid: int) -> None:
        pass

    def resume_cancelled(self) -> None:
        pass


class SimMigrationPlatform:
    """The toolstack of a source and a destination sim host, as co-migration
    (:mod:`dmore_nova.rm_vm.comigration`) uses it: migrations, ``set_target`` and the RM agent's
    ``Xen`` at the destination.  ``migration_options`` go to every :class:`LiveMigration`."""

    def __init__(self, src: str | os.PathLike[str] | object,
                 dst: str | os.PathLike[str] | object, **migration_options) -> None:
        self.src, self.dst = _run_dir(src), _run_dir(dst)
        self.migration_options = migration_options
        self._dst_ts: SimToolstack | None = None

    def guest_migration(self, domid: int, guest: MigratingGuest) -> LiveMigration:
        return LiveMigration(self.src, self.dst, domid, guest, **self.migration_options)

    def vm_migration(self, domid: int) -> LiveMigration:
        """The RM VM's own domain (see :class:`StatelessDomain`)."""
        opts = {k: v for k, v in self.migration_options.items() if k != "fault"}
        return LiveMigration(self.src, self.dst, domid, StatelessDomain(), **opts)

    def set_target(self, domid: int, target: int) -> None:
        """On the destination: ``domid`` (the RM VM) gets privilege over ``target``."""
        if self._dst_ts is None:
            self._dst_ts = SimToolstack(self.dst)
        self._dst_ts.set_target(domid, target)

    def open_xen(self, domid: int) -> SimXen:
        """``api.Xen`` acting as ``domid`` on the destination, xenstore connected."""
        xen = SimXen(self.dst, domid)
        try:
            xen.xenstore  # noqa: B018 - connect now, not lazily on the caller's event loop
        except BaseException:
            xen.close()
            raise
        return xen

    def close(self) -> None:
        if self._dst_ts is not None:
            with contextlib.suppress(Exception):
                self._dst_ts.close()
            self._dst_ts = None
