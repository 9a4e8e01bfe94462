"""The console proxy's sans-IO RFB splice, without sockets.

Backends are our own sans-IO RFB server core (``protocol.ServerConnection``) driven through the
splice's :class:`BackendHandshake`; rectangles come from the real encoders; the browser's view
is checked byte for byte (what it must receive is computed from the rectangles the test made,
never from the splice's own framing) and, for Tight, by decoding with the reference decoders.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmore_nova.console import rfb_splice as rs
from dmore_nova.console.rfb_splice import (
    Attached,
    BackendHandshake,
    ClientReady,
    Closed,
    Detached,
    HandshakeState,
    RFBSplice,
    ServerInit,
    SpliceConfig,
    filter_encodings,
)
from dmore_nova.rm_vm.rfb import constants as C
from dmore_nova.rm_vm.rfb import events as ev
from dmore_nova.rm_vm.rfb.display import KeyInput, PointerInput, Rect
from dmore_nova.rm_vm.rfb.encodings import ENC_HEXTILE, ENC_RAW, ENC_TIGHT, make_encoder
from dmore_nova.rm_vm.rfb.encodings.copyrect import copyrect_rect
from dmore_nova.rm_vm.rfb.pixelformat import NATIVE, PixelFormat
from dmore_nova.rm_vm.rfb.protocol import (
    ServerConfig,
    ServerConnection,
    ext_key_event_ack_rect,
    last_rect_rect,
)
from tests.unit.rfb_decoders import DecodeError, novnc_available, novnc_decode

PF16 = PixelFormat(16, 16, False, True, 31, 63, 31, 11, 5, 0)
NOVNC_ENCODINGS = (C.ENC_COPYRECT, C.ENC_TIGHT, C.ENC_TIGHT_PNG, C.ENC_ZRLE, C.ENC_JPEG,
                   C.ENC_HEXTILE, C.ENC_RRE, C.ENC_ZLIB, C.ENC_RAW, C.PSEUDO_DESKTOP_SIZE,
                   C.PSEUDO_LAST_RECT, C.PSEUDO_QEMU_EXTENDED_KEY_EVENT,
                   C.PSEUDO_EXTENDED_DESKTOP_SIZE, C.PSEUDO_FENCE, C.PSEUDO_CONTINUOUS_UPDATES,
                   C.PSEUDO_DESKTOP_NAME, C.PSEUDO_EXTENDED_MOUSE_BUTTONS, C.PSEUDO_CURSOR)


# -- wire helpers (the browser's messages, built here from rfbproto, not from the splice) ------

def set_encodings(encs) -> bytes:
    return struct.pack(">BxH", 2, len(encs)) + b"".join(struct.pack(">i", e) for e in encs)


def set_pixel_format(pf: PixelFormat) -> bytes:
    return b"\0\0\0\0" + pf.pack()


def fbur(incremental: bool, x: int, y: int, w: int, h: int) -> bytes:
    return struct.pack(">BBHHHH", 3, int(incremental), x, y, w, h)


def key(down: bool, keysym: int) -> bytes:
    return struct.pack(">BBxxI", 4, int(down), keysym)


def pointer(x: int, y: int, buttons: int = 0) -> bytes:
    return struct.pack(">BBHH", 5, buttons, x, y)


def fbu_header(n: int) -> bytes:
    return struct.pack(">BxH", 0, n)


def raw_rect(x: int, y: int, w: int, h: int, fill: int = 0x11, bpp: int = 4) -> bytes:
    return struct.pack(">HHHHi", x, y, w, h, 0) + bytes([fill]) * (w * h * bpp)


def random_fb(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """An image with flat areas, a few colours and noise: every encoder branch gets used."""
    fb = np.full((h, w), 0x00203040, np.uint32)
    fb[: h // 3] = rng.choice(np.array([0x00FF0000, 0x0000FF00], np.uint32), size=(h // 3, w))
    fb[h // 2:] = rng.integers(0, 1 << 24, size=(h - h // 2, w), dtype=np.uint32)
    return fb


def _exchange(conn: ServerConnection, hs: BackendHandshake) -> None:
    """One round trip (empty data would mean end-of-stream to both sides)."""
    data = conn.data_to_send()
    if data:
        hs.receive_data(data)
    data = hs.data_to_send()
    if data:
        conn.receive_data(data)


class Backend:
    """One RM endpoint: our RFB server core, handshaken by the splice's BackendHandshake."""

    def __init__(self, w: int = 64, h: int = 48, *, password: str | None = None,
                 name: str = "rm", versions=((3, 8), (3, 7), (3, 3))) -> None:
        sec = [C.SEC_VNC_AUTH] if password else [C.SEC_NONE]
        self.conn = ServerConnection(
            ServerConfig(security_types=sec, password=password.encode() if password else None,
                         versions=versions), width=w, height=h, name=name)
        self.hs = BackendHandshake(password)
        for _ in range(10):
            _exchange(self.conn, self.hs)
            if self.hs.done or self.hs.failed:
                break
        assert self.hs.done, self.hs.error
        self.events: list = []

    @property
    def init(self) -> ServerInit:
        assert self.hs.result is not None
        return self.hs.result

    def attach(self, sp: RFBSplice) -> list:
        return sp.attach(self.init, self.hs.leftover)

    def pump(self, sp: RFBSplice) -> list:
        """Deliver what the splice queued for this backend; answer with what the server core
        says by itself (capability acks, EndOfContinuousUpdates, fences)."""
        data = sp.server_output()
        sp.server_output_written(len(data))
        new = self.conn.receive_data(data) if data else []
        self.events += new
        reply = self.conn.data_to_send()
        if reply:
            sp.receive_server_data(reply)
        return new


