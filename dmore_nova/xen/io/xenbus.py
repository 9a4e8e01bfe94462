"""Xenbus device states (``xen/include/public/io/xenbus.h``, ``enum xenbus_state``).

Both ends of a PV device publish their state as a decimal string in xenstore (``.../state``).
The value read from the frontend's directory is guest-controlled, so :meth:`XenbusState.parse`
accepts only what a correct driver writes (``"%d"`` of a known state) and raises ``ValueError``
with a readable reason otherwise, instead of letting ``int()``/``Enum()`` errors escape.
"""

from __future__ import annotations

import enum

__all__ = ["XENBUS_STATE_MAX_LEN", "XenbusState"]

#: Longest state string accepted from xenstore.  Real drivers write one digit; a few bytes of
#: slack allow leading zeros/whitespace without letting a guest make us parse a huge string.
XENBUS_STATE_MAX_LEN = 16


class XenbusState(enum.IntEnum):
    """``XenbusState*`` with the header's numbering (the ``XenbusState`` prefix dropped)."""

    Unknown = 0
    Initialising = 1
    #: "InitWait: Finished early initialisation but waiting for information from the peer or
    #: hotplug scripts."
    InitWait = 2
    #: Waiting for a connection from the peer (ring/evtchn published).
    Initialised = 3
    Connected = 4
    #: The device is being closed due to an error or an unplug event.
    Closing = 5
    Closed = 6
    #: Reconfiguring: the device is being reconfigured.
    Reconfiguring = 7
    Reconfigured = 8

    @property
    def c_name(self) -> str:
        """The enumerator's name in xenbus.h (``XenbusStateConnected`` ...)."""
        return f"XenbusState{self.name}"

    def to_xenstore(self) -> str:
        """The string written to a ``state`` node (``"%d"`` as Linux and QEMU write it)."""
        return str(int(self))

    @classmethod
    def parse(cls, raw: str | bytes | None) -> XenbusState:
        """Decode a ``state`` node value read from xenstore; ``ValueError`` if it is not one.

        A missing node (``None``) is *not* mapped to Unknown silently: callers decide, because
        Linux treats a missing state as Unknown only when the directory itself is gone.
        """
        if raw is None:
            raise ValueError("xenbus state node missing")
        if isinstance(raw, bytes):
            if len(raw) > XENBUS_STATE_MAX_LEN:
                raise ValueError(f"xenbus state too long ({len(raw)} bytes)")
            try:
                raw = raw.decode("ascii")
            except UnicodeDecodeError:
                raise ValueError("xenbus state is not ASCII") from None
        if len(raw) > XENBUS_STATE_MAX_LEN:
            raise ValueError(f"xenbus state too long ({len(raw)} chars)")
        text = raw.strip(" \t\n\0")
        if not text.isascii() or not text.isdigit():
            raise ValueError(f"xenbus state {raw!r} is not a decimal number")
        value = int(text)
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"xenbus state {value} is not a known XenbusState") from None
