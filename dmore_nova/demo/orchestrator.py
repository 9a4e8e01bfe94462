"""The demo orchestrator: two sim hosts, a guest with a shell console, its RM VM, the proxy.

:class:`Demo` plays the toolstack, Nova and the RM VM's host all at once, on one asyncio loop:

* two sim hosts (:class:`~dmore_nova.xen.sim.supervisor.Supervisor`), each its own process;
* the guest: a domain on the first host with a vkbd and a vfb, *run* by the sim guest program
  (``python -m dmore_nova.xen.sim.guest``: Linux-like frontends, a real shell on its
  framebuffer console), its own process, driven through its control socket;
* its RM VM: by default (``rm="vm"``) a domain of its own that is the backend of the guest's
  devices and the guest's *target* (``XEN_DOMCTL_set_target``: it may map the guest's pages),
  migrated together with the guest -- D-MORE's Domain M.  Its "process" is the RM agent
  (:class:`~dmore_nova.rm_vm.agent.RMAgent`), which runs on this loop: as a migrating VM keeps
  its TCP connections, the agent keeps its RFB server and viewer sockets while it re-homes to
  the destination host.  ``rm="dom0"`` serves the devices from dom0 of whichever host the
  guest is on instead (the agent re-homes to the destination's dom0);
* the console proxy (``python -m dmore_nova.console``, its own process) with a token file
  that maps the console's token to the agent's RFB endpoint.

Why the RM VM variant is the default: co-migration supports both, but only the RM VM keeps
the paper's shape (a small privileged domain next to the guest, not dom0, serving its
console) and exercises every step -- the RM VM's own migration, its new domid becoming the
backend of the guest's re-created devices and the guest's target on the destination.

:meth:`Demo.migrate` runs one co-migration (:class:`~dmore_nova.rm_vm.comigration.CoMigration`)
and records what a user cares about: where things are now, guest downtime, console blackout,
re-map/re-bind time, keys held and lost, viewers kept.  If the agent had to be restarted at
the destination, the proxy is told (token file rewritten if the endpoint moved, then
``POST /reattach``), so browsers re-attach without noticing.  :meth:`Demo.stop` takes
everything down in order and leaves no process, socket or memory file behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import secrets
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dmore_nova
from dmore_nova.demo import runtime
from dmore_nova.demo.runtime import DemoError, ProcRecord
from dmore_nova.rm_vm.agent import RMAgent
from dmore_nova.rm_vm.comigration import STEPS, CoMigration, CoMigrationReport, State
from dmore_nova.rm_vm.rfb.display import KeyInput, PointerInput
from dmore_nova.xen.api import XenError
from dmore_nova.xen.io import kbdif as K
from dmore_nova.xen.sim import devices
from dmore_nova.xen.sim.guest.control import GuestControl
from dmore_nova.xen.sim.migration import SimMigrationPlatform
from dmore_nova.xen.sim.supervisor import HostHandle, Supervisor

LOG = logging.getLogger(__name__)

REPO_ROOT = Path(dmore_nova.__file__).resolve().parent.parent
#: Where noVNC is looked for when no root is configured (the checkout's npm install first).
NOVNC_CANDIDATES = (REPO_ROOT / "tests" / "js" / "node_modules" / "@novnc" / "novnc",
                    Path("/usr/share/novnc"))
#: Pages of the RM VM's own domain (its state lives in the agent process, not in its pages).
RM_VM_PAGES = 256
#: The console mode the RM agent offers the guest.
SCREEN_WIDTH, SCREEN_HEIGHT = 800, 600
#: Seconds for: the guest program to report ready; its devices to connect; the proxy to listen.
GUEST_READY_TIMEOUT = 30.0
CONNECT_TIMEOUT = 15.0
PROXY_READY_TIMEOUT = 30.0
#: Seconds one co-migration may take before the control API gives up waiting for it.
MIGRATION_TIMEOUT = 120.0
#: After a migration, how long to wait for every viewer's first update (the blackout's end).
FIRST_UPDATE_WAIT = 1.0
#: Host and guest names: what the sim accepts for hosts (and fits file names and URLs).
_HOST_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
#: Migrations remembered for the status.
HISTORY = 50
#: Longest key log tail read at once while counting (the log is append-only).
KEY_LOG_CHUNK = 1 << 20
#: How long a stopping demo waits for a migration in progress.
STOP_MIGRATION_WAIT = 30.0


@dataclass
class DemoOptions:
    """What ``dmore-nova demo`` starts (see :mod:`dmore_nova.conf.demo` for each option)."""

    listen: str = "127.0.0.1"
    port: int = 6080
    proxy_port: int = 6081
    rfb_port: int = 5900
    run_dir: Path = runtime.DEFAULT_RUN_DIR
    shm_dir: Path = runtime.DEFAULT_SHM_DIR
    hosts: tuple[str, ...] = ("a", "b")
    guest_name: str = "guest"
    guest_memory_mb: int = 64
    rm: str = "vm"
    shell: str | None = None
    novnc_root: str | None = None
    log_level: str = "INFO"

    def check(self) -> None:
        if len(self.hosts) < 2 or len(set(self.hosts)) != len(self.hosts):
            raise DemoError("the demo needs at least two sim hosts with distinct names")
        for name in self.hosts:
            if not _HOST_NAME_RE.fullmatch(name):
                raise DemoError(f"bad host name {name!r} (letters, digits, _ . -; at most 32)")
        if self.rm not in ("vm", "dom0"):
            raise DemoError(f"rm must be 'vm' or 'dom0', not {self.rm!r}")
        if not 8 <= self.guest_memory_mb <= 4096:
            raise DemoError("guest memory must be 8..4096 MiB")
        for name, port in (("port", self.port), ("proxy_port", self.proxy_port),
                           ("rfb_port", self.rfb_port)):
            if not 0 <= port < 65536:
                raise DemoError(f"{name} {port} out of range")
        if self.port and self.port == self.proxy_port:
            raise DemoError("the page and the console proxy need different ports")
        if not _HOST_NAME_RE.fullmatch(self.guest_name):
            raise DemoError(f"bad guest name {self.guest_name!r} (letters, digits, _ . -; at "
                            "most 32)")


def parse_fail_at(text: str) -> tuple[State, str]:
    """``"remap-rebind"`` or ``"remap-rebind:end"`` -> (State.REMAP_REBIND, "end");
    ValueError naming the choices otherwise."""
    name, _, when = text.partition(":")
    when = when or "start"
    names = [s.value for s in STEPS]
    if name not in names or when not in ("start", "end"):
        raise ValueError(f"bad failure point {text!r}: one of {', '.join(names)}, optionally "
                         "followed by :start or :end")
    return State(name), when


def find_novnc(configured: str | None) -> Path:
    """The noVNC directory (holding ``core/rfb.js``), or DemoError saying how to get one."""
    candidates = [Path(configured)] if configured else list(NOVNC_CANDIDATES)
    for root in candidates:
        if (root / "core" / "rfb.js").is_file():
            return root.resolve()
    raise DemoError("noVNC not found (looked for core/rfb.js in "
                    + ", ".join(str(c) for c in candidates)
                    + "): run scripts/install.sh, or pass --novnc-root")


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)


class InputCounter:
    """The RFB server's input sink, in front of the agent: counts key events accepted from
    viewers (what was *typed*), so the status can compare it with what the guest received.
    Re-pointed at a restarted agent, so the count spans the whole demo."""

    def __init__(self, agent: RMAgent) -> None:
        self.agent = agent
        self.keys = 0

    def key(self, event: KeyInput) -> None:
        self.keys += 1
        self.agent.key(event)

    def pointer(self, event: PointerInput) -> None:
        self.agent.pointer(event)

    def flush_input(self) -> None:
        self.agent.flush_input()


class KeyLogCounter:
    """Counts the KEY events in the guest program's key log (one JSON line per event the
    guest's kbdfront took off its ring), reading only what was appended since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.keys = 0
        self._partial = b""

    def count(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                while True:
                    chunk = f.read(KEY_LOG_CHUNK)
                    if not chunk:
                        break
                    self.offset += len(chunk)
                    data = self._partial + chunk
                    lines = data.split(b"\n")
                    self._partial = lines.pop()
                    self.keys += sum(1 for line in lines if b'"type":"key"' in line)
        except FileNotFoundError:
            pass
        return self.keys


@dataclass
class DemoGuest:
    """One guest, its RM side and its console, wherever they are now."""

    name: str
    host: str
    domid: int
    rm_domid: int | None
    agent: RMAgent
    counter: InputCounter
    control_path: Path
    key_log: Path
    token: str
    proc: subprocess.Popen[bytes]
    proc_record: ProcRecord
    rfb: tuple[str, int]
    keys_at_guest: KeyLogCounter
    migrating: bool = False
    migrations: int = 0
    last_migration: dict[str, Any] | None = None
    rm_failed: str | None = None


@dataclass
class _Snapshot:
    """Agent counters before a migration (to report what changed)."""

    agent: RMAgent
    held_dropped: int
    vkbd_dropped: int
    viewers: list[Any] = field(default_factory=list)


class Demo:
    """See the module docstring.  Every coroutine runs on the loop that called :meth:`start`."""

    def __init__(self, options: DemoOptions) -> None:
        options.check()
        self.options = options
        self.run_dir = Path(options.run_dir)
        self.shm_dir = Path(options.shm_dir)
        self.log_dir = self.run_dir / runtime.LOG_SUBDIR
        self.sup = Supervisor(self.run_dir / runtime.SIM_SUBDIR, self.shm_dir)
        self.hosts: dict[str, HostHandle] = {}
        self.guests: dict[str, DemoGuest] = {}
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self.processes: list[ProcRecord] = []
        self.proxy: subprocess.Popen[bytes] | None = None
        self.proxy_record: ProcRecord | None = None
        self.novnc_root: Path | None = None
        self.started_at = _now_iso()
        self.ready = False
        self.stopping = False
        self.api: Any = None  # the HTTP control API (dmore_nova.demo.api.ControlServer)
        self._migration_lock = asyncio.Lock()
        self._log_files: list[Any] = []
        #: False until no other demo runs from the run dir: a refused start must not touch
        #: the files of the demo that runs there.
        self._owns_run_dir = False

    # -- addresses ----------------------------------------------------------------------------
    @property
    def host_address(self) -> str:
        """How clients reach our listeners (a wildcard listen address is reached locally)."""
        listen = self.options.listen
        return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen, listen)

    def _url(self, port: int, path: str = "/", scheme: str = "http") -> str:
        host = self.host_address
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{port}{path}"

    @property
    def page_url(self) -> str:
        port = self.api.port if self.api is not None else self.options.port
        return self._url(port)

    @property
    def api_url(self) -> str:
        return self.page_url + "api/"

    @property
    def proxy_url(self) -> str:
        return self._url(self.options.proxy_port)

    # -- start ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Bring everything up; on any failure, take down what was started and raise."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        o = self.options
        self.novnc_root = find_novnc(o.novnc_root)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        runtime.check_socket_path(self.run_dir / runtime.SIM_SUBDIR / max(o.hosts, key=len)
                                  / "dom32767" / "hypercall.sock")
        await asyncio.to_thread(runtime.clean_stale, self.run_dir, self.shm_dir)
        self._owns_run_dir = True  # from here on, stop() cleans up the run dir
        self._write_state()
        if o.proxy_port == 0:
            o.proxy_port = runtime.pick_free_port(o.listen)
        runtime.check_port_free(o.listen, o.proxy_port, "console proxy")
        from dmore_nova.demo.api import ControlServer  # the API imports this module
        self.api = ControlServer(self, o.listen, o.port)  # binds now: a taken port fails early
        for name in o.hosts:
            self.hosts[name] = await asyncio.to_thread(self.sup.start_host, name,
                                                       log_level=o.log_level)
            LOG.info("sim host %s up (pid %d)", name, self.hosts[name].pid)
            self._write_state()
        await self._start_guest(o.guest_name, o.hosts[0])
        self._write_state()
        await self._start_proxy()
        self.api.start()
        self.ready = True
        self._write_state()
        LOG.info("demo ready: page %s, proxy %s", self.page_url, self.proxy_url)

    async def _start_guest(self, name: str, host_name: str) -> None:
        o = self.options
        host = self.hosts[host_name]
        pages = o.guest_memory_mb * 256

        def create() -> tuple[int, int | None]:
            with host.toolstack() as ts:
                rm = ts.create_domain(f"rm-{name}", RM_VM_PAGES) if o.rm == "vm" else None
                domid = ts.create_domain(name, pages)
                if rm is not None:
                    ts.set_target(rm, domid)
            xen0 = host.xen(0)
            try:
                backend = rm if rm is not None else 0
                devices.add_vkbd(xen0.xenstore, domid, backend)
                devices.add_vfb(xen0.xenstore, domid, backend, vnclisten=o.listen)
            finally:
                xen0.close()
            return domid, rm

        domid, rm_domid = await asyncio.to_thread(create)
        LOG.info("guest %s: dom%d on %s (%d MiB), RM %s", name, domid, host_name,
                 o.guest_memory_mb, f"VM dom{rm_domid}" if rm_domid is not None else "in dom0")
        xen = await asyncio.to_thread(host.xen, rm_domid if rm_domid is not None else 0)
        agent = RMAgent(xen, domid, width=SCREEN_WIDTH, height=SCREEN_HEIGHT)
        counter = InputCounter(agent)
        agent.server.sink = counter
        try:
            port = await agent.start(o.listen, o.rfb_port)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or o.rfb_port == 0:
                raise DemoError(f"RM agent cannot listen on {o.listen}:{o.rfb_port}: "
                                f"{exc.strerror}") from exc
            LOG.warning("RFB port %d is taken; the RM agent listens on a free port instead",
                        o.rfb_port)
            port = await agent.start(o.listen, 0)
        control = self.run_dir / f"guest-{name}.sock"
        runtime.check_socket_path(control)
        key_log = self.log_dir / f"guest-{name}.keys"
        with contextlib.suppress(FileNotFoundError):
            key_log.unlink()
        cmd = [sys.executable, "-m", "dmore_nova.xen.sim.guest", "--host-dir",
               str(host.run_dir), "--domid", str(domid), "--control", str(control),
               "--key-log", str(key_log), "--log-level", o.log_level]
        if o.shell:
            cmd += ["--shell", o.shell]
        proc = self._spawn(cmd, f"guest-{name}.log", stdout=subprocess.PIPE)
        rec = ProcRecord.of(f"guest:{name}", proc.pid)
        self.processes.append(rec)
        guest = DemoGuest(name=name, host=host_name, domid=domid, rm_domid=rm_domid, agent=agent,
                          counter=counter, control_path=control, key_log=key_log,
                          token=secrets.token_urlsafe(24), proc=proc, proc_record=rec,
                          rfb=(self.host_address, port), keys_at_guest=KeyLogCounter(key_log))
        self.guests[name] = guest
        ready = await asyncio.to_thread(_read_ready_line, proc, GUEST_READY_TIMEOUT)
        if not ready.get("ready"):
            raise DemoError(f"the guest program did not start ({ready.get('error', '?')}); see "
                            f"{self.log_dir / f'guest-{name}.log'}")
        if not await agent.wait_until(agent.devices_connected, CONNECT_TIMEOUT):
            raise DemoError(f"guest {name}: devices not connected within {CONNECT_TIMEOUT}s "
                            f"(vkbd {agent.vkbd.state.name}, vfb {agent.vfb.state.name}); see "
                            f"{self.log_dir}")
        LOG.info("guest %s: console connected, RFB on %s:%d", name, *guest.rfb)

    async def _start_proxy(self) -> None:
        o = self.options
        self._write_tokens()
        conf = self.run_dir / "proxy.conf"
        conf.write_text(
            "[console]\n"
            f"listen = {o.listen}\nport = {o.proxy_port}\n"
            f"novnc_root = {self.novnc_root}\n"
            "token_plugin = dmore_nova.console.token_plugins.JSONTokenFile\n"
            f"token_source = {self.run_dir / 'tokens.json'}\n"
            "reattach_timeout = 30\nreattach_backoff_max = 0.2\n"
            "allowed_origins = localhost,127.0.0.1,::1\n")
        self.proxy = self._spawn([sys.executable, "-m", "dmore_nova.console", "--config-file",
                                  str(conf)], "proxy.log")
        self.proxy_record = ProcRecord.of("proxy", self.proxy.pid)
        self.processes.append(self.proxy_record)
        self._write_state()
        proxy = self.proxy

        def wait_listening() -> None:
            deadline = time.monotonic() + PROXY_READY_TIMEOUT
            while time.monotonic() < deadline:
                if proxy.poll() is not None:
                    raise DemoError(f"the console proxy exited with {proxy.returncode}; see "
                                    f"{self.log_dir / 'proxy.log'}")
                with contextlib.suppress(OSError):
                    with _connect(self.host_address, o.proxy_port):
                        return
                time.sleep(0.05)
            raise DemoError(f"the console proxy did not listen within {PROXY_READY_TIMEOUT}s")

        await asyncio.to_thread(wait_listening)
        LOG.info("console proxy up (pid %d) on %s", proxy.pid, self.proxy_url)

    def _spawn(self, cmd: list[str], log_name: str, *,
               stdout: int | None = None) -> subprocess.Popen[bytes]:
        """A child in its own session (so a terminal's Ctrl-C reaches only the orchestrator,
        which stops the children in order), importing this very dmore_nova."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH"))
                                            if p)
        log = open(self.log_dir / log_name, "wb")  # noqa: SIM115 - the child's stderr
        self._log_files.append(log)
        LOG.debug("starting %s", shlex.join(cmd))
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                stdout=stdout if stdout is not None else log, stderr=log,
                                env=env, start_new_session=True, close_fds=True)

    def _write_tokens(self) -> None:
        """The proxy's token file, replaced atomically (the proxy re-reads it on change)."""
        doc = {g.token: {"host": g.rfb[0], "port": g.rfb[1], "key": g.name}
               for g in self.guests.values()}
        tmp = self.run_dir / ".tokens.json.tmp"
        tmp.write_text(json.dumps(doc))
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.run_dir / "tokens.json")

    def _write_state(self) -> None:
        me = ProcRecord.of("orchestrator", os.getpid())
        runtime.write_state(self.run_dir, {
            "pid": me.pid, "starttime": me.starttime, "ready": self.ready,
            "started": self.started_at,
            "api_url": self.api_url if self.api is not None else None,
            "page_url": self.page_url if self.api is not None else None,
            "proxy_url": self.proxy_url,
            "processes": runtime.process_entries(self.processes),
            "hosts": {n: {"pid": h.pid, "run_dir": str(h.run_dir)} for n, h in self.hosts.items()},
        })

    # -- migrate --------------------------------------------------------------------------------
    async def migrate(self, guest_name: str, host_name: str, *,
                      fail_at: tuple[State, str] | None = None) -> dict[str, Any]:
        """Co-migrate ``guest_name`` and its RM side to ``host_name``; returns the record of
        this migration.  KeyError for an unknown guest or host, DemoError if it cannot start
        (already there, one in progress, the demo stopping).  ``fail_at``: inject a failure at
        that co-migration step ("start"/"end"), to show rollback or an agent restart."""
        g = self.guests.get(guest_name)
        if g is None:
            raise KeyError(f"no guest {guest_name!r} (guests: {', '.join(self.guests)})")
        if host_name not in self.hosts:
            raise KeyError(f"no host {host_name!r} (hosts: {', '.join(self.hosts)})")
        if self.stopping or not self.ready:
            raise DemoError("the demo is not running")
        if g.host == host_name:
            raise DemoError(f"{guest_name} already runs on {host_name}")
        if g.rm_failed is not None:
            raise DemoError(f"{guest_name} has no working RM agent ({g.rm_failed})")
        if g.migrating or self._migration_lock.locked():
            raise DemoError("a migration is in progress")
        async with self._migration_lock:
            g.migrating = True
            try:
                return await self._migrate(g, host_name, fail_at)
            finally:
                g.migrating = False

    async def _migrate(self, g: DemoGuest, dst_name: str,
                       fail_at: tuple[State, str] | None) -> dict[str, Any]:
        src_name = g.host
        src, dst = self.hosts[src_name], self.hosts[dst_name]
        agent = g.agent
        before = _Snapshot(agent, agent.held_dropped, agent.vkbd.dropped,
                           [v for v in agent.server.viewers if not v.closed])
        started = _now_iso()

        def fault(state: State, when: str) -> None:
            if fail_at is not None and (state, when) == fail_at:
                raise RuntimeError(f"failure injected at {state.value} {when}")

        ctl = GuestControl(g.control_path)
        LOG.info("migrating %s (dom%d) from %s to %s", g.name, g.domid, src_name, dst_name)
        cm = CoMigration(agent, SimMigrationPlatform(src, dst), g.domid, ctl,
                         rm_domid=g.rm_domid, fault=fault if fail_at else None,
                         clock=time.monotonic)
        try:
            report = await cm.run()
        finally:
            await asyncio.to_thread(ctl.close)
        committed = report.new_guest_domid is not None
        if committed:
            g.host, g.domid = dst_name, report.new_guest_domid
            if g.rm_domid is not None:
                g.rm_domid = report.new_rm_domid
        new_agent = report.agent
        if report.outcome is State.FAILED and committed:
            g.rm_failed = report.error or "co-migration failed"
        if new_agent is not agent:
            g.agent = new_agent
            g.counter.agent = new_agent
            new_agent.server.sink = g.counter
            if new_agent.listen_addr is not None:
                g.rfb = (self.host_address, new_agent.listen_addr[1])
            await asyncio.to_thread(self._proxy_reattach, g)
        blackout = await self._blackout(report, g.agent)
        record = self._record(g, report, before, src_name, dst_name, started, blackout)
        g.migrations += 1
        g.last_migration = record
        self.history.append(record)
        self._write_state()
        LOG.info("migration %d of %s: %s", record["id"], g.name, report.summary())
        return record

    def _proxy_reattach(self, g: DemoGuest) -> None:
        """The agent was restarted (maybe on another port): update the token file and tell
        the proxy to re-attach that console's sessions now (they also retry by themselves)."""
        self._write_tokens()
        url = (f"{self._url(self.options.proxy_port)}reattach?key="
               f"{urllib.request.quote(g.name)}")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST"),
                                        timeout=5) as r:
                LOG.info("console proxy: %s", r.read().decode(errors="replace"))
        except urllib.error.HTTPError as exc:
            LOG.info("console proxy re-attach: %s (no browser session open)", exc.code)
        except OSError as exc:
            LOG.warning("console proxy re-attach failed: %s", exc)

    async def _blackout(self, report: CoMigrationReport, agent: RMAgent) -> float | None:
        """Seconds from freezing input to the first framebuffer update every surviving viewer
        got after the refresh (None: no viewer, or no refresh)."""
        freeze = refresh = None
        for step in report.steps:
            if step.state is State.GUEST_SWITCHOVER:
                freeze = step.started
            elif step.state is State.REFRESH and step.ended is not None:
                refresh = step.ended
        if freeze is None:
            return None
        if refresh is None:
            # A restarted agent: its first update to anyone ends the blackout.
            refresh = freeze
        deadline = time.monotonic() + FIRST_UPDATE_WAIT
        while True:
            viewers = [v for v in agent.server.viewers if not v.closed and v.conn is not None]
            firsts = [v.last_update_time for v in viewers if v.last_update_time >= refresh]
            if viewers and len(firsts) == len(viewers):
                break
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.002)
        if not firsts:
            return None
        return max(firsts) - freeze

    def _record(self, g: DemoGuest, report: CoMigrationReport, before: _Snapshot,
                src: str, dst: str, started: str, blackout: float | None) -> dict[str, Any]:
        agent = report.agent
        if agent is before.agent:
            lost = (agent.held_dropped - before.held_dropped
                    + agent.vkbd.dropped - before.vkbd_dropped)
        else:  # a restarted agent imported the old vkbd's drop count, not the held ones
            lost = (before.agent.held_dropped - before.held_dropped + agent.held_dropped
                    + agent.vkbd.dropped - before.vkbd_dropped)
        alive = {id(v) for v in agent.server.viewers if not v.closed}
        kept = sum(1 for v in before.viewers if id(v) in alive)
        timings = report.timings
        held = 0
        for step in report.steps:
            if step.state is State.REPLAY:
                held = int(step.notes.get("held", 0))
        gr = report.guest
        return {
            "id": len(self.history) + 1, "guest": g.name, "from": src, "to": dst,
            "outcome": report.outcome.value, "ok": report.outcome is State.DONE,
            "started": started, "error": report.error, "warnings": list(report.warnings),
            "total_ms": _ms(report.total),
            "guest_downtime_ms": _ms(gr.downtime if gr is not None else None),
            "console_blackout_ms": _ms(blackout),
            "console_gap_ms": _ms(report.console_gap),
            "input_gap_ms": _ms(report.input_gap),
            "rehome_ms": _ms(timings.get(State.RM_REHOME.value)),
            "remap_rebind_ms": _ms(timings.get(State.REMAP_REBIND.value)),
            "steps_ms": {s.value: _ms(timings[s.value]) for s in STEPS if s.value in timings},
            "precopy": None if gr is None else {
                "guest_pages": gr.nr_pages, "rounds": [r.pages for r in gr.rounds],
                "final_pages": gr.final.pages if gr.final else None,
                "pages_sent": gr.pages_sent,
                "phases_ms": {k: _ms(v) for k, v in gr.phases.items()}},
            "keys_held": held, "keys_lost": lost,
            "viewers_before": len(before.viewers), "viewers_kept": kept,
            "disconnects": len(before.viewers) - kept,
            "agent_restarted": agent is not before.agent,
            # CLOCK_MONOTONIC seconds (the same clock in every process of this machine), so a
            # client can place its own observations: input frozen .. viewers refreshed.
            "switchover_window": _window(report),
            "guest_domid": g.domid, "rm_domid": g.rm_domid, "rm_host": g.host,
        }

    # -- status ---------------------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        """Everything ``dmore-nova status`` shows; runs on the loop (consistent agent state)."""
        domains = await asyncio.to_thread(self._list_domains)
        guests = []
        for g in self.guests.values():
            a = g.agent
            at_guest = await asyncio.to_thread(g.keys_at_guest.count)
            guests.append({
                "name": g.name, "host": g.host, "domid": g.domid,
                "pid": g.proc.pid, "running": g.proc.poll() is None,
                "control_socket": str(g.control_path), "key_log": str(g.key_log),
                "rm": {
                    "kind": self.options.rm,
                    "host": g.host, "domid": g.rm_domid if g.rm_domid is not None else 0,
                    "rfb": {"host": g.rfb[0], "port": g.rfb[1]},
                    "devices_connected": a.devices_connected(),
                    "failed": g.rm_failed,
                    "viewers": [{"peer": v.peer, "updates": v.updates_sent}
                                for v in a.server.viewers if not v.closed],
                },
                "console": {
                    "token": g.token, "key": g.name,
                    "ws_path": f"websockify?token={g.token}",
                    "ws_url": self._url(self.options.proxy_port,
                                        f"/websockify?token={g.token}", "ws"),
                    "proxy_page": f"{self.proxy_url}console.html?token={g.token}",
                },
                "keys": {"typed": g.counter.keys, "at_guest": at_guest,
                         "in_flight": a.queued_input + len(a.held) + _ring_pending(a)},
                "migrating": g.migrating, "migrations": g.migrations,
                "last_migration": g.last_migration,
            })
        return {
            "demo": {"pid": os.getpid(), "ready": self.ready, "started": self.started_at,
                     "run_dir": str(self.run_dir), "page_url": self.page_url,
                     "api_url": self.api_url, "rm": self.options.rm},
            "proxy": {"url": self.proxy_url, "port": self.options.proxy_port,
                      "pid": self.proxy.pid if self.proxy else None,
                      "running": self.proxy is not None and self.proxy.poll() is None},
            "hosts": [{"name": n, "pid": h.pid, "run_dir": str(h.run_dir),
                       "domains": domains.get(n, [])} for n, h in self.hosts.items()],
            "guests": guests,
            "migrations": list(self.history)[-10:],
        }

    def _list_domains(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for name, h in self.hosts.items():
            try:
                with h.toolstack() as ts:
                    out[name] = [{"domid": d.domid, "name": d.name, "pages": d.max_pages,
                                  "paused": d.paused, "dying": d.dying,
                                  "target": ts.target_of(d.domid)}
                                 for d in ts.list_domains()]
            except XenError as exc:
                out[name] = [{"error": str(exc)}]
        return out

    # -- stop -------------------------------------------------------------------------------------
    async def stop(self) -> None:
        """Take everything down, in order, each step bounded; safe to call more than once and
        after a failed start.  Logs are kept in the run dir's logs/."""
        if self.stopping:
            return
        self.stopping = True
        LOG.info("stopping the demo")
        if self.api is not None:
            await asyncio.to_thread(self.api.stop)
        if self._migration_lock.locked():
            LOG.info("waiting for the migration in progress")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._migration_lock.acquire(), STOP_MIGRATION_WAIT)
        if self.proxy_record is not None:
            await asyncio.to_thread(runtime.terminate, self.proxy_record)
        for g in self.guests.values():
            try:
                await g.agent.stop()
            except Exception as exc:  # noqa: BLE001 - go on taking the rest down
                LOG.warning("stopping the RM agent of %s: %s", g.name, exc)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(g.agent.xen.close)
            await asyncio.to_thread(self._stop_guest_program, g)
        for name in list(self.hosts):
            try:
                await asyncio.to_thread(self.sup.stop_host, name)
            except XenError as exc:
                LOG.warning("stopping sim host %s: %s", name, exc)
        if self._owns_run_dir:  # a host whose start was under way when start-up failed
            for h in await asyncio.to_thread(self.sup.list_hosts):
                with contextlib.suppress(XenError):
                    await asyncio.to_thread(self.sup.stop_host, h.name)
        for p in (self.proxy, *(g.proc for g in self.guests.values())):
            if p is not None:
                with contextlib.suppress(Exception):
                    p.wait(timeout=1)
                if p.stdout is not None:
                    p.stdout.close()
        for f in self._log_files:
            with contextlib.suppress(OSError):
                f.close()
        self._log_files.clear()
        if self._owns_run_dir:
            await asyncio.to_thread(self._remove_files)
        LOG.info("demo stopped")

    def _stop_guest_program(self, g: DemoGuest) -> None:
        """Ask the guest program to stop (it closes its shell and devices), else terminate."""
        if g.proc.poll() is None:
            try:
                with GuestControl(g.control_path, timeout=5) as ctl:
                    ctl.stop()
                g.proc.wait(timeout=5)
            except (XenError, subprocess.TimeoutExpired, OSError) as exc:
                LOG.info("guest %s did not stop on request (%s); terminating it", g.name, exc)
        runtime.terminate(g.proc_record)

    def _remove_files(self) -> None:
        for path in (self.run_dir / runtime.SIM_SUBDIR, self.shm_dir):
            shutil.rmtree(path, ignore_errors=True)
        for g in self.guests.values():
            with contextlib.suppress(FileNotFoundError):
                g.control_path.unlink()
        for name in ("tokens.json", "proxy.conf", runtime.STATE_FILE):
            with contextlib.suppress(FileNotFoundError):
                (self.run_dir / name).unlink()


