"""Driving the RM VM (Domain M) in the xenbox: a PV domU that runs the RM agent for the guest.

Host side of issue 5 §3.  The pieces, in the order they happen:

1. :func:`rmvm_initrd`: the cached ``rmvm-initrd`` stage (busybox, modules, tools/xenbox/rmvm-init)
   plus a second cpio with the checkout's ``dmore_nova`` package and the box-only bootstrap
   (:mod:`tests.xen.rmvm_boot`, which runs the product's ``dmore-rm-agent``) under ``/src``: the
   project's code as it is now, without a share (there is no 9p in a domU).  Written to the
   run's ``/mnt/box``.
2. :func:`start_rmvm_guest`: ``xl create`` the RM VM (tools/xenbox/rmvm.cfg: root filesystem =
   dom0's own image read-only, routed vif), wait for its runner; hand the agent its
   configuration through xenstore (``[agent] xenstore_control``, and no guest: it waits for the
   RM VM's ``target``); ``xl create -p`` the guest (tools/xenbox/rmvm-guest.cfg:
   ``vkb=[backend=rmvm,...]``, so libxl writes the vkb backend under the RM VM's
   ``/local/domain/<rmvm>/backend/vinput``); give the RM VM privilege over the guest
   (``dmore-xl-rmvm set-target``, :mod:`dmore_nova.virt.xl_rmvm`: ``xc_domain_set_target`` +
   ``XS_SET_TARGET`` + the vfb dirs + the ``target`` node); wait until the agent listens;
   unpause the guest.

Co-migration is the product's too: ``dmore-xl-rmvm comigrate`` in dom0, the agent's control
channel in the RM VM (tests/xen/test_rmvm.py drives it).

The viewer connects from the host to the RM VM itself: QEMU forwards a host port to the RM VM's
address (10.0.2.16:5900, routed through dom0 by tools/xenbox/rmvm-vif).
"""

from __future__ import annotations

import gzip
import io
import json
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.xen.dom0 import GUEST, GUEST_LOG, GUEST_LOG_INCOMING, ServedGuest, wait_for

REPO = Path(__file__).resolve().parents[2]
RMVM = "rmvm"
RMVM_LOG = f"/var/log/xen/console/guest-{RMVM}.log"
RMVM_LOG_INCOMING = f"/var/log/xen/console/guest-{RMVM}--incoming.log"
RMVM_CFG = "/mnt/src/tools/xenbox/rmvm.cfg"
GUEST_CFG = "/mnt/src/tools/xenbox/rmvm-guest.cfg"
#: The RM VM's address and RFB port (rmvm.cfg); the box forwards a host port to it.
RMVM_IP = "10.0.2.16"
RMVM_RFB_PORT = 5900
#: What of the checkout goes into the RM VM (under /src): the whole package (every module, new
#: ones included) and the box-only bootstrap.
SOURCES = ("dmore_nova", "tests/__init__.py", "tests/xen/__init__.py", "tests/xen/rmvm_boot.py")
#: dom0 runs the product's dom0 command from the shared checkout.
XL_RMVM = ("cd /mnt/src; PYTHONPATH=/mnt/src PYTHONDONTWRITEBYTECODE=1"
           " python3 -m dmore_nova.cmd.xl_rmvm")


