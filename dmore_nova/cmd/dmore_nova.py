"""``dmore-nova``: the demo and its controls.

::

    dmore-nova demo [--port 6080] [--proxy-port 6081] [--rfb-port 5900] [--rm vm|dom0] ...
        two sim hosts, a guest with a shell console and its RM VM, the console proxy and the
        demo page at http://127.0.0.1:6080/ (noVNC + where things live + a Migrate button);
        Ctrl-C stops everything
    dmore-nova migrate GUEST HOST [--fail-at STEP[:start|end]] [--json]
        live-migrate GUEST (and its RM VM) to HOST; prints what it cost
    dmore-nova status [--json]
        hosts, guests, where each RM VM lives, its RFB endpoint, the proxy URL, the last
        migration

``migrate``/``status`` talk to the running demo's control API (found through its run dir's
state file, or ``--url``).  ``demo`` reads the [demo] group of ``--config-file`` files;
command-line flags win.  Exit status: 0 success; 1 the operation failed (a migration that did
not complete, a demo that could not start); 2 usage errors or no demo to talk to.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import sys
from pathlib import Path

from dmore_nova.demo.runtime import DemoError

PROG = "dmore-nova"


def _memory_mb(text: str) -> int:
    """``64``, ``64M``, ``1G`` -> MiB."""
    m = re.fullmatch(r"(\d+)([MmGg]?)(?:i?[Bb])?", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"bad memory size {text!r} (e.g. 64M, 1G)")
    return int(m.group(1)) * (1024 if m.group(2).upper() == "G" else 1)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Migratable out-of-band VNC consoles: "
                                "the demo and its controls.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="run the demo (Ctrl-C stops it)",
                       description="Two sim hosts, one guest with a shell console and its RM "
                                   "VM, the console proxy and the demo page. Ctrl-C stops "
                                   "everything.")
    d.add_argument("--config-file", action="append", default=[],
                   help="oslo.config file(s) with a [demo] group (flags below win)")
    d.add_argument("--listen", help="address of every listener (default 127.0.0.1)")
    d.add_argument("--port", type=int, help="demo page + control API (default 6080)")
    d.add_argument("--proxy-port", type=int, help="console proxy (default 6081)")
    d.add_argument("--rfb-port", type=int,
                   help="RM agent's RFB server (default 5900; taken: any free port)")
    d.add_argument("--run-dir", help="state, sockets and logs (default /tmp/dmore-demo-<uid>)")
    d.add_argument("--shm-dir", help="guest memory (default /dev/shm/dmore-demo-<uid>)")
    d.add_argument("--hosts", help="comma-separated sim host names (default a,b)")
    d.add_argument("--guest-name", help="the guest's name (default guest)")
    d.add_argument("--guest-memory", type=_memory_mb, metavar="SIZE",
                   help="guest memory, e.g. 64M or 1G (default 64M)")
    d.add_argument("--rm", choices=["vm", "dom0"],
                   help="RM agent in an RM VM migrated with the guest (default), or in dom0")
    d.add_argument("--shell", help="the guest console's shell command line")
    d.add_argument("--novnc-root", help="noVNC directory (holding core/rfb.js)")
    d.add_argument("-v", "--verbose", action="store_true",
                   help="log to the terminal too (always logged to <run dir>/logs/demo.log)")

    def api_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--url", help="control API URL (default: from the run dir's state)")
        sp.add_argument("--run-dir", help="the demo's run dir (default /tmp/dmore-demo-<uid>)")
        sp.add_argument("--json", action="store_true", help="print JSON")

    m = sub.add_parser("migrate", help="live-migrate a guest and its RM VM to a host")
    m.add_argument("guest")
    m.add_argument("host")
    m.add_argument("--fail-at", metavar="STEP[:start|end]",
                   help="inject a failure at a co-migration step (prepare, guest-switchover, "
                        "rm-rehome, remap-rebind, replay, refresh) to see rollback / restart")
    api_args(m)
    s = sub.add_parser("status", help="hosts, guests, RM VMs, endpoints, last migration")
    api_args(s)
    return p


def _demo_options(args: argparse.Namespace):  # -> DemoOptions
    from oslo_config import cfg

    from dmore_nova.conf import demo as demo_conf
    from dmore_nova.demo import runtime
    from dmore_nova.demo.orchestrator import DemoOptions

    conf = cfg.ConfigOpts()
    demo_conf.register_opts(conf)
    cli: list[str] = []
    for f in args.config_file:
        cli += ["--config-file", f]
    try:
        conf(cli, project="dmore-nova")
    except cfg.Error as exc:
        raise DemoError(f"configuration: {exc}") from None
    c = conf.demo

    def pick(flag, opt):
        return flag if flag is not None else opt

    hosts = tuple(h.strip() for h in args.hosts.split(",")) if args.hosts else tuple(c.hosts)
    return DemoOptions(
        listen=pick(args.listen, c.listen), port=pick(args.port, c.port),
        proxy_port=pick(args.proxy_port, c.proxy_port), rfb_port=pick(args.rfb_port, c.rfb_port),
        run_dir=Path(pick(args.run_dir, c.run_dir) or runtime.DEFAULT_RUN_DIR),
        shm_dir=Path(pick(args.shm_dir, c.shm_dir) or runtime.DEFAULT_SHM_DIR),
        hosts=hosts, guest_name=pick(args.guest_name, c.guest_name),
        guest_memory_mb=pick(args.guest_memory, c.guest_memory_mb), rm=pick(args.rm, c.rm),
        shell=pick(args.shell, c.shell), novnc_root=pick(args.novnc_root, c.novnc_root))


def _setup_logging(run_dir: Path, verbose: bool) -> None:
    from dmore_nova.demo import runtime

    log_dir = run_dir / runtime.LOG_SUBDIR
    log_dir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    fh = logging.FileHandler(log_dir / "demo.log", mode="a", encoding="utf-8")
    fh.setFormatter(fmt)
    root.addHandler(fh)
    sh = logging.StreamHandler(sys.stderr)
    sh.setLevel(logging.INFO if verbose else logging.WARNING)
    sh.setFormatter(fmt)
    root.addHandler(sh)


def cmd_demo(args: argparse.Namespace) -> int:
    from dmore_nova.demo.orchestrator import run

    try:
        options = _demo_options(args)
        options.check()
        _setup_logging(options.run_dir, args.verbose)
        return asyncio.run(run(options, announce=lambda text: print(text, flush=True)))
    except (DemoError, OSError) as exc:  # OSError: XenError from a sim host, a socket
        print(f"{PROG} demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C before the signal handlers were installed
        return 130


def _client(args: argparse.Namespace):
    from dmore_nova.demo.client import DemoClient, api_url

    return DemoClient(api_url(args.url, args.run_dir))


def cmd_status(args: argparse.Namespace) -> int:
    from dmore_nova.demo.client import format_status

    st = _client(args).status()
    print(json.dumps(st, indent=2) if args.json else format_status(st))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from dmore_nova.demo.client import format_migration

    record = _client(args).migrate(args.guest, args.host, fail_at=args.fail_at)
    print(json.dumps(record, indent=2) if args.json else format_migration(record))
    return 0 if record.get("ok") else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        return cmd_demo(args)
    from dmore_nova.demo.client import APIError

    try:
        return cmd_status(args) if args.command == "status" else cmd_migrate(args)
    except APIError as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return 2 if exc.status in (400, 404) else 1
    except DemoError as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
