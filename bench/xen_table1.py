"""Table 1 of the seed paper, re-measured on real Xen 4.17 (the xenbox): keyboard input response,
key pressed in an RFB client on the host -> the echoed character visible in the framebuffer
update that client receives, conventional backend vs dmore, on the same box and guest.

Why this method: it is what a console user feels, and it is the one thing both paths have in
common end to end.  The box, the guest (kernel, initramfs, tty1 shell on xen-fbfront's fbcon,
keys from xen-kbdfront), the host-side client (``bench/rfb_client.py``, the one raw client that
stamps the moment an update's last byte is in) and QEMU's user-net port forward are the same for
every path; only what serves the guest's vfb/vkbd and speaks RFB differs:

* ``conventional``: ``guest-qemu.cfg``: libxl starts QEMU ``-machine xenpv`` in dom0 for
  ``vfb=['vnc=1']``; QEMU is the vfb/vkbd backend and runs its own VNC server;
* ``dmore-dom0``: ``guest-rm.cfg``: the project's RM agent (``xen=real``, ``plug_vfb``) in
  dom0 serves the linux-type vkb and the vfb it plugs (``tests/xen/dom0.py``); with
  ``--migrate`` also ``[agent] follow_xl_migrate`` (it follows ``xl migrate`` through
  xenstore; idle while nobody migrates);
* ``dmore-rmvm``: the agent in its own RM VM -- a setup function is all it takes once the RM VM
  exists in tools/xenbox (see :data:`SETUPS`).

One sample: after a random pause (so the key lands at a random phase of QEMU's refresh timer
and of fbcon's cursor blink) the client writes KeyEvent down+up for a character, ``t0`` taken
just before the write; ``t1`` is when the first FramebufferUpdate
after which the prompt's character cell holds *that character's glyph* has been completely
received.  The glyphs are learnt first (each character typed once, warm-up, not counted) and
must all differ and differ from the idle cell, so a cursor blink or another character can never
be taken for the echo.  Then BackSpace erases it (awaited, not counted) and the screen must be
back in an idle state (learnt while nothing is typed: fbcon's blinking cursor gives two).

Two pause regimes (``--pauses``), measured in alternating blocks: 10-60 ms (keys back to back,
as ``bench/key_latency.py``) and 150-600 ms (a person typing at an unhurried pace).  Why both:
QEMU's VNC refresh timer is adaptive -- it starts at 30 ms, grows by 50 ms after every tick that
found nothing to send, up to 3 s, and halves when it finds something (``vnc_refresh``,
``VNC_REFRESH_INTERVAL_BASE/INC/MAX``) -- so the conventional path's answer depends on how long
the screen was quiet before the key, and one regime alone would pick the result.

Through ``xl migrate`` (``--migrate``): the client keeps typing (same sample, long timeout)
while xl migrates the guest (localhost) -- for ``dmore-rmvm`` while ``dmore-xl-rmvm comigrate``
migrates the RM VM and then its guest (the product's co-migration, :mod:`dmore_nova.virt.
xl_rmvm`).  A closed connection is a *disconnect*; the client then
looks for the server again where it is after the migration (QEMU moves to another port) and goes
on.  Reported: disconnects, keys whose echo never came, the longest key -> echo wait and the
longest time without any echo.

Run (exclusive box lock, a quiet machine):
    flock -x -w 1800 /tmp/xb/box.lock .venv/bin/python bench/xen_table1.py --samples 300 \\
        --migrate --json table1.json --update BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import benchmeta  # noqa: E402
from rfb_client import ENC_DESKTOPSIZE, ENC_RAW, RFBClient, RFBError, Update  # noqa: E402

from tests.xen.conftest import load_xenbox  # noqa: E402
from tests.xen.dom0 import (  # noqa: E402
    GUEST,
    GUEST_LOG,
    GUEST_LOG_INCOMING,
    ServedGuest,
    start_served_guest,
    stop_served_guest,
    wait_for,
)
from tests.xen.screen import CELL_H, CELL_W  # noqa: E402

XK_BackSpace = 0xFF08
#: Typed in turn; keysym == ord(ch) for these.
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
SECTION_START = "<!-- table1:start -->"
SECTION_END = "<!-- table1:end -->"
#: dom0 ports forwarded to the host: the agent's 5900, QEMU's 5901 (``vncdisplay=1``) and the
#: ports the incoming QEMU takes during ``xl migrate`` (the old one still holds its port).
FORWARDS = (5900, 5901, 5902, 5903, 5904)
#: The seed paper's Table 1 (bare metal, microseconds).
PAPER_US = {"conventional": 97.2, "dmore": 108.2}
#: Issue 5's targets: dmore/conventional with the agent in dom0; with the agent in the RM VM.
TARGET_RATIO_DOM0 = 0.5
TARGET_RATIO_RMVM = 1.0
#: Where QEMU's second mode starts (a key that missed a refresh tick): reported as a share.
SLOW_MODE_MS = 60.0
#: Bounds on every wait (TCG: ~3x what was measured).
GUEST_UP_TIMEOUT = 180.0
MIGRATE_TIMEOUT = 900.0  # the RM VM pair: two xl migrates (30-110 s seen, more under load)
RECONNECT_TIMEOUT = 120.0
#: How long a key may wait for its echo while xl migrates (dmore holds input 4-8 s).
MIGRATE_ECHO_TIMEOUT = 60.0


# -- the paths under test ---------------------------------------------------------------------
@dataclass
class PathUnderTest:
    """One way of serving the guest's console, set up on the running box."""

    key: str
    title: str
    guest: ServedGuest
    #: The host port a viewer connects to *now* (after ``xl migrate`` it may have moved).
    locate: Callable[[], int]
    stop: Callable[[], None]
    notes: list[str] = field(default_factory=list)
    #: Why migration is not measured on this path (None: it is).
    no_migrate: str | None = None
    #: The dom0 command that live-migrates this path (localhost), and what it is called in
    #: the report; it must exit 0 when done.
    migrate_cmd: str = f'xl migrate -s "" {GUEST} "xl migrate-receive"'
    migrate_what: str = "xl migrate"


