"""End to end on one sim host: real VNC clients -> RM agent -> vkbd/vfb -> the sim guest's shell.

The guest is the sim guest *program* (Linux-like xen-kbdfront/xen-fbfront, bash in a pty rendered
into its framebuffer), the agent is the project's RMAgent serving it from dom0, and the clients
are vncdotool and noVNC in headless Chromium.  What the shell prints must be visible in the
client's screenshot (found with the guest font's own glyphs), and what the guest received is
read back from its key log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dmore_nova.rm_vm.agent import RMAgent
from dmore_nova.xen.api import XenError
from dmore_nova.xen.io import keymap
from dmore_nova.xen.sim import devices
from dmore_nova.xen.sim.guest.control import GuestControl
from dmore_nova.xen.sim.guest.font import find_text
from tests.integration.rfb_harness import LoopThread, rgb
from tests.integration.simhosts import TestSupervisor

REPO = Path(__file__).resolve().parents[2]
KC = keymap.LINUX_KEYCODES
GUEST_PAGES = 4096  # 16 MiB


def wait_for(pred, timeout: float = 10.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value is not None and value is not False and (
                isinstance(value, np.ndarray) or value):
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Stack:
    def __init__(self, tmp: Path) -> None:
        self.sup = TestSupervisor("de2e")
        self.host = self.sup.start_host("a")
        with self.host.toolstack() as ts:
            self.guest = ts.create_domain("guest", GUEST_PAGES)
        self.xen0 = self.host.xen(0)
        devices.add_vkbd(self.xen0.xenstore, self.guest, 0)
        devices.add_vfb(self.xen0.xenstore, self.guest, 0)
        self.lt = LoopThread()
        self.agent = RMAgent(self.xen0, self.guest)
        self.port = self.lt.run(self.agent.start("127.0.0.1", 0))
        self.ctl_path = tmp / "ctl.sock"
        self.key_log = tmp / "keys.jsonl"
        self.guest_log = tmp / "guest.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dmore_nova.xen.sim.guest", "--host-dir",
             str(self.host.run_dir), "--domid", str(self.guest), "--key-log", str(self.key_log),
             "--control", str(self.ctl_path)],
            stdout=subprocess.PIPE, stderr=open(self.guest_log, "wb"),  # noqa: SIM115
            env={**os.environ, "PYTHONPATH": str(REPO)}, text=True)
        ready = json.loads(self.proc.stdout.readline() or "{}")
        assert ready.get("ready"), self.guest_log.read_text()
        self.ctl = GuestControl(self.ctl_path)
        # The guest reports a device as None until its frontend exists (a loaded machine can
        # take seconds to get there).
        wait_for(lambda: all((self.ctl.status()[d] or {}).get("state") == "Connected"
                             for d in ("vfb", "vkbd")), timeout=60, what="devices connected")

    def framebuffer(self) -> np.ndarray:
        return self.lt.call(lambda: rgb(self.agent.display.live().copy()))

    def events(self) -> list[dict]:
        return [json.loads(x) for x in self.key_log.read_text().splitlines()]

    def screen(self) -> list[str]:
        return [line.rstrip() for line in self.ctl.screen()]

    def close(self) -> None:
        try:
            self.ctl.stop()
        except (OSError, XenError, Exception):  # noqa: BLE001 - best-effort teardown
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.ctl.close()
        self.lt.run(self.agent.stop())
        self.lt.stop()
        self.xen0.close()
        self.sup.cleanup()


@pytest.fixture
def stack(tmp_path):
    s = Stack(tmp_path)
    yield s
    s.close()


def text_cells(img: np.ndarray, text: str) -> list[tuple[int, int]]:
    """Where ``text`` is drawn in a client screenshot (background = the top-left pixel)."""
    h, w = img.shape[:2]
    fg = np.any(img[: h // 16 * 16, : w // 8 * 8] != img[0, 0], axis=2)
    return find_text(fg, text)


def client_shows_guest(capture, stack: Stack, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Wait until the client's picture equals the guest's, comparing with the guest's picture
    as it is *now* each time (the shell draws its prompt whenever it gets to it)."""
    def same():
        shot = capture()
        fb = stack.framebuffer()
        ok = shot.shape == fb.shape and (shape is None or shot.shape[:2] == shape)
        return shot if ok and np.array_equal(shot, fb) else None
    return wait_for(same, what="the client showing the guest's screen")


