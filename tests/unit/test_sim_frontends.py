"""Sim guest frontends against pages in memory: xen-kbdfront / xen-fbfront state machines,
rings, resume; the console font, keyboard translation and rendering; libxl-style device
plumbing -- all over the in-process sim xenstore (C xenstored semantics), no host process.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import string
from collections.abc import Iterator, Sequence

import numpy as np
import pytest

from dmore_nova.xen import api
from dmore_nova.xen.api import XenError, XenstoreConflict
from dmore_nova.xen.io import fbif as F
from dmore_nova.xen.io import kbdif as K
from dmore_nova.xen.io import keymap
from dmore_nova.xen.io.xenbus import XenbusState
from dmore_nova.xen.sim import devices
from dmore_nova.xen.sim.guest import Guest
from dmore_nova.xen.sim.guest.console import (
    DEFAULT_BG,
    DEFAULT_FG,
    Console,
    KeyboardTranslator,
)
from dmore_nova.xen.sim.guest.fbfront import FbFront
from dmore_nova.xen.sim.guest.font import CELL_H, CELL_W, find_text, glyph, render_text
from dmore_nova.xen.sim.guest.kbdfront import KbdFront
from dmore_nova.xen.sim.guest.xenbus import PortTable
from dmore_nova.xen.sim.xenstore import Xenstore, XsError

PAGE = 4096
GUEST, BACKEND = 1, 0
C = keymap.LINUX_KEYCODES


# --- an api.XenStore over an in-process sim xenstore connection ------------------------------
class _Tx(api.Transaction):
    def __init__(self, store: ConnStore, tx_id: int) -> None:
        self.s, self.tx_id = store, tx_id

    def mkdir(self, path: str) -> None:
        self.s.conn.mkdir(path, tx_id=self.tx_id)

    def set_perms(self, path: str, perms) -> None:
        self.s.conn.set_perms(path, perms, tx_id=self.tx_id)

    def read(self, path: str) -> bytes | None:
        return self.s._read(path, self.tx_id)

    def write(self, path: str, value: bytes | str) -> None:
        self.s.conn.write(path, value, tx_id=self.tx_id)

    def rm(self, path: str) -> None:
        with contextlib.suppress(XsError):
            self.s.conn.rm(path, tx_id=self.tx_id)

    def directory(self, path: str) -> list[str]:
        try:
            return self.s.conn.directory(path, tx_id=self.tx_id)
        except XsError:
            return []


class ConnStore(api.XenStore):
    """``api.XenStore`` semantics (None/[] for missing nodes) over ``Xenstore.connect``."""

    def __init__(self, store: Xenstore, domid: int) -> None:
        self.conn = store.connect(domid)

    def _read(self, path: str, tx_id: int = 0) -> bytes | None:
        try:
            return self.conn.read(path, tx_id=tx_id)
        except XsError as e:
            if e.errno == errno.ENOENT:
                return None
            raise

    def read(self, path: str) -> bytes | None:
        return self._read(path)

    def write(self, path: str, value: bytes | str) -> None:
        self.conn.write(path, value)

    def mkdir(self, path: str) -> None:
        self.conn.mkdir(path)

    def rm(self, path: str) -> None:
        with contextlib.suppress(XsError):
            self.conn.rm(path)

    def directory(self, path: str) -> list[str]:
        try:
            return self.conn.directory(path)
        except XsError as e:
            if e.errno == errno.ENOENT:
                return []
            raise

    def get_perms(self, path: str) -> list[str]:
        return self.conn.get_perms(path)

    def set_perms(self, path: str, perms: Sequence[str]) -> None:
        self.conn.set_perms(path, list(perms))

    def get_domain_path(self, domid: int) -> str:
        return self.conn.get_domain_path(domid)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[api.Transaction]:
        tx = self.conn.transaction_start()
        try:
            yield _Tx(self, tx)
        except BaseException:
            with contextlib.suppress(XsError):
                self.conn.transaction_end(tx, False)
            raise
        try:
            self.conn.transaction_end(tx, True)
        except XsError as e:
            if e.errno == errno.EAGAIN:
                raise XenstoreConflict(errno.EAGAIN, "conflict") from None
            raise

    def watch(self, path: str, token: str) -> None:
        self.conn.watch(path, token)

    def unwatch(self, path: str, token: str) -> None:
        self.conn.unwatch(path, token)

    def watch_fileno(self) -> int:
        raise NotImplementedError

    def read_watch_events(self) -> list[tuple[str, str]]:
        return [(p, t.decode()) for p, t in self.conn.take_events()]

    def close(self) -> None:
        self.conn.close()


# --- a guest kernel with its RAM in a bytearray ------------------------------------------------
class FakeKernel:
    """Pages, grants and event channels of one guest, in memory.  ``mapped`` grefs are the
    ones the (test) backend holds: ending them is deferred, as in Xen."""

    def __init__(self, store: Xenstore, domid: int = GUEST, nr_pages: int = 1024) -> None:
        self.domid = domid
        self.nr_pages = nr_pages
        self.ram = bytearray(nr_pages * PAGE)
        self._free = collections.deque(range(1, nr_pages))
        self.allocated: set[int] = set()
        self.grants: dict[int, tuple[int, int, bool]] = {}
        self.mapped: set[int] = set()
        self.deferred: list[int] = []
        self._next_gref = 8
        self.ports: dict[int, int] = {}
        self._next_port = 1
        self.notified: list[int] = []
        self.dirty: set[int] = set()
        self._xs = ConnStore(store, domid)
        self.closed = False

    @property
    def xenstore(self) -> ConnStore:
        return self._xs

    def alloc_page(self) -> int:
        frame = self._free.popleft()
        self.allocated.add(frame)
        self.page(frame)[:] = bytes(PAGE)
        return frame

    def free_page(self, frame: int) -> None:
        if frame not in self.allocated:
            raise XenError(errno.EINVAL, "not allocated")
        if any(f == frame for _, f, _ in self.grants.values()):
            raise XenError(errno.EBUSY, "granted")
        self.allocated.discard(frame)
        self._free.append(frame)

    def page(self, frame: int) -> memoryview:
        assert 0 < frame < self.nr_pages
        return memoryview(self.ram)[frame * PAGE:(frame + 1) * PAGE]

    def write(self, frame: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        assert offset + len(data) <= PAGE
        self.page(frame)[offset:offset + len(data)] = data
        self.dirty.add(frame)

    def mark_dirty(self, frame: int) -> None:
        self.dirty.add(frame)

    def grant_foreign_access(self, domid: int, frame: int, readonly: bool = False) -> int:
        gref = self._next_gref
        self._next_gref += 1
        self.grants[gref] = (domid, frame, readonly)
        return gref

    def end_foreign_access(self, gref: int) -> bool:
        if gref in self.mapped:
            self.deferred.append(gref)
            return False
        del self.grants[gref]
        return True

    def process_deferred(self) -> int:
        still = []
        for gref in self.deferred:
            if gref in self.mapped:
                still.append(gref)
            else:
                del self.grants[gref]
        self.deferred = still
        return len(still)

    def alloc_unbound(self, remote_domid: int) -> int:
        port = self._next_port
        self._next_port += 1
        self.ports[port] = remote_domid
        return port

    def notify(self, port: int) -> None:
        assert port in self.ports
        self.notified.append(port)

    def unbind(self, port: int) -> None:
        del self.ports[port]

    def fileno(self) -> int:
        raise NotImplementedError

    def take_events(self) -> list[int]:
        return []

    def close(self) -> None:
        self.closed = True


# --- fixtures ----------------------------------------------------------------------------------
@pytest.fixture
def store() -> Xenstore:
    s = Xenstore()
    c = s.dom0
    # What the sim host / libxl__domain_make write for a new guest.
    c.mkdir(f"/local/domain/{GUEST}")
    c.set_perms(f"/local/domain/{GUEST}", ["n0", f"r{GUEST}"])
    for sub, perms in (("device", ["n0", f"r{GUEST}"]), ("error", [f"n{GUEST}"])):
        c.mkdir(f"/local/domain/{GUEST}/{sub}")
        c.set_perms(f"/local/domain/{GUEST}/{sub}", perms)
    c.write("/local/domain/0/name", "Domain-0")
    return s


@pytest.fixture
def dom0(store: Xenstore) -> ConnStore:
    return ConnStore(store, 0)


@pytest.fixture
def kernel(store: Xenstore) -> FakeKernel:
    return FakeKernel(store)


def backend_ready(dom0: ConnStore, dev: devices.DevicePaths, state=XenbusState.InitWait,
                  **keys: object) -> None:
    for k, v in keys.items():
        dom0.write(f"{dev.backend}/{k.replace('_', '-')}", str(v))
    dom0.write(f"{dev.backend}/state", state.to_xenstore())


def pump(kernel: FakeKernel, front) -> None:
    """Deliver pending watch events (what the guest's event loop does)."""
    for path, token in kernel.xenstore.read_watch_events():
        if token == front.watch_token:
            front.on_watch(path)


def fe(dom0: ConnStore, dev: devices.DevicePaths, key: str) -> bytes | None:
    return dom0.read(f"{dev.frontend}/{key}")


def make_kbd(dom0, kernel, tmp_path=None, **backend_keys) -> tuple[KbdFront, devices.DevicePaths]:
    dev = devices.add_vkbd(dom0, GUEST, BACKEND)
    backend_ready(dom0, dev, **backend_keys)
    kbd = KbdFront(kernel, PortTable(), key_log=None if tmp_path is None else
                   tmp_path / "keys.jsonl")
    kbd.attach()
    pump(kernel, kbd)
    return kbd, dev


# --- font ----------------------------------------------------------------------------------
def test_glyphs_are_fixed_cells_distinct_and_blank_for_space():
    assert glyph("h").shape == (CELL_H, CELL_W)
    assert glyph("h").any() and glyph("i").any()
    assert not np.array_equal(glyph("h"), glyph("i"))
    assert not glyph(" ").any()
    assert render_text("hi").shape == (CELL_H, 2 * CELL_W)
    assert np.array_equal(render_text("hi")[:, CELL_W:], glyph("i"))
    # Not drawable by the bitmap font: a visible placeholder, not an exception.
    assert np.array_equal(glyph("\u4e2d"), glyph("?"))


def test_find_text_only_matches_whole_cells():
    fb = np.zeros((4 * CELL_H, 10 * CELL_W), bool)
    fb[CELL_H:2 * CELL_H, 0:7 * CELL_W] = render_text("echo hi")
    fb[2 * CELL_H:3 * CELL_H, 0:2 * CELL_W] = render_text("hi")
    assert find_text(fb, "hi") == [(1, 5), (2, 0)]
    assert find_text(fb, "echo") == [(1, 0)]
    assert find_text(fb, "hx") == []


# --- keyboard --------------------------------------------------------------------------------
def test_translator_inverts_the_us_keymap_for_every_printable_character():
    for ch in string.printable[:95]:  # the printable ASCII characters incl. space
        code, shift = keymap.keysym_to_linux(ord(ch))
        kb = KeyboardTranslator()
        if shift:
            assert kb.key(C["KEY_LEFTSHIFT"], True) == b""
        assert kb.key(code, True) == ch.encode(), ch
        assert kb.key(code, False) == b""


def test_translator_control_alt_capslock_and_special_keys():
    kb = KeyboardTranslator()
    assert kb.key(C["KEY_ENTER"], True) == b"\r"
    assert kb.key(C["KEY_BACKSPACE"], True) == b"\x7f"
    assert kb.key(C["KEY_TAB"], True) == b"\t"
    assert kb.key(C["KEY_UP"], True) == b"\x1b[A"
    assert kb.key(C["KEY_LEFT"], True, app_cursor=True) == b"\x1bOD"
    assert kb.key(C["KEY_DELETE"], True) == b"\x1b[3~"
    assert kb.key(C["KEY_F1"], True) == b"\x1b[[A"
    kb.key(C["KEY_LEFTCTRL"], True)
    assert kb.key(C["KEY_C"], True) == b"\x03"
    assert kb.key(C["KEY_LEFTBRACE"], True) == b"\x1b"
    kb.key(C["KEY_LEFTCTRL"], False)
    assert kb.key(C["KEY_C"], True) == b"c"
    kb.key(C["KEY_RIGHTALT"], True)
    assert kb.key(C["KEY_B"], True) == b"\x1bb"
    kb.key(C["KEY_RIGHTALT"], False)
    kb.key(C["KEY_CAPSLOCK"], True)
    kb.key(C["KEY_CAPSLOCK"], False)
    assert kb.key(C["KEY_A"], True) == b"A"
    assert kb.key(C["KEY_1"], True) == b"1"       # caps lock affects letters only
    kb.key(C["KEY_LEFTSHIFT"], True)
    assert kb.key(C["KEY_A"], True) == b"a"
    assert kb.key(C["KEY_KP7"], True) == b"7"
    assert kb.key(keymap.BTN_LEFT, True) == b""   # a mouse button is not a character


# --- console rendering -------------------------------------------------------------------------
class FakeFb:
    def __init__(self, width: int = 320, height: int = 96) -> None:
        self.width, self.height = width, height
        self.pixels = np.full((height, width), 0x123456, np.uint32)
        self.damages: list[tuple[int, int, int, int]] = []

    def damage(self, x: int, y: int, w: int, h: int) -> None:
        self.damages.append((x, y, w, h))


def test_console_renders_text_and_damages_only_changed_line_spans():
    fb = FakeFb()
    con = Console(fb)
    assert fb.damages == [(0, 0, 320, 96)]          # the first full draw
    assert (fb.pixels[CELL_H:] == DEFAULT_BG).all()
    fb.damages.clear()
    con.feed(b"echo hi\r\nhi\r\n")
    mask = fb.pixels != DEFAULT_BG
    assert (0, 0) in find_text(mask, "echo hi")
    assert (1, 0) in find_text(mask, "hi")
    assert np.all(fb.pixels[mask] == DEFAULT_FG)
    assert {d[1] for d in fb.damages} <= {0, CELL_H, 2 * CELL_H}
    fb.damages.clear()
    con.feed(b"x")                                  # one new cell + the cursor moving right
    assert fb.damages == [(0, 2 * CELL_H, 2 * CELL_W, CELL_H)]
    fb.damages.clear()
    con.feed(b"\x1b[1;31mR\x1b[0m")
    red = fb.pixels[2 * CELL_H:3 * CELL_H, CELL_W:2 * CELL_W]
    assert (red == 0xFF5555).any()                  # bold red is bright red, as on Linux
    assert con.text()[1].rstrip() == "hi"


def test_console_cursor_is_an_underline_that_follows_the_text():
    fb = FakeFb()
    con = Console(fb)
    con.feed(b"ab")
    cell = fb.pixels[0:CELL_H, 2 * CELL_W:3 * CELL_W]
    assert (cell[14:16] == DEFAULT_FG).all() and (cell[:14] == DEFAULT_BG).all()
    con.feed(b"\x1b[?25l")                          # hide it
    assert (fb.pixels[0:CELL_H, 2 * CELL_W:3 * CELL_W] == DEFAULT_BG).all()


# --- device plumbing -----------------------------------------------------------------------
def test_add_device_writes_libxl_layout_with_permissions(store):
    dom0 = ConnStore(store, 0)
    rm_vm = 7
    dev = devices.add_vfb(dom0, GUEST, rm_vm, vncpasswd="s3cret")
    assert dev.frontend == f"/local/domain/{GUEST}/device/vfb/0"
    assert dev.backend == f"/local/domain/{rm_vm}/backend/vfb/{GUEST}/0"
    assert dom0.read(f"{dev.frontend}/backend") == dev.backend.encode()
    assert dom0.read(f"{dev.frontend}/backend-id") == str(rm_vm).encode()
    assert dom0.read(f"{dev.frontend}/state") == b"1"
    for key, value in (("frontend", dev.frontend), ("frontend-id", str(GUEST)), ("online", "1"),
                       ("state", "1"), ("vnc", "1"), ("vnclisten", "127.0.0.1"),
                       ("vncpasswd", "s3cret"), ("vncunused", "1"), ("sdl", "0")):
        assert dom0.read(f"{dev.backend}/{key}") == value.encode(), key
        assert dom0.read(f"{dev.libxl}/{key}" if key != "frontend" else
                         f"{dev.libxl}/frontend") == value.encode()
    assert dom0.read(f"{dev.libxl}/backend") == dev.backend.encode()
    # Every node carries its dir's permissions: the guest owns its frontend dir, the backend
    # domain may read it; the backend domain owns the backend dir, the guest may read it.
    assert dom0.get_perms(dev.frontend) == [f"n{GUEST}", f"r{rm_vm}"]
    assert dom0.get_perms(f"{dev.frontend}/state") == [f"n{GUEST}", f"r{rm_vm}"]
    assert dom0.get_perms(dev.backend) == [f"n{rm_vm}", f"r{GUEST}"]
    assert dom0.get_perms(f"{dev.backend}/online") == [f"n{rm_vm}", f"r{GUEST}"]
    assert dom0.get_perms(dev.libxl) == ["n0"]
    # The parents are as libxl leaves them: device/ stays read-only for the guest.
    assert dom0.get_perms(f"/local/domain/{GUEST}/device/vfb") == ["n0", f"r{GUEST}"]
    # ...and the permissions work: each end writes its own dir, reads the other's.
    guest, rm = ConnStore(store, GUEST), ConnStore(store, rm_vm)
    guest.write(f"{dev.frontend}/page-ref", "42")
    rm.write(f"{dev.backend}/state", "2")
    assert rm.read(f"{dev.frontend}/page-ref") == b"42"
    assert guest.read(f"{dev.backend}/state") == b"2"
    with pytest.raises(XenError):
        guest.write(f"{dev.backend}/state", "6")
    with pytest.raises(XenError):
        guest.write(f"/local/domain/{GUEST}/device/vfb/1/backend", "x")


def test_libxl_dir_is_not_readable_by_the_guest(store, dom0):
    dev = devices.add_vkbd(dom0, GUEST, BACKEND)
    with pytest.raises(XenError) as exc:
        ConnStore(store, GUEST).read(f"{dev.libxl}/backend")
    assert exc.value.errno == errno.EACCES


def test_vkbd_keys_are_only_the_configured_ones(dom0):
    dev = devices.add_vkbd(dom0, GUEST, BACKEND)
    assert sorted(dom0.directory(dev.backend)) == ["frontend", "frontend-id", "online", "state"]
    dev = devices.add_vkbd(dom0, GUEST, BACKEND, 1, feature_abs_pointer=True, width=1024,
                           height=768, unique_id="kbd0")
    assert dom0.read(f"{dev.backend}/feature-abs-pointer") == b"1"
    assert dom0.read(f"{dev.backend}/width") == b"1024"
    assert dom0.read(f"{dev.backend}/unique-id") == b"kbd0"
    assert [d.devid for d in devices.list_devices(dom0, GUEST)] == [0, 1]


def test_remove_device_closes_a_connected_backend_then_cleans_up(dom0):
    dev = devices.add_vkbd(dom0, GUEST, BACKEND)
    devices.add_vfb(dom0, GUEST, BACKEND)
    # Not connected: destroyed at once.
    assert devices.remove_device(dom0, "vfb", GUEST) is True
    assert dom0.directory(f"/local/domain/{GUEST}/device") == ["vkbd"]
    assert dom0.directory(f"/local/domain/{BACKEND}/backend") == ["vkbd"]
    # Connected and never closing: libxl's forced destroy after the timeout.
    dom0.write(f"{dev.backend}/state", "4")
    assert devices.remove_device(dom0, "vkbd", GUEST, timeout=0.05) is False
    assert dom0.read(f"{dev.backend}/state") is None
    assert dom0.directory(f"/local/domain/{GUEST}/device") == []
    assert dom0.read(f"/local/domain/{GUEST}/device") is not None   # device/ itself stays
    assert dom0.directory(f"/libxl/{GUEST}") == []
    with pytest.raises(XenError) as exc:
        devices.remove_device(dom0, "vkbd", GUEST)
    assert exc.value.errno == errno.ENOENT


def test_find_device_trusts_only_the_toolstack_record(store, dom0):
    dev = devices.add_vkbd(dom0, GUEST, BACKEND)
    # The guest can rewrite its own frontend dir; the toolstack does not care.
    ConnStore(store, GUEST).write(f"{dev.frontend}/backend", "/local/domain/0/evil")
    assert devices.find_device(dom0, "vkbd", GUEST) == dev
    dom0.write(f"{dev.libxl}/backend", "/local/domain/0/backend/vfb/1/0")
    with pytest.raises(XenError):
        devices.find_device(dom0, "vkbd", GUEST)


def test_add_device_rejects_bad_ids(dom0):
    with pytest.raises(ValueError):
        devices.add_device(dom0, "vif", GUEST, 0)
    with pytest.raises(ValueError):
        devices.add_device(dom0, "vkbd", 0, 0)
    with pytest.raises(ValueError):
        devices.add_device(dom0, "vkbd", GUEST, GUEST)
    with pytest.raises(ValueError):
        devices.add_device(dom0, "vkbd", GUEST, 0, backend_keys={"../x": "1"})


# --- kbdfront ------------------------------------------------------------------------------
def test_kbdfront_waits_for_backend_then_probes_grants_and_publishes(dom0, kernel):
    dev = devices.add_vkbd(dom0, GUEST, BACKEND)
    kbd = KbdFront(kernel, PortTable())
    kbd.attach()
    pump(kernel, kbd)
    assert not kbd.probed and fe(dom0, dev, "state") == b"1"    # backend still Initialising
    backend_ready(dom0, dev, feature_abs_pointer=1, width=1024, height=768)
    pump(kernel, kbd)
    assert kbd.probed
    assert fe(dom0, dev, "request-abs-pointer") == b"1"
    assert (kbd.ptr_width, kbd.ptr_height) == (1024, 768)
    gref = int(fe(dom0, dev, "page-gref"))
    frame = int(fe(dom0, dev, "page-ref"))
    port = int(fe(dom0, dev, "event-channel"))
    assert kernel.grants[gref] == (BACKEND, frame, False)
    assert kernel.ports[port] == BACKEND
    assert bytes(kernel.page(frame)) == bytes(PAGE)
    # The backend was in InitWait: the frontend went Initialised and then Connected.
    assert fe(dom0, dev, "state") == b"4"
    assert kbd.state is XenbusState.Connected


def test_kbdfront_without_abs_pointer_does_not_request_it(dom0, kernel):
    kbd, dev = make_kbd(dom0, kernel)
    assert kbd.probed and fe(dom0, dev, "request-abs-pointer") is None
    assert (kbd.ptr_width, kbd.ptr_height) == (800, 600)


def test_kbdfront_goes_connected_only_when_backend_is(dom0, kernel):
    dev = devices.add_vkbd(dom0, GUEST, BACKEND)
    backend_ready(dom0, dev, state=XenbusState.Initialised)     # odd but possible
    kbd = KbdFront(kernel, PortTable())
    kbd.wait_backend = False
    kbd.attach()
    pump(kernel, kbd)
    assert fe(dom0, dev, "state") == b"3"
    dom0.write(f"{dev.backend}/state", "4")
    pump(kernel, kbd)
    assert fe(dom0, dev, "state") == b"4"
    dom0.write(f"{dev.backend}/state", "5")
    pump(kernel, kbd)
    assert fe(dom0, dev, "state") == b"6"


def _put_keys(kernel: FakeKernel, kbd: KbdFront, events: list) -> int:
    return K.kbd_in_put(kernel.page(kbd.page_frame), events)


def test_kbdfront_consumes_a_full_ring_in_order_records_and_notifies(dom0, kernel, tmp_path):
    kbd, _ = make_kbd(dom0, kernel, tmp_path)
    seen = []
    kbd.listeners.append(seen.append)
    events = [K.XenkbdKey(pressed=bool(i % 2 == 0), keycode=C["KEY_A"] + i % 20)
              for i in range(K.XENKBD_IN_RING_LEN + 5)]
    assert _put_keys(kernel, kbd, events) == K.XENKBD_IN_RING_LEN     # the ring is full
    kernel.notified.clear()
    kbd.ports.dispatch([kbd.port])
    page = K.XenkbdPage(kernel.page(kbd.page_frame))
    assert page.in_cons == page.in_prod == K.XENKBD_IN_RING_LEN
    assert kernel.notified == [kbd.port]          # notify after consuming: room again
    assert _put_keys(kernel, kbd, events[K.XENKBD_IN_RING_LEN:]) == 5
    kbd.ports.dispatch([kbd.port])
    assert kbd.keys() == [(e.keycode, e.pressed) for e in events]
    assert seen == events
    lines = [json.loads(x) for x in (tmp_path / "keys.jsonl").read_text().splitlines()]
    assert [(x["keycode"], x["pressed"]) for x in lines] == kbd.keys()
    assert [x["seq"] for x in lines] == list(range(len(events)))
    # Nothing new: no notify (Linux returns early when prod == cons).
    kernel.notified.clear()
    kbd.ports.dispatch([kbd.port])
    assert kernel.notified == []


def test_kbdfront_records_pointer_events(dom0, kernel):
    kbd, _ = make_kbd(dom0, kernel)
    _put_keys(kernel, kbd, [K.XenkbdPosition(abs_x=10, abs_y=20, rel_z=-1),
                            K.XenkbdMotion(rel_x=-3, rel_y=4),
                            K.XenkbdKey(pressed=True, keycode=keymap.BTN_LEFT)])
    kbd.input_handler()
    assert [e["type"] for e in kbd.events] == ["pos", "motion", "key"]
    assert kbd.events[0]["abs_x"] == 10 and kbd.events[1]["rel_x"] == -3


def test_kbdfront_survives_hostile_ring_indices(dom0, kernel):
    kbd, _ = make_kbd(dom0, kernel)
    page = K.XenkbdPage(kernel.page(kbd.page_frame))
    page.in_prod = 0xFFFF0000                     # "65k events pending" in a 51-slot ring
    kbd.input_handler()
    assert kbd.ring_errors == 1 and kbd.total_events == 0
    assert page.in_cons == page.in_prod           # skipped, and the ring is usable again
    _put_keys(kernel, kbd, [K.XenkbdKey(pressed=True, keycode=C["KEY_Q"])])
    kbd.input_handler()
    assert kbd.keys() == [(C["KEY_Q"], True)]


def test_kbdfront_resume_ends_grant_zeroes_page_and_republishes(dom0, kernel):
    kbd, dev = make_kbd(dom0, kernel, feature_abs_pointer=1)
    old_frame, old_gref, old_port = kbd.page_frame, kbd.gref, kbd.port
    dom0.write(f"{dev.backend}/state", "4")
    pump(kernel, kbd)
    # Events the backend wrote but the guest never consumed: lost on resume, as on Linux.
    _put_keys(kernel, kbd, [K.XenkbdKey(pressed=True, keycode=C["KEY_Z"])])
    kernel.mapped.add(old_gref)                   # the backend still maps the old page
    dom0.rm(f"{dev.frontend}/request-abs-pointer")
    kbd.dev_resume()
    assert bytes(kernel.page(old_frame)) == bytes(PAGE)
    assert old_gref in kernel.deferred            # revocation deferred while mapped
    assert old_port not in kernel.ports and old_port not in kbd.ports
    assert kbd.page_frame != old_frame and kbd.gref != old_gref and kbd.port != old_port
    assert int(fe(dom0, dev, "page-gref")) == kbd.gref
    assert int(fe(dom0, dev, "page-ref")) == kbd.page_frame
    assert int(fe(dom0, dev, "event-channel")) == kbd.port
    assert kernel.grants[kbd.gref] == (BACKEND, kbd.page_frame, False)
    assert fe(dom0, dev, "request-abs-pointer") is None     # not rewritten on resume
    assert fe(dom0, dev, "state") == b"3"
    # The old page is not reused while the backend can still write to it...
    assert old_frame not in kernel._free
    kernel.mapped.discard(old_gref)                # ...until it unmaps.
    _put_keys(kernel, kbd, [K.XenkbdKey(pressed=True, keycode=C["KEY_X"])])
    kbd.input_handler()
    assert old_gref not in kernel.grants and old_frame in kernel._free
    assert kbd.keys() == [(C["KEY_X"], True)]
    # The backend (still Connected in xenstore) makes the frontend Connected again (Linux's
    # "fudge it"): a backend must notice the new page-gref/event-channel, not only states.
    pump(kernel, kbd)
    assert fe(dom0, dev, "state") == b"4"


def test_kbdfront_resume_follows_a_new_backend(store, dom0, kernel):
    kbd, dev = make_kbd(dom0, kernel)
    rm_vm = 5
    new = devices.add_vkbd(dom0, GUEST, rm_vm)     # the toolstack re-plumbed the device
    backend_ready(dom0, new)
    kbd.dev_resume()
    assert kbd.otherend == new.backend and kbd.otherend_id == rm_vm
    assert kernel.grants[kbd.gref][0] == rm_vm and kernel.ports[kbd.port] == rm_vm
    pump(kernel, kbd)
    assert fe(dom0, new, "state") == b"4"


def test_kbdfront_rejects_a_forged_backend_path(store, dom0, kernel):
    dev = devices.add_vkbd(dom0, GUEST, BACKEND)
    ConnStore(store, GUEST).write(f"{dev.frontend}/backend", "/local/domain/0/backend/vkbd/9/0")
    kbd = KbdFront(kernel, PortTable())
    kbd.attach()
    assert fe(dom0, dev, "state") == b"5"
    assert b"does not match" in dom0.read(f"/local/domain/{GUEST}/error/device/vkbd/0/error")


# --- fbfront -------------------------------------------------------------------------------
def make_fb(dom0, kernel, *, connect=True, **backend_keys) -> tuple[FbFront, devices.DevicePaths]:
    dev = devices.add_vfb(dom0, GUEST, BACKEND)
    keys = {"videoram": 2, "width": 640, "height": 480, "feature_resize": 1,
            "request_update": 1, **backend_keys}
    backend_ready(dom0, dev, **keys)
    fb = FbFront(kernel, PortTable())
    fb.attach()
    pump(kernel, fb)
    if connect:
        dom0.write(f"{dev.backend}/state", "4")
        pump(kernel, fb)
    return fb, dev


def map_fb(kernel: FakeKernel, page_frame: int, protocol: str) -> tuple[F.XenfbPage, np.ndarray]:
    """What a vfb backend does: read pd[] and the directory pages, gather the frames."""
    page = F.XenfbPage(kernel.page(page_frame), protocol)
    n_dirs = page.pd_entries_needed(page.mem_length)
    frames: list[int] = []
    dtype = "<u4" if page.pd_entry_size == 4 else "<u8"
    n_pages = -(-page.mem_length // PAGE)
    for i in range(n_dirs):
        frames += np.frombuffer(bytes(kernel.page(page.pd(i))), dtype).tolist()
    frames = frames[:n_pages]
    raw = b"".join(bytes(kernel.page(f)) for f in frames)
    rows = page.height
    img = np.frombuffer(raw[:rows * page.line_length], np.uint32).reshape(
        rows, page.line_length // 4)[:, :page.width]
    return page, img


def test_fbfront_probe_lays_out_pd_geometry_and_publishes_page_ref(dom0, kernel):
    fb, dev = make_fb(dom0, kernel, connect=False)
    assert fe(dom0, dev, "page-ref") == str(fb.page_frame).encode()
    assert fe(dom0, dev, "protocol") == fb.protocol.encode()
    assert fe(dom0, dev, "feature-update") == b"1"
    assert kernel.ports[int(fe(dom0, dev, "event-channel"))] == BACKEND
    assert kernel.grants == {}                    # vfb has no grant: frames only
    assert fe(dom0, dev, "state") == b"4"         # InitWait -> Initialised -> Connected
    page = F.XenfbPage(kernel.page(fb.page_frame), fb.protocol)
    assert (page.width, page.height, page.depth) == (640, 480, 32)
    assert page.line_length == 640 * 4
    assert page.mem_length == 2 << 20             # Linux: the whole video memory
    assert len(fb.fb_frames) == 512 and len(fb.dir_frames) == 1     # 512 8-byte entries/page
    fb.pixels[10, 20] = 0x00ABCDEF
    fb.damage(20, 10, 1, 1)
    _, img = map_fb(kernel, fb.page_frame, fb.protocol)
    assert img[10, 20] == 0x00ABCDEF
    # Not Connected yet on the backend side: pixels reach memory, UPDATEs are not wanted.
    assert F.fb_pending(page) == (0, 0)


def test_fbfront_32bit_abi_directory(dom0, kernel):
    dev = devices.add_vfb(dom0, GUEST, BACKEND)
    backend_ready(dom0, dev, videoram=2)
    fb = FbFront(kernel, PortTable(), protocol="x86_32-abi")
    fb.attach()
    pump(kernel, fb)
    assert fe(dom0, dev, "protocol") == b"x86_32-abi"
    page = F.XenfbPage(kernel.page(fb.page_frame), "x86_32-abi")
    assert page.pd(0) == fb.dir_frames[0] and len(fb.dir_frames) == 1   # 1024 entries/page
    fb.pixels[599, 799] = 0x00FFFFFF
    fb.damage(799, 599, 1, 1)
    _, img = map_fb(kernel, fb.page_frame, "x86_32-abi")
    assert img.shape == (600, 800) and img[599, 799] == 0x00FFFFFF


def test_fbfront_mode_that_does_not_fit_videoram_falls_back_to_default(dom0, kernel):
    fb, dev = make_fb(dom0, kernel, videoram=1, width=1024, height=768)
    assert (fb.width, fb.height) == (800, 600)
    assert fb.fb_size == 800 * 600 * 4


def test_fbfront_updates_after_connected_and_merges_while_ring_full(dom0, kernel):
    fb, dev = make_fb(dom0, kernel)
    assert fb.update_wanted and fb.feature_resize
    page = F.XenfbPage(kernel.page(fb.page_frame), fb.protocol)
    kernel.notified.clear()
    for i in range(F.XENFB_OUT_RING_LEN):
        fb.damage(i, 0, 1, 1)
    assert F.fb_pending(page)[1] == F.XENFB_OUT_RING_LEN and len(kernel.notified) == 51
    fb.damage(100, 200, 10, 10)                   # ring full: stashed
    fb.damage(300, 20, 5, 5)                      # merged with the stash
    assert F.fb_pending(page)[1] == F.XENFB_OUT_RING_LEN
    events = F.fb_out_get(page)                   # the backend drains and notifies
    assert events[:2] == [F.XenfbUpdate(x=0, y=0, width=1, height=1),
                          F.XenfbUpdate(x=1, y=0, width=1, height=1)]
    fb.event_handler()
    assert F.fb_out_get(page) == [F.XenfbUpdate(x=100, y=20, width=205, height=190)]
    fb.event_handler()                            # nothing dirty: nothing sent
    assert F.fb_pending(page) == (0, 0)


def test_fbfront_consumes_and_ignores_in_events(dom0, kernel):
    fb, _ = make_fb(dom0, kernel)
    page = F.XenfbPage(kernel.page(fb.page_frame), fb.protocol)
    assert F.fb_in_put(page, [F.XenfbRefreshPeriod(period=50)]) == 1
    kernel.notified.clear()
    fb.event_handler()
    assert page.in_cons == page.in_prod == 1 and kernel.notified == [fb.port]
    page.in_prod = 12345                          # hostile: skipped, not followed
    fb.event_handler()
    assert fb.ring_errors == 1 and page.in_cons == 12345


def test_fbfront_resize_is_sent_before_the_next_update(dom0, kernel):
    fb, _ = make_fb(dom0, kernel)
    assert not fb.resize(641, 480)                # wider than the boot mode: refused
    assert fb.resize(320, 240)
    page = F.XenfbPage(kernel.page(fb.page_frame), fb.protocol)
    fb.damage(0, 0, 320, 240)
    assert F.fb_out_get(page) == [
        F.XenfbResize(width=320, height=240, stride=640 * 4, depth=32, offset=0),
        F.XenfbUpdate(x=0, y=0, width=320, height=240)]
    fb.feature_resize = False
    assert not fb.resize(200, 100)


def test_fbfront_resume_moves_to_new_frames_keeping_the_picture(store, dom0):
    kernel = FakeKernel(store, nr_pages=2048)     # room for the frames to really move
    fb, dev = make_fb(dom0, kernel)
    fb.pixels[5, 7] = 0x0000FF00
    fb.damage(0, 0, 640, 480)
    old_page, old_port, old_frames = fb.page_frame, fb.port, set(fb.fb_frames)
    fb.dev_resume()
    assert fb.page_frame != old_page and fb.port != old_port
    assert not old_frames & set(fb.fb_frames)
    assert int(fe(dom0, dev, "page-ref")) == fb.page_frame
    assert int(fe(dom0, dev, "event-channel")) == fb.port
    assert old_port not in kernel.ports
    assert fe(dom0, dev, "state") == b"3" and not fb.update_wanted
    _, img = map_fb(kernel, fb.page_frame, fb.protocol)
    assert img[5, 7] == 0x0000FF00                # the screen survived the move
    page = F.XenfbPage(kernel.page(fb.page_frame), fb.protocol)
    fb.damage(0, 0, 1, 1)
    assert F.fb_pending(page) == (0, 0)           # no UPDATE until Connected again
    pump(kernel, fb)                              # backend (still) Connected
    assert fb.update_wanted
    fb.damage(0, 0, 1, 1)
    assert F.fb_out_get(page) == [F.XenfbUpdate(x=0, y=0, width=1, height=1)]


# --- the Guest object ----------------------------------------------------------------------
def test_guest_discovers_devices_and_moves_to_another_kernel(store, dom0, kernel):
    kdev = devices.add_vkbd(dom0, GUEST, BACKEND)
    backend_ready(dom0, kdev)
    g = Guest(kernel, console=False)
    g.handle_watches()
    assert g.kbd is not None and g.kbd.probed and g.fb is None
    fdev = devices.add_vfb(dom0, GUEST, BACKEND)
    backend_ready(dom0, fdev, videoram=1)
    g.handle_watches()
    assert g.fb is not None and g.fb.probed
    # Migration to "another host": the new domain has its own store and frames.
    store2 = Xenstore()
    new_id = 3
    c = store2.dom0
    c.mkdir(f"/local/domain/{new_id}/device")
    c.set_perms(f"/local/domain/{new_id}", ["n0", f"r{new_id}"])
    c.set_perms(f"/local/domain/{new_id}/device", ["n0", f"r{new_id}"])
    dom0b = ConnStore(store2, 0)
    k2 = devices.add_vkbd(dom0b, new_id, 0)
    backend_ready(dom0b, k2)
    f2 = devices.add_vfb(dom0b, new_id, 0)
    backend_ready(dom0b, f2, videoram=1)
    kernel2 = FakeKernel(store2, domid=new_id)
    # Like SimKernel.resume_on: the page allocator comes along with the copied memory.
    kernel2._free = collections.deque(kernel._free)
    kernel2.allocated = set(kernel.allocated)
    in_use = len(kernel.allocated)
    old_gref = g.kbd.gref
    g.resume(kernel2)
    assert len(kernel2.allocated) == in_use       # old frames freed, new ones taken: no leak
    assert kernel.closed
    assert old_gref in kernel.grants              # the old domain is gone; not touched
    assert g.kbd.nodename == k2.frontend and dom0b.read(f"{k2.frontend}/state") == b"3"
    assert kernel2.grants[g.kbd.gref] == (0, g.kbd.page_frame, False)
    assert int(dom0b.read(f"{f2.frontend}/page-ref")) == g.fb.page_frame
    assert set(g.fb.fb_frames) <= kernel2.allocated
    g.handle_watches()
    assert dom0b.read(f"{k2.frontend}/state") == b"4"
    # The device node going away detaches the frontend.
    devices.destroy_device(dom0b, "vkbd", new_id)
    g.handle_watches()
    assert g.kbd is None and g.fb is not None
