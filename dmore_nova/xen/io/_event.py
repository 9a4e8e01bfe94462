"""Shared machinery for fixed-layout ring events (private helper for kbdif/fbif)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from ._layout import Field, make_struct

__all__ = ["RingEvent", "UnknownEvent"]


@dataclass(frozen=True)
class UnknownEvent:
    """A slot whose ``type`` (or sub-type) this codec does not know.

    Returned instead of raising, because the headers tell consumers to ignore unknown events
    (fbif.h: "Frontends should ignore unknown in events"; QEMU and Linux skip them), while the
    caller still gets to log what it skipped.  ``raw`` is the full slot copy.
    """

    type: int
    raw: bytes
    reason: str = "unknown event type"


class RingEvent:
    """Base for the event dataclasses: ``pack()`` to a full slot, ``unpack()`` from one.

    Subclasses declare ``TYPE`` (the ``*_TYPE_*`` constant), ``C_STRUCT`` (the C struct name),
    ``C_SIZEOF`` (its ``sizeof``), ``EVENT_SIZE`` (the slot size) and ``FIELDS`` (first field
    is always ``type``).  ``C_FIELDS`` defaults to ``FIELDS``; it lists every C member for the
    header test (unions list all arms there).
    """

    TYPE: ClassVar[int]
    C_STRUCT: ClassVar[str]
    C_SIZEOF: ClassVar[int]
    EVENT_SIZE: ClassVar[int]
    FIELDS: ClassVar[tuple[Field, ...]]
    C_FIELDS: ClassVar[tuple[Field, ...]]
    _STRUCT: ClassVar[struct.Struct]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "FIELDS" in cls.__dict__:
            if cls.FIELDS[0].c_path != "type" or cls.FIELDS[0].offset != 0:
                raise ValueError(f"{cls.__name__}: first field must be type@0")
            cls._STRUCT = make_struct(cls.FIELDS, cls.C_SIZEOF)
            if "C_FIELDS" not in cls.__dict__:
                cls.C_FIELDS = cls.FIELDS
            if cls.C_SIZEOF > cls.EVENT_SIZE:
                raise ValueError(f"{cls.__name__}: struct larger than its slot")

    def _values(self) -> list[Any]:
        return [self.TYPE] + [getattr(self, f.name) for f in self.FIELDS[1:]]

    def pack(self) -> bytes:
        """Encode as one zero-padded ``EVENT_SIZE`` slot (C: ``memset`` then assign)."""
        try:
            raw = self._STRUCT.pack(*self._values())
        except struct.error as exc:
            raise ValueError(f"{type(self).__name__}: field out of range: {exc}") from None
        return raw.ljust(self.EVENT_SIZE, b"\0")

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Self:
        """Decode from the first ``C_SIZEOF`` bytes of ``data``; ValueError on type mismatch."""
        if len(data) < cls.C_SIZEOF:
            raise ValueError(f"{cls.__name__}: need {cls.C_SIZEOF} bytes, got {len(data)}")
        values = cls._STRUCT.unpack_from(data)
        if values[0] != cls.TYPE:
            raise ValueError(f"{cls.__name__}: type byte {values[0]} != {cls.TYPE}")
        return cls._from_values(values[1:])

    @classmethod
    def _from_values(cls, values: tuple[Any, ...]) -> Self:
        """The event from the values of ``FIELDS[1:]``, in order: the dataclass declares its
        fields in that order (a test holds every event to it), so they go in positionally --
        the backend decodes every UPDATE a guest sends, in a PV domain where each Python step
        is ~10x dearer than natively.  A subclass converts here (a C int that is a bool)."""
        return cls(*values)
