"""An RM VM's agent that names no guest: it serves the domain it was given privilege over, read
from its own xenstore ``target`` node (``[agent] guest_domid`` unset).

Why: the RM VM boots before its guest exists (the guest's ``vkb=[backend=...]`` names it), so
one RM VM image for every guest cannot carry the guest's domid; the toolstack writes ``target``
when it grants the privilege (libxl for a stub domain, :func:`dmore_nova.virt.xl_rmvm.grant_target`
for an RM VM), which is the moment the agent can serve the guest anyway.  The agent here is the
product's command as the RM VM's domain on a sim host; the xenbox tier runs the same
configuration in a real RM VM (``tests/xen/rmvm.py``).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from dmore_nova.cmd.rm_agent import guest_from_target, parse_target
from dmore_nova.virt.xl_rmvm import grant_target
from tests.integration.manual_frontend import plug
from tests.integration.rawclient import RawClient
from tests.integration.test_agent_real_xen_fixes import plug_vinput, typed
from tests.integration.test_xl_follower_sim import Agent, connect, type_keys, wait
from tests.integration.test_xs_control_sim import take


def log_of(tmp: Path) -> str:
    path = tmp / "agent.log"          # the Agent helper's --log-file
    return path.read_text() if path.exists() else ""


@pytest.fixture
def host(sim_sup):
    return sim_sup.start_host("t")


def test_an_agent_without_guest_domid_serves_the_guest_dom0_gives_it(host, tmp_path):
    xs = host.xen(0).xenstore
    kernel = agent = c = None
    with host.toolstack() as ts:
        rm = ts.create_domain("rm-guest", 4096)
    box: dict[str, int] = {}

    def dom0_creates_the_guest() -> None:  # once the agent waits for its target
        wait(lambda: "waiting up to 30 s for this domain's target" in log_of(tmp_path),
             "the agent waiting for its target")
        with host.toolstack() as ts:
            guest = box["guest"] = ts.create_domain("guest", 2048)
            # the devices as a toolstack writes them, with the RM VM as their backend
            box["kbd_be"] = plug_vinput(xs, guest, be=rm)
            plug(xs, guest, rm, "vfb")
            result = grant_target(xs, rm, guest, set_target=ts.set_target)
        assert (result.xen, result.xenstore, result.vfb_dirs) == ("ok", "ok", "ok"), result

    dom0 = threading.Thread(target=dom0_creates_the_guest)
    dom0.start()
    try:
        agent = Agent(host, None, tmp_path, option="xenstore_control",
                      banner="co-migration requests from dom0 in xenstore", backend=rm,
                      plug_vfb=False, extra="target_wait = 30\n")
        dom0.join()
        guest = box["guest"]
        wait(lambda: agent.status().get("guest_domid") == guest, "the status file")
        assert f"serving dom{guest}, this domain's target" in agent.log()
        kernel = host.kernel(guest)
        kbd, _fb = connect(xs, kernel, guest, box["kbd_be"], be=rm)
        c = RawClient("127.0.0.1", agent.port)
        c.full_frame()
        type_keys(c, "ok")
        assert take(kbd, 4) == typed("ok")
    finally:
        if c is not None:
            c.close()
        if agent is not None:
            agent.stop()
        if kernel is not None:
            kernel.close()


class Store:
    """Reads of ``target`` answer from a list (None: absent)."""

    def __init__(self, *answers: bytes | None) -> None:
        self.answers = list(answers)
        self.reads: list[str] = []

    def read(self, path: str) -> bytes | None:
        self.reads.append(path)
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def test_the_target_is_waited_for_and_read_from_the_own_directory():
    xs = Store(None, None, b"7")
    assert asyncio.run(guest_from_target(xs, 5.0)) == 7
    assert xs.reads == ["target"] * 3   # relative: this domain's directory


@pytest.mark.parametrize("raw", [b"0", b"-3", b"32752", b"7x", b"", b"\xff", b"0x7", b" "])
def test_a_target_that_is_no_guest_is_refused_with_its_value(raw):
    with pytest.raises(ValueError, match="not a guest's domid"):
        parse_target(raw)
    with pytest.raises(ValueError, match=r"'target' is b"):
        asyncio.run(guest_from_target(Store(raw), 1.0))


def test_no_target_in_time_says_what_to_do():
    with pytest.raises(ValueError, match=r"no xenstore 'target' after 0 s: set guest_domid, "
                                         r"or give this domain privilege"):
        asyncio.run(guest_from_target(Store(None), 0.3))


def test_libxl_style_values_are_accepted():
    assert parse_target(b"12") == 12
    assert parse_target(b"12\0") == 12
    assert parse_target(b"32751") == 32751
