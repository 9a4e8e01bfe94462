"""Reading a real Linux guest's text console, and checking a viewer's picture against it.

The guest (tools/xenbox/guest-init) prints ``XENBOX-VCSA <hex>`` on hvc0 whenever tty1's text
screen changed and settled: the bytes of ``/dev/vcsa1`` (``rows, cols, cursor x, cursor y``, then
one (character, attribute) pair per cell; Linux ``drivers/tty/vt/vc_screen.c``).  That is the
guest's own account of what fbcon drew into its framebuffer.

No font is needed to compare a viewer's screenshot with it: fbcon draws every cell of the same
character with the same glyph, so the picture is right iff every cell's foreground mask is a
function of the character the guest says is there -- blanks are empty, equal characters have
equal masks, different characters different masks -- with cells on fbcon's 8x16 grid (the
guest's kernel command line pins ``fbcon=font:VGA8x16``).  A picture that is stale, shifted,
from another screen, or missing a line fails this.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

CELL_W, CELL_H = 8, 16
#: Longest vcsa dump accepted from the guest log (a 4096x4096 text screen would be far less).
MAX_VCSA_BYTES = 4 + 2 * 512 * 256

_VCSA = re.compile(r"XENBOX-VCSA ([0-9a-f]+)")


@dataclass(frozen=True)
class TextScreen:
    rows: int
    cols: int
    cursor: tuple[int, int]  # (row, col)
    lines: tuple[str, ...]

    def text(self) -> str:
        return "\n".join(line.rstrip() for line in self.lines).rstrip("\n")


def parse_vcsa(data: bytes) -> TextScreen:
    if not 4 <= len(data) <= MAX_VCSA_BYTES:
        raise ValueError(f"vcsa dump of {len(data)} bytes")
    rows, cols, x, y = data[0], data[1], data[2], data[3]
    if len(data) != 4 + 2 * rows * cols:
        raise ValueError(f"vcsa dump of {len(data)} bytes for {rows}x{cols}")
    chars = data[4::2]
    lines = tuple(chars[r * cols:(r + 1) * cols].decode("latin-1") for r in range(rows))
    return TextScreen(rows, cols, (y, x), lines)


def screens_in_log(log: str) -> list[TextScreen]:
    """Every complete XENBOX-VCSA dump in a guest console log, oldest first."""
    out = []
    for m in _VCSA.finditer(log):
        hexstr = m.group(1)
        if len(hexstr) % 2:
            continue  # cut off by the end of the log (still being written)
        try:
            out.append(parse_vcsa(bytes.fromhex(hexstr)))
        except ValueError:
            continue
    return out


def picture_problems(img: np.ndarray, screen: TextScreen, max_report: int = 8) -> list[str]:
    """Why ``img`` (H x W x 3) is not a drawing of ``screen``; empty if it is."""
    h, w = img.shape[:2]
    if h < screen.rows * CELL_H or w < screen.cols * CELL_W:
        return [f"picture {w}x{h} too small for {screen.cols}x{screen.rows} cells of "
                f"{CELL_W}x{CELL_H}"]
    flat = img[: screen.rows * CELL_H, : screen.cols * CELL_W].reshape(-1, img.shape[2])
    colours, counts = np.unique(flat, axis=0, return_counts=True)
    bg = colours[counts.argmax()]
    fg = np.any(img[: screen.rows * CELL_H, : screen.cols * CELL_W] != bg, axis=2)
    cells = fg.reshape(screen.rows, CELL_H, screen.cols, CELL_W).transpose(0, 2, 1, 3)
    problems: list[str] = []
    glyphs: dict[str, tuple[np.ndarray, tuple[int, int]]] = {}
    for r, line in enumerate(screen.lines):
        for c, ch in enumerate(line):
            if (r, c) == screen.cursor:
                continue  # fbcon's blinking cursor
            mask = cells[r, c]
            if ch == " ":
                if mask.any():
                    problems.append(f"cell ({r},{c}) should be blank")
            elif ch in glyphs:
                if not np.array_equal(glyphs[ch][0], mask):
                    problems.append(f"cell ({r},{c}) {ch!r} differs from the {ch!r} at "
                                    f"{glyphs[ch][1]}")
            elif not mask.any():
                problems.append(f"cell ({r},{c}) {ch!r} is blank")
            else:
                glyphs[ch] = (mask, (r, c))
    seen: dict[bytes, str] = {}
    for ch, (mask, _pos) in glyphs.items():
        key = np.packbits(mask).tobytes()
        if key in seen:
            problems.append(f"{ch!r} and {seen[key]!r} are drawn the same")
        seen[key] = ch
    if len(problems) > max_report:
        problems = problems[:max_report] + [f"... {len(problems) - max_report} more"]
    return problems
