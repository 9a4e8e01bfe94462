"""What the conformance suite reads from xenstore, one implementation for both backends.

On the sim it is called with the sim's store; in dom0 of the xenbox it runs as
``python3 -m tests.xen.observe <guest-domid>`` over the real xenstored (pyxs, through the
project's :class:`~dmore_nova.xen.pyxs_store.PyxsXenStore`) and prints JSON.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass

DEVICES = ("vkbd", "vfb")


@dataclass
class Observation:
    """Direct children of each device dir (frontend and backend), and each dir's permissions."""

    guest: int
    frontend: dict[str, dict[str, str]]
    backend: dict[str, dict[str, str]]
    backend_path: dict[str, str]
    frontend_perms: dict[str, list[str]]
    backend_perms: dict[str, list[str]]


def observe_store(xs, guest: int) -> Observation:
    fe, be, bp, fperm, bperm = {}, {}, {}, {}, {}
    for kind in DEVICES:
        fdir = f"/local/domain/{guest}/device/{kind}/0"
        fe[kind] = {k: (xs.read(f"{fdir}/{k}") or b"").decode() for k in xs.directory(fdir)}
        bdir = fe[kind].get("backend", "")
        bp[kind] = bdir
        be[kind] = ({k: (xs.read(f"{bdir}/{k}") or b"").decode() for k in xs.directory(bdir)}
                    if bdir else {})
        fperm[kind] = xs.get_perms(fdir)
        bperm[kind] = xs.get_perms(bdir) if bdir else []
    return Observation(guest, fe, be, bp, fperm, bperm)


def main() -> int:
    from dmore_nova.xen.real.xen import connect_xenstore

    xs = connect_xenstore()
    try:
        print(json.dumps(asdict(observe_store(xs, int(sys.argv[1])))))
    finally:
        xs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
