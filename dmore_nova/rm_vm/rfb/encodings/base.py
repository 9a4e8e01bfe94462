"""The encoder interface and the rectangle header every encoding shares.

An :class:`Encoder` turns a rectangle of the server's framebuffer into complete RFB rectangles
(rfbproto "FramebufferUpdate": a 12-byte header then the encoding's payload).  Encoders with
compression keep zlib streams that the client mirrors, so an instance belongs to exactly one
viewer connection and must see that viewer's rectangles in the order they are sent.
"""

from __future__ import annotations

import abc
import struct
from typing import ClassVar

import numpy as np

from dmore_nova.rm_vm.rfb.display import Rect
from dmore_nova.rm_vm.rfb.pixelformat import PixelFormat

#: x, y, width, height (U16) and encoding-type (S32), network order.
RECT_HEADER = struct.Struct(">HHHHi")
#: Rectangle coordinates and sizes are U16 on the wire.
MAX_COORD = 0xFFFF
#: Quality (-32..-23) and compression (-256..-247) pseudo-encodings both carry levels 0..9.
MIN_LEVEL, MAX_LEVEL = 0, 9


class EncodingError(ValueError):
    """The server asked an encoder for something it cannot produce (reason in the message)."""


def rect_header(x: int, y: int, w: int, h: int, encoding: int) -> bytes:
    return RECT_HEADER.pack(x, y, w, h, encoding)


def _check_level(name: str, level: int | None) -> int | None:
    if level is None:
        return None
    if not isinstance(level, int) or not MIN_LEVEL <= level <= MAX_LEVEL:
        raise EncodingError(f"{name} level {level!r} not in {MIN_LEVEL}..{MAX_LEVEL}")
    return level


class Encoder(abc.ABC):
    """One viewer's encoder for one encoding type.

    ``quality`` is the client's JPEG quality level (None: the client asked for none, so only
    lossless output); ``compression`` its compression level (None: the encoder's default).
    """

    encoding: ClassVar[int]

    def __init__(self, *, quality: int | None = None, compression: int | None = None) -> None:
        self.quality: int | None = None
        self.compression: int | None = None
        self._checked_pf: PixelFormat | None = None
        self.set_levels(quality, compression)

    def set_levels(self, quality: int | None, compression: int | None) -> None:
        """Adopt new levels (a later SetEncodings).  Takes effect from the next rectangle."""
        self.quality = _check_level("quality", quality)
        self.compression = _check_level("compression", compression)

    def encode(self, fb: np.ndarray, rect: Rect, pf: PixelFormat) -> list[bytes]:
        """Encode ``rect`` of ``fb`` for a client using ``pf``.

        Returns complete rectangles (header + payload), possibly several when the encoding
        must split (Tight); an empty rectangle gives an empty list.  Raises
        :class:`EncodingError` (or :class:`PixelFormatError`) for a bad framebuffer, a
        rectangle outside it, or a pixel format the server cannot produce, never an
        IndexError from deep inside numpy.
        """
        if not isinstance(fb, np.ndarray) or fb.dtype != np.uint32 or fb.ndim != 2:
            raise EncodingError("framebuffer must be a 2-D uint32 array")
        if rect.empty:
            return []
        height, width = fb.shape
        if rect.x < 0 or rect.y < 0 or rect.x + rect.w > width or rect.y + rect.h > height:
            raise EncodingError(f"{rect} is outside the {width}x{height} framebuffer")
        if max(rect.x, rect.y, rect.w, rect.h) > MAX_COORD:
            raise EncodingError(f"{rect} does not fit RFB's 16-bit coordinates")
        if pf is not self._checked_pf:
            pf.validate()
            self._checked_pf = pf
        view = fb[rect.y:rect.y + rect.h, rect.x:rect.x + rect.w]
        return self._encode(view, rect, pf)

    @abc.abstractmethod
    def _encode(self, view: np.ndarray, rect: Rect, pf: PixelFormat) -> list[bytes]:
        """Encode the non-empty, in-bounds ``view`` (= ``fb`` cut to ``rect``)."""