def browser_handshake(sp: RFBSplice, version: bytes = b"RFB 003.008\n") -> bytes:
    """Drive the browser side to NORMAL; returns everything the browser received."""
    got = sp.data_to_send_client()
    assert got == b"RFB 003.008\n"
    sp.receive_client_data(version)
    out = sp.data_to_send_client()
    if version != b"RFB 003.003\n":
        assert out == b"\x01\x01"
        sp.receive_client_data(b"\x01")
        out = sp.data_to_send_client()
    events = sp.receive_client_data(b"\x01")
    assert any(isinstance(e, ClientReady) for e in events), events
    return out + sp.data_to_send_client()


def normal_session(backend: Backend | None = None, *, encodings=NOVNC_ENCODINGS,
                   config: SpliceConfig | None = None) -> tuple[RFBSplice, Backend]:
    """A splice in NORMAL with a backend attached and the browser's setup delivered."""
    sp = RFBSplice(config)
    backend = backend or Backend()
    backend.attach(sp)
    browser_handshake(sp)
    sp.receive_client_data(set_encodings(encodings) + fbur(False, 0, 0, backend.init.width,
                                                           backend.init.height))
    backend.pump(sp)
    sp.data_to_send_client()
    return sp, backend


def detach(sp: RFBSplice, reason: str = "gone") -> Detached:
    events = sp.detach(reason)
    assert len(events) == 1 and isinstance(events[0], Detached), events
    return events[0]


# -- BackendHandshake --------------------------------------------------------------------------

@pytest.mark.parametrize("version", [(3, 8), (3, 7), (3, 3)])
@pytest.mark.parametrize("password", [None, "s3cr3t"])
def test_backend_handshake_versions_and_security(version, password):
    b = Backend(320, 200, password=password, name="guest-1", versions=(version,))
    assert b.hs.version == version
    assert b.hs.security_type == (C.SEC_VNC_AUTH if password else C.SEC_NONE)
    assert b.init == ServerInit(320, 200, NATIVE, b"guest-1")
    assert b.conn.state.value == "normal" and b.conn.shared  # ClientInit: always shared


def _drive(hs: BackendHandshake, server_bytes: bytes, *, chunk: int = 0) -> None:
    if chunk:
        for i in range(0, len(server_bytes), chunk):
            hs.receive_data(server_bytes[i:i + chunk])
    else:
        hs.receive_data(server_bytes)


def test_backend_handshake_byte_by_byte_keeps_leftover():
    init = struct.pack(">HH", 100, 50) + NATIVE.pack() + struct.pack(">I", 2) + b"rm"
    after = b"\x02\x02"  # two Bells right after ServerInit
    stream = b"RFB 003.008\n" + b"\x01\x01" + b"\0\0\0\0" + init + after
    hs = BackendHandshake()
    _drive(hs, stream, chunk=1)
    assert hs.done and hs.result == ServerInit(100, 50, NATIVE, b"rm")
    assert hs.leftover == after
    assert hs.data_to_send() == b"RFB 003.008\n\x01\x01"


