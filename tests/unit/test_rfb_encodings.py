"""RFB encoders: every encoding decoded by independent client decoders must give back the
source pixels exactly (Tight JPEG: within a tolerance), for many pixel formats, image kinds,
sizes, offsets, strided framebuffers and sequences of rectangles sharing zlib streams.

Decoders: ``rfb_decoders.ClientFramebuffer`` (reference decoders written from rfbproto for
this test) for all encodings, and vncdotool's own client decoders, driven in-process, for Raw,
CopyRect, Hextile and ZRLE where vncdotool supports the case.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmore_nova.rm_vm.rfb.display import Rect
from dmore_nova.rm_vm.rfb.encodings import (
    ENC_COPYRECT,
    ENC_HEXTILE,
    ENC_RAW,
    ENC_TIGHT,
    ENC_ZRLE,
    ENCODERS,
    EncodingError,
    TightEncoder,
    choose_encoding,
    copyrect_rect,
    make_encoder,
    requested_levels,
)
from dmore_nova.rm_vm.rfb.encodings.tight import (
    TIGHT_MAX_AREA,
    TIGHT_MAX_WIDTH,
    compact_length,
)
from dmore_nova.rm_vm.rfb.pixelformat import NATIVE, PixelFormat, PixelFormatError, to_client_values
from tests.unit.rfb_decoders import (
    ClientFramebuffer,
    DecodeError,
    Reader,
    VncdotoolFramebuffer,
    novnc_available,
    novnc_decode,
)

# -- pixel formats ---------------------------------------------------------------------------
PF_NOVNC = PixelFormat(32, 24, False, True, 255, 255, 255, 0, 8, 16)
PF_BE32 = PixelFormat(32, 24, True, True, 255, 255, 255, 16, 8, 0)
PF_MS3 = PixelFormat(32, 24, False, True, 255, 255, 255, 24, 16, 8)
PF_MS3_BE = PixelFormat(32, 24, True, True, 255, 255, 255, 8, 16, 24)
PF_32_D16 = PixelFormat(32, 16, False, True, 31, 63, 31, 11, 5, 0)
PF_565_LE = PixelFormat(16, 16, False, True, 31, 63, 31, 11, 5, 0)
PF_565_BE = PixelFormat(16, 16, True, True, 31, 63, 31, 11, 5, 0)
PF_555 = PixelFormat(16, 15, False, True, 31, 31, 31, 10, 5, 0)
PF_332 = PixelFormat(8, 8, False, True, 7, 7, 3, 5, 2, 0)
PF_BGR233 = PixelFormat(8, 8, True, True, 7, 7, 3, 0, 3, 6)

FORMATS = {
    "native": NATIVE, "novnc": PF_NOVNC, "be32": PF_BE32, "ms3": PF_MS3, "ms3be": PF_MS3_BE,
    "32d16": PF_32_D16, "565le": PF_565_LE, "565be": PF_565_BE, "555": PF_555, "332": PF_332,
    "bgr233": PF_BGR233,
}
ENCODINGS = {"raw": ENC_RAW, "hextile": ENC_HEXTILE, "zrle": ENC_ZRLE, "tight": ENC_TIGHT}
SENTINEL = np.uint32(0xFFFFFFFF)     # no client pixel value (depth <= 24) can be this


# -- images ----------------------------------------------------------------------------------
def _colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """n distinct 24-bit colours, with random garbage in the unused top byte."""
    base = rng.choice(1 << 24, size=n, replace=False).astype(np.uint32)
    return base | (rng.integers(0, 256, n, dtype=np.uint32) << np.uint32(24))


def make_image(kind: str, h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.integers(0, 1 << 32, size=(h, w), dtype=np.uint32)
    if kind == "solid":
        # One colour, but the top byte varies: it must still count as one colour.
        return np.uint32(0x123456) | (rng.integers(0, 256, (h, w), dtype=np.uint32) << 24)
    if kind in ("two", "five", "sixteen"):
        k = {"two": 2, "five": 5, "sixteen": 16}[kind]
        pal = _colours(rng, k)
        blocks = rng.integers(0, k, size=(-(-h // 4), -(-w // 3)))
        idx = np.repeat(np.repeat(blocks, 4, 0), 3, 1)[:h, :w]
        noise = rng.random((h, w)) < 0.1
        idx = np.where(noise, rng.integers(0, k, (h, w)), idx)
        return pal[idx]
    if kind == "photo":
        y, x = np.mgrid[0:h, 0:w]
        r = (x * 255 // max(w - 1, 1)).astype(np.uint32)
        g = (y * 255 // max(h - 1, 1)).astype(np.uint32)
        b = ((x + 2 * y) % 256).astype(np.uint32)
        img = (r << 16) | (g << 8) | b
        return img ^ (rng.integers(0, 8, (h, w), dtype=np.uint32) * np.uint32(0x010101))
    if kind == "ui":
        img = np.full((h, w), 0x3C3C3C, np.uint32)
        for _ in range(6):          # windows with title bars, glyph-like 2-colour text
            y0, x0 = rng.integers(0, max(h, 1)), rng.integers(0, max(w, 1))
            y1, x1 = min(h, y0 + rng.integers(4, 200)), min(w, x0 + rng.integers(4, 300))
            img[y0:y1, x0:x1] = 0xF0F0F0
            img[y0:min(y1, y0 + 8), x0:x1] = 0x2050A0
            text = rng.random((y1 - y0, x1 - x0)) < 0.15
            sub = img[y0:y1, x0:x1]
            sub[text] = 0x101010
        grad_w = min(w, 40)
        img[:, :grad_w] = (np.arange(h, dtype=np.uint32)[:, None] * 0x010203) & 0xFFFFFF
        return img
    raise ValueError(kind)


KINDS = ["random", "solid", "two", "five", "sixteen", "photo", "ui"]


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False        # encoders must never write to the framebuffer
    return a


def expected(fb: np.ndarray, rect: Rect, pf: PixelFormat) -> np.ndarray:
    return to_client_values(fb[rect.y:rect.y + rect.h, rect.x:rect.x + rect.w], pf)


def check_decoded(dec: ClientFramebuffer, fb: np.ndarray, rect: Rect, pf: PixelFormat) -> None:
    got = dec.pixels[rect.y:rect.y + rect.h, rect.x:rect.x + rect.w]
    np.testing.assert_array_equal(got, expected(fb, rect, pf))


def roundtrip(encoding: int, fb: np.ndarray, rect: Rect, pf: PixelFormat, *,
              quality: int | None = None, compression: int | None = None
              ) -> tuple[list[bytes], ClientFramebuffer]:
    enc = make_encoder(encoding, quality=quality, compression=compression)
    rects = enc.encode(_readonly(fb), rect, pf)
    dec = ClientFramebuffer(fb.shape[1], fb.shape[0], pf)
    dec.pixels[:] = SENTINEL
    dec.feed(rects)
    outside = np.ones(fb.shape, bool)
    outside[rect.y:rect.y + rect.h, rect.x:rect.x + rect.w] = False
    assert (dec.pixels[outside] == SENTINEL).all(), "decoded pixels outside the rectangle"
    check_decoded(dec, fb, rect, pf)
    return rects, dec


# -- lossless round trips --------------------------------------------------------------------
@pytest.mark.parametrize("size", [(1, 1), (17, 15), (130, 65)], ids=lambda s: f"{s[1]}x{s[0]}")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pf_name", list(FORMATS))
@pytest.mark.parametrize("enc_name", list(ENCODINGS))
def test_lossless_roundtrip(enc_name: str, pf_name: str, kind: str, size: tuple[int, int]
                            ) -> None:
    h, w = size
    fb = make_image(kind, h, w, seed=h * 1000 + w)
    roundtrip(ENCODINGS[enc_name], fb, Rect(0, 0, w, h), FORMATS[pf_name])


@pytest.mark.parametrize("kind", ["random", "ui", "photo", "sixteen"])
@pytest.mark.parametrize("pf_name", ["native", "novnc", "565be", "ms3", "332"])
@pytest.mark.parametrize("enc_name", list(ENCODINGS))
def test_full_frame_1024x768(enc_name: str, pf_name: str, kind: str) -> None:
    fb = make_image(kind, 768, 1024, seed=7)
    roundtrip(ENCODINGS[enc_name], fb, Rect(0, 0, 1024, 768), FORMATS[pf_name])


@pytest.mark.parametrize("pf_name", ["native", "be32", "565le", "332"])
@pytest.mark.parametrize("enc_name", list(ENCODINGS))
def test_subrect_at_offset_and_strided_views(enc_name: str, pf_name: str) -> None:
    pf = FORMATS[pf_name]
    big = make_image("ui", 400, 600, seed=3)
    big[100:200, 300:500] = make_image("random", 100, 200, seed=4)
    rect = Rect(37, 51, 130, 65)
    roundtrip(ENCODINGS[enc_name], big.copy(), rect, pf)
    # every other row and column: a non-contiguous view over "guest memory"
    strided = big[::2, 1::2]
    assert not strided.flags.c_contiguous
    roundtrip(ENCODINGS[enc_name], strided, Rect(13, 9, 270, 180), pf)
    # a column window (rows contiguous, row stride larger than the width)
    window = big[:, 50:350]
    roundtrip(ENCODINGS[enc_name], window, Rect(0, 0, 300, 400), pf)
    roundtrip(ENCODINGS[enc_name], np.asfortranarray(big), Rect(5, 5, 100, 70), pf)


@pytest.mark.parametrize("pf_name", ["native", "novnc", "565be", "ms3be", "332"])
@pytest.mark.parametrize("enc_name", ["zrle", "tight", "hextile"])
def test_sequence_shares_stream_state(enc_name: str, pf_name: str) -> None:
    """Many rectangles through one encoder instance decode with one decoder instance (the
    zlib streams on both sides stay in step)."""
    pf = FORMATS[pf_name]
    rng = np.random.default_rng(11)
    enc = make_encoder(ENCODINGS[enc_name], compression=3)
    h, w = 300, 400
    dec = ClientFramebuffer(w, h, pf)
    fb = make_image("ui", h, w, seed=1)
    covered = np.zeros((h, w), bool)
    for step in range(12):
        kind = KINDS[step % len(KINDS)]
        y0, x0 = int(rng.integers(0, h - 10)), int(rng.integers(0, w - 10))
        rh, rw = int(rng.integers(1, h - y0)), int(rng.integers(1, w - x0))
        fb = fb.copy()
        fb[y0:y0 + rh, x0:x0 + rw] = make_image(kind, rh, rw, seed=step)
        rect = Rect(x0, y0, rw, rh)
        dec.feed(enc.encode(fb, rect, pf))
        check_decoded(dec, fb, rect, pf)
        covered[y0:y0 + rh, x0:x0 + rw] = True
    np.testing.assert_array_equal(dec.pixels[covered], to_client_values(fb, pf)[covered])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    enc_name=st.sampled_from(list(ENCODINGS)),
    pf_name=st.sampled_from(list(FORMATS)),
    h=st.integers(1, 70), w=st.integers(1, 70),
    ncolours=st.integers(1, 300),
    run=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_random_images_roundtrip(enc_name: str, pf_name: str, h: int, w: int, ncolours: int,
                                 run: int, seed: int, data: st.DataObject) -> None:
    rng = np.random.default_rng(seed)
    pal = _colours(rng, ncolours)
    idx = np.repeat(rng.integers(0, ncolours, size=h * w // run + 1), run)[:h * w]
    fb = pal[idx].reshape(h, w)
    x = data.draw(st.integers(0, w - 1))
    y = data.draw(st.integers(0, h - 1))
    rect = Rect(x, y, data.draw(st.integers(1, w - x)), data.draw(st.integers(1, h - y)))
    roundtrip(ENCODINGS[enc_name], fb, rect, FORMATS[pf_name])


@st.composite
def pixel_formats(draw: st.DrawFn) -> PixelFormat:
    """Any true-colour format PixelFormat.validate() accepts (channels may even overlap)."""
    bpp = draw(st.sampled_from([8, 16, 32]))
    bits = [draw(st.integers(1, min(10, bpp))) for _ in range(3)]
    shifts = [draw(st.integers(0, bpp - b)) for b in bits]
    pf = PixelFormat(bpp, draw(st.integers(1, bpp)), draw(st.booleans()), True,
                     *((1 << b) - 1 for b in bits), *shifts)
    pf.validate()
    return pf


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(enc_name=st.sampled_from(list(ENCODINGS)), pf=pixel_formats(),
       kind=st.sampled_from(KINDS), h=st.integers(1, 80), w=st.integers(1, 80),
       seed=st.integers(0, 1000))
def test_any_valid_pixel_format_roundtrips(enc_name: str, pf: PixelFormat, kind: str, h: int,
                                           w: int, seed: int) -> None:
    roundtrip(ENCODINGS[enc_name], make_image(kind, h, w, seed=seed), Rect(0, 0, w, h), pf)


# -- vncdotool's decoders --------------------------------------------------------------------
@pytest.mark.parametrize("size", [(1, 1), (17, 15), (130, 65), (768, 1024)],
                         ids=lambda s: f"{s[1]}x{s[0]}")
@pytest.mark.parametrize("kind", ["random", "two", "sixteen", "photo", "ui"])
@pytest.mark.parametrize("pf_name", ["native", "be32", "565le", "565be", "332", "ms3"])
@pytest.mark.parametrize("enc_name", ["raw", "hextile"])
def test_vncdotool_decodes_raw_and_hextile(enc_name: str, pf_name: str, kind: str,
                                           size: tuple[int, int]) -> None:
    pf = FORMATS[pf_name]
    h, w = size
    fb = make_image(kind, h + 3, w + 5, seed=w)
    rect = Rect(5, 3, w, h)
    vd = VncdotoolFramebuffer(w + 5, h + 3, pf)
    vd.feed_update(make_encoder(ENCODINGS[enc_name]).encode(fb, rect, pf))
    got = vd.values(pf.bits_per_pixel // 8)[3:, 5:]
    np.testing.assert_array_equal(got, expected(fb, rect, pf))


@pytest.mark.parametrize("size", [(1, 8), (17, 16), (130, 72), (768, 1024)],
                         ids=lambda s: f"{s[1]}x{s[0]}")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pf_name", ["native", "novnc"])
def test_vncdotool_decodes_zrle(pf_name: str, kind: str, size: tuple[int, int]) -> None:
    """vncdotool's ZRLE: 3-byte little-endian CPIXELs, widths a multiple of 8 (its packed
    palette reader ignores row padding)."""
    pf = FORMATS[pf_name]
    h, w = size
    fb = make_image(kind, h, w, seed=h)
    vd = VncdotoolFramebuffer(w, h, pf)
    enc = make_encoder(ENC_ZRLE)
    # two updates through the same encoder/decoder pair: the zlib stream carries over
    half = Rect(0, 0, w, max(1, h // 2))
    vd.feed_update(enc.encode(fb, half, pf))
    vd.feed_update(enc.encode(fb, Rect(0, 0, w, h), pf))
    np.testing.assert_array_equal(vd.values(3), to_client_values(fb, pf))


def test_vncdotool_copyrect() -> None:
    pf = NATIVE
    fb = make_image("random", 40, 50, seed=2)
    vd = VncdotoolFramebuffer(50, 40, pf)
    vd.feed_update(make_encoder(ENC_RAW).encode(fb, Rect(0, 0, 50, 40), pf)
                   + [copyrect_rect(3, 4, Rect(20, 10, 25, 30))])
    want = to_client_values(fb, pf).copy()
    want[10:40, 20:45] = to_client_values(fb, pf)[4:34, 3:28]
    np.testing.assert_array_equal(vd.values(4), want)


# -- noVNC's decoders ------------------------------------------------------------------------
needs_novnc = pytest.mark.skipif(not novnc_available(),
                                 reason="node or tests/js/node_modules/@novnc/novnc missing")


def _rgb(fb: np.ndarray) -> np.ndarray:
    return np.stack([(fb >> 16) & 255, (fb >> 8) & 255, fb & 255], axis=-1).astype(np.uint8)


NOVNC_CASES = {"raw": (ENC_RAW, None), "hextile": (ENC_HEXTILE, None), "zrle": (ENC_ZRLE, None),
               "tight": (ENC_TIGHT, None), "tight-jpeg": (ENC_TIGHT, 6)}


@needs_novnc
@pytest.mark.parametrize("case", list(NOVNC_CASES))
def test_novnc_decodes_sequence_of_rects(case: str) -> None:
    """Many rectangles of every image kind and odd sizes, one encoder instance, one noVNC
    session (its zlib streams persist across rectangles); CopyRect mixed in."""
    code, quality = NOVNC_CASES[case]
    h, w = 860, 720
    fb = make_image("ui", h, w, seed=21)
    sizes = [(1, 1), (17, 15), (130, 65), (64, 64), (100, 200), (3, 300), (200, 3)]
    rects: list[Rect] = []
    y = x = 0
    jobs = [(KINDS[i % len(KINDS)], size) for i, size in enumerate(sizes * 2)]
    jobs.append(("photo", (128, 192)))    # big enough for JPEG
    for i, (kind, (rh, rw)) in enumerate(jobs):
        if x + rw > 580:                  # x >= 590 stays free for the CopyRect target
            x, y = 0, y + 210
        fb[y:y + rh, x:x + rw] = make_image(kind, rh, rw, seed=i)
        rects.append(Rect(x, y, rw, rh))
        x += rw + 7
    assert y + 210 <= h
    enc = make_encoder(code, quality=quality)
    wire: list[bytes] = []
    covered = np.zeros((h, w), bool)
    for r in rects:
        wire += enc.encode(fb, r, PF_NOVNC)
        covered[r.y:r.y + r.h, r.x:r.x + r.w] = True
    src = rects[4]
    wire.append(copyrect_rect(src.x, src.y, Rect(600, 800, 100, 40)))
    rgb, jpeg_rects, count = novnc_decode(w, h, wire)
    assert count == len(wire)
    want = _rgb(fb)
    want[800:840, 600:700] = want[src.y:src.y + 40, src.x:src.x + 100]
    covered[800:840, 600:700] = True
    lossy = np.zeros((h, w), bool)
    for x0, y0, rw, rh in jpeg_rects:
        lossy[y0:y0 + rh, x0:x0 + rw] = True
    assert bool(jpeg_rects) == (quality is not None)
    exact = covered & ~lossy
    np.testing.assert_array_equal(rgb[exact], want[exact])
    if jpeg_rects:
        assert np.abs(rgb[lossy].astype(int) - want[lossy]).mean() < 8


@needs_novnc
@pytest.mark.parametrize("kind", ["ui", "photo", "random"])
@pytest.mark.parametrize("case", list(NOVNC_CASES))
def test_novnc_decodes_full_frame(case: str, kind: str) -> None:
    code, quality = NOVNC_CASES[case]
    fb = make_image(kind, 768, 1024, seed=3)
    rects = make_encoder(code, quality=quality).encode(fb, Rect(0, 0, 1024, 768), PF_NOVNC)
    rgb, jpeg_rects, count = novnc_decode(1024, 768, rects)
    assert count == len(rects)
    want = _rgb(fb)
    lossy = np.zeros((768, 1024), bool)
    for x0, y0, rw, rh in jpeg_rects:
        lossy[y0:y0 + rh, x0:x0 + rw] = True
    np.testing.assert_array_equal(rgb[~lossy], want[~lossy])
    if lossy.any():
        limit = 40 if kind == "random" else 8      # JPEG of noise is noisy
        assert np.abs(rgb[lossy].astype(int) - want[lossy]).mean() < limit


# -- ZRLE details ----------------------------------------------------------------------------
def _zrle_tile_kinds(fb: np.ndarray, pf: PixelFormat = NATIVE) -> list[str]:
    h, w = fb.shape
    _, dec = roundtrip(ENC_ZRLE, fb, Rect(0, 0, w, h), pf)
    return [k for e, k in dec.log if e == ENC_ZRLE]


def test_zrle_uses_every_subencoding() -> None:
    rng = np.random.default_rng(5)
    tiles = []
    tiles.append(np.full((64, 64), 0xABCDEF, np.uint32))                        # solid
    for k in (2, 3, 4, 5, 16):                                                  # packed
        tiles.append(_colours(rng, k)[rng.integers(0, k, (64, 64))])
    pal20 = _colours(rng, 20)                                                   # palette RLE
    tiles.append(pal20[np.repeat(rng.integers(0, 20, 683), 6)[:4096]].reshape(64, 64))
    long_runs = np.repeat(_colours(rng, 200), 21)[:4096].reshape(64, 64)         # plain RLE
    tiles.append(long_runs)
    tiles.append(rng.integers(0, 1 << 24, (64, 64), dtype=np.uint32))           # raw
    fb = np.concatenate(tiles, axis=1)
    kinds = _zrle_tile_kinds(fb)
    assert kinds == ["solid", "packed2", "packed3", "packed4", "packed5", "packed16",
                     "palette-rle20", "plain-rle", "raw"]


def test_zrle_cpixel_sizes() -> None:
    """3-byte CPIXELs for 32-bpp depth<=24 formats in either 3-byte half, full pixels else."""
    fb = np.full((64, 64), 0x102030, np.uint32)
    for pf, size in ((NATIVE, 3), (PF_BE32, 3), (PF_MS3, 3), (PF_MS3_BE, 3), (PF_32_D16, 3),
                     (PF_565_LE, 2), (PF_332, 1)):
        (rect,) = make_encoder(ENC_ZRLE).encode(fb, Rect(0, 0, 64, 64), pf)
        (length,) = struct.unpack(">I", rect[12:16])
        data = zlib.decompressobj().decompress(rect[16:16 + length])
        assert data[0] == 1 and len(data) == 1 + size, (pf, data)


def test_zrle_run_lengths_over_255() -> None:
    """Run-length bytes: 255 continues, anything else ends (256 = [255, 0])."""
    rng = np.random.default_rng(9)
    for n in (255, 256, 257, 510, 511, 512):
        a, b = _colours(rng, 2)
        flat = np.full(64 * 64, a)
        flat[:n] = b
        fb = flat.reshape(64, 64)
        roundtrip(ENC_ZRLE, fb, Rect(0, 0, 64, 64), NATIVE)


# -- Hextile details -------------------------------------------------------------------------
def test_hextile_background_carry_over_and_raw_reset() -> None:
    """Same background is not repeated; after a raw tile it is re-specified (noVNC ignores a
    subencoding-0 tile after a raw one); ClientFramebuffer raises on any undefined bg/fg."""
    rng = np.random.default_rng(1)
    fb = np.full((16, 16 * 5), 0x445566, np.uint32)
    fb[:, 32:48] = rng.integers(0, 1 << 24, (16, 16), dtype=np.uint32)   # raw tile
    _, dec = roundtrip(ENC_HEXTILE, fb, Rect(0, 0, 80, 16), NATIVE)
    assert [k for _, k in dec.log] == ["solid", "same-bg", "raw", "solid", "same-bg"]


def test_hextile_foreground_rules() -> None:
    bg, a, b = 0x101010, 0xA0A0A0, 0x0000FF
    fb = np.full((16, 64), bg, np.uint32)
    fb[2:5, 1:9] = a                      # tile 0: mono subrects (fg a)
    fb[2:5, 17:25] = a                    # tile 1: mono, same fg -> no FG byte
    fb[0:3, 33:40] = a                    # tile 2: coloured subrects
    fb[8:12, 36:44] = b
    fb[1:2, 49:60] = a                    # tile 3: mono after coloured: FG again
    rects, dec = roundtrip(ENC_HEXTILE, fb, Rect(0, 0, 64, 16), NATIVE)
    subs = [int(k[3:]) for _, k in dec.log]
    assert subs[0] == 2 | 4 | 8
    assert subs[1] == 8
    assert subs[2] == 8 | 16
    assert subs[3] == 4 | 8


def test_hextile_subrects_cover_tall_shapes_compactly() -> None:
    fb = np.full((16, 16), 0, np.uint32)
    fb[1:15, 3:5] = 0xFFFFFF              # one 2x14 bar -> one subrect
    (rect,) = make_encoder(ENC_HEXTILE).encode(fb, Rect(0, 0, 16, 16), NATIVE)
    # sub, bg(4), fg(4), count, xy, wh
    assert len(rect) == 12 + 1 + 4 + 4 + 1 + 2
    assert rect[12 + 9] == 1 and rect[-2:] == bytes([(3 << 4) | 1, (1 << 4) | 13])


# -- Tight details ---------------------------------------------------------------------------
@pytest.mark.parametrize("n,encoded", [
    (0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16383, b"\xff\x7f"),
    (16384, b"\x80\x80\x01"), (4194303, b"\xff\xff\xff")])
def test_tight_compact_length(n: int, encoded: bytes) -> None:
    assert compact_length(n) == encoded
    assert ClientFramebuffer._compact(Reader(encoded)) == n


def test_tight_compact_length_limit() -> None:
    with pytest.raises(EncodingError):
        compact_length(1 << 22)


@pytest.mark.parametrize("quality", [0, 6, 9])
def test_tight_jpeg_for_photos_when_quality_set(quality: int) -> None:
    fb = make_image("photo", 200, 300, seed=quality)
    rect = Rect(0, 0, 300, 200)
    enc = make_encoder(ENC_TIGHT, quality=quality)
    dec = ClientFramebuffer(300, 200, PF_NOVNC)
    dec.feed(enc.encode(fb, rect, PF_NOVNC))
    jpeg_area = sum(w * h for _, _, w, h in dec.jpeg_rects)
    assert jpeg_area >= 0.9 * rect.area      # edge slivers may stay lossless
    got = dec.pixels.view(np.uint8).reshape(200, 300, 4)[..., :3].astype(int)
    want = to_client_values(fb, PF_NOVNC).view(np.uint8).reshape(200, 300, 4)[..., :3]
    err = np.abs(got - want)
    limit = {0: 24, 6: 6, 9: 3}[quality]
    assert err.mean() < limit, err.mean()


def test_tight_no_jpeg_without_quality_or_for_16bpp() -> None:
    fb = make_image("photo", 100, 120)
    rect = Rect(0, 0, 120, 100)
    _, dec = roundtrip(ENC_TIGHT, fb, rect, NATIVE)
    assert not dec.jpeg_rects
    _, dec = roundtrip(ENC_TIGHT, fb, rect, PF_565_LE, quality=6)
    assert not dec.jpeg_rects
    _, dec = roundtrip(ENC_TIGHT, fb, rect, PF_32_D16, quality=6)      # not TPIXEL
    assert not dec.jpeg_rects


def test_tight_small_parts_stay_lossless_with_quality() -> None:
    fb = make_image("random", 20, 30)
    _, dec = roundtrip(ENC_TIGHT, fb, Rect(0, 0, 30, 20), NATIVE, quality=5)
    assert not dec.jpeg_rects


def test_tight_uses_fill_palette_and_copy() -> None:
    fb = np.zeros((64, 3 * 64), np.uint32)
    fb[:, :64] = 0x00FF00
    fb[:, 64:128] = make_image("two", 64, 64)
    fb[:, 128:] = make_image("five", 64, 64)
    kinds = []
    for x in (0, 64, 128):
        _, dec = roundtrip(ENC_TIGHT, fb, Rect(x, 0, 64, 64), NATIVE)
        kinds += [k for _, k in dec.log]
    assert kinds == ["fill", "palette2/s1", "palette5/s2"]
    _, dec = roundtrip(ENC_TIGHT, make_image("random", 50, 50), Rect(0, 0, 50, 50), NATIVE)
    assert [k for _, k in dec.log] == ["copy/s0"]


def test_tight_splits_wide_and_large_rects() -> None:
    fb = make_image("random", 40, 4100, seed=3)
    fb[:, 2048:2100] = 0x777777
    rects, dec = roundtrip(ENC_TIGHT, fb, Rect(0, 0, 4100, 40), NATIVE)
    assert (_covering(rects, fb.shape) == 1).all()
    for r in rects:
        x, y, w, h, e = struct.unpack(">HHHHi", r[:12])
        assert w * h <= TIGHT_MAX_AREA or r[12] == 0x80     # only fills may be larger
    fb = make_image("ui", 1000, 3000, seed=8)
    rects, _ = roundtrip(ENC_TIGHT, fb, Rect(0, 0, 3000, 1000), PF_565_LE)
    assert (_covering(rects, fb.shape) == 1).all()
    rects, _ = roundtrip(ENC_TIGHT, make_image("photo", 300, 1000), Rect(0, 0, 1000, 300),
                         PF_565_BE)
    assert len(rects) > 1


def _covering(rects: list[bytes], shape: tuple[int, int]) -> np.ndarray:
    covered = np.zeros(shape, int)
    for r in rects:
        x, y, w, h, e = struct.unpack(">HHHHi", r[:12])
        assert e == ENC_TIGHT and w <= TIGHT_MAX_WIDTH
        covered[y:y + h, x:x + w] += 1
    return covered


@pytest.mark.parametrize("quality", [None, 6])
def test_tight_plan_keeps_text_lossless_next_to_photo(quality: int | None) -> None:
    h, w = 384, 640
    fb = make_image("ui", h, w, seed=5)
    fb[:256, :320] = make_image("photo", 256, 320, seed=6)       # 64-aligned photo
    fb[300:, 400:] = 0x00AA00                                     # big solid area
    enc = make_encoder(ENC_TIGHT, quality=quality)
    rects = enc.encode(fb, Rect(0, 0, w, h), NATIVE)
    assert (_covering(rects, (h, w)) == 1).all()
    dec = ClientFramebuffer(w, h, NATIVE)
    dec.feed(rects)
    photo = np.zeros((h, w), bool)
    photo[:256, :320] = True
    for x, y, rw, rh in dec.jpeg_rects:
        assert photo[y:y + rh, x:x + rw].all(), "JPEG outside the photo"
    if quality is None:
        assert not dec.jpeg_rects
    else:
        assert sum(rw * rh for _, _, rw, rh in dec.jpeg_rects) == 256 * 320
    want = to_client_values(fb, NATIVE)
    np.testing.assert_array_equal(dec.pixels[~photo], want[~photo])
    if quality is None:
        np.testing.assert_array_equal(dec.pixels, want)
    kinds = [k for _, k in dec.log]
    assert kinds.count("fill") >= 1 and any(k.startswith("palette") for k in kinds)


def test_tight_merges_solid_bands() -> None:
    fb = np.full((768, 1024), 0x336699, np.uint32)
    rects, dec = roundtrip(ENC_TIGHT, fb, Rect(0, 0, 1024, 768), NATIVE)
    assert len(rects) == 1 and dec.log == [(ENC_TIGHT, "fill")]


def test_tight_tiny_data_is_sent_uncompressed() -> None:
    fb = np.array([[1, 2, 1], [2, 1, 2]], np.uint32) * 0x0F0F0F
    rects, dec = roundtrip(ENC_TIGHT, fb, Rect(0, 0, 3, 2), NATIVE)
    # ctl, filter, ncolours-1, 2 TPIXELs, 2 bytes of bits: no compact length, no zlib
    assert len(rects[0]) == 12 + 3 + 6 + 2
    assert dec.tight_resets == [0]


def test_tight_stream_resets() -> None:
    """A stream's first use by an instance carries its reset bit, later uses do not; a new
    compression level restarts the streams (with reset bits) and decoding stays exact."""
    pf = NATIVE
    h, w = 64, 64
    dec = ClientFramebuffer(w, h, pf)
    enc = TightEncoder(compression=1)
    fb_rand = make_image("random", h, w, seed=1)
    fb_two = make_image("two", h, w, seed=2)
    for fb, want in ((fb_rand, 1), (fb_rand, 0), (fb_two, 2), (fb_two, 0)):
        dec.feed(enc.encode(fb, Rect(0, 0, w, h), pf))
        assert dec.tight_resets[-1] == want
        check_decoded(dec, fb, Rect(0, 0, w, h), pf)
    enc.set_levels(None, 9)
    dec.feed(enc.encode(fb_rand, Rect(0, 0, w, h), pf))
    assert dec.tight_resets[-1] == 1
    check_decoded(dec, fb_rand, Rect(0, 0, w, h), pf)
    # A second instance on the same connection (e.g. after an encoding switch) is safe too.
    enc2 = TightEncoder(compression=1)
    dec.feed(enc2.encode(fb_two, Rect(0, 0, w, h), pf))
    dec.feed(enc2.encode(fb_rand, Rect(0, 0, w, h), pf))
    check_decoded(dec, fb_rand, Rect(0, 0, w, h), pf)


def test_tight_tpixel_rule() -> None:
    """TPIXEL is R, G, B for 32-bpp depth-24 8-bit-channel formats whatever the shifts and byte
    order, and a full PIXEL otherwise (32-bpp depth 16 included)."""
    fb = np.full((4, 4), 0x123456, np.uint32)
    for pf, pixel in ((NATIVE, b"\x12\x34\x56"), (PF_NOVNC, b"\x12\x34\x56"),
                      (PF_BE32, b"\x12\x34\x56"), (PF_MS3, b"\x12\x34\x56"),
                      (PF_32_D16, struct.pack("<I", (0x12 >> 3 << 11) | (0x34 >> 2 << 5)
                                              | (0x56 >> 3))),
                      (PF_565_BE, struct.pack(">H", (0x12 >> 3 << 11) | (0x34 >> 2 << 5)
                                              | (0x56 >> 3)))):
        (rect,) = make_encoder(ENC_TIGHT).encode(fb, Rect(0, 0, 4, 4), pf)
        assert rect[12] == 0x80 and rect[13:] == pixel, pf


# -- API and errors --------------------------------------------------------------------------
def test_choose_encoding_follows_client_order() -> None:
    assert choose_encoding([ENC_COPYRECT, ENC_TIGHT, ENC_ZRLE, ENC_HEXTILE]) == ENC_TIGHT
    assert choose_encoding([-239, ENC_ZRLE, ENC_TIGHT]) == ENC_ZRLE
    assert choose_encoding([ENC_HEXTILE, ENC_RAW]) == ENC_HEXTILE
    assert choose_encoding([2, 4, -223]) == ENC_RAW
    assert choose_encoding([]) == ENC_RAW
    assert ENC_COPYRECT not in ENCODERS and set(ENCODERS) == {0, 5, 7, 16}


def test_requested_levels() -> None:
    assert requested_levels([7, 16]) == (None, None)
    assert requested_levels([7, -26, -254]) == (6, 2)
    assert requested_levels([-32, -23, -256, -247]) == (9, 9)
    assert requested_levels([-33, -22, -257, -246]) == (None, None)


def test_make_encoder_and_levels() -> None:
    for code, cls in ENCODERS.items():
        enc = make_encoder(code, quality=3, compression=4)
        assert isinstance(enc, cls) and enc.encoding == code
        assert (enc.quality, enc.compression) == (3, 4)
    with pytest.raises(EncodingError):
        make_encoder(ENC_COPYRECT)
    with pytest.raises(EncodingError):
        make_encoder(ENC_TIGHT, quality=10)
    with pytest.raises(EncodingError):
        make_encoder(ENC_ZRLE).set_levels(None, -1)


@pytest.mark.parametrize("enc_name", list(ENCODINGS))
def test_encode_rejects_bad_input(enc_name: str) -> None:
    enc = make_encoder(ENCODINGS[enc_name])
    fb = np.zeros((10, 20), np.uint32)
    assert enc.encode(fb, Rect(3, 3, 0, 5), NATIVE) == []
    for rect in (Rect(-1, 0, 5, 5), Rect(0, 0, 21, 5), Rect(15, 8, 6, 1), Rect(0, 9, 1, 2)):
        with pytest.raises(EncodingError):
            enc.encode(fb, rect, NATIVE)
    with pytest.raises(EncodingError):
        enc.encode(fb.astype(np.int64), Rect(0, 0, 1, 1), NATIVE)
    with pytest.raises(EncodingError):
        enc.encode(np.zeros(5, np.uint32), Rect(0, 0, 1, 1), NATIVE)
    colour_map = PixelFormat(8, 8, False, False, 0, 0, 0, 0, 0, 0)
    with pytest.raises(PixelFormatError):
        enc.encode(fb, Rect(0, 0, 1, 1), colour_map)


def test_copyrect_rect() -> None:
    assert copyrect_rect(7, 9, Rect(1, 2, 3, 4)) == struct.pack(">HHHHiHH", 1, 2, 3, 4, 1, 7, 9)
    with pytest.raises(EncodingError):
        copyrect_rect(-1, 0, Rect(0, 0, 1, 1))
    with pytest.raises(EncodingError):
        copyrect_rect(0, 70000, Rect(0, 0, 1, 1))


def test_reference_decoder_catches_corruption() -> None:
    """The reference decoders are strict: trailing or missing bytes fail."""
    fb = make_image("ui", 40, 40)
    for code in ENCODINGS.values():
        rects = make_encoder(code).encode(fb, Rect(0, 0, 40, 40), NATIVE)
        with pytest.raises(DecodeError):
            ClientFramebuffer(40, 40, NATIVE).feed([rects[0] + b"\x00"])
        with pytest.raises((DecodeError, zlib.error)):
            ClientFramebuffer(40, 40, NATIVE).feed([rects[0][:-1]])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pf=st.sampled_from([NATIVE, PF_NOVNC, PF_BE32, PF_MS3, PF_32_D16, PF_565_LE]),
       h=st.integers(1, 70), w=st.integers(1, 70), dy=st.integers(0, 3), dx=st.integers(0, 3),
       seed=st.integers(0, 2**32 - 1))
def test_raw_bytes_of_small_rects_are_the_keys_bytes(pf: PixelFormat, h: int, w: int, dy: int,
                                                     dx: int, seed: int) -> None:
    """Raw's byte-reordering path for small rects (TigerVNC's and noVNC's formats) gives the
    bytes the numpy path gives, for strided views of pixels with garbage in the top byte, on
    both sides of :data:`SMALL_RAW`."""
    from dmore_nova.rm_vm.rfb.encodings._pixels import pixel_codec

    fb = np.random.default_rng(seed).integers(0, 2**32, (h + dy + 1, w + dx + 2), np.uint32)
    view = fb[dy:dy + h, dx:dx + w]
    codec = pixel_codec(pf)
    assert codec.raw_bytes(view) == codec.encode_bytes(codec.keys(view))
