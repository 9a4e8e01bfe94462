"""Pixel plumbing shared by the encoders: comparison keys and wire bytes, whole arrays at once.

Every encoder works in two steps.  First the rectangle is turned into *keys*: one ``uint32``
per pixel such that two pixels look the same on the client exactly when their keys are equal
(solid-tile detection, palettes and runs all compare keys).  Then the keys the encoder decided
to send are turned into wire bytes, ``PIXEL`` (rfbproto), ``CPIXEL`` (ZRLE) or ``TPIXEL``
(Tight).  Both steps are numpy operations over the whole rectangle, never per-pixel Python.

Keys are the client's pixel values (so a 8-bit 332 client sees one colour where the native
framebuffer has several, and gets smaller palettes), except for ``TPIXEL`` formats where the
native ``0x00RRGGBB`` value is already exact (all three channels are 8 bits wide).  The top byte
of native pixels is masked off: guest framebuffers often keep garbage or 0xFF there.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image

from dmore_nova.rm_vm.rfb.pixelformat import NATIVE, PixelFormat, to_client_values

_RGB_MASK = np.uint32(0x00FFFFFF)
_LITTLE = sys.byteorder == "little"
#: Pixels up to which :meth:`PixelCodec.raw_bytes` reorders bytes instead of calling numpy:
#: a glyph, a cursor, a few cells of text -- what a key's echo is.
SMALL_RAW = 64 * 64


def _same_channels(pf: PixelFormat) -> bool:
    return (pf.red_max, pf.green_max, pf.blue_max, pf.red_shift, pf.green_shift,
            pf.blue_shift) == (NATIVE.red_max, NATIVE.green_max, NATIVE.blue_max,
                               NATIVE.red_shift, NATIVE.green_shift, NATIVE.blue_shift)


def _reversed_channels(pf: PixelFormat) -> bool:
    return (pf.red_max, pf.green_max, pf.blue_max, pf.red_shift, pf.green_shift,
            pf.blue_shift) == (255, 255, 255, 0, 8, 16)


def max_client_value(pf: PixelFormat) -> int:
    """The pixel value with every colour bit set (which bits a client pixel can use)."""
    return ((pf.red_max << pf.red_shift) | (pf.green_max << pf.green_shift)
            | (pf.blue_max << pf.blue_shift))


def cpixel_size(pf: PixelFormat) -> tuple[int, int]:
    """ZRLE's CPIXEL: ``(bytes per CPIXEL, offset of those bytes inside the wire PIXEL)``.

    rfbproto: 3 bytes when true-colour, 32 bpp, depth <= 24 and all colour bits fit in the
    least (preferred, by convention) or the most significant 3 bytes.  This is the rule
    TigerVNC's and libvncclient's decoders implement; the most-significant case matters for
    formats like red-shift 24 / green 16 / blue 8.
    """
    if pf.bits_per_pixel == 32 and pf.depth <= 24 and pf.true_colour:
        top = max_client_value(pf)
        if top < 1 << 24:          # least significant 3 bytes
            return 3, (1 if pf.big_endian else 0)
        if top & 0xFF == 0:        # most significant 3 bytes
            return 3, (0 if pf.big_endian else 1)
    return pf.bytes_per_pixel, 0


def is_tpixel(pf: PixelFormat) -> bool:
    """Tight's TPIXEL rule (rfbproto, Tight encoding): 3 bytes R, G, B in that order when the
    format is true-colour, 32 bpp, depth 24 and each channel exactly 8 bits wide, whatever the
    shifts and endianness.  (This differs from ZRLE's CPIXEL rule: a 32-bpp depth-16 client gets
    3-byte CPIXELs in ZRLE but full 4-byte pixels in Tight.)"""
    return (pf.true_colour and pf.bits_per_pixel == 32 and pf.depth == 24
            and pf.red_max == pf.green_max == pf.blue_max == 255)


@dataclass(frozen=True, eq=False)
class PixelCodec:
    """How one client pixel format compares and serialises pixels for one encoding family."""

    pf: PixelFormat
    #: Bytes per encoded pixel on the wire (PIXEL, CPIXEL or TPIXEL size).
    size: int
    #: True: keys are native 0x00RRGGBB and wire pixels are TPIXEL (R, G, B bytes).
    tpixel: bool = False
    #: Offset of the CPIXEL bytes inside the full wire PIXEL.
    offset: int = 0

    # -- keys ----------------------------------------------------------------------------------
    def keys(self, fb: np.ndarray) -> np.ndarray:
        """Native pixels (any 2-D view, possibly strided) -> contiguous uint32 keys."""
        if self.tpixel or _same_channels(self.pf):
            return np.bitwise_and(fb, _RGB_MASK)
        if _reversed_channels(self.pf):
            # R at bit 0, B at bit 16 (noVNC's format): a byte swap and a shift, ~7x faster
            # than converting channel by channel.
            out = np.ascontiguousarray(fb.byteswap())
            out >>= np.uint32(8)
            return out
        return np.ascontiguousarray(to_client_values(fb, self.pf), dtype=np.uint32)

    # -- wire bytes ----------------------------------------------------------------------------
    def encode(self, keys: np.ndarray) -> np.ndarray:
        """Keys of any shape -> uint8 array of shape ``keys.shape + (size,)``."""
        keys = np.asarray(keys, dtype=np.uint32)
        if self.tpixel:
            out = np.empty(keys.shape + (3,), np.uint8)
            out[..., 0] = keys >> np.uint32(16)
            out[..., 1] = keys >> np.uint32(8)
            out[..., 2] = keys
            return out
        pf = self.pf
        order = ">" if pf.big_endian else "<"
        bpp = pf.bytes_per_pixel
        if bpp == 1:
            full = keys.astype(np.uint8)[..., None]
        else:
            wire = np.ascontiguousarray(keys, dtype=np.dtype(order + ("u2" if bpp == 2 else "u4")))
            full = wire.view(np.uint8).reshape(keys.shape + (bpp,))
        if self.size == bpp:
            return full
        return full[..., self.offset:self.offset + self.size]

    def encode_bytes(self, keys: np.ndarray) -> bytes:
        """Keys (2-D, row-major) -> wire bytes.  Fast paths for the common 32-bpp cases."""
        if self.tpixel and keys.ndim == 2 and _LITTLE and keys.size:
            keys = np.ascontiguousarray(keys, dtype=np.uint32)
            h, w = keys.shape
            # Pillow's C unpacker reorders B,G,R,X memory into R,G,B ~3x faster than numpy.
            return Image.frombuffer("RGB", (w, h), keys, "raw", "BGRX", 0, 1).tobytes()
        if not self.tpixel and self.size == 4 and not self.pf.big_endian and _LITTLE:
            # 32-bpp little-endian PIXELs (TigerVNC, noVNC, vncdotool): the keys' memory is
            # the wire -- one call where encode() makes five, each ~30 us in a PV dom0 under
            # emulation (bench/xen_dom0_costs.py), and an echo's glyph is a few hundred bytes.
            return np.ascontiguousarray(keys, dtype=np.uint32).tobytes()
        return self.encode(keys).tobytes()

    @cached_property
    def _raw_swap(self) -> bool | None:
        """For :meth:`raw_bytes`: False if a PIXEL is a native pixel's own 4 bytes with the top
        one zeroed (B, G, R, 0: same channels, 32 bpp little-endian), True if R and B also
        trade places (R, G, B, 0: noVNC's format); None for any other format."""
        pf = self.pf
        if (self.tpixel or self.size != 4 or pf.bits_per_pixel != 32 or pf.big_endian
                or not pf.true_colour or not _LITTLE):
            return None
        if _same_channels(pf):
            return False
        return True if _reversed_channels(pf) else None

    def raw_bytes(self, fb: np.ndarray) -> bytes:
        """Native pixels (any 2-D view) -> Raw's PIXELs, row-major: what
        ``encode_bytes(keys(fb))`` gives.

        For a small rectangle in the formats viewers ask for (TigerVNC, vncdotool: B, G, R, 0;
        noVNC: R, G, B, 0) the bytes of the native pixels are reordered and masked in place:
        one numpy call instead of three.  Why: an echo is a glyph of a few hundred bytes, and in
        a PV dom0 under emulation each numpy call costs tens of µs, and several times that
        right after a system call, which is when an echo is encoded.
        """
        swap = self._raw_swap
        if swap is None or fb.size > SMALL_RAW:
            return self.encode_bytes(self.keys(fb))
        data = bytearray(fb.tobytes())
        if swap:
            data[0::4], data[2::4] = data[2::4], data[0::4]
        data[3::4] = bytes(len(data) >> 2)
        return bytes(data)

    def pixel(self, key: int) -> bytes:
        """One key -> its wire bytes."""
        return self.encode(np.array([key], dtype=np.uint32)).tobytes()


def pixel_codec(pf: PixelFormat) -> PixelCodec:
    """rfbproto PIXEL: the client's bytes-per-pixel and byte order (Raw, Hextile)."""
    return PixelCodec(pf, pf.bytes_per_pixel)


def cpixel_codec(pf: PixelFormat) -> PixelCodec:
    """ZRLE CPIXEL."""
    size, offset = cpixel_size(pf)
    return PixelCodec(pf, size, offset=offset)


def tpixel_codec(pf: PixelFormat) -> PixelCodec:
    """Tight TPIXEL (3 bytes R,G,B) where the rule allows it, else PIXEL."""
    if is_tpixel(pf):
        return PixelCodec(pf, 3, tpixel=True)
    return PixelCodec(pf, pf.bytes_per_pixel)


def rgb_image(keys: np.ndarray) -> Image.Image:
    """Native keys (2-D 0x00RRGGBB) -> a Pillow RGB image (for JPEG), without a numpy pass."""
    h, w = keys.shape
    if _LITTLE:
        return Image.frombuffer("RGB", (w, h), np.ascontiguousarray(keys, dtype=np.uint32),
                                "raw", "BGRX", 0, 1)
    return Image.fromarray(PixelCodec(NATIVE, 3, tpixel=True).encode(keys), "RGB")


def pad_edge(keys: np.ndarray, tile: int) -> np.ndarray:
    """Pad (h, w) keys to whole tiles by repeating the last column and row.

    Every padded pixel copies a pixel of its own tile, so each tile keeps its set of colours
    (solid stays solid, palettes do not grow).  ``np.pad`` does the same ~20x slower on
    small arrays, which matters for the many tiny rectangles of typing.
    """
    h, w = keys.shape
    ph, pw = -(-h // tile) * tile, -(-w // tile) * tile
    if (ph, pw) == (h, w):
        return keys
    out = np.empty((ph, pw), keys.dtype)
    out[:h, :w] = keys
    out[:h, w:] = keys[:, w - 1:w]
    out[h:, :] = out[h - 1:h, :]
    return out


def map_palette(flat: np.ndarray, palette: np.ndarray) -> tuple[np.ndarray, bool]:
    """Indices of ``flat`` into ``palette`` (distinct values) and whether every pixel matched.

    One equality pass per colour: for the <= 16 colours used here this beats a binary search
    (searchsorted) or a gather several times over, and it checks membership for free (the
    palette is distinct, so a pixel matches at most one entry).
    """
    idx = np.zeros(flat.shape, np.uint8)
    hits = 0
    for j, colour in enumerate(palette):
        match = flat == colour
        hits += int(np.count_nonzero(match))
        if j:
            idx += match.view(np.uint8) * np.uint8(j)
    return idx, hits == flat.size


def palette_map(keys: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(palette, indices)`` when ``keys`` has at most ``limit`` (<= 255) distinct values,
    else None.  ``indices`` has the shape of ``keys`` (uint8).

    Cheap when the answer is "many colours" (the usual case for photos): a sample of about a
    thousand pixels is checked first.  When the sample has few colours, one exact pass maps
    every pixel; if some pixels missed (a colour the sample did not see), their colours are
    added round by round (each round adds at least one, so at most ``limit + 1`` rounds over
    shrinking sets of pixels) and the final palette is mapped again.
    """
    flat = keys.reshape(-1)
    n = flat.size
    step = (n // 1024) | 1           # odd, so a power-of-two row width does not alias
    palette = np.unique(flat[::step])
    if palette.size > limit:
        return None
    idx, exact = map_palette(flat, palette)
    if exact:
        return palette, idx.reshape(keys.shape)
    rest = flat[~np.isin(flat, palette)]
    while rest.size:
        palette = np.union1d(palette, np.unique(rest[:4096]))
        if palette.size > limit:
            return None
        rest = rest[~np.isin(rest, palette)]
    idx, exact = map_palette(flat, palette)
    assert exact
    return palette, idx.reshape(keys.shape)


def pack_indices(indices: np.ndarray, bits: int) -> np.ndarray:
    """(h, w) uint8 indices -> rows of ``bits``-bit fields, leftmost pixel in the most
    significant bits, each row padded to a whole byte (ZRLE packed palette, Tight mono)."""
    if bits == 8:
        return indices
    if bits == 1:
        return np.packbits(indices, axis=1)
    h, w = indices.shape
    per = 8 // bits
    wp = -(-w // per) * per
    if wp != w:
        padded = np.zeros((h, wp), np.uint8)
        padded[:, :w] = indices
        indices = padded
    groups = indices.reshape(h, wp // per, per)
    out = np.zeros((h, wp // per), np.uint8)
    for i in range(per):
        out |= groups[:, :, i] << np.uint8(8 - bits * (i + 1))
    return out
