"""Keyboard mapping for vkbd: X11 keysyms and XT scancodes -> Linux input keycodes.

vkbd carries Linux ``KEY_*``/``BTN_*`` codes (``linux/input-event-codes.h``), while an RFB
client sends either an X11 keysym (KeyEvent) or, with the QEMU Extended Key Event, the keysym
*plus* a PC XT (set 1) scancode.  The scancode is layout-independent and is what QEMU's own
backend uses, so prefer :func:`xt_to_linux` when the client sends one and fall back to
:func:`keysym_to_linux` (US layout) otherwise.

XT encoding: plain set-1 make codes ``0x01..0x7f``; ``E0``-prefixed codes as ``0x80 | code``
exactly as in QEMU's extended key event (noVNC converts its ``0xe0XX`` codes the same way;
:func:`xt_to_linux` also accepts ``0xe0XX``).  The table is QEMU's ``scancode2linux[]``
(``hw/display/xenfb.c`` @003f8db, generated there from Linux's ``atkbd_set2_keycode`` and
``atkbd_unxlate_table``); its two 255 entries (``E0 2A``/``E0 36``, the "fake shift" bytes a
PC keyboard sends around some E0 keys) are ignored, as atkbd ignores them.

Every number below is copied from the headers; ``tests/unit/test_keymap.py`` re-parses
``/usr/include/linux/input-event-codes.h`` and ``/usr/include/X11/keysymdef.h`` at test time and
fails on any drift.
"""

from __future__ import annotations

import string

__all__ = [
    "BTN_LEFT",
    "BTN_MIDDLE",
    "BTN_RIGHT",
    "KEYSYMS",
    "KEYSYM_MAP",
    "LINUX_KEYCODES",
    "RFB_BUTTON_TO_LINUX",
    "XT_IGNORED",
    "XT_TO_LINUX",
    "keysym_to_linux",
    "xt_to_linux",
]

