"""xen/io codecs and rings: byte layouts, wrap-around at 2**32, full rings, hostile indices.

Pages are plain ``bytearray``s (what the simulator maps); offsets in expectations are the
header's (kbdif.h/fbif.h), not the module's constants, so a wrong constant fails here too.
"""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmore_nova.xen.io import fbif, kbdif, protocols
from dmore_nova.xen.io.fbif import (
    XenfbPage,
    XenfbRefreshPeriod,
    XenfbResize,
    XenfbUpdate,
    clip_update,
    fb_in_get,
    fb_in_put,
    fb_out_get,
    fb_out_put,
    fb_out_read,
)
from dmore_nova.xen.io.kbdif import (
    UnknownEvent,
    XenkbdKey,
    XenkbdMotion,
    XenkbdMtouch,
    XenkbdPage,
    XenkbdPosition,
    kbd_in_get,
    kbd_in_put,
    kbd_out_drain,
)
from dmore_nova.xen.io.ring import RingError, RingLayout, ring_get, ring_put
from dmore_nova.xen.io.xenbus import XenbusState

U32 = 2**32
I32 = st.integers(-(2**31), 2**31 - 1)
U32S = st.integers(0, U32 - 1)
# Header facts (kbdif.h / fbif.h), restated independently of the module under test.
KBD_IN_OFFS, KBD_IN_LEN, KBD_OUT_OFFS, KBD_OUT_LEN = 1024, 51, 3072, 25
FB_IN_OFFS, FB_IN_LEN, FB_OUT_OFFS, FB_OUT_LEN = 1024, 25, 2048, 51
SLOT = 40


def page() -> memoryview:
    return memoryview(bytearray(4096))


def set_idx(mv: memoryview, offset: int, value: int) -> None:
    struct.pack_into("<I", mv, offset, value)


def get_idx(mv: memoryview, offset: int) -> int:
    return struct.unpack_from("<I", mv, offset)[0]


def keys(n: int, start: int = 0) -> list[XenkbdKey]:
    return [XenkbdKey(pressed=bool(i % 2), keycode=start + i) for i in range(n)]


# --- event byte layouts --------------------------------------------------------------------
def test_key_event_bytes():
    raw = XenkbdKey(pressed=True, keycode=0x1E).pack()
    assert len(raw) == SLOT
    assert raw[:8] == bytes([3, 1, 0, 0, 0x1E, 0, 0, 0])
    assert raw[8:] == bytes(32)


def test_motion_and_position_bytes():
    assert XenkbdMotion(-1, 2, -3).pack()[:16] == struct.pack("<B3xiii", 1, -1, 2, -3)
    assert XenkbdPosition(100, 200, 1).pack()[:16] == struct.pack("<B3xiii", 4, 100, 200, 1)


def test_mtouch_union_arms():
    down = XenkbdMtouch(kbdif.XENKBD_MT_EV_DOWN, 7, abs_x=-5, abs_y=9, major=99).pack()
    assert down[:16] == struct.pack("<BBB5xii", 5, 0, 7, -5, 9)  # major ignored: other arm
    shape = XenkbdMtouch(kbdif.XENKBD_MT_EV_SHAPE, 1, major=0xFFFFFFFF, minor=3).pack()
    assert shape[:16] == struct.pack("<BBB5xII", 5, 4, 1, 0xFFFFFFFF, 3)
    orient = XenkbdMtouch(kbdif.XENKBD_MT_EV_ORIENT, 2, orientation=-180).pack()
    assert orient[:16] == struct.pack("<BBB5xh6x", 5, 5, 2, -180)
    up = XenkbdMtouch(kbdif.XENKBD_MT_EV_UP, 3, abs_x=1).pack()
    assert up == bytes([5, 1, 3]) + bytes(37)
    for raw in (down, shape, orient, up):
        assert XenkbdMtouch.unpack(raw).pack() == raw


def test_fb_event_bytes():
    assert XenfbUpdate(1, 2, 3, 4).pack()[:20] == struct.pack("<B3xiiii", 2, 1, 2, 3, 4)
    assert XenfbResize(800, 600, 3200, 32, 0).pack()[:24] == struct.pack(
        "<B3xiiiii", 3, 800, 600, 3200, 32, 0
    )
    assert XenfbRefreshPeriod(50).pack()[:8] == struct.pack("<B3xI", 1, 50)