def test_backend_handshake_wrong_password_carries_reason():
    b_conn = ServerConnection(ServerConfig(security_types=[C.SEC_VNC_AUTH], password=b"right"),
                              width=10, height=10, name="x")
    hs = BackendHandshake("wrong")
    for _ in range(10):
        _exchange(b_conn, hs)
        if hs.failed:
            break
    assert hs.failed
    assert hs.error.startswith("VNC authentication failed: ") and "wrong password" in hs.error


@pytest.mark.parametrize("stream, needle", [
    (b"HTTP/1.1 400 Bad\r\n", "not an RFB server"),
    (b"RFB 002.000\n", "unsupported RFB protocol version 2.0"),
    (b"RFB 003.008\n\x01\x13", "server offers [19]"),  # VeNCrypt only
    (b"RFB 003.008\n\x01\x02", "no password is configured"),
    (b"RFB 003.008\n\x00\x00\x00\x00\x05busy!", "server refused the connection: busy!"),
    (b"RFB 003.003\n\x00\x00\x00\x00\x00\x00\x00\x04full", "refused the connection: full"),
    (b"RFB 003.008\n\x01\x01\x00\x00\x00\x00" + struct.pack(">HH", 1, 1)
     + PixelFormat(8, 8, False, False, 0, 0, 0, 0, 0, 0).pack() + b"\0\0\0\0",
     "pixel format not supported: colour-map"),
    (b"RFB 003.008\n\x01\x01\x00\x00\x00\x00" + struct.pack(">HH", 1, 1) + NATIVE.pack()
     + struct.pack(">I", 1 << 20), "desktop name of 1048576 bytes"),
    (b"RFB 003.008\n\x01\x01\x00\x00\x00\x01" + struct.pack(">I", 1 << 30),
     "reason of 1073741824 bytes not read"),
])
def test_backend_handshake_refusals(stream, needle):
    hs = BackendHandshake(None)
    hs.receive_data(stream)
    assert hs.failed, hs.state
    assert needle in hs.error


def test_backend_handshake_eof_midway():
    hs = BackendHandshake()
    hs.receive_data(b"RFB 003.008\n")
    hs.receive_data(b"")
    assert hs.failed and "closed the connection during the RFB handshake" in hs.error


# -- the browser's handshake -------------------------------------------------------------------

@pytest.mark.parametrize("version", [b"RFB 003.008\n", b"RFB 003.007\n", b"RFB 003.003\n",
                                     b"RFB 003.889\n"])
def test_browser_handshake_gets_backend_server_init(version):
    sp = RFBSplice()
    b = Backend(123, 45, name="dom7")
    b.attach(sp)
    out = browser_handshake(sp, version)
    if version == b"RFB 003.008\n" or version == b"RFB 003.889\n":
        assert out.startswith(b"\0\0\0\0")  # SecurityResult OK only in 3.8
        out = out[4:]
    elif version == b"RFB 003.003\n":
        assert out.startswith(struct.pack(">I", C.SEC_NONE))
        out = out[4:]
    assert out == b.init.pack()
    assert sp.client_size == (123, 45)


def test_browser_waits_for_a_backend_before_security():
    sp = RFBSplice()
    sp.data_to_send_client()
    sp.receive_client_data(b"RFB 003.008\n")
    assert sp.data_to_send_client() == b""      # nothing to offer without a backend
    events = Backend().attach(sp)
    assert isinstance(events[0], Attached) and not events[0].reattach
    assert sp.data_to_send_client() == b"\x01\x01"


def test_backend_failure_is_told_to_the_browser():
    sp = RFBSplice()
    sp.data_to_send_client()
    sp.receive_client_data(b"RFB 003.008\n")
    events = sp.close("cannot reach the console: refused")
    assert events == [Closed("cannot reach the console: refused", True, False)]
    text = b"cannot reach the console: refused"
    assert sp.data_to_send_client() == b"\x00" + struct.pack(">I", len(text)) + text


