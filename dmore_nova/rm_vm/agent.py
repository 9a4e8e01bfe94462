"""The RM agent: one guest's console in one asyncio loop.

Readiness sources on the loop, nothing polled:

* the RFB server's sockets (viewers),
* the xenstore watch fd (backend and frontend device directories of the guest),
* the event-channel fd (the guest's vkbd and vfb ports).

Viewers' input goes to the vkbd backend; the vfb backend feeds the display the viewers see.  The
agent only takes a :class:`~dmore_nova.xen.api.Xen`: it runs unchanged on real Xen and on the sim.
"""

from __future__ import annotations

import asyncio
import logging

from dmore_nova.rm_vm.backends.vfb import VfbBackend, VfbDisplay
from dmore_nova.rm_vm.backends.vkbd import VkbdBackend
from dmore_nova.rm_vm.backends.xenbus import BackendDevice, DeviceError
from dmore_nova.rm_vm.rfb.display import KeyInput, PointerInput
from dmore_nova.rm_vm.rfb.server import RFBServer, ServerOptions
from dmore_nova.xen.api import Xen, XenError

LOG = logging.getLogger(__name__)


class RMAgent:
    def __init__(self, xen: Xen, guest_domid: int, options: ServerOptions | None = None, *,
                 devid: int = 0, width: int = 800, height: int = 600,
                 videoram_mb: int = 16) -> None:
        self.xen = xen
        self.guest_domid = guest_domid
        self.devid = devid
        self.width, self.height, self.videoram_mb = width, height, videoram_mb
        self.display = VfbDisplay(width, height, name=f"dom{guest_domid}")
        self.server = RFBServer(self.display, self, options)
        self.evtchns = xen.event_channels()
        self.vkbd, self.vfb = self._make_devices()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watched: list[tuple[str, str]] = []

    def _make_devices(self) -> tuple[VkbdBackend, VfbBackend]:
        vkbd = VkbdBackend(self.xen, self.evtchns, self.guest_domid, self.devid,
                           width=self.width, height=self.height)
        vfb = VfbBackend(self.xen, self.evtchns, self.guest_domid, self.devid,
                         display=self.display, videoram_mb=self.videoram_mb,
                         width=self.width, height=self.height)
        vkbd.display_size = lambda: (self.display.width, self.display.height)
        return vkbd, vfb

    @property
    def devices(self) -> tuple[BackendDevice, ...]:
        return (self.vkbd, self.vfb)

    # -- InputSink: viewers -> vkbd ----------------------------------------------------------
    def key(self, event: KeyInput) -> None:
        self._guard(self.vkbd, self.vkbd.key, event)

    def pointer(self, event: PointerInput) -> None:
        self._guard(self.vkbd, self.vkbd.pointer, event)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 5900) -> int:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.evtchns.fileno(), self._on_evtchn)
        self._loop.add_reader(self.xen.xenstore.watch_fileno(), self._on_watch)
        self._watch_devices()
        bound = await self.server.listen(host, port)
        LOG.info("agent: dom%d console on %s:%d (backend dom%d)", self.guest_domid, host,
                 bound, self.xen.domid)
        return bound

    def _watch_devices(self) -> None:
        for dev in self.devices:
            fe_dir = f"/local/domain/{self.guest_domid}/device/{dev.kind}/{self.devid}"
            for path in (dev.be_path, fe_dir):
                token = f"{dev.name}:{path}"
                self.xen.xenstore.watch(path, token)
                self._watched.append((path, token))

    async def stop(self) -> None:
        await self.server.close()
        if self._loop is not None:
            self._loop.remove_reader(self.evtchns.fileno())
            self._loop.remove_reader(self.xen.xenstore.watch_fileno())
        for path, token in self._watched:
            try:
                self.xen.xenstore.unwatch(path, token)
            except XenError:
                pass
        self._watched.clear()
        for dev in self.devices:
            try:
                dev.shutdown()
            except XenError as exc:
                LOG.info("agent: %s shutdown: %s", dev.name, exc)
        self.evtchns.close()

    # -- readiness handlers ------------------------------------------------------------------
    def _on_watch(self) -> None:
        events = self.xen.xenstore.read_watch_events()
        names = {token.partition(":")[0] for _path, token in events}
        for dev in self.devices:
            if dev.name in names:
                dev.check()

    def _on_evtchn(self) -> None:
        by_port = {dev.port: dev for dev in self.devices if dev.port is not None}
        while True:
            port = self.evtchns.pending()
            if port is None:
                return
            dev = by_port.get(port)
            if dev is not None:
                self._guard(dev, dev.on_event)
            try:
                self.evtchns.unmask(port)
            except XenError as exc:
                LOG.info("agent: unmask %d: %s", port, exc)

    @staticmethod
    def _guard(dev: BackendDevice, fn, *args) -> None:
        """Run a device action; what the guest did wrong closes that device only."""
        if dev.closed_reason is not None:
            return
        try:
            fn(*args)
        except DeviceError as exc:
            dev.fail(str(exc))
        except XenError as exc:
            dev.fail(f"hypervisor refused: {exc}")
