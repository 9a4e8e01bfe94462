"""[demo]: ``dmore-nova demo``, two sim hosts with one guest, its RM VM and the console proxy.

Every option has a command-line flag of the same name (``--proxy-port`` for ``proxy_port``);
a flag wins over the configuration file.
"""

from __future__ import annotations

from oslo_config import cfg

GROUP = cfg.OptGroup("demo", title="The one-command demo (dmore-nova demo)")

OPTS = [
    cfg.HostAddressOpt("listen", default="127.0.0.1",
                       help="Address of the demo page, the control API, the console proxy and "
                            "the RM agent's RFB server. The guest runs a real shell as the user "
                            "who started the demo: keep this on a loopback address."),
    cfg.PortOpt("port", default=6080,
                help="TCP port of the demo page and its JSON control API (/api/...)."),
    cfg.PortOpt("proxy_port", default=6081,
                help="TCP port of the console proxy (noVNC websockets, and its own console "
                     "page at /console.html)."),
    cfg.PortOpt("rfb_port", default=5900,
                help="TCP port of the RM agent's RFB server (what a VNC viewer connects to "
                     "directly); if it is taken, any free port is used and shown by "
                     "'dmore-nova status'. 0: any free port."),
    cfg.StrOpt("run_dir",
               help="Where the demo keeps its state, sockets and logs (default "
                    "/tmp/dmore-demo-<uid>, or $DMORE_DEMO_DIR)."),
    cfg.StrOpt("shm_dir",
               help="Where the sim hosts keep guest memory (default /dev/shm/dmore-demo-<uid>, "
                    "or $DMORE_DEMO_SHM)."),
    cfg.ListOpt("hosts", default=["a", "b"],
                help="Names of the sim hosts (at least two; the guest starts on the first)."),
    cfg.StrOpt("guest_name", default="guest", help="Name of the guest domain."),
    cfg.IntOpt("guest_memory_mb", default=64, min=8, max=4096,
               help="Memory of the guest in MiB (what each live migration copies)."),
    cfg.StrOpt("rm", default="vm", choices=["vm", "dom0"],
               help="Where the RM agent runs: 'vm' = in an RM VM domain that is the guest's "
                    "device backend and has set_target privilege over it, migrated with the "
                    "guest (D-MORE); 'dom0' = in dom0 of whichever host the guest is on."),
    cfg.StrOpt("shell",
               help="The guest console's shell command line (default: bash --noprofile "
                    "--norc -i)."),
    cfg.StrOpt("novnc_root",
               help="Directory of noVNC (holding core/rfb.js), served under /novnc/. Default: "
                    "tests/js/node_modules/@novnc/novnc of this checkout, else "
                    "/usr/share/novnc."),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    conf.register_group(GROUP)
    conf.register_opts(OPTS, group=GROUP)
