"""Runs inside the RM VM (a PV domU): wait for dom0 to name the guest, then run the RM agent,
and take part in the co-migration dom0 drives (:mod:`tests.xen.rmvm_comigrate`).

Why a runner: the RM VM must exist before its guest (the guest's ``vkb=[backend=rmvm,...]``
names it, and libxl resolves the name at ``xl create``), so the guest's domid is not known
when the RM VM boots.  dom0 writes the agent's whole configuration (``[agent] guest_domid``
included) to the RM VM's own ``data/dmore-agent-conf`` once it has created the guest and given
the RM VM privilege over it (:mod:`tests.xen.rmvm_dom0`).  Meanwhile this runner has already
imported the agent (numpy, PIL, oslo: minutes under TCG on a busy machine).

The agent is the one ``dmore-rm-agent`` runs (:class:`RMAgent` with ``[agent] xen=real``):
xenstore through ``/dev/xen/xenbus`` (:func:`dmore_nova.xen.real.xen.connect_xenstore`), grant
maps through gntdev, foreign maps through privcmd, event channels through ``/dev/xen/evtchn``.

Co-migration, the RM VM's side (dom0 writes requests to ``data/dmore-migrate``; relative paths
follow the RM VM to its new domid, since xenstored resolves them per connection):

``prepare``
    before dom0 runs ``xl migrate rmvm``: hold input (:meth:`RMAgent.freeze`) and let go of
    every page mapped from the guest and every bound port.  A PV domain that still has foreign
    or grant mappings in its page tables cannot be saved (libxenguest's page-table
    normalisation finds frames that are not its own), and its event channels would not survive
    anyway.  Acknowledged with ``data/dmore-migrate-ack = prepared``.
``incoming <domid>``
    after the RM VM moved, while ``xl migrate guest`` runs and dom0 has given the (new) RM VM
    privilege over the guest's incoming domain: plug that domain's vfb now (before it
    resumes: the re-probe trap of shared/notes/xenbox.md), then wait until xl has named it
    like the guest, re-home the agent to it, wait for both devices to re-map and re-bind,
    replay the held input and refresh the viewers.  Ack ``done`` with timings (JSON).

The RFB server, its viewers' TCP connections and the display live in this process and move
with the RM VM; nothing of them is re-created.

Progress lines ``RMVM-...`` go to stdout = hvc0, which xenconsoled logs in dom0.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time

#: How long dom0 may take to create the guest and grant the target privilege.
GUEST_WAIT = 600.0
#: Relative xenstore paths: /local/domain/<our current domid>/data/... (dom0 writes them).
CONF_KEY = "data/dmore-agent-conf"
MIGRATE_KEY = "data/dmore-migrate"
ACK_KEY = "data/dmore-migrate-ack"
#: Seconds the re-created backends get to connect after the guest's incoming domain started.
CONNECT_TIMEOUT = 120.0
#: Seconds to wait for xl to name the incoming domain like the guest (end of its migration).
RENAME_TIMEOUT = 600.0
POLL = 0.2


def say(msg: str) -> None:
    print(f"RMVM-{msg}", flush=True)


class CoMigrationSide:
    """The RM VM's half of the co-migration protocol (see the module docstring)."""

    def __init__(self, agent, name: str) -> None:
        self.agent = agent
        self.xs = agent.xen.xenstore
        self.name = name
        self.last: bytes | None = None

    def ack(self, value: str) -> None:
        self.xs.write(ACK_KEY, value)
        say(f"MIGRATE-ACK {value}")

    async def run(self) -> None:
        """Poll for requests (``<seq> <verb> [arg]``: a new ``seq`` is a new request; dom0 may
        repeat a verb in a later co-migration)."""
        while True:
            try:
                req = self.xs.read(MIGRATE_KEY)
            except Exception as exc:  # noqa: BLE001 - xenstore during our own resume
                say(f"MIGRATE-READ {exc!r}")
                req = None
            if req and req != self.last:
                self.last = req
                say(f"MIGRATE-REQUEST {req.decode(errors='replace')}")
                try:
                    await self.handle(req.decode().split(" ", 1)[1])
                except Exception as exc:  # noqa: BLE001 - reported to dom0, agent keeps going
                    self.ack(f"error {exc!r}")
            await asyncio.sleep(POLL)

    async def handle(self, req: str) -> None:
        from dmore_nova.rm_vm.backends import vfb as vfb_mod
        a = self.agent
        verb, _, arg = req.partition(" ")
        if verb == "prepare":
            t0 = time.monotonic()
            a.freeze()
            for dev in a.devices:
                dev.disconnect()
            self.ack(json.dumps({"state": "prepared", "domid": a.xen.domid,
                                 "seconds": round(time.monotonic() - t0, 3)}))
        elif verb == "incoming":
            new = int(arg)
            t0 = time.monotonic()
            me = a.xen.domid
            vfb_mod.plug(self.xs, me, new, a.devid)
            say(f"PLUGGED vfb of incoming dom{new} (backend dom{me})")
            deadline = time.monotonic() + RENAME_TIMEOUT
            while self.xs.read(f"/local/domain/{new}/name") != self.name.encode():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"dom{new} not named {self.name!r} after "
                                       f"{RENAME_TIMEOUT:.0f} s")
                await asyncio.sleep(POLL)
            t_started = time.monotonic()
            old = a.guest_domid
            a.rehome(a.xen, new)
            ok = await a.wait_until(a.devices_connected, CONNECT_TIMEOUT)
            t_conn = time.monotonic()
            replayed = a.thaw()
            viewers = a.refresh()
            self.ack(json.dumps({
                "state": "done" if ok else "devices-not-connected", "old": old, "new": new,
                "backend": me, "replayed": replayed, "viewers": viewers,
                "held_dropped": a.held_dropped, "vkbd_dropped": a.vkbd.dropped,
                "abs_pointer": a.vkbd.abs_pointer, "rehomes": a.rehomes,
                "wait_rename": round(t_started - t0, 3),
                "connect": round(t_conn - t_started, 3)}))
        else:
            raise ValueError(f"unknown request {req!r}")


