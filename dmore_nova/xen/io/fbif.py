"""vfb: the Xen PV framebuffer protocol (``public/io/fbif.h``), sans-IO.

The shared page holds ``struct xenfb_page``: four u32 ring indices, the framebuffer geometry
and the page directory ``unsigned long pd[256]`` whose entries are frame numbers of pages that
in turn list the framebuffer's frame numbers.  ``unsigned long`` depends on the guest ABI, so
``pd`` starts at byte 36 with 4-byte entries for ``x86_32-abi`` and at byte 40 with 8-byte
entries for ``x86_64-abi`` (QEMU's ``xenfb_map_fb`` relies on exactly that aliasing).

Rings are the reverse of vkbd: *in* (backend -> frontend, REFRESH_PERIOD only) at 1024 with 25
slots, *out* (frontend -> backend, UPDATE/RESIZE) at 2048 with 51 slots.

Backend side (the RM VM): :func:`fb_out_get`, :func:`fb_in_put`.
Frontend side (the simulated guest): :func:`fb_out_put`, :func:`fb_in_get`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from ._event import RingEvent, UnknownEvent
from ._layout import Field, PageField, make_struct
from .protocols import XEN_IO_PROTO_ABI_X86_32, XEN_IO_PROTO_ABI_X86_64, abi_long_size
from .ring import RingLayout, read_u32, ring_fill, ring_get, ring_put

__all__ = [
    "FbInEvent",
    "FbOutEvent",
    "UnknownEvent",
    "XenfbPage",
    "XenfbRefreshPeriod",
    "XenfbResize",
    "XenfbUpdate",
    "XENFB_IN_RING_LAYOUT",
    "XENFB_OUT_RING_LAYOUT",
    "decode_fb_in_event",
    "decode_fb_out_event",
    "fb_in_get",
    "fb_in_put",
    "fb_out_get",
    "fb_out_put",
    "xenfb_guess_protocol",
]

# --- event types (fbif.h) ---------------------------------------------------------------------
#: Out event (frontend -> backend).  "Event type 1 currently not used" for out events.
XENFB_TYPE_UPDATE = 2
XENFB_TYPE_RESIZE = 3
#: In event (backend -> frontend).
XENFB_TYPE_REFRESH_PERIOD = 1
XENFB_NO_REFRESH = 0

# --- ring geometry (fbif.h) -------------------------------------------------------------------
XENFB_OUT_EVENT_SIZE = 40
XENFB_IN_EVENT_SIZE = 40
XENFB_IN_RING_SIZE = 1024
XENFB_IN_RING_LEN = XENFB_IN_RING_SIZE // XENFB_IN_EVENT_SIZE  # 25
XENFB_IN_RING_OFFS = 1024
XENFB_OUT_RING_SIZE = 2048
XENFB_OUT_RING_LEN = XENFB_OUT_RING_SIZE // XENFB_OUT_EVENT_SIZE  # 51
XENFB_OUT_RING_OFFS = XENFB_IN_RING_OFFS + XENFB_IN_RING_SIZE  # 2048

#: Declared length of ``xenfb_page.pd`` (``unsigned long pd[256]``).
XENFB_PD_LEN = 256

#: ``struct xenfb_page`` up to ``depth`` (same for every ABI: only u32/i32/u8 members).
XENFB_PAGE_FIELDS = (
    Field("in_cons", 0, "I"),
    Field("in_prod", 4, "I"),
    Field("out_cons", 8, "I"),
    Field("out_prod", 12, "I"),
    Field("width", 16, "i"),
    Field("height", 20, "i"),
    Field("line_length", 24, "I"),
    Field("mem_length", 28, "I"),
    Field("depth", 32, "B"),
)
_PAGE = {f.c_path: f for f in XENFB_PAGE_FIELDS}
make_struct(XENFB_PAGE_FIELDS, 33)  # validates the declaration (offsets, alignment)

#: ``offsetof(struct xenfb_page, pd)``: ``depth`` ends at 33, aligned up to the entry size.
XENFB_PD_OFFS_32 = 36
XENFB_PD_OFFS_64 = 40
#: ``sizeof(struct xenfb_page)`` per ABI: ``pd`` offset + 256 entries.
XENFB_PAGE_SIZEOF_32 = XENFB_PD_OFFS_32 + 4 * XENFB_PD_LEN  # 1060
XENFB_PAGE_SIZEOF_64 = XENFB_PD_OFFS_64 + 8 * XENFB_PD_LEN  # 2088

XENFB_IN_RING_LAYOUT = RingLayout(
    name="xenfb in",
    cons_offset=_PAGE["in_cons"].offset,
    prod_offset=_PAGE["in_prod"].offset,
    ring_offset=XENFB_IN_RING_OFFS,
    ring_size=XENFB_IN_RING_SIZE,
    slot_size=XENFB_IN_EVENT_SIZE,
)
XENFB_OUT_RING_LAYOUT = RingLayout(
    name="xenfb out",
    cons_offset=_PAGE["out_cons"].offset,
    prod_offset=_PAGE["out_prod"].offset,
    ring_offset=XENFB_OUT_RING_OFFS,
    ring_size=XENFB_OUT_RING_SIZE,
    slot_size=XENFB_OUT_EVENT_SIZE,
)


# --- events -----------------------------------------------------------------------------------
class _FbOutEvent(RingEvent):
    EVENT_SIZE: ClassVar[int] = XENFB_OUT_EVENT_SIZE


class _FbInEvent(RingEvent):
    EVENT_SIZE: ClassVar[int] = XENFB_IN_EVENT_SIZE


@dataclass(frozen=True)
class XenfbUpdate(_FbOutEvent):
    """``struct xenfb_update``: the frontend changed this rectangle.

    The values are guest-controlled i32s; use :meth:`clip` before touching pixels.
    """

    TYPE: ClassVar[int] = XENFB_TYPE_UPDATE
    C_STRUCT: ClassVar[str] = "xenfb_update"
    C_SIZEOF: ClassVar[int] = 20
    FIELDS: ClassVar[tuple[Field, ...]] = (
        Field("type", 0, "B"),
        Field("x", 4, "i"),
        Field("y", 8, "i"),
        Field("width", 12, "i"),
        Field("height", 16, "i"),
    )

    x: int
    y: int
    width: int
    height: int

    def clip(self, fb_width: int, fb_height: int) -> tuple[int, int, int, int] | None:
        """Intersect with ``[0, fb_width) x [0, fb_height)``; ``None`` if empty.

        Done in Python ints, so hostile values (negative sizes, ``x + width`` overflowing i32)
        cannot wrap around into a bogus in-bounds rectangle.
        """
        return clip_update(self.x, self.y, self.width, self.height, fb_width, fb_height)


def clip_update(x: int, y: int, width: int, height: int, fb_width: int,
                fb_height: int) -> tuple[int, int, int, int] | None:
    """:meth:`XenfbUpdate.clip` of an UPDATE's values, as :func:`fb_out_read` gives them."""
    # Comparisons, not max()/min() calls: this runs for every UPDATE a guest sends.
    if width <= 0 or height <= 0:
        return None
    x0 = x if x > 0 else 0
    y0 = y if y > 0 else 0
    x1 = x + width if x + width < fb_width else fb_width
    y1 = y + height if y + height < fb_height else fb_height
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1 - x0, y1 - y0


