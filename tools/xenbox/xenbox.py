#!/usr/bin/env python3
"""The xenbox: real Xen 4.17 + a Debian dom0 + a busybox PV guest, inside QEMU under TCG.

Why TCG: on the project's machines ``/dev/kvm`` is PVM (``kvm_pvm``), which cannot run Xen (it
dies at Xen's first CET probe); TCG boots Xen + dom0 to a root shell in ~40-60 s.  Measured
recipe and traps: ``../../../shared/notes/xenbox.md`` (copied facts are cited in the README).

Build stages, each cached under ``$DMORE_XENBOX_CACHE`` (default ``~/.cache/dmore-xenbox``) in a
directory named after a hash of its inputs, so an unchanged stage is reused and a changed input
rebuilds that stage and the ones after it:

* ``rootfs``  debootstrap of Debian bookworm with Xen, the kernel, python3 and the project's
  runtime dependencies as Debian packages (inputs: suite, mirror, package list, rootfs.sh);
* ``guest-initrd``  the guest's busybox initramfs (inputs: guest-init, the host's busybox);
* ``image``  dom0.img (ext4, ``mkfs.ext4 -d``, no loop mount) + xen/vmlinuz/initrd
  (inputs: the two above, image.sh, guest-*.cfg).

Boot (:class:`XenBox`): QEMU with ``-snapshot`` (the cached image is never modified), dom0's
serial console on a unix socket, the checkout shared read-only over 9p at ``/mnt/src``, a
per-run writable share at ``/mnt/box`` (command output comes back through it, never scraped
from the serial line where Xen's own messages interleave), user networking with host ports
forwarded to dom0 (10.0.2.15).

Command line: ``xenbox.py build`` | ``boot-check`` | ``shell`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

SUITE = os.environ.get("DMORE_XENBOX_SUITE", "bookworm")
MIRROR = os.environ.get("DMORE_XENBOX_MIRROR", "http://deb.debian.org/debian")
#: dom0 packages.  Xen 4.17 + its tools and libraries (libxenevtchn1, libxengnttab1,
#: libxenforeignmemory1 come with xen-utils), kernel 6.1, QEMU's xenpv backend (the
#: conventional baseline), and the RM agent's runtime dependencies (python3-pyxs is Debian's
#: 0.4.2~git20190115 build of pyxs).
DOM0_PACKAGES = (
    "systemd-sysv", "udev", "kmod", "procps", "iproute2", "busybox", "strace",
    "linux-image-amd64", "xen-hypervisor-4.17-amd64", "xen-utils-4.17", "xenstore-utils",
    "qemu-system-xen",
    "python3", "python3-numpy", "python3-pil", "python3-oslo.config", "python3-oslo.log",
    "python3-pyxs",
)
#: Host tools (Debian package names) the build and boot need.
HOST_PACKAGES = ("qemu-system-x86", "debootstrap", "e2fsprogs", "cpio", "busybox-static")

#: Every wait has a bound.  TCG timings vary ~1.5x between runs; these are ~3x the measured.
BOOT_TIMEOUT = 300.0      # measured 37-63 s to the dom0 root shell
COMMAND_TIMEOUT = 120.0

#: Per-run directories kept in the cache (older ones are deleted when a box starts).
KEEP_RUNS = 5

PROMPT = b"root@xenbox-dom0:~#"
BOOT_FAILURES = (b"Dom0 crashed", b"Kernel panic", b"KVM internal error", b"Panic on CPU",
                 b"(XEN) ****************")
#: The dom0 address QEMU's user network gives the guest side of host forwards.
DOM0_IP = "10.0.2.15"
#: The RM VM's address (tools/xenbox/rmvm.cfg; routed through dom0 by rmvm-vif) and the port
#: its agent listens on: every box forwards a host port to it (``XenBox.guest_ports``).
RMVM_IP = "10.0.2.16"
RMVM_RFB_PORT = 5900


def log(msg: str) -> None:
    print(f"[xenbox {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    return Path(os.environ.get("DMORE_XENBOX_CACHE")
                or os.environ.get("XB")
                or Path.home() / ".cache" / "dmore-xenbox")


# -- build -----------------------------------------------------------------------------------

def _digest(parts: Iterable[bytes | str | Path]) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, Path):
            data = p.read_bytes()
            h.update(f"file:{p.name}:{len(data)}:".encode())
            h.update(data)
        else:
            b = p.encode() if isinstance(p, str) else p
            h.update(f"str:{len(b)}:".encode())
            h.update(b)
    return h.hexdigest()[:16]


@dataclass
class Stage:
    """One cached build product: ``<cache>/<name>-<key>`` exists and holds ``.done`` iff it was
    built completely from exactly these inputs."""

    name: str
    key: str
    cache: Path

    @property
    def path(self) -> Path:
        return self.cache / f"{self.name}-{self.key}"

    def done(self) -> bool:
        return (self.path / ".done").exists()

    def build(self, make, *, fresh: bool = False) -> tuple[Path, float | None]:
        """Reuse or (re)build; returns the path and the build time (None if reused).  Builds
        into ``<path>.tmp`` and renames, so an interrupted build is never taken as finished.
        Other versions of the same stage are deleted after a successful build (the rootfs is
        ~1 GiB, the image ~0.9 GiB allocated)."""
        if self.done() and not fresh:
            log(f"{self.name}: cached ({self.path.name})")
            return self.path, None
        tmp = self.path.with_name(self.path.name + ".tmp")
        for p in (tmp, self.path):
            if p.exists():
                shutil.rmtree(p)
        tmp.mkdir(parents=True)
        log(f"{self.name}: building ({self.path.name})")
        t0 = time.monotonic()
        make(tmp)
        (tmp / ".done").write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
        tmp.rename(self.path)
        took = time.monotonic() - t0
        log(f"{self.name}: built in {took:.1f} s")
        for other in self.cache.glob(f"{self.name}-*"):
            if other != self.path and other.is_dir():
                shutil.rmtree(other, ignore_errors=True)
        return self.path, took


def _run(cmd: Sequence[str | Path], **kw) -> None:
    r = subprocess.run([str(c) for c in cmd], **kw)
    if r.returncode != 0:
        raise BuildError(f"{' '.join(map(str, cmd))} exited {r.returncode}")


class BuildError(RuntimeError):
    pass


def missing_host_tools() -> list[str]:
    need = {"qemu-system-x86_64": "qemu-system-x86", "debootstrap": "debootstrap",
            "mkfs.ext4": "e2fsprogs", "cpio": "cpio"}
    missing = [pkg for tool, pkg in need.items() if shutil.which(tool) is None]
    st = subprocess.run(["dpkg-query", "-W", "-f=${Status}", "busybox-static"],
                        capture_output=True, text=True).stdout
    if "install ok installed" not in st:  # the guest's /bin/busybox must be static
        missing.append("busybox-static")
    return missing


@dataclass
class Artefacts:
    """What a boot needs, plus how each stage was obtained (seconds, or None = cached)."""

    image_dir: Path
    timings: dict[str, float | None] = field(default_factory=dict)

    @property
    def xen(self) -> Path:
        return self.image_dir / "xen"

    @property
    def vmlinuz(self) -> Path:
        return self.image_dir / "dom0-vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.image_dir / "dom0-initrd"

    @property
    def disk(self) -> Path:
        return self.image_dir / "dom0.img"

    #: The RM VM's initramfs (stage ``rmvm-initrd``); None if not built.
    rmvm_initrd: Path | None = None


def build(cache: Path | None = None, *, fresh: bool = False,
          install_host_deps: bool = True) -> Artefacts:
    """Build (or reuse) every stage; ``fresh`` rebuilds them all."""
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float | None] = {}
    missing = missing_host_tools()
    if missing:
        if not install_host_deps:
            raise BuildError(f"host tools missing: {' '.join(missing)}")
        t0 = time.monotonic()
        _run(["apt-get", "install", "-y", "--no-install-recommends", *HOST_PACKAGES],
             stdout=subprocess.DEVNULL)
        timings["host-deps"] = time.monotonic() - t0

    pkgs = ",".join(DOM0_PACKAGES)
    rootfs = Stage("rootfs", _digest([SUITE, MIRROR, pkgs, HERE / "rootfs.sh"]), cache)

    def make_rootfs(tmp: Path) -> None:
        # debootstrap wants to create its target itself
        tmp.rmdir()
        _run([HERE / "rootfs.sh", tmp], env={**os.environ, "SUITE": SUITE, "MIRROR": MIRROR,
                                           "PKGS": pkgs})
    rootfs_path, timings["rootfs"] = rootfs.build(make_rootfs, fresh=fresh)

    busybox = Path("/bin/busybox")
    initrd = Stage("guest-initrd", _digest([HERE / "guest-init", busybox]), cache)

    def make_initrd(tmp: Path) -> None:
        w = tmp / "root"
        for d in ("bin", "sbin", "proc", "sys", "dev", "etc", "tmp", "root"):
            (w / d).mkdir(parents=True)
        shutil.copy2(busybox, w / "bin" / "busybox")
        applets = subprocess.run([busybox, "--list"], capture_output=True, text=True,
                                 check=True).stdout.split()
        for a in applets:
            if a != "busybox":
                (w / "bin" / a).symlink_to("busybox")
        shutil.copy2(HERE / "guest-init", w / "init")
        (w / "init").chmod(0o755)
        files = subprocess.run(["find", "."], cwd=w, capture_output=True, check=True).stdout
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=w, input=files,
                              capture_output=True, check=True).stdout
        import gzip
        (tmp / "initrd.gz").write_bytes(gzip.compress(cpio, 9, mtime=0))
        shutil.rmtree(w)
    initrd_path, timings["guest-initrd"] = initrd.build(make_initrd, fresh=fresh)

    cfgs = sorted(HERE.glob("guest-*.cfg"))
    image = Stage("image", _digest([rootfs.key, initrd.key, HERE / "image.sh", *cfgs]), cache)

    def make_image(tmp: Path) -> None:
        _run([HERE / "image.sh", rootfs_path, initrd_path / "initrd.gz", tmp])
    image_path, timings["image"] = image.build(make_image, fresh=fresh)

    # The RM VM's initramfs (busybox, the modules it loads, rmvm-init); its root filesystem
    # is dom0's image (a second, read-only drive), so it needs nothing else from the rootfs.
    rmvm = Stage("rmvm-initrd", _digest([rootfs.key, busybox, HERE / "rmvm-initrd.sh",
                                         HERE / "rmvm-init"]), cache)

    def make_rmvm(tmp: Path) -> None:
        _run([HERE / "rmvm-initrd.sh", rootfs_path, busybox, tmp])
    rmvm_path, timings["rmvm-initrd"] = rmvm.build(make_rmvm, fresh=fresh)
    art = Artefacts(image_path, timings)
    art.rmvm_initrd = rmvm_path / "initrd.gz"
    return art


# -- boot ------------------------------------------------------------------------------------

class BootError(RuntimeError):
    """The box did not come up; the message carries the tail of the serial log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class CommandResult:
    rc: int
    output: str
    seconds: float


