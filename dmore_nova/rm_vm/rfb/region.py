"""A small dirty region: a bounded list of rectangles.

Why not a precise region algebra: encoders pay per rectangle header and per pixel, and a viewer
only needs *at least* the changed pixels.  Overlapping or touching rectangles are merged, and past
``max_rects`` everything collapses into the bounding box, so the cost of tracking damage stays
O(max_rects) per damage call however busy the display is.
"""

from __future__ import annotations

from collections.abc import Iterator

from dmore_nova.rm_vm.rfb.display import Rect


def _touch(a: Rect, b: Rect) -> bool:
    return (a.x <= b.x + b.w and b.x <= a.x + a.w
            and a.y <= b.y + b.h and b.y <= a.y + a.h)


class Region:
    def __init__(self, max_rects: int = 16) -> None:
        self.max_rects = max_rects
        self._rects: list[Rect] = []

    def __bool__(self) -> bool:
        return bool(self._rects)

    def __iter__(self) -> Iterator[Rect]:
        return iter(self._rects)

    def __len__(self) -> int:
        return len(self._rects)

    def clear(self) -> None:
        self._rects.clear()

    def add(self, rect: Rect) -> None:
        if rect.empty:
            return
        merged = True
        while merged:
            merged = False
            for i, r in enumerate(self._rects):
                if _touch(r, rect):
                    u = r.union(rect)
                    # Merge only when it does not paint much more than the two rectangles do.
                    if u.area <= (r.area + rect.area) * 2 or r.intersects(rect):
                        rect = u
                        del self._rects[i]
                        merged = True
                        break
        self._rects.append(rect)
        if len(self._rects) > self.max_rects:
            box = self._rects[0]
            for r in self._rects[1:]:
                box = box.union(r)
            self._rects = [box]

    def intersects(self, rect: Rect) -> bool:
        return any(r.intersects(rect) for r in self._rects)

    def take(self) -> list[Rect]:
        rects, self._rects = self._rects, []
        return rects