def _cpio_newc(files: list[tuple[str, int, bytes]]) -> bytes:
    """A ``newc`` cpio archive of (name, mode, data); directories have mode S_IFDIR.  Written
    here rather than with cpio(1) so the archive's names are exactly the ones we choose."""
    out = io.BytesIO()

    def entry(ino: int, name: str, mode: int, data: bytes) -> None:
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0))
        out.write(hdr.encode() + nb)
        out.write(b"\0" * (-(110 + len(nb)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))
    for i, (name, mode, data) in enumerate(files, 1):
        entry(i, name, mode, data)
    entry(0, "TRAILER!!!", 0, b"")
    return out.getvalue()


def source_cpio(repo: Path = REPO) -> bytes:
    """cpio of :data:`SOURCES` under ``src/`` (``*.py`` only, no caches)."""
    files: list[tuple[str, int, bytes]] = []
    dirs: set[str] = set()

    def add_dir(d: str) -> None:
        parts = d.split("/")
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            if p not in dirs:
                dirs.add(p)
                files.append((p, stat.S_IFDIR | 0o755, b""))
    for s in SOURCES:
        p = repo / s
        paths = sorted(p.rglob("*.py")) if p.is_dir() else [p]
        for f in paths:
            rel = "src/" + str(f.relative_to(repo))
            add_dir(rel.rsplit("/", 1)[0])
            files.append((rel, stat.S_IFREG | 0o644, f.read_bytes()))
    return _cpio_newc(files)


def rmvm_initrd(stage_initrd: Path, box_dir: Path) -> Path:
    """The RM VM's ramdisk for this run: the cached stage + the checkout, as one gzip stream of
    two concatenated cpio archives (one initramfs to Linux).  Not two gzip members: libxenguest
    inflates a gzip'ed ramdisk itself and stops at the first member (``xc_dom_do_gunzip:
    inflate failed (rc=-5)``, seen on 4.17)."""
    out = box_dir / "rmvm-initrd.gz"
    out.write_bytes(gzip.compress(gzip.decompress(stage_initrd.read_bytes())
                                  + source_cpio(), 6, mtime=0))
    return out


@dataclass
class RmvmGuest(ServedGuest):
    """The guest, served by the agent in the RM VM.  ``rmvm_domid`` changes on migration."""

    rmvm_domid: int = -1

    def rmvm_log(self) -> str:
        """The RM VM's hvc0 (its init, the runner and the agent log there)."""
        return self.sh(f"cat {RMVM_LOG} {RMVM_LOG_INCOMING} 2>/dev/null", check=False).output

    def agent_log(self) -> str:
        return self.rmvm_log()

    def agent_running(self) -> bool:
        log = self.rmvm_log()
        return not any(s in log for s in ("RMVM-EXITED", "RMVM-FAILED", "RMVM-AGENT-EXITED"))


def _domid(box: Any, name: str) -> int:
    return int(box.sh(f"xl domid {name}").output.strip())


#: Bounds of the waits below: measured on a machine shared with two other boxes (TCG), the RM VM
#: was ready after 63-193 s and the PVH guest's tty1 after 74-200 s, once >240 s; ~3x.
RMVM_READY_TIMEOUT = 600.0
GUEST_TTY1_TIMEOUT = 600.0


def start_rmvm(box: Any, stage_initrd: Path, *, timeout: float = RMVM_READY_TIMEOUT) -> int:
    """Create the RM VM and wait until its runner has imported the agent.  Returns its domid."""
    box.sh(f"xl destroy {GUEST} 2>/dev/null; xl destroy {RMVM} 2>/dev/null;"
           f" rm -f {GUEST_LOG} {GUEST_LOG_INCOMING} {RMVM_LOG} {RMVM_LOG_INCOMING}; true")
    rmvm_initrd(stage_initrd, box.box_dir)
    box.sh(f"xl create {RMVM_CFG}", 180)
    domid = _domid(box, RMVM)

    def ready() -> str | None:
        log = box.sh(f"cat {RMVM_LOG} 2>/dev/null", check=False).output
        if "RMVM-FAILED" in log or "RMVM-EXITED" in log or "Kernel panic" in log:
            raise RuntimeError("the RM VM failed to start:\n" + log[-4000:])
        return log if "RMVM-AGENT-READY" in log else None
    try:
        wait_for(ready, timeout, "the RM VM's runner", interval=1.0)
    except TimeoutError as exc:
        log = box.sh(f"cat {RMVM_LOG} 2>/dev/null", check=False).output
        raise RuntimeError(f"{exc}\n-- RM VM console:\n{log[-4000:]}") from exc
    return domid


def agent_conf(*, width: int = 800, height: int = 600) -> str:
    """The RM VM's agent configuration: it names no guest (the agent serves the RM VM's
    ``target``, which ``set-target`` writes), so it is the same for every guest."""
    return ("[agent]\nxen = real\nxenstore_control = true\n"
            f"plug_vfb = true\nwidth = {width}\nheight = {height}\n"
            f"[rfb]\nlisten = 0.0.0.0\nport = {RMVM_RFB_PORT}\n")


def set_target(box: Any, rmvm: int, guest: int) -> dict:
    """dom0 gives the RM VM privilege over the guest (``dmore-xl-rmvm set-target``); the result
    of each part, verbatim."""
    r = box.sh(f"{XL_RMVM} set-target {rmvm} {guest}", check=False)
    m = re.search(r"^\{.*\}$", r.output, re.M)
    if not m:
        raise RuntimeError(f"set-target printed no result (rc {r.rc}):\n{r.output}")
    return json.loads(m.group(0))


PV_PROBE = "pvprobe"


def probe_pv_target(box: Any, rmvm: int) -> dict:
    """What Xen 4.17 says when dom0 makes a *PV* domain the RM VM's target: a paused PV domain
    (the guest's kernel, no devices) is created, ``set-target`` is tried, the domain destroyed.
    Recorded for the issue (the RM VM serves a PVH guest because of it)."""
    box.sh(f"xl destroy {PV_PROBE} 2>/dev/null; xl create -p /root/domU/{GUEST}-rm.cfg"
           f" 'name=\"{PV_PROBE}\"' 'memory=128' 'vkb=[]'", 180)
    try:
        return set_target(box, rmvm, _domid(box, PV_PROBE))
    finally:
        box.sh(f"xl destroy {PV_PROBE}", 120, check=False)


def start_rmvm_guest(box: Any, stage_initrd: Path, rfb_port: int, *,
                     rmvm: int | None = None) -> tuple[RmvmGuest, dict]:
    """RM VM up (or the running one, ``rmvm``), guest created paused, target set, agent
    configured and listening, guest unpaused and its tty1 shell up.  Returns the guest and the
    set-target result."""
    rm = rmvm if rmvm is not None else start_rmvm(box, stage_initrd)
    box.sh(f"xl destroy {GUEST} 2>/dev/null; rm -f {GUEST_LOG} {GUEST_LOG_INCOMING}; true")
    # The agent starts first, as in a product RM VM image: its configuration names no guest,
    # so it waits for the RM VM's target (the whole configuration is one xenstore value).
    box.sh(f"xenstore-rm /local/domain/{rm}/target 2>/dev/null; true")
    (box.box_dir / "agent.conf").write_text(agent_conf())
    box.sh(f"xenstore-write /local/domain/{rm}/data/dmore-agent-conf"
           ' "$(cat /mnt/box/agent.conf)"')
    box.sh(f"xl create -p {GUEST_CFG}", 180)
    domid = _domid(box, GUEST)
    target = set_target(box, rm, domid)
    g = RmvmGuest(box, domid, rfb_port, rmvm_domid=rm)
    if not (target["xen"] == target["xenstore"] == target["vfb_dirs"] == "ok"):
        raise RuntimeError(f"dom0 could not give the RM VM privilege over the guest: {target}")
    try:
        wait_for(lambda: "console on" in g.rmvm_log() or not g.agent_running(), 180,
                 "the agent in the RM VM to listen")
        if "console on" not in g.rmvm_log():
            raise RuntimeError("the agent in the RM VM exited")
        box.sh(f"xl unpause {GUEST}")
        wait_for(lambda: "XENBOX-TTY1-SHELL" in g.console_log(), GUEST_TTY1_TIMEOUT,
                 "the guest's tty1 shell on its framebuffer")
    except Exception as exc:
        raise RuntimeError(f"{exc}\n-- set-target: {target}\n-- RM VM console:\n"
                           f"{g.rmvm_log()[-4000:]}\n-- guest console:\n"
                           f"{g.console_log()[-3000:]}") from exc
    return g, target


def stop_rmvm_guest(g: RmvmGuest) -> str:
    """Destroy the guest and the RM VM; returns the RM VM's console log."""
    log = g.rmvm_log()
    g.sh(f"xl destroy {GUEST}; xl destroy {RMVM}", 120, check=False)
    return log
