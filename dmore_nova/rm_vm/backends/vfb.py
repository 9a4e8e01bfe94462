"""The vfb backend (fbif.h) and the RFB display it feeds.

The guest's framebuffer is listed by frame number in directory pages (``pd[]`` in the shared
page): there is no grant, so mapping needs foreign-mapping privilege over the guest (dom0, or
the RM VM as the guest's *target*).  At depth 32 the mapped pages back the RFB display directly
(a strided numpy view, no copy: Linux's 32-bpp layout is exactly our native 0x00RRGGBB); other
depths are converted into a shadow buffer only where the guest says it drew (UPDATE events).

:class:`VfbDisplay` outlives device connections: when the frontend goes away (migration), viewers
keep the last picture (a copy taken before unmapping) and see a resize or a full refresh once the
device is connected again.

Every value in the shared page and in RESIZE events is guest-written: checked against
``videoram`` and our own limits *before* anything is mapped or viewed (QEMU's
``xenfb_configure_fb`` rules, made strict: a bad geometry closes the device instead of being
"fixed up").
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import numpy as np

from dmore_nova.rm_vm.backends.xenbus import BackendDevice, DeviceError, parse_uint
from dmore_nova.rm_vm.rfb.display import DisplaySource, Rect
from dmore_nova.rm_vm.rfb.region import Region
from dmore_nova.xen.api import EventChannels, Mapping, Transaction, Xen, XenStore
from dmore_nova.xen.io import fbif as F
from dmore_nova.xen.io.protocols import KNOWN_PROTOCOLS
from dmore_nova.xen.io.ring import RingError

PAGE = 4096
MAX_DIM = 4096            # largest width/height accepted from a guest
MAX_VIDEORAM_MB = 64      # largest framebuffer we offer/accept
SUPPORTED_DEPTHS = (16, 24, 32)
#: Pixels up to which a changed rectangle is sent whole, without its changed part's bounding
#: box (:meth:`VfbDisplay.changed`).
SMALL_RECT = 32 * 32
#: Reads of the out ring per notify at most (:meth:`VfbBackend.on_event`): ~51 events each.
MAX_RING_READS = 4
#: Seconds between whole-screen compares after a connect, while the frontend has sent no
#: UPDATE (:attr:`VfbBackend.unreported`); 12.75 s in all, then the guest is left to report.
UNREPORTED_CHECKS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4)


def plug(xs: XenStore, be_domid: int, fe_domid: int, devid: int = 0) -> tuple[str, str]:
    """Create the guest's vfb device nodes, as a toolstack would, with this domain as backend.

    Why the backend plugs it: libxl starts QEMU for any PV ``vfb=[...]`` (a vfb has no
    ``backend-type``), so a guest whose framebuffer the RM agent serves gets none from xl;
    the agent creates ``device/vfb/<devid>`` itself.  Both directories are created with their
    final permissions inside one transaction (frontend: guest owns, backend reads; backend: we
    own, guest reads), so the guest never sees a node with its parent's permissions (seen on
    Xen 4.17: writing the nodes first and chmod'ing after made the guest miss the device once
    in two runs).  Any previous nodes at these paths are replaced.  Returns (frontend path,
    backend path)."""
    fe = f"/local/domain/{fe_domid}/device/vfb/{devid}"
    be = f"/local/domain/{be_domid}/backend/vfb/{fe_domid}/{devid}"
    initialising = "1"

    def body(t: Transaction) -> None:
        t.rm(fe)
        t.rm(be)
        t.mkdir(be)
        t.set_perms(be, [f"n{be_domid}", f"r{fe_domid}"])
        for k, v in (("frontend", fe), ("frontend-id", str(fe_domid)), ("online", "1"),
                     ("state", initialising)):
            t.write(f"{be}/{k}", v)
        t.mkdir(fe)
        t.set_perms(fe, [f"n{fe_domid}", f"r{be_domid}"])
        for k, v in (("backend", be), ("backend-id", str(be_domid)), ("state", initialising)):
            t.write(f"{fe}/{k}", v)

    xs.run_transaction(body)
    return fe, be


def unplug(xs: XenStore, be_domid: int, fe_domid: int, devid: int = 0) -> None:
    """Remove what :func:`plug` created (the frontend dir goes with its domain anyway)."""
    xs.rm(f"/local/domain/{fe_domid}/device/vfb/{devid}")
    xs.rm(f"/local/domain/{be_domid}/backend/vfb/{fe_domid}/{devid}")
    if not xs.directory(f"/local/domain/{be_domid}/backend/vfb/{fe_domid}"):
        xs.rm(f"/local/domain/{be_domid}/backend/vfb/{fe_domid}")


class VfbDisplay(DisplaySource):
    """The guest's screen as an RFB display source.

    Viewers are served from a copy (``framebuffer()``), updated from the guest's pixels
    (:meth:`live`) only where the guest reported drawing and the pixels differ
    (:meth:`changed`), as QEMU's VNC server serves from its server surface.  Why a copy and
    not the mapped memory: what a viewer is sent must be what was compared; served from
    live memory, a pixel the guest changed and changed back between our compare and a
    viewer's send would reach the viewer in its passing state and never be corrected."""

    def __init__(self, width: int = 800, height: int = 600, name: str = "guest") -> None:
        super().__init__()
        self._live: np.ndarray = np.zeros((height, width), np.uint32)
        self._fb: np.ndarray = self._live.copy()
        self._name = name
        #: Rects compared inside the current :meth:`batch` (what :meth:`sync` may skip).
        self._fresh: list[Rect] = []

    @property
    def width(self) -> int:
        return self._fb.shape[1]

    @property
    def height(self) -> int:
        return self._fb.shape[0]

    @property
    def name(self) -> str:
        return self._name

    def framebuffer(self) -> np.ndarray:
        return self._fb

    def live(self) -> np.ndarray:
        """The guest's pixels now (a view over its memory, or the converted buffer)."""
        return self._live

    def attach(self, fb: np.ndarray) -> None:
        """Show ``fb`` (a view over guest memory or a converted buffer); viewers get a resize
        or a full refresh."""
        resized = fb.shape != self._fb.shape
        self._live = fb
        self._fb = np.array(fb, copy=True)
        if resized:
            self.notify_resized(0)
        else:
            self.notify_damage(Rect(0, 0, self.width, self.height))

    def detach(self) -> None:
        """The mapping is about to go: viewers keep the last picture (the copy)."""
        self._live = self._fb.copy()

    def end_batch(self) -> None:
        try:
            super().end_batch()
        finally:
            self._fresh.clear()

    def sync(self, rect: Rect) -> None:
        """Before a viewer is sent ``rect``: what the guest drew there since, even if its
        UPDATE is still in the ring (fbcon's glyph usually is by then), goes into the copy and
        to every viewer, so the echo need not wait for one more update round trip.  Not for a
        rect compared in this batch (the UPDATE just read): moments later, it would cost a
        second compare (~0.1 ms in a PV dom0 under emulation) to find what the guest's next
        UPDATE reports anyway."""
        for f in self._fresh:
            if (f.x <= rect.x and f.y <= rect.y and rect.x + rect.w <= f.x + f.w
                    and rect.y + rect.h <= f.y + f.h):
                return
        changed = self.changed(rect)
        if changed is not None:
            self.notify_damage(changed)

    def changed(self, rect: Rect) -> Rect | None:
        """Copy the guest's pixels in ``rect`` to what viewers are served; the bounding box of
        those that differ (``rect`` itself if it is at most :data:`SMALL_RECT` pixels; None:
        none differ).

        Why: fbcon draws more than it changes (a clear to the end of an empty screen, a blink
        over the same glyph), and a viewer pays for every pixel sent: bytes, and on an
        emulated host tens of ms for a large Raw update, during which its next request, and
        so the next echo, waits.  QEMU's VNC server compares with a copy too
        (``vnc_refresh_server_surface``).

        The guest may draw while this runs.  What is copied lies inside the rectangle returned,
        which every viewer is then sent from the copy, so whatever value a pixel has in the
        copy reaches the viewers; a pixel found equal and drawn afterwards, outside it, differs
        from the copy when the guest reports it.  So the live pixels are compared in place,
        and only the rectangle that differs is copied: no snapshot copy of a whole clear."""
        if self.batching:
            self._fresh.append(rect)
        x, y, w, h = rect.x, rect.y, rect.w, rect.h
        live = self._live[y:y + h, x:x + w]
        seen = self._fb[y:y + h, x:x + w]
        if w * h <= SMALL_RECT:
            # A glyph or a cursor: two byte strings compared is a quarter of the numpy calls
            # (each ~50 us in a PV dom0 under emulation, twice per echo), and the bounding
            # box would save a few hundred bytes of a send that costs milliseconds anyway.
            if live.tobytes() == seen.tobytes():
                return None
            seen[...] = live
            return rect
        diff = live != seen
        rows = np.flatnonzero(diff.any(axis=1))
        if rows.size == 0:
            return None
        cols = np.flatnonzero(diff.any(axis=0))
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        seen[r0:r1, c0:c1] = live[r0:r1, c0:c1]
        return Rect(x + c0, y + r0, c1 - c0, r1 - r0)