#: The Linux keycodes this module produces, by their input-event-codes.h name.
LINUX_KEYCODES: dict[str, int] = {
    "KEY_ESC": 1, "KEY_1": 2, "KEY_2": 3, "KEY_3": 4, "KEY_4": 5, "KEY_5": 6, "KEY_6": 7,
    "KEY_7": 8, "KEY_8": 9, "KEY_9": 10, "KEY_0": 11, "KEY_MINUS": 12, "KEY_EQUAL": 13,
    "KEY_BACKSPACE": 14, "KEY_TAB": 15, "KEY_Q": 16, "KEY_W": 17, "KEY_E": 18, "KEY_R": 19,
    "KEY_T": 20, "KEY_Y": 21, "KEY_U": 22, "KEY_I": 23, "KEY_O": 24, "KEY_P": 25,
    "KEY_LEFTBRACE": 26, "KEY_RIGHTBRACE": 27, "KEY_ENTER": 28, "KEY_LEFTCTRL": 29, "KEY_A": 30,
    "KEY_S": 31, "KEY_D": 32, "KEY_F": 33, "KEY_G": 34, "KEY_H": 35, "KEY_J": 36, "KEY_K": 37,
    "KEY_L": 38, "KEY_SEMICOLON": 39, "KEY_APOSTROPHE": 40, "KEY_GRAVE": 41, "KEY_LEFTSHIFT": 42,
    "KEY_BACKSLASH": 43, "KEY_Z": 44, "KEY_X": 45, "KEY_C": 46, "KEY_V": 47, "KEY_B": 48,
    "KEY_N": 49, "KEY_M": 50, "KEY_COMMA": 51, "KEY_DOT": 52, "KEY_SLASH": 53,
    "KEY_RIGHTSHIFT": 54, "KEY_KPASTERISK": 55, "KEY_LEFTALT": 56, "KEY_SPACE": 57,
    "KEY_CAPSLOCK": 58, "KEY_F1": 59, "KEY_F2": 60, "KEY_F3": 61, "KEY_F4": 62, "KEY_F5": 63,
    "KEY_F6": 64, "KEY_F7": 65, "KEY_F8": 66, "KEY_F9": 67, "KEY_F10": 68, "KEY_NUMLOCK": 69,
    "KEY_SCROLLLOCK": 70, "KEY_KP7": 71, "KEY_KP8": 72, "KEY_KP9": 73, "KEY_KPMINUS": 74,
    "KEY_KP4": 75, "KEY_KP5": 76, "KEY_KP6": 77, "KEY_KPPLUS": 78, "KEY_KP1": 79, "KEY_KP2": 80,
    "KEY_KP3": 81, "KEY_KP0": 82, "KEY_KPDOT": 83, "KEY_ZENKAKUHANKAKU": 85, "KEY_102ND": 86,
    "KEY_F11": 87, "KEY_F12": 88, "KEY_RO": 89, "KEY_KATAKANA": 90, "KEY_HIRAGANA": 91,
    "KEY_HENKAN": 92, "KEY_KATAKANAHIRAGANA": 93, "KEY_MUHENKAN": 94, "KEY_KPJPCOMMA": 95,
    "KEY_KPENTER": 96, "KEY_RIGHTCTRL": 97, "KEY_KPSLASH": 98, "KEY_SYSRQ": 99,
    "KEY_RIGHTALT": 100, "KEY_HOME": 102, "KEY_UP": 103, "KEY_PAGEUP": 104, "KEY_LEFT": 105,
    "KEY_RIGHT": 106, "KEY_END": 107, "KEY_DOWN": 108, "KEY_PAGEDOWN": 109, "KEY_INSERT": 110,
    "KEY_DELETE": 111, "KEY_MACRO": 112, "KEY_MUTE": 113, "KEY_VOLUMEDOWN": 114,
    "KEY_VOLUMEUP": 115, "KEY_POWER": 116, "KEY_KPEQUAL": 117, "KEY_KPPLUSMINUS": 118,
    "KEY_PAUSE": 119, "KEY_KPCOMMA": 121, "KEY_YEN": 124, "KEY_LEFTMETA": 125,
    "KEY_RIGHTMETA": 126, "KEY_COMPOSE": 127, "KEY_STOP": 128, "KEY_CALC": 140, "KEY_SLEEP": 142,
    "KEY_WAKEUP": 143, "KEY_WWW": 150, "KEY_MAIL": 155, "KEY_BOOKMARKS": 156, "KEY_COMPUTER": 157,
    "KEY_BACK": 158, "KEY_FORWARD": 159, "KEY_NEXTSONG": 163, "KEY_PLAYPAUSE": 164,
    "KEY_PREVIOUSSONG": 165, "KEY_STOPCD": 166, "KEY_REFRESH": 173, "KEY_F13": 183, "KEY_F14": 184,
    "KEY_F15": 185, "KEY_F16": 186, "KEY_F17": 187, "KEY_F18": 188, "KEY_F19": 189, "KEY_F20": 190,
    "KEY_F21": 191, "KEY_F22": 192, "KEY_F23": 193, "KEY_F24": 194, "KEY_SEARCH": 217,
    "KEY_MEDIA": 226,
}

# Mouse buttons are sent as KEY events with these codes (QEMU: ``BTN_LEFT + i``).
BTN_LEFT = 0x110
BTN_RIGHT = 0x111
BTN_MIDDLE = 0x112
BTN_SIDE = 0x113
BTN_EXTRA = 0x114
LINUX_KEYCODES.update(
    BTN_LEFT=BTN_LEFT, BTN_RIGHT=BTN_RIGHT, BTN_MIDDLE=BTN_MIDDLE, BTN_SIDE=BTN_SIDE,
    BTN_EXTRA=BTN_EXTRA,
)

#: RFB PointerEvent button-mask bit -> Linux button.  Note RFB's bit 1 is the *middle* button
#: and bit 2 the right one (rfbproto); bits 3/4 (wheel up/down) are not keys, they go into
#: ``rel_z``.  Bits 7/8 (ExtendedMouseButtons back/forward) map to the side/extra buttons.
RFB_BUTTON_TO_LINUX: dict[int, int] = {
    0: BTN_LEFT, 1: BTN_MIDDLE, 2: BTN_RIGHT, 7: BTN_SIDE, 8: BTN_EXTRA,
}

KEY_LEFTSHIFT = LINUX_KEYCODES["KEY_LEFTSHIFT"]
KEY_RIGHTSHIFT = LINUX_KEYCODES["KEY_RIGHTSHIFT"]

