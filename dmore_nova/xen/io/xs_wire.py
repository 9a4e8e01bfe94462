"""The xenstore wire protocol (``xen/include/public/io/xs_wire.h``), sans-IO.

Every message, in both directions, is a ``struct xsd_sockmsg`` header of four ``uint32_t`` in the
machine's byte order (little-endian on the x86/Arm hosts Xen runs on) followed by ``len`` bytes
of payload::

    struct xsd_sockmsg { uint32_t type, req_id, tx_id, len; };

The payload is "generally" a sequence of nul-terminated strings; the exceptions matter and are
why this module has separate helpers instead of one ``split``: a ``WRITE`` request is
``path\\0`` followed by the raw value (no terminator, may contain nuls), and a ``READ`` reply is
the raw value with no terminator.  Replies echo the request's ``req_id`` and ``tx_id`` (xenstored
reuses the request's header and only changes ``type`` and ``len``); watch events carry
``req_id = tx_id = 0`` (Linux's ``/dev/xen/xenbus`` leaves them uninitialised, so clients must
not look at them).  Errors come back as ``XS_ERROR`` with the errno *name* (``"ENOENT\\0"``),
"for portability", from the fixed table :data:`XSD_ERRORS`.

This module is bytes in, :class:`Message` out: :class:`Decoder` reassembles messages from a
stream split anywhere (sockets deliver arbitrary chunks) and :func:`encode` produces the bytes.
The only hard limit of the protocol is :data:`XENSTORE_PAYLOAD_MAX`; a peer announcing more is
broken or hostile, and -- as the C daemon does (``handle_input``: "Client tried to feed us") --
the stream is unrecoverable from there, so the decoder raises :class:`ProtocolError` and stays
failed; the transport's job is to drop that one connection.
"""

from __future__ import annotations

import enum
import errno as _errno
import struct
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "ACK",
    "DOMID_SELF",
    "Decoder",
    "Message",
    "ProtocolError",
    "XENSTORE_ABS_PATH_MAX",
    "XENSTORE_CONNECTED",
    "XENSTORE_ERROR_COMM",
    "XENSTORE_ERROR_NONE",
    "XENSTORE_ERROR_PROTO",
    "XENSTORE_ERROR_RINGIDX",
    "XENSTORE_INTERFACE_CONNECTION",
    "XENSTORE_INTERFACE_ERROR",
    "XENSTORE_INTERFACE_REQ",
    "XENSTORE_INTERFACE_REQ_CONS",
    "XENSTORE_INTERFACE_REQ_PROD",
    "XENSTORE_INTERFACE_RSP",
    "XENSTORE_INTERFACE_RSP_CONS",
    "XENSTORE_INTERFACE_RSP_PROD",
    "XENSTORE_INTERFACE_SERVER_FEATURES",
    "XENSTORE_INTERFACE_SIZE",
    "XENSTORE_PAYLOAD_MAX",
    "XENSTORE_RECONNECT",
    "XENSTORE_REL_PATH_MAX",
    "XENSTORE_RING_SIZE",
    "XENSTORE_SERVER_FEATURE_ERROR",
    "XENSTORE_SERVER_FEATURE_RECONNECTION",
    "XSD_ERRORS",
    "XSD_ERROR_NAMES",
    "XSD_SOCKMSG",
    "XSD_SOCKMSG_SIZE",
    "XS_TYPE_COUNT",
    "XS_WATCH_PATH",
    "XS_WATCH_TOKEN",
    "XS_WRITE_CREATE",
    "XS_WRITE_CREATE_EXCL",
    "XS_WRITE_NONE",
    "XsdSockmsgType",
    "encode",
    "errno_of",
    "iter_encode",
    "pack_error",
    "pack_strings",
    "pack_watch_event",
    "pack_write",
    "unpack_error",
    "unpack_strings",
    "unpack_watch_event",
    "unpack_write",
]