def host_port(box, dom0_port: int) -> int:
    if dom0_port not in box.ports:
        raise RuntimeError(f"dom0 port {dom0_port} is not forwarded to the host "
                           f"(forwarded: {sorted(box.ports)})")
    return box.ports[dom0_port]


def current_domid(box, name: str = GUEST) -> int | None:
    r = box.sh(f"xl domid {name}", check=False)
    return int(r.output.strip()) if r.rc == 0 and r.output.strip().isdigit() else None


def setup_conventional(box, migrate: bool) -> PathUnderTest:  # noqa: ARG001 (same signature)
    """``guest-qemu.cfg``: QEMU -machine xenpv in dom0 serves vfb+vkbd, its VNC on 5901."""
    box.sh("[ -e /mnt/box/agent.pid ] && kill $(cat /mnt/box/agent.pid) 2>/dev/null;"
           f" xl destroy {GUEST} 2>/dev/null; rm -f {GUEST_LOG} {GUEST_LOG_INCOMING}; true")
    box.sh(f"xl create /root/domU/{GUEST}-qemu.cfg", GUEST_UP_TIMEOUT)
    domid = current_domid(box)
    if domid is None:
        raise RuntimeError("xl create guest-qemu.cfg: no domain named guest afterwards")
    g = ServedGuest(box, domid, 0)
    wait_for(lambda: "XENBOX-TTY1-SHELL" in g.console_log(), GUEST_UP_TIMEOUT,
             "the guest's tty1 shell (QEMU xenpv backend)")
    qemu = g.qemu_for_guest()
    if "-machine xenpv" not in qemu and "xenpv" not in qemu:
        raise RuntimeError(f"no QEMU xenpv device model for dom{domid}: {qemu!r}")

    def locate() -> int:
        # The domain is "guest--incoming" until xl renames it at the end of a migration; the
        # incoming QEMU listens (on another port) before that.
        for name in (GUEST, f"{GUEST}--incoming"):
            d = current_domid(box, name)
            if d is None:
                continue
            port = g.xs_read(f"/local/domain/{d}/console/vnc-port")
            if port and port.isdigit():
                return host_port(box, int(port))
        raise RuntimeError("no console/vnc-port for the guest in xenstore")

    g.rfb_port = locate()

    def stop() -> None:
        box.sh(f"xl destroy {GUEST}", 120, check=False)

    argv = qemu.split()
    shown = [a + " " + argv[i + 1] for i, a in enumerate(argv[:-1])
             if a in ("-machine", "-vnc", "-xen-domid")]
    return PathUnderTest("conventional", "QEMU xenpv backend + its own VNC server, in dom0", g,
                         locate, stop,
                         notes=[f"device model `{argv[1].rsplit('/', 1)[-1]}` "
                                f"`{' '.join(shown)}` (libxl's command line)"])


def setup_dmore_dom0(box, migrate: bool) -> PathUnderTest:
    """``guest-rm.cfg`` served by ``dmore-rm-agent`` (xen=real) in dom0 (tests/xen/dom0.py);
    with ``migrate`` it also follows ``xl migrate`` (``follow_xl_migrate``)."""
    g = start_served_guest(box, follow_migration=migrate)
    port = host_port(box, 5900)
    notes = ["agent: `python3 -m dmore_nova.cmd.rm_agent` (dom0's python3), `xen=real`, "
             "`plug_vfb`" + (", `follow_xl_migrate`" if migrate else "")]
    return PathUnderTest("dmore-dom0", "RM agent in dom0", g, lambda: port,
                         lambda: stop_served_guest(g), notes=notes)


def rmvm_available() -> bool:
    """The RM VM's driver (tests/xen/rmvm.py, issue 5 §3) is in the checkout."""
    return (REPO / "tests" / "xen" / "rmvm.py").exists()