# --- X11 keysyms ------------------------------------------------------------------------------
#: ``XK_<name>`` -> value, for every keysym this module maps (values from keysymdef.h).
KEYSYMS: dict[str, int] = {}
#: keysym value -> (Linux keycode name, needs_shift) -- the US layout.
_KEYSYM_TO_NAME: dict[int, tuple[str, bool]] = {}


def _add(xk: str, value: int, key: str, shift: bool = False) -> None:
    if xk in KEYSYMS and KEYSYMS[xk] != value:
        raise ValueError(f"XK_{xk} declared twice with different values")
    if value in _KEYSYM_TO_NAME and _KEYSYM_TO_NAME[value] != (key, shift):
        raise ValueError(f"keysym {value:#x} mapped twice ({xk})")
    if key not in LINUX_KEYCODES:
        raise ValueError(f"{key} not in LINUX_KEYCODES")
    KEYSYMS[xk] = value
    _KEYSYM_TO_NAME[value] = (key, shift)


# Letters: lower case unshifted, upper case needs shift.
for _c in string.ascii_lowercase:
    _add(_c, ord(_c), f"KEY_{_c.upper()}")
    _add(_c.upper(), ord(_c.upper()), f"KEY_{_c.upper()}", True)

# Digits and the symbols on them (US).
for _d, _sym, _name in zip(
    "1234567890",
    "!@#$%^&*()",
    ("exclam", "at", "numbersign", "dollar", "percent", "asciicircum", "ampersand",
     "asterisk", "parenleft", "parenright"),
):
    _add(_d, ord(_d), f"KEY_{_d}")
    _add(_name, ord(_sym), f"KEY_{_d}", True)

# Punctuation: (unshifted name, char, shifted name, char, key).
for _n1, _c1, _n2, _c2, _key in (
    ("minus", "-", "underscore", "_", "KEY_MINUS"),
    ("equal", "=", "plus", "+", "KEY_EQUAL"),
    ("bracketleft", "[", "braceleft", "{", "KEY_LEFTBRACE"),
    ("bracketright", "]", "braceright", "}", "KEY_RIGHTBRACE"),
    ("backslash", "\\", "bar", "|", "KEY_BACKSLASH"),
    ("semicolon", ";", "colon", ":", "KEY_SEMICOLON"),
    ("apostrophe", "'", "quotedbl", '"', "KEY_APOSTROPHE"),
    ("grave", "`", "asciitilde", "~", "KEY_GRAVE"),
    ("comma", ",", "less", "<", "KEY_COMMA"),
    ("period", ".", "greater", ">", "KEY_DOT"),
    ("slash", "/", "question", "?", "KEY_SLASH"),
):
    _add(_n1, ord(_c1), _key)
    _add(_n2, ord(_c2), _key, True)
_add("space", 0x20, "KEY_SPACE")

