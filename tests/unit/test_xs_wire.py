"""The xs_wire codec: layout and numbers against the C header, framing, limits, payloads."""

from __future__ import annotations

import errno
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmore_nova.xen.io import xs_wire
from dmore_nova.xen.io.xs_wire import (
    XENSTORE_PAYLOAD_MAX,
    XSD_SOCKMSG_SIZE,
    Decoder,
    Message,
    ProtocolError,
    XsdSockmsgType,
    encode,
)

HEADER = Path("/usr/include/xen/io/xs_wire.h")

# ---------------------------------------------------------------------------------------------
# Against the C header, as GCC compiles it


C_PROGRAM = r"""
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <xen/io/xs_wire.h>
#define P(name) printf("%s=%lld\n", #name, (long long)(name))
int main(void) {
    unsigned int i;
    P(XS_CONTROL); P(XS_DEBUG); P(XS_DIRECTORY); P(XS_READ); P(XS_GET_PERMS); P(XS_WATCH);
    P(XS_UNWATCH); P(XS_TRANSACTION_START); P(XS_TRANSACTION_END); P(XS_INTRODUCE);
    P(XS_RELEASE); P(XS_GET_DOMAIN_PATH); P(XS_WRITE); P(XS_MKDIR); P(XS_RM); P(XS_SET_PERMS);
    P(XS_WATCH_EVENT); P(XS_ERROR); P(XS_IS_DOMAIN_INTRODUCED); P(XS_RESUME); P(XS_SET_TARGET);
    P(XS_RESET_WATCHES); P(XS_DIRECTORY_PART); P(XS_TYPE_COUNT); P(XS_INVALID);
    P(XS_WATCH_PATH); P(XS_WATCH_TOKEN);
    P(XENSTORE_PAYLOAD_MAX); P(XENSTORE_ABS_PATH_MAX); P(XENSTORE_REL_PATH_MAX);
    P(XENSTORE_RING_SIZE);
    P(XENSTORE_SERVER_FEATURE_RECONNECTION); P(XENSTORE_SERVER_FEATURE_ERROR);
    P(XENSTORE_CONNECTED); P(XENSTORE_RECONNECT); P(XENSTORE_ERROR_NONE);
    P(XENSTORE_ERROR_COMM); P(XENSTORE_ERROR_RINGIDX); P(XENSTORE_ERROR_PROTO);
    P(sizeof(struct xenstore_domain_interface));
    P(offsetof(struct xenstore_domain_interface, req));
    P(offsetof(struct xenstore_domain_interface, rsp));
    P(offsetof(struct xenstore_domain_interface, req_cons));
    P(offsetof(struct xenstore_domain_interface, req_prod));
    P(offsetof(struct xenstore_domain_interface, rsp_cons));
    P(offsetof(struct xenstore_domain_interface, rsp_prod));
    P(offsetof(struct xenstore_domain_interface, server_features));
    P(offsetof(struct xenstore_domain_interface, connection));
    P(offsetof(struct xenstore_domain_interface, error));
    P(sizeof(struct xsd_sockmsg));
    P(offsetof(struct xsd_sockmsg, type)); P(offsetof(struct xsd_sockmsg, req_id));
    P(offsetof(struct xsd_sockmsg, tx_id)); P(offsetof(struct xsd_sockmsg, len));
    printf("XS_WRITE_NONE=%s\nXS_WRITE_CREATE=%s\nXS_WRITE_CREATE_EXCL=%s\n",
           XS_WRITE_NONE, XS_WRITE_CREATE, XS_WRITE_CREATE_EXCL);
    for (i = 0; i < sizeof(xsd_errors) / sizeof(xsd_errors[0]); i++)
        printf("ERR %u %d %s\n", i, xsd_errors[i].errnum, xsd_errors[i].errstring);
    return 0;
}
"""


