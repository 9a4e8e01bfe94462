"""Hextile encoding (rfbproto 7.7.5): 16x16 tiles, each raw or background + subrectangles.

All analysis is vectorised over every tile of the rectangle at once: tiles are cut with one
reshape (the right/bottom edge tiles are padded by repeating their own last row/column, which
keeps each tile's set of colours unchanged), solid tiles are found with one comparison, and
subrectangles for all remaining tiles come from one pass of run detection plus a sort that
stacks identical horizontal runs of consecutive rows into taller subrectangles.  The only
Python loop is the final walk over tiles that writes bytes and tracks the background and
foreground that carry over from tile to tile.

Carry-over rules, chosen so that every decoder in the wild agrees with us:

* background and foreground are re-specified after a Raw tile (the spec leaves them undefined;
  noVNC even ignores a subencoding-0 tile right after a Raw one);
* the foreground is re-specified after a SubrectsColoured tile (vncdotool carries the last
  subrect's colour over as foreground, noVNC does not).
"""

from __future__ import annotations

import numpy as np

from dmore_nova.rm_vm.rfb.display import Rect
from dmore_nova.rm_vm.rfb.encodings._pixels import PixelCodec, pad_edge, pixel_codec
from dmore_nova.rm_vm.rfb.encodings.base import Encoder, rect_header
from dmore_nova.rm_vm.rfb.pixelformat import PixelFormat

ENC_HEXTILE = 5
TILE = 16

# subencoding-mask bits (rfbproto names)
RAW = 1
BACKGROUND_SPECIFIED = 2
FOREGROUND_SPECIFIED = 4
ANY_SUBRECTS = 8
SUBRECTS_COLOURED = 16

#: The number-of-subrectangles field is a U8.
MAX_SUBRECTS = 255
#: A tile whose raster-order colour changes exceed this is sent Raw without looking for
#: subrectangles: half its pixels start a new run, so subrectangles (2 bytes or more each)
#: cannot beat raw pixels by much, and photos would pay for the search on every tile.
RAW_CHANGE_LIMIT = 128

_KIND_SOLID, _KIND_SUBRECTS, _KIND_RAW = 0, 1, 2


class HextileEncoder(Encoder):
    encoding = ENC_HEXTILE

    def _encode(self, view: np.ndarray, rect: Rect, pf: PixelFormat) -> list[bytes]:
        codec = pixel_codec(pf)
        body = encode_hextile(codec.keys(view), codec)
        return [rect_header(rect.x, rect.y, rect.w, rect.h, ENC_HEXTILE) + body]


