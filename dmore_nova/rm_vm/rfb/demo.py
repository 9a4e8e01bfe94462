"""The built-in test display: a text screen that echoes what viewers type.

It is both a :class:`DisplaySource` and an :class:`InputSink`, so the RFB server can be exercised
(and its key -> visible-echo latency measured) without any Xen device.  Each typed character
damages exactly one 8x16 cell plus the cursor, so the latency path is: KeyEvent parsed -> cell drawn
-> damage -> one tiny rectangle encoded.  Scrolling moves the text area up and reports it as a
copy, which viewers that speak CopyRect receive as such.
"""

from __future__ import annotations

import numpy as np

from dmore_nova.rm_vm.rfb.display import Cursor, DisplaySource, KeyInput, PointerInput, Rect

CELL_W, CELL_H = 8, 16
FG, BG = 0x00D0D0D0, 0x00102030
BAR_FG, BAR_BG = 0x00000000, 0x0060C060
POINTER_FG = 0x00F0C040
MIN_SIZE, MAX_SIZE = 64, 4096

# Keysyms with a meaning on this screen (X11 keysymdef.h).
XK_BackSpace, XK_Return, XK_KP_Enter = 0xFF08, 0xFF0D, 0xFF8D
HEADER_ROWS = 3  # title bar, pointer line, blank

_GLYPHS: dict[str, np.ndarray] = {}

_ARROW_ROWS = (  # X: black outline, o: white fill
    "X", "XX", "XoX", "XooX", "XoooX", "XooooX", "XoooooX", "XooooooX", "XoooooooX",
    "XooooooooX", "XoooooXXXXX", "XooXooX", "XoX XooX", "XX  XooX", "X    XooX", "     XooX",
    "      XX",
)


def _arrow() -> Cursor:
    h, w = len(_ARROW_ROWS), max(map(len, _ARROW_ROWS))
    pixels = np.zeros((h, w), np.uint32)
    mask = np.zeros((h, w), bool)
    for y, row in enumerate(_ARROW_ROWS):
        for x, ch in enumerate(row):
            if ch != " ":
                mask[y, x] = True
                pixels[y, x] = 0x00FFFFFF if ch == "o" else 0
    return Cursor(0, 0, pixels, mask)


ARROW = _arrow()


def glyph(ch: str) -> np.ndarray:
    """A (16, 8) bool mask of ``ch`` drawn with Pillow's built-in bitmap font (no font files:
    the demo must look the same on every machine, so pixel comparisons are meaningful)."""
    mask = _GLYPHS.get(ch)
    if mask is None:
        from PIL import Image, ImageDraw, ImageFont

        img = Image.new("L", (CELL_W, CELL_H), 0)
        ImageDraw.Draw(img).text((1, 2), ch, font=ImageFont.load_default_imagefont(), fill=255)
        mask = np.asarray(img) > 127
        _GLYPHS[ch] = mask
    return mask


