"""Raw encoding (rfbproto 7.7.1): every pixel in the client's format, row by row.

The fallback every client supports; also what a viewer gets when it lists nothing we encode.
"""

from __future__ import annotations

import numpy as np

from dmore_nova.rm_vm.rfb.display import Rect
from dmore_nova.rm_vm.rfb.encodings._pixels import PixelCodec, pixel_codec
from dmore_nova.rm_vm.rfb.encodings.base import Encoder, rect_header
from dmore_nova.rm_vm.rfb.pixelformat import PixelFormat

ENC_RAW = 0


class RawEncoder(Encoder):
    encoding = ENC_RAW
    _codec: PixelCodec | None = None

    def _encode(self, view: np.ndarray, rect: Rect, pf: PixelFormat) -> list[bytes]:
        codec = self._codec
        if codec is None or codec.pf is not pf:
            codec = self._codec = pixel_codec(pf)
        body = codec.raw_bytes(view)
        return [rect_header(rect.x, rect.y, rect.w, rect.h, ENC_RAW) + body]
