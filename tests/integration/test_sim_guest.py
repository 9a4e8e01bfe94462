"""The sim guest on a sim host: devices plumbed by the toolstack code, frontends probing,
granting and resuming, a real shell typing ``echo hi`` -- with the test itself acting as a
minimal dom0 backend through ``SimXen`` and the ``xen/io`` codecs (map ``page-gref``, bind
``event-channel``, write KEY events; map the framebuffer through ``pd[]``; read UPDATEs).
"""

from __future__ import annotations

import errno
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dmore_nova.xen.api import XenError
from dmore_nova.xen.io import fbif as F
from dmore_nova.xen.io import kbdif as K
from dmore_nova.xen.io import keymap
from dmore_nova.xen.io.xenbus import XenbusState
from dmore_nova.xen.sim import devices
from dmore_nova.xen.sim.client import SimXen
from dmore_nova.xen.sim.guest import Guest
from dmore_nova.xen.sim.guest.console import DEFAULT_BG
from dmore_nova.xen.sim.guest.font import CELL_H, CELL_W, find_text

REPO = Path(__file__).resolve().parents[2]
GUEST_PAGES = 2048          # 8 MiB: 2 MiB of video memory twice over, and some
TIMEOUT = 15.0


def wait_for(cond: Callable[[], Any], timeout: float = TIMEOUT, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# --- a minimal backend, from the test -----------------------------------------------------------
class MiniVkbd:
    """Just enough of a vkbd backend: features, InitWait, map the grant, bind, Connected."""

    def __init__(self, xen: SimXen, fe: int) -> None:
        self.xen, self.fe = xen, fe
        self.xs = xen.xenstore
        self.be = f"/local/domain/0/backend/vkbd/{fe}/0"
        self.fe_path = f"/local/domain/{fe}/device/vkbd/0"
        self.ev = xen.event_channels()
        self.page = None
        self.lport: int | None = None
        self.gref: int | None = None

    def init(self) -> None:
        self.xs.write(f"{self.be}/feature-abs-pointer", "1")
        self.xs.write(f"{self.be}/width", "640")
        self.xs.write(f"{self.be}/height", "480")
        self.xs.write(f"{self.be}/state", XenbusState.InitWait.to_xenstore())

    def fe_state(self) -> int:
        raw = self.xs.read(f"{self.fe_path}/state")
        return int(raw) if raw else 0

    def connect(self, *, not_gref: int | None = None) -> None:
        """Map and bind what the frontend published (a *new* gref if ``not_gref``)."""
        def published() -> bool:
            gref = self.xs.read(f"{self.fe_path}/page-gref")
            return (self.fe_state() in (3, 4) and gref is not None
                    and int(gref) != not_gref)

        wait_for(published, what="vkbd frontend to publish its ring")
        self.disconnect()
        self.gref = int(self.xs.read(f"{self.fe_path}/page-gref"))
        port = int(self.xs.read(f"{self.fe_path}/event-channel"))
        self.page = self.xen.map_grant(self.fe, self.gref, writable=True)
        self.lport = self.ev.bind_interdomain(self.fe, port)
        self.xs.write(f"{self.be}/state", XenbusState.Connected.to_xenstore())

    def disconnect(self) -> None:
        if self.lport is not None:
            self.ev.unbind(self.lport)
            self.lport = None
        if self.page is not None:
            self.page.unmap()
            self.page = None

    def send(self, events: list) -> None:
        """Put ``events`` in the ring, waiting for the guest's notify when it is full."""
        while events:
            n = K.kbd_in_put(self.page.mem, events)
            events = events[n:]
            if n:
                self.ev.notify(self.lport)
            if events:
                wait_for(lambda: K.XenkbdPage(self.page.mem).in_pending() < K.XENKBD_IN_RING_LEN,
                         what="room in the in ring")

    def type(self, text: str) -> list[tuple[int, bool]]:
        """Type ``text`` as a US keyboard would (shift around shifted characters)."""
        keys: list[tuple[int, bool]] = []
        for ch in text:
            if ch == "\n":
                code, shift = keymap.LINUX_KEYCODES["KEY_ENTER"], False
            else:
                code, shift = keymap.keysym_to_linux(ord(ch))
            if shift:
                keys.append((keymap.KEY_LEFTSHIFT, True))
            keys += [(code, True), (code, False)]
            if shift:
                keys.append((keymap.KEY_LEFTSHIFT, False))
        self.send([K.XenkbdKey(pressed=p, keycode=c) for c, p in keys])
        return keys

    def consumed(self) -> bool:
        return K.XenkbdPage(self.page.mem).in_pending() == 0


class MiniVfb:
    """Just enough of a vfb backend: map the shared page and, through ``pd[]``, the frames."""

    def __init__(self, xen: SimXen, fe: int) -> None:
        self.xen, self.fe = xen, fe
        self.xs = xen.xenstore
        self.be = f"/local/domain/0/backend/vfb/{fe}/0"
        self.fe_path = f"/local/domain/{fe}/device/vfb/0"
        self.ev = xen.event_channels()
        self.page = self.fbmap = None
        self.fbpage: F.XenfbPage | None = None
        self.lport: int | None = None
        self.page_ref: int | None = None
        self.frames: list[int] = []
        self.updates: list[F.XenfbUpdate] = []

    def init(self) -> None:
        for k, v in (("videoram", "2"), ("width", "640"), ("height", "480"),
                     ("feature-resize", "1"), ("request-update", "1")):
            self.xs.write(f"{self.be}/{k}", v)
        self.xs.write(f"{self.be}/state", XenbusState.InitWait.to_xenstore())

    def fe_state(self) -> int:
        raw = self.xs.read(f"{self.fe_path}/state")
        return int(raw) if raw else 0

    def connect(self, *, not_page_ref: int | None = None) -> None:
        def published() -> bool:
            ref = self.xs.read(f"{self.fe_path}/page-ref")
            return self.fe_state() in (3, 4) and ref is not None and int(ref) != not_page_ref

        wait_for(published, what="vfb frontend to publish page-ref")
        self.disconnect()
        self.page_ref = int(self.xs.read(f"{self.fe_path}/page-ref"))
        protocol = self.xs.read(f"{self.fe_path}/protocol").decode()
        self.page = self.xen.map_foreign(self.fe, [self.page_ref], writable=True)
        p = self.fbpage = F.XenfbPage(self.page.mem, protocol)
        n_pages = -(-p.mem_length // 4096)
        dirs = [p.pd(i) for i in range(p.pd_entries_needed(p.mem_length))]
        with self.xen.map_foreign(self.fe, dirs) as d:
            dtype = "<u4" if p.pd_entry_size == 4 else "<u8"
            self.frames = np.frombuffer(d.mem, dtype, count=n_pages).tolist()
        self.fbmap = self.xen.map_foreign(self.fe, self.frames)
        self.lport = self.ev.bind_interdomain(
            self.fe, int(self.xs.read(f"{self.fe_path}/event-channel")))
        self.xs.write(f"{self.be}/state", XenbusState.Connected.to_xenstore())

    def disconnect(self) -> None:
        if self.lport is not None:
            self.ev.unbind(self.lport)
            self.lport = None
        for m in (self.fbmap, self.page):
            if m is not None:
                m.unmap()
        self.page = self.fbmap = self.fbpage = None

    def drain(self) -> list[F.XenfbUpdate]:
        """Consume the out ring (as the backend does on its event) and notify the guest."""
        new = [e for e in F.fb_out_get(self.fbpage) if isinstance(e, F.XenfbUpdate)]
        if new:
            self.ev.notify(self.lport)
        self.updates += new
        return new

    def image(self) -> np.ndarray:
        p = self.fbpage
        return np.frombuffer(self.fbmap.mem, np.uint32, count=p.height * p.line_length // 4
                             ).reshape(p.height, p.line_length // 4)[:, :p.width]

    def text_at(self, text: str) -> list[tuple[int, int]]:
        img = self.image()
        rows, cols = img.shape[0] // CELL_H, img.shape[1] // CELL_W
        return find_text(img[:rows * CELL_H, :cols * CELL_W] != DEFAULT_BG, text)

    def updated(self, row: int, col: int, ncols: int) -> bool:
        """Did some UPDATE cover these cells?"""
        x0, y0, x1, y1 = col * CELL_W, row * CELL_H, (col + ncols) * CELL_W, (row + 1) * CELL_H
        return any(u.x <= x0 and u.y <= y0 and u.x + u.width >= x1 and u.y + u.height >= y1
                   for u in self.updates)


# --- fixtures -------------------------------------------------------------------------------
@pytest.fixture
def sup(sim_sup):
    return sim_sup


@pytest.fixture
def host(sup):
    return sup.start_host("a")


def plumb(host) -> tuple[int, SimXen, MiniVkbd, MiniVfb]:
    with host.toolstack() as ts:
        guest = ts.create_domain("guest", GUEST_PAGES)
    dom0 = host.xen(0)
    devices.add_vkbd(dom0.xenstore, guest, 0)
    devices.add_vfb(dom0.xenstore, guest, 0)
    kbd, fb = MiniVkbd(dom0, guest), MiniVfb(dom0, guest)
    kbd.init()
    fb.init()
    return guest, dom0, kbd, fb


@pytest.fixture
def plumbed(host):
    """A guest domain with vkbd+vfb served by dom0, backends in InitWait."""
    guest, dom0, kbd, fb = plumb(host)
    yield host, guest, dom0, kbd, fb
    kbd.disconnect()
    fb.disconnect()
    dom0.close()


class GuestThread:
    """A :class:`Guest` polled on its own thread; :meth:`call` runs code on that thread."""

    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self._calls: queue.Queue = queue.Queue()
        self._stop = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self._stop:
                self.guest.poll(0.02)
                while not self._calls.empty():
                    fn, box = self._calls.get()
                    try:
                        box.put((True, fn()))
                    except BaseException as exc:  # handed to the caller
                        box.put((False, exc))
        except BaseException as exc:
            self.error = exc

    def call(self, fn: Callable[[], Any]) -> Any:
        box: queue.Queue = queue.Queue()
        self._calls.put((fn, box))
        ok, value = box.get(timeout=TIMEOUT)
        if not ok:
            raise value
        return value

    def stop(self) -> None:
        self._stop = True
        self.thread.join(5)
        assert self.error is None, self.error


# --- in-process guest ---------------------------------------------------------------------------
def test_frontends_connect_take_keys_draw_and_resume_against_dom0(plumbed):
    host, guest_id, dom0, be_kbd, be_fb = plumbed
    kernel = host.kernel(guest_id)
    g = GuestThread(Guest(kernel, console=False))
    try:
        be_kbd.connect()
        be_fb.connect()
        wait_for(lambda: be_kbd.fe_state() == 4 and be_fb.fe_state() == 4,
                 what="frontends Connected")
        st = g.call(g.guest.status)
        assert st["vkbd"]["abs_pointer"] and st["vfb"]["update_wanted"]
        assert dom0.xenstore.read(f"{be_kbd.fe_path}/request-abs-pointer") == b"1"

        # Keys: consumed in order, and the guest notified us after consuming.
        typed = be_kbd.type("Hi!\n")
        wait_for(lambda: len(g.call(g.guest.kbd.keys)) == len(typed), what="keys in guest")
        assert g.call(g.guest.kbd.keys) == typed
        assert be_kbd.consumed()
        wait_for(lambda: be_kbd.ev.pending() is not None, what="notify from the guest")

        # Pixels: drawn by the guest, seen through pd[], announced by an UPDATE.
        def draw() -> None:
            g.guest.fb.pixels[100:110, 200:220] = 0x00FF8000
            g.guest.fb.damage(200, 100, 20, 10)

        g.call(draw)
        wait_for(lambda: be_fb.drain() or be_fb.updates, what="an UPDATE")
        assert F.XenfbUpdate(x=200, y=100, width=20, height=10) in be_fb.updates
        assert (be_fb.image()[100:110, 200:220] == 0x00FF8000).all()

        # Resume: new grant, page, port; new fb frames with the picture copied over.
        old_gref, old_ref = be_kbd.gref, be_fb.page_ref
        old_frames = set(be_fb.frames)
        g.call(g.guest.resume)
        be_kbd.connect(not_gref=old_gref)
        be_fb.connect(not_page_ref=old_ref)
        assert be_kbd.gref != old_gref and be_fb.page_ref != old_ref
        assert not old_frames & set(be_fb.frames)
        assert (be_fb.image()[100:110, 200:220] == 0x00FF8000).all()
        assert bytes(be_kbd.page.mem[:16]) == bytes(16)       # a fresh, zeroed ring
        wait_for(lambda: be_kbd.fe_state() == 4 and be_fb.fe_state() == 4,
                 what="frontends Connected again")
        more = be_kbd.type("ok\n")
        wait_for(lambda: len(g.call(g.guest.kbd.keys)) == len(typed + more),
                 what="keys after resume")
        assert g.call(g.guest.kbd.keys) == typed + more
        # The old grant was ended once we unmapped it (deferred until then).
        g.call(lambda: g.guest.kernel.process_deferred())
        with pytest.raises(XenError):
            dom0.map_grant(guest_id, old_gref)
    finally:
        g.stop()
        g.guest.close()


# --- the guest program ---------------------------------------------------------------------------
def _control(sock_path: str, req: dict) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(TIMEOUT)
        s.connect(sock_path)
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)


@pytest.fixture
def guest_proc(plumbed, tmp_path):
    host, guest_id, *_ = plumbed
    ctl = str(tmp_path / "ctl.sock")
    log = tmp_path / "keys.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dmore_nova.xen.sim.guest", "--host-dir", str(host.run_dir),
         "--domid", str(guest_id), "--key-log", str(log), "--control", ctl],
        stdout=subprocess.PIPE, stderr=open(tmp_path / "guest.log", "wb"),  # noqa: SIM115
        env={**os.environ, "PYTHONPATH": str(REPO)}, text=True)
    try:
        ready = json.loads(proc.stdout.readline() or "{}")
        assert ready.get("ready") and ready.get("domid") == guest_id, (
            (tmp_path / "guest.log").read_text())
        yield proc, ctl, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_guest_program_runs_a_shell_typed_into_and_drawn_through_vfb(plumbed, guest_proc):
    host, guest_id, dom0, be_kbd, be_fb = plumbed
    proc, ctl, log = guest_proc
    be_kbd.connect()
    be_fb.connect()

    def prompt() -> bool:
        be_fb.drain()
        return (0, 0) in be_fb.text_at("$")

    # The prompt may have been drawn before we were Connected: then it is in memory but was
    # never announced (xen-fbfront drops UPDATEs until request-update is seen).
    wait_for(prompt, what="the shell prompt on the framebuffer")
    typed = be_kbd.type("echo hi\n")

    def output() -> bool:
        be_fb.drain()
        # In memory, and announced by an UPDATE (the pixels are written just before it).
        return (1, 0) in be_fb.text_at("hi") and be_fb.updated(1, 0, 2)

    wait_for(output, what="'hi' printed by the shell")
    assert (0, 2) in be_fb.text_at("echo hi")             # the echoed command line
    screen = _control(ctl, {"op": "screen"})
    assert screen["ok"] and screen["lines"][0].rstrip() == "$ echo hi"
    assert screen["lines"][1].rstrip() == "hi"
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(x["keycode"], x["pressed"]) for x in lines] == typed

    # Resume over the control socket: both devices re-publish; the screen survives.
    st = _control(ctl, {"op": "status"})
    assert st["vkbd"]["state"] == "Connected" and st["vfb"]["state"] == "Connected"
    old_gref, old_ref = be_kbd.gref, be_fb.page_ref
    st = _control(ctl, {"op": "resume"})
    # A new grant and new frames.  The port is a new channel but may well have the old
    # *number*: Xen hands out the lowest free port, and the old one was just closed.
    assert st["ok"] and st["vkbd"]["gref"] != old_gref and st["vfb"]["page_frame"] != old_ref
    assert st["vkbd"]["state"] == "Initialised" or st["vkbd"]["state"] == "Connected"
    be_kbd.connect(not_gref=old_gref)
    be_fb.connect(not_page_ref=old_ref)
    assert (1, 0) in be_fb.text_at("hi")
    be_kbd.type("echo ok\n")

    def ok() -> bool:
        be_fb.drain()
        return (3, 0) in be_fb.text_at("ok")

    wait_for(ok, what="'ok' after the resume")

    # SIGUSR1 resumes in place too.
    old_gref = be_kbd.gref
    proc.send_signal(signal.SIGUSR1)
    be_kbd.connect(not_gref=old_gref)
    assert _control(ctl, {"op": "status"})["vkbd"]["resumes"] == 2

    # Control errors are answers, not crashes.
    assert _control(ctl, {"op": "nope"}) == {"ok": False, "error": "unknown op 'nope'"}
    assert not _control(ctl, {"op": "resume", "domid": "x"})["ok"]
    from dmore_nova.xen.sim.guest.control import GuestControl

    with GuestControl(ctl) as c:
        with pytest.raises(XenError) as exc:
            c.request("nope")
        assert exc.value.errno == errno.EINVAL
        assert c.keys()[:len(typed)] == typed             # the connection is still usable
    with pytest.raises(XenError):
        GuestControl(ctl + ".missing").status()

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(TIMEOUT) == 0
    assert be_kbd.fe_state() == 6 and be_fb.fe_state() == 6    # Closed on shutdown


