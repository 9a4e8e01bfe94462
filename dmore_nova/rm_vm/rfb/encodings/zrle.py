"""ZRLE encoding (rfbproto 7.7.6): 64x64 tiles of raw / solid / packed-palette / RLE data,
all through one zlib stream per connection.

Per tile, the runs (in raster order, continuing across rows as the spec allows) and the
palette are found with numpy, the exact size of every applicable subencoding is computed from
the run lengths, and the smallest one is written, again with numpy (run-length bytes are
placed by offset arithmetic, not appended one by one).  The Python loop is per 64x64 tile only.

The zlib stream is shared by all rectangles of a connection and the client inflates it in
order, so an instance must live as long as its viewer's connection; it cannot be reset (ZRLE has
no reset flag), which is also why a later compression level only applies if nothing was sent
yet.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from dmore_nova.rm_vm.rfb.display import Rect
from dmore_nova.rm_vm.rfb.encodings._pixels import (
    PixelCodec,
    cpixel_codec,
    map_palette,
    pack_indices,
    pad_edge,
    palette_map,
)
from dmore_nova.rm_vm.rfb.encodings.base import Encoder, rect_header
from dmore_nova.rm_vm.rfb.pixelformat import PixelFormat

ENC_ZRLE = 16
TILE = 64
#: Packed palettes hold 2..16 colours; palette RLE up to 127 (7-bit subencoding).
MAX_PACKED_PALETTE = 16
MAX_RLE_PALETTE = 127
#: zlib level used when the client sent no compression level (TigerVNC's default level).
DEFAULT_ZLIB_LEVEL = 2
_LEN = struct.Struct(">I")


class ZRLEEncoder(Encoder):
    encoding = ENC_ZRLE

    def __init__(self, *, quality: int | None = None, compression: int | None = None) -> None:
        self._zlib: zlib._Compress | None = None
        super().__init__(quality=quality, compression=compression)

    def _stream(self) -> zlib._Compress:
        if self._zlib is None:
            level = DEFAULT_ZLIB_LEVEL if self.compression is None else self.compression
            self._zlib = zlib.compressobj(level)
        return self._zlib

    def _encode(self, view: np.ndarray, rect: Rect, pf: PixelFormat) -> list[bytes]:
        codec = cpixel_codec(pf)
        body = encode_zrle_tiles(codec.keys(view), codec)
        stream = self._stream()
        data = stream.compress(body) + stream.flush(zlib.Z_SYNC_FLUSH)
        return [rect_header(rect.x, rect.y, rect.w, rect.h, ENC_ZRLE) + _LEN.pack(len(data)) + data]


def _length_bytes(lengths: np.ndarray) -> np.ndarray:
    """Bytes needed for each run length (rfbproto: (len-1)//255 bytes of 255, then one)."""
    return (lengths - 1) // 255 + 1


def _rle(lengths: np.ndarray, head_size: int, single: bool) -> tuple[np.ndarray, np.ndarray]:
    """Run bytes: each run is ``head_size`` head bytes (filled in by the caller at the returned
    offsets) then its length bytes; with ``single`` a run of length 1 has no length bytes
    (palette RLE).  Returns (buffer, head offsets)."""
    nlen = _length_bytes(lengths)
    if single:
        nlen = np.where(lengths == 1, 0, nlen)
    sizes = head_size + nlen
    ends = np.cumsum(sizes)
    offs = ends - sizes
    buf = np.full(int(ends[-1]), 255, np.uint8)
    last = lengths > 1 if single else slice(None)
    buf[(ends - 1)[last]] = ((lengths - 1) % 255)[last]
    return buf, offs


def _encode_tile(tile: np.ndarray, wire: np.ndarray, codec: PixelCodec) -> bytes:
    """One tile of keys -> subencoding byte + data (uncompressed)."""
    bpc = codec.size
    th, tw = tile.shape
    n = th * tw
    flat = tile.reshape(-1)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    if change.size == 0:
        return b"\x01" + codec.pixel(int(flat[0]))
    starts = np.concatenate(([0], change))
    lengths = np.diff(np.append(starts, n))
    runs = starts.size
    raw_size = n * bpc
    # Palette: mostly single-pixel runs means only a packed palette could beat raw.
    idx = None
    if runs * 2 > n:
        found = palette_map(tile, MAX_PACKED_PALETTE)
        palette, idx = found if found is not None else (None, None)
    else:
        palette = np.unique(flat[starts])      # every colour starts a run: exact
        if palette.size > MAX_RLE_PALETTE:
            palette = None
    nlen_total = int(_length_bytes(lengths).sum())
    best, choice = raw_size, "raw"
    plain = runs * bpc + nlen_total
    if plain < best:
        best, choice = plain, "plain"
    if palette is not None:
        p = palette.size
        if runs * 2 <= n:
            multi = lengths > 1
            prle = p * bpc + runs + int(_length_bytes(lengths[multi]).sum())
            if prle < best:
                best, choice = prle, "prle"
        if p <= MAX_PACKED_PALETTE:
            bits = 1 if p == 2 else 2 if p <= 4 else 4
            packed = p * bpc + ((tw * bits + 7) // 8) * th
            if packed < best:
                best, choice = packed, "packed"
    if choice == "raw":
        return b"\x00" + wire.tobytes()
    if choice == "plain":
        buf, offs = _rle(lengths, bpc, single=False)
        cp = codec.encode(flat[starts])
        for j in range(bpc):
            buf[offs + j] = cp[:, j]
        return b"\x80" + buf.tobytes()
    assert palette is not None
    pal = codec.encode(palette).tobytes()
    if choice == "packed":
        if idx is None:
            idx = map_palette(flat, palette)[0].reshape(th, tw)
        return bytes((palette.size,)) + pal + pack_indices(idx, bits).tobytes()
    idx = np.searchsorted(palette, flat[starts]).astype(np.uint8)
    buf, offs = _rle(lengths, 1, single=True)
    buf[offs] = idx | np.where(lengths > 1, 0x80, 0).astype(np.uint8)
    return bytes((128 + palette.size,)) + pal + buf.tobytes()


def encode_zrle_tiles(keys: np.ndarray, codec: PixelCodec) -> bytes:
    """The uncompressed ZRLE tile data for a (h, w) array of keys."""
    h, w = keys.shape
    solid_rows = _solid_tiles(keys)
    wire = None
    parts: list[bytes] = []
    for ty in range(0, h, TILE):
        for tx in range(0, w, TILE):
            if solid_rows[ty // TILE][tx // TILE]:
                parts.append(b"\x01" + codec.pixel(int(keys[ty, tx])))
                continue
            if wire is None:
                wire = codec.encode(keys)
            parts.append(_encode_tile(keys[ty:ty + TILE, tx:tx + TILE],
                                      wire[ty:ty + TILE, tx:tx + TILE], codec))
    return b"".join(parts)


def _solid_tiles(keys: np.ndarray) -> list[list[bool]]:
    """Which tiles are one colour, decided for all tiles with one comparison."""
    h, w = keys.shape
    nty, ntx = -(-h // TILE), -(-w // TILE)
    t = pad_edge(keys, TILE).reshape(nty, TILE, ntx, TILE)
    corner = t[:, :1, :, :1]
    return (t == corner).all(axis=(1, 3)).tolist()
