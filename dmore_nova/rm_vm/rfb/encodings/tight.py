"""Tight encoding (rfbproto "Tight Encoding", number 7): fill, palette, zlib and JPEG.

A rectangle is first cut into parts (:func:`plan_parts`): no part is wider than 2048 pixels
(a hard protocol limit) and no part but a fill has more than 65536 pixels (TigerVNC's limit,
which keeps every client's buffers small).  Small rectangles (typing) are one part.  Large
ones are classified per 64x64 block, all blocks at once, into one-colour, few-colour and
photo-like blocks, and runs of alike blocks become parts.  Each part is sent as:

* **fill** when it is one colour (one TPIXEL, no zlib);
* **palette** (basic compression, palette filter) when it has 2..16 colours: 1 bit per pixel
  for two colours (rows padded to bytes), else one index byte per pixel; zlib stream 1 for the
  two-colour case, 2 for the others;
* **JPEG** when the client asked for a quality level, its pixel format is TPIXEL-compatible
  (JPEG decodes to 8-bit R, G, B), the part is photo-like and at least 1024 pixels: text and
  UI next to a photo stay lossless;
* else **copy** (basic compression, copy filter): TPIXELs through zlib stream 0.

Basic-compression data shorter than 12 bytes goes out uncompressed (the spec's rule).  The four
zlib streams live in the instance, so it belongs to one connection; each stream is (re)started
with its reset bit set in the compression-control byte the first time this instance uses it and
after a compression-level change, so a fresh instance is safe even on a connection that used
Tight before.  The zlib level is the client's compression level (0 = stored, fastest), 2 if it
sent none.
"""

from __future__ import annotations

import io
import zlib

import numpy as np

from dmore_nova.rm_vm.rfb.display import Rect
from dmore_nova.rm_vm.rfb.encodings._pixels import (
    PixelCodec,
    pad_edge,
    palette_map,
    rgb_image,
    tpixel_codec,
)
from dmore_nova.rm_vm.rfb.encodings.base import Encoder, EncodingError, rect_header
from dmore_nova.rm_vm.rfb.pixelformat import PixelFormat

ENC_TIGHT = 7

#: rfbproto: "the width of any Tight-encoded rectangle cannot exceed 2048 pixels".
TIGHT_MAX_WIDTH = 2048
#: Our limit on pixels per Tight rectangle (TigerVNC's SubRectMaxArea).
TIGHT_MAX_AREA = 65536
#: rfbproto: basic-compression data shorter than this is sent without zlib.
TIGHT_MIN_TO_COMPRESS = 12
#: The compact length holds 7 + 7 + 8 bits.
TIGHT_MAX_COMPACT_LEN = (1 << 22) - 1
#: Palette filter sizes we produce (the filter allows up to 256; beyond 16 colours the index
#: bytes rarely beat JPEG or zlib of the pixels, and finding big palettes costs a full sort).
TIGHT_MAX_PALETTE = 16
#: Parts smaller than this stay lossless even when JPEG is allowed: the JPEG headers alone
#: are ~600 bytes.
TIGHT_JPEG_MIN_AREA = 1024
#: zlib level when the client sent no compression level (TigerVNC's default level).
TIGHT_DEFAULT_ZLIB_LEVEL = 2
#: Rectangles of at most this many pixels are one part (no planning: typing stays cheap).
TIGHT_SMALL_AREA = 8192
#: The planner classifies blocks of this size (one sample of 8x8 pixels each).
TIGHT_BLOCK = 64

# compression-control byte (high nibble) and filter ids, as in rfbproto / TightVNC
TIGHT_FILL = 0x80
TIGHT_JPEG = 0x90
TIGHT_EXPLICIT_FILTER = 0x40
TIGHT_FILTER_COPY = 0
TIGHT_FILTER_PALETTE = 1
TIGHT_FILTER_GRADIENT = 2
# stream ids, as TightVNC/TigerVNC assign them
STREAM_FULL_COLOUR = 0
STREAM_MONO = 1
STREAM_INDEXED = 2

