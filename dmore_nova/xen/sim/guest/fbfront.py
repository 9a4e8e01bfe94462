"""The sim guest's vfb frontend: what Linux's ``xen-fbfront`` does.

* **probe** limits its video memory (``video_mb``, Linux's ``video=`` default 2 MiB) to the
  backend's ``videoram``, takes the backend's ``width``/``height`` (falling back to 800x600 if
  the mode does not fit), allocates the framebuffer pages, the directory pages and the shared
  page, fills ``struct xenfb_page`` (depth 32, ``line_length = width * 4``, ``mem_length`` =
  the video memory) and the page directory ``pd[]`` for its ABI, and connects;
* **connect** allocates an unbound event channel and writes ``page-ref`` (the *frame* of the
  shared page: vfb has no grant, the backend needs foreign-mapping privilege), ``event-channel``,
  ``protocol`` and ``feature-update=1`` in one transaction, then **Initialised**;
* backend **InitWait** -> **Connected**; backend **Connected** -> read ``request-update``
  (UPDATE events are wanted only then) and ``feature-resize``;
* **refresh** (after drawing) sends an UPDATE rectangle; while the out ring is full the
  rectangle is merged into one pending dirty rectangle, flushed by the next event from the
  backend (``xenfb_refresh``); a pending RESIZE goes first;
* **in events** are all ignored (REFRESH_PERIOD included), but consumed and acknowledged;
* **resume** disconnects, lays the framebuffer out on *new* frames (what a migrated PV guest's
  machine frames do), rewrites the shared page and publishes the new ``page-ref`` and a new
  event channel; UPDATEs stop until the backend is Connected again.

Where the pixels live: Linux's framebuffer is ``vzalloc``'ed, virtually contiguous over
scattered frames.  Here :attr:`FbFront.pixels` is that virtual mapping (a private numpy array)
and :meth:`FbFront.damage` copies the touched rows into the guest frames before it queues the
UPDATE -- the guest's RAM is what the backend maps and shows.  After a resume the whole picture
is copied into the new frames, so nothing on screen is lost across a migration.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dmore_nova.xen.api import XenError
from dmore_nova.xen.io import fbif as F
from dmore_nova.xen.io.protocols import XEN_IO_PROTO_ABI_NATIVE, XEN_IO_PROTO_ABI_X86_64
from dmore_nova.xen.io.ring import RingError
from dmore_nova.xen.io.xenbus import XenbusState
from dmore_nova.xen.sim.guest.xenbus import FrontendError, GuestKernel, PortTable, XenbusFrontend

PAGE_SIZE = 4096
XENFB_WIDTH, XENFB_HEIGHT, XENFB_DEPTH = 800, 600, 32
XENFB_DEFAULT_FB_LEN = XENFB_WIDTH * XENFB_HEIGHT * XENFB_DEPTH // 8
#: Linux's ``video[KPARAM_MEM]`` default, in MiB.
DEFAULT_VIDEO_MB = 2
#: Largest video memory the sim guest will allocate (MiB).
MAX_VIDEO_MB = 64
#: Largest width/height accepted from the backend.
MAX_DIM = 4096
INT_MAX = 0x7FFFFFFF


class FbFront(XenbusFrontend):
    """One vfb device of the sim guest.

    ``listeners`` (no arguments) are called when the mode changed (a RESIZE was accepted) so the
    console can lay its text out again.
    """

    kind = "vfb"

    def __init__(self, kernel: GuestKernel, ports: PortTable, devid: int = 0, *,
                 video_mb: int = DEFAULT_VIDEO_MB, protocol: str | None = None) -> None:
        super().__init__(kernel, ports, devid)
        if not 1 <= video_mb <= MAX_VIDEO_MB:
            raise ValueError(f"video_mb {video_mb} outside 1..{MAX_VIDEO_MB}")
        self.video_mb = video_mb
        self.protocol = protocol or XEN_IO_PROTO_ABI_NATIVE or XEN_IO_PROTO_ABI_X86_64
        # fb_info->var / fix
        self.max_width, self.max_height = XENFB_WIDTH, XENFB_HEIGHT  # video[KPARAM_WIDTH/HEIGHT]
        self.width, self.height = XENFB_WIDTH, XENFB_HEIGHT
        self.depth = XENFB_DEPTH
        self.line_length = 0
        self.fb_size = 0
        self.pixels: np.ndarray = np.zeros((0, 0), np.uint32)
        self._fb_bytes: np.ndarray = np.zeros(0, np.uint8)
        # guest memory
        self.fb_frames: list[int] = []
        self.dir_frames: list[int] = []
        self.page_frame: int | None = None
        self.port: int | None = None
        # xenfb_info
        self.x1 = self.y1 = INT_MAX
        self.x2 = self.y2 = 0
        self.update_wanted = False
        self.feature_resize = False
        self.resize_dpy = False
        self._resize: F.XenfbResize | None = None
        self.updates_sent = 0
        self.ring_errors = 0
        self.resumes = 0
        self.listeners: list[Any] = []

    # -- xenbus driver hooks ----------------------------------------------------------------
    def probe(self) -> None:
        """``xenfb_probe``."""
        # "Limit kernel param videoram amount to what is in xenstore" (0 MiB from a hostile
        # backend ends in the default mode below, as on Linux).
        video_mb = min(self.video_mb, self.read_otherend_uint("videoram", self.video_mb))
        width = self.read_otherend_uint("width", XENFB_WIDTH, MAX_DIM)
        height = self.read_otherend_uint("height", XENFB_HEIGHT, MAX_DIM)
        fb_size = video_mb << 20
        if width * height * XENFB_DEPTH // 8 > fb_size or width == 0 or height == 0:
            self.log.warning("display parameters %d,%d,%d invalid, use defaults", video_mb,
                             width, height)
            width, height, fb_size = XENFB_WIDTH, XENFB_HEIGHT, XENFB_DEFAULT_FB_LEN
        self.max_width, self.max_height = width, height
        self.width, self.height = width, height
        self.line_length = width * XENFB_DEPTH // 8
        self.fb_size = fb_size
        self._fb_bytes = np.zeros(fb_size, np.uint8)
        rows = fb_size // self.line_length
        self.pixels = self._fb_bytes[:rows * self.line_length].view(np.uint32).reshape(
            rows, self.line_length // 4)
        nr_pages = -(-fb_size // PAGE_SIZE)
        epd = PAGE_SIZE // self._entry_size()
        n_dirs = -(-nr_pages // epd)
        probe_page = F.XenfbPage(bytearray(PAGE_SIZE), self.protocol)
        if n_dirs > probe_page.pd_capacity:
            raise FrontendError(f"{fb_size}-byte framebuffer needs {n_dirs} directory pages")
        self.fb_frames = self._alloc(nr_pages)
        self.dir_frames = self._alloc(n_dirs)
        self.page_frame = self.kernel.alloc_page()
        self.init_shared_page()
        self.connect_backend()

    def otherend_changed(self, backend_state: XenbusState) -> None:
        """``xenfb_backend_changed``."""
        if backend_state is XenbusState.InitWait:
            self.switch_state(XenbusState.Connected)
        elif backend_state is XenbusState.Connected:
            if self.state is not XenbusState.Connected:
                self.switch_state(XenbusState.Connected)  # no InitWait seen yet, fudge it
            if self.read_otherend_uint("request-update", 0):
                self.update_wanted = True
            self.feature_resize = bool(self.read_otherend_uint("feature-resize", 0))
        elif backend_state is XenbusState.Closed:
            if self.state is not XenbusState.Closed:
                self.frontend_closed()
        elif backend_state is XenbusState.Closing:
            self.frontend_closed()

    def resume(self, moved: bool = False) -> None:
        """``xenfb_resume``: disconnect, rebuild the shared page over new frames, connect."""
        self.resumes += 1
        self.disconnect_backend(moved)
        n_fb, n_dirs = len(self.fb_frames), len(self.dir_frames)
        # Freed first (the picture is in :attr:`pixels`), so a resume never needs twice the
        # video memory; the allocator hands out other free frames before these.  After a
        # migration the new kernel may carry the old allocations over (``resume_on``) or not:
        # either way nothing maps them in the new domain.
        for frame in self.fb_frames + self.dir_frames + (
                [self.page_frame] if self.page_frame is not None else []):
            try:
                self.kernel.free_page(frame)
            except XenError as exc:
                if not moved:
                    self.log.info("free page %#x: %s", frame, exc)
        self.fb_frames = self._alloc(n_fb)
        self.dir_frames = self._alloc(n_dirs)
        self.page_frame = self.kernel.alloc_page()
        self._sync_bytes(0, self.fb_size)
        self.init_shared_page()
        self.connect_backend()

    def remove(self) -> None:
        self.disconnect_backend(False)
        for frame in self.fb_frames + self.dir_frames + (
                [self.page_frame] if self.page_frame is not None else []):
            try:
                self.kernel.free_page(frame)
            except XenError as exc:
                self.log.info("free page %#x: %s", frame, exc)
        self.fb_frames, self.dir_frames, self.page_frame = [], [], None

    # -- memory -----------------------------------------------------------------------------
    def _entry_size(self) -> int:
        return F.XenfbPage(bytearray(PAGE_SIZE), self.protocol).pd_entry_size

    def _alloc(self, n: int) -> list[int]:
        frames: list[int] = []
        try:
            for _ in range(n):
                frames.append(self.kernel.alloc_page())
        except XenError:
            for f in frames:
                self.kernel.free_page(f)
            raise
        return frames

    def init_shared_page(self) -> None:
        """``xenfb_init_shared_page``: the frame list in the directory pages, ``pd[]``, the
        geometry, and zeroed ring indices."""
        assert self.page_frame is not None
        esize = self._entry_size()
        epd = PAGE_SIZE // esize
        dtype = "<u4" if esize == 4 else "<u8"
        gfns = np.zeros(len(self.dir_frames) * epd, dtype)
        gfns[:len(self.fb_frames)] = self.fb_frames
        raw = gfns.tobytes()
        for i, frame in enumerate(self.dir_frames):
            self.kernel.write(frame, 0, raw[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])
        mem = self.kernel.page(self.page_frame)
        mem[:] = bytes(PAGE_SIZE)
        page = F.XenfbPage(mem, self.protocol)
        for i, frame in enumerate(self.dir_frames):
            page.set_pd(i, frame)
        page.width = self.width
        page.height = self.height
        page.depth = self.depth
        page.line_length = self.line_length
        page.mem_length = self.fb_size
        page.in_cons = page.in_prod = 0
        page.out_cons = page.out_prod = 0
        self.kernel.mark_dirty(self.page_frame)

    def _sync_bytes(self, start: int, end: int) -> None:
        """Copy framebuffer bytes ``[start, end)`` into the guest frames (dirty-logged)."""
        start = max(start, 0)
        end = min(end, self.fb_size)
        src = memoryview(self._fb_bytes)
        while start < end:
            idx, off = divmod(start, PAGE_SIZE)
            n = min(PAGE_SIZE - off, end - start)
            self.kernel.write(self.fb_frames[idx], off, src[start:start + n])
            start += n

    # -- connection -------------------------------------------------------------------------
    def connect_backend(self) -> None:
        """``xenfb_connect_backend``."""
        assert self.page_frame is not None
        port = self.kernel.alloc_unbound(self.otherend_id)
        self.port = port
        self.ports.bind(port, self.event_handler)
        frame = self.page_frame

        def publish(t: Any) -> None:
            t.write(f"{self.nodename}/page-ref", str(frame))
            t.write(f"{self.nodename}/event-channel", str(port))
            t.write(f"{self.nodename}/protocol", self.protocol)
            t.write(f"{self.nodename}/feature-update", "1")

        try:
            self.xs.run_transaction(publish)
        except XenError:
            self.disconnect_backend(False)
            raise
        self.switch_state(XenbusState.Initialised)

    def disconnect_backend(self, moved: bool) -> None:
        """``xenfb_disconnect_backend``: no more UPDATEs, unbind the port."""
        self.update_wanted = False
        if self.port is not None:
            self.ports.unbind(self.port)
            if not moved:
                try:
                    self.kernel.unbind(self.port)
                except XenError as exc:
                    self.log.info("unbind port %d: %s", self.port, exc)
            self.port = None

    # -- the ring ---------------------------------------------------------------------------
    def _page(self) -> F.XenfbPage | None:
        if self.page_frame is None:
            return None
        return F.XenfbPage(self.kernel.page(self.page_frame), self.protocol)

    def _queue_full(self, page: F.XenfbPage) -> bool:
        try:
            return F.fb_pending(page)[1] >= F.XENFB_OUT_RING_LEN
        except RingError as exc:
            # Hostile out_cons: treat the ring as full (nothing is written) until it is sane.
            self.ring_errors += 1
            self.log.warning("%s: out ring: %s", self.nodename, exc)
            return True

    def _send(self, page: F.XenfbPage, ev: F.FbOutEvent) -> None:
        if self.port is None:
            return
        try:
            n = F.fb_out_put(page, [ev])
        except RingError as exc:
            self.ring_errors += 1
            self.log.warning("%s: out ring: %s", self.nodename, exc)
            return
        if n:
            assert self.page_frame is not None
            self.kernel.mark_dirty(self.page_frame)
            self.kernel.notify(self.port)

    def _handle_resize_dpy(self, page: F.XenfbPage) -> None:
        if self.resize_dpy and self._resize is not None and not self._queue_full(page):
            self.resize_dpy = False
            self._send(page, self._resize)

    def refresh(self, x1: int, y1: int, w: int, h: int) -> None:
        """``xenfb_refresh``: send (or merge into the dirty rectangle) one UPDATE."""
        page = self._page()
        if page is None:
            return
        self._handle_resize_dpy(page)
        if not self.update_wanted:
            return
        x2, y2 = x1 + w - 1, y1 + h - 1
        y1, y2 = min(self.y1, y1), max(self.y2, y2)
        x1, x2 = min(self.x1, x1), max(self.x2, x2)
        if self._queue_full(page):
            # Can't send right now, stash it in the dirty rectangle.
            self.x1, self.x2, self.y1, self.y2 = x1, x2, y1, y2
            return
        self.x1 = self.y1 = INT_MAX
        self.x2 = self.y2 = 0
        if x1 <= x2 and y1 <= y2:
            self._send(page, F.XenfbUpdate(x=x1, y=y1, width=x2 - x1 + 1, height=y2 - y1 + 1))
            self.updates_sent += 1

    def damage(self, x: int, y: int, w: int, h: int) -> None:
        """The guest drew into :attr:`pixels` inside this rectangle: copy the rows to the
        guest frames, then refresh (what ``sys_imageblit`` + ``xenfb_refresh`` add up to)."""
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, self.width), min(y + h, self.height)
        if x1 <= x0 or y1 <= y0 or not self.fb_frames:
            return
        self._sync_bytes(y0 * self.line_length, y1 * self.line_length)
        self.refresh(x0, y0, x1 - x0, y1 - y0)

    def event_handler(self) -> None:
        """``xenfb_event_handler``: drop in events, acknowledge, flush the dirty rectangle."""
        page = self._page()
        if page is None or self.port is None:
            return
        if page.in_cons != page.in_prod:
            try:
                F.fb_in_get(page)  # no in events are recognised; consume them all
            except RingError as exc:
                self.ring_errors += 1
                self.log.warning("%s: in ring: %s; skipping", self.nodename, exc)
                page.in_cons = page.in_prod
            assert self.page_frame is not None
            self.kernel.mark_dirty(self.page_frame)
            self.kernel.notify(self.port)
        self.refresh(INT_MAX, INT_MAX, -INT_MAX, -INT_MAX)

    # -- modes ------------------------------------------------------------------------------
    def check_var(self, width: int, height: int) -> bool:
        """``xenfb_check_var`` for depth 32: can the guest switch to this mode?"""
        if not self.feature_resize:
            return (width, height) == (self.max_width, self.max_height)
        if not (0 < width <= self.max_width and 0 < height <= self.max_height):
            return False
        return width <= self.line_length // 4 and width * height * 4 <= self.fb_size

    def resize(self, width: int, height: int) -> bool:
        """``fb_set_par`` after ``check_var``: switch mode and queue a RESIZE (sent before the
        next UPDATE).  The line length stays ``max_width * 4``, as on Linux.  False if the
        mode is not allowed."""
        if not self.check_var(width, height):
            return False
        self.width, self.height = width, height
        self._resize = F.XenfbResize(width=width, height=height, stride=self.line_length,
                                     depth=self.depth, offset=0)
        self.resize_dpy = True
        page = self._page()
        if page is not None:
            # The shared page keeps the boot mode until the next resume rewrites it (Linux).
            self._handle_resize_dpy(page)
        for listener in self.listeners:
            listener()
        return True

    def status(self) -> dict[str, Any]:
        return {"state": self.state.name, "backend": self.otherend,
                "backend_id": self.otherend_id, "page_frame": self.page_frame,
                "port": self.port, "width": self.width, "height": self.height,
                "line_length": self.line_length, "mem_length": self.fb_size,
                "protocol": self.protocol, "update_wanted": self.update_wanted,
                "feature_resize": self.feature_resize, "updates_sent": self.updates_sent,
                "resumes": self.resumes, "fb_frames": [self.fb_frames[0], self.fb_frames[-1]]
                if self.fb_frames else [], "dir_frames": list(self.dir_frames),
                "ring_errors": self.ring_errors}
