"""``dmore-rfb-demo`` / ``python -m dmore_nova.rm_vm.rfb``: serve the built-in demo display.

Options come from oslo.config ([rfb] group, ``--config-file``) with two command-line shortcuts:
``--listen HOST:PORT`` and ``--password-file F``.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from oslo_config import cfg
from oslo_log import log as logging

from dmore_nova import conf as dconf
from dmore_nova.rm_vm.rfb.demo import DemoDisplay
from dmore_nova.rm_vm.rfb.server import RFBServer, options_from_conf

LOG = logging.getLogger(__name__)

CLI_OPTS = [
    cfg.StrOpt("listen", metavar="HOST:PORT",
               help="Where to listen (overrides [rfb]listen and [rfb]port)."),
    cfg.StrOpt("password-file", dest="cli_password_file",
               help="VNC password file (overrides [rfb]password_file)."),
    cfg.StrOpt("geometry", default="800x600", help="Demo display size, WIDTHxHEIGHT."),
]


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen wants HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


async def serve(conf: cfg.ConfigOpts) -> None:
    host, port = conf.rfb.listen, conf.rfb.port
    if conf.listen:
        host, port = parse_listen(conf.listen)
    w, _, h = conf.geometry.partition("x")
    display = DemoDisplay(int(w), int(h))
    server = RFBServer(display, display, options_from_conf(conf.rfb))
    bound = await server.listen(host, port)
    print(f"dmore-rfb-demo: serving {display.width}x{display.height} on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()


def main(argv: list[str] | None = None) -> int:
    conf = dconf.CONF
    conf.register_cli_opts(CLI_OPTS)
    logging.register_options(conf)
    conf(sys.argv[1:] if argv is None else argv, project="dmore-nova")
    logging.setup(conf, "dmore-nova")
    if conf.cli_password_file:
        conf.set_override("password_file", conf.cli_password_file, group="rfb")
        if "vnc" not in conf.rfb.security_types:
            conf.set_override("security_types", ["vnc"], group="rfb")
    try:
        asyncio.run(serve(conf))
    except (ValueError, OSError) as exc:
        print(f"dmore-rfb-demo: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