def setup_dmore_rmvm(box, migrate: bool) -> PathUnderTest:  # noqa: ARG001 (same signature)
    """The agent in its RM VM (a PV domU with target privilege over the guest), reached at
    the RM VM's own address; tests/xen/rmvm.py does the work.  The guest is ``rmvm-guest.cfg``:
    the same kernel and initramfs, but PVH (Xen 4.17 refuses a PV set_target target)."""
    if not rmvm_available():
        raise RuntimeError("dmore-rmvm: the RM VM's driver tests/xen/rmvm.py is not in the "
                           "checkout (issue 5 §3)")
    from tests.xen import rmvm

    stage = getattr(box.art, "rmvm_initrd", None)
    if stage is None:
        raise RuntimeError("the box has no rmvm-initrd stage (tools/xenbox/xenbox.py)")
    port = box.guest_ports[(rmvm.RMVM_IP, rmvm.RMVM_RFB_PORT)]
    g, _target = rmvm.start_rmvm_guest(box, stage, port)
    return PathUnderTest("dmore-rmvm", "RM agent in its RM VM (PV domU, target privilege over "
                         "the guest); guest PVH", g, lambda: port,
                         lambda: rmvm.stop_rmvm_guest(g),
                         notes=[f"client -> host port -> {rmvm.RMVM_IP}:{rmvm.RMVM_RFB_PORT} "
                                "(routed through dom0)"],
                         migrate_cmd=f"{rmvm.XL_RMVM} comigrate --rmvm {rmvm.RMVM}"
                                     f" --guest {GUEST}",
                         migrate_what="dmore-xl-rmvm comigrate (xl migrate of the RM VM, "
                                      "then of the guest)")


#: The rows, in order.  The RM-VM row (issue 5 §3) is measured when its driver is in the
#: checkout; otherwise it is reported as not measured.
SETUPS: dict[str, Callable[..., PathUnderTest]] = {
    "conventional": setup_conventional,
    "dmore-dom0": setup_dmore_dom0,
    "dmore-rmvm": setup_dmore_rmvm,
}
DEFAULT_PATHS = ["conventional", "dmore-dom0"] + (["dmore-rmvm"] if rmvm_available() else [])
NOT_MEASURED: dict[str, str] = {
    "dmore-rmvm": "RM agent in its RM VM: not measured (`--paths` without it, or the RM VM's "
                  "driver tests/xen/rmvm.py not in the checkout)",
}


# -- the viewer ----------------------------------------------------------------------------------
@dataclass
class Viewer:
    """One RFB connection and what it learnt about the screen."""

    client: RFBClient
    cell: tuple[int, int, int, int]  # x, y, w, h (pixels) of the prompt's character cell
    idle: set[int] = field(default_factory=set)
    idle_cells: set[bytes] = field(default_factory=set)
    updates: int = 0

    @classmethod
    def connect(cls, port: int, cell: tuple[int, int, int, int]) -> Viewer:
        c = RFBClient.connect("127.0.0.1", port, timeout=30)
        if (c.width, c.height) != (800, 600):
            c.close()
            raise RuntimeError(f"framebuffer is {c.width}x{c.height}, expected 800x600")
        c.set_pixel_format_rgb888()
        c.set_encodings([ENC_RAW, ENC_DESKTOPSIZE])
        c.request_update(incremental=False)
        return cls(c, cell)

    def close(self) -> None:
        self.client.close()

    def cell_bytes(self) -> bytes:
        x, y, w, h = self.cell
        c = self.client
        stride = c.width * 4
        return b"".join(bytes(c.fb[(y + r) * stride + x * 4:(y + r) * stride + (x + w) * 4])
                        for r in range(h))

    def next_message(self, timeout: float):
        m = self.client.read_message(timeout)
        if isinstance(m, Update):
            # One incremental request always outstanding, as noVNC keeps it.
            self.client.request_update(incremental=True)
            self.updates += 1
        return m

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.next_message(left)

    def settle(self, quiet: float = 1.5, limit: float = 60.0) -> None:
        """Idle states: the screens seen after no *new* screen appeared for ``quiet`` s."""
        seen: dict[int, float] = {}
        cells: dict[int, bytes] = {}
        last_new = start = time.monotonic()
        d = self.client.digest()
        seen[d], cells[d] = last_new, self.cell_bytes()
        while True:
            now = time.monotonic()
            if now - last_new >= quiet:
                self.idle = {d for d, t in seen.items() if t >= last_new}
                self.idle_cells = {cells[d] for d in self.idle}
                return
            if now - start > limit:
                raise RuntimeError(f"screen still changing after {limit} s")
            m = self.next_message(0.05)
            if isinstance(m, Update) and m.changed:
                d, now = self.client.digest(), time.monotonic()
                if d not in seen:
                    last_new = now
                    cells[d] = self.cell_bytes()
                seen[d] = now

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.client.digest() not in self.idle:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.next_message(left)
        return True

    def tap(self, keysym: int) -> int:
        t0 = self.client.key_event(keysym, True)
        self.client.key_event(keysym, False)
        return t0

    def wait_cell(self, want: Callable[[bytes], bool], timeout: float,
                  other: set[bytes] | None = None) -> tuple[Update | None, int, int]:
        """First update after which the cell satisfies ``want``; how many screen-changing
        updates came before it, and how many of those left the cell looking like neither
        ``want`` nor ``other`` (a half-drawn echo, if any)."""
        deadline = time.monotonic() + timeout
        skipped = odd = 0
        while (left := deadline - time.monotonic()) > 0:
            m = self.next_message(left)
            if isinstance(m, Update) and m.changed:
                cell = self.cell_bytes()
                if want(cell):
                    return m, skipped, odd
                skipped += 1
                odd += other is not None and cell not in other
        return None, skipped, odd


