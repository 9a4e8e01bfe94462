"""QEMU's built-in VNC server as a reference peer.

Before a client capture is allowed to judge *our* server, the same capture must match QEMU's own
``screendump`` of QEMU's own VNC server: then a mismatch against our server is our bug, not the
harness's.  QEMU also traces what it receives (``vnc_key_event_ext`` etc.), so the key path of a
client (keysym *and* XT scancode) can be checked against a server that is not ours.

The guest has no BIOS and no disk: ``-bios`` is a 64 KiB test-card firmware (source in
``qemu_testcard.S``) that paints a 640x480x32 picture through the Bochs VBE interface and halts,
so the screen is static from ~0.2 s after start, rich enough to exercise every encoder, and
predictable (:func:`expected_testcard`).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from . import ClientError, stop_process, wait_until

#: QMP answers in microseconds; anything slower than this is a hung QEMU.
QMP_TIMEOUT = 10.0
#: The test card is painted ~0.2 s after start; this is the bound for "it never appeared".
BOOT_SETTLE_TIMEOUT = 20.0
TESTCARD_WIDTH, TESTCARD_HEIGHT = 640, 480

#: Assembled qemu_testcard.S (code at 0xF0000, then the reset vector at 0xFFFF0).
TESTCARD_CODE = bytes.fromhex(
    "fabaf80c66b81010008066efbafc0c66b8000000e066efbaf80c66b80410008066efbafc0cb80300efbada03ecbac003"
    "b020eebace01b80400efbacf0131c0efbace01b80100efbacf01b88002efbace01b80200efbacf01b8e001efbace01b8"
    "0300efbacf01b82000efbace01b80400efbacf01b84100ef2e660f011600010f20c00c010f22c066ea8f000f00080066"
    "b810008ed88ec08ed0fcbf000000e031f631c9f7c640000000740f81f9400100007307b899663300eb1589c831f025ff"
    "000000c1e00889f388d8c1e00888c8ab4181f98002000075ca4681fee001000075bff4ebfd8d74000000000000000000"
    "ffff0000009acf00ffff00000092cf001700e8000f"
)
TESTCARD_RESET_VECTOR = bytes.fromhex("ea000000f0")  # ljmp $0xf000, $0


def testcard_firmware() -> bytes:
    """The 64 KiB firmware image QEMU loads with ``-bios``."""
    rom = bytearray(0x10000)
    rom[: len(TESTCARD_CODE)] = TESTCARD_CODE
    rom[0xFFF0: 0xFFF0 + len(TESTCARD_RESET_VECTOR)] = TESTCARD_RESET_VECTOR
    return bytes(rom)


def expected_testcard() -> np.ndarray:
    """The picture the test card paints, computed independently of QEMU, as (h, w, 3) RGB."""
    y, x = np.mgrid[0:TESTCARD_HEIGHT, 0:TESTCARD_WIDTH]
    out = np.empty((TESTCARD_HEIGHT, TESTCARD_WIDTH, 3), dtype=np.uint8)
    out[..., 0] = (x ^ y) & 0xFF
    out[..., 1] = y & 0xFF
    out[..., 2] = x & 0xFF
    band = ((y & 0x40) != 0) & (x < 320)
    out[band] = (0x33, 0x66, 0x99)
    return out

#: Trace events we ask QEMU to log: what its VNC server decoded from the client.
TRACE_EVENTS = ("vnc_key_event_ext", "vnc_key_event_map", "input_event_btn", "input_event_abs",
                "vnc_auth_fail", "vnc_auth_pass")

_KEY_EXT = re.compile(r"vnc_key_event_ext down (\d+), sym 0x([0-9a-f]+), keycode 0x([0-9a-f]+)")
_KEY_MAP = re.compile(r"vnc_key_event_map down (\d+), sym 0x([0-9a-f]+) -> keycode 0x([0-9a-f]+)")


@dataclass(frozen=True)
class QemuKey:
    """A key event as QEMU's VNC server saw it.  ``ext`` says it came as a QEMU extended key
    event (the client sent the scancode); otherwise QEMU mapped the keysym itself."""

    down: bool
    keysym: int
    keycode: int
    ext: bool


class QemuVnc:
    """One ``qemu-system-x86_64`` with ``-vnc`` on a free loopback port and a QMP socket.

    ``password``: VNC auth (``password=on`` + ``change-vnc-password``).  ``tls``: ``"anon"`` for
    VeNCrypt TLSNone, ``"x509"`` with ``tls_dir`` (ca-cert.pem, server-cert.pem,
    server-key.pem) for X509None, or X509Vnc together with a password.
    """

    def __init__(self, *, password: str | None = None, tls: str | None = None,
                 tls_dir: str | Path | None = None, lossy: bool = False) -> None:
        qemu = shutil.which("qemu-system-x86_64")
        if not qemu:
            raise ClientError("qemu-system-x86_64 is not installed")
        self._dir = Path(tempfile.mkdtemp(prefix="dmore-qemu-"))
        self._qmp_path = self._dir / "qmp.sock"
        self.trace_path = self._dir / "trace.log"
        firmware = self._dir / "testcard.rom"
        firmware.write_bytes(testcard_firmware())
        vnc = "127.0.0.1:0,to=99"
        # TCG, not KVM: see qemu_testcard.S (and it needs no /dev/kvm on CI machines).
        args = [qemu, "-display", "none", "-nodefaults", "-nic", "none", "-vga", "none",
                "-device", "VGA,addr=02.0", "-bios", str(firmware), "-m", "16", "-accel", "tcg",
                "-qmp", f"unix:{self._qmp_path},server=on,wait=off", "-D", str(self.trace_path)]
        for ev in TRACE_EVENTS:
            args += ["-trace", f"enable={ev}"]
        if tls == "anon":
            args += ["-object", "tls-creds-anon,id=tls0,endpoint=server"]
            vnc += ",tls-creds=tls0"
        elif tls == "x509":
            if tls_dir is None:
                raise ValueError("tls='x509' needs tls_dir")
            args += ["-object", f"tls-creds-x509,id=tls0,endpoint=server,dir={tls_dir},"
                                "verify-peer=off"]
            vnc += ",tls-creds=tls0"
        elif tls is not None:
            raise ValueError(f"unknown tls mode {tls!r}")
        if password is not None:
            vnc += ",password=on"
        if lossy:
            vnc += ",lossy=on"
        args += ["-vnc", vnc]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self._qmp: socket.socket | None = None
        self._qmp_buf = b""
        try:
            self._qmp_connect()
            if password is not None:
                self.qmp("change-vnc-password", password=password)
            info = self.qmp("query-vnc")
            self.host = info["host"]
            self.port = int(info["service"])
        except BaseException:
            self.close()
            raise

    # -- QMP --------------------------------------------------------------------------------
    def _qmp_connect(self) -> None:
        def connect() -> socket.socket | None:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise ClientError(f"qemu exited ({self.proc.returncode}): {err[-800:]}")
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(str(self._qmp_path))
            except OSError:
                s.close()
                return None
            return s

        self._qmp = wait_until(connect, QMP_TIMEOUT, what="QEMU's QMP socket")
        self._qmp.settimeout(QMP_TIMEOUT)
        self._qmp_read()  # greeting
        self.qmp("qmp_capabilities")

    def _qmp_read(self) -> dict:
        while b"\n" not in self._qmp_buf:
            chunk = self._qmp.recv(65536)
            if not chunk:
                raise ClientError("QMP connection closed")
            self._qmp_buf += chunk
        line, self._qmp_buf = self._qmp_buf.split(b"\n", 1)
        return json.loads(line)

    def qmp(self, command: str, **arguments: object) -> object:
        """Run one QMP command and return its ``return`` value (asynchronous events skipped)."""
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._qmp.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._qmp_read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise ClientError(f"QMP {command}: {reply['error']}")

    def hmp(self, command_line: str) -> str:
        """A human monitor command, through QMP's ``human-monitor-command``."""
        return self.qmp("human-monitor-command", **{"command-line": command_line})

    # -- the referee's view ------------------------------------------------------------------
    def screendump(self) -> np.ndarray:
        """QEMU's own copy of the guest display (PPM via ``screendump``) as (h, w, 3) RGB."""
        path = self._dir / f"dump-{time.monotonic_ns()}.ppm"
        self.qmp("screendump", filename=str(path))
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB")).copy()
        finally:
            path.unlink(missing_ok=True)

    def wait_testcard(self, timeout: float = BOOT_SETTLE_TIMEOUT) -> np.ndarray:
        """Wait until QEMU's screen is the finished test card; return QEMU's screendump of it."""
        want = expected_testcard()

        def done() -> tuple[np.ndarray] | None:
            cur = self.screendump()
            return (cur,) if cur.shape == want.shape and np.array_equal(cur, want) else None

        return wait_until(done, timeout, interval=0.05, what="QEMU's test card")[0]

    def trace_lines(self) -> list[str]:
        try:
            return self.trace_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def keys(self) -> list[QemuKey]:
        """Key events QEMU's VNC server decoded, in order (from its trace log)."""
        out = []
        for line in self.trace_lines():
            m = _KEY_EXT.search(line)
            if m:
                out.append(QemuKey(m[1] == "1", int(m[2], 16), int(m[3], 16), True))
                continue
            m = _KEY_MAP.search(line)
            if m:
                out.append(QemuKey(m[1] == "1", int(m[2], 16), int(m[3], 16), False))
        return out

    def close(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        stop_process(getattr(self, "proc", None))
        if getattr(self, "proc", None) is not None and self.proc.stderr:
            self.proc.stderr.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> QemuVnc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
