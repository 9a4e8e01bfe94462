"""dom0 toolstack operations xl has no command for: ``XEN_DOMCTL_set_target`` through libxenctrl.

Why: an RM VM is the backend domain of one guest's console devices, and it needs privilege over
that guest to foreign-map the vfb's pages (``page-ref`` and the framebuffer are frame numbers,
not grants).  libxl gives a stub-domain device model exactly that (``libxl__spawn_stub_dm``:
``xc_domain_set_target`` then ``xs_set_target``) but has no command for any other domain, so
dom0's part of the RM VM (:mod:`dmore_nova.virt.xl_rmvm`) calls libxenctrl itself.

libxenctrl is not ABI-stable (``libxenctrl.so.4.17``); it is loaded on first use
(:data:`dmore_nova.xen.real.libs.XENCTRL`), so this module imports anywhere.
"""

from __future__ import annotations

import ctypes
import errno
import os

from dmore_nova.xen import api
from dmore_nova.xen.real import libs


def set_target(domid: int, target: int, lib: libs.XenLibrary | None = None) -> None:
    """``xc_domain_set_target(xch, domid, target)``: ``domid`` gets what the XSM policy allows a
    device model over ``target`` (``XSM_TARGET``: foreign maps, ``getdomaininfo``).

    Raises :class:`api.XenError` with Xen's errno: ``EOPNOTSUPP`` for a PV ``target`` on Xen
    4.17 (see :mod:`dmore_nova.virt.xl_rmvm`), ``EINVAL`` if ``domid`` already has a target
    (one per domain, until it is destroyed) or ``domid == target``, ``ESRCH`` for a domain that
    does not exist, ``EPERM`` outside dom0; :class:`api.XenUnavailable` without libxenctrl."""
    lib = lib or libs.XENCTRL
    ctypes.set_errno(0)
    xch = lib.call("xc_interface_open", None, None, 0)
    if not xch:
        raise libs.last_error("xc_interface_open")
    try:
        ctypes.set_errno(0)
        rc = lib.call("xc_domain_set_target", xch, domid, target)
        if rc != 0:
            code = ctypes.get_errno() or errno.EIO
            raise api.XenError(code, f"xc_domain_set_target({domid}, {target}) = {rc}: "
                                     f"{errno.errorcode.get(code, code)} ({os.strerror(code)})")
    finally:
        lib.call("xc_interface_close", xch)
