"""Declarative C struct layouts -> :class:`struct.Struct` (private helper for kbdif/fbif).

Each event class lists its fields as ``(C member path, byte offset, struct code)``, i.e. the
numbers ``offsetof()`` gives for the C struct.  The packing format is *derived* from those
offsets (gaps become ``x`` pad bytes), so the offsets are stated once and
``tests/unit/test_xen_headers.py`` can compare exactly these numbers with what GCC computes from
``/usr/include/xen/io/*.h``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .ring import read_u32, write_u32

__all__ = ["Field", "PageField", "make_struct"]


@dataclass(frozen=True)
class Field:
    """One member: ``c_path`` as written in ``offsetof(struct X, c_path)``; ``attr`` in Python."""

    c_path: str
    offset: int
    code: str
    attr: str = ""

    @property
    def name(self) -> str:
        """The Python attribute name (defaults to the last component of the C path)."""
        return self.attr or self.c_path.rsplit(".", 1)[-1]


def make_struct(fields: tuple[Field, ...], size: int) -> struct.Struct:
    """Little-endian struct for ``fields`` (ascending, naturally aligned), padded to ``size``.

    Raises ``ValueError`` at import time if the declaration overlaps or misaligns, so a typo in
    an offset cannot silently produce a wrong wire format.
    """
    fmt = "<"
    pos = 0
    for f in fields:
        width = struct.calcsize("<" + f.code)
        align = struct.calcsize("<" + f.code.lstrip("0123456789"))  # "5s" aligns as "s"
        if f.offset < pos:
            raise ValueError(f"field {f.c_path} at {f.offset} overlaps previous (pos {pos})")
        if f.offset % align:
            raise ValueError(f"field {f.c_path} at {f.offset} not naturally aligned")
        if f.offset > pos:
            fmt += f"{f.offset - pos}x"
        fmt += f.code
        pos = f.offset + width
    if size < pos:
        raise ValueError(f"size {size} smaller than fields ({pos})")
    if size > pos:
        fmt += f"{size - pos}x"
    return struct.Struct(fmt)


class PageField:
    """Descriptor for one scalar member of a shared-page struct (``obj.mv`` is the page).

    Reads and writes go to the page on every access -- never cached, because the other domain
    changes them.  u32 members (the ring indices) go through :func:`.ring.read_u32` /
    :func:`.ring.write_u32`, i.e. one aligned 32-bit access, never byte-wise (``struct``'s
    little-endian codes assemble bytes one at a time, which another CPU could see torn).
    Writes outside the member's C range raise ``ValueError``.
    """

    def __init__(self, field: Field) -> None:
        self.field = field
        self._struct = struct.Struct("<" + field.code)

    def __set_name__(self, owner: type, name: str) -> None:
        self.__doc__ = f"``{self.field.c_path}`` at byte {self.field.offset} ({self.field.code})"

    def __get__(self, obj: object, objtype: type | None = None) -> int:
        if obj is None:
            return self  # type: ignore[return-value]
        mv = obj.mv  # type: ignore[attr-defined]
        if self.field.code == "I":
            return read_u32(mv, self.field.offset)
        return int(self._struct.unpack_from(mv, self.field.offset)[0])

    def __set__(self, obj: object, value: int) -> None:
        if self.field.code == "I":
            write_u32(obj.mv, self.field.offset, value)  # type: ignore[attr-defined]
            return
        try:
            self._struct.pack_into(obj.mv, self.field.offset, value)  # type: ignore[attr-defined]
        except struct.error as exc:
            raise ValueError(f"{self.field.c_path} = {value!r}: {exc}") from None
