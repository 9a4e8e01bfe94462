"""Driving dom0 of the xenbox: the guest (xl), the project's RM agent, the guest's console log.

Everything runs through ``XenBox.sh`` (bash in dom0 over the serial console, output back over
9p).  The RM agent runs from the checkout shared at /mnt/src with dom0's Debian python3.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.xen.screen import TextScreen, screens_in_log

GUEST = "guest"
GUEST_LOG = f"/var/log/xen/console/guest-{GUEST}.log"
GUEST_LOG_INCOMING = f"/var/log/xen/console/guest-{GUEST}--incoming.log"


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass
class ServedGuest:
    """A guest created from ``guest-rm.cfg`` and the RM agent serving it from dom0."""

    box: Any
    domid: int
    rfb_port: int  # on the host

    # -- dom0 ----------------------------------------------------------------------------------
    def sh(self, cmd: str, timeout: float = 120.0, check: bool = True):
        return self.box.sh(cmd, timeout, check=check)

    def xs_read(self, path: str) -> str | None:
        r = self.sh(f"xenstore-read {path}", check=False)
        return r.output.strip() if r.rc == 0 else None

    def xs_tree(self, path: str) -> dict[str, str]:
        """``xenstore-ls -f`` as {path: value}; {} if missing."""
        r = self.sh(f"xenstore-ls -f {path}", check=False)
        out: dict[str, str] = {}
        for line in r.output.splitlines():
            m = re.match(r'^(/\S+) = "(.*)"$', line)
            if m:
                out[m.group(1)] = m.group(2)
        return out

    def console_log(self) -> str:
        """The guest's hvc0 as xenconsoled logged it.  After ``xl migrate`` the rest is in
        ``guest-<name>--incoming.log``: xenconsoled names the file when it attaches, and the
        incoming domain is renamed only once it runs."""
        return self.sh(f"cat {GUEST_LOG} {GUEST_LOG_INCOMING} 2>/dev/null", check=False).output

    def screens(self) -> list[TextScreen]:
        return screens_in_log(self.console_log())

    def agent_log(self) -> str:
        p = self.box.box_dir / "agent.out"
        return p.read_text(errors="replace") if p.exists() else ""

    def status(self) -> dict:
        """The agent's status JSON (``[agent] status_file``, with the xl follower's steps)."""
        return json.loads(self.sh(f"cat {STATUS_FILE}").output)

    def agent_running(self) -> bool:
        return self.sh("kill -0 $(cat /mnt/box/agent.pid)", check=False).rc == 0

    def qemu_for_guest(self) -> str:
        """dom0 processes that would be a QEMU device model for the guest (should be none)."""
        return self.sh(f"ps -eo pid,args | grep -E 'qemu.*-xen-domid {self.domid}( |$)'"
                       " | grep -v grep", check=False).output.strip()


AGENT = "dmore_nova.cmd.rm_agent"
#: In dom0's tmpfs, as a deployment would keep it: on the /mnt/box share (9p to the host) each
#: of the agent's once-a-second rewrites is a few synchronous round trips through QEMU, a cost
#: no deployment has (bench/xen_table1.py --migrate measures the agent with it on).
STATUS_FILE = "/run/dmore-agent-status.json"


def start_served_guest(box: Any, *, width: int = 800, height: int = 600,
                       follow_migration: bool = False) -> ServedGuest:
    """``xl create -p`` the guest, start ``dmore-rm-agent`` (xen=real, plug_vfb) for its domid,
    then unpause it: the agent's backends are in InitWait with their features before the
    guest's frontends probe (xen-kbdfront reads ``feature-abs-pointer`` only at probe), and
    the guest does not wait 30 s at boot for an unserved device.  ``follow_migration``: the
    agent also follows ``xl migrate`` (``[agent] follow_xl_migrate``,
    :mod:`dmore_nova.rm_vm.xl_follower`) and writes its status file (:data:`STATUS_FILE`)."""
    box.sh("[ -e /mnt/box/agent.pid ] && kill $(cat /mnt/box/agent.pid) 2>/dev/null;"
           f" xl destroy {GUEST} 2>/dev/null; rm -f {GUEST_LOG} {GUEST_LOG_INCOMING}"
           f" {STATUS_FILE}; true")
    box.sh(f"xl create -p /root/domU/{GUEST}-rm.cfg", 180)
    domid = int(box.sh(f"xl domid {GUEST}").output.strip())
    (box.box_dir / "agent.conf").write_text(
        "[agent]\nxen = real\n"
        f"guest_domid = {domid}\nplug_vfb = true\nwidth = {width}\nheight = {height}\n"
        + (f"follow_xl_migrate = true\nstatus_file = {STATUS_FILE}\n"
           if follow_migration else "") +
        "[rfb]\nlisten = 0.0.0.0\nport = 5900\n")
    (box.box_dir / "agent.out").write_text("")
    # A simple command in the background, so that $! is the agent's own pid (a compound
    # command would be a subshell, and SIGTERM would not reach the agent).
    box.sh("cd /mnt/src; PYTHONPATH=/mnt/src PYTHONDONTWRITEBYTECODE=1 nohup"
           f" python3 -m {AGENT} --config-file /mnt/box/agent.conf"
           " >>/mnt/box/agent.out 2>&1 </dev/null & echo $! >/mnt/box/agent.pid")
    g = ServedGuest(box, domid, box.ports[5900])
    try:
        wait_for(lambda: "console on" in g.agent_log() or not g.agent_running(), 120,
                 "the agent to listen")
        if "console on" not in g.agent_log():
            raise RuntimeError("dmore-rm-agent exited:\n" + g.agent_log()[-3000:])
        box.sh(f"xl unpause {GUEST}")
        wait_for(lambda: "XENBOX-TTY1-SHELL" in g.console_log(), 120,
                 "the guest's tty1 shell on its framebuffer")
    except Exception as exc:
        raise RuntimeError(f"{exc}\n-- agent log:\n{g.agent_log()[-3000:]}\n-- guest console:\n"
                           f"{g.console_log()[-3000:]}") from exc
    return g


def stop_served_guest(g: ServedGuest) -> str:
    """Stop the agent (SIGTERM: it closes its devices and unplugs the vfb), destroy the guest.
    Returns the agent's log."""
    g.sh("kill $(cat /mnt/box/agent.pid) 2>/dev/null; for i in $(seq 50); do"
         " kill -0 $(cat /mnt/box/agent.pid) 2>/dev/null || break; sleep 0.2; done", check=False)
    g.sh(f"xl destroy {GUEST}", 120, check=False)
    return g.agent_log()
