"""``python -m dmore_nova.xen.sim.guest``: run a sim guest as domain N of a sim host.

::

    python -m dmore_nova.xen.sim.guest --host-dir RUN_DIR --domid N \\
        [--key-log FILE] [--control SOCK] [--shell CMD ...] [--video-mb MB] [--no-console]

The process connects to ``RUN_DIR/dom<N>/`` (so it *is* domain N), drives the frontends it
finds under ``/local/domain/N/device/{vkbd,vfb}/0`` (and those that appear later), runs a
shell console in the framebuffer and stays until SIGTERM/SIGINT (or the ``stop`` control
command).  ``SIGUSR1`` resumes the devices in place, as after a migration; the control socket's
``resume`` command does the same, optionally onto another host (``host_dir``, ``domid``), and
its migration ops make the process a ``MigratingGuest`` (:mod:`.control`).
Once running it prints one JSON line ``{"ready": true, "domid": N, "pid": ...}`` on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import sys

from dmore_nova.xen.api import XenError
from dmore_nova.xen.sim.guest import Guest, serve
from dmore_nova.xen.sim.guest.fbfront import DEFAULT_VIDEO_MB, MAX_VIDEO_MB


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dmore_nova.xen.sim.guest",
                                description="a sim domU with Linux-like vkbd/vfb frontends")
    p.add_argument("--host-dir", required=True, help="the sim host's run dir")
    p.add_argument("--domid", type=int, required=True, help="the domain this process is")
    p.add_argument("--key-log", help="append every received vkbd event as a JSON line here")
    p.add_argument("--control", help="unix socket for control commands (JSON lines)")
    p.add_argument("--shell", help="shell command line (default: bash --noprofile --norc -i)")
    p.add_argument("--video-mb", type=int, default=DEFAULT_VIDEO_MB,
                   help=f"video memory in MiB, 1..{MAX_VIDEO_MB} (Linux's video=; default "
                        f"{DEFAULT_VIDEO_MB})")
    p.add_argument("--no-console", action="store_true", help="no shell console")
    p.add_argument("--no-wait-backend", action="store_true",
                   help="probe without waiting for the backend's InitWait (as Linux does)")
    p.add_argument("--log-level", default="INFO")
    return p


async def _main(args: argparse.Namespace) -> int:
    from dmore_nova.xen.sim.kernel import SimKernel

    kernel = SimKernel(args.host_dir, args.domid)
    guest = Guest(kernel, key_log=args.key_log, video_mb=args.video_mb,
                  console=not args.no_console,
                  shell=shlex.split(args.shell) if args.shell else None,
                  wait_backend=not args.no_wait_backend)

    def ready() -> None:
        print(json.dumps({"ready": True, "domid": args.domid, "pid": os.getpid()}), flush=True)

    try:
        await serve(guest, control_path=args.control, on_ready=ready)
    finally:
        guest.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not 1 <= args.video_mb <= MAX_VIDEO_MB:
        print(f"--video-mb must be 1..{MAX_VIDEO_MB}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return asyncio.run(_main(args))
    except XenError as exc:
        print(f"sim guest: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