class XsdSockmsgType(enum.IntEnum):
    """``enum xsd_sockmsg_type``: the header's names and numbers (the ``XS_`` prefix kept)."""

    XS_CONTROL = 0
    #: ``#define XS_DEBUG XS_CONTROL`` -- the old name (pyxs still calls it DEBUG).
    XS_DEBUG = 0
    XS_DIRECTORY = 1
    XS_READ = 2
    XS_GET_PERMS = 3
    XS_WATCH = 4
    XS_UNWATCH = 5
    XS_TRANSACTION_START = 6
    XS_TRANSACTION_END = 7
    XS_INTRODUCE = 8
    XS_RELEASE = 9
    XS_GET_DOMAIN_PATH = 10
    XS_WRITE = 11
    XS_MKDIR = 12
    XS_RM = 13
    XS_SET_PERMS = 14
    XS_WATCH_EVENT = 15
    XS_ERROR = 16
    XS_IS_DOMAIN_INTRODUCED = 17
    XS_RESUME = 18
    XS_SET_TARGET = 19
    # 20 was XS_RESTRICT ("has been removed"); xs_wire.h: XS_RESET_WATCHES = XS_SET_TARGET + 2
    XS_RESET_WATCHES = 21
    XS_DIRECTORY_PART = 22
    #: "Guaranteed to remain an invalid type".
    XS_INVALID = 0xFFFF


#: ``XS_TYPE_COUNT``: "Number of valid types" (one past ``XS_DIRECTORY_PART``).
XS_TYPE_COUNT = 23

#: ``enum xs_watch_type``: index of the path and of the token in a ``WATCH_EVENT`` payload.
XS_WATCH_PATH = 0
XS_WATCH_TOKEN = 1

XS_WRITE_NONE = b"NONE"
XS_WRITE_CREATE = b"CREATE"
XS_WRITE_CREATE_EXCL = b"CREATE|EXCL"

#: "Violating this is very bad.  See docs/misc/xenstore.txt."
XENSTORE_PAYLOAD_MAX = 4096
#: "Violating these just gets you an error back".
XENSTORE_ABS_PATH_MAX = 3072
XENSTORE_REL_PATH_MAX = 2048
#: Size of each direction of the shared-page ring (``struct xenstore_domain_interface``).
XENSTORE_RING_SIZE = 1024

# ``struct xenstore_domain_interface`` (the page a guest shares with xenstored): byte offsets.
# Not used by the socket transport; here so a ring transport mirrors the same header.
XENSTORE_INTERFACE_REQ = 0
XENSTORE_INTERFACE_RSP = XENSTORE_RING_SIZE
XENSTORE_INTERFACE_REQ_CONS = 2 * XENSTORE_RING_SIZE
XENSTORE_INTERFACE_REQ_PROD = XENSTORE_INTERFACE_REQ_CONS + 4
XENSTORE_INTERFACE_RSP_CONS = XENSTORE_INTERFACE_REQ_CONS + 8
XENSTORE_INTERFACE_RSP_PROD = XENSTORE_INTERFACE_REQ_CONS + 12
XENSTORE_INTERFACE_SERVER_FEATURES = XENSTORE_INTERFACE_REQ_CONS + 16
XENSTORE_INTERFACE_CONNECTION = XENSTORE_INTERFACE_REQ_CONS + 20
XENSTORE_INTERFACE_ERROR = XENSTORE_INTERFACE_REQ_CONS + 24
XENSTORE_INTERFACE_SIZE = XENSTORE_INTERFACE_REQ_CONS + 28

#: "The ability to reconnect a ring" / "The presence of the "error" field in the ring page".
XENSTORE_SERVER_FEATURE_RECONNECTION = 1
XENSTORE_SERVER_FEATURE_ERROR = 2
#: Values of the ``connection`` field.
XENSTORE_CONNECTED = 0
XENSTORE_RECONNECT = 1
#: Values of the ``error`` field.
XENSTORE_ERROR_NONE = 0
XENSTORE_ERROR_COMM = 1
XENSTORE_ERROR_RINGIDX = 2
XENSTORE_ERROR_PROTO = 3

