"""``dmore-rm-agent`` with ``[agent] xenstore_control`` on a sim host: dom0's requests through
xenstore, as :mod:`dmore_nova.virt.xl_rmvm` writes them, and the agent's acks.

The agent is the product's command in its own process, as dom0 on the sim (the relative keys
resolve to ``/local/domain/0/data/``; in an RM VM to the RM VM's directory).  The guest's
frontends are driven by hand, so the test sees exactly what reaches the ring and when: refused
requests change nothing; ``prepare`` holds input and releases the devices, ``resume`` maps the
same pages again and replays; ``incoming`` plugs the incoming domain's vfb, waits for xl's
rename, re-homes and replays -- the RM VM's side of a co-migration, without the RM VM's own
``xl migrate`` (the xenbox tier does that: tests/xen/test_rmvm.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from dmore_nova.rm_vm.control import ACK_KEY, REQUEST_KEY
from dmore_nova.xen.io import kbdif as K
from tests.integration.rawclient import RawClient
from tests.integration.test_agent_real_xen_fixes import keys_of, plug_vinput, typed
from tests.integration.test_xl_follower_sim import Agent, connect, type_keys, wait

REPO = Path(__file__).resolve().parents[2]
REQ = f"/local/domain/0/{REQUEST_KEY}"
ACK = f"/local/domain/0/{ACK_KEY}"


def start_agent(host, guest: int, tmp: Path) -> Agent:
    """The agent with its xenstore control channel on (instead of following xl itself)."""
    return Agent(host, guest, tmp, option="xenstore_control",
                 banner="co-migration requests from dom0 in xenstore")


@pytest.fixture
def host(sim_sup):
    return sim_sup.start_host("c")


def request(xs, text: str, want: tuple[str, ...], agent: Agent) -> dict:
    """Write ``text`` as dom0 does; the ack with its seq in one of ``want`` (or error)."""
    seq = text.split(" ", 1)[0]
    xs.write(REQ, text)

    def acked():
        raw = xs.read(ACK)
        ack = json.loads(raw) if raw else {}
        return ack if ack.get("seq") == seq and ack.get("state") in (*want, "error") else None
    return wait(acked, f"the ack to {text!r}\n{agent.log()[-2000:]}", 30)


def take(kbd, n: int) -> list:
    got: list = []
    wait(lambda: got.extend(keys_of(kbd.take())) or len(got) >= n, f"{n} key events")
    time.sleep(0.2)
    return got + keys_of(kbd.take())


def test_requests_refused_prepare_resume_and_incoming(host, tmp_path):
    xen0 = host.xen(0)
    xs = xen0.xenstore
    kernels = []
    agent = c = None
    try:
        with host.toolstack() as ts:
            old = ts.create_domain("guest", 2048)
        kbd_be = plug_vinput(xs, old)
        xs.write(REQ, "1 prepare")  # left from an earlier agent: not acted on
        agent = start_agent(host, old, tmp_path)
        kernels.append(host.kernel(old))
        kbd, fb = connect(xs, kernels[-1], old, kbd_be)
        c = RawClient("127.0.0.1", agent.port)
        c.full_frame()
        type_keys(c, "a")
        assert take(kbd, 2) == typed("a")
        assert xs.read(ACK) is None and not agent.status()["frozen"]

        # refused: malformed, unknown, out of order -- an error ack each, nothing changes
        for text, error in (
                ("x1 prepare", "does not start with a decimal sequence number"),
                ("2 frobnicate", "unknown request 'frobnicate'"),
                ("3 incoming 0 guest", "domid '0' is not 1..32751"),
                ("4 incoming 99 guest", "incoming is not allowed while serving"),
                ("5 prepare now", "prepare takes no arguments")):
            seq = text.split(" ")[0]
            xs.write(REQ, text)

            def errored(seq=seq):
                raw = xs.read(ACK)
                ack = json.loads(raw) if raw else {}
                return ack if ack.get("state") == "error" and (
                    ack.get("seq") == seq or (ack.get("seq") is None and seq == "x1")) else None
            ack = wait(errored, f"the error ack to {text!r}", 30)
            assert error in ack["error"], ack
            # (the status file is rewritten every second)
            wait(lambda: (st := agent.status()) and not st["frozen"] and st["held"] == 0
                 and st["devices_connected"] and st["guest_domid"] == old, "unchanged")
        type_keys(c, "b")
        assert take(kbd, 2) == typed("b")

        # resume while serving: nothing to undo
        ack = request(xs, "6 resume", ("resumed",), agent)
        assert ack["state"] == "resumed" and ack["noop"] is True

        # prepare: held, released; the backend states stay
        ack = request(xs, "7 prepare", ("prepared",), agent)
        assert ack["state"] == "prepared" and ack["domid"] == 0 and ack["already"] is False
        wait(lambda: (s := agent.status()) and s["frozen"] and not s["devices_connected"],
             "frozen, devices released")
        type_keys(c, "cd")
        wait(lambda: agent.status().get("held") == 4, "'cd' held")
        assert K.XenkbdPage(kbd.page).in_prod == K.XenkbdPage(kbd.page).in_cons
        assert xs.read(f"{kbd_be}/state") == b"4"
        # prepare again: idempotent
        ack = request(xs, "8 prepare", ("prepared",), agent)
        assert ack["state"] == "prepared" and ack["already"] is True

        # resume: the same pages and ports again, the held keys delivered
        ack = request(xs, "9 resume", ("resumed",), agent)
        assert ack["state"] == "resumed" and ack["noop"] is False, ack
        assert (ack["reconnected"], ack["connected"], ack["replayed"]) == (2, True, 4), ack
        assert take(kbd, 4) == typed("cd")
        wait(lambda: (s := agent.status()) and s["devices_connected"] and not s["frozen"],
             "connected, thawed")

        # incoming: prepare, then the incoming domain; the agent plugs its vfb, waits for the
        # rename, re-homes, and the new frontends connect
        ack = request(xs, "10 prepare", ("prepared",), agent)
        assert ack["state"] == "prepared"
        type_keys(c, "e")
        wait(lambda: agent.status().get("held") == 2, "'e' held")
        with host.toolstack() as ts:
            new = ts.create_domain("guest--incoming", 2048, paused=True)
        new_kbd_be = plug_vinput(xs, new)
        ack = request(xs, f"11 incoming {new} guest", ("plugged",), agent)
        assert ack["state"] == "plugged" and ack["new"] == new and ack["vfb"] is True, ack
        assert xs.read(f"/local/domain/0/backend/vfb/{new}/0/frontend") == \
            f"/local/domain/{new}/device/vfb/0".encode()
        time.sleep(1.5)
        assert agent.status()["guest_domid"] == old  # not before xl's rename
        # the rest of the guest's migration: the old domain goes, the new one is renamed
        with host.toolstack() as ts:
            ts.destroy_domain(old)
        xs.write(f"/local/domain/{new}/name", "guest")
        with host.toolstack() as ts:
            ts.unpause_domain(new)
        wait(lambda: agent.status().get("guest_domid") == new, "the re-home")
        kernels.append(host.kernel(new))
        kbd2, _fb2 = connect(xs, kernels[-1], new, new_kbd_be)
        ack = request(xs, f"11 incoming {new} guest", ("done", "devices-not-connected"), agent)
        assert ack["state"] == "done", ack
        assert (ack["old"], ack["new"], ack["backend"], ack["replayed"]) == (old, new, 0, 2)
        assert ack["held_dropped"] == 0 and ack["vkbd_dropped"] == 0 and ack["viewers"] == 1
        assert take(kbd2, 2) == typed("e")
        type_keys(c, "f")
        assert take(kbd2, 2) == typed("f")
        # and a second incoming without prepare is refused
        ack = request(xs, f"12 incoming {new} guest", ("done",), agent)
        assert ack["error"] == "incoming is not allowed while serving"
    finally:
        if c is not None:
            c.close()
        if agent is not None:
            assert agent.stop() == 0, agent.log()[-3000:]
        for k in kernels:
            k.close()
        xen0.close()


def test_a_request_while_incoming_waits_is_refused(host, tmp_path):
    """One request at a time: while ``incoming`` waits for xl's rename, a ``resume`` gets an
    error ack naming the request in progress, and the agent still stops cleanly."""
    xen0 = host.xen(0)
    xs = xen0.xenstore
    kernels = []
    agent = None
    try:
        with host.toolstack() as ts:
            old = ts.create_domain("guest", 2048)
        kbd_be = plug_vinput(xs, old)
        agent = start_agent(host, old, tmp_path)
        kernels.append(host.kernel(old))
        connect(xs, kernels[-1], old, kbd_be)
        request(xs, "1 prepare", ("prepared",), agent)
        with host.toolstack() as ts:
            new = ts.create_domain("guest--incoming", 2048, paused=True)
        ack = request(xs, f"2 incoming {new} guest", ("plugged",), agent)
        assert ack["state"] == "plugged"
        ack = request(xs, "3 resume", ("resumed",), agent)
        assert ack["error"] == "busy with request 2 (incoming)"
        time.sleep(1.5)
        assert agent.status()["guest_domid"] == old and agent.status()["frozen"]
    finally:
        if agent is not None:
            assert agent.stop() == 0, agent.log()[-3000:]
        for k in kernels:
            k.close()
        xen0.close()
