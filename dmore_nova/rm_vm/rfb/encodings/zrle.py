"""ZRLE encoding (rfbproto 7.7.6): 64x64 tiles of raw / solid / packed-palette / RLE data,
all through one zlib stream per connection.

The whole rectangle is analysed at once: its pixels are laid out tile after tile (each tile
in raster order), runs are found in one pass (breaking at tile starts; within a tile runs
continue across rows, as the spec allows), per-tile run counts, run-length byte counts and
palettes (distinct run colours, via one sort of (tile, colour) pairs) come from reductions,
and from those the exact size of every subencoding of every tile.  The bytes of all raw, RLE
and palette-RLE tiles are then built in bulk (run-length bytes are placed by offset
arithmetic); the remaining Python loop per 64x64 tile only slices and joins, plus packing the
indices of packed-palette tiles.

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
    pack_indices,
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


_SOLID, _RAW, _PLAIN, _PRLE, _PACKED = range(5)
_NONE = np.iinfo(np.int64).max


def _tile_order(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(h, w) keys -> (pixels tile after tile, tile widths, tile heights)."""
    h, w = keys.shape
    nfull, edge = divmod(w, TILE)
    chunks: list[np.ndarray] = []
    widths: list[int] = []
    heights: list[int] = []
    for ty in range(0, h, TILE):
        band = keys[ty:ty + TILE]
        th = band.shape[0]
        if nfull:
            full = band[:, :nfull * TILE].reshape(th, nfull, TILE)
            chunks.append(full.transpose(1, 0, 2).reshape(-1))
            widths += [TILE] * nfull
            heights += [th] * nfull
        if edge:
            chunks.append(band[:, nfull * TILE:].reshape(-1))
            widths.append(edge)
            heights.append(th)
    return np.concatenate(chunks), np.array(widths, np.int64), np.array(heights, np.int64)


def _rle_bytes(lengths: np.ndarray, extra: np.ndarray, head: np.ndarray, single: bool
               ) -> tuple[np.ndarray, np.ndarray]:
    """Run bytes for many runs: ``head`` (runs, k) head bytes, then the length bytes
    ((len-1)//255 bytes of 255 and one of (len-1)%255); with ``single`` (palette RLE) a run of
    length 1 has no length bytes.  Returns (buffer, byte offset where each run ends)."""
    k = head.shape[1]
    nlen = extra + 1
    if single:
        nlen[lengths == 1] = 0
    ends = np.cumsum(k + nlen)
    starts = ends - (k + nlen)
    buf = np.full(int(ends[-1]) if ends.size else 0, 255, np.uint8)
    for j in range(k):
        buf[starts + j] = head[:, j]
    has_len = nlen > 0
    buf[(ends - 1)[has_len]] = ((lengths - 1) % 255)[has_len]
    return buf, ends


def _sample_distinct(pixels: np.ndarray, off: np.ndarray, npx: np.ndarray) -> np.ndarray:
    """Distinct colours among 64 pixels spread over each tile (a lower bound of the palette)."""
    pos = off[:-1, None] + (np.arange(64)[None, :] * npx[:, None]) // 64
    sample = np.sort(pixels[pos], axis=1)
    return 1 + np.count_nonzero(sample[:, 1:] != sample[:, :-1], axis=1)


