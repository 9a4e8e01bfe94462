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

__all__ = ["Field", "make_struct"]


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