# -- measuring -----------------------------------------------------------------------------------
@dataclass
class Measured:
    samples_ns: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    odd: list[int] = field(default_factory=list)
    failures: int = 0
    resyncs: int = 0


class Session:
    """A viewer on one path, with the glyphs it learnt; reconnects after a disconnect."""

    def __init__(self, path: PathUnderTest, rng: random.Random, args: argparse.Namespace):
        self.path, self.rng, self.args = path, rng, args
        self.glyphs: dict[str, bytes] = {}
        self.cell = self.prompt_cell()
        self.viewer = Viewer.connect(path.guest.rfb_port, self.cell)
        self.viewer.settle()
        #: The empty prompt cell (cursor shown or not), as first seen: what "erased" means.
        self.base_idle_cells = set(self.viewer.idle_cells)
        if not 1 <= len(self.base_idle_cells) <= 2:
            raise RuntimeError(f"{path.key}: {len(self.base_idle_cells)} idle looks of the "
                               "prompt cell (expected 1 or 2: fbcon's cursor on/off)")

    def prompt_cell(self) -> tuple[int, int, int, int]:
        """The cell the next typed character goes to, from the guest's own account of tty1
        (``XENBOX-VCSA``: its cursor at an idle ``guest# `` prompt)."""
        g = self.path.guest

        def find():
            for s in reversed(g.screens()):
                row, col = s.cursor
                if s.lines[row].rstrip() == "guest#" and col == len("guest# "):
                    return s
            return None
        s = wait_for(find, 90, "the guest's idle prompt on tty1")
        row, col = s.cursor
        return (col * CELL_W, row * CELL_H, CELL_W, CELL_H)

    def learn_glyphs(self) -> None:
        """Type every character once (warm-up) and keep what its cell looks like."""
        v = self.viewer
        for ch in CHARS:
            v.tap(ord(ch))
            deadline = time.monotonic() + 10
            while True:
                m, _, _ = v.wait_cell(lambda cell: cell not in v.idle_cells,
                                      deadline - time.monotonic())
                if m is None:
                    raise RuntimeError(f"{self.path.key}: no echo of {ch!r} at the prompt cell "
                                       f"{self.cell} within 10 s")
                # what the cell shows once fbcon is done with it (a passing look that goes
                # back to idle is not the echo: wait on)
                last, since = v.cell_bytes(), time.monotonic()
                while time.monotonic() - since < 0.5:
                    v.next_message(0.05)
                    if v.cell_bytes() != last:
                        last, since = v.cell_bytes(), time.monotonic()
                if last not in v.idle_cells:
                    break
            self.glyphs[ch] = last
            self.erase()
        bad = [ch for ch, g in self.glyphs.items() if g in v.idle_cells]
        if bad:
            raise RuntimeError(f"{self.path.key}: glyphs of {bad} look like the idle cell")
        if len(set(self.glyphs.values())) != len(self.glyphs):
            raise RuntimeError(f"{self.path.key}: two characters drew the same cell: the cell "
                               f"{self.cell} is not where the echo goes")

    def erase(self, timeout: float | None = None) -> bool:
        """BackSpace; True if the screen went back to an idle state (else the prompt is
        restored and the idle states re-learnt)."""
        v = self.viewer
        v.tap(XK_BackSpace)
        m, _, _ = v.wait_cell(lambda cell: cell in self.base_idle_cells,
                              timeout or self.args.timeout)
        if m is not None and v.wait_idle(2.0):
            return True
        self.restore_prompt()
        return False

    def restore_prompt(self, tries: int = 5) -> None:
        """Make the prompt cell empty again (a key may have been lost or doubled, e.g. across a
        migration), then re-learn the idle states."""
        v = self.viewer
        v.pump(1.0)
        for _ in range(tries):
            if v.cell_bytes() in self.base_idle_cells:
                break
            v.tap(XK_BackSpace)
            v.wait_cell(lambda cell: cell in self.base_idle_cells, 5.0)
        else:
            if v.cell_bytes() not in self.base_idle_cells:
                raise RuntimeError(f"{self.path.key}: the prompt cell stays non-empty after "
                                   f"{tries} BackSpaces")
        v.settle(quiet=1.0, limit=30)

    def sample(self, ch: str, timeout: float) -> tuple[int | None, int, int, bool]:
        """(key -> echo in ns or None, non-echo updates before it, of which showing the cell
        neither empty nor as the glyph, erased cleanly)."""
        v = self.viewer
        want = self.glyphs[ch]
        t0 = v.tap(ord(ch))
        m, skipped, odd = v.wait_cell(lambda cell: cell == want, timeout, self.base_idle_cells)
        clean = self.erase(timeout) if m is not None else (self.restore_prompt() or False)
        return (None if m is None else m.t_done_ns - t0), skipped, odd, clean

    def measure(self, n: int, timeout: float, pause_ms: tuple[float, float],
                out: Measured | None = None) -> Measured:
        out = out or Measured()
        for i in range(n):
            self.viewer.pump(self.rng.uniform(*pause_ms) / 1000)
            ns, skipped, odd, clean = self.sample(CHARS[i % len(CHARS)], timeout)
            if ns is None:
                out.failures += 1
            else:
                out.samples_ns.append(ns)
                out.skipped.append(skipped)
                out.odd.append(odd)
            out.resyncs += not clean
        return out

    def reconnect(self, deadline: float) -> float:
        """Find the server again (where it is now) and reconnect; seconds it took."""
        t0 = time.monotonic()
        self.viewer.close()
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                port = self.path.locate()
                v = Viewer.connect(port, self.cell)
                v.settle(quiet=1.0, limit=30)
                self.viewer = v
                self.path.guest.rfb_port = port
                took = time.monotonic() - t0
                self.restore_prompt()
                return took
            except (RFBError, OSError, RuntimeError) as exc:
                last = exc
                time.sleep(0.5)
        raise RuntimeError(f"{self.path.key}: could not reconnect: {last}")

    def through_migration(self) -> dict:
        """Keep typing while the path's migration command (``xl migrate``, or the RM VM
        pair's co-migration) runs in dom0 (in the background there, so this thread can still
        ask dom0 where the server went)."""
        box, g = self.path.guest.box, self.path.guest
        old = g.domid
        rc_file = box.box_dir / "table1-migrate.rc"
        rc_file.unlink(missing_ok=True)
        # rc and dom0's own start/end times of the migration, written when it is done
        box.sh(f"(s=$(date +%s.%N); {self.path.migrate_cmd}"
               " >/mnt/box/table1-migrate.out 2>/mnt/box/table1-migrate.err; rc=$?;"
               ' echo "$rc $s $(date +%s.%N)" >/mnt/box/table1-migrate.rc.tmp;'
               " mv /mnt/box/table1-migrate.rc.tmp /mnt/box/table1-migrate.rc)"
               " </dev/null >/dev/null 2>&1 &")
        t_start = time.monotonic()
        keys: list[dict] = []
        disconnects, reconnect_s = 0, []
        t_done: float | None = None
        i = 0
        while True:
            now = time.monotonic()
            if t_done is None and rc_file.exists():
                t_done = now
            if t_done is not None and now - t_done >= self.args.after_migrate:
                break
            if now - t_start > MIGRATE_TIMEOUT:
                raise RuntimeError(f"{self.path.migrate_what} did not finish in "
                                   f"{MIGRATE_TIMEOUT} s")
            ch = CHARS[i % len(CHARS)]
            i += 1
            rec = {"ch": ch, "t": round(now - t_start, 3), "echo_ms": None, "disconnect": False}
            try:
                self.viewer.pump(self.args.migrate_pause / 1000)
                ns, _, _, _ = self.sample(ch, MIGRATE_ECHO_TIMEOUT)
                rec["echo_ms"] = None if ns is None else round(ns / 1e6, 3)
            except RFBError as exc:
                disconnects += 1
                rec["disconnect"] = str(exc)
                reconnect_s.append(round(self.reconnect(time.monotonic() + RECONNECT_TIMEOUT),
                                         3))
            keys.append(rec)
        fields = rc_file.read_text().split()
        if len(fields) != 3:
            raise RuntimeError(f"unreadable migration status {fields!r}")
        rc, xl_seconds = int(fields[0]), float(fields[2]) - float(fields[1])
        out = (box.box_dir / "table1-migrate.out").read_text(errors="replace")
        out += (box.box_dir / "table1-migrate.err").read_text(errors="replace")
        new = current_domid(box)
        if rc != 0:
            raise RuntimeError(f"{self.path.migrate_what} failed (rc {rc}):\n{out[-3000:]}")
        g.domid = new if new is not None else g.domid
        echo_t = sorted(k["t"] + k["echo_ms"] / 1000 for k in keys if k["echo_ms"] is not None)
        gaps = [b - a for a, b in zip(echo_t, echo_t[1:], strict=False)]
        return {
            "what": self.path.migrate_what,
            "xl_migrate_s": round(xl_seconds, 1),
            "domid": [old, new], "keys": len(keys),
            "echoed": sum(k["echo_ms"] is not None for k in keys),
            "lost": sum(k["echo_ms"] is None for k in keys),
            "disconnects": disconnects, "reconnect_s": reconnect_s,
            "max_echo_ms": max((k["echo_ms"] for k in keys if k["echo_ms"] is not None),
                               default=None),
            "max_gap_s": round(max(gaps), 3) if gaps else None,
            "key_log": keys,
        }


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def summarize(m: Measured) -> dict:
    ms = sorted(v / 1e6 for v in m.samples_ns)
    s: dict = {"n": len(ms), "failures": m.failures, "resyncs": m.resyncs}
    if ms:
        s.update({"min": ms[0], "p50": percentile(ms, 50), "p90": percentile(ms, 90),
                  "p99": percentile(ms, 99), "max": ms[-1], "mean": sum(ms) / len(ms),
                  "echo_after_other_updates": sum(1 for k in m.skipped if k),
                  "cell_half_drawn_before_echo": sum(1 for k in m.odd if k)})
    s["samples_ms"] = [round(v / 1e6, 4) for v in m.samples_ns]
    return s