@pytest.fixture(scope="module")
def c_values(tmp_path_factory) -> tuple[dict[str, str], list[tuple[int, str]]]:
    if shutil.which("gcc") is None or not HEADER.exists():
        pytest.skip(reason="needs gcc and libxen-dev's xs_wire.h")
    d = tmp_path_factory.mktemp("xs_wire_c")
    (d / "p.c").write_text(C_PROGRAM)
    subprocess.run(["gcc", "-Wall", "-Werror", "-Wno-unused-variable", "-o", str(d / "p"),
                    str(d / "p.c")], check=True, capture_output=True)
    out = subprocess.run([str(d / "p")], check=True, capture_output=True, text=True).stdout
    values: dict[str, str] = {}
    errors: list[tuple[int, str]] = []
    for line in out.splitlines():
        if line.startswith("ERR "):
            _, _, num, name = line.split()
            errors.append((int(num), name))
        else:
            name, value = line.split("=", 1)
            values[name] = value
    return values, errors


def test_message_types_match_the_header(c_values):
    values, _ = c_values
    for member in XsdSockmsgType:
        assert int(values[member.name]) == member.value, member.name
    # the alias: XS_DEBUG is XS_CONTROL
    assert XsdSockmsgType.XS_DEBUG is XsdSockmsgType.XS_CONTROL
    # every enumerator the header declares is mirrored (parsed from the header text, so a
    # type added to a newer header fails here instead of being silently unknown)
    body = re.search(r"enum xsd_sockmsg_type\s*\{(.*?)\};", HEADER.read_text(), re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    declared = set(re.findall(r"^\s*(XS_\w+)", body, re.M)) | set(
        re.findall(r"#define\s+(XS_\w+)", body))
    assert declared - {"XS_TYPE_COUNT"} == set(XsdSockmsgType.__members__)
    assert int(values["XS_TYPE_COUNT"]) == xs_wire.XS_TYPE_COUNT


def test_constants_and_struct_layout_match_the_header(c_values):
    values, _ = c_values
    for name in ("XENSTORE_PAYLOAD_MAX", "XENSTORE_ABS_PATH_MAX", "XENSTORE_REL_PATH_MAX",
                 "XENSTORE_RING_SIZE", "XS_WATCH_PATH", "XS_WATCH_TOKEN"):
        assert int(values[name]) == getattr(xs_wire, name), name
    for name in ("XS_WRITE_NONE", "XS_WRITE_CREATE", "XS_WRITE_CREATE_EXCL"):
        assert values[name].encode() == getattr(xs_wire, name)
    assert int(values["sizeof(struct xsd_sockmsg)"]) == XSD_SOCKMSG_SIZE == 16
    offsets = [int(values[f"offsetof(struct xsd_sockmsg, {f})"])
               for f in ("type", "req_id", "tx_id", "len")]
    assert offsets == [0, 4, 8, 12]
    # our struct packs the fields at exactly those offsets
    raw = encode(0x01020304, 0x05060708, 0x090A0B0C, b"xy")
    assert [int.from_bytes(raw[o:o + 4], "little") for o in offsets] == [
        0x01020304, 0x05060708, 0x090A0B0C, 2]


def test_ring_interface_layout_and_flags_match_the_header(c_values):
    values, _ = c_values
    for name in ("XENSTORE_SERVER_FEATURE_RECONNECTION", "XENSTORE_SERVER_FEATURE_ERROR",
                 "XENSTORE_CONNECTED", "XENSTORE_RECONNECT", "XENSTORE_ERROR_NONE",
                 "XENSTORE_ERROR_COMM", "XENSTORE_ERROR_RINGIDX", "XENSTORE_ERROR_PROTO"):
        assert int(values[name]) == getattr(xs_wire, name), name
    assert int(values["sizeof(struct xenstore_domain_interface)"]) == \
        xs_wire.XENSTORE_INTERFACE_SIZE
    for field in ("req", "rsp", "req_cons", "req_prod", "rsp_cons", "rsp_prod",
                  "server_features", "connection", "error"):
        assert int(values[f"offsetof(struct xenstore_domain_interface, {field})"]) == \
            getattr(xs_wire, f"XENSTORE_INTERFACE_{field.upper()}"), field


def test_error_table_matches_the_header(c_values):
    _, errors = c_values
    assert errors == list(xs_wire.XSD_ERRORS)
    assert [name for _, name in errors] == list(xs_wire.XSD_ERROR_NAMES)


def test_error_names_in_header_text_order():
    """Without a compiler too: the names and their order as written in the header."""
    if not HEADER.exists():
        pytest.skip(reason="needs libxen-dev's xs_wire.h")
    names = re.findall(r"XSD_ERROR\((E\w+)\)", HEADER.read_text())
    assert tuple(names) == xs_wire.XSD_ERROR_NAMES
    for num, name in xs_wire.XSD_ERRORS:
        assert num == getattr(errno, name)
        assert xs_wire.errno_of(name) == num


# ---------------------------------------------------------------------------------------------
# Framing


def test_encode_layout_is_little_endian_header_then_payload():
    raw = encode(XsdSockmsgType.XS_READ, 7, 3, b"/a\x00")
    assert raw == bytes.fromhex("02000000" "07000000" "03000000" "03000000") + b"/a\x00"


def test_encode_refuses_oversize_and_out_of_range():
    encode(XsdSockmsgType.XS_WRITE, 0, 0, b"x" * XENSTORE_PAYLOAD_MAX)  # exactly the limit
    with pytest.raises(ValueError):
        encode(XsdSockmsgType.XS_WRITE, 0, 0, b"x" * (XENSTORE_PAYLOAD_MAX + 1))
    with pytest.raises(ValueError):
        encode(XsdSockmsgType.XS_READ, 1 << 32, 0, b"")
    with pytest.raises(ValueError):
        encode(XsdSockmsgType.XS_READ, 0, -1, b"")
    with pytest.raises(ValueError):
        encode(XsdSockmsgType.XS_READ, 0, 0, b"abc", max_payload=2)


def test_decoder_yields_messages_fed_in_one_byte_pieces():
    msgs = [Message(XsdSockmsgType.XS_WRITE, 1, 0, b"/a\x00hello"),
            Message(XsdSockmsgType.XS_READ, 2, 9, b"/a\x00"),
            Message(XsdSockmsgType.XS_TRANSACTION_START, 3, 0, b"")]
    stream = b"".join(m.encode() for m in msgs)
    dec = Decoder()
    got: list[Message] = []
    for i in range(len(stream)):
        got += dec.feed(stream[i:i + 1])
        # nothing completes before its last byte arrives
        assert sum(len(m.encode()) for m in got) <= i + 1
    assert got == msgs
    assert dec.buffered == 0


def test_decoder_keeps_partial_message_and_counts_it():
    dec = Decoder()
    raw = Message(XsdSockmsgType.XS_READ, 1, 0, b"/abc\x00").encode()
    assert dec.feed(raw[:10]) == []
    assert dec.buffered == 10
    assert dec.feed(raw[10:] + raw[:3]) == [Message(XsdSockmsgType.XS_READ, 1, 0, b"/abc\x00")]
    assert dec.buffered == 3


@given(st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1),
                          st.integers(0, 2**32 - 1), st.binary(max_size=300)), max_size=8),
       st.randoms())
