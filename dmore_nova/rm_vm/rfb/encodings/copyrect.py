"""CopyRect encoding (rfbproto 7.7.2): "the pixels at (src_x, src_y) now also belong here".

Not an :class:`~.base.Encoder`: it carries no pixels, so the server emits it when the display
reports a copy (``DisplayListener.copied``) and the client listed CopyRect.
"""

from __future__ import annotations

import struct

from dmore_nova.rm_vm.rfb.display import Rect
from dmore_nova.rm_vm.rfb.encodings.base import MAX_COORD, EncodingError, rect_header

ENC_COPYRECT = 1
_SRC = struct.Struct(">HH")


def copyrect_rect(src_x: int, src_y: int, dst: Rect) -> bytes:
    """A complete CopyRect rectangle: header for ``dst`` + src-x-position, src-y-position."""
    for name, value in (("src_x", src_x), ("src_y", src_y), ("x", dst.x), ("y", dst.y),
                        ("w", dst.w), ("h", dst.h)):
        if not 0 <= value <= MAX_COORD:
            raise EncodingError(f"CopyRect {name}={value} does not fit a U16")
    return rect_header(dst.x, dst.y, dst.w, dst.h, ENC_COPYRECT) + _SRC.pack(src_x, src_y)