def run_path(box, key: str, args: argparse.Namespace, rng: random.Random) -> dict:
    t0 = time.monotonic()
    path = SETUPS[key](box, args.migrate)
    res: dict = {"title": path.title, "notes": path.notes}
    try:
        res["setup_s"] = round(time.monotonic() - t0, 1)
        sess = Session(path, rng, args)
        sess.learn_glyphs()
        res["cell"] = list(sess.cell)
        # Regimes in alternating blocks, so drift in machine load hits each alike.
        measured = {regime_name(r): Measured() for r in args.pauses}
        left = dict.fromkeys(measured, args.samples)
        while any(left.values()):
            for r in args.pauses:
                name = regime_name(r)
                n = min(args.block, left[name])
                sess.measure(n, args.timeout, r, measured[name])
                left[name] -= n
        res["latency"] = {name: summarize(m) for name, m in measured.items()}
        for name, lat in res["latency"].items():
            print(f"[table1] {key}, pause {name} ms: " + ", ".join(
                f"{q} {lat.get(q, float('nan')):.2f} ms" for q in ("p50", "p90"))
                + f", n {lat['n']}", file=sys.stderr, flush=True)
        if args.migrate and path.no_migrate:
            res["migration_not_measured"] = path.no_migrate
        elif args.migrate:
            try:
                res["migration"] = sess.through_migration()
            except (RuntimeError, RFBError, OSError) as exc:
                # Reported in the table, and the latency rows measured so far are kept.
                res["migration_not_measured"] = f"FAILED: {exc}"[:2000]
                print(f"[table1] {key}: migration failed: {exc}", file=sys.stderr, flush=True)
                return res
            mig = res["migration"]
            print(f"[table1] {key}: {mig['what']}: {mig['disconnects']} disconnects, "
                  f"{mig['lost']}/{mig['keys']} keys without echo, longest gap "
                  f"{mig['max_gap_s']} s", file=sys.stderr, flush=True)
            if args.post_samples:
                res["after_migration"] = summarize(sess.measure(args.post_samples,
                                                                args.timeout, args.pauses[0]))
        sess.viewer.close()
    finally:
        path.stop()
    return res


