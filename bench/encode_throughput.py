"""Encoder throughput: frames per second per RFB encoding on one core.

For each content kind and encoding this encodes, with one encoder instance (as one viewer
would), a 1024x768 framebuffer whose pixels all change every frame ("full"), and a 10 % dirty
region that moves every frame ("10%"), and prints frames/s and the bytes sent per frame.
Also the time to encode one 8x16 text cell (what a key echo costs).

Content kinds (8 distinct pre-generated frames each, so no frame repeats back to back):
  photo    smooth colour gradients + sine pattern + mild noise, panned by 3 px per frame
           (video/photo-like: every pixel changes, thousands of colours);
  desktop  a text console/desktop: windows with 2-colour glyph text, title bars, a gradient
           strip, different text every frame (few colours, long runs);
  noise    random 24-bit pixels (worst case for every encoder; JPEG is the only way out).

Encodings: raw, hextile, zrle (compression level 1), tight-zlib (Tight, compression level 1,
no JPEG: lossless), tight-jpeg (Tight, compression 1 + quality level 6: noVNC's defaults
apart from compression).

    python bench/encode_throughput.py [--seconds 1.5] [--json out.json]

Numpy, zlib and libjpeg all run on the calling thread here, so this is one core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dmore_nova.rm_vm.rfb.display import Rect  # noqa: E402
from dmore_nova.rm_vm.rfb.encodings import make_encoder  # noqa: E402
from dmore_nova.rm_vm.rfb.pixelformat import PixelFormat  # noqa: E402

W, H = 1024, 768
FRAMES = 8
#: noVNC's pixel format (32 bpp, depth 24, red at shift 0): what browsers ask for.
PF_NOVNC = PixelFormat(32, 24, False, True, 255, 255, 255, 0, 8, 16)

ENCODINGS: dict[str, tuple[int, int | None, int | None]] = {
    "raw": (0, None, None),
    "hextile": (5, None, None),
    "zrle": (16, None, 1),
    "tight-zlib": (7, None, 1),
    "tight-jpeg": (7, 6, 1),
}


def photo_frames(rng: np.random.Generator) -> list[np.ndarray]:
    y, x = np.mgrid[0:H, 0:W + 3 * FRAMES]
    r = (127 + 127 * np.sin(x / 97.0) * np.cos(y / 131.0)).astype(np.uint32)
    g = (x * 255 // (W + 3 * FRAMES)).astype(np.uint32)
    b = (127 + 127 * np.sin((x + y) / 53.0)).astype(np.uint32)
    big = (r << 16) | (g << 8) | b
    big ^= rng.integers(0, 4, big.shape, dtype=np.uint32) * np.uint32(0x010101)
    return [np.ascontiguousarray(big[:, 3 * i:3 * i + W]) for i in range(FRAMES)]


def desktop_frames(rng: np.random.Generator) -> list[np.ndarray]:
    frames = []
    for _ in range(FRAMES):
        img = np.full((H, W), 0x203040, np.uint32)
        for _ in range(5):
            y0, x0 = int(rng.integers(0, H - 100)), int(rng.integers(0, W - 200))
            y1 = min(H, y0 + int(rng.integers(150, 500)))
            x1 = min(W, x0 + int(rng.integers(200, 700)))
            img[y0:y1, x0:x1] = 0xF0F0F0
            img[y0:y0 + 20, x0:x1] = 0x3060C0
            # text: 8x16 cells, glyph-like strokes in the middle 6x12 of each cell
            ch, cw = (y1 - y0 - 24) // 16, (x1 - x0 - 8) // 8
            if ch > 0 and cw > 0:
                glyphs = rng.random((ch * 16, cw * 8)) < 0.18
                cell_mask = np.zeros((16, 8), bool)
                cell_mask[2:14, 1:7] = True
                glyphs &= np.tile(cell_mask, (ch, cw))
                glyphs &= np.repeat(rng.random((ch, cw)) < 0.8, 16, 0).repeat(8, 1)
                region = img[y0 + 22:y0 + 22 + ch * 16, x0 + 4:x0 + 4 + cw * 8]
                region[glyphs] = 0x101010
        img[:, :24] = (np.arange(H, dtype=np.uint32)[:, None] // 3) * np.uint32(0x010101)
        frames.append(img)
    return frames


def noise_frames(rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.integers(0, 1 << 24, (H, W), dtype=np.uint32) for _ in range(FRAMES)]


CONTENTS = {"photo": photo_frames, "desktop": desktop_frames, "noise": noise_frames}


def run_case(frames: list[np.ndarray], enc_name: str, region: str, seconds: float
             ) -> dict[str, float]:
    code, quality, compression = ENCODINGS[enc_name]
    enc = make_encoder(code, quality=quality, compression=compression)
    if region == "full":
        rects = [Rect(0, 0, W, H)] * FRAMES
    else:   # ~10 % of the screen (324 x 243), moving
        rects = [Rect(37 * i % (W - 324), 29 * i % (H - 243), 324, 243) for i in range(FRAMES)]
    enc.encode(frames[0], rects[0], PF_NOVNC)            # warm-up (zlib stream, imports)
    n = 0
    sent = 0
    t0, c0 = time.perf_counter(), time.process_time()
    while True:
        i = n % FRAMES
        sent += sum(len(r) for r in enc.encode(frames[i], rects[i], PF_NOVNC))
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and n >= 3:
            break
    cpu = time.process_time() - c0
    return {"fps_cpu": n / cpu, "fps_wall": n / elapsed, "ms_cpu": 1000 * cpu / n,
            "kb_per_frame": sent / n / 1024}


def cell_latency(enc_name: str) -> float:
    """Microseconds to encode one 8x16 text cell (a typed character)."""
    code, quality, compression = ENCODINGS[enc_name]
    enc = make_encoder(code, quality=quality, compression=compression)
    fb = desktop_frames(np.random.default_rng(1))[0]
    rect = Rect(400, 320, 8, 16)
    for _ in range(50):
        enc.encode(fb, rect, PF_NOVNC)
    n = 2000
    c0 = time.process_time()
    for _ in range(n):
        enc.encode(fb, rect, PF_NOVNC)
    return 1e6 * (time.process_time() - c0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=1.5, help="time per case")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--contents", default=",".join(CONTENTS))
    ap.add_argument("--encodings", default=",".join(ENCODINGS))
    args = ap.parse_args()
    results = []
    print(f"{W}x{H}, client pixel format 32bpp depth 24 (noVNC's); one core; "
          f"{platform.python_implementation()} {platform.python_version()}, numpy {np.__version__}")
    print("frames/s from CPU time of this process (one core; robust to other load on the\n"
          "machine) and from wall-clock time; ms/frame is CPU time")
    print(f"{'content':8} {'encoding':11} {'region':6} {'fps(cpu)':>9} {'fps(wall)':>9} "
          f"{'ms/frame':>9} {'KiB/frame':>10}")
    for content in args.contents.split(","):
        frames = CONTENTS[content](np.random.default_rng(42))   # same frames in every run
        for enc_name in args.encodings.split(","):
            for region in ("full", "10%"):
                r = run_case(frames, enc_name, region, args.seconds)
                results.append({"content": content, "encoding": enc_name, "region": region, **r})
                print(f"{content:8} {enc_name:11} {region:6} {r['fps_cpu']:9.1f} "
                      f"{r['fps_wall']:9.1f} {r['ms_cpu']:9.2f} {r['kb_per_frame']:10.1f}",
                      flush=True)
    print("\none 8x16 text cell (key echo), CPU time:")
    for enc_name in args.encodings.split(","):
        us = cell_latency(enc_name)
        results.append({"content": "cell", "encoding": enc_name, "region": "8x16", "us": us})
        print(f"  {enc_name:11} {us:7.1f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