@given(I32, I32, I32)
def test_motion_roundtrip(x, y, z):
    ev = XenkbdMotion(x, y, z)
    assert kbdif.decode_kbd_in_event(ev.pack()) == ev


@given(st.booleans(), U32S)
def test_key_roundtrip(pressed, code):
    ev = XenkbdKey(pressed, code)
    assert kbdif.decode_kbd_in_event(ev.pack()) == ev


@given(I32, I32, I32, I32)
def test_update_roundtrip(x, y, w, h):
    ev = XenfbUpdate(x, y, w, h)
    assert fbif.decode_fb_out_event(ev.pack()) == ev


def test_out_of_range_fields_raise_value_error():
    with pytest.raises(ValueError):
        XenkbdMotion(2**31, 0).pack()
    with pytest.raises(ValueError):
        XenkbdKey(True, -1).pack()
    with pytest.raises(ValueError):
        XenfbRefreshPeriod(U32).pack()
    with pytest.raises(ValueError):
        XenkbdMtouch(9, 0).pack()


def test_key_pressed_nonzero_is_down():
    raw = bytearray(XenkbdKey(False, 30).pack())
    raw[1] = 7
    assert kbdif.decode_kbd_in_event(bytes(raw)) == XenkbdKey(True, 30)


def test_decode_unknown_types():
    raw = bytes([kbdif.XENKBD_TYPE_RESERVED]) + bytes(39)
    ev = kbdif.decode_kbd_in_event(raw)
    assert isinstance(ev, UnknownEvent) and ev.type == 2 and ev.raw == raw
    bad_mt = bytes([5, 77]) + bytes(38)
    ev = kbdif.decode_kbd_in_event(bad_mt)
    assert isinstance(ev, UnknownEvent) and "event_type" in ev.reason
    assert isinstance(fbif.decode_fb_out_event(bytes([1]) + bytes(39)), UnknownEvent)
    assert isinstance(fbif.decode_fb_in_event(bytes([9]) + bytes(39)), UnknownEvent)
    with pytest.raises(ValueError):
        kbdif.decode_kbd_in_event(bytes(39))
    with pytest.raises(ValueError):
        XenkbdKey.unpack(XenkbdMotion(1, 1).pack())


# --- kbd in ring (backend producer) ---------------------------------------------------------
def test_kbd_in_put_writes_slot_then_prod():
    mv = page()
    assert kbd_in_put(mv, [XenkbdKey(True, 30), XenkbdMotion(1, 2)]) == 2
    assert get_idx(mv, 4) == 2 and get_idx(mv, 0) == 0  # in_prod bumped, in_cons untouched
    assert mv[KBD_IN_OFFS:KBD_IN_OFFS + 8] == bytes([3, 1, 0, 0, 30, 0, 0, 0])
    assert mv[KBD_IN_OFFS + SLOT] == 1
    assert kbd_in_get(mv) == [XenkbdKey(True, 30), XenkbdMotion(1, 2)]
    assert get_idx(mv, 0) == 2


def test_kbd_in_full_ring_and_resume():
    mv = page()
    evs = keys(60)
    assert kbd_in_put(mv, evs) == KBD_IN_LEN
    assert get_idx(mv, 4) == KBD_IN_LEN
    assert kbd_in_put(mv, evs[KBD_IN_LEN:]) == 0  # full: nothing, no error
    assert kbd_in_get(mv, max_items=10) == evs[:10]
    assert kbd_in_put(mv, evs[KBD_IN_LEN:]) == 9
    got = kbd_in_get(mv)
    assert got == evs[10:]


def test_kbd_in_crosses_ring_end():
    """Events straddling slot 50 -> slot 0 (no u32 wrap) keep their order."""
    mv = page()
    set_idx(mv, 0, 48)
    set_idx(mv, 4, 48)
    evs = keys(6, 100)
    assert kbd_in_put(mv, evs) == 6
    assert mv[KBD_IN_OFFS + 50 * SLOT + 4] == 102  # idx 50 -> last slot
    assert mv[KBD_IN_OFFS + 0 * SLOT + 4] == 103  # idx 51 -> slot 0
    assert kbd_in_get(mv) == evs