def run(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    load_before = os.getloadavg()
    xb = load_xenbox()
    art = xb.build()
    result: dict = {"paths": {}, "not_measured": {}}
    t0 = time.monotonic()
    box = xb.XenBox(art, forwards=FORWARDS)
    box.start(timeout=args.boot_timeout)
    try:
        result["boot_s"] = round(time.monotonic() - t0, 1)
        info = box.sh("xl info", check=False).output
        ver = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in
                                                  info.splitlines() if ":" in line)}
        result["xen"] = (f"Xen {ver.get('xen_version', '?')}, dom0 kernel "
                         f"{ver.get('release', '?')}")
        for key in args.paths:
            result["paths"][key] = run_path(box, key, args, rng)
    finally:
        box.stop()
    for key, why in NOT_MEASURED.items():
        if key not in result["paths"]:
            result["not_measured"][key] = why
    # What of the checkout differed from the commit (dom0 runs the agent from the checkout).
    dirty = benchmeta.sh(["git", "status", "--porcelain", "--", "dmore_nova", "bench",
                          "tests/xen", "tools/xenbox"])
    result["meta"] = {**benchmeta.machine_info("xen_table1.py", args.argv, load_before),
                      "dirty": dirty.splitlines(),
                      "pauses_ms": [list(r) for r in args.pauses], "note": args.note}
    result["ratio"] = ratios(result)
    return result


def regime_name(pause_ms: tuple[float, float] | list[float]) -> str:
    return f"{pause_ms[0]:g}-{pause_ms[1]:g}"


def ratios(result: dict) -> dict:
    """{path: {pause regime: {p50, p90}}}: dmore / conventional, per pause regime."""
    conv = result["paths"].get("conventional", {}).get("latency", {})
    out: dict = {}
    for key, r in result["paths"].items():
        if key == "conventional":
            continue
        for regime, lat in r["latency"].items():
            c = conv.get(regime)
            if c and c["n"] and lat["n"]:
                out.setdefault(key, {})[regime] = {q: lat[q] / c[q] for q in ("p50", "p90")}
    return out


# -- reporting ------------------------------------------------------------------------------------
COLS = ("n", "min", "p50", "p90", "max")


