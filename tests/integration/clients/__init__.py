"""Real VNC/RFB clients driven from pytest: the peers our RFB server must satisfy.

Each module wraps one real, independently written client (or a piece of the plumbing it needs) in
a small synchronous Python API, so a test reads like what a user does: connect, look, type, point.

* :mod:`.xvfb` - a private X server (``Xvfb -displayfd``) whose screen is readable as pixels.
* :mod:`.websockify_proxy` - websockify 0.13 in front of any TCP RFB server (what noVNC needs).
* :mod:`.novnc` - noVNC 1.7 in headless Chromium, driven by playwright-core from one node process.
* :mod:`.vncdotool_client` - vncdotool 1.4 (Twisted) with a forced encoding list.
* :mod:`.tigervnc` - TigerVNC 1.12 ``vncviewer`` under Xvfb, and ``vncsnapshot``.
* :mod:`.qemu_vnc` - QEMU's own VNC server: the referee that proves the harness before blaming
  our server.

Helpers shared by those modules live here.  Every wait has an explicit timeout; every child
process is killed by its own id (never by name) when its owner closes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

#: The repository checkout (tests/integration/clients/ -> three levels up).
REPO_ROOT = Path(__file__).resolve().parents[3]
#: npm dependencies of the browser tests (noVNC, playwright-core).
JS_ROOT = REPO_ROOT / "tests" / "js"
NOVNC_ROOT = JS_ROOT / "node_modules" / "@novnc" / "novnc"


class ClientError(RuntimeError):
    """A real client failed in a way the harness could see (exit status, state, timeout)."""


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A port the kernel considers free right now (bind to 0, read it, close).

    There is a small race until the user binds it; every user here binds within milliseconds.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 10.0,
                  alive: Callable[[], bool] | None = None) -> None:
    """Block until a TCP connect to (host, port) succeeds.

    ``alive`` lets the caller stop early when the process meant to listen has already died.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        if alive is not None and not alive():
            raise ClientError(f"process meant to listen on {host}:{port} exited")
        if time.monotonic() > deadline:
            raise ClientError(f"nothing listens on {host}:{port} after {timeout}s")
        time.sleep(0.02)


def wait_until(pred: Callable[[], object], timeout: float, interval: float = 0.02,
               what: str = "condition") -> object:
    """Poll ``pred`` until it returns something truthy; raise :class:`ClientError` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise ClientError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen | None, timeout: float = 5.0) -> None:
    """Terminate ``proc`` (and its process group when it leads one), then kill if it lingers.

    Children are started with ``start_new_session=True`` so that helpers they spawn (Chromium's
    zygotes, the ``/usr/bin/chromium`` wrapper's child) die with them: the group id is the
    child's own pid, so this never touches anything we did not start.
    """
    if proc is None or proc.poll() is not None:
        return
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    own_group = pgid == proc.pid
    with contextlib.suppress(ProcessLookupError):
        if own_group:
            os.killpg(pgid, signal.SIGTERM)
        else:
            proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            if own_group:
                os.killpg(pgid, signal.SIGKILL)
            else:
                proc.kill()
        proc.wait(timeout=timeout)
    if own_group:
        # Stragglers in the group (a grandchild that ignored SIGTERM) go too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def u32_to_rgb(fb: np.ndarray) -> np.ndarray:
    """(h, w) uint32 0x00RRGGBB -> (h, w, 3) uint8 RGB, the layout every comparison here uses."""
    fb = np.asarray(fb, dtype=np.uint32)
    out = np.empty(fb.shape + (3,), dtype=np.uint8)
    out[..., 0] = (fb >> 16) & 0xFF
    out[..., 1] = (fb >> 8) & 0xFF
    out[..., 2] = fb & 0xFF
    return out


def diff_summary(got: np.ndarray, want: np.ndarray) -> str:
    """A one-line description of how two RGB images differ (for assertion messages)."""
    if got.shape != want.shape:
        return f"shape {got.shape} != {want.shape}"
    d = np.abs(got.astype(np.int16) - want.astype(np.int16))
    bad = np.argwhere(d.max(axis=-1) > 0)
    if not len(bad):
        return "identical"
    y, x = bad[0]
    return (f"{len(bad)} of {got.shape[0] * got.shape[1]} pixels differ, max |d|={int(d.max())},"
            f" mean |d|={float(d.mean()):.3f}; first at (x={x}, y={y}): got {got[y, x].tolist()}"
            f" want {want[y, x].tolist()}")


def assert_same_image(got: np.ndarray, want: np.ndarray, *, tolerance: int = 0,
                      mean_tolerance: float | None = None) -> None:
    """Pixel comparison: exact by default; ``tolerance`` bounds the per-channel difference and
    ``mean_tolerance`` the mean absolute difference (for lossy JPEG paths)."""
    assert got.shape == want.shape, diff_summary(got, want)
    d = np.abs(got.astype(np.int16) - want.astype(np.int16))
    if tolerance == 0 and mean_tolerance is None:
        assert not d.any(), diff_summary(got, want)
        return
    assert int(d.max()) <= tolerance, diff_summary(got, want)
    if mean_tolerance is not None:
        assert float(d.mean()) <= mean_tolerance, diff_summary(got, want)
