"""Issue 5 §1 on real Xen 4.17: the project's RM agent in dom0 serves a real Linux guest.

The guest's vkb has ``backend-type=linux`` (libxl writes its nodes under ``backend/vinput``
and starts no QEMU); its vfb is plugged by the agent itself.  From the host, vncdotool types a
command into the guest's tty1 shell (fbcon on xen-fbfront, keys from xen-kbdfront); the command
writes a marker to hvc0, which xenconsoled logs in dom0, and prints a line that the client must
see in its own picture of the guest's framebuffer.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.xen.dom0 import GUEST, ServedGuest, start_served_guest, stop_served_guest, wait_for
from tests.xen.screen import TextScreen, picture_problems

#: Typed into the guest shell.  The shell's arithmetic makes the output differ from what was
#: typed, so seeing it proves the guest ran the command (not that the echo of typing shows).
COMMAND = "echo XBM$((6*7))Q >/dev/hvc0; echo SCR$((3*4))Q"
HVC0_MARKER = "XBM42Q"
SCREEN_OUTPUT = "SCR12Q"


@pytest.fixture(scope="module")
def served(xenbox) -> ServedGuest:
    t0 = time.monotonic()
    g = start_served_guest(xenbox)
    from tests.xen.conftest import TIMINGS
    TIMINGS["guest created + agent up + tty1 shell"] = time.monotonic() - t0
    yield g
    log = stop_served_guest(g)
    (Path(xenbox.run_dir) / "agent-final.log").write_text(log)


def last_screen(g: ServedGuest, pred) -> TextScreen:
    def find():
        for s in reversed(g.screens()):
            if pred(s):
                return s
        return None
    return wait_for(find, 90, "the guest's text screen to show it")


def test_devices_served_by_the_agent_not_qemu(served: ServedGuest):
    d = served.domid
    vkbd_be = f"/local/domain/0/backend/vinput/{d}/0"
    # libxl put the linux-type vkb under backend/vinput; the frontend points there.
    assert served.xs_read(f"/local/domain/{d}/device/vkbd/0/backend") == vkbd_be
    assert served.xs_read(f"{vkbd_be}/state") == "4"
    assert served.xs_read(f"/local/domain/{d}/device/vkbd/0/state") == "4"
    # The agent wrote its features before the guest probed: xen-kbdfront asked for absolute
    # pointer events (it reads feature-abs-pointer only at probe time).
    assert served.xs_read(f"/local/domain/{d}/device/vkbd/0/request-abs-pointer") == "1"
    # The vfb exists only because the agent plugged it, and it is connected.
    vfb_be = f"/local/domain/0/backend/vfb/{d}/0"
    assert served.xs_read(f"/local/domain/{d}/device/vfb/0/backend") == vfb_be
    assert served.xs_read(f"{vfb_be}/state") == "4"
    assert served.xs_read(f"/local/domain/{d}/device/vfb/0/state") == "4"
    assert served.xs_read(f"/local/domain/{d}/device/vfb/0/protocol") == "x86_64-abi"
    # No device model: nothing but the agent serves this guest.
    assert served.qemu_for_guest() == ""
    # The guest sees its framebuffer (xen-fbfront) and the keyboard (xen-kbdfront).
    log = served.console_log()
    assert "XENBOX-FB0 xen 800,600" in log
    assert "XENBOX-TTY1-SHELL" in log


def test_vncdotool_types_into_the_guest_shell_and_sees_the_output(served: ServedGuest,
                                                                  vncdotool_connect,
                                                                  xenbox):
    c = vncdotool_connect("127.0.0.1", served.rfb_port, timeout=60)
    info = c.info()
    assert (info["width"], info["height"]) == (800, 600)
    prompt = last_screen(served, lambda s: s.lines[s.cursor[0]].startswith("guest# "))
    row = prompt.cursor[0]

    c.type(COMMAND)
    c.key("enter")

    # The guest ran it: the marker it wrote to hvc0 is in xenconsoled's log in dom0.
    wait_for(lambda: HVC0_MARKER in served.console_log(), 90, "the hvc0 marker in dom0")
    # ... and its tty1 shows the command line, then the output, then a new prompt.
    screen = last_screen(served, lambda s: any(line.rstrip() == SCREEN_OUTPUT
                                               for line in s.lines)
                         and s.lines[s.cursor[0]].rstrip() == "guest#")
    text = [line.rstrip() for line in screen.lines]
    out_row = text.index(SCREEN_OUTPUT)
    assert text[out_row - 1] == "guest# " + COMMAND, text[max(0, out_row - 2):out_row + 2]
    assert out_row >= row + 1

    # The client's picture is a drawing of exactly that text screen.
    last: list[np.ndarray] = []

    def client_shows_it():
        shot = c.capture()
        last[:] = [shot]
        return not picture_problems(shot, screen)
    try:
        wait_for(client_shows_it, 60, "the client's picture to match the guest's screen",
                 interval=1.0)
    finally:
        if last:
            Image.fromarray(last[0]).save(Path(xenbox.run_dir) / "vncdotool-after-command.png")
    assert picture_problems(last[0], screen) == []
    # Every key arrived once: the typed command line is exactly what the shell echoed.
    assert sum(line.count(COMMAND) for line in text) == 1
    assert GUEST in served.sh("xl list").output


@pytest.mark.browser
def test_novnc_in_chromium_types_into_the_guest_shell(served: ServedGuest, novnc_connect,
                                                      xenbox):
    viewer = novnc_connect("127.0.0.1", served.rfb_port, width=800, height=600, timeout=60)
    assert viewer.connected, viewer.failure
    last_screen(served, lambda s: s.lines[s.cursor[0]].rstrip() == "guest#")
    # Real key presses through noVNC (QEMU extended key events: scancodes): '>' is typed as
    # Shift + '.', as a person types it.  Digits only in the results, so match whole lines.
    viewer.type("expr 50000 - 4567 ")
    viewer.press("Shift+Period")
    viewer.type("/dev/hvc0; expr 9000 - 1234")
    viewer.press("Enter")
    wait_for(lambda: re.search(r"(?m)^45433\r?$", served.console_log()), 90,
             "45433 on hvc0 in dom0")
    screen = last_screen(served, lambda s: "7766" in [line.rstrip() for line in s.lines]
                         and s.lines[s.cursor[0]].rstrip() == "guest#")
    text = [line.rstrip() for line in screen.lines]
    assert "guest# expr 50000 - 4567 >/dev/hvc0; expr 9000 - 1234" in text
    last: list[np.ndarray] = []

    def browser_shows_it():
        last[:] = [viewer.pixels()]
        return not picture_problems(last[0], screen)
    try:
        wait_for(browser_shows_it, 60, "noVNC's canvas to match the guest's screen", 1.0)
    finally:
        if last:
            Image.fromarray(last[0]).save(Path(xenbox.run_dir) / "novnc-after-command.png")
    assert picture_problems(last[0], screen) == []