def _tiles(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(h, w) keys -> (n, 256) tiles in transmission order, tile heights, widths, tiles/row."""
    h, w = keys.shape
    nty, ntx = -(-h // TILE), -(-w // TILE)
    tiles = pad_edge(keys, TILE).reshape(nty, TILE, ntx, TILE).swapaxes(1, 2)
    tiles = tiles.reshape(nty * ntx, TILE * TILE)
    row_h = np.full(nty, TILE)
    row_h[-1] = h - TILE * (nty - 1)
    col_w = np.full(ntx, TILE)
    col_w[-1] = w - TILE * (ntx - 1)
    return tiles, np.repeat(row_h, ntx), np.tile(col_w, nty), ntx


def _subrects(tiles: np.ndarray, tile_h: np.ndarray, tile_w: np.ndarray) -> dict[str, np.ndarray]:
    """Background and subrectangles for (m, 256) non-solid tiles, all tiles at once.

    The background is each tile's most frequent colour.  Subrectangles are maximal horizontal
    runs of one non-background colour, stacked vertically while the run below has the same
    x-extent and colour.  Every tile gets at least one subrectangle (it is not solid).
    """
    m = tiles.shape[0]
    rows = np.arange(m)
    # Most frequent colour per tile: sort each tile, find its longest run of equal values
    # (runs of all tiles at once; a run's score is length * 256 + position in its tile, so
    # one maximum per tile gives both the length and where that colour is).
    srt = np.sort(tiles, axis=1).reshape(-1)
    newrun = np.empty(srt.size, bool)
    newrun[0] = True
    np.not_equal(srt[1:], srt[:-1], out=newrun[1:])
    newrun[::TILE * TILE] = True
    starts = np.flatnonzero(newrun)
    score = (np.diff(starts, append=srt.size) << 8) | (255 - (starts & 255))
    best = np.maximum.reduceat(score, np.flatnonzero((starts & 255) == 0))
    bg = srt.reshape(m, TILE * TILE)[rows, 255 - (best & 255)]

    t3 = tiles.reshape(m, TILE, TILE)
    ys = np.arange(TILE)[None, :, None]
    xs = np.arange(TILE)[None, None, :]
    inside = (ys < tile_h[:, None, None]) & (xs < tile_w[:, None, None])
    fgmask = (t3 != bg[:, None, None]) & inside
    same_left = np.zeros_like(fgmask)
    same_left[:, :, 1:] = fgmask[:, :, 1:] & fgmask[:, :, :-1] & (t3[:, :, 1:] == t3[:, :, :-1])
    start = fgmask & ~same_left
    end = fgmask.copy()
    end[:, :, :-1] &= ~same_left[:, :, 1:]
    sidx = np.flatnonzero(start)
    eidx = np.flatnonzero(end)
    tile = sidx >> 8
    y = (sidx >> 4) & 15
    x0 = sidx & 15
    x1 = eidx & 15
    colour = tiles.reshape(-1)[sidx]
    # Stack runs: sort by (tile, x0, x1, colour, y); a run continues the previous one when
    # everything but y matches and y is one more.
    order = np.lexsort((y, colour, x1, x0, tile))
    tile, y, x0, x1, colour = tile[order], y[order], x0[order], x1[order], colour[order]
    cont = np.zeros(tile.size, bool)
    cont[1:] = ((tile[1:] == tile[:-1]) & (x0[1:] == x0[:-1]) & (x1[1:] == x1[:-1])
                & (colour[1:] == colour[:-1]) & (y[1:] == y[:-1] + 1))
    heads = np.flatnonzero(~cont)
    heights = np.diff(np.append(heads, tile.size))
    tile, y, x0, x1, colour = tile[heads], y[heads], x0[heads], x1[heads], colour[heads]
    counts = np.bincount(tile, minlength=m)
    offsets = np.zeros(m + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    firsts = offsets[:-1]
    mono = np.minimum.reduceat(colour, firsts) == np.maximum.reduceat(colour, firsts)
    return {
        "bg": bg, "fg": colour[firsts], "mono": mono, "counts": counts, "offsets": offsets,
        "colour": colour,
        "xy": ((x0 << 4) | y).astype(np.uint8),
        "wh": (((x1 - x0) << 4) | (heights - 1)).astype(np.uint8),
    }


def encode_hextile(keys: np.ndarray, codec: PixelCodec) -> bytes:
    """The Hextile payload for a (h, w) array of keys (no rectangle header)."""
    bpp = codec.size
    tiles, tile_h, tile_w, ntx = _tiles(keys)
    n = tiles.shape[0]
    first = tiles[:, 0]
    solid = (tiles == first[:, None]).all(axis=1)
    changes = np.count_nonzero(tiles[:, 1:] != tiles[:, :-1], axis=1)
    cand = np.flatnonzero(~solid & (changes <= RAW_CHANGE_LIMIT))

    kind = np.full(n, _KIND_RAW, np.int8)
    kind[solid] = _KIND_SOLID
    slot = np.full(n, -1, np.int64)
    if cand.size:
        sr = _subrects(tiles[cand], tile_h[cand], tile_w[cand])
        counts, mono = sr["counts"], sr["mono"]
        size = np.where(mono, bpp + 2 * counts, (bpp + 2) * counts) + bpp + 1
        use = (counts <= MAX_SUBRECTS) & (size < tile_h[cand] * tile_w[cand] * bpp)
        kind[cand[use]] = _KIND_SUBRECTS
        slot[cand] = np.arange(cand.size)
        sub_colour = codec.encode(sr["colour"])
        coloured = np.empty((sub_colour.shape[0], bpp + 2), np.uint8)
        coloured[:, :bpp] = sub_colour
        coloured[:, bpp] = sr["xy"]
        coloured[:, bpp + 1] = sr["wh"]
        coloured_b = coloured.tobytes()
        plain_b = np.stack([sr["xy"], sr["wh"]], axis=1).tobytes()
        bg_l, fg_l = sr["bg"].tolist(), sr["fg"].tolist()
        bg_b, fg_b = codec.encode(sr["bg"]).tobytes(), codec.encode(sr["fg"]).tobytes()
        mono_l, count_l, off_l = mono.tolist(), counts.tolist(), sr["offsets"].tolist()

    first_l = first.tolist()
    first_b = codec.encode(first).tobytes()
    wire = codec.encode(keys) if (kind == _KIND_RAW).any() else None
    kind_l, slot_l = kind.tolist(), slot.tolist()
    parts: list[bytes] = []
    bg_prev: int | None = None
    fg_prev: int | None = None
    for i in range(n):
        k = kind_l[i]
        if k == _KIND_SOLID:
            colour = first_l[i]
            if colour == bg_prev:
                parts.append(b"\x00")
            else:
                parts.append(b"\x02" + first_b[i * bpp:(i + 1) * bpp])
                bg_prev = colour
        elif k == _KIND_SUBRECTS:
            j = slot_l[i]
            sub = ANY_SUBRECTS
            extra = b""
            if bg_l[j] != bg_prev:
                sub |= BACKGROUND_SPECIFIED
                extra = bg_b[j * bpp:(j + 1) * bpp]
                bg_prev = bg_l[j]
            o0, o1 = off_l[j], off_l[j + 1]
            if mono_l[j]:
                if fg_l[j] != fg_prev:
                    sub |= FOREGROUND_SPECIFIED
                    extra += fg_b[j * bpp:(j + 1) * bpp]
                    fg_prev = fg_l[j]
                data = plain_b[2 * o0:2 * o1]
            else:
                sub |= SUBRECTS_COLOURED
                data = coloured_b[(bpp + 2) * o0:(bpp + 2) * o1]
                fg_prev = None
            parts.append(bytes((sub,)) + extra + bytes((count_l[j],)) + data)
        else:
            assert wire is not None
            ty, tx = divmod(i, ntx)
            y0, x0 = ty * TILE, tx * TILE
            parts.append(b"\x01")
            parts.append(wire[y0:y0 + TILE, x0:x0 + TILE].tobytes())
            bg_prev = fg_prev = None
    return b"".join(parts)