def test_vncdotool_types_echo_hello_into_the_guest_shell(stack, vncdotool_connect):
    c = vncdotool_connect("127.0.0.1", stack.port)
    wait_for(lambda: stack.screen() and stack.screen()[0].startswith("$"), what="prompt")
    c.type("echo hello")
    c.key("enter")
    wait_for(lambda: len(stack.screen()) > 1 and stack.screen()[1] == "hello",
             what="the shell ran the command")
    # The client's own screenshot shows it: the output line, and the command line above it.
    shot = client_shows_guest(c.capture, stack)
    assert (1, 0) in text_cells(shot, "hello")
    assert (0, 2) in text_cells(shot, "echo hello")
    # Every key the client sent arrived once, in order, as Linux keycodes.
    keys = [(e["keycode"], e["pressed"]) for e in stack.events() if e["type"] == "key"]
    typed = []
    for ch in "echo hello":
        code = KC["KEY_SPACE"] if ch == " " else KC[f"KEY_{ch.upper()}"]
        typed += [(code, True), (code, False)]
    typed += [(KC["KEY_ENTER"], True), (KC["KEY_ENTER"], False)]
    assert keys == typed


def test_pointer_reaches_the_guest_as_scaled_positions(stack, vncdotool_connect):
    c = vncdotool_connect("127.0.0.1", stack.port)
    w, h = stack.agent.display.width, stack.agent.display.height
    c.move(w - 1, h - 1)
    c.click(100, 50)
    wait_for(lambda: len([e for e in stack.events() if e["type"] == "key"]) >= 2,
             what="the click (press and release)")
    pos = [(e["abs_x"], e["abs_y"]) for e in stack.events() if e["type"] == "pos"]
    # The guest's mode is the advertised 800x600, so positions arrive unscaled.
    assert (w - 1, h - 1) in pos and pos[-1] == (100, 50)
    btn = [(e["keycode"], e["pressed"]) for e in stack.events() if e["type"] == "key"]
    assert btn == [(keymap.BTN_LEFT, True), (keymap.BTN_LEFT, False)]


def test_guest_resize_reaches_the_client(stack, vncdotool_connect):
    c = vncdotool_connect("127.0.0.1", stack.port, pseudo=("desktop-size",))
    client_shows_guest(c.capture, stack, (600, 800))
    stack.ctl.request("resize", width=640, height=480)
    client_shows_guest(c.capture, stack, (480, 640))


@pytest.mark.browser
def test_novnc_types_into_the_guest_shell(stack, novnc_connect):
    viewer = novnc_connect("127.0.0.1", stack.port)
    wait_for(lambda: stack.screen() and stack.screen()[0].startswith("$"), what="prompt")
    # Real key presses: an upper-case letter is Shift + the letter, as a person types it
    # (Playwright's type("H") would send the letter without Shift).
    viewer.type("echo ")
    viewer.press("Shift+H")
    viewer.type("i there")
    viewer.press("Enter")
    wait_for(lambda: len(stack.screen()) > 1 and stack.screen()[1] == "Hi there",
             what="the shell ran the command")
    shot = client_shows_guest(viewer.pixels, stack)
    assert (1, 0) in text_cells(shot, "Hi there")
    # noVNC sent scancodes (QEMU extended key events): Shift was a real key press.
    keys = [(e["keycode"], e["pressed"]) for e in stack.events() if e["type"] == "key"]
    assert keys[10:14] == [(KC["KEY_LEFTSHIFT"], True), (KC["KEY_H"], True),
                           (KC["KEY_H"], False), (KC["KEY_LEFTSHIFT"], False)]


@pytest.mark.browser
def test_novnc_pointer_and_guest_resize(stack, novnc_connect):
    viewer = novnc_connect("127.0.0.1", stack.port)
    client_shows_guest(viewer.pixels, stack, (600, 800))
    viewer.click(320, 240)
    wait_for(lambda: len([e for e in stack.events() if e["type"] == "key"]) >= 2,
             what="the click (press and release)")
    pos = [(e["abs_x"], e["abs_y"]) for e in stack.events() if e["type"] == "pos"]
    assert pos[-1] == (320, 240)
    btn = [(e["keycode"], e["pressed"]) for e in stack.events() if e["type"] == "key"]
    assert btn == [(keymap.BTN_LEFT, True), (keymap.BTN_LEFT, False)]
    stack.ctl.request("resize", width=640, height=400)
    client_shows_guest(viewer.pixels, stack, (400, 640))