def test_guest_program_moves_to_another_host_and_keeps_its_screen(sup, plumbed, guest_proc):
    host, guest_id, dom0, be_kbd, be_fb = plumbed
    proc, ctl, _log = guest_proc
    be_kbd.connect()
    be_fb.connect()
    wait_for(lambda: (0, 0) in be_fb.text_at("$"), what="the prompt on host a")
    be_kbd.type("echo hi\n")
    wait_for(lambda: (1, 0) in be_fb.text_at("hi"), what="'hi' on host a")

    # Host b: another domid space; the toolstack there plumbs the devices afresh.
    b = sup.start_host("b")
    with b.toolstack() as ts:
        ts.create_domain("placeholder", 16)       # so the guest gets another domid there
    new_id, dom0_b, kbd_b, fb_b = plumb(b)
    assert new_id != guest_id
    try:
        st = _control(ctl, {"op": "resume", "host_dir": str(b.run_dir), "domid": new_id})
        assert st["ok"] and st["domid"] == new_id
        assert st["vkbd"]["backend"] == kbd_b.be and st["vfb"]["backend"] == fb_b.be
        kbd_b.connect()
        fb_b.connect()
        assert (1, 0) in fb_b.text_at("hi")       # the picture moved with the guest
        kbd_b.type("echo ok\n")

        def ok() -> bool:
            fb_b.drain()
            return (3, 0) in fb_b.text_at("ok") and fb_b.updated(3, 0, 2)

        wait_for(ok, what="'ok' typed on host b")
        assert _control(ctl, {"op": "status"})["vkbd"]["state"] == "Connected"
    finally:
        kbd_b.disconnect()
        fb_b.disconnect()
        dom0_b.close()


