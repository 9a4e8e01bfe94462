"""The sim guest: a process that *is* a domU with Linux-like PV frontends and a text console.

* :mod:`.xenbus` -- the frontend xenbus core (otherend details, state switching, resume);
* :mod:`.kbdfront` -- ``xen-kbdfront`` (records every input event it receives);
* :mod:`.fbfront` -- ``xen-fbfront`` (framebuffer in guest frames listed by ``pd[]``);
* :mod:`.console` -- a shell on a pty, drawn into the framebuffer with :mod:`.font`;
* ``python -m dmore_nova.xen.sim.guest`` (:mod:`.__main__`) -- the guest program;
* :mod:`.control` -- client of the program's control socket; it is a
  :class:`~dmore_nova.xen.sim.migration.MigratingGuest`, so ``LiveMigration`` can move the
  guest process between sim hosts.

:class:`Guest` ties them together for one :class:`~dmore_nova.xen.sim.kernel.SimKernel`: it
finds ``/local/domain/<N>/device/{vkbd,vfb}/0`` (and notices them appear or go, watching
``device/``), attaches the frontends (they probe once their backend reached InitWait), routes
event-channel ports and xenstore watch events to them, and starts the console once the
framebuffer exists.  It does no waiting itself: :meth:`Guest.poll` (a ``select`` step, for
tests and simple loops) and :func:`serve` (asyncio, for the guest program) drive it.

**Resume** (the migration hook): :meth:`Guest.resume` makes every frontend do what Linux does
after a migration -- re-read ``backend``/``backend-id`` (the backend may now live elsewhere),
then the driver's resume: vkbd ends its grant, zeroes its page and publishes a new
``page-gref``/``event-channel``; vfb re-lays its memory out on new frames and publishes a new
``page-ref``/``event-channel``; both go back to Initialised.  ``Guest.resume(new_kernel)``
does the same after the guest moved to another sim host (another run dir and domid): the old
domain's grants/ports/watches are gone with it and are not touched.  The guest program exposes
this as ``SIGUSR1`` (resume in place) and as the ``resume`` command of its control socket
(optionally with ``host_dir``/``domid``: then the kernel is ``SimKernel.resume_on``, which
carries the page allocator over with the memory the toolstack copied).  For a live migration
the control socket also has ``enable_dirty_log``, ``take_dirty_log``, ``suspend`` (no event,
watch or pty handling -- so no memory writes -- until resumed) and ``resume_cancelled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import signal
from collections.abc import Callable
from typing import Any

from dmore_nova.xen.api import XenError
from dmore_nova.xen.io.xenbus import XenbusState
from dmore_nova.xen.sim.guest.console import Console
from dmore_nova.xen.sim.guest.fbfront import DEFAULT_VIDEO_MB, FbFront
from dmore_nova.xen.sim.guest.kbdfront import KbdFront
from dmore_nova.xen.sim.guest.xenbus import GuestKernel, PortTable, XenbusFrontend

__all__ = ["Guest", "serve", "ControlError", "CONTROL_MAX_LINE", "CONTROL_MAX_CLIENTS"]

LOG = logging.getLogger(__name__)

DEVICES_TOKEN = "guest-devices"
#: Only device 0 of each kind is driven (one keyboard, one screen).
DEVID = 0
#: Longest control request line, and control connections served at once.
CONTROL_MAX_LINE = 4096
CONTROL_MAX_CLIENTS = 8
#: Batches of watch events handled per readiness callback (the rest wait for the next one).
MAX_WATCH_ROUNDS = 16


class ControlError(Exception):
    """A control request the guest refuses (bad JSON, unknown op, bad arguments)."""


class Guest:
    """The sim guest's devices and console for one kernel (see the module docstring)."""

    def __init__(self, kernel: GuestKernel, *, key_log: str | os.PathLike[str] | None = None,
                 video_mb: int = DEFAULT_VIDEO_MB, console: bool = True,
                 shell: list[str] | None = None, env: dict[str, str] | None = None,
                 wait_backend: bool = True) -> None:
        self.kernel = kernel
        self.ports = PortTable()
        self.key_log = key_log
        self.video_mb = video_mb
        self.want_console = console
        self.shell = shell
        self.env = env
        self.wait_backend = wait_backend
        self.kbd: KbdFront | None = None
        self.fb: FbFront | None = None
        self.console: Console | None = None
        #: Called after the console started or its shell was replaced (the asyncio runner
        #: re-registers the pty fd).
        self.on_console_change: Callable[[], None] | None = None
        self.resumes = 0
        self._warned: set[str] = set()
        self._devdir = f"/local/domain/{kernel.domid}/device"
        self.kernel.xenstore.watch(self._devdir, DEVICES_TOKEN)

    @property
    def fronts(self) -> list[XenbusFrontend]:
        return [f for f in (self.kbd, self.fb) if f is not None]

    # -- devices ------------------------------------------------------------------------------
    def discover(self) -> None:
        """Attach devices that appeared, detach those whose node went away."""
        xs = self.kernel.xenstore
        for kind in ("vkbd", "vfb"):
            devids = xs.directory(f"{self._devdir}/{kind}")
            for d in devids:
                if d != str(DEVID) and f"{kind}/{d}" not in self._warned:
                    self._warned.add(f"{kind}/{d}")
                    LOG.warning("%s/%s/%s: only device %d is driven", self._devdir, kind, d, DEVID)
            front: XenbusFrontend | None = self.kbd if kind == "vkbd" else self.fb
            present = str(DEVID) in devids and xs.read(
                f"{self._devdir}/{kind}/{DEVID}/backend") is not None
            if front is not None and not present:
                LOG.info("%s: device node removed", front.nodename)
                self._drop(kind)
            elif front is None and present:
                self._add(kind)

    def _add(self, kind: str) -> None:
        front: XenbusFrontend
        if kind == "vkbd":
            self.kbd = front = KbdFront(self.kernel, self.ports, DEVID, key_log=self.key_log)
            if self.console is not None:
                self.kbd.listeners.append(self.console.on_key)
        else:
            self.fb = front = FbFront(self.kernel, self.ports, DEVID, video_mb=self.video_mb)
        front.wait_backend = self.wait_backend
        front.attach()

    def _drop(self, kind: str) -> None:
        front = self.kbd if kind == "vkbd" else self.fb
        if front is None:
            return
        try:
            front.detach()
        except XenError as exc:
            LOG.info("%s: detach: %s", front.nodename, exc)
        if kind == "vkbd":
            self.kbd = None
        else:
            self.fb = None
            if self.console is not None:
                self.console.close()
                self.console = None
                self._console_changed()

    def _maybe_start_console(self) -> None:
        if (self.console is None and self.want_console and self.fb is not None
                and self.fb.probed and self.fb.fb_frames):
            self.console = Console(self.fb, shell=self.shell, env=self.env)
            self.fb.listeners.append(self.console.redraw_all)
            self.console.start()
            if self.kbd is not None:
                self.kbd.listeners.append(self.console.on_key)
            self._console_changed()

    def _console_changed(self) -> None:
        if self.on_console_change is not None:
            self.on_console_change()

    # -- event sources ------------------------------------------------------------------------
    def handle_watches(self) -> None:
        """The xenstore watch fd is readable.  Events queued while handling (a new watch's
        first firing) are handled too, up to :data:`MAX_WATCH_ROUNDS` batches."""
        for _ in range(MAX_WATCH_ROUNDS):
            events = self.kernel.xenstore.read_watch_events()
            if not events:
                break
            for path, token in events:
                if token == DEVICES_TOKEN:
                    self._device_event(path)
                    continue
                for front in self.fronts:
                    if token == front.watch_token:
                        front.on_watch(path)
        self._maybe_start_console()

    def _device_event(self, path: str) -> None:
        rel = path[len(self._devdir):].strip("/")
        parts = rel.split("/") if rel else []
        known = {"vkbd": self.kbd, "vfb": self.fb}
        # Our own key writes (depth 3 under a known device) are not news.
        if len(parts) >= 3 and known.get(parts[0]) is not None and parts[1] == str(DEVID):
            return
        self.discover()

    def handle_events(self) -> None:
        """The event-channel fd is readable."""
        self.ports.dispatch(self.kernel.take_events())

    def handle_console(self) -> bool:
        """The pty is readable; False if the shell went away (and was not restarted)."""
        if self.console is None:
            return False
        if self.console.on_readable():
            return True
        if self.console.respawn():
            self._console_changed()
            return True
        return False

    def poll(self, timeout: float) -> bool:
        """One ``select`` step over every source; True if something was handled."""
        fds: dict[int, Callable[[], Any]] = {
            self.kernel.fileno(): self.handle_events,
            self.kernel.xenstore.watch_fileno(): self.handle_watches,
        }
        wfds = []
        if self.console is not None and self.console.master is not None:
            fds[self.console.master] = self.handle_console
            if self.console.wants_write():
                wfds.append(self.console.master)
        r, w, _ = select.select(list(fds), wfds, [], timeout)
        for fd in r:
            fds[fd]()
        if w and self.console is not None:
            self.console.on_writable()
        return bool(r or w)

    # -- migration hook -----------------------------------------------------------------------
    def resume(self, kernel: GuestKernel | None = None) -> None:
        """Resume every frontend as Linux does after a migration (see the module docstring).
        ``kernel``: the guest now is this domain (another host/domid)."""
        self.resumes += 1
        moved = kernel is not None and kernel is not self.kernel
        if moved:
            assert kernel is not None
            old = self.kernel
            self.kernel = kernel
            self.ports = PortTable()
            self._devdir = f"/local/domain/{kernel.domid}/device"
            for front in self.fronts:
                front.ports = self.ports
            kernel.xenstore.watch(self._devdir, DEVICES_TOKEN)
            with contextlib.suppress(XenError):
                old.close()
        for front in self.fronts:
            front.dev_resume(kernel if moved else None)
        LOG.info("resumed %d device(s)%s", len(self.fronts),
                 f" as dom{self.kernel.domid}" if moved else "")

    # -- introspection / teardown -------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {"domid": self.kernel.domid, "resumes": self.resumes,
                "vkbd": self.kbd.status() if self.kbd else None,
                "vfb": self.fb.status() if self.fb else None,
                "console": None if self.console is None else {
                    "cols": self.console.cols, "rows": self.console.rows,
                    "pid": self.console.proc.pid if self.console.proc else None}}

    def close(self, *, close_kernel: bool = True) -> None:
        """Shut down: stop the shell, disconnect and close the devices (state Closed)."""
        if self.console is not None:
            self.console.close()
            self.console = None
        for front in self.fronts:
            try:
                front.detach()
                front.switch_state(XenbusState.Closed)
            except XenError as exc:
                LOG.info("%s: close: %s", front.nodename, exc)
        self.kbd = self.fb = None
        with contextlib.suppress(XenError):
            self.kernel.xenstore.unwatch(self._devdir, DEVICES_TOKEN)
        if close_kernel:
            self.kernel.close()


