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


class ForeignMemory(libs.MappingHandle):
    """One ``xenforeignmemory_handle``, opened on first use."""

    OPEN_FN, UNMAP_FN, CLOSE_FN = ("xenforeignmemory_open", "xenforeignmemory_unmap",
                                   "xenforeignmemory_close")
    DEVICE, MODULE, WHAT = "/dev/xen/privcmd", "xen_privcmd", "foreign memory"

    def __init__(self, lib: libs.XenLibrary | None = None) -> None:
        super().__init__(lib or libs.FOREIGNMEMORY)
        pfn = libs.XEN_PFN_T.ctype
        self._pfn_max = (1 << (8 * ctypes.sizeof(pfn))) - 1  # type: ignore[arg-type]

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
        return self._track(addr, n, writable, f"foreign dom{domid} {n} pages")
