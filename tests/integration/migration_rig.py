"""Test rig for migrations: two sim hosts, the sim guest as a migratable "process", a typist.

:class:`GuestRunner` runs the sim guest (:class:`dmore_nova.xen.sim.guest.Guest`, Linux-like
kbdfront/fbfront) on its own asyncio loop in a thread: that thread is the guest's process.  It
implements :class:`~dmore_nova.xen.sim.migration.MigratingGuest`: dirty log through its
:class:`~dmore_nova.xen.sim.kernel.SimKernel`, suspend = its readiness sources (event channels,
xenstore watches, the scribbler) leave the loop, resume = the kernel re-attaches to the
destination host (``SimKernel.resume_on``) and the frontends resume the Linux way.

The optional *scribbler* keeps writing counters into guest pages (through the kernel, so the
writes are dirty-logged) while the guest runs, like a busy guest during pre-copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import threading
import time
from pathlib import Path

import numpy as np

from dmore_nova.xen.sim import devices
from dmore_nova.xen.sim.guest import Guest
from dmore_nova.xen.sim.kernel import SimKernel
from dmore_nova.xen.sim.memory import PAGE_SIZE
from tests.integration.rawclient import RawClient
from tests.integration.rfb_harness import LoopThread
from tests.integration.simhosts import TestSupervisor

SCRIBBLE_PAGES = 64
SCRIBBLE_PERIOD = 0.002


class Hosts:
    """Two sim hosts, ``a`` (source) and ``b`` (destination), started by the supervisor."""

    def __init__(self) -> None:
        self.sup = TestSupervisor("dmig")
        self.a = self.sup.start_host("a")
        self.b = self.sup.start_host("b")

    def close(self) -> None:
        self.sup.cleanup()


def create_guest(host, *, pages: int = 2048, backend: int = 0, name: str = "guest",
                 target_of: int | None = None) -> int:
    """A domain with a vkbd and a vfb served by ``backend``, plugged as libxl does."""
    with host.toolstack() as ts:
        domid = ts.create_domain(name, pages)
        if target_of is not None:
            ts.set_target(target_of, domid)
    xen0 = host.xen(0)
    try:
        devices.add_vkbd(xen0.xenstore, domid, backend)
        devices.add_vfb(xen0.xenstore, domid, backend)
    finally:
        xen0.close()
    return domid


class GuestRunner:
    """The sim guest as a migratable process (see the module docstring)."""

    def __init__(self, run_dir: Path, domid: int, *, scribble: bool = False) -> None:
        self.lt = LoopThread()
        self.suspended = False
        self.suspends = 0
        self.cancelled = 0
        self.scribbles = 0
        self._wired: list[int] = []
        self._scribble_task: asyncio.Task[None] | None = None
        self.scribble_frames: list[int] = []
        self.lt.call(lambda: self._start(run_dir, domid, scribble))

    # -- on the guest's loop -----------------------------------------------------------------
    def _start(self, run_dir: Path, domid: int, scribble: bool) -> None:
        self.kernel = SimKernel(run_dir, domid)
        self.guest = Guest(self.kernel, console=False)
        if scribble:
            self.scribble_frames = self.kernel.alloc_pages(SCRIBBLE_PAGES)
        self._wire()
        self.guest.handle_watches()

    def _wire(self) -> None:
        loop = asyncio.get_running_loop()
        k = self.guest.kernel
        for fd, cb in ((k.fileno(), self.guest.handle_events),
                       (k.xenstore.watch_fileno(), self.guest.handle_watches)):
            loop.add_reader(fd, cb)
            self._wired.append(fd)
        if self.scribble_frames:
            self._scribble_task = loop.create_task(self._scribble())

    def _unwire(self) -> None:
        loop = asyncio.get_running_loop()
        for fd in self._wired:
            loop.remove_reader(fd)
        self._wired.clear()
        if self._scribble_task is not None:
            self._scribble_task.cancel()
            self._scribble_task = None

    async def _scribble(self) -> None:
        n = 0
        while True:
            frame = self.scribble_frames[n % len(self.scribble_frames)]
            off = (n * 64) % PAGE_SIZE
            self.guest.kernel.write(frame, off, struct.pack("<Q", n) * 8)
            n += 1
            self.scribbles = n
            await asyncio.sleep(SCRIBBLE_PERIOD)

    def _suspend(self) -> None:
        self._unwire()
        self.suspended = True
        self.suspends += 1

    def _resume(self, run_dir: Path, domid: int) -> None:
        kernel = self.guest.kernel.resume_on(run_dir, domid)
        self.guest.resume(kernel)  # closes the old kernel
        self.kernel = kernel
        self.suspended = False
        self._wire()

    def _cancel(self) -> None:
        self.suspended = False
        self.cancelled += 1
        self._wire()

    # -- MigratingGuest (called from the toolstack's thread) ------------------------------------
    def enable_dirty_log(self) -> None:
        self.lt.call(lambda: self.guest.kernel.enable_dirty_log())

    def take_dirty_log(self) -> list[int]:
        return self.lt.call(lambda: self.guest.kernel.take_dirty_log())

    def suspend(self) -> None:
        self.lt.call(self._suspend)

    def resume(self, run_dir: Path, domid: int) -> None:
        self.lt.call(lambda: self._resume(run_dir, domid))

    def resume_cancelled(self) -> None:
        self.lt.call(self._cancel)

    # -- probes --------------------------------------------------------------------------------
    @property
    def domid(self) -> int:
        return self.lt.call(lambda: self.guest.kernel.domid)

    @property
    def run_dir(self) -> Path:
        """The host the guest is attached to."""
        return self.lt.call(lambda: self.guest.kernel.run_dir)

    def keys(self) -> list[tuple[int, bool]]:
        return self.lt.call(lambda: self.guest.kbd.keys() if self.guest.kbd else [])

    def status(self) -> dict:
        return self.lt.call(self.guest.status)

    def pixels(self) -> np.ndarray:
        def snap() -> np.ndarray:
            fb = self.guest.fb
            return fb.pixels[:fb.height, :fb.width].copy()
        return self.lt.call(snap)

    def draw(self, x: int, y: int, w: int, h: int, color: int) -> None:
        """Fill a rectangle of the guest's screen (what its console would draw)."""
        def paint() -> None:
            fb = self.guest.fb
            fb.pixels[y:y + h, x:x + w] = color
            fb.damage(x, y, w, h)
        self.lt.call(paint)

    def connected(self) -> bool:
        def check() -> bool:
            st = self.guest.status()
            return all(st[k] is not None and st[k]["state"] == "Connected"
                       for k in ("vkbd", "vfb"))
        return self.lt.call(check)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.lt.call(self._unwire)
        with contextlib.suppress(Exception):
            self.lt.call(lambda: self.guest.close())
        self.lt.stop()


def wait(pred, timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(what or str(pred))
        time.sleep(0.005)


def domain_memory(host, domid: int, nr_pages: int) -> bytes:
    """All of a domain's RAM, read as dom0 with a foreign mapping."""
    xen0 = host.xen(0)
    try:
        out = bytearray()
        for i in range(0, nr_pages, 1024):
            frames = list(range(i, min(i + 1024, nr_pages)))
            with xen0.map_foreign(domid, frames) as m:
                out += m.mem
        return bytes(out)
    finally:
        xen0.close()


class Typist:
    """Types distinct keys through an RFB viewer in a thread until stopped."""

    LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"

    def __init__(self, client: RawClient, period: float = 0.001) -> None:
        self.client = client
        self.period = period
        self.sent: list[str] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="typist")
        self._thread.start()

    def _run(self) -> None:
        try:
            i = 0
            while not self._stop.is_set():
                ch = self.LETTERS[i % len(self.LETTERS)]
                self.client.key(ord(ch), True)
                self.client.key(ord(ch), False)
                self.sent.append(ch)
                i += 1
                time.sleep(self.period)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(5)
        if self.error is not None:
            raise self.error
        return self.sent
