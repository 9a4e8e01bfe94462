"""The RM VM's co-migration control channel, sans-IO (dmore_nova.rm_vm.control): the request
grammar, and which request is accepted in which phase -- a refused request changes nothing."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmore_nova.rm_vm.control import (
    MAX_REQUEST,
    Ack,
    ControlProtocol,
    Phase,
    Request,
    RequestError,
    Verb,
    parse_request,
)

OWN = 7


@pytest.mark.parametrize("raw, req", [
    (b"1 prepare", Request("1", Verb.PREPARE)),
    (b"1764197000123456789 resume", Request("1764197000123456789", Verb.RESUME)),
    (b"42 incoming 12 guest", Request("42", Verb.INCOMING, 12, "guest")),
    (b"42 incoming 32751 a.b-c_9", Request("42", Verb.INCOMING, 0x7FEF, "a.b-c_9")),
])
def test_valid_requests_parse_and_round_trip(raw, req):
    assert parse_request(raw) == req
    assert req.encode().encode() == raw


@pytest.mark.parametrize("raw, seq, message", [
    (b"", None, "does not start with a decimal sequence number"),
    (b"prepare", None, "does not start with a decimal sequence number"),
    (b"-1 prepare", None, "does not start with a decimal sequence number"),
    (b"1" * 21 + b" prepare", None, "does not start with a decimal sequence number"),
    (b"5", "5", "no verb"),
    (b"5 frobnicate", "5", "unknown request 'frobnicate' (known: prepare, resume, incoming)"),
    (b"5 PREPARE", "5", "unknown request 'PREPARE'"),
    (b"5 prepare now", "5", "prepare takes no arguments"),
    (b"5  prepare", "5", "unknown request ''"),
    (b"5 resume 3", "5", "resume takes no arguments"),
    (b"5 incoming", "5", "incoming takes <domid> <name>"),
    (b"5 incoming 12", "5", "incoming takes <domid> <name>"),
    (b"5 incoming 12 guest extra", "5", "incoming takes <domid> <name>"),
    (b"5 incoming 0 guest", "5", "domid '0' is not 1..32751"),
    (b"5 incoming 32752 guest", "5", "domid '32752' is not 1..32751"),
    (b"5 incoming 0012345 guest", "5", "is not 1..32751"),
    (b"5 incoming -3 guest", "5", "domid '-3'"),
    (b"5 incoming 12 gu/est", "5", "name 'gu/est' is not 1-64 of [A-Za-z0-9_.-]"),
    (b"5 incoming 12 " + b"g" * 65, "5", "is not 1-64"),
    (b"5 prepare\xff", None, "not ASCII"),
    (b"5 " + b"x" * MAX_REQUEST, None, f"longer than {MAX_REQUEST} bytes"),
])
def test_malformed_requests_say_what_is_wrong(raw, seq, message):
    with pytest.raises(RequestError) as ei:
        parse_request(raw)
    assert message in str(ei.value)
    assert ei.value.seq == seq


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_raise_request_error(raw):
    try:
        req = parse_request(raw)
    except RequestError:
        return
    assert parse_request(req.encode().encode()) == req


def test_ack_is_json_with_seq_and_state():
    a = Ack("9", "prepared", {"seconds": 0.5})
    assert json.loads(a.encode()) == {"seq": "9", "state": "prepared", "seconds": 0.5}


# -- the phases --------------------------------------------------------------------------------

def test_a_request_present_at_start_is_not_acted_on():
    p = ControlProtocol()
    p.prime(b"3 incoming 12 guest")
    assert p.on_value(b"3 incoming 12 guest", OWN) is None
    assert p.phase is Phase.SERVING and p.busy is None


def test_nothing_new_is_nothing():
    p = ControlProtocol()
    assert p.on_value(None, OWN) is None
    assert p.on_value(b"", OWN) is None
    req = p.on_value(b"1 prepare", OWN)
    assert req == Request("1", Verb.PREPARE)
    p.finished(req, Phase.PREPARED, "prepared")
    assert p.on_value(b"1 prepare", OWN) is None  # the same value again (e.g. our resume)


def test_full_cycle_prepare_incoming():
    p = ControlProtocol()
    req = p.on_value(b"1 prepare", OWN)
    assert isinstance(req, Request) and p.busy is req
    ack = p.finished(req, Phase.PREPARED, "prepared", seconds=0.1)
    assert ack == Ack("1", "prepared", {"seconds": 0.1})
    assert p.phase is Phase.PREPARED and p.busy is None
    req = p.on_value(b"2 incoming 12 guest", OWN)
    assert req == Request("2", Verb.INCOMING, 12, "guest")
    ack = p.finished(req, Phase.SERVING, "done", new=12)
    assert (ack.state, p.phase) == ("done", Phase.SERVING)


@pytest.mark.parametrize("raw", [b"x", b"9 frobnicate", b"9 incoming 12", b"9 prepare\x00"])
@pytest.mark.parametrize("phase", list(Phase))
def test_malformed_request_gets_an_error_ack_and_changes_nothing(raw, phase):
    p = ControlProtocol()
    p.phase = phase
    out = p.on_value(raw, OWN)
    assert isinstance(out, Ack) and out.state == "error" and out.fields["error"]
    assert p.phase is phase and p.busy is None
    assert p.on_value(raw, OWN) is None  # not answered twice


def test_incoming_needs_prepare():
    p = ControlProtocol()
    out = p.on_value(b"4 incoming 12 guest", OWN)
    assert out == Ack("4", "error", {"error": "incoming is not allowed while serving"})
    assert p.phase is Phase.SERVING and p.busy is None


def test_incoming_of_ourselves_is_refused():
    p = ControlProtocol()
    p.phase = Phase.PREPARED
    out = p.on_value(f"4 incoming {OWN} guest".encode(), OWN)
    assert out == Ack("4", "error", {"error": f"incoming: dom{OWN} is this RM VM"})
    assert p.phase is Phase.PREPARED


def test_a_request_while_busy_is_refused():
    p = ControlProtocol()
    first = p.on_value(b"1 prepare", OWN)
    out = p.on_value(b"2 resume", OWN)
    assert out == Ack("2", "error", {"error": "busy with request 1 (prepare)"})
    assert p.busy is first and p.phase is Phase.SERVING


@pytest.mark.parametrize("verb", ["prepare", "resume"])
@pytest.mark.parametrize("phase", list(Phase))
def test_prepare_and_resume_are_accepted_in_every_phase(verb, phase):
    p = ControlProtocol()
    p.phase = phase
    assert isinstance(p.on_value(f"1 {verb}".encode(), OWN), Request)


def test_failed_request_sets_the_phase_it_is_told():
    p = ControlProtocol()
    p.phase = Phase.PREPARED
    req = p.on_value(b"5 incoming 12 guest", OWN)
    ack = p.failed(req, Phase.PREPARED, "dom12 not named 'guest' after 600 s")
    assert ack == Ack("5", "error", {"error": "dom12 not named 'guest' after 600 s"})
    assert p.phase is Phase.PREPARED and p.busy is None