@dataclass(frozen=True)
class XenfbResize(_FbOutEvent):
    """``struct xenfb_resize``: new geometry (only if the backend offered ``feature-resize``).

    Guest-controlled; the backend must validate it against ``mem_length``/videoram the way
    QEMU's ``xenfb_configure_fb`` does before using it.
    """

    TYPE: ClassVar[int] = XENFB_TYPE_RESIZE
    C_STRUCT: ClassVar[str] = "xenfb_resize"
    C_SIZEOF: ClassVar[int] = 24
    FIELDS: ClassVar[tuple[Field, ...]] = (
        Field("type", 0, "B"),
        Field("width", 4, "i"),
        Field("height", 8, "i"),
        Field("stride", 12, "i"),
        Field("depth", 16, "i"),
        Field("offset", 20, "i"),
    )

    width: int
    height: int
    stride: int
    depth: int
    offset: int


@dataclass(frozen=True)
class XenfbRefreshPeriod(_FbInEvent):
    """``struct xenfb_refresh_period``: preferred refresh period in ms (0 =
    ``XENFB_NO_REFRESH``).  Linux's xen-fbfront ignores it; QEMU sends it."""

    TYPE: ClassVar[int] = XENFB_TYPE_REFRESH_PERIOD
    C_STRUCT: ClassVar[str] = "xenfb_refresh_period"
    C_SIZEOF: ClassVar[int] = 8
    FIELDS: ClassVar[tuple[Field, ...]] = (Field("type", 0, "B"), Field("period", 4, "I"))

    period: int