def _convert(src: np.ndarray, depth: int) -> np.ndarray:
    """Guest pixels (rows of bytes) -> native 0x00RRGGBB for depth 16 (RGB565) and 24 (BGR)."""
    if depth == 16:
        p = src.view("<u2").astype(np.uint32)
        r = (p >> 11) & 0x1F
        g = (p >> 5) & 0x3F
        b = p & 0x1F
        return ((r * 255 // 31) << 16) | ((g * 255 // 63) << 8) | (b * 255 // 31)
    # depth 24: packed little-endian B, G, R
    b, g, r = (src[:, 0::3].astype(np.uint32), src[:, 1::3].astype(np.uint32),
               src[:, 2::3].astype(np.uint32))
    return (r << 16) | (g << 8) | b


def merge_rects(rects: Collection[tuple[int, int, int, int]]) -> list[Rect]:
    """One batch of reported (x, y, w, h) rectangles as few rectangles to compare: their
    bounding box when it is at most twice their summed area (an echo's cells, a run of text
    rows: almost always), else :class:`Region`'s merge.  Done in ints, without a Rect per
    report: a batch can hold dozens, read on the echo's path in a PV domain where each
    Python step is ~10x dearer than natively."""
    if len(rects) <= 1:
        return [Rect(*r) for r in rects]
    x0 = y0 = 1 << 62
    x1 = y1 = area = 0
    for x, y, w, h in rects:
        area += w * h
        if x < x0:
            x0 = x
        if y < y0:
            y0 = y
        if x + w > x1:
            x1 = x + w
        if y + h > y1:
            y1 = y + h
    if (x1 - x0) * (y1 - y0) <= 2 * area:
        return [Rect(x0, y0, x1 - x0, y1 - y0)]
    region = Region()
    for r in rects:
        region.add(Rect(*r))
    return region.take()


class VfbBackend(BackendDevice):
    kind = "vfb"
    connect_keys = ("page-ref", "event-channel")

    def __init__(self, xen: Xen, evtchns: EventChannels, fe_domid: int, devid: int, *,
                 display: VfbDisplay, videoram_mb: int = 16, width: int = 800,
                 height: int = 600) -> None:
        super().__init__(xen, evtchns, fe_domid, devid)
        if not 1 <= videoram_mb <= MAX_VIDEORAM_MB:
            raise ValueError(f"videoram {videoram_mb} MiB outside 1..{MAX_VIDEORAM_MB}")
        self.display = display
        self.videoram_mb = videoram_mb
        self.mode_width, self.mode_height = width, height
        self.fbpage: F.XenfbPage | None = None
        self.fb_mapping: Mapping | None = None
        self.depth = 32
        self.stride = 0
        self.offset = 0
        self.updates = 0
        self._raw: np.ndarray | None = None  # guest bytes, when a shadow conversion is needed
        #: Connected, and no UPDATE from the frontend yet.  xen-fbfront reads our
        #: ``request-update`` only when it sees us Connected (``xenfb_backend_changed``), and
        #: until then draws without telling (``xenfb_refresh`` returns while ``update_wanted``
        #: is 0): after a migration that is fbcon echoing the held keys replayed into the new
        #: ring.  The copy taken at connect misses those pixels, and if the guest then goes
        #: quiet no UPDATE ever covers them.  When the window closes cannot be seen (a
        #: xenstore read fires no watch), so: the first UPDATE proves it closed, and the whole
        #: screen is compared then; until then, at :data:`UNREPORTED_CHECKS`.
        self.unreported = False
        self._connection = 0
        #: How the owner runs ``fn`` after ``delay`` seconds (the agent: its loop's
        #: ``call_later``, errors guarded); None: only the first UPDATE ends the window.
        self.call_later: Callable[[float, Callable[[], None]], object] | None = None

    # -- xenbus hooks ----------------------------------------------------------------------
    def write_features(self) -> None:
        self.be_write("videoram", self.videoram_mb)
        self.be_write("width", self.mode_width)
        self.be_write("height", self.mode_height)
        self.be_write("feature-resize", 1)
        self.be_write("request-update", 1)

    def connect(self) -> None:
        protocol = self.fe_read("protocol")
        page_ref = parse_uint(self.fe_read("page-ref"), "page-ref", (1 << 52) - 1)
        self.page = self.xen.map_foreign(self.fe_domid, [page_ref], writable=True)
        if protocol is None:
            proto = F.xenfb_guess_protocol(self.page.mem)
        else:
            proto = protocol.strip(b"\0").decode("ascii", "replace")
            if proto not in KNOWN_PROTOCOLS:
                raise DeviceError(f"unknown protocol {proto[:40]!r}")
        self.fbpage = F.XenfbPage(self.page.mem, proto)
        p = self.fbpage
        mem_length = p.mem_length
        if not 0 < mem_length <= self.videoram_mb << 20:
            raise DeviceError(f"mem_length {mem_length} outside 1..{self.videoram_mb} MiB")
        try:
            n_dirs = p.pd_entries_needed(mem_length)
        except ValueError as exc:
            raise DeviceError(str(exc)) from None
        n_pages = -(-mem_length // PAGE)
        dirs = [p.pd(i) for i in range(n_dirs)]
        with self.xen.map_foreign(self.fe_domid, dirs, writable=False) as d:
            dtype = "<u4" if p.pd_entry_size == 4 else "<u8"
            frames = np.frombuffer(d.mem, dtype, count=n_pages).tolist()
        self.fb_mapping = self.xen.map_foreign(self.fe_domid, frames, writable=False)
        self._configure(p.width, p.height, p.line_length, p.depth, 0)
        self.bind()
        self._connection += 1
        self.unreported = True
        self._schedule_check(self._connection, 0)

    def _schedule_check(self, connection: int, step: int) -> None:
        if self.call_later is not None and step < len(UNREPORTED_CHECKS):
            self.call_later(UNREPORTED_CHECKS[step],
                            lambda: self._unreported_check(connection, step))

    def _unreported_check(self, connection: int, step: int) -> None:
        """One timed whole-screen compare of :attr:`unreported`, for this connection only."""
        if connection != self._connection or not self.unreported or self.fbpage is None:
            return
        changed = self._pull_all()
        if changed is not None:
            with self.display.batch():
                self.display.notify_damage(changed)
        self._schedule_check(connection, step + 1)

    def _pull_all(self) -> Rect | None:
        """Compare the whole screen with what viewers have (converted first, for a shadow)."""
        if self._raw is not None:
            self.display.live()[...] = _convert(self._raw, self.depth)
        return self.display.changed(Rect(0, 0, self.display.width, self.display.height))

    def _configure(self, width: int, height: int, stride: int, depth: int, offset: int) -> None:
        """Validate a geometry against the mapped framebuffer and show it."""
        assert self.fb_mapping is not None
        fb_len = len(self.fb_mapping.mem)
        if depth not in SUPPORTED_DEPTHS:
            raise DeviceError(f"depth {depth} not in {SUPPORTED_DEPTHS}")
        if not (0 < width <= MAX_DIM and 0 < height <= MAX_DIM):
            raise DeviceError(f"geometry {width}x{height} outside 1..{MAX_DIM}")
        bpp = depth // 8 if depth != 24 else 3
        if stride < width * bpp or stride > fb_len:
            raise DeviceError(f"line length {stride} invalid for width {width} depth {depth}")
        if offset < 0 or offset + stride * (height - 1) + width * bpp > fb_len:
            raise DeviceError(f"{width}x{height} stride {stride} offset {offset} exceeds the "
                              f"{fb_len}-byte framebuffer")
        if depth == 32 and (stride % 4 or offset % 4):
            raise DeviceError(f"depth 32 needs 4-byte aligned stride/offset ({stride}/{offset})")
        self.depth, self.stride, self.offset = depth, stride, offset
        mem = self.fb_mapping.mem
        if depth == 32:
            fb = np.ndarray((height, width), np.uint32, buffer=mem, offset=offset,
                            strides=(stride, 4))
            self._raw = None
        else:
            self._raw = np.ndarray((height, width * bpp), np.uint8, buffer=mem, offset=offset,
                                   strides=(stride, 1))
            fb = _convert(self._raw, depth)
        self.display.attach(fb)

    def on_event(self) -> None:
        """Read the out ring until it is empty, then send viewers what changed, once.

        Why until empty (Xen's ``RING_FINAL_CHECK_FOR_REQUESTS`` idiom): fbcon reports an echo
        as several UPDATEs, each with a notify -- cursor erased, glyph, cursor drawn.  A guest
        slower than us (a PVH guest under emulation, served from the RM VM) has often written
        only the first when we read; sent alone, it takes the viewer's pending request, and the
        glyph then waits a whole round trip for the next one.  What arrived while we compared
        goes into the same update.  At most :data:`MAX_RING_READS` reads: a guest that never
        stops drawing cannot keep viewers waiting (what is left fired the port again)."""
        page = self.fbpage
        if page is None:
            return
        cons = page.out_cons
        if page.out_prod == cons:
            return  # nothing new: a notify for events an earlier read took, or none at all
        # Viewers waiting for an update get it at the end, not on the event loop's next turn.
        with self.display.batch():
            for _ in range(MAX_RING_READS):
                try:
                    events = F.fb_out_read(page)
                except RingError as exc:
                    raise DeviceError(f"out ring: {exc}") from None
                self._apply(events)
                # xen-fbfront waits for our notify only when it found the out ring full: it
                # then keeps its dirty rectangle and sends it from its event handler
                # (``xenfb_queue_full``/``xenfb_event_handler``).  A notify after every read,
                # as QEMU sends, would cost a hypercall here and an interrupt in the guest per
                # echo.  It may have checked against the out_cons we found (before ours was
                # written), so the test is out_prod *now* against that one.
                port = self.port
                prod = page.out_prod
                if port is not None and (prod - cons) & 0xFFFFFFFF >= F.XENFB_OUT_RING_LEN:
                    self.evtchns.notify(port)
                cons = page.out_cons
                if prod == cons:
                    return

    def _apply(self, events: list) -> None:
        """What one read of the out ring says: pixels changed (UPDATE), a new mode (RESIZE)."""
        display = self.display
        width, height = display.width, display.height
        # The distinct rectangles, in order, as plain tuples: fbcon reports one cell several
        # times per echo (cursor erased, glyph, cursor drawn), and busybox's line editor
        # clears to the end of the screen after every BackSpace, one UPDATE per text row.
        damage: dict[tuple[int, int, int, int], None] = {}
        updates = 0
        for ev in events:
            if type(ev) is tuple:  # an UPDATE's (x, y, width, height): F.fb_out_read
                updates += 1
                r = F.clip_update(*ev, width, height)
                if r is not None:
                    damage[r] = None
            elif isinstance(ev, F.XenfbResize):
                self._damage(damage)  # drawn in the old mode
                damage = {}
                self._configure(ev.width, ev.height, ev.stride, ev.depth, ev.offset)
                width, height = display.width, display.height
            else:
                self.log.info("%s: skipped out event: %s", self.name, ev)
        self.updates += updates
        if updates and self.unreported:
            self.unreported = False  # it reads request-update: what it drew before is in memory
            changed = self._pull_all()
            if changed is not None:
                display.notify_damage(changed)
        self._damage(damage)

    def _damage(self, damage: dict[tuple[int, int, int, int], None]) -> None:
        """Tell viewers what one batch of UPDATE events changed: the rectangles merged
        (:func:`merge_rects`), of which only the pixels that differ are sent
        (:meth:`VfbDisplay.changed`)."""
        if not damage:
            return
        display = self.display
        if self._raw is not None:
            bpp = self.depth // 8 if self.depth != 24 else 3
            live = display.live()
            for x, y, w, h in damage:
                live[y:y + h, x:x + w] = _convert(self._raw[y:y + h, x * bpp:(x + w) * bpp],
                                                  self.depth)
        for rect in merge_rects(damage):
            changed = display.changed(rect)
            if changed is not None:
                display.notify_damage(changed)

    def disconnect(self) -> None:
        self.unreported = False
        self._connection += 1   # timed checks of this connection do nothing
        self.display.detach()
        if self.fb_mapping is not None:
            self._raw = None
            self.fb_mapping.unmap()
            self.fb_mapping = None
        self.fbpage = None
        super().disconnect()
