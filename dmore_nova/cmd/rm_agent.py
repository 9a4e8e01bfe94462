"""``dmore-rm-agent``: serve one guest's console from the RM VM (or dom0).

Configuration from oslo.config: [agent] (which Xen, which guest) and [rfb] (where viewers
connect, security).  Logs every device state change.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from oslo_config import cfg
from oslo_log import log as logging

from dmore_nova import conf as dconf
from dmore_nova.rm_vm.agent import RMAgent
from dmore_nova.rm_vm.rfb.server import options_from_conf
from dmore_nova.xen.api import Xen

LOG = logging.getLogger(__name__)


def make_xen(conf: cfg.ConfigOpts) -> Xen:
    if conf.agent.xen == "sim":
        if not conf.agent.sim_run_dir:
            raise ValueError("[agent]sim_run_dir is required with xen=sim")
        from dmore_nova.xen.sim.client import SimXen
        return SimXen(conf.agent.sim_run_dir, conf.agent.backend_domid)
    from dmore_nova.xen.real import RealXen
    return RealXen()


async def run(conf: cfg.ConfigOpts) -> None:
    if conf.agent.guest_domid is None:
        raise ValueError("[agent]guest_domid is required")
    xen = make_xen(conf)
    agent = RMAgent(xen, conf.agent.guest_domid, options_from_conf(conf.rfb),
                    devid=conf.agent.devid, width=conf.agent.width, height=conf.agent.height,
                    videoram_mb=conf.agent.videoram_mb, plug_vfb=conf.agent.plug_vfb)
    port = await agent.start(conf.rfb.listen, conf.rfb.port)
    print(f"dmore-rm-agent: dom{conf.agent.guest_domid} console on {conf.rfb.listen}:{port}",
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await agent.stop()
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