FbOutEvent = XenfbUpdate | XenfbResize
FbInEvent = XenfbRefreshPeriod
_OUT_CLASSES: dict[int, type[_FbOutEvent]] = {c.TYPE: c for c in (XenfbUpdate, XenfbResize)}
_IN_CLASSES: dict[int, type[_FbInEvent]] = {XenfbRefreshPeriod.TYPE: XenfbRefreshPeriod}


def decode_fb_out_event(raw: bytes) -> FbOutEvent | UnknownEvent:
    """Decode one out-ring slot; unknown types become :class:`UnknownEvent`."""
    if len(raw) < XENFB_OUT_EVENT_SIZE:
        raise ValueError(f"xenfb out event needs {XENFB_OUT_EVENT_SIZE} bytes, got {len(raw)}")
    cls = _OUT_CLASSES.get(raw[0])
    if cls is None:
        return UnknownEvent(raw[0], bytes(raw))
    return cls.unpack(raw)  # type: ignore[return-value]


def decode_fb_in_event(raw: bytes) -> FbInEvent | UnknownEvent:
    """Decode one in-ring slot; unknown types become :class:`UnknownEvent`."""
    if len(raw) < XENFB_IN_EVENT_SIZE:
        raise ValueError(f"xenfb in event needs {XENFB_IN_EVENT_SIZE} bytes, got {len(raw)}")
    cls = _IN_CLASSES.get(raw[0])
    if cls is None:
        return UnknownEvent(raw[0], bytes(raw))
    return cls.unpack(raw)  # type: ignore[return-value]


# --- page accessor ----------------------------------------------------------------------------
def _pd_geometry(protocol: str) -> tuple[int, int]:
    size = abi_long_size(protocol)
    return (XENFB_PD_OFFS_32 if size == 4 else XENFB_PD_OFFS_64), size


def xenfb_guess_protocol(mv: memoryview | bytearray) -> str:
    """Pick the ``pd`` layout for a frontend that published no ``protocol`` node (QEMU's rule).

    "Old frontends which don't set the protocol use one page directory only, thus pd[1] must be
    zero.  pd[1] of the 32bit struct layout and the lower 32 bits of pd[0] of the 64bit struct
    layout have the same location" (byte 40) -- QEMU ``xenfb_map_fb``.
    """
    low = read_u32(memoryview(mv).cast("B"), XENFB_PD_OFFS_64)
    return XEN_IO_PROTO_ABI_X86_32 if low == 0 else XEN_IO_PROTO_ABI_X86_64


