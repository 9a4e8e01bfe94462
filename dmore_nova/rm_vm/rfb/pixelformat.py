"""RFB PIXEL_FORMAT (rfbproto 7.4) and conversion from the server's native pixels.

The server keeps every framebuffer as a ``numpy.uint32`` array of shape (height, width) whose
values are ``0x00RRGGBB``: this is exactly what a little-endian 32-bpp Linux framebuffer (and
xen-fbfront at depth 24/32) holds in memory, so a guest framebuffer can back a display without
a copy.  Clients may ask for any true-colour format; :func:`convert` produces it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

_PF = struct.Struct(">BBBBHHHBBB3x")
SIZE = _PF.size  # 16


class PixelFormatError(ValueError):
    """A client asked for a pixel format the server cannot serve (reason in the message)."""


@dataclass(frozen=True)
class PixelFormat:
    bits_per_pixel: int
    depth: int
    big_endian: bool
    true_colour: bool
    red_max: int
    green_max: int
    blue_max: int
    red_shift: int
    green_shift: int
    blue_shift: int

    @classmethod
    def unpack(cls, data: bytes) -> PixelFormat:
        bpp, depth, be, tc, rmax, gmax, bmax, rsh, gsh, bsh = _PF.unpack(data)
        return cls(bpp, depth, bool(be), bool(tc), rmax, gmax, bmax, rsh, gsh, bsh)

    def pack(self) -> bytes:
        return _PF.pack(
            self.bits_per_pixel, self.depth, int(self.big_endian), int(self.true_colour),
            self.red_max, self.green_max, self.blue_max,
            self.red_shift, self.green_shift, self.blue_shift,
        )

    @property
    def bytes_per_pixel(self) -> int:
        return self.bits_per_pixel // 8

    def validate(self) -> None:
        """Raise PixelFormatError unless this is a true-colour format we can produce.

        Colour-map formats are refused (rfbproto allows a server to only support true colour
        if it never sends SetColourMapEntries... but then a colour-map client cannot work, so
        we close with a clear reason instead of sending garbage).
        """
        if self.bits_per_pixel not in (8, 16, 32):
            raise PixelFormatError(f"bits-per-pixel {self.bits_per_pixel} not in 8/16/32")
        if not self.true_colour:
            raise PixelFormatError("colour-map pixel formats are not supported")
        if not 1 <= self.depth <= self.bits_per_pixel:
            raise PixelFormatError(f"depth {self.depth} invalid for {self.bits_per_pixel} bpp")
        for name, mx, sh in (("red", self.red_max, self.red_shift),
                             ("green", self.green_max, self.green_shift),
                             ("blue", self.blue_max, self.blue_shift)):
            if mx == 0 or mx & (mx + 1):
                raise PixelFormatError(f"{name}-max {mx} is not 2^n-1")
            if mx.bit_length() + sh > self.bits_per_pixel:
                raise PixelFormatError(f"{name} channel does not fit in {self.bits_per_pixel} bpp")

    @property
    def is_native(self) -> bool:
        """True when the client format equals the server's native 0x00RRGGBB little-endian."""
        return self.bytes_per_pixel == 4 and _same_channels(self, NATIVE) and (
            not self.big_endian)


def _same_channels(a: PixelFormat, b: PixelFormat) -> bool:
    return (a.red_max, a.green_max, a.blue_max, a.red_shift, a.green_shift, a.blue_shift) == (
        b.red_max, b.green_max, b.blue_max, b.red_shift, b.green_shift, b.blue_shift)


#: The server's own format; also what ServerInit announces.
NATIVE = PixelFormat(32, 24, False, True, 255, 255, 255, 16, 8, 0)


def _channel(px: np.ndarray, shift_in: int, maximum: int, shift_out: int) -> np.ndarray:
    c = (px >> np.uint32(shift_in)) & np.uint32(0xFF)
    if maximum != 255:
        # Round-to-nearest scaling from 8 bits to the client's channel width.
        c = (c * np.uint32(maximum) + np.uint32(127)) // np.uint32(255)
    return c << np.uint32(shift_out)


def to_client_values(px: np.ndarray, pf: PixelFormat) -> np.ndarray:
    """Native 0x00RRGGBB pixels -> uint32 pixel values in the client's channel layout."""
    if _same_channels(pf, NATIVE):
        return px & np.uint32(0x00FFFFFF)
    return (_channel(px, 16, pf.red_max, pf.red_shift)
            | _channel(px, 8, pf.green_max, pf.green_shift)
            | _channel(px, 0, pf.blue_max, pf.blue_shift))


def convert(px: np.ndarray, pf: PixelFormat) -> bytes:
    """Native pixels (any shape) -> the client's wire bytes (bpp and endianness), row-major."""
    if pf.is_native:
        return np.ascontiguousarray(px).tobytes()
    vals = to_client_values(px, pf)
    order = ">" if pf.big_endian else "<"
    dtype = {1: np.uint8, 2: np.dtype(order + "u2"), 4: np.dtype(order + "u4")}[pf.bytes_per_pixel]
    return vals.astype(dtype).tobytes()
