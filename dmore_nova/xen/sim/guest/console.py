"""The sim guest's text console: a real shell in a pty, drawn into the vfb framebuffer.

This is the guest's ``fbcon`` + ``getty``: :class:`Console` runs a shell (bash, else
``/bin/sh``; ``TERM=linux``) on a pseudo-terminal, feeds what it prints through
`pyte <https://github.com/selectel/pyte>`_ (a VT emulator), and draws the changed cells with the
fixed 8x16 font of :mod:`.font` into the framebuffer, asking the framebuffer to send one UPDATE
per changed line span.  Keyboard input arrives as Linux keycodes with press/release from the
vkbd frontend; :class:`KeyboardTranslator` turns them into the bytes the Linux console would
put on the tty with a US layout (the inverse of :mod:`dmore_nova.xen.io.keymap`): shift,
caps lock, control, alt as an ESC prefix, Enter as CR, Backspace as DEL, cursor and editing
keys as the console's escape sequences.  Pointer events are not used (kbdfront records them).

The class does no waiting of its own: the guest's event loop calls :meth:`Console.on_readable`
when the pty master is readable and :meth:`Console.on_writable` while output to the shell is
pending (:meth:`Console.wants_write`).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import struct
import subprocess
import termios
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np
import pyte

from dmore_nova.xen.io import kbdif as K
from dmore_nova.xen.io import keymap
from dmore_nova.xen.sim.guest.font import CELL_H, CELL_W, glyph

LOG = logging.getLogger(__name__)

#: Bytes read from the pty per readiness callback.
READ_CHUNK = 65536
#: Input for the shell held while it is not reading (keys beyond this are dropped, logged).
MAX_PENDING_INPUT = 1 << 16
#: Shell restarts allowed per RESPAWN_WINDOW seconds (``exit`` at the prompt starts a new one,
#: as getty does; a shell that dies at once does not spin).
MAX_RESPAWNS, RESPAWN_WINDOW = 10, 60.0
#: Rows of the cursor underline inside a cell (the Linux console's default cursor).
CURSOR_ROWS = (14, 16)

# The Linux console's palette (drivers/tty/vt/vt.c default_red/grn/blu), as 0x00RRGGBB: what
# a depth-32 xenfb pixel holds (red at bit 16, green at 8, blue at 0).
_PALETTE = {
    "black": 0x000000, "red": 0xAA0000, "green": 0x00AA00, "brown": 0xAA5500,
    "blue": 0x0000AA, "magenta": 0xAA00AA, "cyan": 0x00AAAA, "white": 0xAAAAAA,
    "brightblack": 0x555555, "brightred": 0xFF5555, "brightgreen": 0x55FF55,
    "brightbrown": 0xFFFF55, "brightblue": 0x5555FF, "brightmagenta": 0xFF55FF,
    "brightcyan": 0x55FFFF, "brightwhite": 0xFFFFFF,
}
DEFAULT_FG = _PALETTE["white"]
DEFAULT_BG = _PALETTE["black"]

#: pyte keeps private modes shifted left by 5; DECCKM (application cursor keys) is ``?1``.
_DECCKM = 1 << 5


def color(name: str, *, fg: bool, bold: bool = False) -> int:
    """A pyte colour (a palette name, ``"default"`` or ``"rrggbb"``) as a pixel value; bold
    brightens the eight base foreground colours, as the Linux console does."""
    if name == "default":
        name = "white" if fg else "black"
    if fg and bold and name in _PALETTE and not name.startswith("bright"):
        name = "bright" + name
    value = _PALETTE.get(name)
    if value is not None:
        return value
    try:
        return int(name, 16) & 0xFFFFFF if len(name) == 6 else DEFAULT_FG if fg else DEFAULT_BG
    except ValueError:
        return DEFAULT_FG if fg else DEFAULT_BG


# --- keyboard --------------------------------------------------------------------------------
_C = keymap.LINUX_KEYCODES


def _us_layout() -> dict[tuple[int, bool], str]:
    """``(keycode, shifted) -> character``: the printable half of :data:`keymap.KEYSYM_MAP`,
    inverted (Latin-1 keysyms equal their code points)."""
    out: dict[tuple[int, bool], str] = {}
    for keysym, (code, shift) in keymap.KEYSYM_MAP.items():
        if 0x20 <= keysym <= 0x7E:
            out.setdefault((code, shift), chr(keysym))
    # Keys with the same character on both levels.
    out[(_C["KEY_SPACE"], True)] = " "
    return out


US_LAYOUT = _us_layout()

#: Keypad with NumLock on (the console's default), both levels.
_KEYPAD = {
    _C["KEY_KP0"]: "0", _C["KEY_KP1"]: "1", _C["KEY_KP2"]: "2", _C["KEY_KP3"]: "3",
    _C["KEY_KP4"]: "4", _C["KEY_KP5"]: "5", _C["KEY_KP6"]: "6", _C["KEY_KP7"]: "7",
    _C["KEY_KP8"]: "8", _C["KEY_KP9"]: "9", _C["KEY_KPDOT"]: ".", _C["KEY_KPSLASH"]: "/",
    _C["KEY_KPASTERISK"]: "*", _C["KEY_KPMINUS"]: "-", _C["KEY_KPPLUS"]: "+",
    _C["KEY_KPEQUAL"]: "=", _C["KEY_KPENTER"]: "\r",
}
#: Keys whose bytes do not depend on shift (Linux ``defkeymap``, TERM=linux).
_SPECIAL = {
    _C["KEY_ENTER"]: b"\r", _C["KEY_BACKSPACE"]: b"\x7f", _C["KEY_TAB"]: b"\t",
    _C["KEY_ESC"]: b"\x1b", _C["KEY_HOME"]: b"\x1b[1~", _C["KEY_INSERT"]: b"\x1b[2~",
    _C["KEY_DELETE"]: b"\x1b[3~", _C["KEY_END"]: b"\x1b[4~", _C["KEY_PAGEUP"]: b"\x1b[5~",
    _C["KEY_PAGEDOWN"]: b"\x1b[6~",
    _C["KEY_F1"]: b"\x1b[[A", _C["KEY_F2"]: b"\x1b[[B", _C["KEY_F3"]: b"\x1b[[C",
    _C["KEY_F4"]: b"\x1b[[D", _C["KEY_F5"]: b"\x1b[[E", _C["KEY_F6"]: b"\x1b[17~",
    _C["KEY_F7"]: b"\x1b[18~", _C["KEY_F8"]: b"\x1b[19~", _C["KEY_F9"]: b"\x1b[20~",
    _C["KEY_F10"]: b"\x1b[21~", _C["KEY_F11"]: b"\x1b[23~", _C["KEY_F12"]: b"\x1b[24~",
}
_ARROWS = {_C["KEY_UP"]: b"A", _C["KEY_DOWN"]: b"B", _C["KEY_RIGHT"]: b"C",
           _C["KEY_LEFT"]: b"D"}
_SHIFTS = frozenset({_C["KEY_LEFTSHIFT"], _C["KEY_RIGHTSHIFT"]})
_CTRLS = frozenset({_C["KEY_LEFTCTRL"], _C["KEY_RIGHTCTRL"]})
_ALTS = frozenset({_C["KEY_LEFTALT"], _C["KEY_RIGHTALT"]})
_CAPSLOCK = _C["KEY_CAPSLOCK"]


class KeyboardTranslator:
    """Linux keycodes with press/release -> tty bytes (sans-IO; the Linux console's job).

    A press (or an autorepeat press) of a non-modifier key yields its bytes; releases and
    modifiers yield nothing.  ``app_cursor`` is DECCKM (cursor keys send ``ESC O x``).
    """

    def __init__(self) -> None:
        self.down: set[int] = set()
        self.capslock = False

    @property
    def shift(self) -> bool:
        return bool(self.down & _SHIFTS)

    @property
    def ctrl(self) -> bool:
        return bool(self.down & _CTRLS)

    @property
    def alt(self) -> bool:
        return bool(self.down & _ALTS)

    def key(self, keycode: int, pressed: bool, *, app_cursor: bool = False) -> bytes:
        if not pressed:
            self.down.discard(keycode)
            return b""
        self.down.add(keycode)
        if keycode in _SHIFTS or keycode in _CTRLS or keycode in _ALTS:
            return b""
        if keycode == _CAPSLOCK:
            self.capslock = not self.capslock
            return b""
        out = self._bytes(keycode, app_cursor)
        if out and self.alt:
            out = b"\x1b" + out  # Meta sends an ESC prefix
        return out

    def _bytes(self, keycode: int, app_cursor: bool) -> bytes:
        if keycode in _ARROWS:
            return (b"\x1bO" if app_cursor else b"\x1b[") + _ARROWS[keycode]
        if keycode in _SPECIAL:
            return _SPECIAL[keycode]
        if keycode in _KEYPAD:
            return _KEYPAD[keycode].encode()
        ch = US_LAYOUT.get((keycode, self.shift))
        if ch is None:
            return b""
        if ch.isalpha() and self.capslock:
            ch = ch.swapcase()
        if self.ctrl:
            return _control(ch)
        return ch.encode()


#: Control + a key whose character is not in ``@`` .. ``_`` (the console's Control_* keysyms).
_CTRL_EXTRA = {" ": 0x00, "2": 0x00, "3": 0x1B, "4": 0x1C, "5": 0x1D, "6": 0x1E, "7": 0x1F,
               "8": 0x7F, "/": 0x1F, "-": 0x1F, "?": 0x7F}


def _control(ch: str) -> bytes:
    """Control + character: ASCII's ``& 0x1f`` for ``@A-Z[\\]^_`` (either case)."""
    if ch in _CTRL_EXTRA:
        return bytes([_CTRL_EXTRA[ch]])
    up = ch.upper()
    if "@" <= up <= "_":
        return bytes([ord(up) & 0x1F])
    return ch.encode()


# --- the screen --------------------------------------------------------------------------------
class Framebuffer(Protocol):
    """What the console draws into (:class:`~dmore_nova.xen.sim.guest.fbfront.FbFront`)."""

    pixels: np.ndarray
    width: int
    height: int

    def damage(self, x: int, y: int, w: int, h: int) -> None: ...


class _Screen(pyte.Screen):
    """pyte screen whose answers to terminal queries (DA, DSR) go back to the shell."""

    def __init__(self, columns: int, lines: int, reply: Callable[[bytes], None]) -> None:
        super().__init__(columns, lines)
        self._reply = reply

    def write_process_input(self, data: str) -> None:
        self._reply(data.encode())


def default_shell() -> list[str]:
    bash = shutil.which("bash")
    if bash:
        return [bash, "--noprofile", "--norc", "-i"]
    return ["/bin/sh", "-i"]


class Console:
    """A shell on a pty, rendered into ``fb`` (see the module docstring)."""

    def __init__(self, fb: Framebuffer, *, shell: list[str] | None = None,
                 env: Mapping[str, str] | None = None, prompt: str = "$ ") -> None:
        self.fb = fb
        self.shell = list(shell) if shell else default_shell()
        self.env = {"TERM": "linux", "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    "HOME": os.environ.get("HOME", "/"), "LANG": "C.UTF-8", "PS1": prompt,
                    "PS2": "> "}
        if env:
            self.env.update(env)
        self.keys = KeyboardTranslator()
        self.cols = max(fb.width // CELL_W, 1)
        self.rows = max(fb.height // CELL_H, 1)
        self.screen = _Screen(self.cols, self.rows, self.send_input)
        self.stream = pyte.ByteStream(self.screen)
        self._drawn: list[list[tuple | None]] = []
        self._cursor: tuple[int, int] | None = None
        self.master: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._pending = bytearray()
        self.dropped_input = 0
        self.respawns: list[float] = []
        self.closed = False
        self.redraw_all()

    # -- the shell ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the shell on a new pty whose window size matches the text grid."""
        master, slave = os.openpty()
        try:
            fcntl.ioctl(slave, termios.TIOCSWINSZ,
                        struct.pack("HHHH", self.rows, self.cols, self.cols * CELL_W,
                                    self.rows * CELL_H))
            os.set_blocking(master, False)
            setsid = shutil.which("setsid")
            home = self.env.get("HOME", "/")
            # setsid -c: new session with the pty as controlling terminal, so Ctrl-C and job
            # control work (done in C: safe in a process that has threads).
            argv = [setsid, "-c", *self.shell] if setsid else self.shell
            self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                                         env=self.env, close_fds=True,
                                         start_new_session=setsid is None,
                                         cwd=home if os.path.isdir(home) else "/")
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self.master = master
        LOG.info("console: started %s (pid %d) on a %dx%d pty", self.shell[0], self.proc.pid,
                 self.cols, self.rows)

    def fileno(self) -> int:
        assert self.master is not None
        return self.master

    def on_readable(self) -> bool:
        """Read what the shell printed and draw it.  False when the shell is gone (the caller
        removes the reader and may :meth:`respawn`)."""
        if self.master is None:
            return False
        try:
            data = os.read(self.master, READ_CHUNK)
        except BlockingIOError:
            return True
        except OSError as exc:
            if exc.errno != errno.EIO:  # EIO: the slave side was closed (shell exited)
                LOG.warning("console: pty read: %s", exc)
            data = b""
        if not data:
            self._shell_gone()
            return False
        self.feed(data)
        return True

    def _shell_gone(self) -> None:
        if self.master is not None:
            os.close(self.master)
            self.master = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            LOG.info("console: shell exited with %s", self.proc.returncode)
        self._pending.clear()

    def may_respawn(self) -> bool:
        now = time.monotonic()
        self.respawns = [t for t in self.respawns if now - t < RESPAWN_WINDOW]
        return not self.closed and len(self.respawns) < MAX_RESPAWNS

    def respawn(self) -> bool:
        """Start a new shell after the old one exited (rate limited); False if not allowed."""
        if not self.may_respawn():
            LOG.warning("console: shell exited %d times in %ds; not restarting", MAX_RESPAWNS,
                        RESPAWN_WINDOW)
            return False
        self.respawns.append(time.monotonic())
        self.screen.reset()
        self.start()
        self.render()
        return True

    def send_input(self, data: bytes) -> None:
        """Queue bytes for the shell; written now if the pty takes them."""
        if not data or self.master is None:
            return
        room = MAX_PENDING_INPUT - len(self._pending)
        if len(data) > room:
            self.dropped_input += len(data) - room
            LOG.warning("console: shell not reading; %d input bytes dropped", len(data) - room)
            data = data[:max(room, 0)]
        self._pending += data
        self.on_writable()

    def wants_write(self) -> bool:
        return bool(self._pending) and self.master is not None

    def on_writable(self) -> None:
        if self.master is None:
            return
        while self._pending:
            try:
                n = os.write(self.master, self._pending)
            except BlockingIOError:
                return
            except OSError as exc:
                LOG.warning("console: pty write: %s", exc)
                self._pending.clear()
                return
            del self._pending[:n]

    def on_key(self, ev: object) -> None:
        """A vkbd in event (kbdfront listener): KEY events become tty input."""
        if isinstance(ev, K.XenkbdKey):
            data = self.keys.key(ev.keycode, ev.pressed,
                                 app_cursor=_DECCKM in self.screen.mode)
            if data:
                self.send_input(data)

    # -- drawing ------------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        self.stream.feed(data)
        self.render()

    def text(self) -> list[str]:
        """The screen as text lines (what a human would read off the framebuffer)."""
        return list(self.screen.display)

    def _cell_key(self, y: int, x: int, cursor: tuple[int, int] | None) -> tuple:
        ch = self.screen.buffer[y][x]
        fg = color(ch.fg, fg=True, bold=ch.bold)
        bg = color(ch.bg, fg=False)
        if ch.reverse:
            fg, bg = bg, fg
        return (ch.data, fg, bg, ch.underscore, cursor == (y, x))

    def _draw_cell(self, y: int, x: int, key: tuple) -> None:
        data, fg, bg, underscore, is_cursor = key
        mask = glyph(data)
        if underscore or is_cursor:
            mask = mask.copy()
            mask[CURSOR_ROWS[0]:CURSOR_ROWS[1]] = True
        px, py = x * CELL_W, y * CELL_H
        self.fb.pixels[py:py + CELL_H, px:px + CELL_W] = np.where(mask, np.uint32(fg),
                                                                   np.uint32(bg))

    def _cursor_pos(self) -> tuple[int, int] | None:
        c = self.screen.cursor
        if c.hidden:
            return None
        return (min(max(c.y, 0), self.rows - 1), min(max(c.x, 0), self.cols - 1))

    def render(self, damage: bool = True) -> int:
        """Draw the cells that changed since the last call; one damage rectangle per changed
        line span (unless ``damage`` is False).  Returns how many cells were drawn."""
        cursor = self._cursor_pos()
        lines = set(self.screen.dirty)
        self.screen.dirty.clear()
        if cursor != self._cursor:
            for pos in (self._cursor, cursor):
                if pos is not None:
                    lines.add(pos[0])
            self._cursor = cursor
        drawn = 0
        for y in sorted(lines):
            if not 0 <= y < self.rows:
                continue
            row = self._drawn[y]
            x0 = x1 = -1
            for x in range(self.cols):
                key = self._cell_key(y, x, cursor)
                if row[x] != key:
                    self._draw_cell(y, x, key)
                    row[x] = key
                    drawn += 1
                    if x0 < 0:
                        x0 = x
                    x1 = x
            if x0 >= 0 and damage:
                self.fb.damage(x0 * CELL_W, y * CELL_H, (x1 - x0 + 1) * CELL_W, CELL_H)
        return drawn

    def redraw_all(self) -> None:
        """Lay the grid out for the framebuffer's current mode and draw every cell."""
        cols, rows = max(self.fb.width // CELL_W, 1), max(self.fb.height // CELL_H, 1)
        if (cols, rows) != (self.cols, self.rows):
            self.cols, self.rows = cols, rows
            self.screen.resize(rows, cols)
            if self.master is not None:
                fcntl.ioctl(self.master, termios.TIOCSWINSZ,
                            struct.pack("HHHH", rows, cols, cols * CELL_W, rows * CELL_H))
        self.fb.pixels[:self.fb.height, :self.fb.width] = DEFAULT_BG
        self._drawn = [[None] * self.cols for _ in range(self.rows)]
        self._cursor = None
        self.screen.dirty.update(range(self.rows))
        self.render(damage=False)
        self.fb.damage(0, 0, self.fb.width, self.fb.height)

    def close(self) -> None:
        """Stop the shell (SIGHUP via the pty closing, then SIGTERM/SIGKILL if needed)."""
        self.closed = True
        if self.master is not None:
            os.close(self.master)
            self.master = None
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