def test_kbd_in_wraps_at_2_32():
    """prod/cons wrap mod 2**32.  Because 2**32 % 51 == 1, indices 0xffffffff and 0 share slot 0
    (exactly as the C macros compute it); the producer must not overwrite the unread event."""
    layout = kbdif.XENKBD_IN_RING_LAYOUT
    assert layout.slot_offset(U32 - 1) == layout.slot_offset(0) == KBD_IN_OFFS
    mv = page()
    start = U32 - 3
    set_idx(mv, 0, start)
    set_idx(mv, 4, start)
    evs = keys(5, 10)
    n = kbd_in_put(mv, evs)
    assert n == 3  # 0xfffffffd, 0xfffffffe, 0xffffffff; idx 0 would alias slot 0
    assert get_idx(mv, 4) == 0  # prod wrapped
    assert kbd_in_get(mv) == evs[:3]
    assert get_idx(mv, 0) == 0
    assert kbd_in_put(mv, evs[n:]) == 2
    assert get_idx(mv, 4) == 2
    assert kbd_in_get(mv) == evs[3:]


def test_fill_across_wrap_is_not_hostile():
    mv = page()
    set_idx(mv, 0, U32 - 2)
    set_idx(mv, 4, 1)  # 3 outstanding across the wrap
    assert XenkbdPage(mv).in_pending() == 3
    assert len(kbd_in_get(mv)) == 3
    assert get_idx(mv, 0) == 1


@pytest.mark.parametrize(
    ("cons", "prod"),
    [(1, 0), (0, 52), (5, 5 + 52), (0, U32 - 1), (U32 - 1, 51), (0x80000000, 0)],
)
def test_hostile_in_cons_raises_and_writes_nothing(cons, prod):
    mv = page()
    set_idx(mv, 0, cons)
    set_idx(mv, 4, prod)
    before = bytes(mv)
    with pytest.raises(RingError):
        kbd_in_put(mv, keys(1))
    assert bytes(mv) == before
    with pytest.raises(RingError):
        kbd_in_get(mv)
    assert bytes(mv) == before


def test_exactly_full_is_not_hostile():
    mv = page()
    set_idx(mv, 0, 1000)
    set_idx(mv, 4, 1000 + KBD_IN_LEN)
    assert kbd_in_put(mv, keys(1)) == 0


@settings(max_examples=300)
@given(st.integers(0, 2 * KBD_IN_LEN), st.integers(0, KBD_IN_LEN), st.integers(1, 60))
def test_kbd_in_put_near_the_wrap_never_overwrites_an_unread_slot(back, fill, n):
    """ring_put only scans for slot sharing while the unread window crosses 2**32: whatever the
    window, every unread event must come out intact, followed by what was written."""
    cons = (U32 - back) % U32
    mv = page()
    set_idx(mv, 0, cons)
    set_idx(mv, 4, cons)
    unread = keys(fill, 1)
    accepted = kbd_in_put(mv, unread)  # fewer than `fill` if the wrap made a slot shared
    assert get_idx(mv, 4) == (cons + accepted) % U32
    more = keys(n, 500)
    written = kbd_in_put(mv, more)
    assert kbd_in_get(mv) == unread[:accepted] + more[:written]


@settings(max_examples=300)
@given(st.integers(0, 3 * FB_OUT_LEN), st.integers(0, FB_OUT_LEN), st.data())
def test_fb_out_ring_get_reads_slot_idx_mod_len_wherever_the_window_lies(back, fill, data):
    """ring_get copies runs of slots: the slots it returns must still be, in order, those of
    ``XENFB_OUT_RING_REF(page, idx)`` = slot ``idx % LEN`` for idx = out_cons .. out_prod - 1
    (mod 2**32), in the plain case, across the slot-50 -> 0 wrap and across 2**32."""
    cons = (U32 - back) % U32
    mv = page()
    for slot in range(FB_OUT_LEN):  # every slot tagged with its number
        mv[FB_OUT_OFFS + slot * SLOT:FB_OUT_OFFS + (slot + 1) * SLOT] = bytes([slot]) * SLOT
    set_idx(mv, 8, cons)
    set_idx(mv, 12, (cons + fill) % U32)
    limit = data.draw(st.none() | st.integers(0, FB_OUT_LEN))
    got = ring_get(mv, fbif.XENFB_OUT_RING_LAYOUT, limit)
    n = fill if limit is None else min(fill, limit)
    assert got == [bytes([((cons + i) % U32) % FB_OUT_LEN]) * SLOT for i in range(n)]
    assert get_idx(mv, 8) == (cons + n) % U32