async def serve(conf, guest_name: str) -> None:
    """``dmore-rm-agent`` (:func:`dmore_nova.cmd.rm_agent.run`) plus :class:`CoMigrationSide`."""
    from dmore_nova.rm_vm.agent import RMAgent
    from dmore_nova.rm_vm.rfb.server import options_from_conf
    from dmore_nova.xen.real import RealXen
    xen = RealXen()
    agent = RMAgent(xen, conf.agent.guest_domid, options_from_conf(conf.rfb),
                    devid=conf.agent.devid, width=conf.agent.width, height=conf.agent.height,
                    videoram_mb=conf.agent.videoram_mb, plug_vfb=conf.agent.plug_vfb)
    port = await agent.start(conf.rfb.listen, conf.rfb.port)
    print(f"dmore-rm-agent: dom{conf.agent.guest_domid} console on {conf.rfb.listen}:{port}",
          flush=True)
    side = asyncio.get_running_loop().create_task(CoMigrationSide(agent, guest_name).run())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    side.cancel()
    await agent.stop()
    xen.close()


def run_agent(conf_file: str, guest_name: str) -> int:
    from oslo_log import log as oslo_logging

    from dmore_nova import conf as dconf
    conf = dconf.CONF
    oslo_logging.register_options(conf)
    conf(["--config-file", conf_file], project="dmore-nova")
    oslo_logging.setup(conf, "dmore-nova")
    try:
        asyncio.run(serve(conf, guest_name))
    except (ValueError, OSError) as exc:
        print(f"dmore-rm-agent: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


def main() -> int:
    t0 = time.monotonic()
    say("RUNNER")
    # the slow imports, before we wait
    from dmore_nova.rm_vm.agent import RMAgent  # noqa: F401
    from dmore_nova.rm_vm.rfb.server import options_from_conf  # noqa: F401
    from dmore_nova.xen.real.xen import RealXen, connect_xenstore
    say(f"IMPORTED {time.monotonic() - t0:.1f} s")
    xs = connect_xenstore()
    domid = RealXen(xs).domid
    say(f"AGENT-READY dom{domid} imports {time.monotonic() - t0:.1f} s")
    guest_name = sys.argv[1] if len(sys.argv) > 1 else "guest"
    # One agent per configuration; when it exits (the test stopped it, or it failed), the
    # configuration is removed and the next one is awaited, so a test can start the agent
    # again without booting the RM VM again (minutes under TCG).
    while True:
        deadline = time.monotonic() + GUEST_WAIT
        while (conf := xs.read(CONF_KEY)) is None:
            if time.monotonic() > deadline:
                say(f"FAILED no {CONF_KEY} after {GUEST_WAIT:.0f} s")
                return 1
            time.sleep(POLL)
        with open("/run/agent.conf", "wb") as f:
            f.write(conf)
        try:
            xs.rm(CONF_KEY)
        except Exception as exc:  # noqa: BLE001 - then a restart needs a new value
            say(f"AGENT-CONF not removed: {exc!r}")
        say("AGENT-CONF " + conf.decode(errors="replace").replace("\n", " "))
        rc = run_agent("/run/agent.conf", guest_name)
        say(f"AGENT-EXITED {rc}")


if __name__ == "__main__":
    sys.exit(main())
