"""Property tests: the RFB core survives any client byte stream.

Streams start from *valid* sessions (a real handshake followed by well-formed messages), are then
mutated (bit flips, byte overwrites, insertions, deletions, truncation, duplication) and fed in
random chunks.  For every stream: :meth:`receive_data` never raises and returns, the defence-in-
depth "internal error" net is never needed, and the connection's state agrees with the events it
reported.  Unmutated sessions must additionally parse identically whatever the chunking.

Streams per run: 400 valid (each also re-chunked up to 3 ways) + 1000 x 8 mutants + 1500 + 1000
random = 10,900, in well under 30 s.
"""

from __future__ import annotations

import random
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmore_nova.rm_vm.rfb import constants as C
from dmore_nova.rm_vm.rfb import events as ev
from dmore_nova.rm_vm.rfb.display import KeyInput, PointerInput, Rect
from dmore_nova.rm_vm.rfb.pixelformat import PixelFormat
from dmore_nova.rm_vm.rfb.protocol import ConnState, ServerConfig, ServerConnection
from dmore_nova.rm_vm.rfb.security import make_anon_tls_context, vnc_auth_response

WIDTH, HEIGHT = 320, 200
CHALLENGE = bytes(range(16))
PASSWORD = b"fuzzpass"
LIMITS = {"max_cut_text": 512, "max_encodings": 40, "max_screens": 4}
ANON = make_anon_tls_context()