@settings(max_examples=300)
@given(U32S, U32S, st.integers(0, 60))
def test_kbd_in_put_never_touches_outside_ring(cons, prod, n):
    """Whatever the indices: RingError, or writes confined to the in ring slots and in_prod."""
    mv = page()
    set_idx(mv, 0, cons)
    set_idx(mv, 4, prod)
    before = bytearray(mv)
    try:
        written = kbd_in_put(mv, keys(n))
    except RingError:
        assert bytes(mv) == bytes(before)
        assert (prod - cons) % U32 > KBD_IN_LEN
        return
    fill = (prod - cons) % U32
    assert written <= min(n, KBD_IN_LEN - fill)
    assert get_idx(mv, 4) == (prod + written) % U32
    after = bytes(mv)
    for i in range(4096):
        if after[i] != before[i]:
            assert 4 <= i < 8 or KBD_IN_OFFS <= i < KBD_IN_OFFS + KBD_IN_LEN * SLOT, i


@settings(max_examples=100)
@given(U32S, st.lists(st.integers(1, 20), min_size=1, max_size=30), st.data())
def test_split_batches_preserve_order(start, batches, data):
    """Producer and consumer interleave in arbitrary batch sizes (also across 2**32): every
    event arrives once, in order."""
    mv = page()
    set_idx(mv, 0, start)
    set_idx(mv, 4, start)
    pending = keys(sum(batches))
    sent = list(pending)
    got: list = []
    for b in batches:
        pending = pending[kbd_in_put(mv, pending[:b]):]
        got += kbd_in_get(mv, max_items=data.draw(st.integers(0, 51)))
    while len(got) < len(sent):
        pending = pending[kbd_in_put(mv, pending):]
        got += kbd_in_get(mv)
    assert got == sent


def test_kbd_out_drain():
    mv = page()
    set_idx(mv, 8, U32 - 2)
    set_idx(mv, 12, 3)
    assert kbd_out_drain(mv) == 5
    assert get_idx(mv, 8) == 3
    set_idx(mv, 12, 3 + KBD_OUT_LEN + 1)
    with pytest.raises(RingError):
        kbd_out_drain(mv)
    assert get_idx(mv, 8) == 3


def test_page_views_validated():
    with pytest.raises(ValueError):
        XenkbdPage(bytearray(100))
    with pytest.raises(ValueError):
        kbd_in_put(memoryview(bytes(4096)), keys(1))  # read-only mapping
    with pytest.raises(TypeError):
        kbd_in_put(page(), [XenfbUpdate(0, 0, 1, 1)])
    p = XenkbdPage(bytearray(4096))
    p.in_prod = U32 - 1
    assert p.in_prod == U32 - 1
    with pytest.raises(ValueError):
        p.in_cons = U32


# --- fb rings -----------------------------------------------------------------------------
def test_fb_out_roundtrip_and_cons():
    mv = page()
    evs = [XenfbUpdate(0, 0, 10, 10), XenfbResize(1024, 768, 4096, 32, 0), XenfbUpdate(5, 5, 1, 1)]
    assert fb_out_put(mv, evs) == 3
    assert get_idx(mv, 12) == 3
    assert mv[FB_OUT_OFFS] == 2 and mv[FB_OUT_OFFS + SLOT] == 3
    assert fb_out_get(mv) == evs
    assert get_idx(mv, 8) == 3
    assert fb_out_get(mv) == []


def test_fb_out_unknown_types_skipped_but_reported():
    mv = page()
    fb_out_put(mv, [XenfbUpdate(0, 0, 1, 1)])
    mv[FB_OUT_OFFS + SLOT:FB_OUT_OFFS + 2 * SLOT] = bytes([1]) + bytes(39)  # type 1: unused
    mv[FB_OUT_OFFS + 2 * SLOT:FB_OUT_OFFS + 3 * SLOT] = bytes([200]) + bytes(39)
    set_idx(mv, 12, 3)
    fb_out_put(mv, [XenfbUpdate(2, 2, 2, 2)])
    got = fb_out_get(mv)
    assert got[0] == XenfbUpdate(0, 0, 1, 1) and got[3] == XenfbUpdate(2, 2, 2, 2)
    assert [e.type for e in got[1:3]] == [1, 200]
    assert all(isinstance(e, UnknownEvent) for e in got[1:3])
    assert get_idx(mv, 8) == 4  # moved past them