class XenBox:
    """One running box.  ``forwards`` maps dom0 TCP ports to host ports (chosen free when 0);
    :attr:`ports` has the result.  Use as a context manager or call :meth:`start`/:meth:`stop`.
    """

    def __init__(self, artefacts: Artefacts, *, forwards: Iterable[int] = (5900,),
                 share: Path = REPO, run_dir: Path | None = None, mem_mb: int = 4096,
                 smp: int = 2, dom0_mem: str = "1024M") -> None:
        self.art = artefacts
        self.share = share
        self.run_dir = run_dir or cache_dir() / f"run-{os.getpid()}-{secrets.token_hex(3)}"
        self.box_dir = self.run_dir / "box"  # /mnt/box in dom0
        self.ports = {p: free_port() for p in forwards}
        #: (address, port) behind dom0 -> host port: the RM VM's RFB port.
        self.guest_ports = {(RMVM_IP, RMVM_RFB_PORT): free_port()}
        self.mem_mb, self.smp, self.dom0_mem = mem_mb, smp, dom0_mem
        self.proc: subprocess.Popen | None = None
        self.serial_log = self.run_dir / "serial.log"
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._eof = False
        self._seq = 0
        self.boot_seconds: float | None = None
        self._cmd_lock = threading.Lock()

    # -- lifecycle --------------------------------------------------------------------------
    def qemu_args(self) -> list[str]:
        xen_cmd = (f"console=com1 com1=115200,8n1 dom0_mem={self.dom0_mem},max:{self.dom0_mem}"
                   " loglvl=all guest_loglvl=all noreboot")
        dom0_cmd = "console=hvc0 earlyprintk=xen root=/dev/vda rw"
        fwd = ",".join([f"hostfwd=tcp:127.0.0.1:{h}-{DOM0_IP}:{g}" for g, h in self.ports.items()]
                       + [f"hostfwd=tcp:127.0.0.1:{h}-{ip}:{g}"
                          for (ip, g), h in self.guest_ports.items()])
        a = self.art
        return [
            "qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "qemu64,+svm",
            "-m", str(self.mem_mb), "-smp", str(self.smp),
            "-display", "none", "-vga", "none", "-monitor", "none", "-no-reboot", "-snapshot",
            "-chardev", f"socket,id=ser0,path={self.run_dir}/serial.sock,server=on,wait=on",
            "-serial", "chardev:ser0",
            "-kernel", str(a.xen), "-append", xen_cmd,
            "-initrd", f"{a.vmlinuz} {dom0_cmd},{a.initrd}",
            "-drive", f"file={a.disk},if=virtio,format=raw,cache=unsafe",
            # /dev/vdb in dom0: the same image again, read-only: the RM VM's root disk
            "-drive", f"file={a.disk},if=virtio,format=raw,readonly=on",
            "-virtfs", f"local,path={self.share},mount_tag=src,security_model=none,readonly=on",
            "-virtfs", f"local,path={self.box_dir},mount_tag=box,security_model=none",
            "-nic", "user,model=virtio-net-pci" + ("," + fwd if fwd else ""),
        ]

    def start(self, timeout: float = BOOT_TIMEOUT) -> XenBox:
        # per-run dirs (serial/agent logs, screenshots) of earlier runs: keep the last few
        runs = sorted(self.run_dir.parent.glob("run-*"), key=lambda p: p.stat().st_mtime)
        for old in runs[:-KEEP_RUNS]:
            shutil.rmtree(old, ignore_errors=True)
        self.box_dir.mkdir(parents=True, exist_ok=True)
        sock_path = self.run_dir / "serial.sock"
        if sock_path.exists():
            sock_path.unlink()
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.qemu_args(), stdin=subprocess.DEVNULL,
                                     stdout=open(self.run_dir / "qemu.out", "wb"),  # noqa: SIM115
                                     stderr=subprocess.STDOUT, start_new_session=True)
        # wait=on: QEMU waits for us before it starts the machine, so no output is lost
        deadline = time.monotonic() + 30
        while True:
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(str(sock_path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    out = (self.run_dir / "qemu.out").read_text(errors="replace")
                    raise BootError(f"QEMU did not open its serial socket: {out}") from None
                time.sleep(0.05)
        self._sock = s
        self._reader = threading.Thread(target=self._read_serial, daemon=True,
                                        name="xenbox-serial")
        self._reader.start()
        try:
            self._expect(re.escape(PROMPT), timeout, "the dom0 root shell")
            self.boot_seconds = time.monotonic() - t0
            log(f"dom0 root shell after {self.boot_seconds:.1f} s")
            self._setup_dom0()
        except BaseException:
            self.stop()
            raise
        return self

    def _read_serial(self) -> None:
        assert self._sock is not None
        with open(self.serial_log, "ab") as logf:
            while True:
                try:
                    chunk = self._sock.recv(65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    with self._cond:
                        self._eof = True
                        self._cond.notify_all()
                    return
                logf.write(chunk)
                logf.flush()
                with self._cond:
                    self._buf += chunk
                    # bound memory: keep the last 1 MiB (the full log is on disk)
                    if len(self._buf) > 1 << 20:
                        del self._buf[: len(self._buf) - (1 << 19)]
                    self._cond.notify_all()

    def tail(self, n: int = 3000) -> str:
        try:
            return self.serial_log.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def _expect(self, pattern: bytes, timeout: float, what: str, *,
                start: int = 0) -> re.Match:
        """Wait for the regex ``pattern`` in the serial output (from offset ``start``)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search(self._buf, start)
                if m:
                    return m
                for f in BOOT_FAILURES:
                    if f in self._buf:
                        raise BootError(f"{what}: {f.decode()} on the serial console:\n"
                                        + self.tail())
                if self._eof or (self.proc is not None and self.proc.poll() is not None):
                    raise BootError(f"QEMU exited while waiting for {what}:\n" + self.tail())
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BootError(f"timed out after {timeout:.0f} s waiting for {what}:\n"
                                    + self.tail())
                self._cond.wait(min(left, 1.0))

    def _send(self, line: str) -> None:
        """Type one line on dom0's console.  Kept short by callers and sent in pieces: Xen's
        serial input path drops characters when a long line arrives at once."""
        assert self._sock is not None
        data = line.encode() + b"\n"
        for i in range(0, len(data), 32):
            self._sock.sendall(data[i:i + 32])
            time.sleep(0.01)

    def _setup_dom0(self) -> None:
        """Shares mounted, xenstored up.  Over the serial line only (no share yet)."""
        tag = secrets.token_hex(4)
        self._send(f"stty -echo cols 200; export TERM=dumb; xenbox-setup; echo XBSETUP{tag}=$?")
        m = self._expect(rf"XBSETUP{tag}=(\d+)".encode(), 120, "dom0 setup")
        if m.group(1) != b"0":
            raise BootError("dom0 setup (9p mounts, xenstored) failed:\n" + self.tail())

    def sh(self, command: str, timeout: float = COMMAND_TIMEOUT, *,
           check: bool = True) -> CommandResult:
        """Run ``command`` with bash in dom0; its output comes back through /mnt/box.  Commands
        are serialised (one serial line)."""
        with self._cmd_lock:
            self._seq += 1
            n = self._seq
            script = self.box_dir / f"cmd-{n}.sh"
            out = self.box_dir / f"cmd-{n}.out"
            script.write_text(command + "\n")
            tag = secrets.token_hex(4)
            with self._cond:
                start = len(self._buf)
            t0 = time.monotonic()
            self._send(f"bash /mnt/box/cmd-{n}.sh >/mnt/box/cmd-{n}.out 2>&1 </dev/null;"
                       f" echo XBRC{tag}=$?")
            try:
                m = self._expect(rf"XBRC{tag}=(\d+)".encode(), timeout, f"`{command[:80]}`",
                                 start=max(0, start - 64))
            except BootError as e:
                partial = out.read_text(errors="replace") if out.exists() else ""
                raise CommandError(f"{e}\n-- output so far:\n{partial[-3000:]}") from None
            res = CommandResult(int(m.group(1)), out.read_text(errors="replace"),
                                time.monotonic() - t0)
        if check and res.rc != 0:
            raise CommandError(f"`{command[:200]}` exited {res.rc}:\n{res.output[-3000:]}")
        return res

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self._send("poweroff -f")
                self.proc.wait(20)
            except (OSError, subprocess.TimeoutExpired):
                pass
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> XenBox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class CommandError(RuntimeError):
    pass


# -- command line ----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, help="artefact cache (default $DMORE_XENBOX_CACHE or "
                    "~/.cache/dmore-xenbox)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build or reuse every stage")
    b.add_argument("--fresh", action="store_true", help="rebuild every stage from nothing")
    c = sub.add_parser("boot-check", help="build, boot, run CMD in dom0 (default `xl info`), "
                       "power off; prints timings")
    c.add_argument("command", nargs="?", default="xl info | head -20; xl list")
    sub.add_parser("shell", help="build, boot, then an interactive dom0 shell (Ctrl-D quits)")
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    art = build(a.cache, fresh=getattr(a, "fresh", False))
    log("build: " + ", ".join(f"{k} {'cached' if v is None else f'{v:.1f} s'}"
                              for k, v in art.timings.items()))
    if a.cmd == "build":
        print(art.image_dir)
        return 0
    with XenBox(art) as box:
        if a.cmd == "boot-check":
            r = box.sh(a.command, check=False)
            print(r.output, end="")
            log(f"command rc={r.rc} in {r.seconds:.1f} s; total {time.monotonic() - t0:.1f} s")
            return r.rc
        for line in sys.stdin:
            r = box.sh(line.rstrip("\n"), check=False)
            print(r.output, end="")
            print(f"[rc={r.rc} {r.seconds:.1f}s] ", end="", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
