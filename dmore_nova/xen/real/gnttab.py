"""Grant mapping over libxengnttab (``/dev/xen/gntdev``): how a backend maps a page a frontend
granted to it (vkbd's ``page-gref``)."""

from __future__ import annotations

import ctypes
import errno
import mmap

from dmore_nova.xen import api
from dmore_nova.xen.real import libs
from dmore_nova.xen.real.evtchn import check_domid

#: ``grant_ref_t`` is a uint32_t.
GRANT_REF_MAX = 0xFFFFFFFF


class GrantTable(libs.MappingHandle):
    """One ``xengnttab_handle``, opened on first use and shared by all grant mappings.

    Mappings made through a handle must be unmapped before it is closed (xengnttab.h), so
    :meth:`close` unmaps whatever is still mapped.
    """

    OPEN_FN, UNMAP_FN, CLOSE_FN = "xengnttab_open", "xengnttab_unmap", "xengnttab_close"
    DEVICE, MODULE, WHAT = "/dev/xen/gntdev", "xen_gntdev", "grant table"

    def __init__(self, lib: libs.XenLibrary | None = None) -> None:
        super().__init__(lib or libs.GNTTAB)

    def map_grant_ref(self, domid: int, gref: int, writable: bool = True) -> libs.MappedPages:
        """``xengnttab_map_grant_ref``: one page; EPERM etc. as :class:`api.XenError`."""
        check_domid(domid)
        if not isinstance(gref, int) or not 0 <= gref <= GRANT_REF_MAX:
            raise api.XenError(errno.EINVAL, f"grant reference {gref!r} out of range")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        handle = self._h()
        ctypes.set_errno(0)
        addr = self._lib.call("xengnttab_map_grant_ref", handle, domid, gref, prot)
        if not addr:
            raise libs.last_error(f"xengnttab_map_grant_ref(dom{domid}, gref {gref})")
        return self._track(addr, 1, writable, f"grant dom{domid}/gref{gref}")