def test_browser_choosing_another_security_type_is_refused():
    sp = RFBSplice()
    Backend().attach(sp)
    sp.data_to_send_client()
    sp.receive_client_data(b"RFB 003.008\n")
    sp.data_to_send_client()
    events = sp.receive_client_data(b"\x02")
    assert isinstance(events[-1], Closed) and events[-1].by_client and events[-1].error
    out = sp.data_to_send_client()
    assert out.startswith(struct.pack(">I", 1)) and b"security type 2 was not offered" in out


def test_backend_lost_during_browser_handshake_uses_the_next_backend():
    sp = RFBSplice()
    Backend(64, 48).attach(sp)
    sp.data_to_send_client()
    sp.receive_client_data(b"RFB 003.008\n\x01")
    sp.data_to_send_client()
    detach(sp)
    assert sp.receive_client_data(b"\x01") == []  # ClientInit waits for a backend
    b2 = Backend(80, 60, name="second")
    events = b2.attach(sp)
    assert any(isinstance(e, ClientReady) for e in events)
    assert sp.data_to_send_client() == b2.init.pack()


def test_early_browser_data_is_bounded():
    sp = RFBSplice()
    sp.data_to_send_client()
    events = sp.receive_client_data(b"RFB 003.008\n" + b"x" * 5000)
    assert isinstance(events[-1], Closed) and "does not allow" in events[-1].reason


# -- forwarding --------------------------------------------------------------------------------

def _server_messages(rng: np.random.Generator, w: int = 64, h: int = 48
                     ) -> tuple[list[bytes], list[bytes]]:
    """(units, rects): a realistic backend stream cut into the units the browser must see."""
    fb = random_fb(rng, w, h)
    rects = []
    rects += make_encoder(ENC_RAW).encode(fb, Rect(0, 0, w // 3, h // 4), NATIVE)
    rects += make_encoder(ENC_HEXTILE).encode(fb, Rect(3, 5, w - 5, h - 7), NATIVE)
    rects += make_encoder(ENC_TIGHT).encode(fb, Rect(0, 0, w, h), NATIVE)
    rects.append(copyrect_rect(1, 2, Rect(10, 10, 5, 5)))
    rects.append(struct.pack(">HHHHi", 0, 0, w, h, C.PSEUDO_DESKTOP_SIZE))
    units = [fbu_header(len(rects)), *rects,
             b"\x02",                                               # Bell
             b"\x03\0\0\0" + struct.pack(">I", 5) + b"hello",        # ServerCutText
             b"\xf8\0\0\0" + struct.pack(">I", 1 << 31) + b"\x02ab",  # Fence request
             b"\x96",                                               # EndOfContinuousUpdates
             fbu_header(0)]
    return units, rects


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), cuts=st.lists(st.integers(1, 400), max_size=40))
def test_backend_stream_reaches_browser_unchanged_however_it_is_cut(seed, cuts):
    sp, b = normal_session()
    units, _ = _server_messages(np.random.default_rng(seed))
    stream = b"".join(units)
    pos = 0
    for n in cuts:
        sp.receive_server_data(stream[pos:pos + n])
        pos += n
    sp.receive_server_data(stream[pos:])
    assert sp.data_to_send_client() == stream
    assert not sp.closed


def test_cut_anywhere_shows_only_whole_units_and_pads_the_update():
    rng = np.random.default_rng(7)
    units, rects = _server_messages(rng, 32, 24)
    stream = b"".join(units)
    boundaries = np.cumsum([len(u) for u in units]).tolist()
    for cut in range(0, len(stream) + 1, 7):
        sp, b = normal_session(Backend(32, 24))
        sp.receive_server_data(stream[:cut])
        shown = sp.data_to_send_client()
        done = sum(1 for e in boundaries if e <= cut)
        assert shown == b"".join(units[:done]), cut
        d = detach(sp)
        pad = sp.data_to_send_client()
        rects_done = max(0, min(done - 1, len(rects)))
        if 1 <= done <= len(rects):  # inside the FramebufferUpdate
            assert d.padded == len(rects) - rects_done
            assert pad == struct.pack(">HHHHi", 0, 0, 0, 0, 0) * d.padded, cut
        else:
            assert d.padded == 0 and pad == b""
        assert d.dropped == cut - (boundaries[done - 1] if done else 0)


