"""Sans-IO codec of the sim's host <-> domain control protocol (the sim's "hypercall ABI").

A process acts as domain N by connecting to ``domN/hypercall.sock`` in the host's run dir; the
host knows the caller's domid from the socket, as Xen knows it from the vCPU that trapped.  Every
operation a real guest would do with a hypercall or through a ``/dev/xen/*`` driver
(``EVTCHNOP_*``, ``GNTTABOP_*``, privcmd foreign mapping, ``XEN_DOMCTL_*``) is one request
message here, answered by exactly one reply.

Why a binary, schema-driven codec rather than JSON: the arguments are small fixed C-like
structs in Xen, the host must reject malformed input cheaply and precisely (a hostile "guest"
process is the point of the exercise), and a table of field layouts is easy to audit against
the Xen names it mirrors.

Wire format (all little-endian)::

    struct sim_msg_hdr {        /* 12 bytes */
        uint16_t type;          /* SIMOP_* for requests, SIMOP_* | SIM_REPLY for replies */
        uint16_t nr_fds;        /* fds attached with SCM_RIGHTS to this message's bytes */
        uint32_t req_id;        /* echoed in the reply */
        uint32_t len;           /* payload bytes that follow, <= SIM_MAX_PAYLOAD */
    };

A request payload is the op's argument fields, packed in order.  A reply payload is
``int32 rc`` (0 or ``-errno``), then either the op's result fields (rc == 0) or a
``str`` reason (rc < 0).  Field kinds: ``u8 u16 u32 u64 i32``, ``str`` (u16 length + UTF-8,
at most :data:`SIM_MAX_STR` bytes) and ``u64[]`` (u32 count + items, at most
:data:`SIM_MAX_ARRAY`).  A payload must be consumed exactly: trailing bytes are an error.

File descriptors (a domain's memory file, a grant table, an event-channel delivery socket)
travel as ``SCM_RIGHTS`` ancillary data sent with the message's first byte; ``nr_fds`` says how
many the receiver must pair with the message.  The codec only counts them; the transport
moves them.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

SIM_PROTOCOL_VERSION = 1

HDR = struct.Struct("<HHII")
HDR_SIZE = HDR.size
SIM_REPLY = 0x8000
SIM_MAX_PAYLOAD = 64 * 1024
SIM_MAX_STR = 1024
SIM_MAX_ARRAY = 4096
SIM_MAX_FDS = 4


class SimOp(enum.IntEnum):
    """Operations; names follow the Xen hypercall / library call each one stands for."""

    hello = 1
    # event channels (libxenevtchn over /dev/xen/evtchn)
    evtchn_open = 10              # xenevtchn_open: returns a delivery socket as fd
    evtchn_close_handle = 11      # xenevtchn_close
    EVTCHNOP_alloc_unbound = 12   # xenevtchn_bind_unbound_port
    EVTCHNOP_bind_interdomain = 13
    EVTCHNOP_send = 14            # xenevtchn_notify
    EVTCHNOP_unmask = 15          # xenevtchn_unmask
    EVTCHNOP_close = 16           # xenevtchn_unbind
    EVTCHNOP_status = 17
    # grant tables
    GNTTABOP_setup_table = 20     # the caller's own grant table, as fd
    GNTTABOP_map_grant_ref = 21   # xengnttab_map_grant_ref: granter's memory as fd
    GNTTABOP_unmap_grant_ref = 22
    gnttab_end_foreign_access = 23  # the sim's stand-in for the guest's cmpxchg on flags
    # memory
    memory_map_own = 30           # the caller's own RAM, as fd (what a kernel simply has)
    privcmd_mmapbatch = 31        # xenforeignmemory_map: target's memory as fd
    privcmd_munmap = 32           # xenforeignmemory_unmap of a writable mapping (VMA close)
    # toolstack (dom0 only, as XEN_DOMCTL_* are)
    XEN_DOMCTL_createdomain = 40
    XEN_DOMCTL_destroydomain = 41
    XEN_DOMCTL_pausedomain = 42
    XEN_DOMCTL_unpausedomain = 43
    XEN_DOMCTL_set_target = 44
    XEN_DOMCTL_getdomaininfo = 45
    XEN_SYSCTL_getdomaininfolist = 46
    XEN_DOMCTL_shadow_op = 47     # log-dirty (live migration): writes made by *other* domains


# GNTMAP_* flags (xen/include/public/grant_table.h) used in GNTTABOP_map_grant_ref.
GNTMAP_host_map = 1 << 1
GNTMAP_readonly = 1 << 2

# XEN_DOMINF_* bits reported by getdomaininfo (xen/include/public/domctl.h).
XEN_DOMINF_dying = 1 << 0
XEN_DOMINF_paused = 1 << 3

# Special domids (xen/include/public/xen.h).
DOMID_SELF = 0x7FF0
DOMID_INVALID = 0x7FF4

# createdomain flags (sim-specific: xl creates domains paused, then unpauses).
SIM_CDF_paused = 1 << 0

# XEN_DOMCTL_shadow_op (xen/include/public/domctl.h).  The sim supports log-dirty only: the
# guest's own writes are logged by its kernel (SimKernel's dirty log, as the host cannot trap
# stores to shared memory); the host logs what it can see, the pages other domains map
# writable (grant and foreign mappings), which Xen too only adds in the final round.
XEN_DOMCTL_SHADOW_OP_OFF = 0
XEN_DOMCTL_SHADOW_OP_ENABLE = 32
XEN_DOMCTL_SHADOW_OP_CLEAN = 11
XEN_DOMCTL_SHADOW_OP_PEEK = 12
XEN_DOMCTL_SHADOW_ENABLE_LOG_DIRTY = 1 << 2
XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL = 1 << 0

Field = tuple[str, str]

# op -> (request fields, result fields, fds in a successful reply)
SCHEMA: dict[SimOp, tuple[tuple[Field, ...], tuple[Field, ...], int]] = {
    SimOp.hello: ((("version", "u32"),),
                  (("version", "u32"), ("domid", "u16"), ("host", "str")), 0),
    SimOp.evtchn_open: ((), (("handle", "u32"),), 1),
    SimOp.evtchn_close_handle: ((("handle", "u32"),), (), 0),
    SimOp.EVTCHNOP_alloc_unbound: ((("handle", "u32"), ("remote_dom", "u16")),
                                   (("port", "u32"),), 0),
    SimOp.EVTCHNOP_bind_interdomain: ((("handle", "u32"), ("remote_dom", "u16"),
                                       ("remote_port", "u32")),
                                      (("local_port", "u32"),), 0),
    SimOp.EVTCHNOP_send: ((("handle", "u32"), ("port", "u32")), (), 0),
    SimOp.EVTCHNOP_unmask: ((("handle", "u32"), ("port", "u32")), (), 0),
    SimOp.EVTCHNOP_close: ((("handle", "u32"), ("port", "u32")), (), 0),
    SimOp.EVTCHNOP_status: ((("dom", "u16"), ("port", "u32")),
                            (("status", "u32"), ("remote_dom", "u16"),
                             ("remote_port", "u32")), 0),
    SimOp.GNTTABOP_setup_table: ((), (("nr_frames", "u32"),), 1),
    SimOp.GNTTABOP_map_grant_ref: ((("dom", "u16"), ("ref", "u32"), ("flags", "u32")),
                                   (("handle", "u32"), ("frame", "u64")), 1),
    SimOp.GNTTABOP_unmap_grant_ref: ((("handle", "u32"),), (), 0),
    SimOp.gnttab_end_foreign_access: ((("ref", "u32"),), (("ended", "u8"),), 0),
    SimOp.memory_map_own: ((), (("nr_pages", "u64"),), 1),
    SimOp.privcmd_mmapbatch: ((("dom", "u16"), ("writable", "u8"), ("frames", "u64[]")),
                              (), 1),
    SimOp.privcmd_munmap: ((("dom", "u16"), ("frames", "u64[]")), (), 0),
    SimOp.XEN_DOMCTL_createdomain: ((("name", "str"), ("max_pages", "u64"),
                                     ("flags", "u32")),
                                    (("domid", "u16"),), 0),
    SimOp.XEN_DOMCTL_destroydomain: ((("domid", "u16"),), (), 0),
    SimOp.XEN_DOMCTL_pausedomain: ((("domid", "u16"),), (), 0),
    SimOp.XEN_DOMCTL_unpausedomain: ((("domid", "u16"),), (), 0),
    SimOp.XEN_DOMCTL_set_target: ((("domid", "u16"), ("target", "u16")), (), 0),
    SimOp.XEN_DOMCTL_getdomaininfo: ((("domid", "u16"),),
                                     (("domid", "u16"), ("name", "str"), ("flags", "u32"),
                                      ("max_pages", "u64"), ("target", "u16")), 0),
    SimOp.XEN_SYSCTL_getdomaininfolist: ((), (("domids", "u64[]"),), 0),
    # ``shadow_op`` is xen_domctl_shadow_op.op (renamed: ``op`` names the message).
    # CLEAN/PEEK return the dirty frames >= start, at most SIM_MAX_ARRAY of them, and the
    # frame to continue from (0: no more); dirty_count is the whole set's size.
    SimOp.XEN_DOMCTL_shadow_op: ((("domid", "u16"), ("shadow_op", "u32"), ("mode", "u32"),
                                  ("start", "u64")),
                                 (("frames", "u64[]"), ("next", "u64"),
                                  ("dirty_count", "u32")), 0),
}

_SCALARS = {"u8": struct.Struct("<B"), "u16": struct.Struct("<H"),
            "u32": struct.Struct("<I"), "u64": struct.Struct("<Q"), "i32": struct.Struct("<i")}
_RC = _SCALARS["i32"]


class ProtocolError(ValueError):
    """The peer sent something that is not a valid message: the connection must be closed."""


@dataclass(frozen=True)
class Request:
    op: SimOp
    req_id: int
    args: dict[str, Any]
    nr_fds: int = 0


@dataclass(frozen=True)
class Reply:
    op: SimOp
    req_id: int
    rc: int
    result: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    nr_fds: int = 0


Message = Request | Reply


# -- field packing ---------------------------------------------------------------------------------

def _pack_fields(fields: Iterable[Field], values: dict[str, Any]) -> bytes:
    out = bytearray()
    for name, kind in fields:
        if name not in values:
            raise ValueError(f"missing field {name!r}")
        out += _pack_one(kind, values[name], name)
    return bytes(out)


def _pack_one(kind: str, value: Any, name: str) -> bytes:
    if kind in _SCALARS:
        try:
            return _SCALARS[kind].pack(int(value))
        except struct.error as e:
            raise ValueError(f"field {name!r}: {value!r} does not fit {kind}") from e
    if kind == "str":
        raw = str(value).encode("utf-8")
        if len(raw) > SIM_MAX_STR:
            raise ValueError(f"field {name!r}: string longer than {SIM_MAX_STR} bytes")
        return _SCALARS["u16"].pack(len(raw)) + raw
    if kind == "u64[]":
        items = list(value)
        if len(items) > SIM_MAX_ARRAY:
            raise ValueError(f"field {name!r}: more than {SIM_MAX_ARRAY} items")
        try:
            return _SCALARS["u32"].pack(len(items)) + struct.pack(f"<{len(items)}Q", *items)
        except struct.error as e:
            raise ValueError(f"field {name!r}: item does not fit u64") from e
    raise AssertionError(f"unknown field kind {kind}")


def _unpack_fields(fields: Iterable[Field], buf: memoryview, what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    off = 0
    for name, kind in fields:
        value, off = _unpack_one(kind, buf, off, f"{what}.{name}")
        out[name] = value
    if off != len(buf):
        raise ProtocolError(f"{what}: {len(buf) - off} trailing bytes")
    return out


def _unpack_one(kind: str, buf: memoryview, off: int, what: str) -> tuple[Any, int]:
    if kind in _SCALARS:
        s = _SCALARS[kind]
        if off + s.size > len(buf):
            raise ProtocolError(f"{what}: truncated")
        return s.unpack_from(buf, off)[0], off + s.size
    if kind == "str":
        if off + 2 > len(buf):
            raise ProtocolError(f"{what}: truncated length")
        (n,) = _SCALARS["u16"].unpack_from(buf, off)
        off += 2
        if n > SIM_MAX_STR:
            raise ProtocolError(f"{what}: string of {n} bytes exceeds {SIM_MAX_STR}")
        if off + n > len(buf):
            raise ProtocolError(f"{what}: truncated string")
        try:
            return bytes(buf[off:off + n]).decode("utf-8"), off + n
        except UnicodeDecodeError as e:
            raise ProtocolError(f"{what}: not UTF-8") from e
    if kind == "u64[]":
        if off + 4 > len(buf):
            raise ProtocolError(f"{what}: truncated count")
        (n,) = _SCALARS["u32"].unpack_from(buf, off)
        off += 4
        if n > SIM_MAX_ARRAY:
            raise ProtocolError(f"{what}: {n} items exceed {SIM_MAX_ARRAY}")
        if off + 8 * n > len(buf):
            raise ProtocolError(f"{what}: truncated array")
        return list(struct.unpack_from(f"<{n}Q", buf, off)), off + 8 * n
    raise AssertionError(f"unknown field kind {kind}")


def _frame(mtype: int, nr_fds: int, req_id: int, payload: bytes) -> bytes:
    if len(payload) > SIM_MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {SIM_MAX_PAYLOAD}")
    if not 0 <= nr_fds <= SIM_MAX_FDS:
        raise ValueError(f"{nr_fds} fds exceed {SIM_MAX_FDS}")
    return HDR.pack(mtype, nr_fds, req_id & 0xFFFFFFFF, len(payload)) + payload


def encode_request(op: SimOp, req_id: int, **args: Any) -> bytes:
    """Bytes of one request; raises ValueError for arguments that do not fit the schema."""
    req_fields, _, _ = SCHEMA[op]
    return _frame(int(op), 0, req_id, _pack_fields(req_fields, args))


def encode_reply(op: SimOp, req_id: int, rc: int = 0, reason: str = "", **result: Any) -> bytes:
    """Bytes of one reply.  ``rc`` is 0 or ``-errno``; on error only ``reason`` travels.  A
    successful reply announces the op's fixed number of fds (:data:`SCHEMA`), which the
    transport must attach."""
    _, res_fields, nr_fds = SCHEMA[op]
    if rc > 0:
        raise ValueError("rc must be 0 or a negative errno")
    if rc == 0:
        payload = _RC.pack(0) + _pack_fields(res_fields, result)
    else:
        payload = _RC.pack(rc) + _pack_one("str", reason[:SIM_MAX_STR // 4], "reason")
        nr_fds = 0
    return _frame(int(op) | SIM_REPLY, nr_fds, req_id, payload)


def decode_message(mtype: int, nr_fds: int, req_id: int, payload: memoryview) -> Message:
    """One message from its header fields and payload; ProtocolError if it is not valid."""
    is_reply = bool(mtype & SIM_REPLY)
    try:
        op = SimOp(mtype & ~SIM_REPLY)
    except ValueError as e:
        raise ProtocolError(f"unknown op {mtype & ~SIM_REPLY}") from e
    req_fields, res_fields, reply_fds = SCHEMA[op]
    if not is_reply:
        if nr_fds:
            raise ProtocolError(f"{op.name}: requests carry no fds, got {nr_fds}")
        return Request(op, req_id, _unpack_fields(req_fields, payload, op.name))
    if len(payload) < 4:
        raise ProtocolError(f"{op.name} reply: truncated rc")
    (rc,) = _RC.unpack_from(payload, 0)
    if rc > 0:
        raise ProtocolError(f"{op.name} reply: positive rc {rc}")
    if rc < 0:
        if nr_fds:
            raise ProtocolError(f"{op.name} error reply carries fds")
        reason = _unpack_fields((("reason", "str"),), payload[4:], op.name)["reason"]
        return Reply(op, req_id, rc, reason=reason)
    if nr_fds != reply_fds:
        raise ProtocolError(f"{op.name} reply: expected {reply_fds} fds, got {nr_fds}")
    return Reply(op, req_id, 0, _unpack_fields(res_fields, payload[4:], op.name),
                 nr_fds=nr_fds)


class Decoder:
    """Incremental framing: feed bytes as they arrive, take complete messages out.

    A framing error (oversized payload, unknown op, bad fields) raises ProtocolError; the
    decoder is then unusable, as the byte stream has lost its framing, and the caller closes
    the connection.
    """

    def __init__(self, max_payload: int = SIM_MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self._max_payload = max_payload
        self._broken = False

    def feed(self, data: bytes) -> list[Message]:
        if self._broken:
            raise ProtocolError("decoder already failed")
        self._buf += data
        out: list[Message] = []
        try:
            while len(self._buf) >= HDR_SIZE:
                mtype, nr_fds, req_id, length = HDR.unpack_from(self._buf, 0)
                if length > self._max_payload:
                    raise ProtocolError(f"payload of {length} bytes exceeds "
                                        f"{self._max_payload}")
                if nr_fds > SIM_MAX_FDS:
                    raise ProtocolError(f"{nr_fds} fds exceed {SIM_MAX_FDS}")
                if len(self._buf) < HDR_SIZE + length:
                    break
                payload = memoryview(bytes(self._buf[HDR_SIZE:HDR_SIZE + length]))
                del self._buf[:HDR_SIZE + length]
                out.append(decode_message(mtype, nr_fds, req_id, payload))
        except ProtocolError:
            self._broken = True
            raise
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)


# -- event delivery --------------------------------------------------------------------------------

EVTCHN_DELIVERY = struct.Struct("<I")
"""What travels on an event-channel handle's socket (SOCK_SEQPACKET), one local port per
datagram: host to client, a fired port, as ``read()`` on ``/dev/xen/evtchn`` yields
``evtchn_port_t`` values; client to host, a notify of that port (``IOCTL_EVTCHN_NOTIFY``)."""


def encode_delivery(port: int) -> bytes:
    return EVTCHN_DELIVERY.pack(port)


def decode_delivery(data: bytes) -> int:
    if len(data) != EVTCHN_DELIVERY.size:
        raise ProtocolError(f"delivery of {len(data)} bytes, expected {EVTCHN_DELIVERY.size}")
    return EVTCHN_DELIVERY.unpack(data)[0]
