"""The RM agent on a sim host: xenbus handshake, input into the vkbd ring, the guest framebuffer to
viewers, resume (fresh connect), ring-full queueing, and hostile frontends."""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest

from dmore_nova.rm_vm.agent import RMAgent
from dmore_nova.xen.io import fbif as F
from dmore_nova.xen.io import kbdif as K
from dmore_nova.xen.io import keymap
from dmore_nova.xen.io.xenbus import XenbusState
from tests.integration.manual_frontend import ManualFb, ManualKbd, plug
from tests.integration.rawclient import RawClient
from tests.integration.rfb_harness import LoopThread

KC = keymap.LINUX_KEYCODES


@pytest.fixture
def host(sim_sup):
    return sim_sup.start_host("h")


class Rig:
    """A guest with both devices plugged, the agent as dom0 backend on its own loop."""

    def __init__(self, host) -> None:
        with host.toolstack() as ts:
            self.guest = ts.create_domain("guest", 2048)
        self.xen0 = host.xen(0)
        for kind in ("vkbd", "vfb"):
            plug(self.xen0.xenstore, self.guest, 0, kind)
        self.lt = LoopThread()
        self.agent = RMAgent(self.xen0, self.guest)
        self.port = self.lt.run(self.agent.start("127.0.0.1", 0))
        self.kernel = host.kernel(self.guest)

    def be_state(self, kind: str) -> int:
        raw = self.xen0.xenstore.read(f"/local/domain/0/backend/{kind}/{self.guest}/0/state")
        return int(raw) if raw else 0

    def wait(self, pred, timeout: float = 5.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise TimeoutError(what)
            time.sleep(0.01)

    def close(self) -> None:
        self.lt.run(self.agent.stop())
        self.lt.stop()
        self.kernel.close()
        self.xen0.close()


@pytest.fixture
def rig(host):
    r = Rig(host)
    yield r
    r.close()


def connect_both(rig: Rig) -> tuple[ManualKbd, ManualFb]:
    rig.wait(lambda: rig.be_state("vkbd") == XenbusState.InitWait, what="vkbd InitWait")
    xs = rig.kernel.xenstore
    assert xs.read(f"/local/domain/0/backend/vkbd/{rig.guest}/0/feature-abs-pointer") == b"1"
    kbd = ManualKbd(rig.kernel, 0)
    kbd.publish()
    fb = ManualFb(rig.kernel, 0)
    fb.publish()
    rig.wait(lambda: rig.be_state("vkbd") == XenbusState.Connected, what="vkbd Connected")
    rig.wait(lambda: rig.be_state("vfb") == XenbusState.Connected, what="vfb Connected")
    kbd.publish(XenbusState.Connected)
    fb.publish(XenbusState.Connected)
    return kbd, fb


def wait_kbd(kbd: ManualKbd, n: int, timeout: float = 5.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += kbd.take()
        time.sleep(0.005)
    return got


def test_handshake_keys_pointer_and_framebuffer(rig):
    kbd, fb = connect_both(rig)
    c = RawClient("127.0.0.1", rig.port)
    c.full_frame()
    assert (c.width, c.height) == (fb.width, fb.height)
    # Guest draws: the viewer sees exactly the guest's pixels.
    c.request()
    fb.draw(10, 20, 30, 5, 0x00FF8000)
    c.wait_for_update()
    assert (c.fb[20:25, 10:40] & 0xFFFFFF == 0xFF8000).all()
    assert (c.fb[0:20] == 0).all()
    # Keys: 'a' as keysym only, 'A' (needs Shift, synthesised), Enter.
    for ks in (ord("a"), ord("A"), 0xFF0D):
        c.key(ks, True)
        c.key(ks, False)
    evs = wait_kbd(kbd, 8)
    keys = [(e.keycode, e.pressed) for e in evs if isinstance(e, K.XenkbdKey)]
    assert keys == [(KC["KEY_A"], True), (KC["KEY_A"], False),
                    (keymap.KEY_LEFTSHIFT, True), (KC["KEY_A"], True),
                    (keymap.KEY_LEFTSHIFT, False), (KC["KEY_A"], False),
                    (KC["KEY_ENTER"], True), (KC["KEY_ENTER"], False)]
    # Pointer: viewer pixels (320x200 fb) scaled to the advertised 800x600 range; buttons.
    c.pointer(319, 199, 1)
    c.pointer(160, 100, 0)
    evs = wait_kbd(kbd, 4)
    pos = [(e.abs_x, e.abs_y) for e in evs if isinstance(e, K.XenkbdPosition)]
    btn = [(e.keycode, e.pressed) for e in evs if isinstance(e, K.XenkbdKey)]
    assert pos == [(799, 599), (160 * 799 // 319, 100 * 599 // 199)]
    assert btn == [(keymap.BTN_LEFT, True), (keymap.BTN_LEFT, False)]
    c.close()


def test_resize_reaches_viewers(rig):
    kbd, fb = connect_both(rig)
    c = RawClient("127.0.0.1", rig.port)
    c.full_frame()
    c.request()
    fb.send(F.XenfbResize(width=160, height=100, stride=320 * 4, depth=32, offset=0))
    rects = c.wait_for_update()
    assert any(r[4] in (-308, -223) for r in rects)
    assert (c.width, c.height) == (160, 100)
    c.close()


def test_ring_full_keys_wait_and_arrive_in_order(rig):
    kbd, fb = connect_both(rig)
    c = RawClient("127.0.0.1", rig.port)
    c.full_frame()
    letters = [ord(ch) for ch in "abcdefghijklmnopqrstuvwxyz"] * 40  # 1040 keys, 2080 events
    for ks in letters:
        c.key(ks, True)
        c.key(ks, False)
    # The guest reads slowly: a few events at a time, notifying after each batch.
    got: list = []
    deadline = time.monotonic() + 30
    while len(got) < 2 * len(letters) and time.monotonic() < deadline:
        got += [e for e in K.kbd_in_get(kbd.page, max_items=7)]
        rig.kernel.notify(kbd.port)
        time.sleep(0.001)
    codes = [e.keycode for e in got if isinstance(e, K.XenkbdKey) and e.pressed]
    expected = [keymap.keysym_to_linux(ks)[0] for ks in letters]
    assert codes == expected
    assert rig.agent.vkbd.dropped == 0
    c.close()


def test_frontend_restart_is_a_fresh_connect(rig):
    """What a resumed Linux kbdfront does: new page + grant + port, state Initialised again."""
    kbd, fb = connect_both(rig)
    kbd2 = ManualKbd(rig.kernel, 0)
    kbd2.publish(XenbusState.Initialising)
    kbd2.publish(XenbusState.Initialised)
    rig.wait(lambda: rig.agent.vkbd.connected_values[0] == str(kbd2.gref).encode()
             and rig.be_state("vkbd") == XenbusState.Connected, what="reconnect")
    c = RawClient("127.0.0.1", rig.port)
    c.full_frame()
    c.key(ord("q"))
    evs = wait_kbd(kbd2, 1)
    assert [(e.keycode, e.pressed) for e in evs] == [(KC["KEY_Q"], True)]
    assert K.XenkbdPage(kbd.page).in_prod == 0  # nothing went to the old page
    c.close()


@pytest.mark.parametrize("kind,override,reason", [
    ("vkbd", {"page-gref": "notanumber"}, "page-gref"),
    ("vkbd", {"page-gref": "99999"}, "hypervisor refused"),
    ("vkbd", {"event-channel": "4096000"}, "event-channel"),
    ("vfb", {"page-ref": "999999"}, "hypervisor refused"),
    ("vfb", {"protocol": "sparc-abi"}, "protocol"),
])
def test_hostile_xenstore_values_close_only_that_device(rig, kind, override, reason):
    rig.wait(lambda: rig.be_state("vkbd") == XenbusState.InitWait, what="InitWait")
    kbd = ManualKbd(rig.kernel, 0)
    fb = ManualFb(rig.kernel, 0)
    (kbd if kind == "vkbd" else fb).publish(**override)
    (fb if kind == "vkbd" else kbd).publish()
    other = "vfb" if kind == "vkbd" else "vkbd"
    rig.wait(lambda: rig.be_state(kind) == XenbusState.Closing, what=f"{kind} Closing")
    rig.wait(lambda: rig.be_state(other) == XenbusState.Connected, what=f"{other} Connected")
    err = rig.xen0.xenstore.read(f"/local/domain/0/backend/{kind}/{rig.guest}/0/error")
    assert err is not None and reason.encode() in err
    c = RawClient("127.0.0.1", rig.port)  # viewers are still served
    c.full_frame()
    c.close()


@pytest.mark.parametrize("field,value", [
    ("width", 100000), ("height", 0), ("line_length", 4), ("depth", 7),
    ("mem_length", 1 << 30),
])
def test_hostile_fb_geometry_closes_vfb(rig, field, value):
    rig.wait(lambda: rig.be_state("vfb") == XenbusState.InitWait, what="InitWait")
    fb = ManualFb(rig.kernel, 0)
    setattr(fb.page, field, value)
    fb.publish()
    rig.wait(lambda: rig.be_state("vfb") == XenbusState.Closing, what="vfb Closing")


def test_hostile_ring_indices_and_events(rig):
    kbd, fb = connect_both(rig)
    c = RawClient("127.0.0.1", rig.port)
    c.full_frame()
    # Hostile fb events: updates far outside, negative sizes, a huge resize; then out_prod
    # far ahead of out_cons.
    fb.send(F.XenfbUpdate(x=-5, y=-5, width=1 << 30, height=-1),
            F.XenfbUpdate(x=1 << 30, y=0, width=10, height=10))
    time.sleep(0.1)
    assert rig.be_state("vfb") == XenbusState.Connected
    fb.page.out_prod = fb.page.out_cons + 1000
    rig.kernel.notify(fb.port)
    rig.wait(lambda: rig.be_state("vfb") == XenbusState.Closing, what="vfb Closing")
    # The keyboard: in_cons far ahead (prod - cons > LEN): the vkbd closes, nothing written.
    K.XenkbdPage(kbd.page).in_cons = 0x80000000
    before = bytes(kbd.page)
    c.key(ord("x"))
    rig.wait(lambda: rig.be_state("vkbd") == XenbusState.Closing, what="vkbd Closing")
    assert bytes(kbd.page) == before
    c.full_frame()  # the server and this viewer go on
    c.close()


def test_state_flapping_is_bounded(rig):
    kbd, fb = connect_both(rig)
    xs = rig.kernel.xenstore
    for _ in range(200):
        xs.write(f"{kbd.path}/state", "1")
        xs.write(f"{kbd.path}/state", "3")
    rig.wait(lambda: rig.agent.vkbd.closed_reason is not None
             or rig.be_state("vkbd") == XenbusState.Connected, timeout=10, what="settled")
    if rig.agent.vkbd.closed_reason is not None:
        assert "flapped" in rig.agent.vkbd.closed_reason
    np.testing.assert_equal(rig.be_state("vfb"), XenbusState.Connected)


def test_frontend_waiting_in_initialised_is_not_a_restart(rig):
    """A frontend that has not yet seen our Connected stays Initialised: watch events in that
    state must not make the backend reconnect (found by the vkbd benchmark)."""
    rig.wait(lambda: rig.be_state("vkbd") == XenbusState.InitWait, what="InitWait")
    kbd = ManualKbd(rig.kernel, 0)
    kbd.publish()
    rig.wait(lambda: rig.be_state("vkbd") == XenbusState.Connected, what="Connected")
    values = rig.agent.vkbd.connected_values
    for i in range(100):
        rig.kernel.xenstore.write(f"{kbd.path}/unrelated", str(i))
    time.sleep(0.3)
    assert rig.agent.vkbd.closed_reason is None
    assert len(rig.agent.vkbd._reconnects) == 0 and rig.agent.vkbd.connected_values == values


def test_in_place_resume_seen_only_as_connected_is_a_fresh_connect(rig):
    """A resumed Linux kbdfront may go Initialised -> Connected before our watch fires: all we
    see is Connected with a new page-gref (same event-channel number). Still a reconnect."""
    kbd, fb = connect_both(rig)
    kbd2 = ManualKbd(rig.kernel, 0)
    xs = rig.kernel.xenstore

    def publish_all_at_once(t):
        for k, v in (("page-gref", kbd2.gref), ("page-ref", kbd2.frame),
                     ("event-channel", kbd2.port), ("state", int(XenbusState.Connected))):
            t.write(f"{kbd2.path}/{k}", str(v))

    xs.run_transaction(publish_all_at_once)  # one commit: the intermediate state never exists
    rig.wait(lambda: rig.agent.vkbd.connected_values[0] == str(kbd2.gref).encode()
             and rig.be_state("vkbd") == XenbusState.Connected, what="reconnect")
    c = RawClient("127.0.0.1", rig.port)
    c.full_frame()
    c.key(ord("w"))
    evs = wait_kbd(kbd2, 1)
    assert [(e.keycode, e.pressed) for e in evs] == [(KC["KEY_W"], True)]
    c.close()


class NotifySpy:
    """Counts the agent's notifies per port (wraps its event-channel handle's ``notify``)."""

    def __init__(self, agent: RMAgent) -> None:
        self.evtchns = agent.evtchns
        self._notify = self.evtchns.notify
        self.counts: dict[int, int] = {}
        self.evtchns.notify = self  # type: ignore[method-assign]

    def __call__(self, port: int) -> None:
        self.counts[port] = self.counts.get(port, 0) + 1
        self._notify(port)


def test_one_notify_for_what_one_read_carried(rig, monkeypatch):
    """A key's press and release in one TCP segment are written to the ring together (one
    ring write: ~0.3 ms each in a PV dom0 under emulation) and cost the guest one notify (a
    hypercall here, an interrupt there), not two."""
    kbd, fb = connect_both(rig)
    c = RawClient("127.0.0.1", rig.port)
    c.full_frame()
    spy = NotifySpy(rig.agent)
    port = rig.agent.vkbd.port
    writes: list[int] = []
    put = K.kbd_in_put
    monkeypatch.setattr(K, "kbd_in_put", lambda page, evs: writes.append(len(evs)) or put(page,
                                                                                          evs))
    c.sock.sendall(struct.pack(">BBxxI", 4, 1, ord("k")) + struct.pack(">BBxxI", 4, 0, ord("k")))
    rig.wait(lambda: K.XenkbdPage(kbd.page).in_prod == 2, what="both events in the ring")
    c.request()  # a round trip through the agent's loop: it finished handling that read
    fb.draw(0, 0, 1, 1, 0x00FFFFFF)
    c.wait_for_update()
    assert spy.counts.get(port) == 1
    assert writes == [2]
    evs = wait_kbd(kbd, 2)
    assert [(e.keycode, e.pressed) for e in evs] == [(KC["KEY_K"], True), (KC["KEY_K"], False)]
    # Separate reads: one notify each, nothing owed and nothing doubled.
    c.key(ord("k"), True)
    rig.wait(lambda: spy.counts.get(port) == 2, what="notify for the press")
    c.key(ord("k"), False)
    rig.wait(lambda: spy.counts.get(port) == 3, what="notify for the release")
    assert [(e.keycode, e.pressed) for e in wait_kbd(kbd, 2)] == [(KC["KEY_K"], True),
                                                                (KC["KEY_K"], False)]
    c.close()


def test_vfb_notifies_only_a_frontend_that_found_the_out_ring_full(rig):
    """xen-fbfront waits for the backend's notify only when ``xenfb_queue_full`` made it keep
    its dirty rectangle; any other notify is a wasted hypercall and guest interrupt."""
    kbd, fb = connect_both(rig)
    c = RawClient("127.0.0.1", rig.port)
    c.full_frame()
    spy = NotifySpy(rig.agent)
    port = rig.agent.vfb.port
    c.request()
    fb.draw(0, 0, 8, 16, 0x00FFFFFF)                  # a glyph ...
    fb.draw(8, 0, 8, 16, 0x0000FF00)                  # ... and the cursor next to it
    for _ in range(2):  # one update, or two if the agent took the first UPDATE alone
        c.wait_for_update()
        if (c.fb[0:16, 8:16] & 0xFFFFFF == 0x00FF00).all():
            break
        c.request()
    assert (c.fb[0:16, 0:8] & 0xFFFFFF == 0xFFFFFF).all()
    assert (c.fb[0:16, 8:16] & 0xFFFFFF == 0x00FF00).all()
    rig.wait(lambda: fb.page.out_cons == 2, what="consumed")
    assert spy.counts.get(port, 0) == 0
    # A full ring (51 UPDATEs, one notify from the frontend): consumed, and one notify back.
    page = fb.page
    assert F.fb_out_put(page, [F.XenfbUpdate(x=i, y=20, width=1, height=1)
                               for i in range(F.XENFB_OUT_RING_LEN)]) == F.XENFB_OUT_RING_LEN
    rig.kernel.notify(fb.port)
    rig.wait(lambda: spy.counts.get(port, 0) == 1, what="notify after a full ring")
    assert F.fb_pending(page)[1] == 0
    c.close()


def test_vfb_notifies_a_frontend_that_filled_the_ring_while_it_was_read(rig, monkeypatch):
    """The frontend tests ``out_prod - out_cons`` against the out_cons it sees: if it filled
    the ring between our read of out_prod and our write of out_cons, it kept its dirty
    rectangle and waits for us although we took fewer than 51 events."""
    kbd, fb = connect_both(rig)
    spy = NotifySpy(rig.agent)
    port = rig.agent.vfb.port
    page = fb.page
    real_get = F.fb_out_read
    raced: list[int] = []

    def get_while_the_frontend_fills(p, max_items=None):
        cons = page.out_cons
        events = real_get(p, max_items)
        if not raced:  # the frontend's writes landed between our two index accesses
            n = F.XENFB_OUT_RING_LEN - (page.out_prod - cons)
            raced.append(F.fb_out_put(page, [F.XenfbUpdate(x=0, y=0, width=1, height=1)] * n))
        return events

    monkeypatch.setattr(F, "fb_out_read", get_while_the_frontend_fills)
    fb.draw(0, 0, 4, 4, 0x00FFFFFF)
    rig.wait(lambda: spy.counts.get(port, 0) == 1, what="notify after the raced fill")
    assert raced == [F.XENFB_OUT_RING_LEN - 1]


def test_only_pixels_that_changed_are_sent(rig):
    """An UPDATE over pixels that are already what viewers have (fbcon clearing an empty line,
    redrawing the same glyph) sends nothing; one over a partly changed area sends the changed
    part's bounding box, as QEMU's VNC server does by comparing with its copy."""
    kbd, fb = connect_both(rig)
    c = RawClient("127.0.0.1", rig.port)
    c.full_frame()
    c.request()
    fb.draw(0, 0, 8, 16, 0x00FFFFFF)
    assert [r[:4] for r in c.wait_for_update()] == [(0, 0, 8, 16)]
    c.request()
    fb.draw(0, 0, 8, 16, 0x00FFFFFF)                 # the same glyph again: nothing new
    fb.draw(0, 32, 320, 16, 0)                       # a clear of an empty line: nothing new
    fb.draw(100, 50, 3, 2, 0x000000FF)               # the one change
    assert [r[:4] for r in c.wait_for_update()] == [(100, 50, 3, 2)]
    assert (c.fb[50:52, 100:103] & 0xFFFFFF == 0x0000FF).all()
    c.request()
    fb.send(F.XenfbUpdate(x=0, y=0, width=320, height=200))   # a redraw that changed nothing
    fb.draw(100, 50, 1, 1, 0x00FF0000)
    assert [r[:4] for r in c.wait_for_update()] == [(100, 50, 1, 1)]
    c.close()


def test_a_change_undone_before_a_viewer_is_served_never_strands_it(rig):
    """The guest draws X and reports it; before the viewer asks, it draws Y (report still
    in flight); the viewer is served; then it draws X again and both reports arrive.  Served
    from live memory, the viewer would get Y and never hear of X again (X is what was last
    compared): it must be served what was compared, and end on the guest's picture."""
    kbd, fb = connect_both(rig)
    c = RawClient("127.0.0.1", rig.port)
    c.full_frame()                                   # no request outstanding now
    fb.draw(0, 0, 8, 16, 0x00FFFFFF)                 # X, reported
    rig.wait(lambda: fb.page.out_cons == 1, what="X consumed")
    fb.draw(0, 0, 8, 16, 0x000000FF, send=False)     # Y, its report not there yet
    c.request()
    c.wait_for_update()
    fb.draw(0, 0, 8, 16, 0x00FFFFFF, send=False)     # X again
    fb.send(F.XenfbUpdate(x=0, y=0, width=8, height=16), F.XenfbUpdate(x=0, y=0, width=8,
                                                                       height=16))
    rig.wait(lambda: fb.page.out_cons == 3, what="both reports consumed")
    c.request()
    fb.draw(300, 190, 1, 1, 0x00FF0000)              # something else, to get an update
    c.wait_for_update()
    assert (c.fb[0:16, 0:8] & 0xFFFFFF == 0xFFFFFF).all()
    c.close()


def test_fresh_pixels_at_send_reach_every_viewer(rig):
    """At a viewer's send the copy is brought up to date from the guest's memory for what it
    is sent (the glyph is often drawn before its UPDATE is read); what that changed is told
    to every viewer, so one that was served earlier is not left with the old pixels."""
    kbd, fb = connect_both(rig)
    a, b = RawClient("127.0.0.1", rig.port), RawClient("127.0.0.1", rig.port)
    a.full_frame()
    b.full_frame()                                   # no requests outstanding now
    fb.draw(0, 0, 8, 16, 0x00FFFFFF)                 # X, reported: dirty for both
    rig.wait(lambda: fb.page.out_cons == 1, what="X consumed")
    b.request()
    b.wait_for_update()                              # b: X
    assert (b.fb[0:16, 0:8] & 0xFFFFFF == 0xFFFFFF).all()
    fb.draw(0, 0, 8, 16, 0x000000FF, send=False)     # Y, its UPDATE not sent yet
    a.request()
    a.wait_for_update()                              # a: Y, fresh from guest memory
    assert (a.fb[0:16, 0:8] & 0xFFFFFF == 0x0000FF).all()
    fb.send(F.XenfbUpdate(x=0, y=0, width=8, height=16))
    rig.wait(lambda: fb.page.out_cons == 2, what="Y's UPDATE consumed")
    b.request()
    b.wait_for_update()                              # b learns Y from a's send
    assert (b.fb[0:16, 0:8] & 0xFFFFFF == 0x0000FF).all()
    a.close()
    b.close()


def wait_for_pixels(c: RawClient, rows: slice, cols: slice, color: int,
                    timeout: float) -> None:
    """Ask for updates until the viewer shows ``color`` there (AssertionError after
    ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while not (c.fb[rows, cols] & 0xFFFFFF == color).all():
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"the viewer never showed {color:#08x} at {rows}, {cols}")
        c.request()
        try:
            c.wait_for_update(timeout=left)
        except OSError:  # socket timeout
            continue


def connect_fb_with_viewer(rig: Rig) -> tuple[ManualFb, RawClient]:
    """A viewer that holds the picture from before the frontend connected, the frontend
    connected and the viewer served its picture, the frontend *not* yet told Connected: what
    the guest draws now is drawn before xen-fbfront read ``request-update`` (it sends no
    UPDATE for it: ``xenfb_refresh`` returns while ``update_wanted`` is 0)."""
    rig.wait(lambda: rig.be_state("vfb") == XenbusState.InitWait, what="vfb InitWait")
    c = RawClient("127.0.0.1", rig.port)
    c.full_frame()
    fb = ManualFb(rig.kernel, 0)
    fb.publish()
    rig.wait(lambda: rig.be_state("vfb") == XenbusState.Connected, what="vfb Connected")
    deadline = time.monotonic() + 5.0
    while (c.width, c.height) != (fb.width, fb.height):   # with it, the whole picture
        assert time.monotonic() < deadline, "the viewer was never told the new size"
        c.request()
        c.wait_for_update()
    return fb, c


def test_pixels_drawn_before_the_frontend_wants_updates_reach_viewers(rig):
    """xen-fbfront reads ``request-update`` only when it sees us Connected: what it draws
    before that is in its memory but never reported (fbcon drawing held keys replayed at a
    migration's end, and then the typist stops).  The whole screen is compared again until
    the frontend's first UPDATE shows it reads our ``request-update``."""
    fb, c = connect_fb_with_viewer(rig)
    fb.draw(40, 40, 8, 16, 0x00FFFFFF, send=False)
    fb.publish(XenbusState.Connected)
    wait_for_pixels(c, slice(40, 56), slice(40, 48), 0xFFFFFF, 3.0)
    c.close()


def test_first_update_after_connect_compares_the_whole_screen(rig, monkeypatch):
    """The frontend's first UPDATE proves it reads ``request-update``; what it drew before
    is in memory by then: one whole-screen compare finds it, with no timer needed."""
    from dmore_nova.rm_vm.backends import vfb as vfb_mod

    monkeypatch.setattr(vfb_mod, "UNREPORTED_CHECKS", ())
    fb, c = connect_fb_with_viewer(rig)
    fb.draw(40, 40, 8, 16, 0x00FFFFFF, send=False)
    fb.publish(XenbusState.Connected)
    fb.draw(200, 100, 4, 4, 0x000000FF)
    wait_for_pixels(c, slice(100, 104), slice(200, 204), 0x0000FF, 3.0)
    assert (c.fb[40:56, 40:48] & 0xFFFFFF == 0xFFFFFF).all()
    # Later UPDATEs are compared where they say, as before.
    fb.draw(0, 180, 8, 16, 0x00FFFFFF, send=False)
    fb.draw(300, 190, 1, 1, 0x00FF0000)
    wait_for_pixels(c, slice(190, 191), slice(300, 301), 0xFF0000, 3.0)
    assert (c.fb[180:196, 0:8] & 0xFFFFFF == 0).all()
    c.close()


def test_the_guest_consuming_keys_wakes_the_agent_only_when_events_wait(rig):
    """xen-kbdfront notifies after every batch it consumes, once per key, while the guest
    works on the echo.  With nothing waiting for ring space the agent leaves the port masked
    after it fired; once events wait (the ring is full) the guest's consume
    wakes it again and they arrive, in order."""
    kbd, fb = connect_both(rig)
    c = RawClient("127.0.0.1", rig.port)
    c.full_frame()
    c.key(ord("z"), True)                            # the port fires once, at least
    c.key(ord("z"), False)
    assert len(wait_kbd(kbd, 2)) == 2
    c.request()
    fb.draw(0, 0, 1, 1, 0x000000FF)
    c.wait_for_update()
    evtchns, port = rig.agent.evtchns, rig.agent.vkbd.port
    delivered: list[int] = []
    pending_ports = evtchns.pending_ports

    def spy(*args, **kwargs):
        ports = pending_ports(*args, **kwargs)
        delivered.extend(ports)
        return ports

    evtchns.pending_ports = spy  # type: ignore[method-assign]
    for ch in "abcdefghij":
        c.key(ord(ch), True)
        c.key(ord(ch), False)
        assert len(wait_kbd(kbd, 2)) == 2            # consumed, the guest notified
    c.request()                                      # a round trip through the agent's loop
    fb.draw(0, 0, 1, 1, 0x00FFFFFF)
    c.wait_for_update()
    assert delivered.count(port) == 0
    # Now more than the ring holds: the rest waits, and the guest's consume must wake us.
    letters = [ord(ch) for ch in "abcdefghijklmnopqrstuvwxyz"] * 2
    for ks in letters:
        c.key(ks, True)
        c.key(ks, False)
    rig.wait(lambda: len(rig.agent.vkbd.queue) > 0, what="events waiting for ring space")
    got = [e for e in wait_kbd(kbd, 2 * len(letters), timeout=10)
           if isinstance(e, K.XenkbdKey) and e.pressed]
    assert [e.keycode for e in got] == [keymap.keysym_to_linux(ks)[0] for ks in letters]
    assert delivered.count(port) > 1
    c.close()


def test_an_update_reaches_a_waiting_viewer_in_the_same_loop_turn(rig):
    """What the guest reports is sent to a viewer with a request outstanding from within the
    event-channel handler: a send scheduled for the loop's next turn would cost that turn
    (epoll_wait and a clock read, system calls of ~0.1-0.2 ms each in a PV dom0 under
    emulation) for an update the flush already sent."""
    kbd, fb = connect_both(rig)
    c = RawClient("127.0.0.1", rig.port)
    c.full_frame()
    vfb, loop = rig.agent.vfb, rig.lt.loop
    in_handler = [False]
    scheduled: list[str] = []
    on_event, call_soon = vfb.on_event, loop.call_soon

    def spy_on_event() -> None:
        in_handler[0] = True
        try:
            on_event()
        finally:
            in_handler[0] = False

    def spy_call_soon(callback, *args, **kwargs):
        if in_handler[0]:
            scheduled.append(getattr(callback, "__name__", repr(callback)))
        return call_soon(callback, *args, **kwargs)

    vfb.on_event = spy_on_event                       # type: ignore[method-assign]
    loop.call_soon = spy_call_soon                    # type: ignore[method-assign]
    try:
        for i in range(5):
            c.request()
            fb.draw(8 * i, 0, 8, 16, 0x00FFFFFF)
            assert [r[:4] for r in c.wait_for_update()] == [(8 * i, 0, 8, 16)]
    finally:
        del loop.call_soon
    assert "_send_update" not in scheduled, scheduled
    c.close()


def past_the_first_update(rig):
    """Both devices connected, a viewer that has the full frame, and the frontend's first
    UPDATE (which makes the backend compare the whole screen: :attr:`VfbBackend.unreported`)
    read and served, so that what a test counts next is one UPDATE's own work."""
    kbd, fb = connect_both(rig)
    c = RawClient("127.0.0.1", rig.port)
    c.full_frame()
    c.request()
    fb.draw(0, 0, 1, 1, 0x000000FF)
    c.wait_for_update()
    return kbd, fb, c


def request_seen(rig, c: RawClient) -> None:
    """Send an update request and wait until the agent holds it (a viewer waits for pixels)."""
    c.request()
    rig.wait(lambda: rig.lt.call(lambda: any(v.pending_request for v in
                                             rig.agent.server.viewers)), what="request seen")


def test_an_update_is_sent_before_the_fired_ports_are_read(rig):
    """The vfb's ring is read first when the event channel fires: the echo's pixels leave
    before the system calls that read and unmask the ports (each also slows the Python after
    it in a PV dom0 under emulation).  A wakeup with nothing new in the ring does no work."""
    kbd, fb, c = past_the_first_update(rig)
    evtchns, vfb = rig.agent.evtchns, rig.agent.vfb
    order: list[str] = []
    pending_ports, on_event = evtchns.pending_ports, vfb.on_event
    sends = []

    def spy_pending(*args, **kwargs):
        order.append("pending_ports")
        return pending_ports(*args, **kwargs)

    def spy_send() -> None:
        before = sum(v.updates_sent for v in rig.agent.server.viewers)
        on_event()
        if sum(v.updates_sent for v in rig.agent.server.viewers) > before:
            order.append("update sent")

    evtchns.pending_ports = spy_pending               # type: ignore[method-assign]
    vfb.on_event = spy_send                           # type: ignore[method-assign]
    changed = rig.agent.display.changed
    rig.agent.display.changed = lambda r: sends.append(r) or changed(r)  # type: ignore
    request_seen(rig, c)
    fb.draw(24, 0, 8, 16, 0x00FFFFFF)
    assert [r[:4] for r in c.wait_for_update()] == [(24, 0, 8, 16)]
    rig.wait(lambda: "pending_ports" in order, what="the fired ports read")
    assert order[:2] == ["update sent", "pending_ports"], order
    # the handler's second look at the ring found nothing to compare
    assert [(r.x, r.y, r.w, r.h) for r in sends] == [(24, 0, 8, 16)]
    c.close()


def test_an_update_just_read_is_compared_once(rig):
    """The UPDATE's rect is compared when it is read; the send inside the same batch does not
    compare it again (sync), while a send outside one still does."""
    kbd, fb, c = past_the_first_update(rig)
    display = rig.agent.display
    compared: list[tuple[int, int, int, int]] = []
    changed = display.changed

    def spy(rect):
        compared.append((rect.x, rect.y, rect.w, rect.h))
        return changed(rect)

    display.changed = spy                             # type: ignore[method-assign]
    request_seen(rig, c)
    fb.draw(8, 0, 8, 16, 0x00FFFFFF)
    assert [r[:4] for r in c.wait_for_update()] == [(8, 0, 8, 16)]
    assert compared == [(8, 0, 8, 16)]
    # Damage waiting for the viewer's next request is synced when that request comes.
    fb.draw(16, 0, 8, 16, 0x00FFFFFF)
    rig.wait(lambda: len(compared) == 2, what="the UPDATE read")
    c.request()
    assert [r[:4] for r in c.wait_for_update()] == [(16, 0, 8, 16)]
    assert compared == [(8, 0, 8, 16), (16, 0, 8, 16), (16, 0, 8, 16)]
    c.close()


def test_what_the_guest_reports_while_the_ring_is_read_goes_into_the_same_update(rig,
                                                                                 monkeypatch):
    """fbcon reports an echo as several UPDATEs, each with a notify.  A guest slower than the
    agent has written only the first (the cursor erased) when the ring is read; the glyph,
    drawn and reported while the agent compares, must be in the update the viewer's pending
    request gets -- not wait for the viewer's next request (a round trip)."""
    kbd, fb, c = past_the_first_update(rig)
    vfb = rig.agent.vfb
    real_apply = vfb._apply
    reads: list[int] = []

    def apply_while_the_guest_draws(events: list) -> None:
        real_apply(events)                          # the erased cell compared and copied
        reads.append(len(events))
        if len(reads) == 1:
            fb.draw(8, 16, 8, 16, 0x00FFFFFF)       # then the glyph, in that cell

    monkeypatch.setattr(vfb, "_apply", apply_while_the_guest_draws)
    request_seen(rig, c)
    fb.draw(8, 16, 8, 16, 0x00000080)               # the cursor erased: the first UPDATE
    rects = c.wait_for_update()
    assert reads[:2] == [1, 1]
    assert [r[:4] for r in rects] == [(8, 16, 8, 16)]
    assert (c.fb[16:32, 8:16] & 0xFFFFFF == 0xFFFFFF).all()
    c.close()
