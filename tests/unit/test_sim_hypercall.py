"""The sim's host <-> domain codec: round trips, framing, and hostile bytes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmore_nova.xen.sim import hypercall as hc
from dmore_nova.xen.sim.hypercall import SimOp


def _feed_all(data: bytes, chunk: int = 0) -> list[hc.Message]:
    d = hc.Decoder()
    if not chunk:
        return d.feed(data)
    out: list[hc.Message] = []
    for i in range(0, len(data), chunk):
        out += d.feed(data[i:i + chunk])
    return out


def test_header_layout_is_the_documented_struct():
    data = hc.encode_request(SimOp.EVTCHNOP_send, 0x01020304, handle=7, port=9)
    mtype, nr_fds, req_id, length = struct.unpack_from("<HHII", data)
    assert (mtype, nr_fds, req_id, length) == (int(SimOp.EVTCHNOP_send), 0, 0x01020304, 8)
    assert data[12:] == struct.pack("<II", 7, 9)


def test_request_round_trip_with_every_field_kind():
    data = hc.encode_request(SimOp.XEN_DOMCTL_createdomain, 5, name="guest-ü", max_pages=1 << 40,
                             flags=hc.SIM_CDF_paused)
    [msg] = _feed_all(data)
    assert msg == hc.Request(SimOp.XEN_DOMCTL_createdomain, 5,
                             {"name": "guest-ü", "max_pages": 1 << 40, "flags": 1})
    frames = [0, 1, 2**64 - 1, 77]
    [msg] = _feed_all(hc.encode_request(SimOp.privcmd_mmapbatch, 6, dom=3, writable=1,
                                        frames=frames))
    assert msg.args == {"dom": 3, "writable": 1, "frames": frames}


def test_reply_round_trip_carries_fd_count_from_schema():
    data = hc.encode_reply(SimOp.GNTTABOP_map_grant_ref, 9, handle=3, frame=0x1234)
    [msg] = _feed_all(data)
    assert isinstance(msg, hc.Reply)
    assert (msg.rc, msg.result, msg.nr_fds) == (0, {"handle": 3, "frame": 0x1234}, 1)


def test_error_reply_carries_reason_and_no_fds():
    data = hc.encode_reply(SimOp.GNTTABOP_map_grant_ref, 9, -1, reason="GNTST_general_error: x")
    [msg] = _feed_all(data)
    assert (msg.rc, msg.reason, msg.nr_fds, msg.result) == (-1, "GNTST_general_error: x", 0, {})


@pytest.mark.parametrize("chunk", [1, 3, 12, 13, 1000])
def test_decoder_reassembles_any_split(chunk):
    msgs = [hc.encode_request(SimOp.EVTCHNOP_unmask, i, handle=1, port=i) for i in range(5)]
    msgs.append(hc.encode_reply(SimOp.hello, 99, version=1, domid=4, host="h"))
    out = _feed_all(b"".join(msgs), chunk)
    assert [m.req_id for m in out] == [0, 1, 2, 3, 4, 99]
    assert out[-1].result == {"version": 1, "domid": 4, "host": "h"}


def test_encode_rejects_values_that_do_not_fit():
    with pytest.raises(ValueError):
        hc.encode_request(SimOp.EVTCHNOP_alloc_unbound, 1, handle=1, remote_dom=1 << 16)
    with pytest.raises(ValueError):
        hc.encode_request(SimOp.EVTCHNOP_send, 1, handle=1)  # missing port
    with pytest.raises(ValueError):
        hc.encode_request(SimOp.privcmd_mmapbatch, 1, dom=1, writable=0,
                          frames=list(range(hc.SIM_MAX_ARRAY + 1)))
    with pytest.raises(ValueError):
        hc.encode_reply(SimOp.hello, 1, rc=5)


def _raw(mtype: int, payload: bytes, nr_fds: int = 0, req_id: int = 1) -> bytes:
    return struct.pack("<HHII", mtype, nr_fds, req_id, len(payload)) + payload


@pytest.mark.parametrize("data,why", [
    (_raw(999, b""), "unknown op"),
    (_raw(int(SimOp.EVTCHNOP_send), b"\0" * 7), "truncated"),
    (_raw(int(SimOp.EVTCHNOP_send), b"\0" * 9), "trailing"),
    (_raw(int(SimOp.EVTCHNOP_send), b"\0" * 8, nr_fds=1), "carry no fds"),
    (_raw(int(SimOp.hello), b"\0" * 4, nr_fds=9), "fds exceed"),
    (struct.pack("<HHII", int(SimOp.hello), 0, 1, hc.SIM_MAX_PAYLOAD + 1), "exceeds"),
    (_raw(int(SimOp.XEN_DOMCTL_createdomain), struct.pack("<H", 5) + b"ab"), "truncated string"),
    (_raw(int(SimOp.XEN_DOMCTL_createdomain), struct.pack("<H", 2) + b"\xff\xfe" + b"\0" * 12),
     "not UTF-8"),
    (_raw(int(SimOp.privcmd_mmapbatch), struct.pack("<HBI", 1, 0, hc.SIM_MAX_ARRAY + 1)),
     "items exceed"),
    (_raw(int(SimOp.privcmd_mmapbatch), struct.pack("<HBI", 1, 0, 2) + b"\0" * 8),
     "truncated array"),
    (_raw(int(SimOp.hello) | hc.SIM_REPLY, struct.pack("<i", 3)), "positive rc"),
    (_raw(int(SimOp.evtchn_open) | hc.SIM_REPLY, struct.pack("<iI", 0, 1)), "expected 1 fds"),
    (_raw(int(SimOp.evtchn_open) | hc.SIM_REPLY, struct.pack("<iH", -1, 0), nr_fds=1),
     "error reply carries fds"),
])
def test_malformed_input_is_a_protocol_error_and_breaks_the_decoder(data, why):
    d = hc.Decoder()
    with pytest.raises(hc.ProtocolError, match=why):
        d.feed(data)
    with pytest.raises(hc.ProtocolError):
        d.feed(hc.encode_request(SimOp.hello, 1, version=1))


def test_incomplete_message_waits_for_more():
    data = hc.encode_request(SimOp.EVTCHNOP_send, 1, handle=1, port=2)
    d = hc.Decoder()
    assert d.feed(data[:-1]) == []
    assert d.buffered == len(data) - 1
    assert [m.args for m in d.feed(data[-1:])] == [{"handle": 1, "port": 2}]
    assert d.buffered == 0


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_protocol_error(data):
    d = hc.Decoder()
    try:
        msgs = d.feed(data)
    except hc.ProtocolError:
        return
    for m in msgs:
        assert isinstance(m, (hc.Request, hc.Reply))


def test_delivery_codec():
    assert hc.decode_delivery(hc.encode_delivery(1023)) == 1023
    with pytest.raises(hc.ProtocolError):
        hc.decode_delivery(b"\0\0\0")