def test_lastrect_update_is_ended_with_lastrect():
    sp, b = normal_session()
    sp.receive_server_data(fbu_header(0xFFFF) + raw_rect(0, 0, 2, 2) + raw_rect(2, 2, 2, 2)[:20])
    sp.data_to_send_client()
    assert detach(sp).padded == 0xFFFF - 1
    assert sp.data_to_send_client() == last_rect_rect()


def test_oversized_unit_is_streamed_and_a_cut_inside_it_closes():
    cfg = SpliceConfig(max_held_unit=4096)
    sp, b = normal_session(config=cfg)
    big = raw_rect(0, 0, 64, 48)  # 12 KiB
    sp.receive_server_data(fbu_header(1) + big[:8000])
    assert sp.data_to_send_client() == fbu_header(1) + big[:8000]  # streamed, not held
    assert not sp.cut_is_safe
    events = sp.detach("backend died")
    assert isinstance(events[-1], Closed) and "cannot be resumed" in events[-1].reason
    # The same stream completed is forwarded whole and the cut is safe again.
    sp2, _ = normal_session(config=cfg)
    sp2.receive_server_data(fbu_header(1) + big + b"\x02")
    assert sp2.data_to_send_client() == fbu_header(1) + big + b"\x02" and sp2.cut_is_safe


@pytest.mark.parametrize("data, needle", [
    (b"\x07", "unknown server message type 7"),
    (fbu_header(1) + struct.pack(">HHHHi", 0, 0, 4, 4, C.ENC_ZRLE), "encoding 16"),
    (b"\xf8\0\0\0\0\0\0\0\x41", "Fence payload of 65 bytes"),
    (fbu_header(1) + struct.pack(">HHHHi", 0, 0, 4, 4, C.ENC_TIGHT) + b"\xb0",
     "compression control 0xb0"),
    (fbu_header(1) + struct.pack(">HHHHi", 0, 0, 16, 16, C.ENC_HEXTILE) + b"\x20",
     "Hextile subencoding 0x20"),
])
def test_backend_protocol_errors_close_with_reason(data, needle):
    sp, b = normal_session()
    events = sp.receive_server_data(data)
    assert isinstance(events[-1], Closed) and not events[-1].by_client
    assert needle in events[-1].reason


# -- browser -> backend --------------------------------------------------------------------------

def test_encoding_filter_keeps_order_and_drops_what_cannot_be_resumed():
    assert filter_encodings(NOVNC_ENCODINGS) == (
        C.ENC_COPYRECT, C.ENC_TIGHT, C.ENC_TIGHT_PNG, C.ENC_HEXTILE, C.ENC_RRE, C.ENC_RAW,
        C.PSEUDO_DESKTOP_SIZE, C.PSEUDO_LAST_RECT, C.PSEUDO_QEMU_EXTENDED_KEY_EVENT,
        C.PSEUDO_EXTENDED_DESKTOP_SIZE, C.PSEUDO_FENCE, C.PSEUDO_CONTINUOUS_UPDATES,
        C.PSEUDO_DESKTOP_NAME, C.PSEUDO_CURSOR)
    assert filter_encodings([C.ENC_RAW, C.ENC_RAW, 12345, -5]) == (C.ENC_RAW,)


def test_browser_messages_reach_the_backend_filtered():
    sp, b = normal_session()
    sp.receive_client_data(key(True, 0x61)[:3])
    assert b.pump(sp) == []  # half a message is not forwarded
    sp.receive_client_data(key(True, 0x61)[3:] + pointer(5, 6, 1) + b"\x06\0\0\0"
                           + struct.pack(">I", 3) + b"abc")
    got = b.pump(sp)
    assert got == [KeyInput(True, 0x61), PointerInput(5, 6, 1), ev.ClientCutText(b"abc")]
    encs = [e for e in b.events if isinstance(e, ev.SetEncodings)]
    assert encs[0].encodings == filter_encodings(NOVNC_ENCODINGS)


@pytest.mark.parametrize("data, needle", [
    (b"\x09", "unknown client message type 9"),
    (b"\xff\x01\0\0", "QEMU client message sub-type 1"),
    (b"\x06\0\0\0" + struct.pack(">I", (1 << 20) + 1), "ClientCutText of 1048577 bytes"),
    (b"\x02\0" + struct.pack(">H", 2000), "SetEncodings with 2000 encodings"),
    (b"\0\0\0\0" + PixelFormat(8, 8, False, False, 0, 0, 0, 0, 0, 0).pack(),
     "SetPixelFormat refused"),
    (b"\xf8\0\0\0\0\0\0\0\x50", "Fence payload of 80 bytes"),
    (b"\xfb\0\0\0\0\0\x20\0", "SetDesktopSize with 32 screens"),
])
def test_malformed_browser_input_closes_with_reason(data, needle):
    sp, b = normal_session()
    events = sp.receive_client_data(data)
    assert isinstance(events[-1], Closed) and events[-1].by_client and events[-1].error
    assert needle in events[-1].reason
    assert sp.server_output() == b""