def test_guest_program_stops_when_its_domain_is_destroyed(plumbed, guest_proc):
    host, guest_id, dom0, be_kbd, be_fb = plumbed
    proc, ctl, _log = guest_proc
    be_kbd.connect()
    be_fb.connect()
    wait_for(lambda: be_kbd.fe_state() == 4, what="vkbd Connected")
    with host.toolstack() as ts:
        ts.destroy_domain(guest_id)
    assert proc.wait(TIMEOUT) == 0        # no spinning on a dead connection, a clean exit
    assert not os.path.exists(ctl)


def test_device_plumbing_over_pyxs_for_an_rm_vm_backend(host):
    """Over a real xenstore connection (no mkdir/set_perms inside transactions) the dirs still
    appear complete, with libxl's permissions, and the parents keep theirs."""
    with host.toolstack() as ts:
        guest = ts.create_domain("guest", 64)
        rm_vm = ts.create_domain("rm", 64)
    dom0, rm, g = host.xen(0), host.xen(rm_vm), host.xen(guest)
    try:
        xs = dom0.xenstore
        parent_perms = xs.get_perms(f"/local/domain/{guest}/device")
        dev = devices.add_vkbd(xs, guest, rm_vm, feature_abs_pointer=True)
        assert xs.get_perms(dev.frontend) == [f"n{guest}", f"r{rm_vm}"]
        assert xs.get_perms(f"{dev.frontend}/backend") == [f"n{guest}", f"r{rm_vm}"]
        assert xs.get_perms(dev.backend) == [f"n{rm_vm}", f"r{guest}"]
        assert xs.get_perms(f"{dev.backend}/feature-abs-pointer") == [f"n{rm_vm}", f"r{guest}"]
        assert xs.get_perms(f"/local/domain/{guest}/device") == parent_perms
        assert xs.get_perms(f"/local/domain/{guest}/device/vkbd") == parent_perms
        # The RM VM runs its end, the guest its own; neither can touch the other's.
        rm.xenstore.write(f"{dev.backend}/state", "2")
        g.xenstore.write(f"{dev.frontend}/state", "3")
        assert rm.xenstore.read(f"{dev.frontend}/state") == b"3"
        assert g.xenstore.read(f"{dev.backend}/state") == b"2"
        with pytest.raises(XenError):
            g.xenstore.write(f"{dev.backend}/state", "4")
        with pytest.raises(XenError):
            rm.xenstore.write(f"{dev.frontend}/state", "4")
        assert devices.find_device(xs, "vkbd", guest) == dev
        assert devices.remove_device(xs, "vkbd", guest) is True
        assert xs.read(dev.frontend) is None and xs.read(dev.backend) is None
        assert xs.directory(f"/local/domain/{guest}/device") == []
    finally:
        for x in (dom0, rm, g):
            x.close()


