"""The guest-kernel side of a sim domain: what Linux gives its PV frontends.

A sim guest's frontends (xen-kbdfront / xen-fbfront look-alikes) run in a process that acts
as the guest domain, and need what Linux's Xen core gives a driver:

* pages of the guest's own RAM (``alloc_page`` / ``free_page``; a frame number is what
  Linux calls a GFN, what a PV frontend puts in ``page-ref`` and ``pd[]``);
* grant references (``gnttab_grant_foreign_access(domid, frame, readonly)``,
  ``gnttab_end_foreign_access_ref``, the deferred ``gnttab_end_foreign_access``), written
  straight into the domain's grant table in shared memory, as Linux does;
* event channels (``xenbus_alloc_evtchn`` = ``EVTCHNOP_alloc_unbound``, ``notify``,
  ``unbind``) with one pollable fd; :meth:`SimKernel.take_events` behaves like Linux's
  edge-triggered event IRQs: a fired port is re-armed as it is taken, so a notify that
  arrives while its handler runs fires again;
* xenstore (the domain's xenbus).

Migration hooks: writes made through :meth:`SimKernel.write` (and pages handed out by
:meth:`SimKernel.alloc_page`) are recorded in a dirty bitmap once
:meth:`SimKernel.enable_dirty_log` is on, so a live migration (:mod:`.migration`) copies only
what changed; writes through raw :meth:`SimKernel.page` views must call :meth:`mark_dirty`.
:meth:`SimKernel.resume_on` is the same guest on the destination host.
"""

from __future__ import annotations

import collections
import errno
import mmap
import os
import threading
from pathlib import Path

from dmore_nova.xen import api
from dmore_nova.xen.api import XenError
from dmore_nova.xen.sim.client import HypercallConnection, SimEventChannels, _one_fd
from dmore_nova.xen.sim.host import hypercall_path, xenstore_path
from dmore_nova.xen.sim.hypercall import SimOp
from dmore_nova.xen.sim.memory import (
    GNTTAB_NR_RESERVED_ENTRIES,
    GRANT_ENTRIES_PER_FRAME,
    PAGE_SIZE,
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
    GTF_writing,
    read_entry,
    write_entry,
)

MAX_EVENTS_PER_TAKE = 1024
"""Ports one :meth:`SimKernel.take_events` call returns at most; the rest stay readable."""