# -- re-attach -----------------------------------------------------------------------------------

def test_reattach_replays_state_queued_input_and_asks_for_a_full_update():
    sp = RFBSplice()
    b1 = Backend(64, 48)
    b1.attach(sp)
    browser_handshake(sp)
    sp.receive_client_data(set_pixel_format(PF16) + set_encodings(NOVNC_ENCODINGS)
                           + fbur(False, 0, 0, 64, 48))
    b1.pump(sp)
    sp.data_to_send_client()
    detach(sp)
    # Typed and moved during the pause; the browser's update requests are absorbed.
    sp.receive_client_data(key(True, 0x41) + key(False, 0x41) + pointer(1, 1) + pointer(2, 2)
                           + pointer(3, 3) + pointer(4, 4, 1) + fbur(True, 0, 0, 64, 48)
                           + key(True, 0xFF0D) + pointer(5, 5, 1) + pointer(6, 6, 1))
    assert sp.pending_input == 8 + 8 + 6 + 6 + 8 + 6
    b2 = Backend(64, 48)
    events = b2.attach(sp)
    assert isinstance(events[-1], Attached) and events[-1].reattach and not events[-1].resized
    got = b2.pump(sp)
    assert got[0] == ev.SetPixelFormat(PF16)
    assert got[1] == ev.SetEncodings(filter_encodings(NOVNC_ENCODINGS))
    assert got[2:8] == [KeyInput(True, 0x41), KeyInput(False, 0x41), PointerInput(3, 3, 0),
                        PointerInput(4, 4, 1), KeyInput(True, 0xFF0D), PointerInput(6, 6, 1)]
    assert got[8] == ev.FramebufferUpdateRequest(False, Rect(0, 0, 64, 48))
    assert len(got) == 9 and sp.pending_input == 0


def test_input_written_to_the_old_backend_is_not_repeated_unwritten_is_moved():
    sp, b1 = normal_session()
    sp.receive_client_data(key(True, 1) + key(True, 2) + key(True, 3))
    sp.server_output_written(8 + 3)  # key 1 written, key 2 half written, key 3 not at all
    d = detach(sp)
    assert d.requeued == 1
    b2 = Backend()
    b2.attach(sp)
    keys = [e for e in b2.pump(sp) if isinstance(e, KeyInput)]
    assert keys == [KeyInput(True, 3)]


def test_pending_input_is_bounded_but_pointer_moves_coalesce():
    sp, b = normal_session(config=SpliceConfig(max_pending_input=64))
    detach(sp)
    for i in range(1000):
        assert sp.receive_client_data(pointer(i % 50, 1)) == []
    assert sp.pending_input == 6
    events = []
    for i in range(20):
        events += sp.receive_client_data(key(True, 0x61 + i))
    assert isinstance(events[-1], Closed) and "more than 64 bytes of input" in events[-1].reason


@pytest.mark.parametrize("advertised, expect", [
    ((C.PSEUDO_EXTENDED_DESKTOP_SIZE, C.PSEUDO_DESKTOP_SIZE), C.PSEUDO_EXTENDED_DESKTOP_SIZE),
    ((C.PSEUDO_DESKTOP_SIZE,), C.PSEUDO_DESKTOP_SIZE),
    ((), None),
])
def test_new_size_is_announced_only_in_a_way_the_browser_understands(advertised, expect):
    sp, b1 = normal_session(Backend(64, 48), encodings=(C.ENC_RAW, *advertised))
    detach(sp)
    b2 = Backend(100, 70)
    events = b2.attach(sp)
    out = sp.data_to_send_client()
    if expect is None:
        assert isinstance(events[-1], Closed) and "supports neither" in events[-1].reason
        assert out == b""
        return
    assert isinstance(events[-1], Attached) and events[-1].resized
    x, y, w, h, enc = struct.unpack_from(">HHHHi", out, 4)
    assert out[:4] == fbu_header(1) and (w, h, enc) == (100, 70, expect)
    if expect == C.PSEUDO_EXTENDED_DESKTOP_SIZE:
        assert (x, y) == (0, 0) and out[16] == 1 and len(out) == 4 + 12 + 4 + 16
    assert sp.client_size == (100, 70)
    assert b2.pump(sp)[-1] == ev.FramebufferUpdateRequest(False, Rect(0, 0, 100, 70))


