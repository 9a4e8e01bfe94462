"""The xenbus side of a PV backend: the state machine QEMU's legacy backend runs.

``qemu/qemu hw/xen/xen-legacy-backend.c`` drives every device through the same steps, and the
Linux frontends expect exactly those:

1. *init*: the toolstack set ``online=1``; write the device's ``feature-*`` keys, then
   ``hotplug-status=connected`` and **InitWait**;
2. *initialise*: once the frontend is Initialised or Connected, map its page and bind its
   event channel, then **Connected**;
3. *connected*: once the frontend is Connected too, read its ``request-*`` keys;
4. *teardown*: a frontend in Closing/Closed makes us unmap, unbind and close;
5. *reset*: a frontend back in Initialising/Initialised while we are Connected or Closed is a
   fresh connect.  This is what a resumed Linux frontend does after migration (xen-kbdfront ends
   its grant, zeroes the page, and publishes a new ``page-gref``/``event-channel``), and it is
   how the RM agent re-maps and re-binds.

Everything the frontend wrote is guest-controlled.  A value that no correct frontend writes
closes *this* device (state Closing, reason in the backend's ``error`` node and the log); the
agent, other devices and viewers go on.  State flapping is rate-limited for the same reason.
"""

from __future__ import annotations

import abc
import logging
import time
from collections import deque

from dmore_nova.xen.api import EventChannels, Mapping, Xen, XenError
from dmore_nova.xen.io.xenbus import XenbusState

LOG = logging.getLogger(__name__)

#: Longest integer string accepted from a frontend key (grant refs, ports, frame numbers).
MAX_INT_LEN = 24
#: Reconnects allowed per window before the device is closed as flapping.
FLAP_LIMIT, FLAP_WINDOW = 50, 10.0


class DeviceError(Exception):
    """The frontend gave us something no correct frontend gives: close this device."""


def parse_uint(raw: bytes | None, what: str, maximum: int = 0xFFFFFFFF) -> int:
    """A decimal unsigned integer from a frontend key, or :class:`DeviceError`."""
    if raw is None:
        raise DeviceError(f"{what} missing")
    if len(raw) > MAX_INT_LEN:
        raise DeviceError(f"{what} too long ({len(raw)} bytes)")
    text = raw.strip(b" \n\0")
    if not text.isdigit():
        raise DeviceError(f"{what} {raw[:MAX_INT_LEN]!r} is not an unsigned decimal")
    value = int(text)
    if value > maximum:
        raise DeviceError(f"{what} {value} above {maximum}")
    return value