#: ``DOMID_SELF`` (xen.h): ``IS_DOMAIN_INTRODUCED`` answers "T" for it.
DOMID_SELF = 0x7FF0

#: ``struct xsd_sockmsg``: four ``uint32_t``, little-endian (x86/Arm Xen hosts).
XSD_SOCKMSG = struct.Struct("<IIII")
XSD_SOCKMSG_SIZE = XSD_SOCKMSG.size  # 16

#: ``xsd_errors[]`` in the header's order ("New errors should be added at the end"): the names
#: travel on the wire, the numbers are this platform's errno values (as ``XSD_ERROR(x)``
#: expands to ``{ x, #x }`` with the platform's ``<errno.h>``).
XSD_ERROR_NAMES: tuple[str, ...] = (
    "EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC", "EIO",
    "ENOTEMPTY", "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN", "E2BIG", "EPERM",
)
XSD_ERRORS: tuple[tuple[int, str], ...] = tuple(
    (getattr(_errno, name), name) for name in XSD_ERROR_NAMES)
_ERRNO_BY_NAME = {name: num for num, name in XSD_ERRORS}

#: The ``send_ack`` payload: ``"OK"`` with its terminator.
ACK = b"OK\x00"

_U32_MAX = 0xFFFFFFFF
_NUL = b"\x00"


class ProtocolError(ValueError):
    """The byte stream cannot be a xenstore conversation (and cannot be resynchronised)."""


def errno_of(name: str) -> int:
    """The errno number behind an ``xsd_errors`` name (``KeyError`` if it is not one)."""
    return _ERRNO_BY_NAME[name]


@dataclass(frozen=True, slots=True)
class Message:
    """One ``xsd_sockmsg`` and its payload.

    ``type`` is a plain ``int``: a peer may send a type this side does not know, and the answer
    to that is an ``ENOSYS`` reply echoing it, not a decoding failure.
    """

    type: int
    req_id: int
    tx_id: int
    payload: bytes = b""

    @property
    def type_name(self) -> str:
        """``XS_READ`` etc., or ``"**UNKNOWN**"`` (the C daemon's ``sockmsg_string``)."""
        try:
            return XsdSockmsgType(self.type).name
        except ValueError:
            return "**UNKNOWN**"

    def reply(self, type: int, payload: bytes) -> Message:
        """A reply to this request: same ``req_id`` and ``tx_id``, as xenstored's
        ``send_reply`` (it reuses the request's header)."""
        return Message(type, self.req_id, self.tx_id, payload)

    def encode(self, max_payload: int = XENSTORE_PAYLOAD_MAX) -> bytes:
        return encode(self.type, self.req_id, self.tx_id, self.payload, max_payload=max_payload)


def encode(type: int, req_id: int, tx_id: int, payload: bytes = b"", *,
           max_payload: int = XENSTORE_PAYLOAD_MAX) -> bytes:
    """Header + payload bytes.  ``ValueError`` for a field outside ``uint32_t`` or a payload
    over ``max_payload`` (we never emit what a correct peer must reject)."""
    for name, value in (("type", type), ("req_id", req_id), ("tx_id", tx_id)):
        if not 0 <= value <= _U32_MAX:
            raise ValueError(f"xsd_sockmsg.{name}={value} does not fit uint32_t")
    payload = bytes(payload)
    if len(payload) > max_payload:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {max_payload}")
    return XSD_SOCKMSG.pack(type, req_id, tx_id, len(payload)) + payload


