"""Runs in dom0 of the xenbox: the toolstack's part of giving the RM VM privilege over its guest.

Why this exists: xl has no command for it.  libxl does exactly this for a stub-domain device
model (``libxl__spawn_stub_dm``: ``xc_domain_set_target`` then ``xs_set_target``), and the RM
VM is in the same position -- the backend domain of one guest's console devices:

* ``XEN_DOMCTL_set_target`` (libxenctrl ``xc_domain_set_target(xch, domid, target)``): Xen lets
  ``domid`` do to ``target`` what the XSM policy allows a "device model" (``XSM_TARGET``):
  foreign-map its memory (the vfb's ``page-ref`` and framebuffer pages are frame numbers, not
  grants), ``XEN_DOMCTL_getdomaininfo``.
* ``XS_SET_TARGET`` (xs_wire.h; pyxs ``Client.set_target``): xenstored treats ``domid`` as the
  owner of ``target``'s nodes, so the agent may create the guest's ``device/vfb/0`` itself.

Neither survives migration (the new domains are new domids; Xen's target pointer and
xenstored's target table are per domain): after ``xl migrate`` dom0 must set both again.

Usage (dom0): ``python3 -m tests.xen.rmvm_dom0 set-target RMVM GUEST`` (names or domids);
prints one JSON line ``{"xen": "ok"|error, "xenstore": "ok"|error, "vfb_dirs": ...}`` and exits 0
only when all were done.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import subprocess
import sys

#: libxenctrl is not ABI-stable: its soname carries the Xen version (Debian: libxenctrl4.17).
XENCTRL_SONAME = "libxenctrl.so.4.17"


def domid_of(name_or_id: str) -> int:
    """A domid, from a number or from ``xl domid NAME``."""
    if name_or_id.isdigit():
        return int(name_or_id)
    out = subprocess.run(["xl", "domid", name_or_id], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"no domain named {name_or_id!r}: {out.stderr.strip()}")
    return int(out.stdout.strip())


def xc_set_target(domid: int, target: int) -> str:
    """``xc_domain_set_target``; returns "ok" or the error (errno name and text)."""
    try:
        lib = ctypes.CDLL(XENCTRL_SONAME, use_errno=True)
    except OSError as e:
        return f"cannot load {XENCTRL_SONAME}: {e}"
    lib.xc_interface_open.restype = ctypes.c_void_p
    lib.xc_interface_open.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint)
    lib.xc_interface_close.argtypes = (ctypes.c_void_p,)
    # xenctrl.h: int xc_domain_set_target(xc_interface *xch, uint32_t domid, uint32_t target);
    lib.xc_domain_set_target.restype = ctypes.c_int
    lib.xc_domain_set_target.argtypes = (ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32)
    xch = lib.xc_interface_open(None, None, 0)
    if not xch:
        e = ctypes.get_errno()
        return f"xc_interface_open: {errno.errorcode.get(e, e)} ({os.strerror(e)})"
    try:
        ctypes.set_errno(0)
        rc = lib.xc_domain_set_target(xch, domid, target)
        if rc != 0:
            e = ctypes.get_errno()
            return (f"xc_domain_set_target({domid}, {target}) = {rc}: "
                    f"{errno.errorcode.get(e, e)} ({os.strerror(e)})")
        return "ok"
    finally:
        lib.xc_interface_close(xch)


def xs_set_target(domid: int, target: int) -> str:
    """``XS_SET_TARGET`` to xenstored (pyxs ``Client.set_target``), after writing
    ``/local/domain/<domid>/target`` as libxl does for a stub domain (``libxl__spawn_stub_dm``;
    Linux's privcmd in a domU reads it)."""
    from pyxs import Client
    from pyxs.exceptions import PyXSError
    try:
        with Client(unix_socket_path="/run/xenstored/socket") as c:
            c.write(f"/local/domain/{domid}/target".encode(), str(target).encode())
            c.set_target(domid, target)
    except (PyXSError, OSError) as e:
        return f"XS_SET_TARGET({domid}, {target}): {e!r}"
    return "ok"


def vfb_dirs(domid: int, target: int) -> str:
    """The parent directories of the vfb the RM VM plugs, owned so that it may create the
    device itself.  Seen on 4.17: libxl creates ``/local/domain/<guest>/device`` and
    ``/local/domain/<rmvm>/backend`` owned by dom0 (``n0``), so even with ``XS_SET_TARGET`` the
    RM VM gets EACCES on ``MKDIR .../device/vfb/0`` ("xenstore MKDIR failed: EACCES");
    ``device/vfb`` owned by the guest (hence, through the target, by the RM VM) and
    ``backend/vfb`` owned by the RM VM are what a toolstack would create for a driver domain."""
    from pyxs import Client
    from pyxs.exceptions import PyXSError
    fe = f"/local/domain/{target}/device/vfb".encode()
    be = f"/local/domain/{domid}/backend/vfb".encode()
    try:
        with Client(unix_socket_path="/run/xenstored/socket") as c:
            for path, perms in ((fe, [f"n{target}".encode(), f"r{domid}".encode()]),
                                (be, [f"n{domid}".encode(), f"r{target}".encode()])):
                c.mkdir(path)
                c.set_perms(path, perms)
    except (PyXSError, OSError) as e:
        return f"vfb dirs: {e!r}"
    return "ok"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("set-target", help="give RMVM privilege over GUEST (Xen and xenstored)")
    s.add_argument("rmvm")
    s.add_argument("guest")
    a = ap.parse_args(argv)
    rm, guest = domid_of(a.rmvm), domid_of(a.guest)
    res = {"rmvm": rm, "guest": guest, "xen": xc_set_target(rm, guest),
           "xenstore": xs_set_target(rm, guest), "vfb_dirs": vfb_dirs(rm, guest)}
    print(json.dumps(res), flush=True)
    return 0 if res["xen"] == res["xenstore"] == res["vfb_dirs"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
