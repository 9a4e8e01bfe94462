"""The RM agent: one guest's console in one asyncio loop.

Readiness sources on the loop, nothing polled:

* the RFB server's sockets (viewers),
* the xenstore watch fd (backend and frontend device directories of the guest),
* the event-channel fd (the guest's vkbd and vfb ports).

One bounded exception: after the vfb connects, and until the frontend's first UPDATE, its
whole screen is compared at a few timed points (``vfb.UNREPORTED_CHECKS``; why in
:attr:`VfbBackend.unreported`).

Viewers' input goes to the vkbd backend; the vfb backend feeds the display the viewers see.  The
agent only takes a :class:`~dmore_nova.xen.api.Xen`: it runs unchanged on real Xen and on the sim.

Co-migration hooks (driven by :mod:`dmore_nova.rm_vm.comigration`):

* :meth:`RMAgent.freeze` -- viewers' input is held in order (bounded, overflow counted and
  logged) instead of going to the ring, and the device state machines stop reacting to the
  source side, whose guest is about to go;
* :meth:`RMAgent.input_drained` -- everything written to the ring was consumed by the guest
  (a suspended Linux frontend would lose what is left in its old page);
* :meth:`RMAgent.rehome` -- the agent process moves to another host (another ``Xen``, another
  guest domid) and keeps its RFB server, viewer sockets, display and pending input; backends
  are re-created for the new guest and re-map/re-bind when its frontends reconnect; what the
  old frontend left unconsumed in its ring is sent again (its resumed self zeroes the page);
* :meth:`RMAgent.release_devices` / :meth:`RMAgent.reconnect_devices` -- the RM VM's own
  migration (:mod:`dmore_nova.rm_vm.xs_control`): unmap and unbind before ``xl migrate`` saves
  it, map and bind the same pages again if it stays;
* :meth:`RMAgent.thaw` -- held input goes to the vkbd (after what was already queued);
* :meth:`RMAgent.refresh` -- every viewer gets a full update.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from dmore_nova.rm_vm.backends import vfb as vfb_mod
from dmore_nova.rm_vm.backends.vfb import VfbBackend, VfbDisplay
from dmore_nova.rm_vm.backends.vkbd import MAX_QUEUED, VkbdBackend
from dmore_nova.rm_vm.backends.xenbus import BackendDevice, DeviceError
from dmore_nova.rm_vm.rfb.display import KeyInput, PointerInput, Rect
from dmore_nova.rm_vm.rfb.server import RFBServer, ServerOptions
from dmore_nova.xen.api import EventChannels, Xen, XenError
from dmore_nova.xen.io import kbdif as K
from dmore_nova.xen.io.xenbus import XenbusState

LOG = logging.getLogger(__name__)

#: Viewer input events held while frozen (a co-migration switchover); beyond this they are
#: dropped, counted in :attr:`RMAgent.held_dropped` and logged.  Same bound as the vkbd queue.
MAX_HELD_INPUT = MAX_QUEUED


@dataclass
class InputState:
    """Input that must survive the backends (re-home) or the agent (restart elsewhere): what
    the vkbd had queued (already translated), what viewers typed while frozen (not yet), the
    keyboard/button state the translation depends on, and what the frontend asked for."""

    queue: deque = field(default_factory=deque)
    held: deque = field(default_factory=deque)
    pressed: set[int] = field(default_factory=set)
    buttons: int = 0
    abs_pointer: bool = False
    raw_pointer: bool = False
    dropped: int = 0
    delivered: int = 0


class RMAgent:
    def __init__(self, xen: Xen, guest_domid: int, options: ServerOptions | None = None, *,
                 devid: int = 0, width: int = 800, height: int = 600,
                 videoram_mb: int = 16, plug_vfb: bool = False) -> None:
        self.xen = xen
        #: Create the guest's vfb device ourselves (a guest whose vkb has
        #: ``backend-type=linux`` gets no vfb from libxl, see :func:`vfb_mod.plug`).
        self.plug_vfb = plug_vfb
        self._plugged: tuple[Xen, int] | None = None
        self.guest_domid = guest_domid
        self.devid = devid
        self.width, self.height, self.videoram_mb = width, height, videoram_mb
        self.display = VfbDisplay(width, height, name=f"dom{guest_domid}")
        self.server = RFBServer(self.display, self, options)
        self.evtchns: EventChannels = xen.event_channels()
        self.vkbd, self.vfb = self._make_devices()
        self.listen_addr: tuple[str, int] | None = None
        self.frozen = False
        self.devices_held = False
        self.held: deque[KeyInput | PointerInput] = deque()
        self._carried_queue: deque = deque()
        self.held_dropped = 0
        #: Events taken back from old rings at re-homes (the suspended frontend had not
        #: consumed them) and sent again to the new ring.
        self.requeued_input = 0
        self.rehomes = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watched: list[tuple[str, str]] = []
        self._readers: list[tuple[int, Xen]] = []
        self._activity: asyncio.Event | None = None
        #: The vkbd port, left masked after it fired because nothing waited for the guest to
        #: consume (see :meth:`_on_evtchn`); unmasked by :meth:`_rearm_vkbd`.
        self._vkbd_masked: int | None = None

    def _make_devices(self) -> tuple[VkbdBackend, VfbBackend]:
        vkbd = VkbdBackend(self.xen, self.evtchns, self.guest_domid, self.devid,
                           width=self.width, height=self.height)
        vfb = VfbBackend(self.xen, self.evtchns, self.guest_domid, self.devid,
                         display=self.display, videoram_mb=self.videoram_mb,
                         width=self.width, height=self.height)
        vkbd.display_size = lambda: (self.display.width, self.display.height)
        vfb.call_later = lambda delay, fn: self._call_later(vfb, delay, fn)
        return vkbd, vfb

    def _call_later(self, dev: BackendDevice, delay: float, fn: Callable[[], None]) -> None:
        if self._loop is not None:
            self._loop.call_later(delay, self._guard, dev, fn)

    @property
    def devices(self) -> tuple[BackendDevice, ...]:
        return (self.vkbd, self.vfb)

    # -- InputSink: viewers -> vkbd ----------------------------------------------------------
    def key(self, event: KeyInput) -> None:
        if self.frozen:
            self._hold(event)
        else:
            self._guard(self.vkbd, self.vkbd.key, event, notify=False)

    def pointer(self, event: PointerInput) -> None:
        if self.frozen:
            self._hold(event)
        else:
            self._guard(self.vkbd, self.vkbd.pointer, event, notify=False)

    def flush_input(self) -> None:
        """End of one read from a viewer: what it carried goes into the ring in one write,
        with one notify (:meth:`VkbdBackend.flush`)."""
        self._guard(self.vkbd, self.vkbd.flush)
        self._rearm_vkbd()  # the ring may be full: then the guest's next consume must wake us

    def _hold(self, event: KeyInput | PointerInput) -> None:
        if len(self.held) >= MAX_HELD_INPUT:
            self.held_dropped += 1
            if self.held_dropped == 1 or self.held_dropped % 1000 == 0:
                LOG.warning("agent: %d input events held while frozen; %d dropped",
                            MAX_HELD_INPUT, self.held_dropped)
            return
        self.held.append(event)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 5900) -> int:
        self._loop = asyncio.get_running_loop()
        self._activity = asyncio.Event()
        if self.plug_vfb:
            self._plug()
        self._wire()
        bound = await self.server.listen(host, port)
        self.listen_addr = (host, bound)
        LOG.info("agent: dom%d console on %s:%d (backend dom%d)", self.guest_domid, host,
                 bound, self.xen.domid)
        return bound

    def _plug(self) -> None:
        vfb_mod.plug(self.xen.xenstore, self.xen.domid, self.guest_domid, self.devid)
        self._plugged = (self.xen, self.guest_domid)
        LOG.info("agent: plugged vfb %d of dom%d", self.devid, self.guest_domid)

    def _replug(self) -> None:
        """Re-home with ``plug_vfb``: drop the old guest's vfb nodes (no toolstack knows them)
        and make sure the new guest has one.  The nodes are best created *before* the guest
        resumes (a follower of the migration does it: :func:`vfb_mod.plug` for the incoming
        domain), because a resumed xen-fbfront re-reads ``device/vfb/<devid>/backend`` and
        reconnects; plugged after the resume, the guest keeps its stale vfb device and does
        not probe the new node (seen on Xen 4.17)."""
        self._unplug()  # with the Xen it was plugged through (``old_xen``'s host)
        be = f"/local/domain/{self.xen.domid}/backend/vfb/{self.guest_domid}/{self.devid}"
        if self.xen.xenstore.read(f"{be}/frontend") is not None:
            self._plugged = (self.xen, self.guest_domid)
            return
        LOG.warning("agent: vfb of dom%d plugged after its resume: the guest may not probe it",
                    self.guest_domid)
        self._plug()

    def _unplug(self) -> None:
        if self._plugged is None:
            return
        xen, domid = self._plugged
        self._plugged = None
        try:
            vfb_mod.unplug(xen.xenstore, xen.domid, domid, self.devid)
        except (XenError, OSError) as exc:
            LOG.info("agent: unplug vfb of dom%d: %s", domid, exc)

    def _wire(self) -> None:
        """Put the event-channel and watch fds on the loop and watch the device dirs (the
        first watch event of each is the 'check now' that starts the state machines)."""
        assert self._loop is not None
        self._loop.add_reader(self.evtchns.fileno(), self._on_evtchn)
        self._readers.append((self.evtchns.fileno(), self.xen))
        self._loop.add_reader(self.xen.xenstore.watch_fileno(), self._on_watch)
        self._readers.append((self.xen.xenstore.watch_fileno(), self.xen))
        for dev in self.devices:
            fe_dir = f"/local/domain/{self.guest_domid}/device/{dev.kind}/{self.devid}"
            for path in (dev.be_path, fe_dir):
                token = f"{dev.name}:{path}"
                self.xen.xenstore.watch(path, token)
                self._watched.append((path, token))

    def _unwire(self) -> None:
        """Off the loop, watches dropped; errors ignored (the host may be gone)."""
        if self._loop is not None:
            for fd, _xen in self._readers:
                self._loop.remove_reader(fd)
        self._readers.clear()
        for path, token in self._watched:
            try:
                self.xen.xenstore.unwatch(path, token)
            except (XenError, OSError) as exc:
                LOG.debug("agent: unwatch %s: %s", path, exc)
        self._watched.clear()

    async def stop(self, *, close_devices: bool = True) -> None:
        """Close the viewers and the server, and the devices: ``close_devices`` tells the
        frontends (state Closed); without it the backends only let go of the guest's pages
        and ports, so that another backend instance can take the device over (restart)."""
        await self.server.close()
        self._unwire()
        for dev in self.devices:
            try:
                if close_devices:
                    dev.shutdown()
                else:
                    dev.disconnect()
            except (XenError, OSError) as exc:
                LOG.info("agent: %s shutdown: %s", dev.name, exc)
        if close_devices:
            self._unplug()
        with contextlib.suppress(XenError, OSError):
            self.evtchns.close()

    # -- readiness handlers ------------------------------------------------------------------
    def _poke(self) -> None:
        if self._activity is not None:
            self._activity.set()

    def _on_watch(self) -> None:
        try:
            events = self.xen.xenstore.read_watch_events()
        except (XenError, OSError) as exc:
            LOG.warning("agent: xenstore watch connection failed: %s", exc)
            if self._loop is not None:
                self._loop.remove_reader(self.xen.xenstore.watch_fileno())
            self._poke()
            return
        if not self.devices_held:
            names = {token.partition(":")[0] for _path, token in events}
            for dev in self.devices:
                if dev.name in names:
                    dev.check()
        self._poke()

    def _on_evtchn(self) -> None:
        """Every fired port taken in one call, each device's event handled once, all ports
        unmasked in one call: on real Xen each of those is a system call, and a key's echo
        waits behind them (in a PV domain under emulation one costs ~0.1-1 ms).

        The vfb's out ring is read first, before the system call that says which ports
        fired: an echo's UPDATE is what usually woke us, and a system call in a PV domain
        under emulation also slows the Python after it (the emulated TLB is flushed on each
        switch to Xen and back), so the echo leaves ~0.5 ms sooner.  If the vfb fired too,
        its handler runs again below and finds what arrived since, or nothing."""
        vfb = self.vfb
        if vfb.port is not None:
            self._guard(vfb, vfb.on_event)
        try:
            ports = self.evtchns.pending_ports()
        except XenError as exc:
            LOG.warning("agent: event channel handle failed: %s", exc)
            if self._loop is not None:
                self._loop.remove_reader(self.evtchns.fileno())
            self._poke()
            return
        by_port = {dev.port: dev for dev in self.devices if dev.port is not None}
        ports = list(dict.fromkeys(ports))
        for port in ports:
            dev = by_port.get(port)
            # Frozen: the vkbd does not refill the ring (its on_event would); the guest's
            # notify still wakes whoever waits for the ring to drain.
            if dev is not None and not (self.frozen and dev is self.vkbd):
                self._guard(dev, dev.on_event)
        vkbd_port = self.vkbd.port
        if vkbd_port in ports and not self._waits_for_vkbd():
            # xen-kbdfront notifies after every batch it consumes, i.e. once per key, right
            # while the guest works on the echo: masked, that costs neither us (a wakeup is
            # 3+ system calls, ~1 ms in a PV domain under emulation) nor the guest's vCPU
            # time slice.  Xen keeps the pending bit; unmasking re-delivers it.
            ports.remove(vkbd_port)
            self._vkbd_masked = vkbd_port
        if ports:
            try:
                self.evtchns.unmask_ports(ports)
            except XenError as exc:
                LOG.info("agent: unmask %s: %s", ports, exc)
        self._poke()

    def _waits_for_vkbd(self) -> bool:
        """Does anything wait for the guest to consume the vkbd ring: events that did not
        fit, or a switchover waiting for the ring to drain (:meth:`input_drained`)?"""
        return bool(self.vkbd.queue) or self.frozen

    def _rearm_vkbd(self) -> None:
        """Unmask the vkbd port if :meth:`_on_evtchn` left it masked and something now
        waits for it (:meth:`_waits_for_vkbd`)."""
        if self._vkbd_masked is None or not self._waits_for_vkbd():
            return
        port, self._vkbd_masked = self._vkbd_masked, None
        if port == self.vkbd.port:
            try:
                self.evtchns.unmask_ports([port])
            except XenError as exc:
                LOG.info("agent: unmask %s: %s", port, exc)

    @staticmethod
    def _guard(dev: BackendDevice, fn, *args, **kwargs) -> None:
        """Run a device action; what the guest did wrong closes that device only."""
        if dev.closed_reason is not None:
            return
        try:
            fn(*args, **kwargs)
        except DeviceError as exc:
            dev.fail(str(exc))
        except XenError as exc:
            dev.fail(f"hypervisor refused: {exc}")

    # -- co-migration hooks ------------------------------------------------------------------
    async def wait_until(self, pred: Callable[[], bool], timeout: float) -> bool:
        """Wait (no polling: woken by watch and event-channel activity) until ``pred()`` is
        true; False after ``timeout`` seconds."""
        assert self._activity is not None, "agent not started"
        deadline = time.monotonic() + timeout
        while not pred():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._activity.clear()
            try:
                await asyncio.wait_for(self._activity.wait(), remaining)
            except TimeoutError:
                return pred()
        return True

    def freeze(self) -> None:
        """Hold viewers' input (in order, bounded) and stop the device state machines from
        reacting to the source side while the guest switches over.

        Events already in the ring are not waited for here: the guest suspends when it
        pleases (``xl migrate`` does not wait for the agent), and it may not consume them
        before.  Either it did (``in_cons`` caught up: :meth:`input_drained`), or
        :meth:`rehome` takes ``in_cons..in_prod`` from the old ring and sends them again;
        if the migration is cancelled, the guest resumes with its ring intact and
        :meth:`thaw` only adds the held input after it."""
        self.devices_held = True
        if not self.frozen:
            self.frozen = True
            self._rearm_vkbd()  # input_drained() waits are woken by the guest's notify
            LOG.info("agent: dom%d input frozen (%d queued in vkbd)", self.guest_domid,
                     len(self.vkbd.queue))

    def release_devices(self) -> None:
        """Freeze, then let go of every page mapped from the guest and every bound port,
        keeping the devices' state (Connected stays Connected): the RM VM is about to be
        saved by ``xl migrate``, and a PV domain with foreign or grant mappings in its page
        tables cannot be (libxenguest's page-table normalisation finds frames that are not
        its own).  The guest keeps running and consuming its ring meanwhile; its pages are
        untouched.  Undone by :meth:`reconnect_devices` + :meth:`thaw` if the RM VM stays,
        replaced by :meth:`rehome` if it moved."""
        self.freeze()
        for dev in self.devices:
            try:
                dev.disconnect()
            except (XenError, OSError) as exc:
                LOG.warning("agent: %s: releasing: %s", dev.name, exc)
        LOG.info("agent: dom%d devices released (unmapped, unbound)", self.guest_domid)

    def reconnect_devices(self) -> int:
        """After :meth:`release_devices`, when the RM VM did not move: map the same pages and
        bind the same ports again (the frontend did not change them, so the state machine sees
        nothing to do by itself).  Returns how many devices were reconnected; a device the
        guest's values no longer fit is closed with the reason, as on any connect."""
        n = 0
        for dev in self.devices:
            if (dev.closed_reason is None and dev.state is XenbusState.Connected
                    and dev.page is None):
                self._guard(dev, dev.connect)
                if dev.closed_reason is None:
                    n += 1
                    LOG.info("agent: %s: re-mapped + re-bound port %s", dev.name, dev.port)
        return n

    def input_drained(self) -> bool:
        """Has the guest consumed everything in the vkbd ring?  (True without a ring.)"""
        page = self.vkbd.page
        if page is None or self.vkbd.closed_reason is not None:
            return True
        try:
            p = K.XenkbdPage(page.mem)
            return p.in_cons == p.in_prod
        except (ValueError, TypeError):
            return True

    @property
    def queued_input(self) -> int:
        """Translated events waiting for the ring (including those carried over a re-home)."""
        return len(self.vkbd.queue) + len(self._carried_queue)

    def devices_connected(self) -> bool:
        """Both backends Connected with their pages mapped and ports bound."""
        return (self.vkbd.state is XenbusState.Connected and self.vkbd.page is not None
                and self.vkbd.port is not None
                and self.vfb.state is XenbusState.Connected and self.vfb.fb_mapping is not None
                and self.vfb.port is not None)

    def export_input(self) -> InputState:
        """Take the pending input and the keyboard state out of this agent (its vkbd keeps an
        empty queue and nothing is held any more)."""
        v = self.vkbd
        v.queue.extendleft(reversed(self._carried_queue))
        self._carried_queue = deque()
        state = InputState(queue=v.queue, held=self.held, pressed=set(v._pressed),
                           buttons=v._buttons, abs_pointer=v.abs_pointer,
                           raw_pointer=v.raw_pointer, dropped=v.dropped, delivered=v.delivered)
        v.queue = deque()
        self.held = deque()
        return state

    def import_input(self, state: InputState) -> None:
        """Adopt input taken from another vkbd/agent: queued events first, held ones stay held
        (frozen) or are replayed by :meth:`thaw`."""
        v = self.vkbd
        state.queue.extend(v.queue)
        v.queue = state.queue
        v._pressed, v._buttons = set(state.pressed), state.buttons
        v.abs_pointer, v.raw_pointer = state.abs_pointer, state.raw_pointer
        v.dropped += state.dropped
        v.delivered += state.delivered
        state.held.extend(self.held)
        self.held = state.held

    def rehome(self, xen: Xen, guest_domid: int) -> Xen:
        """Move to another host (the RM VM migrated, or the RM is dom0 there): drop the old
        backends (unmap, unbind: the source can reap the old guest), re-create them for
        ``guest_domid`` over ``xen``, keep the RFB server, viewers, display and input.  The
        new backends connect when the guest's resumed frontends publish their new grant,
        frame and port.  Returns the old ``Xen`` for the caller to close.  Runs on the
        agent's loop."""
        new_evtchns = xen.event_channels()
        old_xen, old_evtchns, old_devices = self.xen, self.evtchns, self.devices
        self._unwire()
        # The guest suspended before it resumed elsewhere: the old ring is final, and its
        # resumed frontend zeroes the page.  What it had not consumed is sent again, first
        # (it went into the ring before anything still queued or held): nothing lost, and
        # nothing doubled, since what it had consumed (before in_cons) is not taken back.
        unconsumed = self.vkbd.unconsumed() if self.vkbd.closed_reason is None else []
        if unconsumed:
            self.vkbd.delivered -= len(unconsumed)
            self.requeued_input += len(unconsumed)
            LOG.info("agent: %d events the suspended dom%d had not consumed are re-queued",
                     len(unconsumed), self.guest_domid)
        for dev in old_devices:
            try:
                dev.disconnect()
            except (XenError, OSError) as exc:
                LOG.info("agent: %s: releasing on the old host: %s", dev.name, exc)
        with contextlib.suppress(XenError, OSError):
            old_evtchns.close()
        carried = self.export_input()
        carried.queue.extendleft(reversed(unconsumed))
        self.xen, self.guest_domid, self.evtchns = xen, guest_domid, new_evtchns
        self._vkbd_masked = None
        self.vkbd, self.vfb = self._make_devices()
        # The new backends take the keyboard state now; the queued events wait with the held
        # ones for thaw() (the replay step), so nothing reaches the new ring before it.
        queue, carried.queue = carried.queue, deque()
        self.import_input(carried)
        if self.frozen:
            self._carried_queue = queue
        else:
            self.vkbd.queue.extendleft(reversed(queue))
        if self.plug_vfb:
            self._replug()
        self.devices_held = False  # the new devices are live: they must re-map and re-bind
        self.rehomes += 1
        self._wire()
        LOG.info("agent: re-homed to dom%d (backend dom%d), %d events queued, %d held",
                 guest_domid, xen.domid, len(self.vkbd.queue) + len(self._carried_queue),
                 len(self.held))
        return old_xen

    def thaw(self) -> int:
        """Let input flow again: re-check the devices (watch events were ignored while
        frozen), then replay held input after what the vkbd had queued.  Returns how many
        held events were replayed."""
        self.frozen = self.devices_held = False
        self.vkbd.queue.extendleft(reversed(self._carried_queue))
        self._carried_queue = deque()
        for dev in self.devices:
            dev.check()
        held, self.held = self.held, deque()
        for event in held:
            if isinstance(event, KeyInput):
                self._guard(self.vkbd, self.vkbd.key, event, notify=False)
            else:
                self._guard(self.vkbd, self.vkbd.pointer, event, notify=False)
        self._guard(self.vkbd, self.vkbd.flush)  # and the one notify the replay owes
        self._rearm_vkbd()
        LOG.info("agent: dom%d input thawed, %d held events replayed", self.guest_domid,
                 len(held))
        return len(held)

    def refresh(self) -> int:
        """Every viewer gets a full update (at its next request); returns how many viewers."""
        self.display.notify_damage(Rect(0, 0, self.display.width, self.display.height))
        return len(self.server.viewers)