class XenfbPage:
    """Typed view of ``struct xenfb_page`` for a guest of ABI ``protocol``.

    ``pd(i)`` is limited to the entries that lie before the in ring at byte 1024
    (``pd_capacity``: 247 entries for 32-bit, 123 for 64-bit): the C array is declared with 256
    entries, but on 64-bit the tail would alias the rings, so a directory index past the
    capacity is refused rather than read out of ring memory.  123 directories of 512 frames
    still map 246 MiB of framebuffer.
    """

    PAGE_SIZE = 4096

    def __init__(self, mv: memoryview | bytearray, protocol: str) -> None:
        mv = memoryview(mv)
        if mv.ndim != 1 or mv.format not in ("B", "b", "c"):
            mv = mv.cast("B")
        if len(mv) < self.PAGE_SIZE:
            raise ValueError(f"xenfb page view is {len(mv)} bytes, need {self.PAGE_SIZE}")
        self.mv = mv
        self.protocol = protocol
        self.pd_offset, self.pd_entry_size = _pd_geometry(protocol)
        self.pd_capacity = (XENFB_IN_RING_OFFS - self.pd_offset) // self.pd_entry_size

    # ring indices and geometry: read from the page on every access; the geometry is
    # guest-written, so the backend validates it before use.
    in_cons = PageField(_PAGE["in_cons"])
    in_prod = PageField(_PAGE["in_prod"])
    out_cons = PageField(_PAGE["out_cons"])
    out_prod = PageField(_PAGE["out_prod"])
    width = PageField(_PAGE["width"])
    height = PageField(_PAGE["height"])
    line_length = PageField(_PAGE["line_length"])
    mem_length = PageField(_PAGE["mem_length"])
    depth = PageField(_PAGE["depth"])

    def _pd_off(self, i: int) -> int:
        if not 0 <= i < self.pd_capacity:
            raise IndexError(f"pd index {i} outside [0, {self.pd_capacity}) for {self.protocol}")
        return self.pd_offset + i * self.pd_entry_size

    def pd(self, i: int) -> int:
        """``pd[i]``: frame number of the i-th directory page (u32 or u64 per ABI)."""
        off = self._pd_off(i)
        return int.from_bytes(self.mv[off:off + self.pd_entry_size], "little")

    def set_pd(self, i: int, frame: int) -> None:
        """Frontend side (sim guest): store ``pd[i]``."""
        if not 0 <= frame < 1 << (8 * self.pd_entry_size):
            raise ValueError(f"frame {frame:#x} does not fit a {self.pd_entry_size}-byte pd entry")
        off = self._pd_off(i)
        self.mv[off:off + self.pd_entry_size] = frame.to_bytes(self.pd_entry_size, "little")

    def pd_entries_needed(self, fb_len: int, page_size: int = 4096) -> int:
        """Directory pages needed for an ``fb_len``-byte framebuffer (QEMU's ``n_fbdirs``).

        Each directory page holds ``page_size / sizeof(unsigned long)`` frame numbers.
        ValueError if that exceeds :attr:`pd_capacity` (so a hostile ``mem_length`` cannot make
        the backend read past the directory).
        """
        if fb_len < 0:
            raise ValueError(f"negative framebuffer length {fb_len}")
        fb_pages = -(-fb_len // page_size)
        dirs = -(-fb_pages * self.pd_entry_size // page_size)
        if dirs > self.pd_capacity:
            raise ValueError(
                f"framebuffer of {fb_len} bytes needs {dirs} directory pages, "
                f"only {self.pd_capacity} fit for {self.protocol}"
            )
        return dirs


def _view(page: XenfbPage | memoryview | bytearray) -> memoryview:
    if isinstance(page, XenfbPage):
        return page.mv
    mv = memoryview(page)
    return mv if mv.format in ("B", "b", "c") and mv.ndim == 1 else mv.cast("B")


# --- ring operations --------------------------------------------------------------------------
def fb_out_get(
    page: XenfbPage | memoryview, max_items: int | None = None
) -> list[FbOutEvent | UnknownEvent]:
    """Backend: consume the frontend's UPDATE/RESIZE events and bump ``out_cons``.

    ``out_prod`` is validated (``out_prod - out_cons`` (u32) > ``XENFB_OUT_RING_LEN`` ->
    RingError, nothing consumed).  Unknown types are skipped as Linux/QEMU skip them -- the
    index moves past them -- but returned as :class:`UnknownEvent` so the caller can log them.
    At most ``XENFB_OUT_RING_LEN`` events per call.  The caller notifies the frontend afterwards
    (xen-fbfront waits for ring space when it is full).
    """
    return [
        decode_fb_out_event(raw)
        for raw in ring_get(_view(page), XENFB_OUT_RING_LAYOUT, max_items)
    ]


#: ``struct xenfb_update`` past its type byte: x, y, width, height, from the declaration the
#: header test checks (so no second copy of the layout to keep in step).
_UPDATE_VALUES = make_struct(XenfbUpdate.FIELDS[1:], XenfbUpdate.C_SIZEOF)


def fb_out_read(
    page: XenfbPage | memoryview, max_items: int | None = None
) -> list[tuple[int, int, int, int] | FbOutEvent | UnknownEvent]:
    """:func:`fb_out_get` for the backend's hot path: an UPDATE comes as the tuple of its
    values ``(x, y, width, height)`` (guest-controlled: :func:`clip_update` them), any other
    event as :func:`fb_out_get` decodes it.

    Why: fbcon reports an echo as ~5 UPDATEs and a cleared screen as one per text row, and a
    frozen dataclass per UPDATE made decoding most of the read's cost in a PV dom0 under
    emulation (5 UPDATEs: ~0.6 ms there, ~0.35 ms as tuples).
    """
    update = XENFB_TYPE_UPDATE
    unpack = _UPDATE_VALUES.unpack_from
    return [unpack(raw) if raw[0] == update else decode_fb_out_event(raw)
            for raw in ring_get(_view(page), XENFB_OUT_RING_LAYOUT, max_items)]


def fb_in_put(page: XenfbPage | memoryview, events: Sequence[FbInEvent]) -> int:
    """Backend: send REFRESH_PERIOD advice; returns how many events fitted (a prefix)."""
    for ev in events:
        if not isinstance(ev, _FbInEvent):
            raise TypeError(f"not a xenfb in event: {ev!r}")
    batch = [ev.pack() for ev in events[:XENFB_IN_RING_LEN]]
    return ring_put(_view(page), XENFB_IN_RING_LAYOUT, batch)


def fb_out_put(page: XenfbPage | memoryview, events: Sequence[FbOutEvent]) -> int:
    """Frontend (sim guest): queue UPDATE/RESIZE events; returns how many fitted (a prefix).

    Like xen-fbfront, the caller keeps (and merges) what did not fit until the backend
    consumes and notifies.
    """
    for ev in events:
        if not isinstance(ev, _FbOutEvent):
            raise TypeError(f"not a xenfb out event: {ev!r}")
    batch = [ev.pack() for ev in events[:XENFB_OUT_RING_LEN]]
    return ring_put(_view(page), XENFB_OUT_RING_LAYOUT, batch)


def fb_in_get(
    page: XenfbPage | memoryview, max_items: int | None = None
) -> list[FbInEvent | UnknownEvent]:
    """Frontend (sim guest): consume in events (validated like :func:`fb_out_get`)."""
    return [
        decode_fb_in_event(raw) for raw in ring_get(_view(page), XENFB_IN_RING_LAYOUT, max_items)
    ]


def fb_pending(page: XenfbPage | memoryview) -> tuple[int, int]:
    """Validated ``(in_pending, out_pending)`` counts (RingError if indices are hostile)."""
    mv = _view(page)
    return ring_fill(mv, XENFB_IN_RING_LAYOUT)[2], ring_fill(mv, XENFB_OUT_RING_LAYOUT)[2]