def test_decoder_roundtrip_any_split(specs, rnd):
    msgs = [Message(t, r, x, p) for t, r, x, p in specs]
    stream = b"".join(m.encode() for m in msgs)
    cuts = sorted(rnd.sample(range(len(stream) + 1), min(len(stream) + 1, 6)))
    dec = Decoder()
    got: list[Message] = []
    prev = 0
    for c in cuts + [len(stream)]:
        got += dec.feed(stream[prev:c])
        prev = c
    assert got == msgs


def test_decoder_rejects_oversize_announcement_and_stays_failed():
    dec = Decoder()
    good = Message(XsdSockmsgType.XS_READ, 1, 0, b"/a\x00").encode()
    bad_header = xs_wire.XSD_SOCKMSG.pack(XsdSockmsgType.XS_WRITE, 2, 0, XENSTORE_PAYLOAD_MAX + 1)
    with pytest.raises(ProtocolError, match="4097"):
        dec.feed(good + bad_header)
    assert dec.failed
    # the decoder did not buffer the hostile payload and refuses to go on
    assert dec.buffered == 0
    with pytest.raises(ProtocolError):
        dec.feed(good)


def test_decoder_accepts_exactly_the_limit_and_a_custom_lower_limit():
    dec = Decoder()
    big = Message(XsdSockmsgType.XS_WRITE, 1, 0, b"/a\x00" + b"v" * (XENSTORE_PAYLOAD_MAX - 3))
    assert dec.feed(big.encode()) == [big]
    small = Decoder(max_payload=8)
    with pytest.raises(ProtocolError):
        small.feed(xs_wire.XSD_SOCKMSG.pack(XsdSockmsgType.XS_READ, 0, 0, 9))
    with pytest.raises(ValueError):
        Decoder(max_payload=XENSTORE_PAYLOAD_MAX + 1)


