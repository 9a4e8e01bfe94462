"""The frontend half of xenbus, as Linux's ``drivers/xen/xenbus`` gives it to PV drivers.

A Linux frontend driver does not talk to xenstore on its own: the xenbus core reads the
device's ``backend``/``backend-id`` (``talk_to_otherend``), watches ``<backend>/state``
(``watch_otherend``) and calls the driver's ``otherend_changed`` on every event, switches
states (``xenbus_switch_state``: writes ``state`` only when it changes), reports fatal errors
(``xenbus_dev_fatal``: an ``error`` node, then Closing) and, after a migration, re-reads the
backend details, resets the local state to Initialising and calls the driver's ``resume``
(``xenbus_dev_resume``).  :class:`XenbusFrontend` is that core; ``kbdfront``/``fbfront`` are
the drivers.

The kernel services a driver needs (pages, grants, event channels, xenstore) are the
:class:`GuestKernel` protocol: :class:`~dmore_nova.xen.sim.kernel.SimKernel` in a sim guest,
an in-memory fake in unit tests.

Everything the backend writes is untrusted: the ``backend`` path and ``backend-id`` are checked
against the shape the toolstack writes, integer keys are parsed with explicit bounds, and a
malformed ``state`` reads as Unknown (as ``xenbus_read_driver_state`` does when ``%d`` fails).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Protocol

from dmore_nova.xen import api
from dmore_nova.xen.api import XenError
from dmore_nova.xen.io.xenbus import XenbusState

LOG = logging.getLogger(__name__)

#: Domain ids are below DOMID_FIRST_RESERVED (0x7FF0, xen.h).
DOMID_FIRST_RESERVED = 0x7FF0
#: Longest integer string we parse from a backend key.
MAX_INT_LEN = 20
#: Longest ``backend`` path accepted (xenstore's own limit is 3072).
MAX_PATH_LEN = 256

_BACKEND_RE = re.compile(
    r"^/local/domain/(\d{1,5})/backend/([a-z0-9_-]{1,16})/(\d{1,5})/(\d{1,9})$")


class GuestKernel(Protocol):
    """What a Linux guest kernel gives its PV frontends (see :mod:`dmore_nova.xen.sim.kernel`)."""

    domid: int

    @property
    def xenstore(self) -> api.XenStore: ...

    def alloc_page(self) -> int: ...

    def free_page(self, frame: int) -> None: ...

    def page(self, frame: int) -> memoryview: ...

    def write(self, frame: int, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def mark_dirty(self, frame: int) -> None: ...

    def grant_foreign_access(self, domid: int, frame: int, readonly: bool = False) -> int: ...

    def end_foreign_access(self, gref: int) -> bool: ...

    def process_deferred(self) -> int: ...

    def alloc_unbound(self, remote_domid: int) -> int: ...

    def notify(self, port: int) -> None: ...

    def unbind(self, port: int) -> None: ...

    def fileno(self) -> int: ...

    def take_events(self) -> list[int]: ...

    def close(self) -> None: ...


class PortTable:
    """Event-channel port -> handler: the IRQ table of one guest kernel.

    Linux binds each frontend's port to an IRQ handler (``bind_evtchn_to_irqhandler``); the
    guest's event loop calls :meth:`dispatch` with the ports ``SimKernel.take_events`` returned.
    A port with no handler (unbound during a resume while its event was in flight) is ignored.
    """

    def __init__(self) -> None:
        self._handlers: dict[int, Callable[[], None]] = {}

    def bind(self, port: int, handler: Callable[[], None]) -> None:
        self._handlers[port] = handler

    def unbind(self, port: int) -> None:
        self._handlers.pop(port, None)

    def dispatch(self, ports: list[int]) -> None:
        for port in ports:
            handler = self._handlers.get(port)
            if handler is None:
                LOG.debug("event on unbound port %d ignored", port)
                continue
            try:
                handler()
            except Exception:  # one broken driver must not take the guest down
                LOG.exception("handler of port %d failed", port)

    def __contains__(self, port: object) -> bool:
        return port in self._handlers


def parse_uint(raw: bytes | None, maximum: int) -> int | None:
    """A decimal unsigned integer from a backend key, or None if missing/malformed/too big
    (callers fall back to a default, as ``xenbus_read_unsigned`` does)."""
    if raw is None or len(raw) > MAX_INT_LEN:
        return None
    text = raw.strip(b" \n\0")
    if not text.isdigit():
        return None
    value = int(text)
    return value if value <= maximum else None


class FrontendError(Exception):
    """Something no correct backend/toolstack produces: the device goes to Closing."""


class XenbusFrontend:
    """The xenbus core for one frontend device at ``/local/domain/<domid>/device/<kind>/<devid>``.

    Subclasses implement :meth:`probe`, :meth:`otherend_changed`, :meth:`resume` and
    :meth:`remove` (the ``xenbus_driver`` hooks).  The owner routes watch events whose token is
    :attr:`watch_token` to :meth:`on_watch`.
    """

    kind: str = ""

    def __init__(self, kernel: GuestKernel, ports: PortTable, devid: int = 0) -> None:
        self.kernel = kernel
        self.ports = ports
        self.devid = devid
        self.nodename = f"/local/domain/{kernel.domid}/device/{self.kind}/{devid}"
        self.otherend = ""
        self.otherend_id = -1
        self.state = XenbusState.Unknown
        self.probed = False
        #: Probe only once the backend reached InitWait (see :meth:`ready_to_probe`).
        self.wait_backend = True
        self.watch_token = f"xenbus-otherend:{self.kind}/{devid}"
        self._watched: str | None = None
        self.log = LOG.getChild(self.kind)

    # -- xenstore helpers ---------------------------------------------------------------------
    @property
    def xs(self) -> api.XenStore:
        return self.kernel.xenstore

    def read_otherend(self, key: str) -> bytes | None:
        return self.xs.read(f"{self.otherend}/{key}")

    def read_otherend_uint(self, key: str, default: int, maximum: int = 0x7FFFFFFF) -> int:
        """``xenbus_read_unsigned``: the value, or ``default`` if missing or not a number."""
        value = parse_uint(self.read_otherend(key), maximum)
        return default if value is None else value

    def write_node(self, key: str, value: str | int) -> None:
        self.xs.write(f"{self.nodename}/{key}", str(value))

    def read_otherend_state(self) -> XenbusState:
        """``xenbus_read_driver_state``: Unknown when missing or malformed."""
        raw = self.read_otherend("state") if self.otherend else None
        if raw is None:
            return XenbusState.Unknown
        try:
            return XenbusState.parse(raw)
        except ValueError as exc:
            self.log.warning("%s: backend state: %s", self.nodename, exc)
            return XenbusState.Unknown

    # -- the xenbus core ----------------------------------------------------------------------
    def talk_to_otherend(self) -> None:
        """Drop the old watch, read and validate ``backend`` and ``backend-id``
        (``free_otherend_watch`` + ``xenbus_read_otherend_details``)."""
        self.unwatch_otherend()
        raw_path = self.xs.read(f"{self.nodename}/backend")
        raw_id = self.xs.read(f"{self.nodename}/backend-id")
        if raw_path is None or raw_id is None:
            raise FrontendError(f"{self.nodename}: missing backend or backend-id")
        if len(raw_path) > MAX_PATH_LEN:
            raise FrontendError(f"{self.nodename}: backend path too long")
        path = raw_path.strip(b"\0").decode("ascii", "replace")
        be_id = parse_uint(raw_id, DOMID_FIRST_RESERVED - 1)
        m = _BACKEND_RE.match(path)
        if be_id is None or m is None:
            raise FrontendError(f"{self.nodename}: bad backend {path[:80]!r} / id {raw_id[:20]!r}")
        if (int(m.group(1)) != be_id or int(m.group(3)) != self.kernel.domid
                or int(m.group(4)) != self.devid):
            raise FrontendError(f"{self.nodename}: backend {path} does not match id {be_id}")
        self.otherend, self.otherend_id = path, be_id

    def watch_otherend(self) -> None:
        """Watch ``<backend>/state``; Xen fires a new watch once, so the driver sees the
        current backend state right away."""
        target = f"{self.otherend}/state"
        self.unwatch_otherend()
        self.xs.watch(target, self.watch_token)
        self._watched = target

    def unwatch_otherend(self) -> None:
        if self._watched is not None:
            try:
                self.xs.unwatch(self._watched, self.watch_token)
            except XenError as exc:
                self.log.debug("unwatch %s: %s", self._watched, exc)
            self._watched = None

    def switch_state(self, state: XenbusState) -> None:
        """``xenbus_switch_state``: write ``state`` only on a change."""
        if state == self.state:
            return
        self.write_node("state", state.to_xenstore())
        self.log.info("%s: frontend %s -> %s", self.nodename, self.state.name, state.name)
        self.state = state

    def dev_fatal(self, err: str) -> None:
        """``xenbus_dev_fatal``: record the error where the toolstack looks, then Closing."""
        self.log.error("%s: %s", self.nodename, err)
        rel = self.nodename.split(f"/local/domain/{self.kernel.domid}/", 1)[-1]
        try:
            self.xs.write(f"/local/domain/{self.kernel.domid}/error/{rel}/error", err[:200])
        except XenError as exc:
            self.log.warning("%s: cannot write error node: %s", self.nodename, exc)
        try:
            self.switch_state(XenbusState.Closing)
        except XenError as exc:
            self.log.warning("%s: cannot switch to Closing: %s", self.nodename, exc)

    def frontend_closed(self) -> None:
        """``xenbus_frontend_closed``."""
        self.switch_state(XenbusState.Closed)

    def attach(self) -> None:
        """Find the backend and watch it; :meth:`on_watch` probes once the backend is ready."""
        try:
            self.talk_to_otherend()
            raw = self.xs.read(f"{self.nodename}/state")
            try:
                self.state = (XenbusState.Unknown if raw is None else XenbusState.parse(raw))
            except ValueError:
                self.state = XenbusState.Unknown
            self.watch_otherend()
        except FrontendError as exc:
            self.dev_fatal(str(exc))

    def on_watch(self, path: str) -> None:
        """A watch event with our token (``xenbus_otherend_changed``)."""
        if not self.otherend or not path.startswith(self.otherend):
            self.log.debug("ignoring watch at %s", path)  # stale: fired for old details
            return
        be_state = self.read_otherend_state()
        try:
            if not self.probed:
                if not self.ready_to_probe(be_state):
                    return
                self.probed = True
                self.probe()
            self.otherend_changed(be_state)
        except FrontendError as exc:
            self.dev_fatal(str(exc))
        except XenError as exc:
            self.dev_fatal(f"hypervisor refused: {exc}")

    def ready_to_probe(self, be_state: XenbusState) -> bool:
        """Linux probes without waiting for the backend; the sim waits for InitWait (or
        later) so the backend's feature keys are read, as they are on a real host where the
        toolstack starts the backend before it unpauses the guest."""
        if not self.wait_backend:
            return True
        return be_state in (XenbusState.InitWait, XenbusState.Initialised,
                            XenbusState.Connected)

    def dev_resume(self, kernel: GuestKernel | None = None) -> None:
        """``xenbus_dev_resume``: re-read the backend details (they may have changed), reset
        the local state to Initialising (not written: the driver's resume publishes
        Initialised), call the driver's resume, re-arm the watch.

        ``kernel``: the guest now runs on another (sim) host, as another domid.  Resources of
        the old kernel (grants, ports, pages, the watch) died with the old domain, so the
        driver must not release them through the new one: ``resume(moved=True)``.
        """
        moved = kernel is not None and kernel is not self.kernel
        if moved:
            assert kernel is not None
            self.kernel = kernel
            self.nodename = f"/local/domain/{kernel.domid}/device/{self.kind}/{self.devid}"
            self._watched = None  # it was registered on the old domain's connection
        try:
            self.talk_to_otherend()
            self.state = XenbusState.Initialising
            if self.probed:
                self.resume(moved=moved)
            self.watch_otherend()
        except FrontendError as exc:
            self.dev_fatal(str(exc))
        except XenError as exc:
            self.dev_fatal(f"resume: {exc}")

    def detach(self) -> None:
        """The device node went away (or the guest shuts down): ``remove`` and unwatch."""
        self.unwatch_otherend()
        if self.probed:
            self.remove()
            self.probed = False

    # -- driver hooks ---------------------------------------------------------------------------
    def probe(self) -> None:
        raise NotImplementedError

    def otherend_changed(self, backend_state: XenbusState) -> None:
        raise NotImplementedError

    def resume(self, moved: bool = False) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        raise NotImplementedError
