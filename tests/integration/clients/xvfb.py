"""A private Xvfb for native viewers (TigerVNC's vncviewer), with a pixel-exact screen reader.

``-displayfd`` makes Xvfb choose a free display number itself and write it to a pipe once it
accepts connections, so there is no guessing of ``:N`` and no race with other X servers on the
machine.  ``-fbdir`` makes Xvfb keep its screen in an XWD file that it memory-maps: reading that
file *is* a screenshot, exact to the bit, with no ImageMagick/xwd round trip.
"""

from __future__ import annotations

import os
import select
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from . import ClientError, stop_process

#: How long Xvfb may take to start before we call it broken (it takes ~50 ms here).
START_TIMEOUT = 10.0
#: Upper bound on the screen size we accept from the XWD header (a corrupt header must not make
#: us allocate gigabytes).
MAX_SCREEN_DIM = 8192

_XWD_HEADER = struct.Struct(">25I")


class Xvfb:
    """One Xvfb server.  Use as a context manager or call :meth:`close`.

    ``display`` is the ``":N"`` string for ``DISPLAY``/``-display``; :meth:`screenshot` returns
    the whole screen as an (h, w, 3) uint8 RGB array.
    """

    def __init__(self, width: int = 1280, height: int = 1024) -> None:
        if not shutil.which("Xvfb"):
            raise ClientError("Xvfb is not installed (apt-get install xvfb)")
        self.width, self.height = width, height
        self._dir = Path(tempfile.mkdtemp(prefix="dmore-xvfb-"))
        rfd, wfd = os.pipe()
        try:
            self.proc = subprocess.Popen(
                ["Xvfb", "-displayfd", str(wfd), "-screen", "0", f"{width}x{height}x24",
                 "-fbdir", str(self._dir), "-nolisten", "tcp", "-noreset", "+extension", "RANDR"],
                pass_fds=(wfd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, start_new_session=True)
        finally:
            os.close(wfd)
        try:
            self.display = ":" + self._read_display(rfd)
        except BaseException:
            self.close()
            raise
        finally:
            os.close(rfd)

    def _read_display(self, rfd: int) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        buf = b""
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClientError("Xvfb did not report a display number")
            ready, _, _ = select.select([rfd], [], [], left)
            if not ready:
                continue
            chunk = os.read(rfd, 16)
            if not chunk:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise ClientError(f"Xvfb exited before it was ready: {err.strip()[-500:]}")
            buf += chunk
        return buf.decode().strip()

    @property
    def env(self) -> dict[str, str]:
        """An environment for X clients: ours, with DISPLAY pointing at this server."""
        env = dict(os.environ)
        env["DISPLAY"] = self.display
        env.pop("WAYLAND_DISPLAY", None)
        return env

    def screenshot(self) -> np.ndarray:
        """The whole screen as RGB, read from Xvfb's XWD framebuffer file."""
        data = (self._dir / "Xvfb_screen0").read_bytes()
        return parse_xwd(data)

    def close(self) -> None:
        proc = getattr(self, "proc", None)
        stop_process(proc)
        if proc is not None and proc.stderr:
            proc.stderr.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Xvfb:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_xwd(data: bytes) -> np.ndarray:
    """Decode a ZPixmap XWD image of 24/32 bits per pixel into (h, w, 3) uint8 RGB.

    Only the layout Xvfb writes at depth 24 is accepted; anything else is an explicit error
    rather than a silently wrong picture.
    """
    if len(data) < _XWD_HEADER.size:
        raise ClientError("XWD file shorter than its header")
    (header_size, _version, pixmap_format, depth, width, height, _xoff, byte_order, _unit,
     _bit_order, _pad, bpp, bytes_per_line, _vclass, red_mask, green_mask, blue_mask, _bits_rgb,
     _cmap_entries, ncolors, *_rest) = _XWD_HEADER.unpack_from(data)
    if pixmap_format != 2 or bpp != 32 or depth != 24:
        raise ClientError(f"unsupported XWD layout: format={pixmap_format} depth={depth} bpp={bpp}")
    if not (0 < width <= MAX_SCREEN_DIM and 0 < height <= MAX_SCREEN_DIM):
        raise ClientError(f"XWD size out of range: {width}x{height}")
    if bytes_per_line < width * 4:
        raise ClientError("XWD bytes_per_line too small")
    offset = header_size + ncolors * 12
    if offset + bytes_per_line * height > len(data):
        raise ClientError("XWD file truncated")
    dtype = ">u4" if byte_order == 1 else "<u4"
    rows = np.frombuffer(data, dtype=np.uint8, count=bytes_per_line * height, offset=offset)
    px = rows.reshape(height, bytes_per_line)[:, : width * 4].copy().view(dtype).reshape(height,
                                                                                        width)
    out = np.empty((height, width, 3), dtype=np.uint8)
    for i, mask in enumerate((red_mask, green_mask, blue_mask)):
        if mask == 0:
            raise ClientError("XWD channel mask is zero")
        shift = (mask & -mask).bit_length() - 1
        out[..., i] = (px & mask) >> shift
    return out
