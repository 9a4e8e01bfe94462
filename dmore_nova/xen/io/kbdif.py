"""vkbd: the Xen PV keyboard/pointer protocol (``public/io/kbdif.h``), sans-IO.

The shared page holds ``struct xenkbd_page`` (four u32 indices) at offset 0, the *in* ring
(backend -> frontend: key, motion, position, multi-touch events) at 1024 and the *out* ring
(frontend -> backend: no events defined) at 3072.  Events are 40-byte slots, ``idx % LEN``.

Backend side (the RM VM): :func:`kbd_in_put` and :func:`kbd_out_drain`.
Frontend side (the simulated guest): :func:`kbd_in_get`.
All of them validate the indices read from the page; see :mod:`.ring` for the rules.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from ._event import RingEvent, UnknownEvent
from ._layout import Field, PageField, make_struct
from .ring import (
    RingLayout,
    ring_fill,
    ring_get,
    ring_put,
)

__all__ = [
    "KbdInEvent",
    "UnknownEvent",
    "XenkbdKey",
    "XenkbdMotion",
    "XenkbdMtouch",
    "XenkbdPage",
    "XenkbdPosition",
    "XENKBD_IN_RING_LAYOUT",
    "XENKBD_OUT_RING_LAYOUT",
    "decode_kbd_in_event",
    "kbd_in_get",
    "kbd_in_put",
    "kbd_out_drain",
]

# --- event types (kbdif.h) ------------------------------------------------------------------
XENKBD_TYPE_MOTION = 1
#: Formerly XENKBD_TYPE_BTN; "reserved" now, never sent.
XENKBD_TYPE_RESERVED = 2
XENKBD_TYPE_KEY = 3
XENKBD_TYPE_POS = 4
XENKBD_TYPE_MTOUCH = 5

# multi-touch sub-events (xenkbd_mtouch.event_type)
XENKBD_MT_EV_DOWN = 0
XENKBD_MT_EV_UP = 1
XENKBD_MT_EV_MOTION = 2
XENKBD_MT_EV_SYN = 3
XENKBD_MT_EV_SHAPE = 4
XENKBD_MT_EV_ORIENT = 5

# --- xenstore field names (kbdif.h) -----------------------------------------------------------
XENKBD_DRIVER_NAME = "vkbd"
XENKBD_FIELD_FEAT_DSBL_KEYBRD = "feature-disable-keyboard"
XENKBD_FIELD_FEAT_DSBL_POINTER = "feature-disable-pointer"
XENKBD_FIELD_FEAT_ABS_POINTER = "feature-abs-pointer"
XENKBD_FIELD_FEAT_RAW_POINTER = "feature-raw-pointer"
XENKBD_FIELD_FEAT_MTOUCH = "feature-multi-touch"
XENKBD_FIELD_REQ_ABS_POINTER = "request-abs-pointer"
XENKBD_FIELD_REQ_RAW_POINTER = "request-raw-pointer"
XENKBD_FIELD_REQ_MTOUCH = "request-multi-touch"
XENKBD_FIELD_RING_GREF = "page-gref"
XENKBD_FIELD_EVT_CHANNEL = "event-channel"
XENKBD_FIELD_WIDTH = "width"
XENKBD_FIELD_HEIGHT = "height"
XENKBD_FIELD_MT_WIDTH = "multi-touch-width"
XENKBD_FIELD_MT_HEIGHT = "multi-touch-height"
XENKBD_FIELD_MT_NUM_CONTACTS = "multi-touch-num-contacts"
XENKBD_FIELD_UNIQUE_ID = "unique-id"
#: OBSOLETE in the header ("PFN of the shared page"), but Linux still writes it.
XENKBD_FIELD_RING_REF = "page-ref"

#: kbdif.h: raw (unscaled) absolute coordinates "have a range of [0, 0x7fff]".
XENKBD_RAW_POINTER_MAX = 0x7FFF

# --- ring geometry (kbdif.h) ------------------------------------------------------------------
XENKBD_IN_EVENT_SIZE = 40
XENKBD_OUT_EVENT_SIZE = 40
XENKBD_IN_RING_SIZE = 2048
XENKBD_IN_RING_LEN = XENKBD_IN_RING_SIZE // XENKBD_IN_EVENT_SIZE  # 51
XENKBD_IN_RING_OFFS = 1024
XENKBD_OUT_RING_SIZE = 1024
XENKBD_OUT_RING_LEN = XENKBD_OUT_RING_SIZE // XENKBD_OUT_EVENT_SIZE  # 25
XENKBD_OUT_RING_OFFS = XENKBD_IN_RING_OFFS + XENKBD_IN_RING_SIZE  # 3072

#: ``struct xenkbd_page``: the four free-running indices.
XENKBD_PAGE_FIELDS = (
    Field("in_cons", 0, "I"),
    Field("in_prod", 4, "I"),
    Field("out_cons", 8, "I"),
    Field("out_prod", 12, "I"),
)
XENKBD_PAGE_SIZEOF = 16
_PAGE_OFFS = {f.c_path: f.offset for f in XENKBD_PAGE_FIELDS}
make_struct(XENKBD_PAGE_FIELDS, XENKBD_PAGE_SIZEOF)  # validates the declaration

XENKBD_IN_RING_LAYOUT = RingLayout(
    name="xenkbd in",
    cons_offset=_PAGE_OFFS["in_cons"],
    prod_offset=_PAGE_OFFS["in_prod"],
    ring_offset=XENKBD_IN_RING_OFFS,
    ring_size=XENKBD_IN_RING_SIZE,
    slot_size=XENKBD_IN_EVENT_SIZE,
)
XENKBD_OUT_RING_LAYOUT = RingLayout(
    name="xenkbd out",
    cons_offset=_PAGE_OFFS["out_cons"],
    prod_offset=_PAGE_OFFS["out_prod"],
    ring_offset=XENKBD_OUT_RING_OFFS,
    ring_size=XENKBD_OUT_RING_SIZE,
    slot_size=XENKBD_OUT_EVENT_SIZE,
)


# --- events -----------------------------------------------------------------------------------
class _KbdInEvent(RingEvent):
    EVENT_SIZE: ClassVar[int] = XENKBD_IN_EVENT_SIZE


@dataclass(frozen=True)
class XenkbdMotion(_KbdInEvent):
    """``struct xenkbd_motion``: relative pointer movement; ``rel_z`` is the wheel."""

    TYPE: ClassVar[int] = XENKBD_TYPE_MOTION
    C_STRUCT: ClassVar[str] = "xenkbd_motion"
    C_SIZEOF: ClassVar[int] = 16
    FIELDS: ClassVar[tuple[Field, ...]] = (
        Field("type", 0, "B"),
        Field("rel_x", 4, "i"),
        Field("rel_y", 8, "i"),
        Field("rel_z", 12, "i"),
    )

    rel_x: int
    rel_y: int
    rel_z: int = 0


@dataclass(frozen=True)
class XenkbdKey(_KbdInEvent):
    """``struct xenkbd_key``: a Linux ``KEY_*``/``BTN_*`` code pressed or released.

    ``pressed`` is a u8 on the wire; Linux passes it to ``input_report_key`` where any non-zero
    value means down, so decoding maps it to ``bool``.
    """

    TYPE: ClassVar[int] = XENKBD_TYPE_KEY
    C_STRUCT: ClassVar[str] = "xenkbd_key"
    C_SIZEOF: ClassVar[int] = 8
    FIELDS: ClassVar[tuple[Field, ...]] = (
        Field("type", 0, "B"),
        Field("pressed", 1, "B"),
        Field("keycode", 4, "I"),
    )

    pressed: bool
    keycode: int

    def pack(self) -> bytes:
        # A keyboard uses a few hundred (pressed, keycode) pairs, and packing is on the key
        # press latency path: remember the slots, bounded so hostile keycodes cannot grow it.
        key = (bool(self.pressed), self.keycode)
        raw = _KEY_SLOTS.get(key)
        if raw is None:
            raw = super().pack()
            if len(_KEY_SLOTS) < _KEY_SLOTS_MAX:
                _KEY_SLOTS[key] = raw
        return raw

    @classmethod
    def _from_values(cls, values: tuple[Any, ...]) -> Self:
        pressed, keycode = values
        return cls(bool(pressed), keycode)


#: Packed ``xenkbd_key`` slots by (pressed, keycode); Linux has KEY_MAX = 0x2ff codes.
_KEY_SLOTS: dict[tuple[bool, int], bytes] = {}
_KEY_SLOTS_MAX = 2 * 0x300


@dataclass(frozen=True)
class XenkbdPosition(_KbdInEvent):
    """``struct xenkbd_position``: absolute pointer position (frontend's width/height scale,
    or ``[0, 0x7fff]`` when the frontend requested raw pointer); ``rel_z`` is the wheel."""

    TYPE: ClassVar[int] = XENKBD_TYPE_POS
    C_STRUCT: ClassVar[str] = "xenkbd_position"
    C_SIZEOF: ClassVar[int] = 16
    FIELDS: ClassVar[tuple[Field, ...]] = (
        Field("type", 0, "B"),
        Field("abs_x", 4, "i"),
        Field("abs_y", 8, "i"),
        Field("rel_z", 12, "i"),
    )

    abs_x: int
    abs_y: int
    rel_z: int = 0


_MT_HEAD = (
    Field("type", 0, "B"),
    Field("event_type", 1, "B"),
    Field("contact_id", 2, "B"),
)
_MT_POS = (Field("u.pos.abs_x", 8, "i"), Field("u.pos.abs_y", 12, "i"))
_MT_SHAPE = (Field("u.shape.major", 8, "I"), Field("u.shape.minor", 12, "I"))
_MT_ORIENT = (Field("u.orientation", 8, "h"),)


@dataclass(frozen=True)
class XenkbdMtouch(_KbdInEvent):
    """``struct xenkbd_mtouch``: one multi-touch sub-event; the union arm follows
    ``event_type`` (DOWN/MOTION: ``abs_x``/``abs_y``; SHAPE: ``major``/``minor``; ORIENT:
    ``orientation``; UP/SYN: none).  Fields of other arms are ignored when packing."""

    TYPE: ClassVar[int] = XENKBD_TYPE_MTOUCH
    C_STRUCT: ClassVar[str] = "xenkbd_mtouch"
    C_SIZEOF: ClassVar[int] = 16
    FIELDS: ClassVar[tuple[Field, ...]] = _MT_HEAD
    C_FIELDS: ClassVar[tuple[Field, ...]] = (
        _MT_HEAD + (Field("reserved", 3, "5s"),) + _MT_POS + _MT_SHAPE + _MT_ORIENT
    )
    _ARMS: ClassVar[dict[int, tuple[Field, ...]]] = {
        XENKBD_MT_EV_DOWN: _MT_POS,
        XENKBD_MT_EV_UP: (),
        XENKBD_MT_EV_MOTION: _MT_POS,
        XENKBD_MT_EV_SYN: (),
        XENKBD_MT_EV_SHAPE: _MT_SHAPE,
        XENKBD_MT_EV_ORIENT: _MT_ORIENT,
    }
    _ARM_STRUCTS: ClassVar[dict[int, Any]] = {
        ev: make_struct(_MT_HEAD + arm, 16) for ev, arm in _ARMS.items()
    }

    event_type: int
    contact_id: int
    abs_x: int = 0
    abs_y: int = 0
    major: int = 0
    minor: int = 0
    orientation: int = 0

    def _arm(self) -> tuple[tuple[Field, ...], Any]:
        if self.event_type not in self._ARMS:
            raise ValueError(f"unknown multi-touch event_type {self.event_type}")
        return self._ARMS[self.event_type], self._ARM_STRUCTS[self.event_type]

    def pack(self) -> bytes:
        arm, st = self._arm()
        values = [self.TYPE, self.event_type, self.contact_id]
        values += [getattr(self, f.name) for f in arm]
        try:
            raw = st.pack(*values)
        except struct.error as exc:
            raise ValueError(f"XenkbdMtouch: field out of range: {exc}") from None
        return raw.ljust(self.EVENT_SIZE, b"\0")

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Self:
        if len(data) < cls.C_SIZEOF:
            raise ValueError(f"XenkbdMtouch: need {cls.C_SIZEOF} bytes, got {len(data)}")
        if data[0] != cls.TYPE:
            raise ValueError(f"XenkbdMtouch: type byte {data[0]} != {cls.TYPE}")
        event_type = data[1]
        if event_type not in cls._ARMS:
            raise ValueError(f"unknown multi-touch event_type {event_type}")
        values = cls._ARM_STRUCTS[event_type].unpack_from(data)
        names = ["event_type", "contact_id"] + [f.name for f in cls._ARMS[event_type]]
        return cls(**dict(zip(names, values[1:])))


KbdInEvent = XenkbdMotion | XenkbdKey | XenkbdPosition | XenkbdMtouch
_IN_CLASSES: dict[int, type[_KbdInEvent]] = {
    c.TYPE: c for c in (XenkbdMotion, XenkbdKey, XenkbdPosition, XenkbdMtouch)
}


def decode_kbd_in_event(raw: bytes) -> KbdInEvent | UnknownEvent:
    """Decode one in-ring slot; unknown types/sub-types become :class:`UnknownEvent`."""
    if len(raw) < XENKBD_IN_EVENT_SIZE:
        raise ValueError(f"xenkbd in event needs {XENKBD_IN_EVENT_SIZE} bytes, got {len(raw)}")
    cls = _IN_CLASSES.get(raw[0])
    if cls is None:
        return UnknownEvent(raw[0], bytes(raw))
    try:
        return cls.unpack(raw)  # type: ignore[return-value]
    except ValueError as exc:
        return UnknownEvent(raw[0], bytes(raw), str(exc))


# --- page accessor ----------------------------------------------------------------------------
class XenkbdPage:
    """Typed view of ``struct xenkbd_page`` over a mapped page (``memoryview`` of >= 4096 B).

    Index properties read/write the shared page on every access (no caching: the peer changes
    them).  Setters take u32 values and refuse anything else.
    """

    PAGE_SIZE = 4096

    def __init__(self, mv: memoryview | bytearray) -> None:
        mv = memoryview(mv)
        if mv.ndim != 1 or mv.format not in ("B", "b", "c"):
            mv = mv.cast("B")
        if len(mv) < self.PAGE_SIZE:
            raise ValueError(f"xenkbd page view is {len(mv)} bytes, need {self.PAGE_SIZE}")
        self.mv = mv

    in_cons = PageField(XENKBD_PAGE_FIELDS[0])
    in_prod = PageField(XENKBD_PAGE_FIELDS[1])
    out_cons = PageField(XENKBD_PAGE_FIELDS[2])
    out_prod = PageField(XENKBD_PAGE_FIELDS[3])

    def in_pending(self) -> int:
        """Validated number of unconsumed in events (RingError if the indices are hostile)."""
        return ring_fill(self.mv, XENKBD_IN_RING_LAYOUT)[2]


def _view(page: XenkbdPage | memoryview | bytearray) -> memoryview:
    return page.mv if isinstance(page, XenkbdPage) else XenkbdPage(page).mv


# --- ring operations --------------------------------------------------------------------------
def kbd_in_put(page: XenkbdPage | memoryview, events: Sequence[KbdInEvent]) -> int:
    """Backend: append ``events`` to the in ring; return how many were written (a prefix).

    Writes while ``in_prod - in_cons < XENKBD_IN_RING_LEN``; events ``events[n:]`` are the
    caller's to keep queued (QEMU drops them with EAGAIN; the RM agent must not).  ``in_cons``
    is never trusted: if ``in_prod - in_cons`` (u32) exceeds the ring length, RingError is raised
    and nothing is written.  All event bytes are stored before ``in_prod`` is bumped (see
    :mod:`.ring` for why program order is the barrier on x86).  The caller notifies the
    frontend's event channel if the result is non-zero.
    """
    batch = []
    for ev in events[:XENKBD_IN_RING_LEN]:  # more can never fit
        if not isinstance(ev, _KbdInEvent):
            raise TypeError(f"not a xenkbd in event: {ev!r}")
        batch.append(ev.pack())
    mv = page if type(page) is memoryview and page.format == "B" else _view(page)
    return ring_put(mv, XENKBD_IN_RING_LAYOUT, batch)


def kbd_in_get(
    page: XenkbdPage | memoryview, max_items: int | None = None
) -> list[KbdInEvent | UnknownEvent]:
    """Frontend (sim guest): consume pending in events, like xen-kbdfront's interrupt handler.

    The backend is untrusted too: RingError on impossible indices, unknown types returned as
    :class:`UnknownEvent` (Linux ignores them) with ``in_cons`` advanced past them.
    """
    return [
        decode_kbd_in_event(raw)
        for raw in ring_get(_view(page), XENKBD_IN_RING_LAYOUT, max_items)
    ]


def kbd_out_drain(page: XenkbdPage | memoryview) -> int:
    """Backend: discard out events (none are defined), as QEMU's ``input_event`` does.

    Returns how many were dropped.  Validated like every other ring access, so a hostile
    ``out_prod`` raises RingError instead of being copied into ``out_cons``.
    """
    return len(ring_get(_view(page), XENKBD_OUT_RING_LAYOUT))
