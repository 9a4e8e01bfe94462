"""TigerVNC 1.12 ``vncviewer`` under Xvfb, and ``vncsnapshot``, as test peers.

``vncviewer`` is a native C++ client with its own decoders (Tight incl. JPEG, ZRLE, Hextile,
Raw, CopyRect) and VeNCrypt/TLS through GnuTLS.  We read what it shows straight from Xvfb's
framebuffer (:meth:`Xvfb.screenshot`), cropped to the viewer window (found with ``xdotool``).

Gotchas handled here (see /work/shared/notes/real-clients.md):

* The "Press F8 to open the context menu" banner covers the top of the window for ~4 s after
  connecting; ``-MenuKey=`` (no menu key) suppresses it entirely.
* Without a window manager FLTK still offsets the window (it lands at x=1, y=20 for
  ``-geometry +0+0``), so the window position is asked from X, not assumed.
* Every dialog would hang a headless run: ``-AlertOnFatalError=0 -ReconnectOnError=0`` make
  failures exit; the password comes from a ``vncpasswd -f`` file or ``VNC_PASSWORD``
  (``VNC_USERNAME`` for Plain); an X.509 server certificate must verify against ``-X509CA`` and
  match the host name, or TigerVNC asks the user.  ``HOME`` is a private temp dir, so nothing
  is read from or saved to the real ``~/.vnc``.
* TigerVNC cannot be limited to one encoding: ``-PreferredEncoding X -AutoSelect=0`` puts X
  first in SetEncodings, followed by all others it supports.

``vncsnapshot`` (TightVNC 1.2.8 based) *can* be limited: ``-encodings "hextile"``; it writes
JPEG only (``-quality 100`` here), so captures are compared with a tolerance.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from . import ClientError, assert_same_image, stop_process, wait_until
from .xvfb import Xvfb

#: The window of a connected viewer appears within ~0.1-0.7 s here.
WINDOW_TIMEOUT = 15.0
#: vncsnapshot takes ~0.1 s; this bounds a hung handshake.
SNAPSHOT_TIMEOUT = 20.0
#: Names vncviewer accepts in -SecurityTypes (TigerVNC 1.12).
SECURITY_TYPES = ("None", "VncAuth", "Plain", "TLSNone", "TLSVnc", "TLSPlain", "X509None",
                  "X509Vnc", "X509Plain")
PREFERRED_ENCODINGS = ("Tight", "ZRLE", "Hextile", "Raw")
#: Encodings vncsnapshot can be limited to.
SNAPSHOT_ENCODINGS = ("raw", "copyrect", "rre", "corre", "hextile", "zlib", "tight")


def vncpasswd_file(password: str, path: str | Path) -> Path:
    """Write a VNC password file the way ``vncpasswd -f`` does (DES-obfuscated, 8 bytes)."""
    r = subprocess.run(["vncpasswd", "-f"], input=password.encode() + b"\n",
                       capture_output=True, timeout=10, check=False)
    if r.returncode != 0 or len(r.stdout) != 8:
        raise ClientError(f"vncpasswd -f failed: {r.stderr.decode(errors='replace')}")
    path = Path(path)
    path.write_bytes(r.stdout)
    path.chmod(0o600)
    return path


class VncViewer:
    """One ``vncviewer`` connected to ``host::port`` on ``xvfb``.

    The constructor returns once the process runs; call :meth:`wait_window` (or
    :meth:`wait_for_screen`) to wait for the connection, or :meth:`wait_exit` when a failure is
    expected.  ``username``/``password`` go through ``VNC_USERNAME``/``VNC_PASSWORD`` (needed
    for Plain); ``password_file=True`` uses a ``-passwd`` file instead (VncAuth only).
    """

    def __init__(self, xvfb: Xvfb, host: str, port: int, *, password: str | None = None,
                 username: str | None = None, password_file: bool = False,
                 security_types: list[str] | tuple[str, ...] | None = None,
                 preferred_encoding: str | None = None, full_color: bool = True,
                 quality_level: int | None = None, no_jpeg: bool | None = None,
                 compress_level: int | None = None, x509_ca: str | Path | None = None,
                 shared: bool = True, view_only: bool = False,
                 extra_args: list[str] | None = None) -> None:
        if not shutil.which("vncviewer"):
            raise ClientError("vncviewer is not installed (apt-get install tigervnc-viewer)")
        self.xvfb = xvfb
        self._dir = Path(tempfile.mkdtemp(prefix="dmore-vncviewer-"))
        self.log_path = self._dir / "vncviewer.log"
        args = ["vncviewer", "-display", xvfb.display, "-geometry", "+0+0", "-MenuKey=",
                "-RemoteResize=0", "-AlertOnFatalError=0", "-ReconnectOnError=0",
                "-Log", "*:stderr:99", f"-Shared={int(shared)}", f"-ViewOnly={int(view_only)}",
                "-AcceptClipboard=0", "-SendClipboard=0", "-SendPrimary=0", "-SetPrimary=0"]
        if preferred_encoding is not None:
            if preferred_encoding not in PREFERRED_ENCODINGS:
                raise ValueError(f"unknown encoding {preferred_encoding!r}")
            args += ["-PreferredEncoding", preferred_encoding, "-AutoSelect=0"]
        if full_color:
            args += ["-FullColor"]
        if quality_level is not None:
            args += ["-QualityLevel", str(quality_level)]
        if no_jpeg is not None:
            args += [f"-NoJPEG={int(no_jpeg)}"]
        if compress_level is not None:
            args += ["-CompressLevel", str(compress_level), "-CustomCompressLevel=1"]
        if security_types is not None:
            bad = [t for t in security_types if t not in SECURITY_TYPES]
            if bad:
                raise ValueError(f"unknown security types {bad}")
            args += ["-SecurityTypes", ",".join(security_types)]
        # Always point at files we control: the defaults live under ~/.vnc.
        ca = Path(x509_ca) if x509_ca is not None else self._dir / "no-ca.pem"
        args += ["-X509CA", str(ca), "-X509CRL", str(self._dir / "no-crl.pem")]
        env = xvfb.env
        env["HOME"] = str(self._dir)
        env.pop("VNC_USERNAME", None)
        env.pop("VNC_PASSWORD", None)
        if password is not None:
            if password_file:
                args += ["-passwd", str(vncpasswd_file(password, self._dir / "passwd"))]
            else:
                env["VNC_PASSWORD"] = password
        if username is not None:
            env["VNC_USERNAME"] = username
        args += list(extra_args or [])
        args.append(f"{host}::{port}")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.window: str | None = None

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def _xdotool(self, *args: str, timeout: float = 10.0) -> str:
        r = subprocess.run(["xdotool", *args], env=self.xvfb.env, capture_output=True,
                           text=True, timeout=timeout, check=False)
        if r.returncode != 0:
            raise ClientError(f"xdotool {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def wait_window(self, timeout: float = WINDOW_TIMEOUT) -> str:
        """Wait for the viewer's desktop window (it is mapped once the handshake is done)."""
        def find() -> str | None:
            if self.proc.poll() is not None:
                raise ClientError(f"vncviewer exited ({self.proc.returncode}):"
                                  f" {self.log()[-1500:]}")
            r = subprocess.run(["xdotool", "search", "--onlyvisible", "--pid",
                                str(self.proc.pid)], env=self.xvfb.env, capture_output=True,
                               text=True, timeout=10, check=False)
            ids = r.stdout.split()
            return ids[0] if ids else None

        self.window = wait_until(find, timeout, interval=0.05, what="the vncviewer window")
        return self.window

    def window_titles(self) -> list[str]:
        """Titles of this viewer's visible windows (the desktop, or a dialog such as
        "Unknown certificate issuer" when it would ask the user)."""
        r = subprocess.run(["xdotool", "search", "--onlyvisible", "--pid", str(self.proc.pid)],
                           env=self.xvfb.env, capture_output=True, text=True, timeout=10,
                           check=False)
        return [self._xdotool("getwindowname", w).strip() for w in r.stdout.split()]

    def geometry(self) -> tuple[int, int, int, int]:
        """(x, y, width, height) of the viewer window on the Xvfb screen."""
        if self.window is None:
            self.wait_window()
        out = self._xdotool("getwindowgeometry", "--shell", self.window)
        g = dict(line.split("=", 1) for line in out.split() if "=" in line)
        return int(g["X"]), int(g["Y"]), int(g["WIDTH"]), int(g["HEIGHT"])

    def capture(self, width: int | None = None, height: int | None = None) -> np.ndarray:
        """What the viewer window shows (its top-left ``width`` x ``height``) as RGB.

        The X pointer is parked in the screen's corner first: a server that sends a Cursor
        shape has it drawn by the viewer wherever the pointer is, and Xvfb's framebuffer
        includes the (software) cursor."""
        x, y, w, h = self.geometry()
        sh, sw = self.xvfb.screenshot().shape[:2]
        self._xdotool("mousemove", str(sw - 1), str(sh - 1))
        w = w if width is None else width
        h = h if height is None else height
        screen = self.xvfb.screenshot()
        if y + h > screen.shape[0] or x + w > screen.shape[1]:
            raise ClientError(f"viewer window {w}x{h}+{x}+{y} exceeds the Xvfb screen")
        return screen[y:y + h, x:x + w].copy()

    def wait_for_screen(self, want: np.ndarray, timeout: float = 10.0, *, tolerance: int = 0,
                        mean_tolerance: float | None = None) -> np.ndarray:
        """Capture until the window shows ``want``; on timeout assert on the last difference."""
        deadline = time.monotonic() + timeout
        self.wait_window(timeout)
        h, w = want.shape[:2]
        while True:
            got = self.capture(w, h)
            d = np.abs(got.astype(np.int16) - want.astype(np.int16))
            if int(d.max()) <= tolerance and (mean_tolerance is None
                                              or float(d.mean()) <= mean_tolerance):
                return got
            if self.proc.poll() is not None:
                raise ClientError(f"vncviewer exited ({self.proc.returncode}):"
                                  f" {self.log()[-1500:]}")
            if time.monotonic() > deadline:
                assert_same_image(got, want, tolerance=tolerance, mean_tolerance=mean_tolerance)
                raise AssertionError("screen did not match")  # pragma: no cover
            time.sleep(0.05)

    def key(self, *keys: str) -> None:
        """Real X key presses (XTEST) into the focused viewer: X keysym names ("a", "Return",
        "Left", "shift+a")."""
        if self.window is None:
            self.wait_window()
        self._xdotool("windowfocus", "--sync", self.window)
        self._xdotool("key", "--clearmodifiers", *keys)

    def wait_exit(self, timeout: float = 15.0) -> int:
        """Wait for the viewer to exit (e.g. after an authentication failure); its status."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ClientError(f"vncviewer still running after {timeout}s:"
                              f" {self.log()[-1500:]}") from None

    def close(self) -> None:
        stop_process(getattr(self, "proc", None))
        if getattr(self, "_log", None) is not None:
            self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> VncViewer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def vncsnapshot(host: str, port: int, *, password: str | None = None,
                encodings: list[str] | tuple[str, ...] | None = None,
                jpeg_transport: bool = False, timeout: float = SNAPSHOT_TIMEOUT) -> np.ndarray:
    """One capture with ``vncsnapshot`` (JPEG at quality 100, decoded to RGB).

    ``encodings``: names from :data:`SNAPSHOT_ENCODINGS` (vncsnapshot sends exactly those);
    ``jpeg_transport`` lets it ask for Tight JPEG (``-jpeg``), else ``-nojpeg``.
    """
    if not shutil.which("vncsnapshot"):
        raise ClientError("vncsnapshot is not installed")
    with tempfile.TemporaryDirectory(prefix="dmore-vncsnapshot-") as d:
        out = Path(d) / "snap.jpg"
        args = ["vncsnapshot", "-quiet", "-allowblank", "-quality", "100",
                "-jpeg" if jpeg_transport else "-nojpeg"]
        if encodings is not None:
            bad = [e for e in encodings if e not in SNAPSHOT_ENCODINGS]
            if bad:
                raise ValueError(f"unknown encodings {bad}")
            args += ["-encodings", " ".join(encodings)]
        if password is not None:
            args += ["-passwd", str(vncpasswd_file(password, Path(d) / "passwd"))]
        args += [f"{host}::{port}", str(out)]
        env = dict(os.environ, HOME=d)
        r = subprocess.run(args, capture_output=True, timeout=timeout, env=env, check=False,
                           stdin=subprocess.DEVNULL)
        if r.returncode != 0 or not out.exists():
            raise ClientError(f"vncsnapshot failed ({r.returncode}):"
                              f" {(r.stdout + r.stderr).decode(errors='replace')[-1000:]}")
        with Image.open(out) as im:
            return np.asarray(im.convert("RGB")).copy()
