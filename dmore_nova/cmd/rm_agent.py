"""``dmore-rm-agent``: serve one guest's console from the RM VM (or dom0).

Configuration from oslo.config: [agent] (which Xen, which guest) and [rfb] (where viewers
connect, security).  Logs every device state change.  With ``[agent] follow_xl_migrate`` it
also follows ``xl migrate`` of its guest (:mod:`dmore_nova.rm_vm.xl_follower`); with
``[agent] xenstore_control`` (the agent in its RM VM) it takes co-migration requests from dom0
(:mod:`dmore_nova.rm_vm.xs_control`); with ``[agent] status_file`` it keeps a JSON status file
current.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from typing import Any

from oslo_config import cfg
from oslo_log import log as logging

from dmore_nova import conf as dconf
from dmore_nova.rm_vm.agent import RMAgent
from dmore_nova.rm_vm.rfb.server import options_from_conf
from dmore_nova.rm_vm.xl_follower import XlMigrationFollower
from dmore_nova.rm_vm.xs_control import XenstoreControl
from dmore_nova.xen.api import Xen, XenStore

LOG = logging.getLogger(__name__)
#: Seconds between two rewrites of the status file (the agent's own state, e.g. what the
#: frontend requested, changes without telling anyone).
STATUS_INTERVAL = 1.0
#: Seconds between two reads of this domain's ``target`` while the agent waits for it.
TARGET_POLL = 0.2


def make_xen(conf: cfg.ConfigOpts) -> Xen:
    if conf.agent.xen == "sim":
        if not conf.agent.sim_run_dir:
            raise ValueError("[agent]sim_run_dir is required with xen=sim")
        from dmore_nova.xen.sim.client import SimXen
        return SimXen(conf.agent.sim_run_dir, conf.agent.backend_domid)
    from dmore_nova.xen.real import RealXen
    return RealXen()


def make_xenstore(conf: cfg.ConfigOpts) -> XenStore:
    """A second xenstore connection, as the agent's domain (the follower's watches must not
    go through the agent's watch connection, which dispatches only the agent's tokens)."""
    if conf.agent.xen == "sim":
        from pathlib import Path

        from dmore_nova.xen.pyxs_store import PyxsXenStore
        from dmore_nova.xen.sim.host import xenstore_path
        return PyxsXenStore(unix_socket_path=str(xenstore_path(Path(conf.agent.sim_run_dir),
                                                               conf.agent.backend_domid)))
    from dmore_nova.xen.real.xen import connect_xenstore
    return connect_xenstore()


def parse_target(raw: bytes) -> int:
    """The domid in a ``target`` node: decimal, as libxl writes it, of a guest (1..0x7FEF)."""
    text = raw.decode("ascii", "replace").strip("\0 \n")
    if not text.isdigit() or not 1 <= int(text) <= 0x7FEF:
        raise ValueError(f"this domain's xenstore 'target' is {raw!r}, not a guest's domid "
                         "(1..32751)")
    return int(text)


async def guest_from_target(xs: XenStore, wait: float) -> int:
    """The guest this domain has privilege over: its own ``target`` node (a relative path: our
    directory), read every :data:`TARGET_POLL` s for up to ``wait`` s.  Polled, not watched:
    this runs once, before anything else, and a watch on a node the domain may not read yet
    needs the same retry."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    if (raw := xs.read("target")) is None:
        LOG.info("agent: no guest_domid; waiting up to %.0f s for this domain's target", wait)
    while raw is None:
        if loop.time() >= deadline:
            raise ValueError(f"[agent]guest_domid is unset and this domain has no xenstore "
                             f"'target' after {wait:.0f} s: set guest_domid, or give this "
                             "domain privilege over its guest (dmore-xl-rmvm set-target)")
        await asyncio.sleep(TARGET_POLL)
        raw = xs.read("target")
    return parse_target(raw)


def agent_status(agent: RMAgent, follower: XlMigrationFollower | None) -> dict[str, Any]:
    """What the status file holds."""
    st: dict[str, Any] = {
        "guest_domid": agent.guest_domid, "rehomes": agent.rehomes, "frozen": agent.frozen,
        "held": len(agent.held), "held_dropped": agent.held_dropped,
        "abs_pointer": agent.vkbd.abs_pointer, "viewers": len(agent.server.viewers),
        "devices_connected": agent.devices_connected(),
        "vkbd_delivered": agent.vkbd.delivered, "vkbd_dropped": agent.vkbd.dropped,
        "vkbd_requeued": agent.requeued_input,
    }
    if follower is not None:
        st.update(follower.status())
    return st


def write_status(path: str, status: dict[str, Any]) -> None:
    """Atomically (a reader never sees a half-written file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(status, f)
    os.replace(tmp, path)


async def run(conf: cfg.ConfigOpts) -> None:
    xen = make_xen(conf)
    guest = conf.agent.guest_domid
    if guest is None:
        try:
            guest = await guest_from_target(xen.xenstore, conf.agent.target_wait)
        except BaseException:
            xen.close()
            raise
        LOG.info("agent: serving dom%d, this domain's target", guest)
    agent = RMAgent(xen, guest, options_from_conf(conf.rfb),
                    devid=conf.agent.devid, width=conf.agent.width, height=conf.agent.height,
                    videoram_mb=conf.agent.videoram_mb, plug_vfb=conf.agent.plug_vfb)
    port = await agent.start(conf.rfb.listen, conf.rfb.port)
    follower: XlMigrationFollower | None = None
    follower_xs: XenStore | None = None
    status_path = conf.agent.status_file

    def status_now() -> None:
        if status_path:
            try:
                write_status(status_path, agent_status(agent, follower))
            except OSError as exc:
                LOG.warning("status file %s: %s", status_path, exc)

    if conf.agent.follow_xl_migrate:
        follower_xs = make_xenstore(conf)
        follower = XlMigrationFollower(agent, follower_xs, on_step=status_now)
        follower.start()
    control: XenstoreControl | None = None
    control_xs: XenStore | None = None
    if conf.agent.xenstore_control:
        control_xs = make_xenstore(conf)
        control = XenstoreControl(agent, control_xs)
        control.start()
    print(f"dmore-rm-agent: dom{guest} console on {conf.rfb.listen}:{port}"
          + (f", following xl migrate of {follower.name!r}" if follower else "")
          + (", co-migration requests from dom0 in xenstore" if control else ""), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    while not stop.is_set():
        status_now()
        try:
            await asyncio.wait_for(stop.wait(), STATUS_INTERVAL if status_path else None)
        except TimeoutError:
            pass
    if follower is not None:
        follower.stop()
    if control is not None:
        await control.stop()
    await agent.stop()
    status_now()
    for xs in (follower_xs, control_xs):
        if xs is not None:
            xs.close()
    xen.close()


def main(argv: list[str] | None = None) -> int:
    conf = dconf.CONF
    logging.register_options(conf)
    conf(sys.argv[1:] if argv is None else argv, project="dmore-nova")
    logging.setup(conf, "dmore-nova")
    try:
        asyncio.run(run(conf))
    except (ValueError, OSError) as exc:
        print(f"dmore-rm-agent: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