def test_decoder_keeps_unknown_types_for_the_daemon_to_answer():
    dec = Decoder()
    raw = encode(0xBEEF, 5, 0, b"") + encode(XsdSockmsgType.XS_INVALID, 6, 0, b"")
    got = dec.feed(raw)
    assert [m.type for m in got] == [0xBEEF, 0xFFFF]
    assert got[0].type_name == "**UNKNOWN**"
    assert got[1].type_name == "XS_INVALID"


# ---------------------------------------------------------------------------------------------
# Every operation's payload, as pyxs / libxenstore build them

# (type, request payload) for every request type, built with the helpers
REQUESTS = [
    (XsdSockmsgType.XS_CONTROL, xs_wire.pack_strings("print", "hello")),
    (XsdSockmsgType.XS_DIRECTORY, xs_wire.pack_strings("/local/domain")),
    (XsdSockmsgType.XS_READ, xs_wire.pack_strings("/a/b")),
    (XsdSockmsgType.XS_GET_PERMS, xs_wire.pack_strings("/a")),
    (XsdSockmsgType.XS_WATCH, xs_wire.pack_strings("/a", "tok")),
    (XsdSockmsgType.XS_UNWATCH, xs_wire.pack_strings("@releaseDomain", "tok")),
    (XsdSockmsgType.XS_TRANSACTION_START, xs_wire.pack_strings("")),
    (XsdSockmsgType.XS_TRANSACTION_END, xs_wire.pack_strings("T")),
    (XsdSockmsgType.XS_INTRODUCE, xs_wire.pack_strings("5", "1234", "7")),
    (XsdSockmsgType.XS_RELEASE, xs_wire.pack_strings("5")),
    (XsdSockmsgType.XS_GET_DOMAIN_PATH, xs_wire.pack_strings("5")),
    (XsdSockmsgType.XS_WRITE, xs_wire.pack_write("/a", b"bin\x00ary")),
    (XsdSockmsgType.XS_MKDIR, xs_wire.pack_strings("/a")),
    (XsdSockmsgType.XS_RM, xs_wire.pack_strings("/a")),
    (XsdSockmsgType.XS_SET_PERMS, xs_wire.pack_strings("/a", "n5", "r0")),
    (XsdSockmsgType.XS_IS_DOMAIN_INTRODUCED, xs_wire.pack_strings("5")),
    (XsdSockmsgType.XS_RESUME, xs_wire.pack_strings("5")),
    (XsdSockmsgType.XS_SET_TARGET, xs_wire.pack_strings("6", "5")),
    (XsdSockmsgType.XS_RESET_WATCHES, b""),
    (XsdSockmsgType.XS_DIRECTORY_PART, xs_wire.pack_strings("/local", "0")),
]


