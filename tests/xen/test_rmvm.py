"""Issue 5 §3 on real Xen 4.17: the RM agent in its own VM (Domain M), not in dom0.

The RM VM is a PV domU (dom0's kernel, dom0's image read-only as its root disk, the project's
source in its initramfs; tools/xenbox/rmvm*).  dom0 gives it privilege over the guest the way
libxl does for a stub domain (``xc_domain_set_target`` + ``XS_SET_TARGET``); the guest's
``vkb=[backend=rmvm,...]`` puts the vkb backend under the RM VM's own xenstore directory; the
agent inside the RM VM (xenstore through /dev/xen/xenbus, gntdev, evtchn, privcmd) serves it
and plugs the guest's vfb with itself as the backend.  From the host, vncdotool connects to the
RM VM's own address (QEMU forwards a host port to 10.0.2.16, routed through dom0), types into
the guest's tty1 shell, and must see the guest's screen.
"""

from __future__ import annotations

import itertools
import json
import string
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.xen.dom0 import GUEST, wait_for
from tests.xen.rmvm import (
    RMVM,
    RMVM_IP,
    RMVM_RFB_PORT,
    XL_RMVM,
    RmvmGuest,
    probe_pv_target,
    start_rmvm,
    start_rmvm_guest,
    stop_rmvm_guest,
)
from tests.xen.screen import TextScreen, picture_problems

COMMAND = "echo RMV$((6*7))Q >/dev/hvc0; echo SCR$((5*5))Q"
HVC0_MARKER = "RMV42Q"
SCREEN_OUTPUT = "SCR25Q"


@pytest.fixture(scope="module")
def rmvm_setup(xenbox) -> tuple[RmvmGuest, dict, dict]:
    from tests.xen.conftest import TIMINGS
    stage = xenbox.art.rmvm_initrd
    t0 = time.monotonic()
    rm = start_rmvm(xenbox, stage)
    TIMINGS["RM VM created + runner ready"] = time.monotonic() - t0
    pv = probe_pv_target(xenbox, rm)
    t1 = time.monotonic()
    g, target = start_rmvm_guest(xenbox, stage, xenbox.guest_ports[(RMVM_IP, RMVM_RFB_PORT)],
                                 rmvm=rm)
    TIMINGS["PVH guest + target + agent in RM VM + tty1"] = time.monotonic() - t1
    yield g, target, pv
    (Path(xenbox.run_dir) / "rmvm-guest-console.log").write_text(g.console_log())
    log = stop_rmvm_guest(g)
    (Path(xenbox.run_dir) / "rmvm-console.log").write_text(log)


@pytest.fixture(scope="module")
def served(rmvm_setup) -> RmvmGuest:
    return rmvm_setup[0]


def test_rm_vm_initramfs_carries_the_product_agent_and_its_control_channel():
    """No box needed: the checkout's cpio for the RM VM has every module the agent and its
    control channel import, and the bootstrap; none of the old test-side copies."""
    from tests.xen.rmvm import source_cpio
    cpio = source_cpio()
    for name in ("dmore_nova/cmd/rm_agent.py", "dmore_nova/rm_vm/agent.py",
                 "dmore_nova/rm_vm/control.py", "dmore_nova/rm_vm/xs_control.py",
                 "dmore_nova/xen/real/xen.py", "tests/xen/rmvm_boot.py"):
        assert f"src/{name}\0".encode() in cpio, name
    assert b"rmvm_agent" not in cpio


def last_screen(g: RmvmGuest, pred) -> TextScreen:
    def find():
        for s in reversed(g.screens()):
            if pred(s):
                return s
        return None
    return wait_for(find, 120, "the guest's text screen to show it")


def test_xen_refuses_a_pv_target_and_accepts_the_pvh_guest(rmvm_setup):
    """The one piece of §3 Xen 4.17 does not allow: a PV domain as a set_target target (so a
    domU backend cannot foreign-map a PV guest's framebuffer).  xenstored's half works."""
    _g, target, pv = rmvm_setup
    assert pv["xen"].endswith("ENOTSUP (Operation not supported)"), pv
    assert pv["xenstore"] == "ok", pv
    assert target == {**target, "xen": "ok", "xenstore": "ok", "vfb_dirs": "ok"}, target


