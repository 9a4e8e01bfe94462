"""``python -m dmore_nova.console`` (``dmore-console-proxy``): the console proxy daemon.

Configuration: the [console] group (where to listen, noVNC, the token plugin, re-attach
timing, limits).  SIGINT/SIGTERM close every session (browsers get a close frame) and exit.
"""

from __future__ import annotations

import signal
import sys
import threading

from oslo_config import cfg
from oslo_log import log as logging

from dmore_nova import conf as dconf
from dmore_nova.conf import console as console_conf
from dmore_nova.console.proxy import ConsoleProxy, ProxyOptions
from dmore_nova.console.rfb_splice import SpliceConfig
from dmore_nova.console.token_plugins import load_plugin

LOG = logging.getLogger(__name__)


def options_from_conf(group) -> ProxyOptions:  # noqa: ANN001 - an oslo.config group
    return ProxyOptions(
        reattach_timeout=group.reattach_timeout,
        reattach_backoff_max=group.reattach_backoff_max,
        connect_timeout=group.connect_timeout,
        handshake_timeout=group.handshake_timeout,
        max_connections=group.max_connections,
        max_buffer=group.max_buffer,
        allowed_origins=tuple(group.allowed_origins),
        control_hosts=tuple(group.control_hosts),
        novnc_root=group.novnc_root or None,
        cert_file=group.cert_file,
        key_file=group.key_file,
        splice=SpliceConfig(max_cut_text=group.max_cut_text,
                            max_pending_input=group.max_pending_input,
                            max_held_unit=group.max_held_message),
    )


def make_proxy(conf: cfg.ConfigOpts) -> ConsoleProxy:
    group = conf.console
    plugin = load_plugin(group.token_plugin, group.token_source)
    return ConsoleProxy(plugin, options_from_conf(group), host=group.listen, port=group.port)


def main(argv: list[str] | None = None) -> int:
    conf = dconf.CONF
    console_conf.register_opts(conf)  # idempotent once dmore_nova.conf registers it too
    logging.register_options(conf)
    conf(sys.argv[1:] if argv is None else argv, project="dmore-nova")
    logging.setup(conf, "dmore-nova")
    try:
        proxy = make_proxy(conf)
    except (ValueError, OSError) as exc:
        print(f"dmore-console-proxy: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    proxy.start()
    print(f"dmore-console-proxy: listening on {proxy.url}", flush=True)
    while not stop.wait(1.0):
        pass
    proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