def test_every_request_type_roundtrips():
    seen = {t for t, _ in REQUESTS} | {XsdSockmsgType.XS_WATCH_EVENT, XsdSockmsgType.XS_ERROR,
                                       XsdSockmsgType.XS_INVALID}
    assert seen == set(XsdSockmsgType)  # the table covers every type
    stream = b"".join(encode(t, i + 1, 0, p) for i, (t, p) in enumerate(REQUESTS))
    got = Decoder().feed(stream)
    assert [(m.type, m.req_id, m.payload) for m in got] == [
        (t, i + 1, p) for i, (t, p) in enumerate(REQUESTS)]


def test_pyxs_builds_the_same_bytes():
    """pyxs (unmodified) frames requests exactly as our encoder does."""
    from pyxs._internal import Op, Packet

    pkt = Packet(Op.WRITE, b"/a\x00" + b"v", rq_id=9, tx_id=4)
    header = Packet._struct.pack(pkt.op, pkt.rq_id, pkt.tx_id, pkt.size)
    ours = encode(XsdSockmsgType.XS_WRITE, 9, 4, xs_wire.pack_write("/a", b"v"))
    assert header + pkt.payload == ours


def test_strings_helpers():
    assert xs_wire.pack_strings("a", b"bc", "") == b"a\x00bc\x00\x00"
    assert xs_wire.unpack_strings(b"a\x00bc\x00\x00") == [b"a", b"bc", b""]
    # get_strings semantics: an unterminated tail is not a string
    assert xs_wire.unpack_strings(b"a\x00tail") == [b"a"]
    assert xs_wire.unpack_strings(b"") == []
    with pytest.raises(ValueError):
        xs_wire.pack_strings(b"a\x00b")


def test_write_payload_keeps_binary_value():
    payload = xs_wire.pack_write("/p", b"\x00\xff\x00")
    assert payload == b"/p\x00\x00\xff\x00"
    assert xs_wire.unpack_write(payload) == (b"/p", b"\x00\xff\x00")
    assert xs_wire.unpack_write(b"/p\x00") == (b"/p", b"")
    assert xs_wire.unpack_write(b"no-nul") is None


def test_watch_event_and_error_payloads():
    ev = xs_wire.pack_watch_event("/a/b", b"tok")
    assert ev == b"/a/b\x00tok\x00"
    assert xs_wire.unpack_watch_event(ev) == (b"/a/b", b"tok")
    assert xs_wire.unpack_watch_event(b"/a\x00") is None
    # pyxs: Event(*payload.split(NUL)[:-1]) needs exactly two strings
    assert ev.split(b"\x00")[:-1] == [b"/a/b", b"tok"]
    assert xs_wire.pack_error("EACCES") == b"EACCES\x00"
    assert xs_wire.pack_error("ENOTANERROR") == b"EINVAL\x00"
    assert xs_wire.unpack_error(b"EAGAIN\x00") == "EAGAIN"
    assert xs_wire.unpack_error(b"\xff\x00") == "EINVAL"
    assert xs_wire.ACK == b"OK\x00"


def test_reply_echoes_req_and_tx_ids():
    req = Message(XsdSockmsgType.XS_READ, 77, 5, b"/a\x00")
    rep = req.reply(XsdSockmsgType.XS_ERROR, xs_wire.pack_error("ENOENT"))
    assert (rep.type, rep.req_id, rep.tx_id) == (XsdSockmsgType.XS_ERROR, 77, 5)


def test_random_garbage_never_escapes_as_anything_but_protocol_error():
    rnd = random.Random(1234)
    for _ in range(200):
        dec = Decoder()
        blob = bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(0, 200)))
        try:
            for m in dec.feed(blob):
                assert len(m.payload) <= XENSTORE_PAYLOAD_MAX
        except ProtocolError:
            pass
