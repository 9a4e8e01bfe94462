"""RM agent behaviour found on real Xen (the xenbox), pinned on a sim host.

Focused tests of one behaviour each; they are here, not in tests/unit, because they start a
sim host (tests/unit needs no sockets or services).

Each of these was first seen with Xen 4.17 + Linux frontends (``tests/xen``,
``shared/notes/xenbox.md``); here each gets a focused test that fails without its fix:

* libxl's ``vkb=['backend-type=linux']`` puts the backend under ``backend/vinput/`` (its
  frontend is still ``device/vkbd/``): the agent must serve that dir;
* ``plug_vfb``: no toolstack gives such a guest a vfb, the agent plugs it itself, with the
  permissions libxl would give, and removes it when it stops;
* libxl tearing a backend down (``online=0``, state Closing) waits for Closed: the backend
  must answer, or libxl times out with "unable to remove device";
* a re-home with ``plug_vfb`` drops the old guest's vfb nodes and makes sure the new guest
  has one (plugged by the follower before the resume, or by the agent);
* a frontend that had not consumed its ring when the guest suspended zeroes the page when it
  resumes (``xenkbd_resume``): the re-home re-sends ``in_cons..in_prod``, nothing lost, nothing
  doubled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from dmore_nova.rm_vm.agent import RMAgent
from dmore_nova.rm_vm.backends import vfb as vfb_mod
from dmore_nova.rm_vm.rfb.display import KeyInput
from dmore_nova.xen.io import kbdif as K
from dmore_nova.xen.io import keymap
from dmore_nova.xen.io.xenbus import XenbusState
from tests.integration.manual_frontend import ManualFb, ManualKbd, plug
from tests.integration.rfb_harness import LoopThread
from tests.integration.simhosts import sim_supervisor

KC = keymap.LINUX_KEYCODES


def wait(pred: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


def plug_vinput(xs0, fe: int, be: int = 0, devid: int = 0) -> str:
    """What libxl writes for ``vkb=['backend-type=linux']`` (seen on Xen 4.17): backend dir
    ``backend/vinput``, frontend dir ``device/vkbd``, the same permissions as any device."""
    return plug(xs0, fe, be, "vkbd", devid, backend_kind="vinput")


class Bed:
    """One sim host, dom0's ``Xen`` and the agent's loop; guests made on demand."""

    def __init__(self, host) -> None:
        self.host = host
        self.xen0 = host.xen(0)
        self.xs = self.xen0.xenstore
        self.lt = LoopThread()
        self.agent: RMAgent | None = None
        self.kernels: list = []

    def guest(self, name: str) -> int:
        with self.host.toolstack() as ts:
            return ts.create_domain(name, 2048)

    def kernel(self, domid: int):
        k = self.host.kernel(domid)
        self.kernels.append(k)
        return k

    def start(self, guest: int, **kw) -> RMAgent:
        self.agent = RMAgent(self.xen0, guest, **kw)
        self.lt.run(self.agent.start("127.0.0.1", 0))
        return self.agent

    def state(self, path: str) -> int:
        raw = self.xs.read(f"{path}/state")
        return int(raw) if raw else 0

    def call(self, fn: Callable[[], object]) -> object:
        return self.lt.call(fn)

    def type(self, text: str) -> None:
        assert self.agent is not None
        def tap(ch: str) -> None:  # what one read of a viewer's press and release does
            self.agent.key(KeyInput(True, ord(ch)))
            self.agent.key(KeyInput(False, ord(ch)))
            self.agent.flush_input()

        for ch in text:
            self.call(lambda c=ch: tap(c))

    def close(self) -> None:
        if self.agent is not None:
            self.lt.run(self.agent.stop())
        self.lt.stop()
        for k in self.kernels:
            k.close()
        self.xen0.close()


@pytest.fixture
def bed() -> Iterator[Bed]:
    with sim_supervisor("dfix") as sup:
        b = Bed(sup.start_host("h"))
        try:
            yield b
        finally:
            b.close()


def connect_kbd(bed: Bed, guest: int, be_path: str) -> ManualKbd:
    wait(lambda: bed.state(be_path) == XenbusState.InitWait, f"{be_path} InitWait")
    kbd = ManualKbd(bed.kernel(guest), 0)
    kbd.publish()
    wait(lambda: bed.state(be_path) == XenbusState.Connected, f"{be_path} Connected")
    kbd.publish(XenbusState.Connected)
    return kbd


def keys_of(events) -> list[tuple[int, bool]]:
    return [(e.keycode, e.pressed) for e in events if isinstance(e, K.XenkbdKey)]


def typed(text: str) -> list[tuple[int, bool]]:
    return [(KC[f"KEY_{ch.upper()}"], down) for ch in text for down in (True, False)]


def take_keys(kbd: ManualKbd, n: int, timeout: float = 5.0) -> list[tuple[int, bool]]:
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += kbd.take()
        time.sleep(0.005)
    time.sleep(0.05)
    got += kbd.take()  # anything beyond n would be a duplicate
    return keys_of(got)


# -- backend/vinput --------------------------------------------------------------------------

def test_linux_type_vkb_is_served_in_backend_vinput(bed: Bed):
    g = bed.guest("guest")
    bp = plug_vinput(bed.xs, g)
    agent = bed.start(g)
    assert agent.vkbd.be_path == bp
    # the agent's features and InitWait went into libxl's dir, none into backend/vkbd
    kbd = connect_kbd(bed, g, bp)
    assert bed.xs.read(f"{bp}/feature-abs-pointer") == b"1"
    assert bed.xs.read(f"{bp}/hotplug-status") == b"connected"
    assert bed.xs.directory(f"/local/domain/0/backend/vkbd/{g}") == []
    bed.type("q")
    assert take_keys(kbd, 2) == typed("q")


# -- plug_vfb --------------------------------------------------------------------------------

def test_plug_vfb_creates_the_device_as_a_toolstack_would_and_removes_it(bed: Bed):
    g = bed.guest("guest")
    fe = f"/local/domain/{g}/device/vfb/0"
    be = f"/local/domain/0/backend/vfb/{g}/0"
    agent = bed.start(g, plug_vfb=True)
    assert bed.xs.read(f"{be}/frontend") == fe.encode()
    assert bed.xs.read(f"{fe}/backend") == be.encode()
    assert bed.xs.read(f"{fe}/backend-id") == b"0"
    assert bed.xs.read(f"{be}/frontend-id") == str(g).encode()
    assert bed.xs.read(f"{be}/online") == b"1"
    # the guest owns its frontend dir, the backend reads it; the reverse for the backend dir
    assert bed.xs.get_perms(fe) == [f"n{g}", "r0"]
    assert bed.xs.get_perms(be) == ["n0", f"r{g}"]
    wait(lambda: bed.state(be) == XenbusState.InitWait, "vfb InitWait")
    fb = ManualFb(bed.kernel(g), 0)
    fb.publish()
    wait(lambda: bed.state(be) == XenbusState.Connected, "vfb Connected")
    assert bed.call(lambda: agent.vfb.fb_mapping is not None)
    bed.lt.run(agent.stop())
    bed.agent = None
    assert bed.xs.read(f"{be}/frontend") is None and bed.xs.read(f"{fe}/backend") is None
    assert bed.xs.directory(f"/local/domain/0/backend/vfb/{g}") == []


# -- online=0: libxl removes the device ------------------------------------------------------

@pytest.mark.parametrize("connected", [True, False], ids=["connected", "initwait"])
def test_toolstack_teardown_online_0_is_answered_with_closed(bed: Bed, connected: bool):
    g = bed.guest("guest")
    bp = plug_vinput(bed.xs, g)
    agent = bed.start(g)
    if connected:
        connect_kbd(bed, g, bp)
        assert bed.call(lambda: agent.vkbd.page is not None)
    else:
        wait(lambda: bed.state(bp) == XenbusState.InitWait, "InitWait")
    # libxl__initiate_device_generic_remove: online=0, state=Closing, then waits for Closed
    bed.xs.write(f"{bp}/online", "0")
    bed.xs.write(f"{bp}/state", str(int(XenbusState.Closing)))
    wait(lambda: bed.state(bp) == XenbusState.Closed, "the backend's Closed")
    assert bed.call(lambda: (agent.vkbd.page, agent.vkbd.port)) == (None, None)


# -- re-home with plug_vfb --------------------------------------------------------------------

@pytest.mark.parametrize("plugged_by_follower", [True, False])
def test_rehome_replugs_the_vfb_for_the_new_domain(bed: Bed, plugged_by_follower: bool):
    old = bed.guest("guest")
    plug(bed.xs, old, 0, "vkbd")
    agent = bed.start(old, plug_vfb=True)
    old_be = f"/local/domain/0/backend/vfb/{old}/0"
    wait(lambda: bed.state(old_be) == XenbusState.InitWait, "old vfb InitWait")
    new = bed.guest("guest--incoming")
    plug(bed.xs, new, 0, "vkbd")
    if plugged_by_follower:  # what the xl follower does when the incoming domain appears
        vfb_mod.plug(bed.xs, 0, new, 0)
    bed.call(agent.freeze)
    bed.call(lambda: agent.rehome(bed.xen0, new))
    new_be, new_fe = f"/local/domain/0/backend/vfb/{new}/0", f"/local/domain/{new}/device/vfb/0"
    # the old guest's vfb nodes are gone (no toolstack knows them), the new guest has one
    assert bed.xs.directory(f"/local/domain/0/backend/vfb/{old}") == []
    assert bed.xs.read(f"/local/domain/{old}/device/vfb/0/backend") is None
    assert bed.xs.read(f"{new_be}/frontend") == new_fe.encode()
    assert bed.xs.get_perms(new_fe) == [f"n{new}", "r0"]
    wait(lambda: bed.state(new_be) == XenbusState.InitWait, "new vfb InitWait")
    kbd = connect_kbd(bed, new, f"/local/domain/0/backend/vkbd/{new}/0")
    fb = ManualFb(bed.kernel(new), 0)
    fb.publish()
    wait(lambda: bed.call(agent.devices_connected), "both devices connected for the new domid")
    assert kbd.take() == []
    # and the agent's stop removes the vfb it plugged for the new domain
    bed.lt.run(agent.stop())
    bed.agent = None
    assert bed.xs.directory(f"/local/domain/0/backend/vfb/{new}") == []


# -- the ring a suspended frontend had not consumed ------------------------------------------

@pytest.mark.parametrize("consumed_before_suspend", [0, 2, 4])
def test_unconsumed_ring_events_are_resent_after_rehome(bed: Bed, consumed_before_suspend: int):
    """Keys 'cd' are in the old ring when the guest suspends; the frontend had consumed the
    first ``consumed_before_suspend`` of their 4 events.  Keys 'ef' are typed while frozen.
    The new frontend must get exactly the rest of 'cd', then 'ef': nothing lost, nothing
    doubled, in order."""
    old = bed.guest("guest")
    plug(bed.xs, old, 0, "vkbd")
    agent = bed.start(old)
    kbd = connect_kbd(bed, old, f"/local/domain/0/backend/vkbd/{old}/0")
    bed.type("ab")
    assert take_keys(kbd, 4) == typed("ab")
    # the frontend stops consuming right before the suspend (its events are in the ring)
    bed.type("cd")
    wait(lambda: K.XenkbdPage(kbd.page).in_prod == 8, "'cd' in the ring")
    consumed = keys_of(K.kbd_in_get(kbd.page, consumed_before_suspend))
    assert consumed == typed("cd")[:consumed_before_suspend]
    bed.call(agent.freeze)  # the suspend request
    bed.type("ef")
    assert bed.call(lambda: len(agent.held)) == 4
    # xl: the guest is suspended (its old ring is final), the new domain started
    new = bed.guest("guest--incoming")
    plug(bed.xs, new, 0, "vkbd")
    bed.call(lambda: agent.rehome(bed.xen0, new))
    assert agent.requeued_input == 4 - consumed_before_suspend
    # the old page was only read, never written (nothing changes behind a suspended guest)
    assert K.XenkbdPage(kbd.page).in_cons == 4 + consumed_before_suspend
    kbd2 = connect_kbd(bed, new, f"/local/domain/0/backend/vkbd/{new}/0")
    replayed = bed.call(agent.thaw)
    assert replayed == 4
    want = typed("cd")[consumed_before_suspend:] + typed("ef")
    assert take_keys(kbd2, len(want)) == want
    assert K.XenkbdPage(kbd.page).in_prod == 8  # nothing more went to the old ring
    assert (agent.vkbd.dropped, agent.held_dropped) == (0, 0)
