"""Runs in dom0 of the xenbox: the project's RM agent (xen=real) plus a follower of ``xl migrate``.

Why this exists: on the sim, :mod:`dmore_nova.rm_vm.comigration` drives the guest's migration
itself, phase by phase.  ``xl migrate`` is one monolithic command, and the project has no
real-Xen migration platform yet; a dom0-hosted agent can still follow a *localhost* migration
from what xl writes to xenstore, using the agent's own co-migration hooks:

1. libxl asks the guest to suspend (``control/shutdown``): :meth:`RMAgent.freeze` -- viewers'
   input is held in order instead of going into a ring the resumed guest will zero;
2. the incoming domain appears (``@introduceDomain``, named ``<name>--incoming``, memory
   restored, not yet resumed): its vfb is plugged now, so the resumed xen-fbfront finds
   ``device/vfb/0`` and reconnects (plugged after the resume it would keep its stale device);
3. xl renames it to ``<name>`` and unpauses it: :meth:`RMAgent.rehome` to the new domid (the
   agent unplugs the old vfb), wait until both devices re-mapped and re-bound,
   :meth:`RMAgent.thaw` (held input replayed), :meth:`RMAgent.refresh`;
4. the source domain's vinput backend is torn down by libxl (online=0, Closing): answered with
   Closed, so libxl removes it instead of timing out.

A status JSON (``--status``) is rewritten on every step, for the tests on the host.

Usage (dom0): ``python3 -m tests.xen.follow_agent --config-file agent.conf --guest-name guest
--status /mnt/box/status.json`` (``[agent]``/``[rfb]`` options as for ``dmore-rm-agent``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time

from oslo_log import log as oslo_logging

from dmore_nova import conf as dconf
from dmore_nova.rm_vm.agent import RMAgent
from dmore_nova.rm_vm.backends import vfb as vfb_mod
from dmore_nova.rm_vm.rfb.server import options_from_conf
from dmore_nova.xen.api import XenError
from dmore_nova.xen.real.xen import RealXen, connect_xenstore

LOG = logging.getLogger("follow_agent")
#: Seconds the re-created backends get to re-map and re-bind after the guest resumed.
CONNECT_TIMEOUT = 60.0


class XlMigrateFollower:
    def __init__(self, agent: RMAgent, name: str, status_path: str | None) -> None:
        self.agent = agent
        self.name = name
        self.status_path = status_path
        self.xs = connect_xenstore()  # our own connection: the agent's watches are its own
        self.domid = agent.guest_domid
        self.incoming: int | None = None
        self.old_backends: list[str] = []
        self.events: list[dict] = []
        self._initial: set[str] = set()
        self._task: asyncio.Task | None = None
        self.migrations = 0

    def note(self, what: str, **kw) -> None:
        rec = {"t": time.time(), "what": what, **kw}
        self.events.append(rec)
        LOG.info("follower: %s %s", what, kw)
        self.write_status()

    def write_status(self) -> None:
        if not self.status_path:
            return
        a = self.agent
        st = {
            "guest_domid": a.guest_domid, "rehomes": a.rehomes, "frozen": a.frozen,
            "held": len(a.held), "held_dropped": a.held_dropped,
            "abs_pointer": a.vkbd.abs_pointer, "viewers": len(a.server.viewers),
            "devices_connected": a.devices_connected(), "migrations": self.migrations,
            "vkbd_delivered": a.vkbd.delivered, "vkbd_dropped": a.vkbd.dropped,
            "events": self.events,
        }
        tmp = self.status_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(st, f)
        os.replace(tmp, self.status_path)

    # -- watches ---------------------------------------------------------------------------
    def start(self) -> None:
        self._watch_guest(self.domid)
        self.xs.watch("@introduceDomain", "intro")
        self.xs.watch("@releaseDomain", "release")
        self._initial |= {"intro", "release"}
        asyncio.get_running_loop().add_reader(self.xs.watch_fileno(), self._on_watch)
        self._tick()

    def _tick(self) -> None:
        """The status file is a test probe: rewritten every second as well as on each step
        (the agent's own state, e.g. ``abs_pointer``, changes without telling us)."""
        self.write_status()
        asyncio.get_running_loop().call_later(1.0, self._tick)

    def _watch_guest(self, domid: int) -> None:
        token = f"shutdown:{domid}"
        self.xs.watch(f"/local/domain/{domid}/control/shutdown", token)
        self._initial.add(token)

    def _on_watch(self) -> None:
        try:
            events = self.xs.read_watch_events()
        except (XenError, OSError) as exc:
            LOG.error("follower: xenstore watch failed: %s", exc)
            asyncio.get_running_loop().remove_reader(self.xs.watch_fileno())
            return
        for path, token in events:
            if token in self._initial:  # Xen fires every new watch once
                self._initial.discard(token)
                if not token.startswith("oldbe:"):
                    continue
            try:
                self._handle(path, token)
            except (XenError, OSError) as exc:
                LOG.warning("follower: %s %s: %s", token, path, exc)

    def _handle(self, path: str, token: str) -> None:
        kind, _, arg = token.partition(":")
        if kind == "shutdown" and int(arg) == self.agent.guest_domid and not self.agent.frozen:
            raw = self.xs.read(path)
            # libxl writes "suspend" and the guest acks by writing "" (which we may read first)
            if raw in (b"suspend", b""):
                self.agent.freeze()
                self.note("suspend-requested", domid=int(arg), value=(raw or b"").decode())
        elif kind == "intro":
            self._find_incoming()
        elif kind == "name" and self.incoming is not None and int(arg) == self.incoming:
            if self.xs.read(path) == self.name.encode() and self._task is None:
                self._task = asyncio.get_running_loop().create_task(self._follow(self.incoming))
        elif kind == "release":
            self._released()
        elif kind == "oldbe":
            self._answer_removal(arg)

    def _find_incoming(self) -> None:
        if self.incoming is not None:
            return
        for d in self.xs.directory("/local/domain"):
            if not d.isdigit() or int(d) in (0, self.agent.guest_domid):
                continue
            if self.xs.read(f"/local/domain/{d}/name") == f"{self.name}--incoming".encode():
                self.incoming = int(d)
                vfb_mod.plug(self.xs, self.agent.xen.domid, self.incoming, self.agent.devid)
                self.xs.watch(f"/local/domain/{d}/name", f"name:{d}")
                self.note("incoming-domain", domid=self.incoming, vfb_plugged=True)
                return

    def _released(self) -> None:
        """The incoming domain went away before it was started: migration failed, the guest
        runs on at the source (its suspend was cancelled)."""
        if self.incoming is not None and self._task is None and not self.xs.directory(
                f"/local/domain/{self.incoming}"):
            self.note("incoming-domain-gone", domid=self.incoming)
            self.incoming = None
            if self.agent.frozen:
                self.agent.thaw()
                self.note("thawed-at-source")

    async def _follow(self, new: int) -> None:
        old = self.agent.guest_domid
        t0 = time.monotonic()
        self.note("guest-started", old=old, new=new)
        old_be = [f"/local/domain/{self.agent.xen.domid}/backend/{d.be_kind}/{old}/"
                  f"{self.agent.devid}" for d in self.agent.devices]
        if not self.agent.frozen:
            self.agent.freeze()
        self.agent.rehome(self.agent.xen, new)  # same host, same Xen: nothing to close
        for p in old_be:
            if p.split("/")[5] != "vfb":  # the agent removed the vfb it plugged
                self.xs.watch(f"{p}/online", f"oldbe:{p}")
                self._initial.add(f"oldbe:{p}")
        self._watch_guest(new)
        ok = await self.agent.wait_until(self.agent.devices_connected, CONNECT_TIMEOUT)
        self.note("devices-connected" if ok else "devices-not-connected",
                  seconds=round(time.monotonic() - t0, 3))
        replayed = self.agent.thaw()
        viewers = self.agent.refresh()
        self.migrations += 1
        self.incoming = None
        self._task = None
        self.note("thawed", replayed=replayed, viewers=viewers,
                  seconds=round(time.monotonic() - t0, 3))

    def _answer_removal(self, be: str) -> None:
        if self.xs.read(f"{be}/online") == b"0" and self.xs.read(f"{be}/state") != b"6":
            self.xs.write(f"{be}/state", "6")
            self.note("old-backend-closed", path=be)


async def run(conf, name: str, status: str | None) -> None:
    xen = RealXen()
    agent = RMAgent(xen, conf.agent.guest_domid, options_from_conf(conf.rfb),
                    devid=conf.agent.devid, width=conf.agent.width, height=conf.agent.height,
                    videoram_mb=conf.agent.videoram_mb, plug_vfb=conf.agent.plug_vfb)
    port = await agent.start(conf.rfb.listen, conf.rfb.port)
    follower = XlMigrateFollower(agent, name, status)
    follower.start()
    print(f"follow_agent: dom{agent.guest_domid} console on {conf.rfb.listen}:{port}",
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await agent.stop()
    follower.write_status()
    xen.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config-file", required=True)
    ap.add_argument("--guest-name", required=True)
    ap.add_argument("--status")
    a = ap.parse_args()
    conf = dconf.CONF
    oslo_logging.register_options(conf)
    conf(["--config-file", a.config_file], project="dmore-nova")
    oslo_logging.setup(conf, "dmore-nova")
    logging.getLogger("follow_agent").setLevel(logging.INFO)
    asyncio.run(run(conf, a.guest_name, a.status))
    return 0


if __name__ == "__main__":
    sys.exit(main())