def test_devices_served_by_the_rm_vm(served: RmvmGuest):
    d, rm = served.domid, served.rmvm_domid
    assert rm not in (0, d)
    assert served.xs_read(f"/local/domain/{rm}/target") == str(d)
    # libxl put the vkb backend in the RM VM's directory (backend= names the RM VM) ...
    vkbd_be = f"/local/domain/{rm}/backend/vinput/{d}/0"
    assert served.xs_read(f"/local/domain/{d}/device/vkbd/0/backend") == vkbd_be
    assert served.xs_read(f"/local/domain/{d}/device/vkbd/0/backend-id") == str(rm)
    assert served.xs_read(f"{vkbd_be}/state") == "4"
    assert served.xs_read(f"/local/domain/{d}/device/vkbd/0/state") == "4"
    assert served.xs_read(f"/local/domain/{d}/device/vkbd/0/request-abs-pointer") == "1"
    # ... and the agent in the RM VM plugged the vfb with itself as the backend.
    vfb_be = f"/local/domain/{rm}/backend/vfb/{d}/0"
    assert served.xs_read(f"/local/domain/{d}/device/vfb/0/backend") == vfb_be
    assert served.xs_read(f"/local/domain/{d}/device/vfb/0/backend-id") == str(rm)
    assert served.xs_read(f"{vfb_be}/state") == "4"
    assert served.xs_read(f"/local/domain/{d}/device/vfb/0/state") == "4"
    # nothing in dom0 serves the guest's console
    assert served.xs_tree(f"/local/domain/0/backend/vinput/{d}") == {}
    assert served.xs_tree(f"/local/domain/0/backend/vfb/{d}") == {}
    assert served.qemu_for_guest() == ""
    log = served.rmvm_log()
    # its configuration names no guest: the agent waited for the RM VM's target
    assert f"serving dom{d}, this domain's target" in log
    assert f"console on 0.0.0.0:{RMVM_RFB_PORT} (backend dom{rm})" in log
    assert f"vkbd-{d}-0: connected (mapped + bound port" in log
    assert f"vfb-{d}-0: connected (mapped + bound port" in log
    glog = served.console_log()
    assert "XENBOX-FB0 xen 800,600" in glog
    assert "XENBOX-TTY1-SHELL" in glog


def test_vncdotool_types_through_the_agent_in_the_rm_vm(served: RmvmGuest, vncdotool_connect,
                                                        xenbox):
    c = vncdotool_connect("127.0.0.1", served.rfb_port, timeout=90)
    info = c.info()
    assert (info["width"], info["height"]) == (800, 600)
    prompt = last_screen(served, lambda s: s.lines[s.cursor[0]].startswith("guest# "))
    row = prompt.cursor[0]

    c.type(COMMAND)
    c.key("enter")
    wait_for(lambda: HVC0_MARKER in served.console_log(), 120, "the hvc0 marker in dom0")
    screen = last_screen(served, lambda s: any(line.rstrip() == SCREEN_OUTPUT
                                               for line in s.lines)
                         and s.lines[s.cursor[0]].rstrip() == "guest#")
    text = [line.rstrip() for line in screen.lines]
    out_row = text.index(SCREEN_OUTPUT)
    assert text[out_row - 1] == "guest# " + COMMAND, text[max(0, out_row - 2):out_row + 2]
    assert out_row >= row + 1
    assert sum(line.count(COMMAND) for line in text) == 1

    last: list[np.ndarray] = []

    def client_shows_it():
        last[:] = [c.capture()]
        return not picture_problems(last[0], screen)
    try:
        wait_for(client_shows_it, 90, "the client's picture to match the guest's screen",
                 interval=1.0)
    finally:
        if last:
            Image.fromarray(last[0]).save(Path(xenbox.run_dir) / "rmvm-vncdotool.png")
    assert picture_problems(last[0], screen) == []
    # The viewer's session is the RM VM's: the agent there logged it, and it is still open.
    log = served.rmvm_log()
    assert log.count("session started") == 1 and ": closed:" not in log


#: One key per this many seconds while the pair migrates (two xl migrates: 3-4 min measured;
#: MAX_MARKER keys at this pace span both).
KEY_INTERVAL = 2.5
#: Longest marker typed (the tty1 line is 100 columns; the command must fit on one).
MAX_MARKER = 80


