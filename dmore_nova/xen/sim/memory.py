"""Guest memory and grant tables v1 for the sim.

Layout on a host (one directory per host, under /dev/shm by default)::

    <shm_dir>/dom<N>.mem      the domain's RAM, frame f at byte offset f * XC_PAGE_SIZE
    <shm_dir>/dom<N>.gnttab   its grant table: GNTTAB_NR_FRAMES pages of grant_entry_v1_t

For the sim a frame number is the guest frame number *and* the machine frame number (a PV
guest's MFN is what its frontends publish in ``page-ref``); keeping memory per host+domid in
plain files is what a later live migration will copy into a new domid on another host.

Three parts:

* the ``grant_entry_v1_t`` codec and constants (``xen/include/public/grant_table.h``);
* :class:`GrantTable`, the host's sans-IO view of one granter's table: the checks and pin
  counting of ``map_grant_ref`` / ``unmap_common`` in ``xen/common/grant_table.c`` (flags must
  be exactly ``GTF_permit_access`` naming the mapper, no write pin on a ``GTF_readonly``
  entry, ``GTF_reading`` / ``GTF_writing`` set in the shared entry while pinned) and the guest's
  ``gnttab_end_foreign_access_ref`` compare-and-swap, done on the host because two processes
  cannot cmpxchg a shared 16-bit field from Python;
* :class:`DomainMemory` (host: creates and owns the files) and :class:`FrameMapping`
  (any process: maps frames of a file it was handed, as one contiguous region).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dmore_nova.xen.api import XC_PAGE_SIZE, Mapping, XenError

PAGE_SIZE = XC_PAGE_SIZE

# -- grant_table.h ---------------------------------------------------------------------------------

GRANT_ENTRY_V1 = struct.Struct("<HHI")
"""``struct grant_entry_v1 { uint16_t flags; domid_t domid; uint32_t frame; }``"""
GRANT_ENTRY_V1_SIZE = GRANT_ENTRY_V1.size  # 8
GRANT_ENTRIES_PER_FRAME = PAGE_SIZE // GRANT_ENTRY_V1_SIZE  # 512
GNTTAB_NR_FRAMES = 32
"""Grant-table frames per sim domain (Xen's ``gnttab_max_frames`` default is 64)."""
GNTTAB_NR_ENTRIES = GNTTAB_NR_FRAMES * GRANT_ENTRIES_PER_FRAME
GNTTAB_NR_RESERVED_ENTRIES = 8
"""Refs 0..7 are reserved for the toolstack (console, xenstore); guests allocate above."""

GTF_invalid = 0
GTF_permit_access = 1
GTF_accept_transfer = 2
GTF_transitive = 3
GTF_type_mask = 3
GTF_readonly = 1 << 2
GTF_reading = 1 << 3
GTF_writing = 1 << 4

GNTST_okay = 0
GNTST_general_error = -1
GNTST_bad_domain = -2
GNTST_bad_gntref = -3
GNTST_bad_handle = -4
GNTST_permission_denied = -8
GNTST_bad_page = -9
GNTST_no_space = -13

GNTST_NAMES = {GNTST_okay: "GNTST_okay", GNTST_general_error: "GNTST_general_error",
               GNTST_bad_domain: "GNTST_bad_domain", GNTST_bad_gntref: "GNTST_bad_gntref",
               GNTST_bad_handle: "GNTST_bad_handle",
               GNTST_permission_denied: "GNTST_permission_denied",
               GNTST_bad_page: "GNTST_bad_page", GNTST_no_space: "GNTST_no_space"}

# How a failed grant op surfaces as errno to callers of the Xen API.  (Linux's gntdev folds
# every failed map into EINVAL; the API promises EPERM for "not granted to you", which is
# what a caller can act on, so permission failures keep that distinction.)
GNTST_ERRNO = {GNTST_general_error: errno.EPERM, GNTST_permission_denied: errno.EPERM,
               GNTST_bad_domain: errno.ESRCH, GNTST_bad_gntref: errno.EINVAL,
               GNTST_bad_handle: errno.EINVAL, GNTST_bad_page: errno.EINVAL,
               GNTST_no_space: errno.ENOSPC}

GNTPIN_MAX = 0x7F
"""Pins of one kind per active entry; Xen refuses past 0x7f (``act->pin & 0x80808080``)."""

SIM_MAX_DOMAIN_PAGES = 256 * 1024
"""1 GiB per domain.  The files are sparse, so only touched pages cost memory."""


class GrantError(XenError):
    """A grant operation failed; ``status`` is the ``GNTST_*`` code Xen would report."""

    def __init__(self, status: int, msg: str) -> None:
        super().__init__(GNTST_ERRNO.get(status, errno.EINVAL),
                         f"{GNTST_NAMES.get(status, status)}: {msg}")
        self.status = status


def read_entry(table: memoryview, ref: int) -> tuple[int, int, int]:
    """``(flags, domid, frame)`` of entry ``ref``; the caller has bounds-checked ``ref``."""
    return GRANT_ENTRY_V1.unpack_from(table, ref * GRANT_ENTRY_V1_SIZE)


def write_entry(table: memoryview, ref: int, domid: int, frame: int, flags: int) -> None:
    """Publish a grant the way Linux's ``gnttab_update_entry_v1`` does: ``domid`` and
    ``frame`` first, then (after a write barrier) ``flags``, so that a concurrent mapper that
    sees the flags also sees the target."""
    off = ref * GRANT_ENTRY_V1_SIZE
    struct.pack_into("<HI", table, off + 2, domid, frame)
    struct.pack_into("<H", table, off, flags)


def _set_flags(table: memoryview, ref: int, flags: int) -> None:
    struct.pack_into("<H", table, ref * GRANT_ENTRY_V1_SIZE, flags)


# -- host-side grant table state machine -----------------------------------------------------------

@dataclass
class ActiveGrant:
    """Xen's ``active_grant_entry``: what was pinned, by whom, how often."""

    domid: int
    frame: int
    readers: int = 0   # read-only host mappings
    writers: int = 0   # writable host mappings

    @property
    def pinned(self) -> bool:
        return bool(self.readers or self.writers)


class GrantTable:
    """One granting domain's table as the hypervisor sees it.

    ``shared`` is the table memory the guest writes (``nr_entries`` × 8 bytes); ``nr_pages``
    bounds the frames an entry may name.  Nothing here trusts the shared contents beyond one
    read per check.
    """

    def __init__(self, domid: int, shared: memoryview, nr_pages: int,
                 nr_entries: int = GNTTAB_NR_ENTRIES) -> None:
        if len(shared) < nr_entries * GRANT_ENTRY_V1_SIZE:
            raise ValueError("shared table smaller than nr_entries")
        self.domid = domid
        self.shared = shared
        self.nr_pages = nr_pages
        self.nr_entries = nr_entries
        self._active: dict[int, ActiveGrant] = {}

    def active(self, ref: int) -> ActiveGrant | None:
        return self._active.get(ref)

    @property
    def nr_active(self) -> int:
        return len(self._active)

    def write_pinned_frames(self) -> set[int]:
        """Frames some grantee maps writable right now (log-dirty's final round adds them:
        their writes are invisible to the hypervisor until unmap)."""
        return {act.frame for act in self._active.values() if act.writers}

    def map(self, mapper: int, ref: int, readonly: bool) -> int:
        """Pin entry ``ref`` for ``mapper`` (``map_grant_ref``); returns the frame."""
        if not 0 <= ref < self.nr_entries:
            raise GrantError(GNTST_bad_gntref, f"bad ref {ref:#x} for d{self.domid}")
        act = self._active.get(ref)
        if act is not None and (act.domid != mapper or act.readers >= GNTPIN_MAX
                                or act.writers >= GNTPIN_MAX):
            raise GrantError(GNTST_general_error,
                             f"d{self.domid} ref {ref}: pinned by d{act.domid}, or pin overflow")
        if act is None or (not readonly and not act.writers):
            flags, domid, frame = read_entry(self.shared, ref)
            if (flags & GTF_type_mask) != GTF_permit_access or domid != mapper:
                raise GrantError(GNTST_general_error,
                                 f"d{self.domid} ref {ref}: bad flags ({flags:#x}) or dom "
                                 f"({domid}); expected d{mapper}")
            if not readonly and flags & GTF_readonly:
                raise GrantError(GNTST_general_error,
                                 f"d{self.domid} ref {ref}: attempt to write-pin a r/o entry")
            if act is None:
                if not 0 <= frame < self.nr_pages:
                    raise GrantError(GNTST_bad_page,
                                     f"d{self.domid} ref {ref}: frame {frame:#x} not in "
                                     f"0..{self.nr_pages - 1:#x}")
                act = ActiveGrant(mapper, frame)
                self._active[ref] = act
            flags |= GTF_reading if readonly else (GTF_reading | GTF_writing)
            _set_flags(self.shared, ref, flags)
        if readonly:
            act.readers += 1
        else:
            act.writers += 1
        return act.frame

    def unmap(self, ref: int, readonly: bool) -> None:
        """Drop one pin (``unmap_common``); clears GTF_writing / GTF_reading at zero."""
        act = self._active.get(ref)
        if act is None or (act.readers if readonly else act.writers) == 0:
            raise GrantError(GNTST_bad_handle, f"d{self.domid} ref {ref} is not pinned that way")
        if readonly:
            act.readers -= 1
        else:
            act.writers -= 1
        flags = read_entry(self.shared, ref)[0]
        if not act.writers:
            flags &= ~GTF_writing
        if not act.pinned:
            flags &= ~GTF_reading
            del self._active[ref]
        _set_flags(self.shared, ref, flags)

    def end_foreign_access(self, ref: int) -> bool:
        """``gnttab_end_foreign_access_ref_v1``: clear the entry unless it is mapped
        (GTF_reading / GTF_writing); True if the grant is now revoked."""
        if not 0 <= ref < self.nr_entries:
            raise GrantError(GNTST_bad_gntref, f"bad ref {ref:#x} for d{self.domid}")
        flags = read_entry(self.shared, ref)[0]
        if flags & (GTF_reading | GTF_writing) or ref in self._active:
            return False
        _set_flags(self.shared, ref, 0)
        return True


# -- files -----------------------------------------------------------------------------------------

def memory_path(shm_dir: Path, domid: int) -> Path:
    return shm_dir / f"dom{domid}.mem"


def gnttab_path(shm_dir: Path, domid: int) -> Path:
    return shm_dir / f"dom{domid}.gnttab"


class DomainMemory:
    """The host's hold on one domain's RAM and grant-table files."""

    def __init__(self, shm_dir: Path, domid: int, nr_pages: int,
                 nr_grant_frames: int = GNTTAB_NR_FRAMES) -> None:
        if not 1 <= nr_pages <= SIM_MAX_DOMAIN_PAGES:
            raise XenError(errno.EINVAL, f"{nr_pages} pages not in 1..{SIM_MAX_DOMAIN_PAGES}")
        self.domid = domid
        self.nr_pages = nr_pages
        self.nr_grant_frames = nr_grant_frames
        self.mem_path = memory_path(shm_dir, domid)
        self.gnttab_path = gnttab_path(shm_dir, domid)
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        self.mem_fd = os.open(self.mem_path, flags, 0o600)
        self.mem_ro_fd = self.gnttab_fd = -1
        self._gnttab_mm: mmap.mmap | None = None
        try:
            os.ftruncate(self.mem_fd, nr_pages * PAGE_SIZE)
            # Read-only mappings are handed this one, so that the kernel enforces read-only
            # in the mapper's process, not just the Python view.
            self.mem_ro_fd = os.open(self.mem_path, os.O_RDONLY | os.O_CLOEXEC)
            self.gnttab_fd = os.open(self.gnttab_path, flags, 0o600)
            os.ftruncate(self.gnttab_fd, nr_grant_frames * PAGE_SIZE)
            self._gnttab_mm = mmap.mmap(self.gnttab_fd, nr_grant_frames * PAGE_SIZE,
                                        flags=mmap.MAP_SHARED)
        except BaseException:
            self.close()
            raise
        self._gnttab_view = memoryview(self._gnttab_mm)
        self.grant_table = GrantTable(domid, self._gnttab_view, nr_pages,
                                      nr_grant_frames * GRANT_ENTRIES_PER_FRAME)

    def fd_for(self, writable: bool) -> int:
        return self.mem_fd if writable else self.mem_ro_fd

    def close(self, unlink: bool = True) -> None:
        """Drop the host's hold.  Processes that still map the files keep their pages (as a
        dying Xen domain's pages live on while foreign-mapped); the names disappear."""
        view = getattr(self, "_gnttab_view", None)
        if view is not None:
            view.release()
            self._gnttab_view = None
        if self._gnttab_mm is not None:
            self._gnttab_mm.close()
            self._gnttab_mm = None
        for attr in ("mem_fd", "mem_ro_fd", "gnttab_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)
        if unlink:
            for p in (self.mem_path, self.gnttab_path):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass


# -- mapping frames into this process -------------------------------------------------------------

_MAP_FIXED = 0x10  # Linux, all architectures we run on; not exported by Python's mmap module
_libc = ctypes.CDLL(None, use_errno=True)
_libc_mmap = _libc.mmap
_libc_mmap.restype = ctypes.c_void_p
_libc_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_int64]
_MAP_FAILED = ctypes.c_void_p(-1).value

MAX_MAP_FRAMES = 4096
"""Frames in one mapping call (16 MiB); a vfb of 1920x1200x32bpp needs 2250."""


def _runs(frames: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(index, first_frame, count)`` for each run of consecutive frames."""
    runs: list[tuple[int, int, int]] = []
    for i, f in enumerate(frames):
        if runs and runs[-1][1] + runs[-1][2] == f:
            idx, first, n = runs[-1]
            runs[-1] = (idx, first, n + 1)
        else:
            runs.append((i, f, 1))
    return runs


class FrameMapping(Mapping):
    """``frames`` of the memory file ``fd`` mapped as one contiguous region, like
    ``xenforeignmemory_map`` gives.

    The region is reserved as a Python ``mmap`` (which tracks buffer exports) and the frames
    are placed into it with ``MAP_FIXED``.  :meth:`unmap` closes it; if the caller still holds
    views derived from :attr:`mem`, the region is replaced by zero pages instead, so a stale
    view reads zeros rather than guest memory, and never faults.

    ``on_unmap`` (releasing a grant pin on the host) runs only from an explicit
    :meth:`unmap`: a mapping that is merely garbage-collected keeps its pin until the
    process's host connection closes, as a leaked gntdev mapping lasts until process exit.
    """

    def __init__(self, fd: int, frames: Sequence[int], writable: bool,
                 on_unmap: Callable[[], None] | None = None) -> None:
        frames = list(frames)
        if not 1 <= len(frames) <= MAX_MAP_FRAMES:
            raise XenError(errno.EINVAL, f"{len(frames)} frames not in 1..{MAX_MAP_FRAMES}")
        self.frames = frames
        self.writable = writable
        self._on_unmap = on_unmap
        self._size = len(frames) * PAGE_SIZE
        self._mm: mmap.mmap | None = mmap.mmap(-1, self._size,
                                               flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        anchor = ctypes.c_char.from_buffer(self._mm)
        self._addr = ctypes.addressof(anchor)
        del anchor
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        try:
            for idx, first, n in _runs(frames):
                self._place(idx, n, prot, mmap.MAP_SHARED, fd, first * PAGE_SIZE)
        except BaseException:
            self._mm.close()
            self._mm = None
            raise
        view = memoryview(self._mm)
        self.mem = view if writable else view.toreadonly()
        if not writable:
            view.release()

    def _place(self, idx: int, n: int, prot: int, flags: int, fd: int, offset: int) -> None:
        want = self._addr + idx * PAGE_SIZE
        got = _libc_mmap(want, n * PAGE_SIZE, prot, flags | _MAP_FIXED, fd, offset)
        if got in (None, _MAP_FAILED) or got != want:
            e = ctypes.get_errno()
            raise XenError(e or errno.ENOMEM, f"mmap of {n} frames failed: {os.strerror(e)}")

    @property
    def mapped(self) -> bool:
        return self._mm is not None

    def unmap(self) -> None:
        if self._mm is None:
            return
        mm, self._mm = self._mm, None
        self.mem.release()
        try:
            mm.close()
        except BufferError:
            # Views derived from mem are still alive: detach them from guest memory.  The
            # anonymous region is munmapped when the last view goes (mmap's dealloc).
            self._place(0, len(self.frames), mmap.PROT_READ | mmap.PROT_WRITE,
                        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if self._on_unmap is not None:
            cb, self._on_unmap = self._on_unmap, None
            cb()
