"""Runs in dom0 of the xenbox: co-migrate the RM VM and its guest with ``xl migrate`` (localhost).

The order, and why (issue 5 §3; the sim's protocol is :mod:`dmore_nova.rm_vm.comigration`):

1. **RM VM first.**  The guest's console devices have their backends in the RM VM's xenstore
   directory; libxl re-creates a migrating guest's devices by backend *name*
   (``backend=rmvm``), so the guest must migrate *after* the RM VM has its new domid and its
   name back.  (The other order would leave the already-migrated guest's backends under the
   old RM VM's directory, which libxl deletes with the old RM VM, and no toolstack would
   re-create them.)
2. Before ``xl migrate rmvm``, the agent is asked to ``prepare`` (hold input, unmap every guest
   page, unbind every port: a PV domain with foreign mappings cannot be saved).  The RFB
   server and the viewers' TCP connections stay in the RM VM's memory and move with it; the
   RM VM's address moves with its vif (tools/xenbox/rmvm-vif re-routes it).
3. ``xl migrate guest``: when its incoming domain appears (``guest--incoming``), dom0 gives the
   *new* RM VM privilege over it -- ``xc_domain_set_target`` + ``XS_SET_TARGET`` + the vfb
   dirs (:mod:`tests.xen.rmvm_dom0`).  The target is per domain and is not migrated, and Xen
   accepts only one target per domain, so it is set once, for the new pair.  Then the agent is
   told ``incoming <domid>``: it plugs the vfb before the guest resumes, re-homes when xl
   names the domain ``guest``, re-maps/re-binds, replays the held input, refreshes viewers.

Prints one JSON line with every step's result and time.  Usage (dom0):
``python3 -m tests.xen.rmvm_comigrate --rmvm rmvm --guest guest``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from pyxs import Client

from tests.xen.rmvm_dom0 import domid_of, vfb_dirs, xc_set_target, xs_set_target

XS_SOCKET = "/run/xenstored/socket"
PREPARE_TIMEOUT = 120.0
MIGRATE_TIMEOUT = 900.0
ACK_TIMEOUT = 600.0
POLL = 0.2


def _xs() -> Client:
    return Client(unix_socket_path=XS_SOCKET)


def request(domid: int, req: str) -> None:
    """``<seq> <req>``: the agent acts on each new value once (it does not delete it)."""
    with _xs() as c:
        c.write(f"/local/domain/{domid}/data/dmore-migrate-ack".encode(), b"")
        c.write(f"/local/domain/{domid}/data/dmore-migrate".encode(),
                f"{time.time_ns()} {req}".encode())


def wait_ack(domid: int, timeout: float, want: tuple[str, ...]) -> dict:
    deadline = time.monotonic() + timeout
    path = f"/local/domain/{domid}/data/dmore-migrate-ack".encode()
    with _xs() as c:
        while True:
            raw = c.read(path, b"") or b""
            if raw.startswith(b"error"):
                raise RuntimeError(f"the RM VM's agent: {raw.decode()}")
            if raw:
                ack = json.loads(raw)
                if ack.get("state") in want:
                    return ack
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {want} ack from dom{domid} after {timeout:.0f} s")
            time.sleep(POLL)


def find_named(name: str) -> int | None:
    with _xs() as c:
        for d in c.list(b"/local/domain"):
            if d.isdigit() and c.read(b"/local/domain/" + d + b"/name", b"") == name.encode():
                return int(d)
    return None


def xl_migrate(name: str) -> subprocess.Popen:
    return subprocess.Popen(["xl", "migrate", "-s", "", name, "xl migrate-receive"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def comigrate(rmvm: str, guest: str) -> dict:
    res: dict = {"steps": []}

    def step(what: str, t0: float, **kw) -> None:
        rec = {"what": what, "seconds": round(time.monotonic() - t0, 3), **kw}
        res["steps"].append(rec)
        print(json.dumps(rec), file=sys.stderr, flush=True)

    r_old, g_old = domid_of(rmvm), domid_of(guest)
    res.update(rmvm_old=r_old, guest_old=g_old)
    t_all = time.monotonic()

    t0 = time.monotonic()
    request(r_old, "prepare")
    step("prepare", t0, ack=wait_ack(r_old, PREPARE_TIMEOUT, ("prepared",)))

    t0 = time.monotonic()
    p = xl_migrate(rmvm)
    out, _ = p.communicate(timeout=MIGRATE_TIMEOUT)
    r_new = domid_of(rmvm)
    step("xl migrate rmvm", t0, rc=p.returncode, rmvm_new=r_new, output=out[-1500:])
    res["rmvm_new"] = r_new
    if p.returncode != 0 or "Migration successful" not in out:
        res["error"] = "xl migrate of the RM VM failed"
        return res

    t0 = time.monotonic()
    p = xl_migrate(guest)
    incoming = None
    deadline = time.monotonic() + MIGRATE_TIMEOUT
    while incoming is None and p.poll() is None and time.monotonic() < deadline:
        incoming = find_named(f"{guest}--incoming")
        if incoming is None:
            time.sleep(POLL)
    if incoming is None:
        out, _ = p.communicate(timeout=MIGRATE_TIMEOUT)
        res["error"] = "the guest's incoming domain never appeared"
        step("xl migrate guest", t0, rc=p.returncode, output=out[-1500:])
        return res
    t1 = time.monotonic()
    grant = {"xen": xc_set_target(r_new, incoming), "xenstore": xs_set_target(r_new, incoming),
             "vfb_dirs": vfb_dirs(r_new, incoming)}
    step("target for the incoming guest", t1, incoming=incoming, **grant)
    request(r_new, f"incoming {incoming}")
    out, _ = p.communicate(timeout=MIGRATE_TIMEOUT)
    g_new = domid_of(guest)
    step("xl migrate guest", t0, rc=p.returncode, guest_new=g_new, output=out[-1500:])
    res.update(guest_new=g_new, grant=grant)
    if p.returncode != 0 or "Migration successful" not in out:
        res["error"] = "xl migrate of the guest failed"
        return res
    t0 = time.monotonic()
    step("agent re-homed", t0, ack=wait_ack(r_new, ACK_TIMEOUT,
                                              ("done", "devices-not-connected")))
    res["seconds"] = round(time.monotonic() - t_all, 3)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rmvm", default="rmvm")
    ap.add_argument("--guest", default="guest")
    a = ap.parse_args(argv)
    try:
        res = comigrate(a.rmvm, a.guest)
    except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
        res = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(res), flush=True)
    return 0 if "error" not in res else 1


if __name__ == "__main__":
    sys.exit(main())
