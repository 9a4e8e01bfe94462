"""The vkbd backend (kbdif.h): what viewers type and point, as xen-kbdfront expects it.

Differences from QEMU's xenfb input backend, on purpose:

* a full in ring does not drop events (QEMU returns EAGAIN and loses the key): they wait in a
  bounded queue and go out when the frontend next notifies us (xen-kbdfront notifies after it
  has consumed events).  Overflowing the queue is logged with a count, never silent;
* the queue also survives disconnect/reconnect, which is how keys typed during a migration
  switchover reach the guest after it resumes (co-migration's *replay* step);
* ``request-abs-pointer`` is remembered across reconnects: a resumed Linux frontend does not
  rewrite it.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable

from dmore_nova.rm_vm.backends.xenbus import BackendDevice, DeviceError, parse_uint
from dmore_nova.rm_vm.rfb.display import (
    BUTTON_LEFT,
    BUTTON_MIDDLE,
    BUTTON_RIGHT,
    WHEEL_DOWN,
    WHEEL_UP,
    KeyInput,
    PointerInput,
)
from dmore_nova.xen.api import EventChannels, Xen
from dmore_nova.xen.io import kbdif as K
from dmore_nova.xen.io import keymap
from dmore_nova.xen.io.ring import RingError

#: Events held while the ring is full or the frontend is away (a migration switchover).
MAX_QUEUED = 8192

_BUTTONS = ((BUTTON_LEFT, keymap.BTN_LEFT), (BUTTON_MIDDLE, keymap.BTN_MIDDLE),
            (BUTTON_RIGHT, keymap.BTN_RIGHT))


_KEY_EVENTS: dict[tuple[bool, int], K.XenkbdKey] = {}


def _key_event(pressed: bool, code: int) -> K.XenkbdKey:
    """The (immutable, so shareable) event for a key; built once per key, as a key press is
    the latency path.  ``code`` comes from the keymap tables, so the cache is bounded."""
    key = (pressed, code)
    event = _KEY_EVENTS.get(key)
    if event is None:
        event = _KEY_EVENTS[key] = K.XenkbdKey(pressed=pressed, keycode=code)
    return event


class VkbdBackend(BackendDevice):
    kind = K.XENKBD_DRIVER_NAME  # "vkbd"
    #: QEMU-type vkb (and the sim): backend/vkbd; libxl's ``backend-type=linux``: backend/vinput.
    backend_kinds = ("vkbd", "vinput")
    connect_keys = ("page-gref", "page-ref", "event-channel")

    def __init__(self, xen: Xen, evtchns: EventChannels, fe_domid: int, devid: int, *,
                 width: int, height: int) -> None:
        super().__init__(xen, evtchns, fe_domid, devid)
        self.width, self.height = width, height  # the frontend's pointer range (advertised)
        #: Size of what viewers see and point at; the agent points this at the display.
        self.display_size: Callable[[], tuple[int, int]] = lambda: (self.width, self.height)
        self.abs_pointer = False
        self.raw_pointer = False
        self.queue: deque[K.XenkbdKey | K.XenkbdPosition | K.XenkbdMotion] = deque()
        self.dropped = 0
        self.delivered = 0
        self._buttons = 0
        self._pressed: set[int] = set()

    # -- xenbus hooks ----------------------------------------------------------------------
    def write_features(self) -> None:
        self.be_write(K.XENKBD_FIELD_FEAT_ABS_POINTER, 1)
        self.be_write(K.XENKBD_FIELD_FEAT_RAW_POINTER, 1)
        self.be_write(K.XENKBD_FIELD_WIDTH, self.width)
        self.be_write(K.XENKBD_FIELD_HEIGHT, self.height)

    def connect(self) -> None:
        gref = self.fe_read(K.XENKBD_FIELD_RING_GREF)
        if gref is not None:
            self.page = self.xen.map_grant(self.fe_domid, parse_uint(gref, "page-gref"),
                                           writable=True)
        else:
            # Old frontends publish only the frame number: needs foreign-mapping privilege.
            pfn = parse_uint(self.fe_read(K.XENKBD_FIELD_RING_REF), "page-gref/page-ref",
                             (1 << 52) - 1)
            self.page = self.xen.map_foreign(self.fe_domid, [pfn], writable=True)
        self.bind()
        self._read_requests()
        self.flush()

    def frontend_connected(self) -> None:
        self._read_requests()
        self.flush()

    def _read_requests(self) -> None:
        abs_req = self.fe_read(K.XENKBD_FIELD_REQ_ABS_POINTER)
        if abs_req is not None:  # absent after a resume: keep what we knew
            self.abs_pointer = abs_req.strip(b"\0") == b"1"
        raw_req = self.fe_read(K.XENKBD_FIELD_REQ_RAW_POINTER)
        if raw_req is not None:
            self.raw_pointer = raw_req.strip(b"\0") == b"1"

    def on_event(self) -> None:
        """The frontend consumed events (or wrote out events, of which none are defined)."""
        if self.page is None:
            return
        try:
            K.kbd_out_drain(self.page.mem)
        except RingError as exc:
            raise DeviceError(str(exc)) from None
        self.flush()

    def unconsumed(self) -> list[K.XenkbdKey | K.XenkbdPosition | K.XenkbdMotion]:
        """The events in the ring the frontend has not consumed (``in_cons..in_prod``), in
        order, read from a copy of the page: the shared page is not written.

        Why: a Linux frontend that resumes after migration ends its grant and zeroes its page
        (``xenkbd_resume``: ``memset(info->page, 0, PAGE_SIZE)``), so what it had not consumed
        when the guest suspended is lost unless the backend sends it again to the new ring.
        Only meaningful once the guest stopped for good (suspended): a running frontend may
        consume them meanwhile.  Hostile indices: nothing (logged)."""
        if self.page is None:
            return []
        try:
            events = K.kbd_in_get(bytearray(self.page.mem[:K.XenkbdPage.PAGE_SIZE]))
        except RingError as exc:
            self.log.warning("%s: unconsumed events not recoverable: %s", self.name, exc)
            return []
        return [ev for ev in events
                if isinstance(ev, K.XenkbdKey | K.XenkbdPosition | K.XenkbdMotion)]

    # -- input from viewers ----------------------------------------------------------------
    def key(self, ev: KeyInput, *, notify: bool = True) -> None:
        """``notify=False``: queue only; the caller has more input from the same read coming
        and :meth:`flush`es at its end."""
        code, shift = None, False
        if ev.scancode:
            code = keymap.xt_to_linux(ev.scancode)
        if code is None:
            mapped = keymap.keysym_to_linux(ev.keysym)
            if mapped is not None:
                code, shift = mapped
        if code is None:
            self.log.debug("%s: no keycode for keysym %#x scancode %s", self.name, ev.keysym,
                           ev.scancode)
            return
        synth_shift = (ev.down and shift and not ev.scancode
                       and keymap.KEY_LEFTSHIFT not in self._pressed
                       and keymap.KEY_RIGHTSHIFT not in self._pressed)
        events: list = []
        if synth_shift:
            # A keysym-only client (e.g. vncdotool typing 'A') sent no Shift: add it, as a US
            # keyboard would need it, and release it right after.
            events.append(_key_event(True, keymap.KEY_LEFTSHIFT))
        events.append(_key_event(ev.down, code))
        if synth_shift:
            events.append(_key_event(False, keymap.KEY_LEFTSHIFT))
        if ev.down:
            self._pressed.add(code)
        else:
            self._pressed.discard(code)
        self.send(events, notify=notify)

    def pointer(self, ev: PointerInput, *, notify: bool = True) -> None:
        events: list = []
        changed = ev.buttons ^ self._buttons
        for bit, code in _BUTTONS:
            if changed & bit:
                events.append(K.XenkbdKey(pressed=bool(ev.buttons & bit), keycode=code))
        # RFB reports a wheel notch as a press of button 4/5; QEMU turns it into rel_z -1/+1.
        rel_z = 0
        pressed_now = ev.buttons & ~self._buttons
        if pressed_now & WHEEL_UP:
            rel_z -= 1
        if pressed_now & WHEEL_DOWN:
            rel_z += 1
        self._buttons = ev.buttons
        x, y = self._scale(ev.x, ev.y)
        events.append(K.XenkbdPosition(abs_x=x, abs_y=y, rel_z=rel_z))
        self.send(events, notify=notify)

    def _scale(self, x: int, y: int) -> tuple[int, int]:
        """Viewer pixels -> what the frontend expects: 0..0x7fff when it asked for raw
        coordinates (kbdif.h ``feature-raw-pointer``), else its own scale: xen-kbdfront sets the
        ABS_X/ABS_Y ranges from the ``width``/``height`` we advertised, which may differ from the
        framebuffer the viewer sees (``display_size``)."""
        dw, dh = self.display_size()
        x = min(max(x, 0), dw - 1)
        y = min(max(y, 0), dh - 1)
        tw, th = ((K.XENKBD_RAW_POINTER_MAX + 1, K.XENKBD_RAW_POINTER_MAX + 1)
                  if self.raw_pointer else (self.width, self.height))
        if (tw, th) == (dw, dh):
            return x, y
        return x * (tw - 1) // max(dw - 1, 1), y * (th - 1) // max(dh - 1, 1)

    # -- the ring --------------------------------------------------------------------------
    def send(self, events: list, *, notify: bool = True) -> None:
        """Queue ``events`` (bounded: :data:`MAX_QUEUED`) and, unless ``notify=False``,
        :meth:`flush` them."""
        room = MAX_QUEUED - len(self.queue)
        if len(events) > room:
            lost = len(events) - room
            self.dropped += lost
            self.log.warning("%s: input queue full (%d); %d events dropped (%d in total)",
                             self.name, MAX_QUEUED, lost, self.dropped)
            events = events[:room]
        self.queue.extend(events)
        if notify:
            self.flush()

    def flush(self) -> None:
        """Write what fits into the in ring, then notify once; the rest waits for the
        frontend's next notify (it consumed).  One write and one notify for all the input of
        one read from a viewer (a key's press and release come together): the notify is a
        hypercall and an interrupt in the guest, and in a PV domain under emulation each
        ring write costs ~0.3 ms."""
        if self.page is None or self.port is None or not self.queue:
            return
        batch = list(itertools.islice(self.queue, K.XENKBD_IN_RING_LEN))
        try:
            n = K.kbd_in_put(self.page.mem, batch)
        except RingError as exc:
            self.fail(f"in ring: {exc}")
            return
        if n:
            for _ in range(n):
                self.queue.popleft()
            self.delivered += n
            self.evtchns.notify(self.port)
