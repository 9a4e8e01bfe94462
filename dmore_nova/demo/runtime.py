"""The demo's run directory, its state file, and the processes it starts.

Why a state file: ``dmore-nova demo`` starts processes that outlive an orchestrator killed
with SIGKILL (sim hosts, the guest program, the console proxy each run in their own session,
so a terminal's Ctrl-C reaches only the orchestrator, which stops them in order).  The state
file (``demo.json``) records each one's pid *and* its start time, so that the next start can
tell "a demo is running" from "a demo died and left processes behind", and kill the
leftovers without ever touching a process that merely reuses a recorded pid.

Layout of the run dir::

    demo.json        state: pids, ports, URLs (written atomically)
    sim/<host>/      each sim host's run dir (the supervisor's base dir)
    guest-*.sock     control sockets of the guest programs
    tokens.json      the console proxy's token file
    proxy.conf       the console proxy's configuration
    logs/            demo.log, guest-*.log, proxy.log, *.keys (kept after a stop)
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import socket
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from dmore_nova.xen.api import XenError
from dmore_nova.xen.sim.supervisor import Supervisor

LOG = logging.getLogger(__name__)

DEFAULT_RUN_DIR = Path(os.environ.get("DMORE_DEMO_DIR", f"/tmp/dmore-demo-{os.getuid()}"))
DEFAULT_SHM_DIR = Path(os.environ.get("DMORE_DEMO_SHM", f"/dev/shm/dmore-demo-{os.getuid()}"))
STATE_FILE = "demo.json"
SIM_SUBDIR = "sim"
LOG_SUBDIR = "logs"
#: Seconds a process gets between SIGTERM and SIGKILL.
TERM_TIMEOUT = 5.0
#: Largest state file read (it holds a handful of pids and URLs).
MAX_STATE_FILE = 1 << 20
#: A Unix socket path must fit ``sun_path`` (108 bytes with the NUL).
MAX_SOCKET_PATH = 107


class DemoError(Exception):
    """Something the user must fix (a port taken, a demo already running, a bad option)."""


@dataclass(frozen=True)
class ProcRecord:
    """A process the demo started: role ("guest:<name>", "proxy", ...), pid, and its start
    time in clock ticks since boot (``/proc/<pid>/stat`` field 22) to detect pid reuse."""

    role: str
    pid: int
    starttime: int

    @classmethod
    def of(cls, role: str, pid: int) -> ProcRecord:
        return cls(role, pid, process_starttime(pid) or 0)

    def alive(self) -> bool:
        """Still the very process that was recorded (not a zombie, not a reused pid)."""
        start = process_starttime(self.pid)
        return start is not None and start == self.starttime


def process_starttime(pid: int) -> int | None:
    """Start time of a live, non-zombie process, or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # fields[0] is the state (field 3), so field 22 (starttime) is fields[19].
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    try:
        return int(fields[19])
    except ValueError:
        return None


def terminate(rec: ProcRecord, timeout: float = TERM_TIMEOUT, *, group: bool = True) -> bool:
    """SIGTERM the recorded process (its process group too when it leads one, as every child
    of the demo does), SIGKILL it after ``timeout``.  True if it was running."""
    if not rec.alive():
        return False
    targets = [rec.pid]
    pgid = None
    with contextlib.suppress(OSError):
        pgid = os.getpgid(rec.pid)
    use_group = group and pgid == rec.pid

    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if use_group:
                os.killpg(rec.pid, sig)
            else:
                for pid in targets:
                    os.kill(pid, sig)

    send(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(rec.pid)
        if not rec.alive():
            break
        time.sleep(0.02)
    else:
        LOG.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing it", rec.role, rec.pid,
                    timeout)
        send(signal.SIGKILL)
        for _ in range(100):
            _reap(rec.pid)
            if not rec.alive():
                break
            time.sleep(0.02)
    if use_group:
        # Stragglers of the group (their leader is gone) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(rec.pid, signal.SIGKILL)
    return True


def _reap(pid: int) -> None:
    """Collect our own child's exit status (else it stays a zombie, which counts as gone)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def read_state(run_dir: Path) -> dict | None:
    path = run_dir / STATE_FILE
    try:
        if path.stat().st_size > MAX_STATE_FILE:
            LOG.warning("%s is larger than %d bytes; ignored", path, MAX_STATE_FILE)
            return None
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def write_state(run_dir: Path, doc: dict) -> None:
    """Atomically (write, then rename): a reader never sees half a file."""
    tmp = run_dir / f".{STATE_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
    os.replace(tmp, run_dir / STATE_FILE)


def recorded_processes(doc: dict) -> list[ProcRecord]:
    out = []
    for entry in doc.get("processes", []):
        try:
            out.append(ProcRecord(str(entry["role"]), int(entry["pid"]),
                                  int(entry["starttime"])))
        except (KeyError, TypeError, ValueError):
            continue
    return out


def process_entries(records: Iterable[ProcRecord]) -> list[dict]:
    return [asdict(r) for r in records]


def orchestrator_alive(doc: dict) -> ProcRecord | None:
    """The recorded orchestrator if it still runs."""
    try:
        rec = ProcRecord("orchestrator", int(doc["pid"]), int(doc["starttime"]))
    except (KeyError, TypeError, ValueError):
        return None
    if rec.pid == os.getpid():
        return None
    return rec if rec.alive() else None


def clean_stale(run_dir: Path, shm_dir: Path) -> list[str]:
    """Make the run dir ready for a new demo: refuse if one runs; otherwise stop whatever a
    dead one left (sim hosts, guest programs, proxy), and delete its sockets, memory files
    and state.  Logs are kept.  Returns what was cleaned, for the log."""
    cleaned: list[str] = []
    doc = read_state(run_dir)
    if doc is not None:
        running = orchestrator_alive(doc)
        if running is not None:
            raise DemoError(f"a demo already runs from {run_dir} (pid {running.pid}); stop it "
                            f"with Ctrl-C in its terminal or 'kill {running.pid}', or use "
                            "another --run-dir and ports")
        for rec in recorded_processes(doc):
            if terminate(rec):
                cleaned.append(f"{rec.role} (pid {rec.pid})")
    sup = Supervisor(run_dir / SIM_SUBDIR, shm_dir)
    for host in sup.list_hosts():
        try:
            sup.stop_host(host.name)
        except XenError as exc:
            LOG.warning("stale sim host %s: %s", host.name, exc)
        cleaned.append(f"sim host {host.name} (pid {host.pid})")
    for path in (run_dir / SIM_SUBDIR, shm_dir):
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
            cleaned.append(str(path))
    if run_dir.is_dir():
        for entry in run_dir.iterdir():
            if entry.name == LOG_SUBDIR:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
    if cleaned:
        LOG.info("cleaned up after an earlier demo: %s", ", ".join(cleaned))
    return cleaned


def check_port_free(host: str, port: int, what: str) -> None:
    """DemoError if ``port`` cannot be bound now (something else listens there)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise DemoError(f"port {port} on {host} ({what}) is in use; free it or choose "
                                f"another one") from None
            raise DemoError(f"cannot listen on {host}:{port} ({what}): {exc.strerror}") from None


def pick_free_port(host: str) -> int:
    """A port nothing listens on right now (for a listener that must be told its port, as
    the console proxy is through its configuration file)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_socket_path(path: Path) -> None:
    if len(os.fsencode(str(path))) > MAX_SOCKET_PATH:
        raise DemoError(f"{path} is too long for a Unix socket ({MAX_SOCKET_PATH} bytes at "
                        "most): choose a shorter --run-dir")