@pytest.mark.parametrize("prod_minus_cons", [FB_OUT_LEN + 1, U32 - 1, 0x80000000])
def test_fb_out_hostile_prod(prod_minus_cons):
    mv = page()
    set_idx(mv, 8, 77)
    set_idx(mv, 12, (77 + prod_minus_cons) % U32)
    before = bytes(mv)
    with pytest.raises(RingError, match="exceeds ring length 51"):
        fb_out_get(mv)
    assert bytes(mv) == before


def test_fb_out_full_ring_exactly_len():
    mv = page()
    ups = [XenfbUpdate(i, 0, 1, 1) for i in range(60)]
    assert fb_out_put(mv, ups) == FB_OUT_LEN
    assert fb_out_get(mv) == ups[:FB_OUT_LEN]


@settings(max_examples=300)
@given(st.integers(0, 2**64), U32S, st.one_of(st.integers(0, FB_OUT_LEN + 2), U32S))
def test_fb_out_get_on_garbage_page(seed, cons, delta):
    """A page full of guest garbage: RingError or a bounded batch; only out_cons changes."""
    buf = bytearray(random.Random(seed).randbytes(4096))
    prod = (cons + delta) % U32
    struct.pack_into("<II", buf, 8, cons, prod)
    blob = bytes(buf)
    mv = memoryview(buf)
    try:
        evs = fb_out_get(mv)
    except RingError:
        assert bytes(buf) == blob
        return
    assert len(evs) == (prod - cons) % U32 <= FB_OUT_LEN
    assert get_idx(mv, 8) == prod
    assert bytes(buf[:8]) + bytes(buf[12:]) == blob[:8] + blob[12:]


@settings(max_examples=300)
@given(st.integers(0, 2**64), U32S, st.integers(0, FB_OUT_LEN))
def test_fb_out_read_is_fb_out_get_with_updates_as_tuples(seed, cons, n):
    """The backend's reader gives what fb_out_get gives, an UPDATE as its values in field
    order, and leaves the page as fb_out_get leaves it: slots of guest garbage (every type,
    any i32), the window anywhere (also across 2**32)."""
    rng = random.Random(seed)
    buf = bytearray(rng.randbytes(4096))
    for i in range(FB_OUT_LEN):  # a third of the slots UPDATE, some RESIZE, the rest anything
        buf[FB_OUT_OFFS + i * SLOT] = rng.choice([fbif.XENFB_TYPE_UPDATE, fbif.XENFB_TYPE_RESIZE,
                                                  fbif.XENFB_TYPE_UPDATE, rng.randrange(256)])
    struct.pack_into("<II", buf, 8, cons, (cons + n) % U32)
    other = bytearray(buf)
    read, got = fb_out_read(memoryview(buf)), fb_out_get(memoryview(other))
    assert buf == other
    assert len(read) == len(got) == n
    for r, g in zip(read, got, strict=True):
        if isinstance(g, XenfbUpdate):
            assert r == (g.x, g.y, g.width, g.height)
            assert clip_update(*r, 800, 600) == g.clip(800, 600)
        else:
            assert r == g and not isinstance(r, tuple)


def test_fb_in_refresh_period():
    mv = page()
    assert fb_in_put(mv, [XenfbRefreshPeriod(fbif.XENFB_NO_REFRESH)] * 30) == FB_IN_LEN
    assert get_idx(mv, 4) == FB_IN_LEN
    assert mv[FB_IN_OFFS:FB_IN_OFFS + 8] == bytes([1, 0, 0, 0, 0, 0, 0, 0])
    assert fb_in_get(mv, max_items=1) == [XenfbRefreshPeriod(0)]
    assert fb_in_put(mv, [XenfbRefreshPeriod(33)]) == 1
    assert fb_in_get(mv)[-1] == XenfbRefreshPeriod(33)
    set_idx(mv, 0, get_idx(mv, 4) + 1)  # in_cons ahead of in_prod: impossible
    with pytest.raises(RingError):
        fb_in_put(mv, [XenfbRefreshPeriod(1)])
    with pytest.raises(TypeError):
        fb_in_put(page(), [XenfbUpdate(0, 0, 1, 1)])