class Decoder:
    """Incremental ``xsd_sockmsg`` reassembly: :meth:`feed` any chunking, get whole messages.

    Limits: a header whose ``len`` exceeds ``max_payload`` (default and maximum
    :data:`XENSTORE_PAYLOAD_MAX`) raises :class:`ProtocolError` before any of its payload is
    buffered, so at most ``XSD_SOCKMSG_SIZE + max_payload - 1`` bytes are ever retained between
    calls.  After an error the decoder is dead (every later :meth:`feed` raises again): the
    stream has lost its framing.
    """

    def __init__(self, max_payload: int = XENSTORE_PAYLOAD_MAX) -> None:
        if not 0 <= max_payload <= XENSTORE_PAYLOAD_MAX:
            raise ValueError(f"max_payload must be within 0..{XENSTORE_PAYLOAD_MAX}")
        self.max_payload = max_payload
        self._buf = bytearray()
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete message held (non-zero at EOF means a truncated message)."""
        return len(self._buf)

    @property
    def failed(self) -> bool:
        return self._error is not None

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        if self._error is not None:
            raise self._error
        self._buf += data
        out: list[Message] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= XSD_SOCKMSG_SIZE:
            type_, req_id, tx_id, length = XSD_SOCKMSG.unpack_from(buf, pos)
            if length > self.max_payload:
                self._error = ProtocolError(
                    f"message announces a {length}-byte payload (limit {self.max_payload}); "
                    f"type={type_} req_id={req_id}")
                del buf[:]
                raise self._error
            end = pos + XSD_SOCKMSG_SIZE + length
            if len(buf) < end:
                break
            out.append(Message(type_, req_id, tx_id, bytes(buf[pos + XSD_SOCKMSG_SIZE:end])))
            pos = end
        del buf[:pos]
        return out


# -- payload helpers ---------------------------------------------------------------------------

def pack_strings(*strings: bytes | str) -> bytes:
    """Each argument nul-terminated, concatenated (``"a\\0b\\0"``).  A ``str`` must be ASCII;
    an embedded nul is refused because it would silently split the argument."""
    parts: list[bytes] = []
    for s in strings:
        b = s.encode("ascii") if isinstance(s, str) else bytes(s)
        if _NUL in b:
            raise ValueError(f"embedded nul in xenstore string {b!r}")
        parts.append(b + _NUL)
    return b"".join(parts)


def unpack_strings(payload: bytes) -> list[bytes]:
    """The nul-terminated strings of ``payload``, as the C daemon's ``get_strings`` counts them:
    bytes after the last nul (an unterminated tail) are not a string and are dropped."""
    parts = bytes(payload).split(_NUL)
    return parts[:-1]


def pack_write(path: bytes | str, value: bytes) -> bytes:
    """``WRITE`` request payload: ``path\\0`` then the value, unterminated."""
    return pack_strings(path) + bytes(value)


def unpack_write(payload: bytes) -> tuple[bytes, bytes] | None:
    """``(path, value)`` of a ``WRITE`` payload, or ``None`` if it has no nul at all."""
    payload = bytes(payload)
    nul = payload.find(_NUL)
    if nul < 0:
        return None
    return payload[:nul], payload[nul + 1:]


def pack_watch_event(path: bytes | str, token: bytes | str) -> bytes:
    """``WATCH_EVENT`` payload: ``path\\0token\\0`` (pyxs splits on nul and drops the last)."""
    return pack_strings(path, token)


def unpack_watch_event(payload: bytes) -> tuple[bytes, bytes] | None:
    """``(path, token)`` of a ``WATCH_EVENT``; ``None`` unless it holds at least two strings."""
    strings = unpack_strings(payload)
    if len(strings) < 2:
        return None
    return strings[XS_WATCH_PATH], strings[XS_WATCH_TOKEN]


def pack_error(name: str) -> bytes:
    """``XS_ERROR`` payload.  Unknown names become ``EINVAL``, as ``send_error`` does for an
    untranslatable errno."""
    if name not in _ERRNO_BY_NAME:
        name = "EINVAL"
    return name.encode("ascii") + _NUL


def unpack_error(payload: bytes) -> str:
    """The error name of an ``XS_ERROR`` payload (``"EINVAL"`` if it is not a known one)."""
    strings = unpack_strings(payload)
    try:
        name = strings[0].decode("ascii") if strings else ""
    except UnicodeDecodeError:
        return "EINVAL"
    return name if name in _ERRNO_BY_NAME else "EINVAL"


def iter_encode(messages: Iterable[Message]) -> bytes:
    """Several messages back to back (what one socket write carries)."""
    return b"".join(m.encode() for m in messages)
