"""Hostile clients against the live server while a good viewer keeps typing.

The sans-IO core has its own fuzz suite (tests/unit/test_rfb_fuzz.py); this one goes through
the real transport: >= 10,000 random and mutated client messages over real sockets, each session
after a valid handshake.  Nothing may escape a callback on the server loop, no connection may
hang the server, and the good viewer must see its echo after every batch.
"""

from __future__ import annotations

import socket
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.rawclient import RawClient

VALID = [
    struct.pack(">BxxxBBBBHHHBBBxxx", 0, 32, 24, 0, 1, 255, 255, 255, 16, 8, 0),  # SetPixelFormat
    struct.pack(">BxHiii", 2, 3, 0, 16, -223),                                      # SetEncodings
    struct.pack(">BBHHHH", 3, 1, 0, 0, 100, 100),                                   # FBU request
    struct.pack(">BBxxI", 4, 1, 0x61),                                              # KeyEvent
    struct.pack(">BBHH", 5, 1, 10, 10),                                             # PointerEvent
    struct.pack(">BxxxI", 6, 3) + b"abc",                                           # ClientCutText
    struct.pack(">BBHII", 255, 0, 1, 0x61, 0x1E),                                   # QEMU ext key
    struct.pack(">BBHHHH", 150, 1, 0, 0, 10, 10),                                   # EnableCU
    struct.pack(">BxxxIB", 248, 0x80000000, 0),                                     # Fence
]

messages = st.one_of(
    st.sampled_from(VALID),
    st.binary(min_size=1, max_size=64),
    st.tuples(st.sampled_from(VALID), st.integers(0, 63), st.integers(0, 255)).map(
        lambda t: t[0][:t[1] % len(t[0])] + bytes([t[2]]) + t[0][t[1] % len(t[0]) + 1:]),
    st.tuples(st.sampled_from(VALID), st.integers(1, 40)).map(lambda t: t[0][:t[1]]),
)

SESSIONS, PER_SESSION = 750, 20  # some sessions are cut short by the server: >= 10,000 sent


def _handshake(host: str, port: int) -> socket.socket:
    s = socket.create_connection((host, port), timeout=5)
    assert s.recv(12) == b"RFB 003.008\n"
    s.sendall(b"RFB 003.008\n")
    n = s.recv(1)[0]
    s.recv(n)
    s.sendall(b"\x01")
    s.recv(4)
    s.sendall(b"\x01")
    return s


def test_live_fuzz_server_keeps_serving(demo_server):
    good = RawClient(demo_server.host, demo_server.port)
    good.full_frame()
    sent = [0]

    @settings(max_examples=SESSIONS, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(messages, min_size=PER_SESSION, max_size=PER_SESSION))
    def run(batch):
        s = _handshake(demo_server.host, demo_server.port)
        try:
            for m in batch:
                s.sendall(m)
                sent[0] += 1
        except OSError:
            pass  # the server closed this hostile connection: expected
        finally:
            s.close()

    run()
    assert sent[0] >= 10_000, sent[0]
    assert demo_server.lt.errors == []
    # The good viewer is still served: a key it types comes back as an update.
    good.request()
    good.key(0x7A)
    assert good.wait_for_update(5.0)
    demo_server.wait_for(lambda: demo_server.viewer_count() == 1, what="hostile viewers gone")
    good.close()