# TTY function keys, cursor control, misc.
for _xk, _val, _key in (
    ("BackSpace", 0xFF08, "KEY_BACKSPACE"),
    ("Tab", 0xFF09, "KEY_TAB"),
    ("Return", 0xFF0D, "KEY_ENTER"),
    ("Pause", 0xFF13, "KEY_PAUSE"),
    ("Scroll_Lock", 0xFF14, "KEY_SCROLLLOCK"),
    ("Sys_Req", 0xFF15, "KEY_SYSRQ"),
    ("Escape", 0xFF1B, "KEY_ESC"),
    ("Delete", 0xFFFF, "KEY_DELETE"),
    ("Home", 0xFF50, "KEY_HOME"),
    ("Left", 0xFF51, "KEY_LEFT"),
    ("Up", 0xFF52, "KEY_UP"),
    ("Right", 0xFF53, "KEY_RIGHT"),
    ("Down", 0xFF54, "KEY_DOWN"),
    ("Prior", 0xFF55, "KEY_PAGEUP"),
    ("Page_Up", 0xFF55, "KEY_PAGEUP"),
    ("Next", 0xFF56, "KEY_PAGEDOWN"),
    ("Page_Down", 0xFF56, "KEY_PAGEDOWN"),
    ("End", 0xFF57, "KEY_END"),
    # PrintScreen is KEY_SYSRQ on a PC keyboard (atkbd maps E0 37 to it; X's evdev rules
    # turn that keycode back into Print).
    ("Print", 0xFF61, "KEY_SYSRQ"),
    ("Insert", 0xFF63, "KEY_INSERT"),
    # The PC "Menu"/application key is KEY_COMPOSE (atkbd E0 5D).
    ("Menu", 0xFF67, "KEY_COMPOSE"),
    ("Break", 0xFF6B, "KEY_PAUSE"),
    ("Num_Lock", 0xFF7F, "KEY_NUMLOCK"),
    ("Caps_Lock", 0xFFE5, "KEY_CAPSLOCK"),
    # Modifiers.
    ("Shift_L", 0xFFE1, "KEY_LEFTSHIFT"),
    ("Shift_R", 0xFFE2, "KEY_RIGHTSHIFT"),
    ("Control_L", 0xFFE3, "KEY_LEFTCTRL"),
    ("Control_R", 0xFFE4, "KEY_RIGHTCTRL"),
    ("Meta_L", 0xFFE7, "KEY_LEFTMETA"),
    ("Meta_R", 0xFFE8, "KEY_RIGHTMETA"),
    ("Alt_L", 0xFFE9, "KEY_LEFTALT"),
    ("Alt_R", 0xFFEA, "KEY_RIGHTALT"),
    ("Super_L", 0xFFEB, "KEY_LEFTMETA"),
    ("Super_R", 0xFFEC, "KEY_RIGHTMETA"),
    # AltGr as X and noVNC report it.
    ("ISO_Level3_Shift", 0xFE03, "KEY_RIGHTALT"),
    # Keypad, NumLock on.
    ("KP_Enter", 0xFF8D, "KEY_KPENTER"),
    ("KP_Multiply", 0xFFAA, "KEY_KPASTERISK"),
    ("KP_Add", 0xFFAB, "KEY_KPPLUS"),
    ("KP_Subtract", 0xFFAD, "KEY_KPMINUS"),
    ("KP_Decimal", 0xFFAE, "KEY_KPDOT"),
    ("KP_Divide", 0xFFAF, "KEY_KPSLASH"),
    ("KP_Equal", 0xFFBD, "KEY_KPEQUAL"),
    ("KP_0", 0xFFB0, "KEY_KP0"),
    ("KP_1", 0xFFB1, "KEY_KP1"),
    ("KP_2", 0xFFB2, "KEY_KP2"),
    ("KP_3", 0xFFB3, "KEY_KP3"),
    ("KP_4", 0xFFB4, "KEY_KP4"),
    ("KP_5", 0xFFB5, "KEY_KP5"),
    ("KP_6", 0xFFB6, "KEY_KP6"),
    ("KP_7", 0xFFB7, "KEY_KP7"),
    ("KP_8", 0xFFB8, "KEY_KP8"),
    ("KP_9", 0xFFB9, "KEY_KP9"),
    # Keypad, NumLock off: same physical keys (QEMU's en-us keymap does the same).
    ("KP_Home", 0xFF95, "KEY_KP7"),
    ("KP_Left", 0xFF96, "KEY_KP4"),
    ("KP_Up", 0xFF97, "KEY_KP8"),
    ("KP_Right", 0xFF98, "KEY_KP6"),
    ("KP_Down", 0xFF99, "KEY_KP2"),
    ("KP_Prior", 0xFF9A, "KEY_KP9"),
    ("KP_Page_Up", 0xFF9A, "KEY_KP9"),
    ("KP_Next", 0xFF9B, "KEY_KP3"),
    ("KP_Page_Down", 0xFF9B, "KEY_KP3"),
    ("KP_End", 0xFF9C, "KEY_KP1"),
    ("KP_Begin", 0xFF9D, "KEY_KP5"),
    ("KP_Insert", 0xFF9E, "KEY_KP0"),
    ("KP_Delete", 0xFF9F, "KEY_KPDOT"),
):
    _add(_xk, _val, _key)
# Shift+Tab as X reports it.
_add("ISO_Left_Tab", 0xFE20, "KEY_TAB", True)

# F1..F24 are consecutive keysyms; the Linux codes are not (F11/F12 and F13.. live apart).
for _i in range(1, 25):
    _add(f"F{_i}", 0xFFBE + _i - 1, f"KEY_F{_i}")