#: JPEG quality level 0..9 -> (libjpeg quality, Pillow subsampling: 2 = 4:2:0, 1 = 4:2:2,
#: 0 = 4:4:4).  TigerVNC's table, so levels mean what users of other servers expect.
JPEG_LEVELS: tuple[tuple[int, int], ...] = (
    (15, 2), (29, 2), (41, 2), (42, 1), (62, 1), (77, 1), (79, 0), (86, 0), (92, 0), (100, 0),
)


def compact_length(n: int) -> bytes:
    """Tight's compact representation: 7 bits per byte with a continuation bit, 3 bytes max."""
    if not 0 <= n <= TIGHT_MAX_COMPACT_LEN:
        raise EncodingError(f"Tight data length {n} exceeds the compact length limit")
    if n < 0x80:
        return bytes((n,))
    if n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    return bytes((n & 0x7F | 0x80, (n >> 7) & 0x7F | 0x80, n >> 14))


class TightEncoder(Encoder):
    encoding = ENC_TIGHT

    def __init__(self, *, quality: int | None = None, compression: int | None = None) -> None:
        self._streams: list[zlib._Compress | None] = [None] * 4
        super().__init__(quality=quality, compression=compression)

    def set_levels(self, quality: int | None, compression: int | None) -> None:
        old = self.compression
        super().set_levels(quality, compression)
        if compression != old:
            # Python's zlib cannot change the level of a running stream (no deflateParams):
            # start new streams and tell the client to reset its own.
            self._streams = [None] * 4

    @property
    def zlib_level(self) -> int:
        return TIGHT_DEFAULT_ZLIB_LEVEL if self.compression is None else self.compression

    def _encode(self, view: np.ndarray, rect: Rect, pf: PixelFormat) -> list[bytes]:
        codec = tpixel_codec(pf)
        keys = codec.keys(view)
        h, w = keys.shape
        jpeg = JPEG_LEVELS[self.quality] if self.quality is not None and codec.tpixel else None
        if h * w <= TIGHT_SMALL_AREA and w <= TIGHT_MAX_WIDTH:
            c0 = int(keys[0, 0])
            if (keys == c0).all():
                return [self._fill(rect.x, rect.y, w, h, c0, codec)]
            return [self._part(keys, rect.x, rect.y, codec, jpeg, None)]
        out = []
        for kind, x, y, pw, ph, colour in plan_parts(keys):
            if kind == _FILL:
                out.append(self._fill(rect.x + x, rect.y + y, pw, ph, colour, codec))
            else:
                out.append(self._part(keys[y:y + ph, x:x + pw], rect.x + x, rect.y + y, codec,
                                      jpeg, kind == _RICH))
        return out

    @staticmethod
    def _fill(x: int, y: int, w: int, h: int, colour: int, codec: PixelCodec) -> bytes:
        return rect_header(x, y, w, h, ENC_TIGHT) + bytes((TIGHT_FILL,)) + codec.pixel(colour)

    def _part(self, part: np.ndarray, x: int, y: int, codec: PixelCodec,
              jpeg: tuple[int, int] | None, rich: bool | None) -> bytes:
        """One part (<= 2048 wide, <= 65536 pixels) -> a complete rectangle.

        ``rich``: True if the planner saw many colours (skip the palette search), False if
        it saw few (stay lossless even when JPEG is allowed: UI and text), None if unknown.
        """
        h, w = part.shape
        header = rect_header(x, y, w, h, ENC_TIGHT)
        found = None if rich else palette_map(part, TIGHT_MAX_PALETTE)
        if found is not None:
            palette, idx = found
            if palette.size == 1:
                return header + bytes((TIGHT_FILL,)) + codec.pixel(int(palette[0]))
            if palette.size == 2:
                stream, data = STREAM_MONO, np.packbits(idx, axis=1).tobytes()
            else:
                stream, data = STREAM_INDEXED, idx.tobytes()
            head = bytes((TIGHT_FILTER_PALETTE, palette.size - 1)) + codec.encode(palette).tobytes()
            return header + self._basic(stream, True, head, data)
        if jpeg is not None and rich is not False and h * w >= TIGHT_JPEG_MIN_AREA:
            buf = io.BytesIO()
            rgb_image(part).save(buf, "JPEG", quality=jpeg[0], subsampling=jpeg[1])
            data = buf.getvalue()
            return header + bytes((TIGHT_JPEG,)) + compact_length(len(data)) + data
        return header + self._basic(STREAM_FULL_COLOUR, False, b"", codec.encode_bytes(part))

    def _basic(self, stream: int, explicit_filter: bool, head: bytes, data: bytes) -> bytes:
        """Basic compression: control byte, [filter id + filter data], then the pixel data,
        raw if shorter than 12 bytes, else compact length + zlib (stream ``stream``)."""
        ctl = stream << 4
        if explicit_filter:
            ctl |= TIGHT_EXPLICIT_FILTER
        if len(data) < TIGHT_MIN_TO_COMPRESS:
            return bytes((ctl,)) + head + data
        z = self._streams[stream]
        if z is None:
            z = self._streams[stream] = zlib.compressobj(self.zlib_level)
            ctl |= 1 << stream          # the client must start a fresh inflate stream too
        comp = z.compress(data) + z.flush(zlib.Z_SYNC_FLUSH)
        return bytes((ctl,)) + head + compact_length(len(comp)) + comp


