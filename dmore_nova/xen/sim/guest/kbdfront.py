"""The sim guest's vkbd frontend: what Linux's ``xen-kbdfront`` does, step for step.

* **probe** reads the backend's ``feature-disable-keyboard``/``-pointer``,
  ``feature-multi-touch`` (then writes ``request-multi-touch``), ``feature-abs-pointer`` with
  ``width``/``height`` (default 800x600; then writes ``request-abs-pointer=1``) and connects;
* **connect** grants a zeroed page to the backend domain (``page-gref``), also publishes its
  frame (``page-ref``, obsolete but still written by Linux), allocates an unbound event channel
  for the backend (``event-channel``), all three in one transaction, then **Initialised**;
* backend **InitWait** or **Connected** -> **Connected**; backend Closing/Closed -> Closed;
* the **event handler** reads ``in_prod``, consumes ``in_cons..in_prod`` with
  :func:`~dmore_nova.xen.io.kbdif.kbd_in_get`, writes ``in_cons`` and notifies the backend
  (the notify is what tells a backend with queued input that there is room again);
* **resume** (after migration) ends the grant, zeroes the page, then connects again with a new
  page, a new grant and a new event channel and goes back to Initialised.  Unconsumed events in
  the old page are lost, as on Linux; ``request-abs-pointer`` is *not* written again.

Unlike Linux, the ring indices are validated (the backend is untrusted here too): impossible
indices are logged and skipped, never followed out of the ring.

Every event received is recorded in order (:attr:`KbdFront.events`, bounded) and, if asked,
appended to a JSON-lines file so another process (a test, a benchmark) can check what the guest
saw and when (``t`` is ``time.monotonic()``, which is system-wide on Linux).
"""

from __future__ import annotations

import collections
import errno
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from dmore_nova.xen.api import XenError
from dmore_nova.xen.io import kbdif as K
from dmore_nova.xen.io.ring import RingError
from dmore_nova.xen.io.xenbus import XenbusState
from dmore_nova.xen.sim.guest.xenbus import FrontendError, GuestKernel, PortTable, XenbusFrontend

#: xen-kbdfront's ``ptr_size`` defaults (XENFB_WIDTH x XENFB_HEIGHT).
XENFB_WIDTH, XENFB_HEIGHT = 800, 600
#: Events kept in memory (the oldest are dropped from :attr:`KbdFront.events`; the count and
#: the log file still cover everything).
MAX_RECORDED_EVENTS = 100_000
#: Size at which the key log stops growing (a final ``{"type": "log-truncated"}`` line says so).
MAX_KEY_LOG_BYTES = 64 << 20
#: Largest width/height accepted from the backend for the pointer range.
MAX_POINTER_RANGE = 1 << 16

InEvent = K.XenkbdKey | K.XenkbdPosition | K.XenkbdMotion | K.XenkbdMtouch | K.UnknownEvent


def _free_quietly(kernel: GuestKernel, frame: int) -> bool:
    """Free ``frame`` if this kernel has it allocated (after a migration the new kernel may
    or may not carry the old allocations over); True if it was freed."""
    try:
        kernel.free_page(frame)
    except XenError:
        return False
    return True


def event_record(ev: InEvent) -> dict[str, Any]:
    """A JSON-able dict of one in event (the key-log line, minus ``seq``/``t``)."""
    if isinstance(ev, K.XenkbdKey):
        return {"type": "key", "keycode": ev.keycode, "pressed": ev.pressed}
    if isinstance(ev, K.XenkbdPosition):
        return {"type": "pos", "abs_x": ev.abs_x, "abs_y": ev.abs_y, "rel_z": ev.rel_z}
    if isinstance(ev, K.XenkbdMotion):
        return {"type": "motion", "rel_x": ev.rel_x, "rel_y": ev.rel_y, "rel_z": ev.rel_z}
    if isinstance(ev, K.XenkbdMtouch):
        return {"type": "mtouch", "event_type": ev.event_type, "contact_id": ev.contact_id,
                "abs_x": ev.abs_x, "abs_y": ev.abs_y}
    return {"type": "unknown", "code": ev.type, "reason": ev.reason}


