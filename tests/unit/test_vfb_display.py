"""The vfb backend's display side without a guest: merging a batch of UPDATE rectangles, and
comparing the guest's pixels with what viewers are served."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dmore_nova.rm_vm.backends.vfb import SMALL_RECT, VfbDisplay, merge_rects
from dmore_nova.rm_vm.rfb.display import Rect

W, H = 64, 48

rects = st.builds(
    lambda x, y, w, h: (x, y, min(w, W - x), min(h, H - y)),
    st.integers(0, W - 1), st.integers(0, H - 1), st.integers(1, W), st.integers(1, H))


def covered(rs) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    for x, y, w, h in rs:
        mask[y:y + h, x:x + w] = True
    return mask


@settings(max_examples=300)
@given(st.lists(rects, max_size=40, unique=True))
def test_merged_rectangles_cover_every_reported_pixel(batch):
    merged = merge_rects(dict.fromkeys(batch))
    want = covered(batch)
    got = covered((r.x, r.y, r.w, r.h) for r in merged)
    assert not (want & ~got).any()
    assert len(merged) <= 16
    if not batch:
        assert merged == []
    area = sum(w * h for _, _, w, h in batch)
    if batch:
        x0, y0 = min(r[0] for r in batch), min(r[1] for r in batch)
        x1, y1 = max(r[0] + r[2] for r in batch), max(r[1] + r[3] for r in batch)
        if (x1 - x0) * (y1 - y0) <= 2 * area:
            assert merged == [Rect(x0, y0, x1 - x0, y1 - y0)]


def test_an_echo_and_a_clear_to_the_end_of_the_screen_are_one_rectangle_each():
    """What fbcon sends (seen on the xenbox): the cell three times and the next cell twice for
    an echo; after a BackSpace, the rest of the row and one UPDATE per row below."""
    echo = {(56, 80, 8, 16): None, (64, 80, 8, 16): None}
    assert merge_rects(echo) == [Rect(56, 80, 16, 16)]
    clear = dict.fromkeys([(64, 80, 8, 16), (56, 80, 744, 16)]
                          + [(0, 16 * row, 800, 16) for row in range(6, 37)])
    assert merge_rects(clear) == [Rect(0, 80, 800, 512)]
    far = {(0, 0, 8, 16): None, (792, 584, 8, 16): None}   # a cursor and a clock: two
    assert sorted(merge_rects(far), key=lambda r: r.x) == [Rect(0, 0, 8, 16),
                                                           Rect(792, 584, 8, 16)]


def display_with(fb: np.ndarray) -> VfbDisplay:
    d = VfbDisplay(fb.shape[1], fb.shape[0])
    d.attach(fb)
    return d


def test_changed_returns_and_copies_only_what_differs():
    live = np.zeros((600, 800), np.uint32)
    d = display_with(live)
    assert d.changed(Rect(0, 80, 800, 512)) is None          # a clear over an empty screen
    live[100:116, 56:64] = 0xFFFFFF                          # a glyph inside a big rect
    live[300, 700] = 0x123456                                # and one pixel far from it
    assert d.changed(Rect(0, 80, 800, 512)) == Rect(56, 100, 700 - 56 + 1, 300 - 100 + 1)
    assert (d.framebuffer() == live).all()
    assert d.changed(Rect(0, 80, 800, 512)) is None
    live[100:116, 56:64] = 0x00FF00                          # a small rect: sent whole
    assert 8 * 16 <= SMALL_RECT
    assert d.changed(Rect(48, 100, 24, 16)) == Rect(48, 100, 24, 16)
    assert (d.framebuffer()[100:116, 56:64] == 0x00FF00).all()
    assert d.changed(Rect(48, 100, 24, 16)) is None



class Listener:
    def __init__(self) -> None:
        self.calls: list = []

    def damage(self, rect: Rect) -> None:
        self.calls.append(("damage", rect))

    def flush(self) -> None:
        self.calls.append(("flush",))


def test_a_batch_flushes_once_at_its_end_also_when_it_raised_and_forgets_what_it_compared():
    """Inside a batch, damage reaches listeners as it is found and one flush comes at the end,
    also when the body raised; the rects compared in it are skipped by ``sync`` only inside it
    (the UPDATE just read), after it ``sync`` compares again."""
    live = np.zeros((48, 64), np.uint32)
    d = display_with(live)
    seen = Listener()
    d.add_listener(seen)
    glyph = Rect(8, 16, 8, 16)
    for raised in (False, True):
        seen.calls.clear()
        try:
            with d.batch():
                assert d.batching
                live[16:32, 8:16] += 1
                d.notify_damage(d.changed(glyph))
                live[16:32, 8:16] += 1
                d.sync(glyph)                      # compared in this batch: not again
                assert seen.calls == [("damage", glyph)]
                if raised:
                    raise RuntimeError("the ring was hostile")
        except RuntimeError:
            assert raised
        assert not d.batching
        assert seen.calls == [("damage", glyph), ("flush",)]
        d.sync(glyph)                              # after the batch: compared, and sent
        assert seen.calls[-1] == ("damage", glyph)
        assert (d.framebuffer() == live).all()