_FILL, _POOR, _RICH = 0, 1, 2


def plan_parts(keys: np.ndarray) -> list[tuple[int, int, int, int, int, int]]:
    """Cut a rectangle into Tight parts: ``(kind, x, y, w, h, colour)`` relative to it.

    The rectangle is divided into 64x64 blocks, classified for all blocks at once: *fill*
    (one colour: one comparison per pixel), *rich* (an 8x8 sample of the block already shows
    more than 16 colours: photo-like) or *poor* (the rest: UI, text, flat areas).  Each block
    row is then cut into runs of blocks of one class (and one colour for fills), each run
    within the width and area limits; fill runs with the same x-extent and colour in
    consecutive block rows are merged into one tall fill.  Rich parts may go out as JPEG,
    poor ones stay lossless, so text next to a photo stays sharp.
    """
    h, w = keys.shape
    b = TIGHT_BLOCK
    nby, nbx = -(-h // b), -(-w // b)
    padded = pad_edge(keys, b)
    corner = padded[::b, ::b]
    solid = (padded.reshape(nby, b, nbx, b) == corner[:, None, :, None]).all(axis=(1, 3))
    step = b // 8
    sample = padded[step // 2::step, step // 2::step].reshape(nby, 8, nbx, 8)
    sample = np.sort(sample.transpose(0, 2, 1, 3).reshape(nby, nbx, 64), axis=2)
    distinct = 1 + np.count_nonzero(sample[..., 1:] != sample[..., :-1], axis=2)
    cls = np.where(solid, _FILL, np.where(distinct > TIGHT_MAX_PALETTE, _RICH, _POOR)).tolist()
    colours = corner.tolist()

    parts: list[tuple[int, int, int, int, int, int]] = []
    open_fills: dict[tuple[int, int, int], list[int]] = {}     # (x, w, colour) -> [y, h]
    for r in range(nby):
        y = r * b
        bh = min(b, h - y)
        limit = {_FILL: TIGHT_MAX_WIDTH // b,
                 _POOR: max(1, min(TIGHT_MAX_WIDTH, TIGHT_MAX_AREA // bh) // b)}
        limit[_RICH] = limit[_POOR]
        row, row_colours = cls[r], colours[r]
        next_fills: dict[tuple[int, int, int], list[int]] = {}
        c = 0
        while c < nbx:
            kind, colour = row[c], row_colours[c]
            e = c + 1
            while (e < nbx and e - c < limit[kind] and row[e] == kind
                   and (kind != _FILL or row_colours[e] == colour)):
                e += 1
            x = c * b
            bw = min(e * b, w) - x
            if kind == _FILL:
                key = (x, bw, colour)
                fill = open_fills.pop(key, None)
                if fill is None:
                    fill = [y, 0]
                fill[1] += bh
                next_fills[key] = fill
            else:
                parts.append((kind, x, y, bw, bh, 0))
            c = e
        for (x, bw, colour), (fy, fh) in open_fills.items():
            parts.append((_FILL, x, fy, bw, fh, colour))
        open_fills = next_fills
    for (x, bw, colour), (fy, fh) in open_fills.items():
        parts.append((_FILL, x, fy, bw, fh, colour))
    return parts
