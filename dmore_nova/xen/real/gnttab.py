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


class GrantTable:
    """One ``xengnttab_handle``, opened on first use and shared by all grant mappings.

    Mappings made through a handle must be unmapped before it is closed (xengnttab.h), so
    :meth:`close` unmaps whatever is still mapped.
    """

    def __init__(self, lib: libs.XenLibrary | None = None) -> None:
        self._lib = lib or libs.GNTTAB
        self._handle: int | None = None
        self._closed = False
        self._live: set[libs.MappedPages] = set()

    def _h(self) -> int:
        if self._closed:
            raise api.XenError(errno.EBADF, "grant table handle is closed")
        if self._handle is None:
            ctypes.set_errno(0)
            handle = self._lib.call("xengnttab_open", None, 0)
            if not handle:
                raise libs.open_error("xengnttab_open", "/dev/xen/gntdev", "xen_gntdev",
                                      ctypes.get_errno() or errno.ENOENT)
            self._handle = handle  # type: ignore[assignment]
        return self._handle  # type: ignore[return-value]

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
        pages = libs.MappedPages(addr, 1, self._unmapper, writable=writable,  # type: ignore[arg-type]
                                 what=f"grant dom{domid}/gref{gref}")
        self._live.add(pages)
        return pages

    def _unmapper(self, addr: int, npages: int) -> None:
        ctypes.set_errno(0)
        if self._handle is None or self._lib.call(
                "xengnttab_unmap", self._handle, addr, npages) != 0:
            raise libs.last_error("xengnttab_unmap")
        self._live = {p for p in self._live if p.addr != addr}

    def close(self) -> None:
        if self._closed:
            return
        for pages in list(self._live):
            try:
                pages.unmap()
            except api.XenError:
                pass  # closing the handle releases the grant maps anyway
        self._live.clear()
        self._closed = True
        handle, self._handle = self._handle, None
        if handle is not None:
            self._lib.call("xengnttab_close", handle)