def _window(report: CoMigrationReport) -> dict[str, float | None]:
    """When input was frozen and when the viewers were refreshed (monotonic seconds)."""
    out: dict[str, float | None] = {"freeze": None, "refresh": None}
    for step in report.steps:
        if step.state is State.GUEST_SWITCHOVER:
            out["freeze"] = step.started
        elif step.state is State.REFRESH:
            out["refresh"] = step.ended
    return out


def _connect(host: str, port: int) -> socket.socket:
    return socket.create_connection((host, port), timeout=0.5)


def _ring_pending(agent: RMAgent) -> int:
    """Events in the vkbd ring the guest has not consumed yet (0 without a ring)."""
    page = agent.vkbd.page
    if page is None or agent.vkbd.closed_reason is not None:
        return 0
    try:
        p = K.XenkbdPage(page.mem)
        return (p.in_prod - p.in_cons) & 0xFFFFFFFF
    except (ValueError, TypeError):
        return 0


def _read_ready_line(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    """The guest program's ``{"ready": true, ...}`` line (or why there is none)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            return {"error": f"no ready line within {timeout}s"}
        r, _, _ = select.select([fd], [], [], min(left, 0.5))
        if r:
            chunk = os.read(fd, 4096)
            if not chunk:
                return {"error": f"exited with {proc.wait()}"}
            buf += chunk
            if len(buf) > 65536:
                return {"error": "garbage on stdout"}
    try:
        doc = json.loads(buf.split(b"\n", 1)[0])
    except ValueError:
        return {"error": "not a JSON ready line"}
    return doc if isinstance(doc, dict) else {"error": "not a JSON object"}


async def run(options: DemoOptions, *, announce=print) -> int:
    """``dmore-nova demo``: start, announce, serve until SIGINT/SIGTERM, stop.  Returns the
    exit status."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    demo = Demo(options)
    start = asyncio.ensure_future(demo.start())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait({start, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if start not in done:
            # Not cancelled: a half-made step (a host process being spawned in a thread)
            # would escape the clean-up.  Every start-up step is bounded by a timeout.
            announce("dmore-nova demo: stopping once start-up is through ...")
            with contextlib.suppress(Exception):
                await start
            await demo.stop()
            return 130
        start.result()  # raises DemoError & co.
        announce(banner(await demo.status()))
        await stopper
        announce("dmore-nova demo: stopping ...")
        await demo.stop()
        announce("dmore-nova demo: stopped (nothing left running)")
        return 0
    finally:
        stopper.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def banner(st: dict[str, Any]) -> str:
    lines = ["dmore-nova demo is running", f"  console page   {st['demo']['page_url']}"]
    for g in st["guests"]:
        rm = g["rm"]
        where = (f"RM VM dom{rm['domid']} on {rm['host']}" if rm["kind"] == "vm"
                 else f"RM agent in dom0 of {rm['host']}")
        others = [h["name"] for h in st["hosts"] if h["name"] != g["host"]]
        lines += [f"  guest          {g['name']}: dom{g['domid']} on {g['host']}, {where}",
                  f"  VNC (direct)   {rm['rfb']['host']}:{rm['rfb']['port']}",
                  f"  proxy console  {g['console']['proxy_page']}",
                  f"  migrate        dmore-nova migrate {g['name']} {others[0]}"]
    lines += ["  hosts          " + ", ".join(f"{h['name']} (pid {h['pid']})"
                                              for h in st["hosts"]),
              "  status         dmore-nova status [--json]",
              f"  logs           {Path(st['demo']['run_dir']) / runtime.LOG_SUBDIR}",
              "Ctrl-C stops everything."]
    return "\n".join(lines)
