"""Start, stop and list sim hosts side by side, and drive their toolstacks: ``dmore-sim``.

Each host is its own process (:mod:`.host`) with its own run dir (``<base_dir>/<name>``), its
own memory dir (``<shm_base>/<name>``), its own xenstored and its own domid space, as two Xen
hosts in a rack are.  Hosts outlive the supervisor object that started them; ``host.json`` in
the run dir (written by the host once it is ready) is how later invocations find them.

Programmatic use::

    sup = Supervisor(base_dir, shm_base)
    a = sup.start_host("a")
    with a.toolstack() as ts:
        guest = ts.create_domain("guest", max_pages=256)
    backend = a.xen(0)            # SimXen acting as dom0
    kernel = a.kernel(guest)      # SimKernel acting as the guest
    sup.stop_host("a")

CLI (``python -m dmore_nova.xen.sim`` or the ``dmore-sim`` console script)::

    dmore-sim host start|stop NAME      dmore-sim host list
    dmore-sim domain create --host H --name N [--pages P] [--paused]
    dmore-sim domain destroy|list|set-target --host H ...
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import dmore_nova
from dmore_nova.xen.api import XenError
from dmore_nova.xen.sim.client import SimToolstack, SimXen
from dmore_nova.xen.sim.host import RUN_INFO

DEFAULT_BASE_DIR = Path(os.environ.get("DMORE_SIM_DIR", f"/tmp/dmore-sim-{os.getuid()}"))
DEFAULT_SHM_BASE = Path(os.environ.get("DMORE_SIM_SHM", "/dev/shm/dmore-sim"))
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")


def _check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(f"bad host name {name!r} (letters, digits, _ . -; at most 32)")
    return name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours is not alive.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass
class HostHandle:
    """A running sim host."""

    name: str
    run_dir: Path
    shm_dir: Path
    pid: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return _alive(self.pid)

    def toolstack(self) -> SimToolstack:
        return SimToolstack(self.run_dir)

    def xen(self, domid: int = 0, **kw: object) -> SimXen:
        """``api.Xen`` acting as ``domid`` on this host."""
        return SimXen(self.run_dir, domid, **kw)  # type: ignore[arg-type]

    def kernel(self, domid: int, **kw: object):  # -> SimKernel
        from dmore_nova.xen.sim.kernel import SimKernel
        return SimKernel(self.run_dir, domid, **kw)  # type: ignore[arg-type]


class Supervisor:
    def __init__(self, base_dir: str | os.PathLike[str] = DEFAULT_BASE_DIR,
                 shm_base: str | os.PathLike[str] = DEFAULT_SHM_BASE) -> None:
        self.base_dir = Path(base_dir)
        self.shm_base = Path(shm_base)
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def _read_info(self, name: str) -> dict | None:
        try:
            return json.loads((self.base_dir / name / RUN_INFO).read_text())
        except (OSError, ValueError):
            return None

    def host(self, name: str) -> HostHandle:
        """The running host ``name``; XenError(ESRCH) if there is none."""
        _check_name(name)
        info = self._read_info(name)
        if info is None or not _alive(int(info.get("pid", 0))):
            raise XenError(errno.ESRCH, f"no sim host {name!r} running under {self.base_dir}")
        return HostHandle(name, Path(info["run_dir"]), Path(info["shm_dir"]), int(info["pid"]),
                          self._procs.get(name))

    def list_hosts(self) -> list[HostHandle]:
        out = []
        if self.base_dir.is_dir():
            for d in sorted(self.base_dir.iterdir()):
                if d.is_dir() and _NAME_RE.match(d.name):
                    with contextlib.suppress(XenError):
                        out.append(self.host(d.name))
        return out

    def start_host(self, name: str, *, dom0_pages: int | None = None,
                   timeout: float = START_TIMEOUT, log_level: str = "INFO") -> HostHandle:
        """Spawn a host process and wait until it is serving."""
        _check_name(name)
        run_dir, shm_dir = self.base_dir / name, self.shm_base / name
        info = self._read_info(name)
        if info is not None and _alive(int(info.get("pid", 0))):
            raise XenError(errno.EEXIST, f"sim host {name!r} already runs (pid {info['pid']})")
        # Leftovers of a host that died without cleaning up.
        with contextlib.suppress(FileNotFoundError):
            (run_dir / RUN_INFO).unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "dmore_nova.xen.sim.host", "--name", name,
               "--run-dir", str(run_dir), "--shm-dir", str(shm_dir), "--log-level", log_level]
        if dom0_pages is not None:
            cmd += ["--dom0-pages", str(dom0_pages)]
        # The child must import this very dmore_nova, installed or not.
        env = dict(os.environ)
        src = str(Path(dmore_nova.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        log = open(run_dir / "host.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    env=env, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self._read_info(name)
            if info is not None and int(info.get("pid", 0)) == proc.pid:
                self._procs[name] = proc
                return HostHandle(name, run_dir, shm_dir, proc.pid, proc)
            if proc.poll() is not None:
                raise XenError(errno.EIO, f"sim host {name!r} exited with {proc.returncode}; "
                                          f"see {run_dir / 'host.log'}")
            time.sleep(0.02)
        proc.kill()
        proc.wait()
        raise XenError(errno.ETIMEDOUT, f"sim host {name!r} not ready after {timeout}s")

    def stop_host(self, name: str, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the host (it destroys its domains and removes its dirs), then wait."""
        handle = self.host(name)
        os.kill(handle.pid, signal.SIGTERM)
        proc = self._procs.pop(name, None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None:
                if proc.poll() is not None:
                    return
            elif not _alive(handle.pid):
                return
            time.sleep(0.02)
        os.kill(handle.pid, signal.SIGKILL)
        if proc is not None:
            proc.wait()
        raise XenError(errno.ETIMEDOUT, f"sim host {name!r} did not stop in {timeout}s; killed")


# -- CLI ----------------------------------------------------------------------------------------

def _parse_size(text: str) -> int:
    """Pages from ``N`` (pages) or ``N{K,M,G}`` (bytes)."""
    m = re.fullmatch(r"(\d+)([KkMmGg]?)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    n, unit = int(m.group(1)), m.group(2).upper()
    if not unit:
        return n
    return n * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit] // 4096


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dmore-sim", description="simulated Xen hosts")
    p.add_argument("--base-dir", default=str(DEFAULT_BASE_DIR),
                   help="where host run dirs live (env DMORE_SIM_DIR)")
    p.add_argument("--shm-base", default=str(DEFAULT_SHM_BASE),
                   help="where guest memory files live (env DMORE_SIM_SHM)")
    sub = p.add_subparsers(dest="what", required=True)

    host = sub.add_parser("host").add_subparsers(dest="action", required=True)
    hs = host.add_parser("start")
    hs.add_argument("name")
    hs.add_argument("--dom0-pages", type=int)
    host.add_parser("stop").add_argument("name")
    host.add_parser("list")

    dom = sub.add_parser("domain").add_subparsers(dest="action", required=True)
    dc = dom.add_parser("create")
    dc.add_argument("--host", required=True)
    dc.add_argument("--name", required=True)
    dc.add_argument("--memory", type=_parse_size, default=_parse_size("16M"),
                    help="pages, or bytes with K/M/G suffix (default 16M)")
    dc.add_argument("--paused", action="store_true")
    dd = dom.add_parser("destroy")
    dd.add_argument("--host", required=True)
    dd.add_argument("domid", type=int)
    dom.add_parser("list").add_argument("--host", required=True)
    dt = dom.add_parser("set-target")
    dt.add_argument("--host", required=True)
    dt.add_argument("domid", type=int)
    dt.add_argument("target", type=int)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    sup = Supervisor(args.base_dir, args.shm_base)
    try:
        if args.what == "host":
            if args.action == "start":
                h = sup.start_host(args.name, dom0_pages=args.dom0_pages)
                print(f"{h.name}\tpid {h.pid}\t{h.run_dir}")
            elif args.action == "stop":
                sup.stop_host(args.name)
            else:
                for h in sup.list_hosts():
                    print(f"{h.name}\tpid {h.pid}\t{h.run_dir}\t{h.shm_dir}")
            return 0
        with sup.host(args.host).toolstack() as ts:
            if args.action == "create":
                print(ts.create_domain(args.name, args.memory, paused=args.paused))
            elif args.action == "destroy":
                ts.destroy_domain(args.domid)
            elif args.action == "set-target":
                ts.set_target(args.domid, args.target)
            else:
                print("ID\tName\tPages\tState\tTarget")
                for d in ts.list_domains():
                    state = ("d" if d.dying else "-") + ("p" if d.paused else "-")
                    target = ts.target_of(d.domid)
                    print(f"{d.domid}\t{d.name}\t{d.max_pages}\t{state}\t"
                          f"{'' if target is None else target}")
        return 0
    except (XenError, ValueError) as e:
        print(f"dmore-sim: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