def table(result: dict) -> str:
    rows = ["| pause between keys | path | " + " | ".join(c if c == "n" else f"{c} ms"
                                                       for c in COLS)
            + " | dmore/conv. p50 | dmore/conv. p90 | failures |",
            "|---" * (len(COLS) + 5) + "|"]
    regimes = list(next(iter(result["paths"].values()))["latency"]) if result["paths"] else []
    for regime in regimes:
        for key, r in result["paths"].items():
            s = r["latency"][regime]
            vals = [str(s["n"]) if c == "n" else f"{s.get(c, float('nan')):.2f}" for c in COLS]
            ratio = result["ratio"].get(key, {}).get(regime)
            rs = [f"**{ratio['p50']:.2f}**", f"**{ratio['p90']:.2f}**"] if ratio else \
                ["1", "1"] if key == "conventional" else ["–", "–"]
            rows.append(f"| {regime} ms | {key} | " + " | ".join(vals + rs)
                        + f" | {s['failures']} |")
        for key in result.get("not_measured", {}):
            rows.append(f"| {regime} ms | {key} | " + " | ".join(["–"] * (len(COLS) + 2))
                        + " | not measured |")
    return "\n".join(rows)


def paper_line() -> str:
    c, d = PAPER_US["conventional"], PAPER_US["dmore"]
    return (f"seed paper's Table 1 (bare metal): conventional {c} µs, D-MORE {d} µs: "
            f"D-MORE/conventional {d / c:.2f} (+{(d / c - 1) * 100:.0f} %)")


def migration_table(result: dict) -> str:
    rows = ["| path | migration | s | keys typed | echoed | without echo | disconnects | "
            "reconnect s | longest key → echo ms | longest time without echo s | "
            "after: p50 ms (n) |", "|---" * 11 + "|"]
    for key, r in result["paths"].items():
        m = r.get("migration")
        if not m:
            continue
        after = r.get("after_migration") or {}
        rec = ", ".join(f"{s:.1f}" for s in m["reconnect_s"]) or "–"
        aft = f"{after['p50']:.2f} ({after['n']})" if after.get("n") else "–"
        mx = "–" if m["max_echo_ms"] is None else f"{m['max_echo_ms']:.0f}"
        gap = "–" if m["max_gap_s"] is None else f"{m['max_gap_s']:.1f}"
        rows.append(f"| {key} | {m.get('what', 'xl migrate')} | {m['xl_migrate_s']} | {m['keys']}"
                    f" | {m['echoed']} | {m['lost']} |"
                    f" {m['disconnects']} | {rec} | {mx} | {gap} | {aft} |")
    return "\n".join(rows)


def verdict(result: dict) -> list[str]:
    out = [paper_line()]
    for key, what, target in (("dmore-dom0", "agent in dom0", TARGET_RATIO_DOM0),
                              ("dmore-rmvm", "agent in its RM VM", TARGET_RATIO_RMVM)):
        for regime, r in result["ratio"].get(key, {}).items():
            ok = r["p50"] <= target and r["p90"] <= target
            out.append(f"{what}, pause {regime} ms: dmore/conventional p50 {r['p50']:.2f}, "
                       f"p90 {r['p90']:.2f} (target ≤ {target:g}: {'met' if ok else 'MISSED'})")
    for key, r in result["paths"].items():
        m = r.get("migration")
        if m and key != "conventional":
            ok = m["disconnects"] == 0
            out.append(f"{key} through {m.get('what', 'xl migrate')}: {m['disconnects']} "
                       "disconnects "
                       f"(target 0: {'met' if ok else 'MISSED'}), {m['lost']} keys without echo")
        elif m:
            out.append(f"conventional through xl migrate: {m['disconnects']} disconnects, "
                       f"{m['lost']} keys without echo")
    return out


