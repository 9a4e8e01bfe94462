"""The wire protocol and the agent-side state machine of the RM VM's co-migration control
channel, without I/O (the h11 style): :func:`parse_request`, :class:`Ack`,
:class:`ControlProtocol`.  The channel itself -- what the requests mean and why -- is described
in :mod:`dmore_nova.rm_vm.xs_control` (the agent's I/O shell); dom0's side is
:mod:`dmore_nova.virt.xl_rmvm`, which imports this module and nothing heavier.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass, field
from typing import Any

#: Relative xenstore paths (``/local/domain/<the RM VM's current domid>/data/...``).
REQUEST_KEY = "data/dmore-migrate"
ACK_KEY = "data/dmore-migrate-ack"
#: Longest request accepted, in bytes (the longest valid one is ~100).
MAX_REQUEST = 256
#: Largest domid of a domain (``DOMID_FIRST_RESERVED - 1``, xen.h).
DOMID_MAX = 0x7FEF

_SEQ = re.compile(r"[0-9]{1,20}")
#: What xl accepts in a domain name is wider, but a console's guest has a plain one; anything
#: else here is refused rather than compared.
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class Verb(enum.Enum):
    PREPARE = "prepare"
    RESUME = "resume"
    INCOMING = "incoming"


class Phase(enum.Enum):
    """Where the agent is in a co-migration, as far as this channel knows."""

    SERVING = "serving"
    """Devices connected (or connecting) to the current guest; input flows."""
    PREPARED = "prepared"
    """Input held, pages unmapped, ports unbound: ready for ``xl migrate`` of the RM VM."""


#: The phases in which each request is accepted.  ``prepare`` and ``resume`` are idempotent
#: (dom0 repeats them when an ack was lost); ``incoming`` needs a prepared agent.
ALLOWED: dict[Verb, frozenset[Phase]] = {
    Verb.PREPARE: frozenset({Phase.SERVING, Phase.PREPARED}),
    Verb.RESUME: frozenset({Phase.SERVING, Phase.PREPARED}),
    Verb.INCOMING: frozenset({Phase.PREPARED}),
}


class RequestError(ValueError):
    """A request that is not one; ``seq`` when it could be read (for the ack)."""

    def __init__(self, message: str, seq: str | None = None) -> None:
        super().__init__(message)
        self.seq = seq


@dataclass(frozen=True)
class Request:
    seq: str
    verb: Verb
    domid: int | None = None
    name: str | None = None

    def encode(self) -> str:
        """The request as dom0 writes it (:func:`parse_request` reads it back)."""
        parts = [self.seq, self.verb.value]
        if self.verb is Verb.INCOMING:
            parts += [str(self.domid), str(self.name)]
        return " ".join(parts)


def parse_request(raw: bytes) -> Request:
    """``<seq> <verb> [args]`` -> :class:`Request`; :class:`RequestError` says what is wrong."""
    if len(raw) > MAX_REQUEST:
        raise RequestError(f"request longer than {MAX_REQUEST} bytes ({len(raw)})")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise RequestError("request is not ASCII") from None
    parts = text.split(" ")
    seq = parts[0] if _SEQ.fullmatch(parts[0]) else None
    if seq is None:
        raise RequestError(f"request does not start with a decimal sequence number: "
                           f"{text[:40]!r}")
    if len(parts) < 2:
        raise RequestError("request has no verb", seq)
    try:
        verb = Verb(parts[1])
    except ValueError:
        raise RequestError(f"unknown request {parts[1][:40]!r} (known: "
                           f"{', '.join(v.value for v in Verb)})", seq) from None
    args = parts[2:]
    if verb is not Verb.INCOMING:
        if args:
            raise RequestError(f"{verb.value} takes no arguments", seq)
        return Request(seq, verb)
    if len(args) != 2:
        raise RequestError("incoming takes <domid> <name>", seq)
    if not args[0].isdigit() or len(args[0]) > 5 or not 1 <= int(args[0]) <= DOMID_MAX:
        raise RequestError(f"incoming: domid {args[0][:20]!r} is not 1..{DOMID_MAX}", seq)
    if not _NAME.fullmatch(args[1]):
        raise RequestError(f"incoming: name {args[1][:80]!r} is not 1-64 of "
                           f"[A-Za-z0-9_.-]", seq)
    return Request(seq, verb, int(args[0]), args[1])


@dataclass(frozen=True)
class Ack:
    seq: str | None
    state: str
    fields: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> str:
        return json.dumps({"seq": self.seq, "state": self.state, **self.fields})


def error_ack(seq: str | None, message: str) -> Ack:
    return Ack(seq, "error", {"error": message})


class ControlProtocol:
    """The agent's side of the channel, without I/O: which value is a new request, whether it
    is valid and allowed now, and the phase after each outcome."""

    def __init__(self) -> None:
        self.phase = Phase.SERVING
        self.busy: Request | None = None
        self._last: bytes | None = None

    def prime(self, raw: bytes | None) -> None:
        """The value found at start: seen, not acted on."""
        self._last = raw

    def on_value(self, raw: bytes | None, own_domid: int) -> Request | Ack | None:
        """The request key's current value: None (nothing new), an :class:`Ack` to write
        right away (refused: nothing changed), or the :class:`Request` to carry out (then
        :meth:`finished` or :meth:`failed`)."""
        if raw is None or raw == b"" or raw == self._last:
            return None
        self._last = raw
        try:
            req = parse_request(raw)
        except RequestError as exc:
            return error_ack(exc.seq, str(exc))
        if self.busy is not None:
            return error_ack(req.seq, f"busy with request {self.busy.seq} "
                                      f"({self.busy.verb.value})")
        if self.phase not in ALLOWED[req.verb]:
            return error_ack(req.seq, f"{req.verb.value} is not allowed while "
                                      f"{self.phase.value}")
        if req.domid == own_domid:
            return error_ack(req.seq, f"incoming: dom{req.domid} is this RM VM")
        self.busy = req
        return req

    def finished(self, req: Request, phase: Phase, state: str, **fields: Any) -> Ack:
        assert req is self.busy, (req, self.busy)
        self.busy = None
        self.phase = phase
        return Ack(req.seq, state, fields)

    def failed(self, req: Request, phase: Phase, message: str, **fields: Any) -> Ack:
        assert req is self.busy, (req, self.busy)
        self.busy = None
        self.phase = phase
        return Ack(req.seq, "error", {"error": message, **fields})