def test_co_migration_keeps_the_viewer_connected(served: RmvmGuest, vncdotool_connect,
                                                 xenbox):
    """Both ``xl migrate``d by the product's ``dmore-xl-rmvm comigrate`` in dom0 (RM VM first,
    then the guest; dmore_nova/virt/xl_rmvm.py says why), the agent following through its
    xenstore control channel, while vncdotool keeps typing: the viewer's TCP connection ends in
    the RM VM, so it survives because the RM VM migrated; every key reaches the guest once, in
    order."""
    from tests.xen.conftest import TIMINGS
    c = vncdotool_connect("127.0.0.1", served.rfb_port, timeout=90)
    last_screen(served, lambda s: s.lines[s.cursor[0]].rstrip() == "guest#")
    before = served.rmvm_log()
    sessions, closed = before.count("session started"), before.count(": closed:")
    old_g, old_r = served.domid, served.rmvm_domid

    typed: list[str] = []
    done = threading.Event()
    errors: list[BaseException] = []

    def typer() -> None:
        try:
            c.type("echo CMIG")
            for ch in itertools.cycle(string.ascii_lowercase + string.digits):
                if done.is_set() or len(typed) >= MAX_MARKER:
                    break
                c.type(ch)
                typed.append(ch)
                time.sleep(KEY_INTERVAL)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    t = threading.Thread(target=typer, name="typer")
    t.start()
    time.sleep(3)
    t0 = time.monotonic()
    r = served.sh(f"{XL_RMVM} comigrate --rmvm {RMVM} --guest {GUEST} 2>/mnt/box/comigrate.err",
                  1800, check=False)
    TIMINGS["co-migration (RM VM, then guest)"] = time.monotonic() - t0
    time.sleep(3)
    done.set()
    t.join(120)
    err = (xenbox.box_dir / "comigrate.err").read_text(errors="replace")
    (Path(xenbox.run_dir) / "rmvm-comigrate.out").write_text(r.output + "\n-- stderr\n" + err)
    assert not errors, errors
    res = json.loads(r.output.strip().splitlines()[-1])
    if res.get("guest_new") is not None:
        served.domid = res["guest_new"]  # whatever happened, the guest is there now
    if res.get("rmvm_new") is not None:
        served.rmvm_domid = res["rmvm_new"]
    assert r.rc == 0 and res["ok"] and res["state"] == "done", (
        r.output[-4000:], err[-4000:],
        served.xs_tree(f"/local/domain/{served.domid}/device/vfb"))
    steps = {s["what"]: s for s in res["steps"]}
    # every state of the protocol, in order, with its time
    assert list(steps) == ["prepare", "migrate-rmvm", "migrate-guest", "target-incoming",
                           "agent-incoming", "guest-switchover", "guest-unpause",
                           "agent-rehome"], list(steps)
    for what, step in steps.items():
        TIMINGS[f"  {what}"] = step["seconds"]
    # the progress on stderr names each state
    assert all(f"co-migration {RMVM}+{GUEST}: {what}" in err for what in steps), err[-3000:]
    new_r, new_g = res["rmvm_new"], res["guest_new"]
    assert new_r != old_r and new_g != old_g
    assert res["grant"] == {"rmvm": new_r, "guest": res["incoming"], "xen": "ok",
                            "xenstore": "ok", "vfb_dirs": "ok"}, res["grant"]
    assert steps["agent-incoming"]["ack"]["state"] in ("plugged", "done")
    # xl migrate -p left the guest paused until dom0 unpaused it, its vfb plugged by then
    assert steps["guest-unpause"]["rc"] == 0 and steps["guest-unpause"]["was_paused"] is True, \
        steps["guest-unpause"]
    ack = steps["agent-rehome"]["ack"]
    assert ack["state"] == "done" and ack["new"] == new_g and ack["backend"] == new_r, ack
    assert ack["held_dropped"] == 0 and ack["vkbd_dropped"] == 0, ack
    assert ack["abs_pointer"] is True, ack
    served.domid, served.rmvm_domid = new_g, new_r

    c.type(" >/dev/hvc0")
    c.key("enter")
    marker = "CMIG" + "".join(typed)
    assert len(typed) > 10, typed
    wait_for(lambda: marker + "\n" in served.console_log().replace("\r", ""), 120,
             f"{marker} on hvc0")
    assert served.console_log().replace("\r", "").count(marker) == 1

    # the new pair: backends in the new RM VM's directory, connected
    fe_k, fe_f = f"/local/domain/{new_g}/device/vkbd/0", f"/local/domain/{new_g}/device/vfb/0"
    assert served.xs_read(f"{fe_k}/backend") == f"/local/domain/{new_r}/backend/vinput/{new_g}/0"
    assert served.xs_read(f"{fe_f}/backend") == f"/local/domain/{new_r}/backend/vfb/{new_g}/0"
    for path in (f"{fe_k}/state", f"{fe_f}/state",
                 f"/local/domain/{new_r}/backend/vinput/{new_g}/0/state",
                 f"/local/domain/{new_r}/backend/vfb/{new_g}/0/state"):
        assert served.xs_read(path) == "4", path
    assert served.xs_tree(f"/local/domain/{old_r}") == {}

    # the viewer was never disconnected: no new session, no close, in the RM VM's log
    log = served.rmvm_log()
    assert log.count("session started") == sessions and log.count(": closed:") == closed, \
        log[-3000:]
    screen = wait_for(lambda: next((s for s in reversed(served.screens())
                                    if any(marker in line for line in s.lines)
                                    and s.lines[s.cursor[0]].rstrip() == "guest#"), None),
                      120, "the guest's screen with the command and a new prompt")
    last: list[np.ndarray] = []

    def client_shows_it() -> bool:
        last[:] = [c.capture()]
        return not picture_problems(last[0], screen)
    try:
        wait_for(client_shows_it, 90, "the client's picture to match the guest's screen", 1.0)
    finally:
        if last:
            Image.fromarray(last[0]).save(Path(xenbox.run_dir) / "rmvm-after-comigrate.png")