def test_console_shell_has_a_controlling_terminal_so_ctrl_c_works():
    import select

    from dmore_nova.xen.sim.guest.console import Console

    class Fb:
        width, height = 640, 160
        pixels = np.zeros((160, 640), np.uint32)

        def damage(self, *_rect: int) -> None:
            pass

    con = Console(Fb())
    con.start()
    try:
        def shows(text: str) -> bool:
            r, _, _ = select.select([con.fileno()], [], [], 0.05)
            if r:
                con.on_readable()
            return any(line.rstrip() == text for line in con.text())

        wait_for(lambda: shows("$"), what="prompt")
        con.send_input(b"sleep 30\r")
        wait_for(lambda: shows("$ sleep 30"), what="the command echoed")
        # Until sleep runs as the terminal's foreground job, ^C would reach the shell (or its
        # child before exec, signals not yet reset) and be ignored.

        def sleep_in_foreground() -> bool:
            try:
                with open(f"/proc/{os.tcgetpgrp(con.fileno())}/comm") as f:
                    return f.read().strip() == "sleep"
            except OSError:
                return False

        wait_for(sleep_in_foreground, what="sleep in the foreground")
        con.on_key(K.XenkbdKey(pressed=True, keycode=keymap.LINUX_KEYCODES["KEY_LEFTCTRL"]))
        con.on_key(K.XenkbdKey(pressed=True, keycode=keymap.LINUX_KEYCODES["KEY_C"]))
        # sleep 30 was interrupted: the shell prompts again well before 30 s.
        wait_for(lambda: shows("^C") and con.text()[2].rstrip() == "$", timeout=5,
                 what="the shell back after ^C")
        con.send_input(b"echo done $((6*7))\r")
        wait_for(lambda: shows("done 42"), what="the shell running commands again")
    finally:
        con.close()