def test_desktop_name_change_is_injected_when_supported():
    sp, b1 = normal_session(Backend(name="old"))
    detach(sp)
    Backend(name="new").attach(sp)
    out = sp.data_to_send_client()
    assert out == (fbu_header(1) + struct.pack(">HHHHi", 0, 0, 0, 0, C.PSEUDO_DESKTOP_NAME)
                   + struct.pack(">I", 3) + b"new")


def test_continuous_updates_survive_a_reattach():
    sp, b1 = normal_session()
    # Our server core announced CU (EndOfContinuousUpdates) on SetEncodings; the browser saw it.
    sp.receive_client_data(struct.pack(">BBHHHH", 150, 1, 0, 0, 64, 48))
    b1.pump(sp)
    assert b1.conn.continuous_updates == Rect(0, 0, 64, 48)
    detach(sp)
    b2 = Backend()
    b2.attach(sp)
    b2.pump(sp)   # replay; the core answers SetEncodings with its EndOfContinuousUpdates...
    # ...which the browser must not see; the other capability answers are harmless repeats.
    ack = fbu_header(1) + ext_key_event_ack_rect(64, 48)
    fence = b"\xf8\0\0\0" + struct.pack(">I", 1 << 31) + b"\0"
    assert sp.data_to_send_client() in (ack + fence, fence + ack)
    assert b2.pump(sp) == [ev.EnableContinuousUpdates(True, Rect(0, 0, 64, 48))]
    assert b2.conn.continuous_updates == Rect(0, 0, 64, 48)


def test_disabling_continuous_updates_while_detached_is_answered():
    sp, b1 = normal_session()
    detach(sp)
    sp.receive_client_data(struct.pack(">BBHHHH", 150, 0, 0, 0, 64, 48))
    assert sp.data_to_send_client() == b"\x96"


