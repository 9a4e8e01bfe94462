"""Test harness for ``dmore-nova demo``: the demo as a subprocess, and independent probes.

:class:`DemoProcess` starts ``python -m dmore_nova.cmd.dmore_nova demo`` with its own run dir,
memory dir and free ports, waits until its control API answers, and stops it with SIGINT (as
Ctrl-C does).  The probes do not trust the demo's own account of things:

* :func:`guest_framebuffer` reads the guest's framebuffer *from guest memory*, as dom0 of the
  host the guest is on (foreign mapping of the vfb shared page, its ``pd[]`` directory, and the
  frames it lists) -- what the guest drew, not what the RM agent mapped;
* the guest's received keys come from its own control socket (``GuestControl.keys()``: what
  its kbdfront took off the ring).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from dmore_nova.demo.runtime import DemoError, clean_stale
from dmore_nova.xen.io import fbif as F
from dmore_nova.xen.io import keymap
from dmore_nova.xen.sim.client import SimXen
from dmore_nova.xen.sim.guest.control import GuestControl
from tests.integration.clients import free_tcp_port, stop_process

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
KEY_ENTER = keymap.LINUX_KEYCODES["KEY_ENTER"]
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def keycode(ch: str) -> int:
    if ch == "\n":
        return KEY_ENTER
    mapped = keymap.keysym_to_linux(ord(ch))
    assert mapped is not None and not mapped[1], f"{ch!r} is not an unshifted key"
    return mapped[0]


def expected_events(text: str) -> list[tuple[int, bool]]:
    """What the guest's kbdfront must record for ``text`` typed key by key."""
    out: list[tuple[int, bool]] = []
    for ch in text:
        out += [(keycode(ch), True), (keycode(ch), False)]
    return out


def command_lines(start: int = 0):
    """Harmless shell lines to type: ``echo <counter><letters>`` + Enter (the guest runs a
    real shell; only echo ever runs)."""
    i = start
    while True:
        letters = "".join(ALPHABET[(i * 7 + k) % len(ALPHABET)] for k in range(20))
        yield f"echo {i:05d}{letters}\n"
        i += 1