FUZZ = settings(deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _config(types: list[int]) -> ServerConfig:
    return ServerConfig(
        security_types=types,
        vencrypt_subtypes=[C.VENCRYPT_PLAIN, C.VENCRYPT_TLSNONE],
        password=PASSWORD,
        plain_auth=lambda u, p: (u, p) == ("user", "pw"),
        tls_anon_context=ANON,
        randbytes=lambda n: CHALLENGE[:n],
        **LIMITS,
    )


ALL = _config([C.SEC_NONE, C.SEC_VNC_AUTH, C.SEC_VENCRYPT])
VNC_FIRST = _config([C.SEC_VNC_AUTH, C.SEC_VENCRYPT])

_RESPONSE = vnc_auth_response(PASSWORD, CHALLENGE)
_PLAIN = struct.pack(">II", 4, 2) + b"user" + b"pw"
#: (config, handshake bytes up to and excluding the ClientInit shared flag)
HANDSHAKES: list[tuple[ServerConfig, bytes]] = [
    (ALL, b"RFB 003.003\n"),
    (VNC_FIRST, b"RFB 003.003\n" + _RESPONSE),
    (ALL, b"RFB 003.007\n\x01"),
    (ALL, b"RFB 003.007\n\x02" + _RESPONSE),
    (ALL, b"RFB 003.008\n\x01"),
    (ALL, b"RFB 003.008\n\x02" + _RESPONSE),
    (ALL, b"RFB 003.008\n\x13\x00\x02" + struct.pack(">I", C.VENCRYPT_PLAIN) + _PLAIN),
]
#: A session that enters TLS: what follows is whatever the fuzzer sends as "TLS records".
TLS_PREFIX = (ALL, b"RFB 003.008\n\x13\x00\x02" + struct.pack(">I", C.VENCRYPT_TLSNONE))

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
#: Encodings a real client sends, plus arbitrary ones.
ENCODING = st.one_of(
    st.sampled_from([0, 1, 2, 5, 6, 7, 16, 21, -23, -32, -223, -224, -239, -247, -256, -258,
                     -261, -308, -312, -313, -314, -316, C.PSEUDO_EXTENDED_CLIPBOARD]),
    st.integers(-(1 << 31), (1 << 31) - 1))


@st.composite
def pixel_formats(draw: st.DrawFn) -> PixelFormat:
    bpp = draw(st.sampled_from([8, 16, 32]))
    bits = draw(st.integers(1, min(bpp // 3, 8)))
    mx = (1 << bits) - 1
    shifts = draw(st.permutations([0, bits, 2 * bits]))
    return PixelFormat(bpp, min(3 * bits, bpp), draw(st.booleans()), True, mx, mx, mx, *shifts)


def _msg(fmt: str, *values: object) -> bytes:
    return struct.pack(fmt, *values)


Msg = tuple[bytes, list[object]]  # wire bytes, the events they must produce


def _crop(x: int, y: int, w: int, h: int) -> Rect:
    """rfbproto 7.5.3's cropping, written independently of the core's."""
    x0, y0 = min(x, WIDTH), min(y, HEIGHT)
    return Rect(x0, y0, min(x + w, WIDTH) - x0, min(y + h, HEIGHT) - y0)


def _set_pixel_format(pf: PixelFormat) -> Msg:
    return b"\x00\x00\x00\x00" + pf.pack(), [ev.SetPixelFormat(pf)]


def _set_encodings(e: list[int]) -> Msg:
    return _msg(f">BxH{len(e)}i", 2, len(e), *e), [ev.SetEncodings(tuple(e))]


def _fbur(t: tuple[int, int, int, int, int]) -> Msg:
    return _msg(">BBHHHH", 3, *t), [ev.FramebufferUpdateRequest(t[0] != 0, _crop(*t[1:]))]


def _key(t: tuple[int, int]) -> Msg:
    return _msg(">BBxxI", 4, *t), [KeyInput(t[0] != 0, t[1], None)]


def _pointer(t: tuple[int, int, int]) -> Msg:
    mask, x, y = t
    return _msg(">BBHH", 5, *t), [PointerInput(min(x, WIDTH - 1), min(y, HEIGHT - 1), mask)]


def _cut(b: bytes) -> Msg:
    return _msg(">Bxxxi", 6, len(b)) + b, [ev.ClientCutText(b)]


def _ext_cut(b: bytes) -> Msg:
    return _msg(">Bxxxi", 6, -len(b)) + b, []  # extended clipboard: never advertised, ignored


def _fence(t: tuple[int, bytes]) -> Msg:
    return _msg(">BxxxIB", 248, t[0], len(t[1])) + t[1], []


def _desktop(t: tuple[int, int, list[tuple[int, ...]]]) -> Msg:
    w, h, screens = t
    data = _msg(">BxHHBx", 251, w, h, len(screens)) + b"".join(
        _msg(">IHHHHI", *sc) for sc in screens)
    return data, [ev.SetDesktopSize(w, h, tuple(ev.Screen(*sc) for sc in screens))]


def _qemu_key(t: tuple[int, int, int]) -> Msg:
    down, keysym, keycode = t
    return _msg(">BBHII", 255, 0, *t), [KeyInput(down != 0, keysym, keycode or None)]


def _cu(t: tuple[int, int, int, int, int]) -> Msg:
    return _msg(">BBHHHH", 150, *t), [ev.EnableContinuousUpdates(t[0] != 0, _crop(*t[1:]))]


MESSAGES = st.one_of(
    pixel_formats().map(_set_pixel_format),
    st.lists(ENCODING, max_size=LIMITS["max_encodings"]).map(_set_encodings),
    st.tuples(u8, u16, u16, u16, u16).map(_fbur),
    st.tuples(u8, u32).map(_key),
    st.tuples(u8, u16, u16).map(_pointer),
    st.binary(max_size=LIMITS["max_cut_text"]).map(_cut),
    st.binary(min_size=4, max_size=64).map(_ext_cut),
    st.tuples(u32, st.binary(max_size=C.FENCE_MAX_PAYLOAD)).map(_fence),
    st.tuples(u16, u16, st.lists(st.tuples(u32, u16, u16, u16, u16, u32),
                                 max_size=LIMITS["max_screens"])).map(_desktop),
    st.tuples(u16, u32, u32).map(_qemu_key),
)
#: EnableContinuousUpdates is only valid after the ContinuousUpdates pseudo-encoding, so such
#: sessions start with that SetEncodings and put the CU messages before any other SetEncodings.
CU_SESSION_START = _set_encodings([C.PSEUDO_CONTINUOUS_UPDATES])
CU_MESSAGE = st.tuples(u8, u16, u16, u16, u16).map(_cu)


@st.composite
def valid_sessions(draw: st.DrawFn) -> tuple[ServerConfig, bytes, list[object]]:
    """(config, bytes, the exact events the session must produce)."""
    cfg, handshake = draw(st.sampled_from(HANDSHAKES))
    msgs = draw(st.lists(MESSAGES, max_size=10))
    if draw(st.booleans()):
        msgs = [CU_SESSION_START, *draw(st.lists(CU_MESSAGE, max_size=3)), *msgs]
    shared = draw(u8)
    data = handshake + bytes([shared]) + b"".join(m for m, _ in msgs)
    expected: list[object] = [ev.ClientInit(shared != 0)]
    for _, events in msgs:
        expected += events
    return cfg, data, expected


#: Each mutated example drives this many different mutants of one valid session: generating a
#: structured session is what costs time in Hypothesis, mutating it with ``random`` is cheap.
MUTANTS_PER_SESSION = 8


def mutate(data: bytes, rng: random.Random) -> bytes:
    """1-4 random edits of the kinds that break framing: flips, boundary values, insertions,
    deletions, truncation, duplication."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.choice(("flip", "set", "insert", "delete", "truncate", "dup"))
        pos = rng.randint(0, len(buf))
        if op == "flip" and pos < len(buf):
            buf[pos] ^= 1 << rng.randint(0, 7)
        elif op == "set" and pos < len(buf):
            buf[pos] = rng.choice((0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF))
        elif op == "insert":
            buf[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == "delete":
            del buf[pos:pos + rng.randint(1, 8)]
        elif op == "truncate":
            del buf[pos:]
        elif op == "dup":
            buf[pos:pos] = buf[pos:pos + rng.randint(1, 24)]
    return bytes(buf)


def random_cuts(rng: random.Random, n: int) -> list[int]:
    return [rng.randint(0, n) for _ in range(rng.randint(0, 6))]


CHUNKS = st.lists(st.integers(0, 1 << 16), max_size=6)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:]) if b > a]


_NORMAL_EVENTS = (ev.SetPixelFormat, ev.SetEncodings, ev.FramebufferUpdateRequest, KeyInput,
                  PointerInput, ev.ClientCutText, ev.SetDesktopSize, ev.EnableContinuousUpdates)


def drive(cfg: ServerConfig, chunks: list[bytes], eof: bool) -> tuple[ServerConnection, list]:
    """Feed the chunks, checking the invariants after every call."""
    conn = ServerConnection(cfg, width=WIDTH, height=HEIGHT, name="fuzz")
    all_events: list[object] = []
    closed = False
    for chunk in [*chunks, *([b""] if eof else [])]:
        events = conn.receive_data(chunk)
        out = conn.data_to_send()
        assert isinstance(out, bytes)
        if closed:
            assert events == [], "events after ConnectionClosed"
        for i, event in enumerate(events):
            if isinstance(event, ev.ConnectionClosed):
                assert not event.reason.startswith("internal error"), event.reason
                assert i == len(events) - 1, "ConnectionClosed must be the last event"
                closed = True
            elif isinstance(event, ev.AuthFailed):
                assert isinstance(events[i + 1], ev.ConnectionClosed)
            _check_event(cfg, event)
        all_events += events
        if closed:
            assert conn.state is ConnState.CLOSED
    _check_state(conn, all_events, closed)
    return conn, all_events


def _check_event(cfg: ServerConfig, event: object) -> None:
    match event:
        case ev.FramebufferUpdateRequest(rect=r) | ev.EnableContinuousUpdates(rect=r):
            assert 0 <= r.x <= WIDTH and 0 <= r.y <= HEIGHT and r.w >= 0 and r.h >= 0
            assert r.x + r.w <= WIDTH and r.y + r.h <= HEIGHT
        case PointerInput(x=x, y=y, buttons=b):
            assert 0 <= x < WIDTH and 0 <= y < HEIGHT and 0 <= b <= 0xFF
        case ev.ClientCutText(text=t):
            assert len(t) <= cfg.max_cut_text
        case ev.SetEncodings(encodings=e):
            assert len(e) <= cfg.max_encodings
        case ev.SetDesktopSize(screens=s):
            assert len(s) <= cfg.max_screens
        case ev.SetPixelFormat(pixel_format=pf):
            pf.validate()


def _check_state(conn: ServerConnection, events: list[object], closed: bool) -> None:
    inits = [i for i, e in enumerate(events) if isinstance(e, ev.ClientInit)]
    assert len(inits) <= 1
    first_normal = next((i for i, e in enumerate(events) if isinstance(e, _NORMAL_EVENTS)), None)
    if first_normal is not None:
        assert inits and inits[0] < first_normal, "client message before the handshake ended"
    if inits:
        assert conn.version is not None and conn.security_type is not None
        assert conn.state in (ConnState.NORMAL, ConnState.CLOSED)
    elif not closed:
        assert conn.state not in (ConnState.NORMAL, ConnState.CLOSED)
    if not closed and conn.state is ConnState.CLOSED:
        raise AssertionError("CLOSED without a ConnectionClosed event")
    conn.pixel_format.validate()
    assert len(conn.encodings) <= conn.config.max_encodings
    if conn.quality is not None:
        assert 0 <= conn.quality <= 9
    if conn.compression is not None:
        assert 0 <= conn.compression <= 9
    if conn.security_type == C.SEC_VNC_AUTH and inits:
        assert conn.security_type in conn.config.security_types


@settings(FUZZ, max_examples=400)
@given(valid_sessions(), st.lists(CHUNKS, min_size=1, max_size=3))
def test_valid_sessions_parse_the_same_in_any_chunks(
        session: tuple[ServerConfig, bytes, list[object]], chunkings: list[list[int]]) -> None:
    cfg, data, expected = session
    _conn, whole = drive(cfg, [data], eof=False)
    assert whole == expected
    for cuts in chunkings:
        conn, split = drive(cfg, _split(data, cuts), eof=False)
        assert split == whole
        assert conn.state is ConnState.NORMAL


@settings(FUZZ, max_examples=1000)
@given(valid_sessions(), st.integers(0, 2**32 - 1))
def test_mutated_sessions(session: tuple[ServerConfig, bytes, list[object]], seed: int) -> None:
    cfg, data, _n = session
    rng = random.Random(seed)
    for _ in range(MUTANTS_PER_SESSION):
        mutant = mutate(data, rng)
        drive(cfg, _split(mutant, random_cuts(rng, len(mutant))), eof=rng.random() < 0.5)


@settings(FUZZ, max_examples=1500)
@given(st.sampled_from([*HANDSHAKES, TLS_PREFIX]), u8, st.binary(max_size=300), CHUNKS,
       st.booleans())
def test_random_bytes_after_handshake(handshake: tuple[ServerConfig, bytes], shared: int,
                                      tail: bytes, cuts: list[int], eof: bool) -> None:
    cfg, prefix = handshake
    drive(cfg, _split(prefix + bytes([shared]) + tail, cuts), eof)


@settings(FUZZ, max_examples=1000)
@given(st.sampled_from([b"", b"RFB 003.00", b"RFB 003.008\n", b"RFB 003.008\n\x13",
                        b"RFB 003.008\n\x13\x00\x02", b"RFB 003.003\n", b"RFB 003.008\n\x02"]),
       st.binary(max_size=200), CHUNKS, st.booleans())
def test_random_streams(prefix: bytes, tail: bytes, cuts: list[int], eof: bool) -> None:
    drive(ALL, _split(prefix + tail, cuts), eof)