def markdown(result: dict) -> str:
    m = result["meta"]
    out = [
        SECTION_START,
        "## Table 1 re-measured on real Xen: key → echo, conventional vs dmore",
        "",
        "Keyboard input response on the xenbox (Xen 4.17 + Debian dom0 + a busybox PV guest, all "
        "in QEMU/TCG, `tools/xenbox/`): from writing a KeyEvent (down+up, a printable character) "
        "in an RFB client on the host to having completely received the first FramebufferUpdate "
        "after which the guest's prompt cell shows *that character's glyph* (learnt per "
        "character beforehand; cursor blinks and other updates are skipped and counted). Same "
        "box, same guest (tty1 shell on xen-fbfront's fbcon, keys through xen-kbdfront), same "
        "client (`bench/rfb_client.py`, 32 bpp, Raw), same host→dom0 port forward; one "
        "path after the other on one boot. Each key after a random pause (two regimes, in "
        "alternating blocks: " + ", ".join(f"{a:g}–{b:g} ms" for a, b in m["pauses_ms"])
        + "), erased with BackSpace (not counted). TCG inflates absolute times: the ratio is "
        "the result. Method: docstring of `bench/xen_table1.py`.",
        "",
        "```",
        m["command"],
        "```",
        "",
        table(result),
        "",
    ]
    for key, r in result["paths"].items():
        lats = r["latency"].values()
        n = sum(s["n"] for s in lats)
        other = sum(s.get("echo_after_other_updates", 0) for s in lats)
        half = sum(s.get("cell_half_drawn_before_echo", 0) for s in lats)
        resyncs = sum(s["resyncs"] for s in lats)
        out.append(f"- `{key}`: {r['title']}; " + "; ".join(r["notes"])
                   + f". {other} of {n} echoes came after other screen updates (cursor blink), "
                   f"{half} after an update showing the cell neither empty nor as the glyph; "
                   f"{resyncs} re-syncs.")
    for key, why in result.get("not_measured", {}).items():
        out.append(f"- `{key}`: {why}.")
    if any("migration" in r for r in result["paths"].values()):
        out += ["", "Through one live migration (localhost) per path, the client typing a key "
                "every ~0.3 s (echo awaited up to 60 s); a disconnected client looks for the "
                "server where it is after the migration and reconnects:", "",
                migration_table(result), ""]
        out += [f"- `{key}` through xl migrate: not measured: {r['migration_not_measured']}."
                for key, r in result["paths"].items() if r.get("migration_not_measured")]
    out += [f"- {line}" for line in verdict(result)]
    slow = []
    for key, r in result["paths"].items():
        for regime, s in r["latency"].items():
            ms = s["samples_ms"]
            if ms:
                share = sum(v >= SLOW_MODE_MS for v in ms) / len(ms)
                slow.append(f"{key} {regime} ms {share:.0%}")
    if slow:
        out.append(f"- samples ≥ {SLOW_MODE_MS:g} ms: " + ", ".join(slow) + ". QEMU's are "
                   "bimodal (a key that just missed a refresh tick waits for the next one, "
                   "and the tick interval has grown while the screen was quiet); the agent "
                   "sends an update as soon as the guest reports damage and a request is "
                   "outstanding, so its spread is the guest's and the agent's own work.")
    if m.get("dirty"):
        out.append("- checkout differed from the commit in: "
                   + ", ".join(f"`{d.strip()}`" for d in m["dirty"]))
    if m.get("note"):
        out.append(f"- {m['note']}")
    out += [
        f"- date: {m['date']}; git: {m['git']}; xenbox boot {result['boot_s']} s; "
        f"{result.get('xen', '?')}",
        f"- machine: `{m['uname']}`; CPU: {m['cpu']}; nproc: {m['nproc']}; "
        f"load average before/after: {m['loadavg_before'][0]:.2f}/{m['loadavg_after'][0]:.2f}",
        SECTION_END,
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=200, help="measured samples per path")
    p.add_argument("--paths", nargs="+", default=DEFAULT_PATHS, choices=list(SETUPS),
                   help="paths to measure, in this order")
    p.add_argument("--pauses", nargs="+", default=["10-60", "150-600"], metavar="LO-HI",
                   help="pause regimes (ms, uniform random) before each key; --samples each")
    p.add_argument("--block", type=int, default=25,
                   help="samples per block before switching to the next pause regime")
    p.add_argument("--timeout", type=float, default=5.0, help="s to wait for one echo")
    p.add_argument("--migrate", action="store_true",
                   help="also type through one `xl migrate` per path (counts disconnects)")
    p.add_argument("--migrate-pause", type=float, default=300.0,
                   help="ms between keys while xl migrates")
    p.add_argument("--after-migrate", type=float, default=3.0,
                   help="s of typing after xl migrate returned")
    p.add_argument("--post-samples", type=int, default=50,
                   help="samples measured after the migration (0: none)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--boot-timeout", type=float, default=600.0,
                   help="s to wait for dom0's shell (a busy machine boots TCG slowly)")
    p.add_argument("--note", default="", help="a sentence added to the report (conditions)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE",
                   help="write the results as JSON")
    p.add_argument("--from-json", type=Path, default=None, metavar="FILE",
                   help="re-render a recorded run (no box)")
    p.add_argument("--update", type=Path, default=None, metavar="BENCHMARKS.md",
                   help="replace the table1 section of this file")
    args = p.parse_args(argv)
    args.argv = argv
    if args.samples < 1 or args.post_samples < 0:
        p.error("--samples must be >= 1, --post-samples >= 0")
    try:
        args.pauses = [tuple(float(x) for x in r.split("-", 1)) for r in args.pauses]
    except ValueError:
        p.error("--pauses takes LO-HI pairs in ms, e.g. 10-60 150-600")
    if not all(len(r) == 2 and 0 <= r[0] <= r[1] for r in args.pauses) or args.block < 1:
        p.error("--pauses: need 0 <= LO <= HI; --block >= 1")
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
        if args.note:  # a reading added after the run
            result["meta"]["note"] = args.note
    else:
        try:
            result = run(args)
        except (RFBError, RuntimeError, OSError, TimeoutError) as exc:
            print(f"xen_table1: {exc}", file=sys.stderr)
            return 1
        if args.json is not None:
            args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    if any("migration" in r for r in result["paths"].values()):
        print()
        print(migration_table(result))
    for line in verdict(result):
        print(line)
    if args.update is not None:
        benchmeta.update_section(args.update, SECTION_START, SECTION_END, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
