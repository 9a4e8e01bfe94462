"""keymap: numbers are checked against the system headers, the US layout against xkb.

* Linux keycodes: ``/usr/include/linux/input-event-codes.h`` parsed now (aliases resolved).
* Keysym values: ``/usr/include/X11/keysymdef.h`` (x11proto-dev).
* Keysym -> (key, shift): an independent oracle, the US layout compiled by ``xkbcomp`` from
  xkb-data (evdev keycode - 8 = Linux keycode; level 1 = unshifted, level 2 = shift).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dmore_nova.xen.io import keymap
from dmore_nova.xen.io.keymap import keysym_to_linux, xt_to_linux

INPUT_CODES = Path("/usr/include/linux/input-event-codes.h")
KEYSYMDEF = Path("/usr/include/X11/keysymdef.h")


def _parse_input_codes() -> dict[str, int]:
    raw = {}
    for m in re.finditer(r"^#define\s+((?:KEY|BTN)_\w+)\s+(\w+)", INPUT_CODES.read_text(), re.M):
        raw[m.group(1)] = m.group(2)
    out: dict[str, int] = {}

    def resolve(name: str, depth: int = 0) -> int | None:
        val = raw.get(name)
        if val is None or depth > 8:
            return None
        if re.fullmatch(r"0x[0-9a-fA-F]+|\d+", val):
            return int(val, 0)
        return resolve(val, depth + 1)

    for name in raw:
        v = resolve(name)
        if v is not None:
            out[name] = v
    return out


CODES = _parse_input_codes()


def _parse_keysyms() -> dict[str, int]:
    text = KEYSYMDEF.read_text()
    return {
        m.group(1): int(m.group(2), 16)
        for m in re.finditer(r"^#define\s+XK_(\w+)\s+0x([0-9a-fA-F]+)", text, re.M)
    }


needs_keysymdef = pytest.mark.skipif(
    not KEYSYMDEF.exists(), reason="keysymdef.h missing (apt-get install x11proto-dev)"
)


# --- numbers against the headers ---------------------------------------------------------------
def test_header_parse_sane():
    assert CODES["KEY_A"] == 30 and CODES["BTN_LEFT"] == 0x110
    assert CODES["KEY_HANGUEL"] == CODES["KEY_HANGEUL"]  # alias resolution works
    assert len(CODES) > 500


def test_every_linux_keycode_matches_input_event_codes_h():
    wrong = {n: (v, CODES.get(n)) for n, v in keymap.LINUX_KEYCODES.items() if CODES.get(n) != v}
    assert not wrong, f"(ours, header): {wrong}"
    assert len(keymap.LINUX_KEYCODES) > 150


def test_mouse_buttons():
    assert (keymap.BTN_LEFT, keymap.BTN_RIGHT, keymap.BTN_MIDDLE) == (
        CODES["BTN_LEFT"], CODES["BTN_RIGHT"], CODES["BTN_MIDDLE"],
    )
    # RFB bit 1 is middle, bit 2 right (rfbproto PointerEvent).
    assert keymap.RFB_BUTTON_TO_LINUX[0] == CODES["BTN_LEFT"]
    assert keymap.RFB_BUTTON_TO_LINUX[1] == CODES["BTN_MIDDLE"]
    assert keymap.RFB_BUTTON_TO_LINUX[2] == CODES["BTN_RIGHT"]


@needs_keysymdef
def test_every_keysym_value_matches_keysymdef_h():
    xk = _parse_keysyms()
    wrong = {n: (v, xk.get(n)) for n, v in keymap.KEYSYMS.items() if xk.get(n) != v}
    assert not wrong, f"(ours, keysymdef.h): {wrong}"
    assert len(keymap.KEYSYMS) > 170


# --- keysym semantics (expected values looked up in the headers by name) -----------------------
def ks(name: str) -> int:
    return keymap.KEYSYMS[name]


@pytest.mark.parametrize(
    ("xk", "key", "shift"),
    [
        ("a", "KEY_A", False), ("A", "KEY_A", True), ("z", "KEY_Z", False), ("Q", "KEY_Q", True),
        ("1", "KEY_1", False), ("exclam", "KEY_1", True), ("0", "KEY_0", False),
        ("parenright", "KEY_0", True), ("at", "KEY_2", True), ("asciicircum", "KEY_6", True),
        ("minus", "KEY_MINUS", False), ("underscore", "KEY_MINUS", True),
        ("plus", "KEY_EQUAL", True), ("braceleft", "KEY_LEFTBRACE", True),
        ("bar", "KEY_BACKSLASH", True), ("colon", "KEY_SEMICOLON", True),
        ("quotedbl", "KEY_APOSTROPHE", True), ("asciitilde", "KEY_GRAVE", True),
        ("less", "KEY_COMMA", True), ("period", "KEY_DOT", False),
        ("question", "KEY_SLASH", True), ("space", "KEY_SPACE", False),
        ("Return", "KEY_ENTER", False), ("BackSpace", "KEY_BACKSPACE", False),
        ("Tab", "KEY_TAB", False), ("ISO_Left_Tab", "KEY_TAB", True),
        ("Escape", "KEY_ESC", False), ("Delete", "KEY_DELETE", False),
        ("Insert", "KEY_INSERT", False), ("Home", "KEY_HOME", False), ("End", "KEY_END", False),
        ("Page_Up", "KEY_PAGEUP", False), ("Prior", "KEY_PAGEUP", False),
        ("Page_Down", "KEY_PAGEDOWN", False), ("Left", "KEY_LEFT", False),
        ("Up", "KEY_UP", False), ("Right", "KEY_RIGHT", False), ("Down", "KEY_DOWN", False),
        ("Shift_L", "KEY_LEFTSHIFT", False), ("Shift_R", "KEY_RIGHTSHIFT", False),
        ("Control_L", "KEY_LEFTCTRL", False), ("Control_R", "KEY_RIGHTCTRL", False),
        ("Alt_L", "KEY_LEFTALT", False), ("Alt_R", "KEY_RIGHTALT", False),
        ("Meta_L", "KEY_LEFTMETA", False), ("Super_R", "KEY_RIGHTMETA", False),
        ("ISO_Level3_Shift", "KEY_RIGHTALT", False), ("Caps_Lock", "KEY_CAPSLOCK", False),
        ("Num_Lock", "KEY_NUMLOCK", False), ("Scroll_Lock", "KEY_SCROLLLOCK", False),
        ("Print", "KEY_SYSRQ", False), ("Pause", "KEY_PAUSE", False),
        ("Menu", "KEY_COMPOSE", False), ("KP_0", "KEY_KP0", False), ("KP_9", "KEY_KP9", False),
        ("KP_Enter", "KEY_KPENTER", False), ("KP_Add", "KEY_KPPLUS", False),
        ("KP_Subtract", "KEY_KPMINUS", False), ("KP_Multiply", "KEY_KPASTERISK", False),
        ("KP_Divide", "KEY_KPSLASH", False), ("KP_Decimal", "KEY_KPDOT", False),
        ("KP_Home", "KEY_KP7", False),
    ],
)
def test_keysym_samples(xk, key, shift):
    assert keysym_to_linux(ks(xk)) == (CODES[key], shift)


def test_function_keys_f1_to_f24():
    for n in range(1, 25):
        assert keysym_to_linux(ks(f"F{n}")) == (CODES[f"KEY_F{n}"], False)
    # F1..F24 keysyms are consecutive, their Linux codes are not: the table is not an offset.
    assert CODES["KEY_F13"] - CODES["KEY_F12"] != 1


def test_letters_both_cases_all():
    for c in "abcdefghijklmnopqrstuvwxyz":
        assert keysym_to_linux(ord(c)) == (CODES[f"KEY_{c.upper()}"], False)
        assert keysym_to_linux(ord(c.upper())) == (CODES[f"KEY_{c.upper()}"], True)


def test_unknown_and_unicode_keysyms():
    assert keysym_to_linux(0x00E9) is None  # eacute: no key on a US layout
    assert keysym_to_linux(0) is None
    assert keysym_to_linux(-1) is None
    assert keysym_to_linux(0x1000041) == (CODES["KEY_A"], True)  # U+0041 'A'
    assert keysym_to_linux(0x1000021) == (CODES["KEY_1"], True)  # U+0021 '!'
    assert keysym_to_linux(0x10000E9) is None


# --- independent oracle: xkb's US layout ----------------------------------------------------
# Deliberate differences from xkb's pc+us symbols, each for a stated reason:
XKB_EXCEPTIONS = {
    # xkb puts Meta on level 2 of the Alt keys; QEMU/keycodemapdb map Meta_* to KEY_*META.
    "Meta_L", "Meta_R",
    # xkb produces these on <LVL3> (a virtual key) / as Ctrl/Alt levels of Pause/PrtSc.
    "ISO_Level3_Shift", "Break", "Sys_Req",
}
# The keypad type is KEYPAD (level 2 = NumLock), not shift: compare keycodes only.
KEYPAD_PREFIX = "KP_"


def _xkb_us() -> tuple[dict[str, set[tuple[int, int]]], dict[str, int]]:
    src = (
        "xkb_keymap {\n"
        '  xkb_keycodes { include "evdev+aliases(qwerty)" };\n'
        '  xkb_types { include "complete" };\n'
        '  xkb_compat { include "complete" };\n'
        '  xkb_symbols { include "pc+us+inet(evdev)" };\n'
        "};\n"
    )
    res = subprocess.run(
        ["xkbcomp", "-w", "0", "-xkb", "-", "-o", "-"],
        input=src, capture_output=True, text=True, timeout=60, check=True,
    )
    text = res.stdout
    keycodes = {m.group(1): int(m.group(2)) for m in re.finditer(r"<(\w+)>\s*=\s*(\d+);", text)}
    syms: dict[str, set[tuple[int, int]]] = {}
    for m in re.finditer(r"key\s+<(\w+)>\s*\{(.*?)\};", text, re.S):
        name, body = m.group(1), m.group(2)
        grp = re.search(r"symbols\[Group1\]\s*=\s*\[([^\]]*)\]", body) or re.search(
            r"\[([^\]]*)\]", body
        )
        if not grp or name not in keycodes:
            continue
        for level, sym in enumerate(s.strip() for s in grp.group(1).split(",")):
            syms.setdefault(sym, set()).add((keycodes[name] - 8, level + 1))
    return syms, keycodes


@needs_keysymdef
@pytest.mark.skipif(
    shutil.which("xkbcomp") is None or not Path("/usr/share/X11/xkb/symbols/us").exists(),
    reason="needs xkbcomp and xkb-data",
)
def test_keysym_map_agrees_with_xkb_us_layout():
    by_name, keycodes = _xkb_us()
    assert len(by_name) > 100  # the oracle parsed
    # Compare by keysym *value*: xkb spells 0xff55 "Prior" where we also accept "Page_Up".
    xk_values = _parse_keysyms()
    syms: dict[int, set[tuple[int, int]]] = {}
    for name, places in by_name.items():
        if name in xk_values:
            syms.setdefault(xk_values[name], set()).update(places)
    mismatches = []
    checked = 0
    for xk, value in keymap.KEYSYMS.items():
        code, shift = keysym_to_linux(value)
        if xk in XKB_EXCEPTIONS:
            continue
        if re.fullmatch(r"F\d+", xk):
            # F13+ carry XF86 keysyms in inet(evdev); the key *positions* are still <FKnn>.
            got = keycodes[f"FK{int(xk[1:]):02d}"] - 8
            if got != code:
                mismatches.append((xk, code, got))
            checked += 1
            continue
        options = syms.get(value, set())
        if xk.startswith(KEYPAD_PREFIX):
            ok = any(c == code for c, _ in options)
        else:
            ok = (code, 2 if shift else 1) in options
        if not ok:
            mismatches.append((xk, (code, shift), sorted(options)))
        checked += 1
    assert not mismatches, mismatches
    assert checked > 160


# --- XT scancodes ------------------------------------------------------------------------------
def test_xt_plain_codes_equal_linux_keycodes():
    """For set-1 make codes 0x01..0x53 the Linux keycode *is* the scancode (atkbd's design)."""
    for code in range(0x01, 0x54):
        assert xt_to_linux(code) == code


@pytest.mark.parametrize(
    ("code", "key"),
    [
        (0x1C, "KEY_ENTER"), (0x1D, "KEY_LEFTCTRL"), (0x2A, "KEY_LEFTSHIFT"),
        (0x36, "KEY_RIGHTSHIFT"), (0x38, "KEY_LEFTALT"), (0x39, "KEY_SPACE"),
        (0x3B, "KEY_F1"), (0x44, "KEY_F10"), (0x57, "KEY_F11"), (0x58, "KEY_F12"),
        (0x56, "KEY_102ND"), (0x54, "KEY_SYSRQ"),
        # E0-prefixed, encoded 0x80|code as in QEMU's extended key event
        (0x80 | 0x1C, "KEY_KPENTER"), (0x80 | 0x1D, "KEY_RIGHTCTRL"),
        (0x80 | 0x35, "KEY_KPSLASH"), (0x80 | 0x37, "KEY_SYSRQ"), (0x80 | 0x38, "KEY_RIGHTALT"),
        (0x80 | 0x47, "KEY_HOME"), (0x80 | 0x48, "KEY_UP"), (0x80 | 0x49, "KEY_PAGEUP"),
        (0x80 | 0x4B, "KEY_LEFT"), (0x80 | 0x4D, "KEY_RIGHT"), (0x80 | 0x4F, "KEY_END"),
        (0x80 | 0x50, "KEY_DOWN"), (0x80 | 0x51, "KEY_PAGEDOWN"), (0x80 | 0x52, "KEY_INSERT"),
        (0x80 | 0x53, "KEY_DELETE"), (0x80 | 0x5B, "KEY_LEFTMETA"),
        (0x80 | 0x5C, "KEY_RIGHTMETA"), (0x80 | 0x5D, "KEY_COMPOSE"),
        (0x80 | 0x46, "KEY_PAUSE"),
    ],
)
def test_xt_samples(code, key):
    assert xt_to_linux(code) == CODES[key]


def test_xt_e0_prefixed_form_and_rejects():
    assert xt_to_linux(0xE048) == CODES["KEY_UP"]  # unconverted noVNC-style code
    assert xt_to_linux(0xE01C) == CODES["KEY_KPENTER"]
    assert xt_to_linux(0xAA) is None and xt_to_linux(0xB6) is None  # fake shifts
    assert xt_to_linux(0x00) is None  # no key
    assert xt_to_linux(0x55) is None  # hole in the table
    for bad in (-1, 0x100, 0xE080, 0xE1_1D, 2**32):
        assert xt_to_linux(bad) is None


def test_xt_table_targets_are_real_keys():
    names = {v: n for n, v in CODES.items() if n.startswith("KEY_")}
    for code, linux in keymap.XT_TO_LINUX.items():
        assert 0 < code <= 0xFF
        assert linux in names, (hex(code), linux)