class KbdFront(XenbusFrontend):
    """One vkbd device of the sim guest.

    ``listeners`` are called with each decoded in event, in ring order, after it is recorded
    (the console turns KEY events into bytes for its shell).
    """

    kind = K.XENKBD_DRIVER_NAME

    def __init__(self, kernel: GuestKernel, ports: PortTable, devid: int = 0, *,
                 key_log: str | os.PathLike[str] | None = None,
                 max_recorded: int = MAX_RECORDED_EVENTS) -> None:
        super().__init__(kernel, ports, devid)
        self.page_frame: int | None = None
        self.gref: int | None = None
        self.port: int | None = None
        self.with_kbd = self.with_ptr = self.with_mtouch = False
        self.abs_pointer = False
        self.ptr_width, self.ptr_height = XENFB_WIDTH, XENFB_HEIGHT
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_recorded)
        self.total_events = 0
        self.ring_errors = 0
        self.resumes = 0
        self.listeners: list[Callable[[InEvent], None]] = []
        self._retired: list[int] = []  # old pages whose grant is still mapped by the backend
        self._log: IO[str] | None = None
        self._log_bytes = 0
        self.key_log = Path(key_log) if key_log is not None else None
        if self.key_log is not None:
            self._log = open(self.key_log, "a", encoding="utf-8")  # noqa: SIM115
            self._log_bytes = self._log.tell()

    # -- xenbus driver hooks --------------------------------------------------------------------
    def probe(self) -> None:
        """``xenkbd_probe``."""
        self.page_frame = self.kernel.alloc_page()
        # Reverse logic: if the feature is set, do not expose that device.
        self.with_kbd = not self.read_otherend_uint(K.XENKBD_FIELD_FEAT_DSBL_KEYBRD, 0)
        self.with_ptr = not self.read_otherend_uint(K.XENKBD_FIELD_FEAT_DSBL_POINTER, 0)
        self.with_mtouch = bool(self.read_otherend_uint(K.XENKBD_FIELD_FEAT_MTOUCH, 0))
        if self.with_mtouch:
            try:
                self.write_node(K.XENKBD_FIELD_REQ_MTOUCH, "1")
            except XenError:
                self.log.warning("can't request multi-touch")
                self.with_mtouch = False
        if self.with_ptr:
            self.abs_pointer = bool(self.read_otherend_uint(K.XENKBD_FIELD_FEAT_ABS_POINTER, 0))
            self.ptr_width = self.read_otherend_uint(K.XENKBD_FIELD_WIDTH, self.ptr_width,
                                                     MAX_POINTER_RANGE)
            self.ptr_height = self.read_otherend_uint(K.XENKBD_FIELD_HEIGHT, self.ptr_height,
                                                      MAX_POINTER_RANGE)
            if self.abs_pointer:
                try:
                    self.write_node(K.XENKBD_FIELD_REQ_ABS_POINTER, "1")
                except XenError:
                    self.log.warning("can't request abs-pointer")
                    self.abs_pointer = False
        if not (self.with_kbd or self.with_ptr or self.with_mtouch):
            raise FrontendError(f"{self.nodename}: backend disabled every device (ENXIO)")
        self.connect_backend()

    def otherend_changed(self, backend_state: XenbusState) -> None:
        """``xenkbd_backend_changed``."""
        if backend_state is XenbusState.InitWait:
            self.switch_state(XenbusState.Connected)
        elif backend_state is XenbusState.Connected:
            # "If backend goes through InitWait to Connected fast enough, we can get
            # Connected twice here."
            if self.state is not XenbusState.Connected:
                self.switch_state(XenbusState.Connected)
        elif backend_state is XenbusState.Closed:
            if self.state is not XenbusState.Closed:
                self.frontend_closed()  # missed the backend's Closing
        elif backend_state is XenbusState.Closing:
            self.frontend_closed()

    def resume(self, moved: bool = False) -> None:
        """``xenkbd_resume``: disconnect, zero the page, connect with a new page/grant/port."""
        self.resumes += 1
        self.disconnect_backend(moved)
        old = self.page_frame
        if old is not None and not moved:
            self.kernel.page(old)[:] = bytes(len(self.kernel.page(old)))
            self.kernel.mark_dirty(old)
            self._retired.append(old)
        elif old is not None:
            # Migrated: the page came along with the guest's memory (a kernel carrying the
            # allocator over, ``SimKernel.resume_on``, still counts it as ours) but nothing
            # maps it in the new domain, so it is simply free again.
            _free_quietly(self.kernel, old)
        if moved:  # pages held back for the old backend: their grants died with the domain
            for frame in self._retired:
                _free_quietly(self.kernel, frame)
            self._retired = []
        # A new frame: what the backend mapped before is not what it must map now (on a PV
        # guest the machine frame changes with the host; here the sim re-lays the memory out).
        self.page_frame = self.kernel.alloc_page()
        self._reap()
        self.connect_backend()

    def remove(self) -> None:
        """``xenkbd_remove``."""
        self.disconnect_backend(False)
        if self.page_frame is not None:
            self._retired.append(self.page_frame)
            self.page_frame = None
        self._reap()
        if self._log is not None:
            self._log.close()
            self._log = None

    # -- connection -----------------------------------------------------------------------------
    def connect_backend(self) -> None:
        """``xenkbd_connect_backend``."""
        assert self.page_frame is not None
        be = self.otherend_id
        gref = self.kernel.grant_foreign_access(be, self.page_frame, readonly=False)
        try:
            port = self.kernel.alloc_unbound(be)
        except XenError:
            self.kernel.end_foreign_access(gref)
            raise
        self.gref, self.port = gref, port
        self.ports.bind(port, self.input_handler)
        frame = self.page_frame

        def publish(t: Any) -> None:
            t.write(f"{self.nodename}/{K.XENKBD_FIELD_RING_REF}", str(frame))
            t.write(f"{self.nodename}/{K.XENKBD_FIELD_RING_GREF}", str(gref))
            t.write(f"{self.nodename}/{K.XENKBD_FIELD_EVT_CHANNEL}", str(port))

        try:
            self.xs.run_transaction(publish)
        except XenError:
            self.disconnect_backend(False)
            raise
        self.switch_state(XenbusState.Initialised)

    def disconnect_backend(self, moved: bool) -> None:
        """``xenkbd_disconnect_backend``: unbind the port and end the grant (deferred while the
        backend still maps it, as ``gnttab_end_foreign_access`` does).  ``moved``: those
        belonged to the old domain, which is gone; just forget them."""
        if self.port is not None:
            self.ports.unbind(self.port)
            if not moved:
                try:
                    self.kernel.unbind(self.port)
                except XenError as exc:
                    self.log.info("unbind port %d: %s", self.port, exc)
            self.port = None
        if self.gref is not None:
            if not moved:
                try:
                    self.kernel.end_foreign_access(self.gref)
                except XenError as exc:
                    self.log.info("end grant %d: %s", self.gref, exc)
            self.gref = None

    def _reap(self) -> None:
        """Free retired pages whose grant has ended (a page the backend can still write to
        is never handed out again)."""
        if not self._retired:
            return
        self.kernel.process_deferred()
        keep = []
        for frame in self._retired:
            try:
                self.kernel.free_page(frame)
            except XenError as exc:
                if exc.errno != errno.EBUSY:
                    self.log.info("free page %#x: %s", frame, exc)
                    continue
                keep.append(frame)
        self._retired = keep

    # -- the ring ---------------------------------------------------------------------------------
    def input_handler(self) -> None:
        """``input_handler``: consume the in ring, then notify the backend."""
        if self.page_frame is None or self.port is None:
            return
        page = K.XenkbdPage(self.kernel.page(self.page_frame))
        if page.in_prod == page.in_cons:
            return
        try:
            events = K.kbd_in_get(page)
        except RingError as exc:
            # A hostile or broken backend: skip what it claims to have produced.
            self.ring_errors += 1
            self.log.warning("%s: in ring: %s; skipping", self.nodename, exc)
            page.in_cons = page.in_prod
            events = []
        self.kernel.mark_dirty(self.page_frame)
        self._record(events)
        self.kernel.notify(self.port)
        for ev in events:
            for listener in self.listeners:
                try:
                    listener(ev)
                except Exception:
                    self.log.exception("input listener failed on %s", ev)
        if self._retired:
            self._reap()

    def _record(self, events: list[InEvent]) -> None:
        now = time.monotonic()
        lines = []
        for ev in events:
            rec = event_record(ev)
            rec["seq"] = self.total_events
            rec["t"] = now
            self.total_events += 1
            self.events.append(rec)
            if self._log is not None:
                lines.append(json.dumps(rec, separators=(",", ":")) + "\n")
        if lines and self._log is not None:
            self._write_log("".join(lines))

    def _write_log(self, text: str) -> None:
        assert self._log is not None
        if self._log_bytes + len(text) > MAX_KEY_LOG_BYTES:
            self._log.write('{"type":"log-truncated"}\n')
            self._log.close()
            self._log = None
            self.log.warning("key log %s reached %d bytes; no longer written", self.key_log,
                             MAX_KEY_LOG_BYTES)
            return
        self._log.write(text)
        self._log.flush()
        self._log_bytes += len(text)

    # -- introspection ----------------------------------------------------------------------------
    def keys(self) -> list[tuple[int, bool]]:
        """``(keycode, pressed)`` of the recorded KEY events, in order."""
        return [(e["keycode"], e["pressed"]) for e in self.events if e["type"] == "key"]

    def status(self) -> dict[str, Any]:
        return {"state": self.state.name, "backend": self.otherend,
                "backend_id": self.otherend_id, "page_frame": self.page_frame,
                "gref": self.gref, "port": self.port, "abs_pointer": self.abs_pointer,
                "events": self.total_events, "resumes": self.resumes,
                "ring_errors": self.ring_errors}