def _rgb(fb: np.ndarray) -> np.ndarray:
    return np.stack([(fb >> 16) & 0xFF, (fb >> 8) & 0xFF, fb & 0xFF], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("server_resets", [True, False], ids=["server-resets", "no-resets"])
def test_tight_streams_continue_across_backends_in_novncs_decoders(server_resets):
    """noVNC's own decoders (node) fed everything the browser got from two backends end on
    the last picture; the same rectangles passed through unchanged break them."""
    assert novnc_available(), "node and noVNC are installed by scripts/install.sh"
    rng = np.random.default_rng(3)
    fbs = [random_fb(rng, 64, 48) for _ in range(4)]
    encoders = [make_encoder(ENC_TIGHT), make_encoder(ENC_TIGHT)]  # one per backend

    def encode(i: int) -> list[bytes]:
        rects = encoders[i // 2].encode(fbs[i], Rect(0, 0, 64, 48), NATIVE)
        if not server_resets:  # a server that does not reset its streams at connection start
            rects = [r[:12] + bytes([r[12] & 0xF0]) + r[13:] for r in rects]
        return rects

    sp, b1 = normal_session()
    shown, original = [], []
    for i in range(4):
        if i == 2:
            detach(sp)
            Backend().attach(sp)
            sp.data_to_send_client()
        rects = encode(i)
        assert any(r[12] >> 4 < 8 for r in rects), "the test needs zlib-compressed rects"
        original += rects
        sp.receive_server_data(fbu_header(len(rects)) + b"".join(rects))
        out = sp.data_to_send_client()
        assert out[:4] == fbu_header(len(rects))
        shown.append(out[4:])
        if i < 2:
            assert out[4:] == b"".join(rects)  # the first backend's stream is untouched
    rgb, _, count = novnc_decode(64, 48, shown)
    assert count == len(original)
    assert np.array_equal(rgb, _rgb(fbs[3]))
    assert len(b"".join(shown)) == len(b"".join(original)) - 2  # one zlib header stripped
    with pytest.raises(DecodeError, match="zlib"):
        novnc_decode(64, 48, original)


def test_tight_stream_first_used_by_a_later_backend_keeps_its_header():
    """A stream the browser never inflated still needs its zlib header."""
    sp, b1 = normal_session()
    fill = struct.pack(">HHHHi", 0, 0, 4, 4, C.ENC_TIGHT) + b"\x80\x01\x02\x03"
    sp.receive_server_data(fbu_header(1) + fill)
    sp.data_to_send_client()
    detach(sp)
    Backend().attach(sp)
    sp.data_to_send_client()
    fb = random_fb(np.random.default_rng(5), 64, 48)
    rects = make_encoder(ENC_TIGHT).encode(fb, Rect(0, 0, 64, 48), NATIVE)
    sp.receive_server_data(fbu_header(len(rects)) + b"".join(rects))
    assert sp.data_to_send_client() == fbu_header(len(rects)) + b"".join(rects)


def test_tight_rects_too_small_to_compress_pass_through():
    """Tight sends a rect's data as is, without a length, when it is under 12 bytes (a few
    pixels: the agent sends only what changed).  The framer once fell through to the
    compressed branch's length and closed the session (UnboundLocalError)."""
    rng = np.random.default_rng(11)
    fb = random_fb(rng, 64, 48)
    fb[0, :8] = np.arange(8, dtype=np.uint32) * 0x010203  # distinct pixels: no fill
    rects = []
    for w, h in ((2, 1), (3, 1), (1, 2), (2, 2)):
        rects += make_encoder(ENC_TIGHT).encode(fb, Rect(0, 0, w, h), NATIVE)
    assert any(r[12] >> 4 < 8 and len(r) < 12 + 1 + 2 + 12 for r in rects), \
        "the test needs basic-compression rects sent uncompressed"
    sp, b = normal_session()
    stream = fbu_header(len(rects)) + b"".join(rects)
    sp.receive_server_data(stream)
    assert not sp.closed
    assert sp.data_to_send_client() == stream


# -- fuzz ----------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), detach_at=st.integers(0, 300))
def test_any_browser_bytes_never_raise(data, detach_at):
    sp, b = normal_session()
    events = []
    for i in range(0, len(data), 17):
        if i >= detach_at and sp.attached:
            events += sp.detach("x")
        events += sp.receive_client_data(data[i:i + 17])
    closed = [e for e in events if isinstance(e, Closed)]
    assert all(e.reason and not e.reason.startswith("internal") for e in closed)
    assert len(closed) <= 1


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400), version=st.sampled_from([b"RFB 003.008\n", b"RFB 003.003\n"]))
def test_any_backend_bytes_never_raise(data, version):
    hs = BackendHandshake("pw")
    hs.receive_data(version + data)
    assert hs.state in HandshakeState
    if hs.failed:
        assert hs.error
    sp, b = normal_session()
    events = sp.receive_server_data(data)
    closed = [e for e in events if isinstance(e, Closed)]
    assert all(not e.reason.startswith("internal") for e in closed)
    events = sp.detach("x")
    assert all(isinstance(e, Detached | Closed) for e in events)


def test_every_hextile_tile_kind_frames():
    """Hextile's framing depends on each tile's flags: raw tiles, bg/fg, coloured subrects."""
    rng = np.random.default_rng(11)
    fb = random_fb(rng, 70, 40)
    fb[20:30, 0:70:3] = 0x00FFFFFF
    rects = make_encoder(ENC_HEXTILE).encode(fb, Rect(0, 0, 70, 40), NATIVE)
    for pf in (NATIVE, PF16):
        sp, b = normal_session()
        if pf is PF16:
            sp.receive_client_data(set_pixel_format(PF16))
            b.pump(sp)
            rects = make_encoder(ENC_HEXTILE).encode(fb, Rect(0, 0, 70, 40), PF16)
        stream = fbu_header(len(rects)) + b"".join(rects) + b"\x02"
        for i in range(len(stream)):
            sp.receive_server_data(stream[i:i + 1])
        assert sp.data_to_send_client() == stream and not sp.closed
    assert rs.ALLOWED_ENCODINGS >= {C.ENC_HEXTILE, C.ENC_TIGHT}