def guest_framebuffer(run_dir: str | Path, domid: int) -> np.ndarray:
    """The guest's screen, read from its memory as dom0: (h, w) uint32 0x00RRGGBB."""
    xen = SimXen(run_dir, 0)
    try:
        xs = xen.xenstore
        fe = f"/local/domain/{domid}/device/vfb/0"
        page_ref = int(xs.read(f"{fe}/page-ref"))
        protocol = (xs.read(f"{fe}/protocol") or b"x86_64-abi").decode()
        with xen.map_foreign(domid, [page_ref]) as page:
            p = F.XenfbPage(page.mem, protocol)
            width, height, line_length = p.width, p.height, p.line_length
            mem_length, depth = p.mem_length, p.depth
            dirs = [p.pd(i) for i in range(p.pd_entries_needed(mem_length))]
            entry = p.pd_entry_size
        assert depth == 32 and line_length >= width * 4, (depth, line_length, width)
        n_pages = -(-mem_length // 4096)
        with xen.map_foreign(domid, dirs) as d:
            frames = np.frombuffer(d.mem, "<u4" if entry == 4 else "<u8",
                                   count=n_pages).tolist()
        used = -(-(height * line_length) // 4096)
        with xen.map_foreign(domid, frames[:used]) as fb:
            img = np.frombuffer(fb.mem, np.uint32, count=height * line_length // 4)
            return img.reshape(height, line_length // 4)[:, :width].copy()
    finally:
        xen.close()


class DemoProcess:
    """``dmore-nova demo`` as a subprocess (see the module docstring)."""

    def __init__(self, *, run_dir: Path | None = None, shm_dir: Path | None = None,
                 port: int | None = None, proxy_port: int | None = None,
                 extra: list[str] | None = None) -> None:
        # Short paths: sim hosts put Unix sockets under the run dir.
        self.own_dirs = run_dir is None
        self.run_dir = run_dir or Path(tempfile.mkdtemp(prefix="dd", dir="/tmp"))
        self.shm_dir = shm_dir or Path(f"/dev/shm/dd-{os.getpid()}-{self.run_dir.name}")
        self.port = port or free_tcp_port()
        self.proxy_port = proxy_port or free_tcp_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.cmd = [sys.executable, "-m", "dmore_nova.cmd.dmore_nova", "demo",
                    "--run-dir", str(self.run_dir), "--shm-dir", str(self.shm_dir),
                    "--port", str(self.port), "--proxy-port", str(self.proxy_port),
                    "--rfb-port", "0", *(extra or [])]
        self.out_path = self.run_dir.parent / f"{self.run_dir.name}.out"
        self.proc: subprocess.Popen[bytes] | None = None
        try:
            self.start()
        except BaseException:
            self.close()
            raise

    def start(self, timeout: float = START_TIMEOUT) -> None:
        out = open(self.out_path, "ab")  # noqa: SIM115 - the child's stdout/stderr
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        try:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=out, env=env)
        finally:
            out.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"demo exited with {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(OSError, ValueError):
                if self.status(timeout=2)["demo"]["ready"]:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"demo not ready after {timeout}s:\n{self.output()}")
            time.sleep(0.1)

    def output(self) -> str:
        try:
            return self.out_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    # -- control API ---------------------------------------------------------------------------
    def _req(self, path: str, body: dict | None = None, timeout: float = 60.0):
        req = urllib.request.Request(self.url + "api/" + path,
                                     data=None if body is None else json.dumps(body).encode(),
                                     method="GET" if body is None else "POST")
        if body is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def status(self, timeout: float = 10.0) -> dict:
        return self._req("status", timeout=timeout)

    def guest(self) -> dict:
        return self.status()["guests"][0]

    def migrate(self, host: str, *, guest: str = "guest", fail_at: str | None = None) -> dict:
        body = {"guest": guest, "host": host}
        if fail_at:
            body["fail_at"] = fail_at
        return self._req("migrate", body, timeout=120)

    def host_run_dir(self, name: str) -> Path:
        return Path(next(h["run_dir"] for h in self.status()["hosts"] if h["name"] == name))

    def guest_control(self) -> GuestControl:
        return GuestControl(self.guest()["control_socket"])

    def framebuffer(self) -> np.ndarray:
        g = self.guest()
        return guest_framebuffer(self.host_run_dir(g["host"]), g["domid"])

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``dmore-nova ARGS`` pointed at this demo's run dir."""
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        return subprocess.run([sys.executable, "-m", "dmore_nova.cmd.dmore_nova", *args,
                               "--run-dir", str(self.run_dir)], capture_output=True,
                              text=True, timeout=timeout, env=env)

    # -- stop ----------------------------------------------------------------------------------
    def interrupt(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGINT (Ctrl-C) and wait for the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_process(self.proc)
            raise AssertionError(
                f"demo did not stop within {timeout}s:\n{self.output()}") from None

    def close(self) -> None:
        """Best-effort stop for a test's teardown (after a failure, too): the demo is
        interrupted (killed if it does not stop), then whatever it left is stopped as its next
        start would do it."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(AssertionError):
                self.interrupt()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(DemoError, OSError):
            clean_stale(self.run_dir, self.shm_dir)
        if self.own_dirs:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                self.out_path.unlink()
        shutil.rmtree(self.shm_dir, ignore_errors=True)


def wait_for(pred, timeout: float = 10.0, what: str = "", interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}")
        time.sleep(interval)


class Typist:
    """Types :func:`command_lines` through ``type_text(text)`` in a thread, continuously from
    :meth:`resume` to :meth:`pause` (which lets the current line finish).  ``typed`` is
    everything typed; ``sessions`` holds (t_resume, t_pause, keys typed) of each stretch."""

    def __init__(self, type_text) -> None:
        self.type_text = type_text
        self.typed = ""
        self.sessions: list[tuple[float, float, int]] = []
        self.error: BaseException | None = None
        self._lines = command_lines()
        self._run = threading.Event()
        self._idle = threading.Event()
        self._quit = False
        self._t_resume = 0.0
        self._n_resume = 0
        self._thread = threading.Thread(target=self._loop, name="typist", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            while True:
                self._idle.set()
                self._run.wait()
                if self._quit:
                    return
                self._idle.clear()
                if not self._run.is_set():
                    continue
                line = next(self._lines)
                self.type_text(line)
                self.typed += line
        except BaseException as exc:  # noqa: BLE001 - re-raised by pause()/stop()
            self.error = exc
            self._idle.set()

    def resume(self) -> None:
        self._t_resume, self._n_resume = time.monotonic(), len(self.typed)
        self._idle.clear()
        self._run.set()

    def pause(self, timeout: float = 30.0) -> str:
        """Stop after the current line; returns everything typed."""
        self._run.clear()
        if not self._idle.wait(timeout):
            raise AssertionError("the typist did not pause")
        if self.error is not None:
            raise self.error
        self.sessions.append((self._t_resume, time.monotonic(),
                              len(self.typed) - self._n_resume))
        return self.typed

    def stop(self) -> str:
        self._quit = True
        self._run.set()
        self._thread.join(30)
        if self.error is not None:
            raise self.error
        return self.typed