def encode_zrle_tiles(keys: np.ndarray, codec: PixelCodec) -> bytes:
    """The uncompressed ZRLE tile data for a (h, w) array of keys."""
    bpc = codec.size
    pixels, tw, th = _tile_order(keys)
    n_px = pixels.size
    npx = tw * th
    n = npx.size
    off = np.zeros(n + 1, np.int64)
    np.cumsum(npx, out=off[1:])

    # -- runs ------------------------------------------------------------------------------
    brk = np.empty(n_px, bool)
    brk[0] = True
    np.not_equal(pixels[1:], pixels[:-1], out=brk[1:])
    brk[off[:-1]] = True
    starts = np.flatnonzero(brk)
    lengths = np.diff(starts, append=n_px)
    runs = np.add.reduceat(brk.view(np.uint8), off[:-1], dtype=np.int64)
    run_off = np.zeros(n + 1, np.int64)
    np.cumsum(runs, out=run_off[1:])
    run_tile = np.repeat(np.arange(n), runs)
    extra = (lengths - 1) // 255
    extra_sum = np.add.reduceat(extra, run_off[:-1])
    multi = np.add.reduceat((lengths > 1).view(np.uint8), run_off[:-1], dtype=np.int64)

    # -- palettes ----------------------------------------------------------------------------
    # "Runny" tiles (at most one run per two pixels): the palette is the set of run colours,
    # found for all of them with one sort of (tile << 32 | colour).
    runny = runs * 2 <= npx
    sel = runny[run_tile]
    pairs = np.unique((run_tile[sel].astype(np.uint64) << np.uint64(32))
                      | pixels[starts[sel]].astype(np.uint64))
    pal_tile = (pairs >> np.uint64(32)).astype(np.int64)
    pal_val = (pairs & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    psize = np.bincount(pal_tile, minlength=n)
    pal_off = np.zeros(n + 1, np.int64)
    np.cumsum(psize, out=pal_off[1:])
    # "Busy" tiles: only a packed palette could help; find it exactly only where a sample
    # of the tile shows few enough colours.
    busy_pal: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    busy = np.flatnonzero(~runny)
    if busy.size:
        few = busy[_sample_distinct(pixels, off, npx)[busy] <= MAX_PACKED_PALETTE]
        for i in few.tolist():
            found = palette_map(pixels[off[i]:off[i + 1]], MAX_PACKED_PALETTE)
            if found is not None:
                busy_pal[i] = found
                psize[i] = found[0].size

    # -- sizes and choice ----------------------------------------------------------------------
    bits = np.where(psize <= 2, 1, np.where(psize <= 4, 2, 4))
    sizes = np.empty((4, n), np.int64)
    sizes[0] = npx * bpc                                          # raw
    sizes[1] = runs * (bpc + 1) + extra_sum                       # plain RLE
    sizes[2] = np.where(runny & (psize <= MAX_RLE_PALETTE),
                        psize * bpc + runs + multi + extra_sum, _NONE)
    has_packed = (psize >= 2) & (psize <= MAX_PACKED_PALETTE)
    if busy_pal:
        has_packed &= runny | np.isin(np.arange(n), list(busy_pal))
    else:
        has_packed &= runny
    sizes[3] = np.where(has_packed, psize * bpc + (tw * bits + 7) // 8 * th, _NONE)
    kind = np.array([_RAW, _PLAIN, _PRLE, _PACKED])[sizes.argmin(axis=0)]
    kind[runs == 1] = _SOLID

    # -- bulk bytes ------------------------------------------------------------------------
    # CPIXELs of raw tiles (the whole tile order, only if any tile is raw) and solid tiles
    wire_b = codec.encode(pixels).tobytes() if (kind == _RAW).any() else b""
    solid_b = codec.encode(pixels[off[:-1]]).tobytes()
    plain_runs = (kind == _PLAIN)[run_tile]
    plain_b, plain_ends = _rle_bytes(lengths[plain_runs], extra[plain_runs],
                                     codec.encode(pixels[starts[plain_runs]]), single=False)
    plain_b = plain_b.tobytes()
    # Palette index of every run of a runny tile (its colour's rank in the tile's palette).
    pal_runs = sel & ((kind == _PRLE) | (kind == _PACKED))[run_tile]
    run_keys = (run_tile[pal_runs].astype(np.uint64) << np.uint64(32)) | pixels[
        starts[pal_runs]].astype(np.uint64)
    run_idx = (np.searchsorted(pairs, run_keys) - pal_off[run_tile[pal_runs]]).astype(np.uint8)
    pal_lengths = lengths[pal_runs]
    prle_runs = (kind == _PRLE)[run_tile[pal_runs]]
    prle_lengths = pal_lengths[prle_runs]
    heads = (run_idx[prle_runs] | np.where(prle_lengths > 1, 0x80, 0)).astype(np.uint8)
    prle_b, prle_ends = _rle_bytes(prle_lengths, extra[pal_runs][prle_runs], heads[:, None],
                                   single=True)
    prle_b = prle_b.tobytes()
    pal_b = codec.encode(pal_val).tobytes()
    # where each tile's runs start inside the per-kind run arrays
    plain_first = np.cumsum((kind == _PLAIN) * runs) - (kind == _PLAIN) * runs
    pal_first = np.cumsum(((kind == _PRLE) | (kind == _PACKED)) * runs * runny)
    pal_first -= ((kind == _PRLE) | (kind == _PACKED)) * runs * runny
    prle_first = np.cumsum((kind == _PRLE) * runs) - (kind == _PRLE) * runs

    parts: list[bytes] = []
    kind_l, off_l, runs_l = kind.tolist(), off.tolist(), runs.tolist()
    for i in range(n):
        k = kind_l[i]
        if k == _SOLID:
            parts.append(b"\x01" + solid_b[i * bpc:(i + 1) * bpc])
        elif k == _RAW:
            parts.append(b"\x00" + wire_b[off_l[i] * bpc:off_l[i + 1] * bpc])
        elif k == _PLAIN:
            r0 = int(plain_first[i])
            b0 = int(plain_ends[r0 - 1]) if r0 else 0
            b1 = int(plain_ends[r0 + runs_l[i] - 1])
            parts.append(b"\x80" + plain_b[b0:b1])
        elif k == _PRLE:
            r0 = int(prle_first[i])
            b0 = int(prle_ends[r0 - 1]) if r0 else 0
            b1 = int(prle_ends[r0 + runs_l[i] - 1])
            p0, p1 = int(pal_off[i]), int(pal_off[i + 1])
            parts.append(bytes((128 + p1 - p0,)) + pal_b[p0 * bpc:p1 * bpc] + prle_b[b0:b1])
        else:
            shape = (int(th[i]), int(tw[i]))
            if i in busy_pal:
                palette, idx = busy_pal[i]
                pal = codec.encode(palette).tobytes()
                idx = idx.reshape(shape)
            else:
                p0, p1 = int(pal_off[i]), int(pal_off[i + 1])
                pal = pal_b[p0 * bpc:p1 * bpc]
                r0 = int(pal_first[i])
                r1 = r0 + runs_l[i]
                idx = np.repeat(run_idx[r0:r1], pal_lengths[r0:r1]).reshape(shape)
            p = len(pal) // bpc
            parts.append(bytes((p,)) + pal + pack_indices(idx, int(bits[i])).tobytes())
    return b"".join(parts)
