"""``dmore-xl-rmvm``: dom0's part of an RM VM under xl (run as root in dom0).

::

    dmore-xl-rmvm set-target RMVM GUEST
        give the RM VM privilege over its guest (XEN_DOMCTL_set_target, XS_SET_TARGET, the vfb
        directories); names or domids.  Prints {"xen": "ok"|error, "xenstore": ...,
        "vfb_dirs": ...} as JSON
    dmore-xl-rmvm comigrate [--rmvm rmvm] [--guest guest]
        co-migrate the pair on this host (xl migrate, RM VM first), telling the agent in the RM
        VM each step; prints the report as JSON (states with seconds, domids, errors); progress
        on stderr
    dmore-xl-rmvm request RMVM TEXT... [--timeout S]
        send one co-migration request (e.g. ``resume``) to the RM VM's agent and print its ack

The module :mod:`dmore_nova.virt.xl_rmvm` says what each does and why.  Exit status: 0 done;
1 the operation failed (the JSON says why; a co-migration that was rolled back is a failure
too); 2 usage errors, a domain not found, no xenstore.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from dmore_nova.virt import xl_rmvm

PROG = "dmore-xl-rmvm"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="dom0's part of an RM VM under xl: "
                                "privilege over its guest, co-migration of the pair.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("set-target", help="give RMVM privilege over GUEST")
    s.add_argument("rmvm")
    s.add_argument("guest")
    c = sub.add_parser("comigrate", help="xl migrate the RM VM, then its guest, on this host")
    c.add_argument("--rmvm", default="rmvm", help="the RM VM's name or domid (default rmvm)")
    c.add_argument("--guest", default="guest", help="the guest's name or domid (default guest)")
    r = sub.add_parser("request", help="send one request to the agent in RMVM, print its ack")
    r.add_argument("rmvm")
    r.add_argument("text", nargs="+", help="e.g. resume")
    r.add_argument("--timeout", type=float, default=xl_rmvm.PREPARE_TIMEOUT)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log to stderr (comigrate always does)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # comigrate always shows its progress (states, timings) on stderr
    verbose = args.verbose or args.command == "comigrate"
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from dmore_nova.xen.real.xen import connect_xenstore

    try:
        xs = connect_xenstore()
    except OSError as exc:
        print(f"{PROG}: xenstore: {exc}", file=sys.stderr)
        return 2
    try:
        ts = xl_rmvm.XlToolstack(xs)
        if args.command == "set-target":
            res = xl_rmvm.grant_target(xs, ts.domid_of(args.rmvm), ts.domid_of(args.guest))
            print(json.dumps(res.as_dict()), flush=True)
            return 0 if res.ok else 1
        if args.command == "request":
            obs = ts.request(ts.domid_of(args.rmvm), " ".join(args.text), args.timeout)
            if isinstance(obs, xl_rmvm.AckMissing):
                print(json.dumps({"error": obs.reason}), flush=True)
                return 1
            print(json.dumps(obs.ack), flush=True)
            return 0 if obs.ack.get("state") != "error" else 1
        report = xl_rmvm.comigrate(xs, args.rmvm, args.guest)
        print(json.dumps(report), flush=True)
        return 0 if report["ok"] else 1
    except LookupError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # xenstore failed outside a co-migration's own handling
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    finally:
        xs.close()


if __name__ == "__main__":
    sys.exit(main())