def test_control_channel_refuses_bad_requests_and_resume_remaps(served: RmvmGuest,
                                                              vncdotool_connect):
    """The rollback path on real Xen (what ``dmore-xl-rmvm comigrate`` does when prepare or
    the RM VM's ``xl migrate`` fails): after ``prepare`` the agent holds input with the guest's
    pages unmapped and ports unbound; ``resume`` maps the same grant and frames again, re-binds,
    and replays what was typed meanwhile.  Before that, requests the agent must refuse get an
    error ack and change nothing."""
    import shlex

    def request(text: str) -> dict:
        r = served.sh(f"{XL_RMVM} request {RMVM} {shlex.quote(text)} --timeout 120", 300,
                      check=False)
        return json.loads(r.output.strip().splitlines()[-1])

    assert request("frobnicate") == {"seq": request_seq(served), "state": "error",
                                     "error": "unknown request 'frobnicate' (known: prepare, "
                                              "resume, incoming)"}
    ack = request(f"incoming {served.domid} {GUEST}")
    assert ack["error"] == "incoming is not allowed while serving", ack
    c = vncdotool_connect("127.0.0.1", served.rfb_port, timeout=90)
    last_screen(served, lambda s: s.lines[s.cursor[0]].rstrip() == "guest#")
    ack = request("prepare")
    assert ack["state"] == "prepared" and ack["domid"] == served.rmvm_domid, ack
    c.type("echo RBK$((3*4))Z >/dev/hvc0")
    c.key("enter")
    time.sleep(5)
    assert "RBK12Z" not in served.console_log()  # held while prepared
    ack = request("resume")
    assert ack["state"] == "resumed" and ack["noop"] is False, ack
    assert ack["reconnected"] == 2 and ack["connected"] is True, ack
    assert ack["replayed"] > 20, ack  # the command's key events, press + release
    wait_for(lambda: "RBK12Z" in served.console_log(), 120, "the replayed command's output")
    log = served.rmvm_log()
    assert "vkbd-" in log and "re-mapped + re-bound port" in log


def request_seq(served: RmvmGuest) -> str:
    """The seq of the last request dom0 wrote (the ack must carry it)."""
    return served.xs_read(f"/local/domain/{served.rmvm_domid}/data/dmore-migrate").split()[0]