def test_update_clip_hostile_values():
    assert XenfbUpdate(10, 10, 5, 5).clip(800, 600) == (10, 10, 5, 5)
    assert XenfbUpdate(-10, -10, 20, 20).clip(800, 600) == (0, 0, 10, 10)
    assert XenfbUpdate(790, 590, 100, 100).clip(800, 600) == (790, 590, 10, 10)
    assert XenfbUpdate(2**31 - 1, 0, 2**31 - 1, 1).clip(800, 600) is None
    assert XenfbUpdate(0, 0, -5, 10).clip(800, 600) is None
    assert XenfbUpdate(-(2**31), -(2**31), 2**31 - 1, 2**31 - 1).clip(800, 600) is None


@settings(max_examples=500)
@given(I32, I32, I32, I32, st.integers(1, 4096), st.integers(1, 4096))
def test_update_clip_is_the_intersection_with_the_screen(x, y, w, h, fb_w, fb_h):
    """Against the definition: the pixels (px, py) with x <= px < x + w and y <= py < y + h
    (exact integers) that lie on the screen, as a rectangle, or None if there are none."""
    cols = range(max(x, 0), min(x + w, fb_w))
    rows = range(max(y, 0), min(y + h, fb_h))
    want = (cols.start, rows.start, len(cols), len(rows)) if cols and rows else None
    assert XenfbUpdate(x, y, w, h).clip(fb_w, fb_h) == want


# --- xenfb_page -----------------------------------------------------------------------------
def test_fb_page_geometry_fields():
    buf = bytearray(4096)
    struct.pack_into("<iiIIB", buf, 16, 1024, 768, 4096, 1024 * 768 * 4, 32)
    p = XenfbPage(buf, protocols.XEN_IO_PROTO_ABI_X86_64)
    assert (p.width, p.height, p.line_length, p.mem_length, p.depth) == (
        1024, 768, 4096, 1024 * 768 * 4, 32,
    )
    p.width = -1
    assert struct.unpack_from("<i", buf, 16)[0] == -1
    with pytest.raises(ValueError):
        p.depth = 256


def test_pd_32_and_64_bit_layouts():
    buf = bytearray(4096)
    p32 = XenfbPage(buf, protocols.XEN_IO_PROTO_ABI_X86_32)
    p64 = XenfbPage(buf, protocols.XEN_IO_PROTO_ABI_X86_64)
    struct.pack_into("<II", buf, 36, 0x1111, 0x2222)
    assert p32.pd(0) == 0x1111 and p32.pd(1) == 0x2222
    assert p64.pd(0) == 0x2222  # pd[1] (32) aliases the low half of pd[0] (64), as QEMU notes
    p64.set_pd(1, 0x1_2345_6789)
    assert struct.unpack_from("<Q", buf, 48)[0] == 0x1_2345_6789
    assert (p32.pd_offset, p32.pd_entry_size, p64.pd_offset, p64.pd_entry_size) == (36, 4, 40, 8)
    arm = XenfbPage(buf, protocols.XEN_IO_PROTO_ABI_ARM)
    assert arm.pd_entry_size == 8


def test_pd_bounds_stop_before_rings():
    p32 = XenfbPage(bytearray(4096), "x86_32-abi")
    p64 = XenfbPage(bytearray(4096), "x86_64-abi")
    assert 36 + 4 * p32.pd_capacity <= 1024 < 36 + 4 * (p32.pd_capacity + 1)
    assert 40 + 8 * p64.pd_capacity <= 1024 < 40 + 8 * (p64.pd_capacity + 1)
    for p in (p32, p64):
        p.pd(p.pd_capacity - 1)
        for bad in (-1, p.pd_capacity, 255, 10**9):
            with pytest.raises(IndexError):
                p.pd(bad)
    with pytest.raises(ValueError):
        p32.set_pd(0, 2**32)


def test_pd_entries_needed():
    p64 = XenfbPage(bytearray(4096), "x86_64-abi")
    p32 = XenfbPage(bytearray(4096), "x86_32-abi")
    eight_mib = 8 * 1024 * 1024  # 2048 frames: 4 dirs of 512 (64-bit), 2 of 1024 (32-bit)
    assert p64.pd_entries_needed(eight_mib) == 4
    assert p32.pd_entries_needed(eight_mib) == 2
    assert p64.pd_entries_needed(1) == 1 and p64.pd_entries_needed(0) == 0
    with pytest.raises(ValueError):
        p64.pd_entries_needed(2**32 - 1)  # hostile mem_length
    with pytest.raises(ValueError):
        p64.pd_entries_needed(-1)