# --- the asyncio runner --------------------------------------------------------------------------
async def serve(guest: Guest, *, control_path: str | os.PathLike[str] | None = None,
                kernel_factory: Callable[[str, int], GuestKernel] | None = None,
                stop: asyncio.Event | None = None,
                on_ready: Callable[[], None] | None = None) -> None:
    """Run ``guest`` on the current loop until ``stop`` is set (or SIGTERM/SIGINT).

    ``SIGUSR1`` resumes the devices in place (ignored while suspended).  ``control_path``: a
    unix socket taking one JSON request per line (``status``, ``screen``, ``keys``,
    ``enable_dirty_log``, ``take_dirty_log``, ``suspend``, ``resume`` [``host_dir``,
    ``domid``], ``resume_cancelled``, ``stop``; see :mod:`.control`) and answering one JSON
    line each.  ``kernel_factory(host_dir, domid)`` builds the
    kernel for ``resume`` to another host (default: :class:`SimKernel`).  ``on_ready`` is
    called once everything is wired (and the control socket listens).
    """
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    wired: list[int] = []
    console_fd: list[int] = []

    def wire() -> None:
        for fd in wired:
            loop.remove_reader(fd)
        wired.clear()
        def events() -> None:
            guest.handle_events()
            update_writer()  # keys may have queued input for a shell that is not reading

        for fd, cb in ((guest.kernel.fileno(), events),
                       (guest.kernel.xenstore.watch_fileno(), guest.handle_watches)):
            loop.add_reader(fd, _guarded(_or_stop(cb)))
            wired.append(fd)
        wire_console()

    def _or_stop(cb: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                cb()
            except XenError as exc:
                # The event channel or xenstore connection is gone: the domain was destroyed
                # or the host stopped.  A guest without its hardware stops, rather than spin on
                # a readable dead fd.
                LOG.error("guest: lost dom%d's hypervisor connection: %s", guest.kernel.domid,
                          exc)
                for fd in wired:
                    loop.remove_reader(fd)
                wired.clear()
                stop.set()
        run.__name__ = getattr(cb, "__name__", "callback")
        return run

    def wire_console() -> None:
        if suspended[0]:
            return
        for fd in console_fd:
            loop.remove_reader(fd)
            loop.remove_writer(fd)
        console_fd.clear()
        c = guest.console
        if c is not None and c.master is not None:
            fd = c.master

            def readable() -> None:
                if not guest.handle_console():
                    loop.remove_reader(fd)
                    loop.remove_writer(fd)
                elif guest.console is not None and guest.console.master == fd:
                    update_writer()

            loop.add_reader(fd, _guarded(readable))
            console_fd.append(fd)
            update_writer()

    def update_writer() -> None:
        c = guest.console
        if c is None or c.master is None:
            return
        fd = c.master
        if c.wants_write():
            def writable() -> None:
                c.on_writable()
                if not c.wants_write():
                    loop.remove_writer(fd)
            loop.add_writer(fd, writable)
        else:
            loop.remove_writer(fd)

    guest.on_console_change = lambda: loop.call_soon(wire_console)

    suspended = [False]

    def unwire_all() -> None:
        for fd in wired + console_fd:
            loop.remove_reader(fd)
            loop.remove_writer(fd)
        wired.clear()
        console_fd.clear()

    def do_suspend() -> None:
        """Quiescent: no event, watch or pty handling, hence no memory writes and no
        hypercalls, until resumed (the sim's stand-in for a PV kernel's suspend)."""
        unwire_all()
        suspended[0] = True

    def do_resume_cancelled() -> None:
        if suspended[0]:
            suspended[0] = False
            wire()

    def do_resume(host_dir: str | None = None, domid: int | None = None) -> None:
        kernel = None
        if host_dir is not None or domid is not None:
            if host_dir is None or domid is None:
                raise ControlError("resume to another host needs host_dir and domid")
            if kernel_factory is not None:
                kernel = kernel_factory(host_dir, domid)
            elif hasattr(guest.kernel, "resume_on"):
                # The same guest on the destination: its page allocator comes along with the
                # memory the toolstack copied.
                kernel = guest.kernel.resume_on(host_dir, domid)
            else:
                from dmore_nova.xen.sim.kernel import SimKernel
                kernel = SimKernel(host_dir, domid)
        unwire_all()
        try:
            guest.resume(kernel)
        finally:
            suspended[0] = False
            wire()

    def dirty_log(name: str) -> Callable[[], Any]:
        fn = getattr(guest.kernel, name, None)
        if fn is None:
            raise ControlError(f"this kernel has no {name}")
        return fn

    def command(req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "status":
            return {**guest.status(), "suspended": suspended[0]}
        if op == "screen":
            return {"lines": guest.console.text() if guest.console else None}
        if op == "keys":
            return {"keys": guest.kbd.keys() if guest.kbd else []}
        if op == "enable_dirty_log":
            dirty_log("enable_dirty_log")()
            return {}
        if op == "take_dirty_log":
            return {"frames": list(dirty_log("take_dirty_log")())}
        if op == "suspend":
            do_suspend()
            return {}
        if op == "resume_cancelled":
            do_resume_cancelled()
            return {}
        if op == "resume":
            host_dir, domid = req.get("host_dir"), req.get("domid")
            if host_dir is not None and not isinstance(host_dir, str):
                raise ControlError("host_dir must be a string")
            if domid is not None and (not isinstance(domid, int) or isinstance(domid, bool)
                                      or not 0 < domid < 0x7FF0):
                raise ControlError("domid must be a domain id")
            do_resume(host_dir, domid)
            return guest.status()
        if op == "resize":  # what ``fbset -xres W -yres H`` does through xen-fbfront
            w, h = req.get("width"), req.get("height")
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (w, h)):
                raise ControlError("width and height must be integers")
            if guest.fb is None or not guest.fb.resize(w, h):
                raise ControlError(f"mode {w}x{h} refused")
            return guest.status()
        if op == "stop":
            stop.set()
            return {}
        raise ControlError(f"unknown op {op!r}")

    clients: set[asyncio.Task[None]] = set()

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if len(clients) > CONTROL_MAX_CLIENTS:
                writer.write(b'{"ok":false,"error":"too many control clients"}\n')
                return
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    return
                except asyncio.LimitOverrunError:
                    writer.write(b'{"ok":false,"error":"request line too long"}\n')
                    return
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise ControlError("request must be a JSON object")
                    reply = {"ok": True, **command(req)}
                except (ValueError, ControlError, XenError) as exc:
                    reply = {"ok": False, "error": str(exc)}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(client(reader, writer))
        clients.add(task)
        task.add_done_callback(clients.discard)

    server = None
    if control_path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control_path)
        server = await asyncio.start_unix_server(on_client, path=str(control_path),
                                                 limit=CONTROL_MAX_LINE)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, _guarded(
        lambda: None if suspended[0] else do_resume()))
    wire()
    # The device watch fired once on registration; handle what is there already.
    guest.handle_watches()
    if on_ready is not None:
        on_ready()
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            loop.remove_signal_handler(sig)
        unwire_all()
        if server is not None:
            server.close()
            await server.wait_closed()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(control_path)
        for task in list(clients):
            task.cancel()


def _guarded(fn: Callable[[], Any]) -> Callable[[], None]:
    """A loop callback that logs instead of letting an exception kill the loop's callback."""
    def run() -> None:
        try:
            fn()
        except Exception:
            LOG.exception("guest: %s failed", getattr(fn, "__name__", fn))
    return run