def test_guest_program_is_live_migrated_through_its_control_socket(sup, plumbed, guest_proc):
    """``LiveMigration`` drives the guest *process* (GuestControl = MigratingGuest): the shell
    keeps running, the screen comes along, the devices are re-created on host b for the new
    domid, and a backend there gets keys in and pixels out."""
    from dmore_nova.xen.sim.guest.control import GuestControl
    from dmore_nova.xen.sim.migration import LiveMigration

    host, guest_id, dom0, be_kbd, be_fb = plumbed
    proc, ctl, _log = guest_proc
    be_kbd.connect()
    be_fb.connect()
    wait_for(lambda: (0, 0) in be_fb.text_at("$"), what="the prompt on host a")
    be_kbd.type("echo hi\n")
    wait_for(lambda: (1, 0) in be_fb.text_at("hi"), what="'hi' on host a")

    b = sup.start_host("b")
    with b.toolstack() as ts:
        ts.create_domain("placeholder", 16)
    with GuestControl(ctl) as guest, LiveMigration(host, b, guest_id, guest) as mig:
        report = mig.run()
        new_id = report.new_domid
        assert new_id is not None and new_id != guest_id
        st = guest.status()
        assert st["domid"] == new_id and not st["suspended"]
        assert st["vkbd"]["backend"] == f"/local/domain/0/backend/vkbd/{new_id}/0"
        # The source domain is released: its device dirs are gone.
        assert dom0.xenstore.read(be_kbd.fe_path) is None

        dom0_b = b.xen(0)
        kbd_b, fb_b = MiniVkbd(dom0_b, new_id), MiniVfb(dom0_b, new_id)
        try:
            kbd_b.init()
            fb_b.init()
            kbd_b.connect()
            fb_b.connect()
            assert (1, 0) in fb_b.text_at("hi")      # the picture came along
            kbd_b.type("echo ok\n")

            def ok() -> bool:
                fb_b.drain()
                return (3, 0) in fb_b.text_at("ok") and fb_b.updated(3, 0, 2)

            wait_for(ok, what="'ok' typed on host b")
            assert guest.screen()[2].rstrip() == "$ echo ok"
        finally:
            kbd_b.disconnect()
            fb_b.disconnect()
            dom0_b.close()