class SimKernel:
    """Guest kernel services for a process acting as sim domain ``domid``."""

    def __init__(self, run_dir: str | os.PathLike[str], domid: int, *,
                 xenstore: api.XenStore | None = None) -> None:
        self.run_dir = Path(run_dir)
        self._conn = HypercallConnection(hypercall_path(self.run_dir, domid))
        if self._conn.domid != domid:
            self._conn.close()
            raise XenError(errno.EPROTO, f"socket of dom{domid} answered as dom{self._conn.domid}")
        self.domid = domid
        self._lock = threading.RLock()
        self._xenstore = xenstore
        self._ram_mm: mmap.mmap | None = None
        self._gnt_mm: mmap.mmap | None = None
        try:
            res, fds = self._conn.call(SimOp.memory_map_own)
            self.nr_pages: int = res["nr_pages"]
            fd = _one_fd(fds)
            try:
                self._ram_mm = mmap.mmap(fd, self.nr_pages * PAGE_SIZE, flags=mmap.MAP_SHARED)
            finally:
                os.close(fd)
            res, fds = self._conn.call(SimOp.GNTTABOP_setup_table)
            nr_frames = res["nr_frames"]
            fd = _one_fd(fds)
            try:
                self._gnt_mm = mmap.mmap(fd, nr_frames * PAGE_SIZE, flags=mmap.MAP_SHARED)
            finally:
                os.close(fd)
            self.evtchn = SimEventChannels(self._conn)
        except BaseException:
            self._release_maps()
            self._conn.close()
            raise
        self.ram = memoryview(self._ram_mm)
        self._gnttab = memoryview(self._gnt_mm)
        self.nr_grant_entries = nr_frames * GRANT_ENTRIES_PER_FRAME
        # Frame 0 is never handed out (as no driver ever gets PFN 0 from Linux).
        self._free_frames: collections.deque[int] = collections.deque(range(1, self.nr_pages))
        self._allocated: set[int] = set()
        self._free_grefs: collections.deque[int] = collections.deque(
            range(GNTTAB_NR_RESERVED_ENTRIES, self.nr_grant_entries))
        self._granted: dict[int, tuple[int, int, bool]] = {}
        self._deferred: list[int] = []
        self._dirty: bytearray | None = None
        self.closed = False

    # -- memory ----------------------------------------------------------------------------------

    def _check_frame(self, frame: int) -> None:
        if not 0 <= frame < self.nr_pages:
            raise XenError(errno.EINVAL, f"frame {frame:#x} outside dom{self.domid}'s "
                                         f"{self.nr_pages} pages")

    def alloc_page(self) -> int:
        """A zeroed page of our RAM; returns its frame number."""
        with self._lock:
            self.process_deferred()
            if not self._free_frames:
                raise XenError(errno.ENOMEM, f"dom{self.domid}: out of memory")
            frame = self._free_frames.popleft()
            self._allocated.add(frame)
        self.ram[frame * PAGE_SIZE:(frame + 1) * PAGE_SIZE] = bytes(PAGE_SIZE)
        self.mark_dirty(frame)
        return frame

    def alloc_pages(self, n: int) -> list[int]:
        """``n`` pages (not necessarily contiguous, as vmalloc'ed framebuffers are not)."""
        frames: list[int] = []
        try:
            for _ in range(n):
                frames.append(self.alloc_page())
        except XenError:
            for f in frames:
                self.free_page(f)
            raise
        return frames

    def free_page(self, frame: int) -> None:
        with self._lock:
            if frame not in self._allocated:
                raise XenError(errno.EINVAL, f"frame {frame:#x} is not allocated")
            if any(f == frame for _, f, _ in self._granted.values()):
                raise XenError(errno.EBUSY, f"frame {frame:#x} is still granted")
            self._allocated.discard(frame)
            self._free_frames.append(frame)

    def page(self, frame: int) -> memoryview:
        """A view of one of our pages (writes through it are not dirty-logged)."""
        self._check_frame(frame)
        return self.ram[frame * PAGE_SIZE:(frame + 1) * PAGE_SIZE]

    def write(self, frame: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write into our page ``frame`` at ``offset`` and log it dirty."""
        self._check_frame(frame)
        if not 0 <= offset <= PAGE_SIZE - len(data):
            raise XenError(errno.EINVAL, f"{len(data)} bytes at {offset} cross the page")
        base = frame * PAGE_SIZE + offset
        self.ram[base:base + len(data)] = data
        self.mark_dirty(frame)

    # -- dirty log (hook for a later live migration) --------------------------------------------

    def enable_dirty_log(self) -> None:
        self._dirty = bytearray((self.nr_pages + 7) // 8)

    def mark_dirty(self, frame: int) -> None:
        if self._dirty is not None and 0 <= frame < self.nr_pages:
            self._dirty[frame >> 3] |= 1 << (frame & 7)

    def take_dirty_log(self) -> list[int]:
        """Frames written since the last call (and clear the log); [] when logging is off."""
        if self._dirty is None:
            return []
        out = [i * 8 + b for i, byte in enumerate(self._dirty) if byte
               for b in range(8) if byte & (1 << b)]
        self._dirty = bytearray(len(self._dirty))
        return out

    # -- grants ----------------------------------------------------------------------------------

    def grant_foreign_access(self, domid: int, frame: int, readonly: bool = False) -> int:
        """``gnttab_grant_foreign_access``: let ``domid`` map our ``frame``; returns the ref."""
        self._check_frame(frame)
        with self._lock:
            self.process_deferred()
            if not self._free_grefs:
                raise XenError(errno.ENOSPC, f"dom{self.domid}: no free grant references")
            gref = self._free_grefs.popleft()
            self._granted[gref] = (domid, frame, readonly)
            write_entry(self._gnttab, gref, domid, frame,
                        GTF_permit_access | (GTF_readonly if readonly else 0))
        return gref

    def query_foreign_access(self, gref: int) -> bool:
        """``gnttab_query_foreign_access``: is the grant mapped by its grantee right now?"""
        self._check_gref(gref)
        return bool(read_entry(self._gnttab, gref)[0] & (GTF_reading | GTF_writing))

    def end_foreign_access_ref(self, gref: int) -> bool:
        """``gnttab_end_foreign_access_ref``: revoke unless mapped; True if revoked.  The ref
        stays ours (call :meth:`free_grant_reference`) either way."""
        self._check_gref(gref)
        res, _ = self._conn.call(SimOp.gnttab_end_foreign_access, ref=gref)
        return bool(res["ended"])

    def free_grant_reference(self, gref: int) -> None:
        with self._lock:
            if self._granted.pop(gref, None) is not None:
                self._free_grefs.append(gref)

    def end_foreign_access(self, gref: int) -> bool:
        """``gnttab_end_foreign_access``: revoke and free the ref; if the grantee still maps
        it, defer (retried by later kernel calls and :meth:`process_deferred`), as Linux does
        rather than free a page another domain can still write.  True if done now."""
        if self.end_foreign_access_ref(gref):
            self.free_grant_reference(gref)
            return True
        with self._lock:
            if gref not in self._deferred:
                self._deferred.append(gref)
        return False

    def process_deferred(self) -> int:
        """Retry deferred revocations; returns how many are still pending."""
        with self._lock:
            still: list[int] = []
            for gref in self._deferred:
                if self.end_foreign_access_ref(gref):
                    self.free_grant_reference(gref)
                else:
                    still.append(gref)
            self._deferred = still
            return len(still)

    def _check_gref(self, gref: int) -> None:
        if gref not in self._granted:
            raise XenError(errno.EINVAL, f"grant ref {gref} is not ours")

    # -- event channels --------------------------------------------------------------------------

    def fileno(self) -> int:
        """Readable when an event channel of ours fired (for ``loop.add_reader``)."""
        return self.evtchn.fileno()

    def alloc_unbound(self, remote_domid: int) -> int:
        """``xenbus_alloc_evtchn``: a port ``remote_domid`` may bind to, bound to our IRQ."""
        return self.evtchn.bind_unbound_port(remote_domid)

    def notify(self, port: int) -> None:
        """``notify_remote_via_evtchn``."""
        self.evtchn.notify(port)

    def unbind(self, port: int) -> None:
        """``unbind_from_irqhandler`` + ``xenbus_free_evtchn``."""
        self.evtchn.unbind(port)

    def take_events(self) -> list[int]:
        """Fired ports, each re-armed as it is taken (edge-triggered, as Linux's event IRQs:
        a notify after this point fires again)."""
        out: list[int] = []
        while len(out) < MAX_EVENTS_PER_TAKE:
            port = self.evtchn.pending()
            if port is None:
                break
            self.evtchn.unmask(port)
            out.append(port)
        return out

    # -- xenstore --------------------------------------------------------------------------------

    @property
    def xenstore(self) -> api.XenStore:
        if self._xenstore is None:
            from dmore_nova.xen.pyxs_store import PyxsXenStore
            self._xenstore = PyxsXenStore(
                unix_socket_path=str(xenstore_path(self.run_dir, self.domid)))
        return self._xenstore

    # -- live migration --------------------------------------------------------------------------

    def resume_on(self, run_dir: str | os.PathLike[str], domid: int, *,
                  xenstore: api.XenStore | None = None) -> SimKernel:
        """This guest after a live migration: the kernel of domain ``domid`` of the host at
        ``run_dir``, whose memory the toolstack copied from ours.

        What carries over is what a PV guest keeps in its own RAM: which frames are in use
        (the page allocator).  What starts over is what belonged to the old domain: the grant
        table (Xen does not migrate it; Linux's ``gnttab_resume`` starts afresh and frontends
        re-grant), event channels, the xenstore connection and the dirty log.  This kernel is
        left open: its owner closes it once nothing uses the old domain any more.
        """
        new = SimKernel(run_dir, domid, xenstore=xenstore)
        if new.nr_pages != self.nr_pages:
            new.close()
            raise XenError(errno.EINVAL, f"dom{domid} has {new.nr_pages} pages, this guest "
                                         f"{self.nr_pages}")
        with self._lock:
            new._free_frames = collections.deque(self._free_frames)
            new._allocated = set(self._allocated)
        return new

    # -- teardown --------------------------------------------------------------------------------

    def _release_maps(self) -> None:
        for attr in ("ram", "_gnttab"):
            view = getattr(self, attr, None)
            if view is not None:
                view.release()
        for attr in ("_ram_mm", "_gnt_mm"):
            mm = getattr(self, attr, None)
            if mm is not None:
                try:
                    mm.close()
                except BufferError:
                    pass  # a caller still holds a page view; the mapping goes with it
                setattr(self, attr, None)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._xenstore is not None:
            self._xenstore.close()
        self.evtchn.close()
        self._conn.close()
        self._release_maps()
