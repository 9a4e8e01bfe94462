"""``dmore-rm-agent`` with ``[agent] follow_xl_migrate`` on a sim host, through an emulated
``xl migrate`` (localhost).

The sim's own migration (:mod:`dmore_nova.xen.sim.migration`) moves a guest between two hosts
and is driven by co-migration; ``xl migrate`` on one host is what the follower follows, so this
test plays xl's part on one sim host and writes what xl (Xen 4.17) writes, in its order
(``shared/notes/xenbox.md``, :mod:`dmore_nova.rm_vm.xl_follower`): the incoming domain
``guest--incoming`` (paused), ``control/shutdown`` = ``suspend`` and the guest's ``""``, the
devices of the new domain (the linux-type vkb under ``backend/vinput``), the rename to
``guest`` and unpause, the old backend's teardown (online=0, Closing: libxl waits for Closed),
the old domain's release.  The guest's frontends are driven by hand (the resumed Linux
frontend's steps: a new page, grant and port), so the test decides exactly what the old
frontend had consumed when it "suspended".

The agent is the product's command in its own process; the test sees it as xl would
(xenstore) and as a viewer would (RFB), plus its status file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dmore_nova.xen.io import kbdif as K
from dmore_nova.xen.io import keymap
from dmore_nova.xen.io.xenbus import XenbusState
from tests.integration.manual_frontend import ManualFb, ManualKbd
from tests.integration.rawclient import RawClient
from tests.integration.test_agent_real_xen_fixes import keys_of, plug_vinput, typed

REPO = Path(__file__).resolve().parents[2]
KC = keymap.LINUX_KEYCODES


def wait(pred, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (v := pred()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return v


class Agent:
    """``python -m dmore_nova.cmd.rm_agent`` serving ``guest`` on the sim host, with the
    ``[agent]`` option ``option`` switched on; its start banner must contain ``banner``."""

    def __init__(self, host, guest: int | None, tmp: Path, option: str = "follow_xl_migrate",
                 banner: str = "following xl migrate of 'guest'", *, backend: int = 0,
                 plug_vfb: bool = True, extra: str = "") -> None:
        """``guest=None``: no ``guest_domid`` (the agent reads its domain's ``target``);
        ``backend``: the domain the agent runs as (an RM VM's domid); ``extra``: more
        ``[agent]`` lines."""
        self.status_path = tmp / "status.json"
        self.log_path = tmp / "agent.log"
        conf = tmp / "agent.conf"
        conf.write_text(f"[agent]\nxen = sim\nsim_run_dir = {host.run_dir}\n"
                        f"backend_domid = {backend}\n"
                        + (f"guest_domid = {guest}\n" if guest is not None else "")
                        + f"plug_vfb = {str(plug_vfb).lower()}\n{option} = true\n"
                        f"status_file = {self.status_path}\n{extra}[rfb]\nport = 0\n")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dmore_nova.cmd.rm_agent", "--config-file", str(conf),
             "--log-file", str(self.log_path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        line, said = "", []
        while "console on" not in line:
            line = self.proc.stdout.readline()
            said.append(line)
            if not line:
                raise RuntimeError(f"agent exited: {''.join(said)[-2000:]}\n{self.log()[-3000:]}")
        self.port = int(line.split("console on ")[1].split(",")[0].rsplit(":", 1)[1])
        assert banner in line, line

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def status(self) -> dict:
        try:
            return json.loads(self.status_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def steps(self) -> list[str]:
        return [e["what"] for e in self.status().get("events", [])]

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(10)
        finally:
            self.proc.stdout.close()


@pytest.fixture
def host(sim_sup):
    return sim_sup.start_host("x")


def be_state(xs, path: str) -> int:
    raw = xs.read(f"{path}/state")
    return int(raw) if raw else 0


def connect(xs, kernel, guest: int, kbd_be: str, be: int = 0) -> tuple[ManualKbd, ManualFb]:
    """What (resumed) Linux frontends do: publish page/grant/port, Initialised, Connected."""
    vfb_be = f"/local/domain/{be}/backend/vfb/{guest}/0"
    wait(lambda: be_state(xs, kbd_be) == XenbusState.InitWait, f"{kbd_be} InitWait")
    wait(lambda: be_state(xs, vfb_be) == XenbusState.InitWait, f"{vfb_be} InitWait")
    kbd, fb = ManualKbd(kernel, be), ManualFb(kernel, be)
    kbd.publish()
    fb.publish()
    wait(lambda: be_state(xs, kbd_be) == XenbusState.Connected, f"{kbd_be} Connected")
    wait(lambda: be_state(xs, vfb_be) == XenbusState.Connected, f"{vfb_be} Connected")
    kbd.publish(XenbusState.Connected)
    fb.publish(XenbusState.Connected)
    return kbd, fb


def type_keys(c: RawClient, text: str) -> None:
    for ch in text:
        c.key(ord(ch), True)
        c.key(ord(ch), False)


def test_follows_an_emulated_xl_migrate_nothing_lost_nothing_doubled(host, tmp_path):
    xen0 = host.xen(0)
    xs = xen0.xenstore
    kernels = []
    agent = c = None
    try:
        with host.toolstack() as ts:
            old = ts.create_domain("guest", 2048)
        old_kbd_be = plug_vinput(xs, old)  # vkb=['backend-type=linux']
        agent = Agent(host, old, tmp_path)
        kernels.append(host.kernel(old))
        kbd, _fb = connect(xs, kernels[-1], old, old_kbd_be)
        c = RawClient("127.0.0.1", agent.port)
        c.full_frame()
        type_keys(c, "ab")
        wait(lambda: K.XenkbdPage(kbd.page).in_prod == 4, "'ab' in the ring")
        got = keys_of(K.kbd_in_get(kbd.page))
        assert got == typed("ab")

        # xl migrate-receive: the incoming domain, paused
        with host.toolstack() as ts:
            new = ts.create_domain("guest--incoming", 2048, paused=True)
        wait(lambda: "incoming-domain" in agent.steps(), "the follower to see the incoming "
             f"domain\n{agent.log()[-2000:]}")
        # its vfb plugged before it resumes (a resumed xen-fbfront only re-reads its node)
        assert xs.read(f"/local/domain/0/backend/vfb/{new}/0/frontend") == \
            f"/local/domain/{new}/device/vfb/0".encode()

        # pre-copy: the guest still runs and types go through; 'cd' reach the ring, the
        # guest consumes 'c' (2 events) and suspends before it consumes 'd'
        type_keys(c, "cd")
        wait(lambda: K.XenkbdPage(kbd.page).in_prod == 8, "'cd' in the ring")
        assert keys_of(K.kbd_in_get(kbd.page, 2)) == typed("c")
        # libxl__domain_suspend: "suspend", the guest answers ""
        xs.write(f"/local/domain/{old}/control/shutdown", "suspend")
        kernels[-1].xenstore.write(f"/local/domain/{old}/control/shutdown", "")
        wait(lambda: agent.status().get("frozen"), "input frozen")
        type_keys(c, "ef")  # held
        wait(lambda: agent.status().get("held") == 4, "'ef' held")
        assert K.XenkbdPage(kbd.page).in_prod == 8  # nothing more into the old ring

        # the restored domain gets its devices (libxl), is renamed and unpaused
        new_kbd_be = plug_vinput(xs, new)
        xs.write(f"/local/domain/{new}/name", "guest")
        with host.toolstack() as ts:
            ts.unpause_domain(new)
        wait(lambda: agent.status().get("guest_domid") == new, "the agent to re-home")
        # the old guest's vfb nodes went with the re-home
        assert xs.directory(f"/local/domain/0/backend/vfb/{old}") == []
        # the resumed frontends connect with new pages and ports
        kernels.append(host.kernel(new))
        kbd2, _fb2 = connect(xs, kernels[-1], new, new_kbd_be)
        wait(lambda: "thawed" in agent.steps(), "thaw")
        # the rest: 'd' (re-sent from the old ring), then 'ef' (held); nothing doubled
        want = typed("d") + typed("ef")
        got = []
        wait(lambda: got.extend(keys_of(kbd2.take())) or len(got) >= len(want), "the keys")
        time.sleep(0.2)
        got += keys_of(kbd2.take())
        assert got == want

        # xl (source side): libxl tears down the old vinput backend and waits for Closed
        xs.write(f"{old_kbd_be}/online", "0")
        xs.write(f"{old_kbd_be}/state", str(int(XenbusState.Closing)))
        wait(lambda: be_state(xs, old_kbd_be) == XenbusState.Closed, "the old backend's Closed")
        xs.rm(f"/local/domain/0/backend/vinput/{old}")
        with host.toolstack() as ts:
            ts.destroy_domain(old)

        # typing goes on into the new ring
        type_keys(c, "g")
        wait(lambda: K.XenkbdPage(kbd2.page).in_prod - K.XenkbdPage(kbd2.page).in_cons == 2,
             "'g' in the new ring")
        assert keys_of(kbd2.take()) == typed("g")
        st = agent.status()
        assert st["migrations"] == 1 and st["rehomes"] == 1 and st["devices_connected"]
        assert st["vkbd_requeued"] == 2 and st["held_dropped"] == 0
        assert st["vkbd_dropped"] == 0 and st["viewers"] == 1
        steps = agent.steps()
        assert steps[:2] == ["incoming-domain", "suspend-requested"], steps
        assert steps.index("guest-started") < steps.index("devices-connected") \
            < steps.index("thawed") < steps.index("old-backend-closed"), steps
        thawed = next(e for e in st["events"] if e["what"] == "thawed")
        assert thawed["replayed"] == 4 and thawed["viewers"] == 1
    finally:
        if c is not None:
            c.close()
        if agent is not None:
            assert agent.stop() == 0, agent.log()[-3000:]
        for k in kernels:
            k.close()
        xen0.close()