def test_protocol_validation_and_guess():
    with pytest.raises(ValueError):
        XenfbPage(bytearray(4096), "x86_16-abi")
    with pytest.raises(ValueError):
        XenfbPage(bytearray(4096), None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        XenfbPage(bytearray(1024), "x86_64-abi")
    buf = bytearray(4096)
    struct.pack_into("<I", buf, 36, 0x500)  # 32-bit frontend with one directory page
    assert fbif.xenfb_guess_protocol(buf) == "x86_32-abi"
    struct.pack_into("<Q", buf, 40, 0x600)  # 64-bit pd[0]
    assert fbif.xenfb_guess_protocol(buf) == "x86_64-abi"


def test_protocols_module():
    assert protocols.abi_long_size("x86_32-abi") == 4
    assert protocols.abi_long_size("x86_64-abi") == 8
    with pytest.raises(ValueError):
        protocols.abi_long_size("bogus")
    assert protocols.native_protocol("x86_64") == "x86_64-abi"
    assert protocols.native_protocol("i686") == "x86_32-abi"
    assert protocols.native_protocol("aarch64") == "arm-abi"
    with pytest.raises(ValueError):
        protocols.native_protocol("riscv64")


# --- XenbusState ----------------------------------------------------------------------------
def test_xenbus_state_values():
    assert [int(s) for s in XenbusState] == list(range(9))
    assert XenbusState.Closed == 6 and XenbusState.Reconfigured == 8
    assert XenbusState.Connected.c_name == "XenbusStateConnected"
    assert XenbusState.InitWait.to_xenstore() == "2"


@pytest.mark.parametrize(
    ("raw", "state"),
    [("4", XenbusState.Connected), (b"1", XenbusState.Initialising), ("6\n", XenbusState.Closed),
     (b"3\0", XenbusState.Initialised), (" 8 ", XenbusState.Reconfigured)],
)
def test_xenbus_parse_ok(raw, state):
    assert XenbusState.parse(raw) is state


@pytest.mark.parametrize(
    "raw", [None, "", "9", "-1", "4x", "0x4", b"\xff", "٤", "1" * 100, b"1" * 100, "4.0"]
)
def test_xenbus_parse_rejects(raw):
    with pytest.raises(ValueError):
        XenbusState.parse(raw)


# --- generic ring -------------------------------------------------------------------------
def test_ring_layout_validation():
    with pytest.raises(ValueError):
        RingLayout("x", 0, 4, 3000, 2048, 40)  # past the page
    with pytest.raises(ValueError):
        RingLayout("x", 2, 4, 0, 100, 40)  # misaligned index
    lay = RingLayout("t", 0, 4, 64, 100, 30)  # 3 slots, 10 bytes unused
    assert lay.length == 3
    mv = page()
    assert ring_put(mv, lay, [b"a", b"b", b"c", b"d"]) == 3
    assert ring_get(mv, lay) == [c.ljust(30, b"\0") for c in (b"a", b"b", b"c")]
    with pytest.raises(ValueError):
        ring_put(mv, lay, [b"x" * 31])
    with pytest.raises(ValueError):
        ring_get(memoryview(bytearray(100)), lay)


def test_every_event_declares_its_dataclass_fields_in_the_order_of_its_c_fields():
    """RingEvent.unpack passes the C fields' values positionally: an event whose dataclass
    declared its fields in another order would decode with values swapped."""
    from dataclasses import fields

    from dmore_nova.xen.io._event import RingEvent

    def events(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from events(sub)

    checked = 0
    for cls in events(RingEvent):
        if "FIELDS" not in cls.__dict__ or cls.unpack.__func__ is not RingEvent.unpack.__func__:
            continue  # abstract, or decodes by itself (XenkbdMtouch: one struct per arm)
        assert [f.name for f in cls.FIELDS[1:]] == [f.name for f in fields(cls)], cls
        event = cls(*(1 for _ in cls.FIELDS[1:]))
        assert cls.unpack(event.pack()) == event
        checked += 1
    assert checked >= 6  # XenfbUpdate, XenfbResize, XenfbRefreshPeriod, and 3 kbd events
