"""Foreign mapping over libxenforeignmemory (``/dev/xen/privcmd``): how a backend with privilege
over a guest maps frames the guest published by number (vfb's ``page-ref`` and the framebuffer
pages listed in its page directory -- xen-fbfront grants nothing)."""

from __future__ import annotations

import ctypes
import errno
import mmap
from collections.abc import Sequence

from dmore_nova.xen import api
from dmore_nova.xen.real import libs
from dmore_nova.xen.real.evtchn import check_domid

#: The most pages one call may map: 256 MiB, far above any vfb (xen-fbfront's ``videoram``
#: defaults to 8 MiB) -- a guest-supplied page count beyond it is refused before any syscall.
MAX_FOREIGN_MAP_PAGES = 65536


class ForeignMemory:
    """One ``xenforeignmemory_handle``, opened on first use."""

    def __init__(self, lib: libs.XenLibrary | None = None) -> None:
        self._lib = lib or libs.FOREIGNMEMORY
        self._handle: int | None = None
        self._closed = False
        self._live: set[libs.MappedPages] = set()
        pfn = libs.XEN_PFN_T.ctype
        self._pfn_max = (1 << (8 * ctypes.sizeof(pfn))) - 1  # type: ignore[arg-type]

    def _h(self) -> int:
        if self._closed:
            raise api.XenError(errno.EBADF, "foreign memory handle is closed")
        if self._handle is None:
            ctypes.set_errno(0)
            handle = self._lib.call("xenforeignmemory_open", None, 0)
            if not handle:
                raise libs.open_error("xenforeignmemory_open", "/dev/xen/privcmd",
                                      "xen_privcmd", ctypes.get_errno() or errno.ENOENT)
            self._handle = handle  # type: ignore[assignment]
        return self._handle  # type: ignore[return-value]

    def map(self, domid: int, frames: Sequence[int], writable: bool = False) -> libs.MappedPages:
        """Map ``frames`` of ``domid`` contiguously.  Any page that fails fails the whole call
        (the partial mapping is undone) with that page's errno, so callers never see a mapping
        with holes."""
        check_domid(domid)
        n = len(frames)
        if not 0 < n <= MAX_FOREIGN_MAP_PAGES:
            raise api.XenError(errno.EINVAL, f"cannot map {n} pages (limit "
                                             f"{MAX_FOREIGN_MAP_PAGES})")
        for i, frame in enumerate(frames):
            if not isinstance(frame, int) or not 0 <= frame <= self._pfn_max:
                raise api.XenError(errno.EINVAL, f"frame {i} ({frame!r}) out of range")
        arr = (libs.XEN_PFN_T.ctype * n)(*frames)  # type: ignore[operator]
        err = (ctypes.c_int * n)()
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        handle = self._h()
        ctypes.set_errno(0)
        addr = self._lib.call("xenforeignmemory_map", handle, domid, prot, n, arr, err)
        if not addr:
            raise libs.last_error(f"xenforeignmemory_map(dom{domid}, {n} pages)")
        bad = next((i for i in range(n) if err[i] != 0), None)
        if bad is not None:
            self._lib.call("xenforeignmemory_unmap", handle, addr, n)
            code = -err[bad] if err[bad] < 0 else err[bad]
            raise api.XenError(code, f"xenforeignmemory_map(dom{domid}): page {bad} "
                                     f"(frame {frames[bad]:#x}): {errno.errorcode.get(code, code)}")
        pages = libs.MappedPages(addr, n, self._unmapper, writable=writable,  # type: ignore[arg-type]
                                 what=f"foreign dom{domid} {n} pages")
        self._live.add(pages)
        return pages

    def _unmapper(self, addr: int, npages: int) -> None:
        ctypes.set_errno(0)
        if self._handle is None or self._lib.call(
                "xenforeignmemory_unmap", self._handle, addr, npages) != 0:
            raise libs.last_error("xenforeignmemory_unmap")
        self._live = {p for p in self._live if p.addr != addr}

    def close(self) -> None:
        if self._closed:
            return
        for pages in list(self._live):
            try:
                pages.unmap()
            except api.XenError:
                pass  # closing the handle leaves the mappings to munmap at exit
        self._live.clear()
        self._closed = True
        handle, self._handle = self._handle, None
        if handle is not None:
            self._lib.call("xenforeignmemory_close", handle)
