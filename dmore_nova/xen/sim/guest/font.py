"""The sim guest's console font: Pillow's built-in bitmap font in fixed 8x16 cells.

Why this font: it ships inside Pillow (no font files, no fontconfig), so the glyph masks are
the same on every machine, and a test can render a word with :func:`render_text` and look for
exactly those pixels in a screenshot taken through the vfb backend -- the guest's console and
the test agree bit for bit.  The idea is the one ``dmore_nova.rm_vm.rfb.demo`` uses for its
demo screen; it is repeated here (not imported) because the sim guest must not depend on the
RM VM side.

Characters Pillow's font cannot draw (outside Latin-1) are drawn as ``?``; a cell is never
wider than 8 pixels, so wide characters are clipped, as on the Linux text console.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

CELL_W = 8
CELL_H = 16
#: Where the glyph is drawn inside its cell (Pillow's default font is 6x11ish).
GLYPH_ORIGIN = (1, 2)
#: Distinct characters whose masks are cached (bounds memory if a program prints lots of
#: different code points).
MAX_CACHED_GLYPHS = 4096

_lock = threading.Lock()
_font: Any = None
_cache: dict[str, np.ndarray] = {}
_BLANK = np.zeros((CELL_H, CELL_W), dtype=bool)
_BLANK.setflags(write=False)


def _load_font() -> Any:
    global _font
    if _font is None:
        from PIL import ImageFont

        _font = ImageFont.load_default_imagefont()
    return _font


def glyph(ch: str) -> np.ndarray:
    """The ``(16, 8)`` boolean mask of one character (read-only; ``True`` = foreground)."""
    if not ch or ch == " ":
        return _BLANK
    ch = ch[0]
    mask = _cache.get(ch)
    if mask is not None:
        return mask
    from PIL import Image, ImageDraw

    drawn = ch if ord(ch) <= 0xFF and ch.isprintable() else "?"
    with _lock:
        img = Image.new("L", (CELL_W, CELL_H), 0)
        ImageDraw.Draw(img).text(GLYPH_ORIGIN, drawn, font=_load_font(), fill=255)
    mask = np.asarray(img) > 127
    mask.setflags(write=False)
    if len(_cache) < MAX_CACHED_GLYPHS:
        _cache[ch] = mask
    return mask


def render_text(text: str) -> np.ndarray:
    """``text`` drawn in consecutive cells: a ``(16, 8 * len(text))`` boolean mask.

    Tests use it to find a word in a framebuffer: compare it with ``fb_region != background``
    at a cell-aligned position.
    """
    if not text:
        return np.zeros((CELL_H, 0), dtype=bool)
    return np.concatenate([glyph(ch) for ch in text], axis=1)


def find_text(fg_mask: np.ndarray, text: str) -> list[tuple[int, int]]:
    """Cell-aligned ``(row, col)`` positions where ``text`` appears in ``fg_mask``.

    ``fg_mask`` is a 2-D boolean array, ``True`` where a pixel is not the background (e.g.
    ``fb[:rows*16, :cols*8] != bg``).  Only whole cells are compared, so ``"hi"`` at column 0
    is not confused with the ``hi`` inside ``"echo hi"`` unless it really is at that cell.
    """
    want = render_text(text)
    if want.shape[1] == 0:
        return []
    rows, cols = fg_mask.shape[0] // CELL_H, fg_mask.shape[1] // CELL_W
    hits: list[tuple[int, int]] = []
    w = len(text)
    for r in range(rows):
        band = fg_mask[r * CELL_H:(r + 1) * CELL_H]
        for c in range(cols - w + 1):
            if np.array_equal(band[:, c * CELL_W:(c + w) * CELL_W], want):
                hits.append((r, c))
    return hits