#: keysym -> (Linux keycode, needs_shift).
KEYSYM_MAP: dict[int, tuple[int, bool]] = {
    ks: (LINUX_KEYCODES[name], shift) for ks, (name, shift) in _KEYSYM_TO_NAME.items()
}

#: Unicode keysyms (``0x01000000 + code point``, keysymdef.h) for printable ASCII map like the
#: legacy Latin-1 keysyms; some clients send them for characters.
_UNICODE_KEYSYM_BASE = 0x01000000


def keysym_to_linux(keysym: int) -> tuple[int, bool] | None:
    """Map an X11 keysym to ``(linux_keycode, needs_shift)`` on a US layout, or ``None``.

    ``needs_shift`` says the character is the shifted level of that key (``'!'`` is KEY_1 with
    shift): a backend that only has keysyms must press shift around it if the client is not
    already holding shift.  Unknown keysyms (non-US characters, dead keys) return ``None``;
    the caller logs and drops them -- there is no key that would type them on a US guest.
    """
    hit = KEYSYM_MAP.get(keysym)
    if hit is None and _UNICODE_KEYSYM_BASE + 0x20 <= keysym <= _UNICODE_KEYSYM_BASE + 0x7E:
        hit = KEYSYM_MAP.get(keysym - _UNICODE_KEYSYM_BASE)
    return hit