class BackendDevice(abc.ABC):
    """One backend device instance: ``/local/domain/<be>/backend/<kind>/<fe_domid>/<devid>``.

    The owner (the agent) calls :meth:`check` whenever a watched node changed (backend dir or
    the frontend's ``state``) and :meth:`on_event` when our event-channel port fired.  Both are
    cheap and idempotent: the state machine re-reads what it needs and acts once per transition.
    """

    kind: str = ""
    #: Backend directory names a toolstack may use for this device, most usual first: libxl
    #: puts a ``vkb`` with ``backend-type=linux`` under ``backend/vinput/`` (its frontend is
    #: still ``device/vkbd/``).  Empty: ``(kind,)``.
    backend_kinds: tuple[str, ...] = ()
    #: Frontend keys that identify one connection (ring reference, event channel).
    connect_keys: tuple[str, ...] = ("event-channel",)

    def __init__(self, xen: Xen, evtchns: EventChannels, fe_domid: int, devid: int) -> None:
        self.xen = xen
        self.xs = xen.xenstore
        self.evtchns = evtchns
        self.fe_domid = fe_domid
        self.devid = devid
        self.be_kind = self._find_backend_kind(xen.domid, fe_domid, devid)
        self.be_path = f"/local/domain/{xen.domid}/backend/{self.be_kind}/{fe_domid}/{devid}"
        self.fe_path = ""
        self.state = XenbusState.Initialising
        self.fe_state = XenbusState.Unknown
        self.port: int | None = None
        self.page: Mapping | None = None
        self.fe_connected = False
        self.connected_values: tuple[bytes | None, ...] = ()
        self.closed_reason: str | None = None
        self._reconnects: deque[float] = deque(maxlen=FLAP_LIMIT)
        self.log = logging.LoggerAdapter(LOG, {})
        self.name = f"{self.kind}-{fe_domid}-{devid}"

    def _find_backend_kind(self, be_domid: int, fe_domid: int, devid: int) -> str:
        """The backend directory the toolstack created (our own, trusted: not the frontend's
        guest-writable ``backend`` key); the first kind if none exists yet."""
        kinds = self.backend_kinds or (self.kind,)
        for kind in kinds:
            if self.xs.directory(f"/local/domain/{be_domid}/backend/{kind}/{fe_domid}/{devid}"):
                return kind
        return kinds[0]

    # -- device-specific hooks -------------------------------------------------------------
    @abc.abstractmethod
    def write_features(self) -> None:
        """Write the backend's feature/geometry keys (before InitWait)."""

    @abc.abstractmethod
    def connect(self) -> None:
        """Map the frontend's page(s) and bind its event channel (DeviceError on bad values)."""

    def frontend_connected(self) -> None:
        """The frontend reached Connected: read its ``request-*`` keys."""

    def on_event(self) -> None:
        """Our event-channel port fired."""

    def disconnect(self) -> None:
        """Unmap and unbind; the device may connect again later."""
        if self.port is not None:
            try:
                self.evtchns.unbind(self.port)
            except XenError as exc:
                self.log.info("%s: unbind port %s: %s", self.name, self.port, exc)
            self.port = None
        if self.page is not None:
            self.page.unmap()
            self.page = None
        self.fe_connected = False

    # -- xenstore helpers ------------------------------------------------------------------
    def be_read(self, key: str) -> bytes | None:
        return self.xs.read(f"{self.be_path}/{key}")

    def be_write(self, key: str, value: str | int) -> None:
        self.xs.write(f"{self.be_path}/{key}", str(value))

    def fe_read(self, key: str) -> bytes | None:
        return self.xs.read(f"{self.fe_path}/{key}")

    def set_state(self, state: XenbusState) -> None:
        if state != self.state:
            self.log.info("%s: backend %s -> %s (frontend %s)", self.name, self.state.name,
                          state.name, self.fe_state.name)
        self.state = state
        self.be_write("state", state.to_xenstore())

    def bind(self) -> int:
        """Bind the frontend's ``event-channel``; the port is ours until :meth:`disconnect`."""
        remote = parse_uint(self.fe_read("event-channel"), "event-channel", 1 << 17)
        self.port = self.evtchns.bind_interdomain(self.fe_domid, remote)
        return self.port

    # -- the state machine -----------------------------------------------------------------
    def setup(self) -> bool:
        """Find and validate the frontend path the toolstack wrote (QEMU: ``xen_be_try_setup``);
        False while the toolstack has not plugged the device yet."""
        fe = self.be_read("frontend")
        expected = f"/local/domain/{self.fe_domid}/device/{self.kind}/{self.devid}"
        if fe is None:
            return False
        if fe.decode("ascii", "replace") != expected:
            raise DeviceError(f"frontend path {fe[:200]!r} is not {expected}")
        self.fe_path = expected
        return True

    def check(self) -> None:
        """Advance the state machine as far as the current xenstore contents allow."""
        if self.closed_reason is not None:
            return
        try:
            self._check()
        except DeviceError as exc:
            self.fail(str(exc))
        except XenError as exc:
            self.fail(f"hypervisor refused: {exc}")

    def _check(self) -> None:
        if not self.fe_path and not self.setup():
            return
        raw = self.fe_read("state")
        try:
            fe_state = XenbusState.Unknown if raw is None else XenbusState.parse(raw)
        except ValueError as exc:
            raise DeviceError(f"frontend state: {exc}") from None
        prev_fe_state = self.fe_state
        if fe_state != prev_fe_state:
            self.log.info("%s: frontend %s -> %s", self.name, prev_fe_state.name, fe_state.name)
        self.fe_state = fe_state

        if self.state in (XenbusState.Initialising, XenbusState.Unknown):
            if self.be_read("online") not in (b"1", None):
                return
            self.write_features()
            self.be_write("hotplug-status", "connected")
            self.set_state(XenbusState.InitWait)
        elif self.state is not XenbusState.Closed and self.be_read("online") == b"0":
            # The toolstack removes the device: libxl writes online=0 and state=Closing into
            # our dir and waits (10 s) for Closed before it deletes the nodes
            # (libxl__initiate_device_generic_remove; on timeout "unable to remove device").
            self.disconnect()
            self.set_state(XenbusState.Closed)
            return

        if fe_state in (XenbusState.Closing, XenbusState.Closed, XenbusState.Unknown):
            if self.state in (XenbusState.Connected, XenbusState.InitWait):
                if fe_state is XenbusState.Unknown and self.state is XenbusState.InitWait:
                    return  # frontend not there yet
                self.disconnect()
                self.set_state(XenbusState.Closing)
            if fe_state is XenbusState.Closed and self.state is XenbusState.Closing:
                self.set_state(XenbusState.Closed)
            return

        if (fe_state in (XenbusState.Initialising, XenbusState.Initialised)
                and self.state in (XenbusState.Closing, XenbusState.Closed)) or (
                self.state is XenbusState.Connected and self._frontend_restarted(
                    fe_state, prev_fe_state)):
            # The frontend starts over (resume after migration, or a driver reload).
            self._count_reconnect()
            self.disconnect()
            self.write_features()
            self.set_state(XenbusState.InitWait)

        if self.state is XenbusState.InitWait and fe_state in (XenbusState.Initialised,
                                                               XenbusState.Connected):
            t0 = time.perf_counter()
            self.connected_values = self.connect_values()
            self.connect()
            self.set_state(XenbusState.Connected)
            self.log.info("%s: connected (mapped + bound port %s) in %.3f ms", self.name,
                          self.port, (time.perf_counter() - t0) * 1e3)

        if (self.state is XenbusState.Connected and fe_state is XenbusState.Connected
                and not self.fe_connected):
            self.fe_connected = True
            self.frontend_connected()

    def _frontend_restarted(self, fe_state: XenbusState, prev_fe_state: XenbusState) -> bool:
        """While we are Connected, has the frontend started over?

        A frontend in Initialising/Initialised may just be waiting to see our Connected
        (nothing to do).  It has restarted if it came back from Connected, or if it published
        a different ring/event channel.  The values are checked in Connected too: a Linux
        frontend resuming in place sees us still Connected and goes Initialised -> Connected
        within a millisecond, so watch events coalesce and the intermediate state may never be
        seen (the event-channel *number* often stays the same: Xen hands out the lowest free
        port; the grant reference does not)."""
        if fe_state not in (XenbusState.Initialising, XenbusState.Initialised,
                            XenbusState.Connected):
            return False
        if fe_state is not XenbusState.Connected and prev_fe_state in (
                XenbusState.Connected, XenbusState.Closing, XenbusState.Closed):
            return True
        return self.connect_values() != self.connected_values

    def connect_values(self) -> tuple[bytes | None, ...]:
        """What the frontend published for the connection (compared to detect a restart)."""
        return tuple(self.fe_read(k) for k in self.connect_keys)

    def _count_reconnect(self) -> None:
        now = time.monotonic()
        self._reconnects.append(now)
        if len(self._reconnects) == FLAP_LIMIT and now - self._reconnects[0] < FLAP_WINDOW:
            raise DeviceError(f"frontend flapped {FLAP_LIMIT} times in {FLAP_WINDOW:.0f}s")

    def fail(self, reason: str) -> None:
        """Close this device because of what the frontend did; nothing else is affected."""
        self.log.warning("%s: closing device: %s", self.name, reason)
        self.closed_reason = reason
        self.disconnect()
        try:
            self.be_write("error", reason[:256])
            self.set_state(XenbusState.Closing)
        except XenError as exc:
            self.log.warning("%s: could not publish Closing: %s", self.name, exc)

    def shutdown(self) -> None:
        """Agent stopping or device unplugged: release everything, tell the frontend."""
        self.disconnect()
        try:
            self.set_state(XenbusState.Closed)
        except XenError:
            pass
