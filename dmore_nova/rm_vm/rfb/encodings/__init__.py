"""RFB encoders: Raw, CopyRect, Hextile, ZRLE and Tight, vectorised with numpy.

The server asks :func:`choose_encoding` which encoding to use for a viewer (rfbproto: the
client lists encodings in its order of preference, the server uses the first it supports),
builds one encoder per viewer with :func:`make_encoder`, and calls :meth:`Encoder.encode` for
every dirty rectangle; CopyRect rectangles come from :func:`copyrect_rect`.

Encoders with zlib state mirror the client's inflate streams, so they must not be shared
between viewers nor replaced during a connection (ZRLE cannot recover from a new instance; a
new Tight instance resets the client's streams on first use, so Tight can).
"""

from __future__ import annotations

from collections.abc import Iterable

from dmore_nova.rm_vm.rfb.encodings.base import Encoder, EncodingError, rect_header
from dmore_nova.rm_vm.rfb.encodings.copyrect import ENC_COPYRECT, copyrect_rect
from dmore_nova.rm_vm.rfb.encodings.hextile import ENC_HEXTILE, HextileEncoder
from dmore_nova.rm_vm.rfb.encodings.raw import ENC_RAW, RawEncoder
from dmore_nova.rm_vm.rfb.encodings.tight import ENC_TIGHT, TightEncoder
from dmore_nova.rm_vm.rfb.encodings.zrle import ENC_ZRLE, ZRLEEncoder

#: Pixel encodings we implement (CopyRect is not here: it carries no pixels).
ENCODERS: dict[int, type[Encoder]] = {
    ENC_RAW: RawEncoder,
    ENC_HEXTILE: HextileEncoder,
    ENC_ZRLE: ZRLEEncoder,
    ENC_TIGHT: TightEncoder,
}

#: Quality level pseudo-encodings -32..-23 map to levels 0..9; compression -256..-247 too.
PSEUDO_QUALITY_LEVEL_0 = -32
PSEUDO_COMPRESS_LEVEL_0 = -256


def choose_encoding(client_encodings: Iterable[int]) -> int:
    """The first encoding in the client's list that we implement, else Raw."""
    for enc in client_encodings:
        if enc in ENCODERS:
            return enc
    return ENC_RAW


def requested_levels(client_encodings: Iterable[int]) -> tuple[int | None, int | None]:
    """(quality, compression) levels from a SetEncodings list; None where absent.

    When a client lists several levels of one kind the last one wins, as in TigerVNC and QEMU.
    """
    quality = compression = None
    for enc in client_encodings:
        if PSEUDO_QUALITY_LEVEL_0 <= enc <= PSEUDO_QUALITY_LEVEL_0 + 9:
            quality = enc - PSEUDO_QUALITY_LEVEL_0
        elif PSEUDO_COMPRESS_LEVEL_0 <= enc <= PSEUDO_COMPRESS_LEVEL_0 + 9:
            compression = enc - PSEUDO_COMPRESS_LEVEL_0
    return quality, compression


def make_encoder(encoding: int, *, quality: int | None = None,
                 compression: int | None = None) -> Encoder:
    """A new encoder for one viewer.  Raises EncodingError for an encoding we do not have."""
    try:
        cls = ENCODERS[encoding]
    except KeyError:
        raise EncodingError(f"encoding {encoding} is not implemented") from None
    return cls(quality=quality, compression=compression)


__all__ = [
    "ENCODERS", "ENC_COPYRECT", "ENC_HEXTILE", "ENC_RAW", "ENC_TIGHT", "ENC_ZRLE", "Encoder",
    "EncodingError", "HextileEncoder", "RawEncoder", "TightEncoder", "ZRLEEncoder",
    "choose_encoding", "copyrect_rect", "make_encoder", "rect_header", "requested_levels",
]