# --- XT (set 1) scancodes ---------------------------------------------------------------------
#: ``scancode2linux[]`` as (XT code -> Linux name); codes absent here map to nothing.
_XT_NAMES: dict[int, str] = {
    0x01: "KEY_ESC", 0x02: "KEY_1", 0x03: "KEY_2", 0x04: "KEY_3", 0x05: "KEY_4", 0x06: "KEY_5",
    0x07: "KEY_6", 0x08: "KEY_7", 0x09: "KEY_8", 0x0A: "KEY_9", 0x0B: "KEY_0", 0x0C: "KEY_MINUS",
    0x0D: "KEY_EQUAL", 0x0E: "KEY_BACKSPACE", 0x0F: "KEY_TAB", 0x10: "KEY_Q", 0x11: "KEY_W",
    0x12: "KEY_E", 0x13: "KEY_R", 0x14: "KEY_T", 0x15: "KEY_Y", 0x16: "KEY_U", 0x17: "KEY_I",
    0x18: "KEY_O", 0x19: "KEY_P", 0x1A: "KEY_LEFTBRACE", 0x1B: "KEY_RIGHTBRACE", 0x1C: "KEY_ENTER",
    0x1D: "KEY_LEFTCTRL", 0x1E: "KEY_A", 0x1F: "KEY_S", 0x20: "KEY_D", 0x21: "KEY_F",
    0x22: "KEY_G", 0x23: "KEY_H", 0x24: "KEY_J", 0x25: "KEY_K", 0x26: "KEY_L",
    0x27: "KEY_SEMICOLON", 0x28: "KEY_APOSTROPHE", 0x29: "KEY_GRAVE", 0x2A: "KEY_LEFTSHIFT",
    0x2B: "KEY_BACKSLASH", 0x2C: "KEY_Z", 0x2D: "KEY_X", 0x2E: "KEY_C", 0x2F: "KEY_V",
    0x30: "KEY_B", 0x31: "KEY_N", 0x32: "KEY_M", 0x33: "KEY_COMMA", 0x34: "KEY_DOT",
    0x35: "KEY_SLASH", 0x36: "KEY_RIGHTSHIFT", 0x37: "KEY_KPASTERISK", 0x38: "KEY_LEFTALT",
    0x39: "KEY_SPACE", 0x3A: "KEY_CAPSLOCK", 0x3B: "KEY_F1", 0x3C: "KEY_F2", 0x3D: "KEY_F3",
    0x3E: "KEY_F4", 0x3F: "KEY_F5", 0x40: "KEY_F6", 0x41: "KEY_F7", 0x42: "KEY_F8", 0x43: "KEY_F9",
    0x44: "KEY_F10", 0x45: "KEY_NUMLOCK", 0x46: "KEY_SCROLLLOCK", 0x47: "KEY_KP7", 0x48: "KEY_KP8",
    0x49: "KEY_KP9", 0x4A: "KEY_KPMINUS", 0x4B: "KEY_KP4", 0x4C: "KEY_KP5", 0x4D: "KEY_KP6",
    0x4E: "KEY_KPPLUS", 0x4F: "KEY_KP1", 0x50: "KEY_KP2", 0x51: "KEY_KP3", 0x52: "KEY_KP0",
    0x53: "KEY_KPDOT", 0x54: "KEY_SYSRQ", 0x56: "KEY_102ND", 0x57: "KEY_F11", 0x58: "KEY_F12",
    0x59: "KEY_KPEQUAL", 0x5C: "KEY_KPJPCOMMA", 0x5D: "KEY_F13", 0x5E: "KEY_F14", 0x5F: "KEY_F15",
    0x70: "KEY_KATAKANAHIRAGANA", 0x73: "KEY_RO", 0x76: "KEY_ZENKAKUHANKAKU", 0x77: "KEY_HIRAGANA",
    0x78: "KEY_KATAKANA", 0x79: "KEY_HENKAN", 0x7B: "KEY_MUHENKAN", 0x7D: "KEY_YEN",
    0x7E: "KEY_KPCOMMA", 0x90: "KEY_PREVIOUSSONG", 0x99: "KEY_NEXTSONG", 0x9C: "KEY_KPENTER",
    0x9D: "KEY_RIGHTCTRL", 0xA0: "KEY_MUTE", 0xA1: "KEY_CALC", 0xA2: "KEY_PLAYPAUSE",
    0xA4: "KEY_STOPCD", 0xAE: "KEY_VOLUMEDOWN", 0xB0: "KEY_VOLUMEUP", 0xB2: "KEY_WWW",
    0xB5: "KEY_KPSLASH", 0xB7: "KEY_SYSRQ", 0xB8: "KEY_RIGHTALT", 0xC5: "KEY_PAUSE",
    0xC6: "KEY_PAUSE", 0xC7: "KEY_HOME", 0xC8: "KEY_UP", 0xC9: "KEY_PAGEUP", 0xCB: "KEY_LEFT",
    0xCC: "KEY_MACRO", 0xCD: "KEY_RIGHT", 0xCE: "KEY_KPPLUSMINUS", 0xCF: "KEY_END",
    0xD0: "KEY_DOWN", 0xD1: "KEY_PAGEDOWN", 0xD2: "KEY_INSERT", 0xD3: "KEY_DELETE",
    0xDB: "KEY_LEFTMETA", 0xDC: "KEY_RIGHTMETA", 0xDD: "KEY_COMPOSE", 0xDE: "KEY_POWER",
    0xDF: "KEY_SLEEP", 0xE3: "KEY_WAKEUP", 0xE5: "KEY_SEARCH", 0xE6: "KEY_BOOKMARKS",
    0xE7: "KEY_REFRESH", 0xE8: "KEY_STOP", 0xE9: "KEY_FORWARD", 0xEA: "KEY_BACK",
    0xEB: "KEY_COMPUTER", 0xEC: "KEY_MAIL", 0xED: "KEY_MEDIA", 0xEF: "KEY_MACRO",
}
#: ``E0 2A`` and ``E0 36``: fake shifts, 255 ("ignore") in scancode2linux.
XT_IGNORED = frozenset({0xAA, 0xB6})

#: XT code (0x00..0xff, E0 codes as ``0x80|code``) -> Linux keycode.
XT_TO_LINUX: dict[int, int] = {code: LINUX_KEYCODES[name] for code, name in _XT_NAMES.items()}


def xt_to_linux(code: int) -> int | None:
    """Map a QEMU-extended-key-event XT scancode to a Linux keycode, or ``None``.

    Accepts ``0x00..0xff`` (E0-prefixed as ``0x80|code``) and, for robustness against clients
    that do not convert, ``0xe000..0xe07f``.  Anything else -- including the fake-shift codes
    and codes without a key -- gives ``None``; the caller may then fall back to the keysym.
    """
    if 0xE000 <= code <= 0xE07F:
        code = 0x80 | (code & 0x7F)
    if not 0 <= code <= 0xFF or code in XT_IGNORED:
        return None
    return XT_TO_LINUX.get(code)