class DemoDisplay(DisplaySource):
    def __init__(self, width: int = 800, height: int = 600, *, keep_events: int = 100_000) -> None:
        super().__init__()
        self._fb = np.empty((0, 0), np.uint32)
        self.text = ""  # what the echo area holds, as typed (newlines included)
        self.keys: list[KeyInput] = []
        self.pointers: list[PointerInput] = []
        self.keep_events = keep_events
        self.pointer_state = (0, 0, 0)
        self._setup(width, height)

    # -- DisplaySource ---------------------------------------------------------------------
    @property
    def width(self) -> int:
        return self._fb.shape[1]

    @property
    def height(self) -> int:
        return self._fb.shape[0]

    @property
    def name(self) -> str:
        return "dmore-nova demo"

    def framebuffer(self) -> np.ndarray:
        return self._fb

    def cursor(self) -> Cursor:
        return ARROW

    @property
    def led_state(self) -> int:
        return 0

    def request_resize(self, width: int, height: int) -> int:
        if not (MIN_SIZE <= width <= MAX_SIZE and MIN_SIZE <= height <= MAX_SIZE):
            return 3  # invalid screen layout
        self._setup(width, height)
        self.notify_resized(reason=1)
        return 0

    # -- InputSink -------------------------------------------------------------------------
    def key(self, event: KeyInput) -> None:
        if len(self.keys) < self.keep_events:
            self.keys.append(event)
        if not event.down:
            return
        if event.keysym in (XK_Return, XK_KP_Enter):
            self._put("\n")
        elif event.keysym == XK_BackSpace:
            self._backspace()
        elif 0x20 <= event.keysym <= 0x7E or 0xA0 <= event.keysym <= 0xFF:
            self._put(chr(event.keysym))

    def pointer(self, event: PointerInput) -> None:
        if len(self.pointers) < self.keep_events:
            self.pointers.append(event)
        self.pointer_state = (event.x, event.y, event.buttons)
        self._draw_pointer_line()

    def flush_input(self) -> None:
        """Nothing batched: every key draws at once."""

    # -- drawing ---------------------------------------------------------------------------
    def _setup(self, width: int, height: int) -> None:
        self._fb = np.full((height, width), BG, np.uint32)
        self.cols = max(width // CELL_W, 1)
        self.rows = max(height // CELL_H, HEADER_ROWS + 1)
        self.row, self.col = HEADER_ROWS, 0
        title = f" dmore-nova RFB demo  {width}x{height}  type here "
        self._draw_string(0, 0, title.ljust(self.cols), BAR_FG, BAR_BG)
        self._draw_pointer_line(notify=False)
        replay, self.text = self.text, ""
        for ch in replay:
            self._put(ch, notify=False)
        self._draw_cursor(True, notify=False)

    def _cell(self, row: int, col: int, ch: str, fg: int, bg: int) -> Rect | None:
        x, y = col * CELL_W, row * CELL_H
        if x + CELL_W > self.width or y + CELL_H > self.height:
            return None
        self._fb[y:y + CELL_H, x:x + CELL_W] = np.where(glyph(ch), np.uint32(fg), np.uint32(bg))
        return Rect(x, y, CELL_W, CELL_H)

    def _draw_string(self, row: int, col: int, s: str, fg: int, bg: int) -> Rect:
        for i, ch in enumerate(s[: max(self.cols - col, 0)]):
            self._cell(row, col + i, ch, fg, bg)
        return Rect(col * CELL_W, row * CELL_H, len(s) * CELL_W, CELL_H)

    def _draw_pointer_line(self, notify: bool = True) -> None:
        x, y, b = self.pointer_state
        line = f" pointer x={x:<5d} y={y:<5d} buttons={b:#04x}"
        r = self._draw_string(1, 0, line.ljust(self.cols), POINTER_FG, BG)
        if notify:
            self.notify_damage(r)

    def _draw_cursor(self, on: bool, notify: bool = True) -> None:
        r = self._cell(self.row, self.col, "_" if on else " ", FG, BG)
        if r and notify:
            self.notify_damage(r)

    def _put(self, ch: str, notify: bool = True) -> None:
        self.text += ch
        self._draw_cursor(False, notify)
        if ch == "\n":
            self._newline(notify)
        else:
            r = self._cell(self.row, self.col, ch, FG, BG)
            if r and notify:
                self.notify_damage(r)
            self.col += 1
            if self.col >= self.cols:
                self._newline(notify)
        self._draw_cursor(True, notify)

    def _backspace(self) -> None:
        if not self.text or self.text[-1] == "\n" or self.col == 0:
            return
        self.text = self.text[:-1]
        self._draw_cursor(False)
        self.col -= 1
        self._draw_cursor(True)

    def _newline(self, notify: bool) -> None:
        self.col = 0
        if self.row + 1 < self.rows:
            self.row += 1
            return
        # Scroll the echo area up one row: a copy for CopyRect viewers, then a blank last row.
        top = HEADER_ROWS * CELL_H
        bottom = self.rows * CELL_H
        self._fb[top:bottom - CELL_H] = self._fb[top + CELL_H:bottom]
        self._fb[bottom - CELL_H:bottom] = BG
        if notify:
            self.notify_copied(0, top + CELL_H, Rect(0, top, self.width, bottom - CELL_H - top))
            self.notify_damage(Rect(0, bottom - CELL_H, self.width, CELL_H))
