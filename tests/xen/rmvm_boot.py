"""Box-only bootstrap inside the xenbox's RM VM: wait for dom0 to write the agent's
configuration, then run the product's ``dmore-rm-agent`` (:func:`dmore_nova.cmd.rm_agent.main`).

Why a bootstrap: the box's RM VM is one image for every run, and a test starts the agent with
the configuration it needs (dom0, tests/xen/rmvm.py, writes it whole to the RM VM's own
``data/dmore-agent-conf``).  The configuration names no guest: the RM VM exists before its
guest (the guest's ``vkb=[backend=rmvm,...]`` names it, and libxl resolves the name at ``xl
create``), so the agent waits for the RM VM's ``target``, which dom0 writes when it gives the RM
VM privilege over the guest (``dmore-xl-rmvm set-target``) -- the product's way.  Meanwhile
this bootstrap has already imported the agent (numpy, PIL, oslo: minutes under TCG on a busy
machine).  The configuration has ``[agent] xenstore_control = true``: co-migration requests
from dom0 are the product's (:mod:`dmore_nova.rm_vm.xs_control`), nothing of them is here.

One agent per configuration: when it exits, the next configuration is awaited, so a test can
start the agent again without booting the RM VM again.  Progress lines ``RMVM-...`` go to
stdout = hvc0, which xenconsoled logs in dom0.
"""

from __future__ import annotations

import sys
import time

#: How long dom0 may take to write the configuration (a test may start the next agent late).
GUEST_WAIT = 600.0
#: Relative: /local/domain/<this RM VM>/data/dmore-agent-conf (dom0 writes it).
CONF_KEY = "data/dmore-agent-conf"
CONF_FILE = "/run/agent.conf"
#: The configuration is read once, at boot of each agent; a plain re-read loop is enough here.
POLL = 0.2


def say(msg: str) -> None:
    print(f"RMVM-{msg}", flush=True)


def main() -> int:
    t0 = time.monotonic()
    say("RUNNER")
    # the slow imports, before we wait
    from dmore_nova.cmd import rm_agent
    from dmore_nova.xen.real.xen import RealXen, connect_xenstore
    say(f"IMPORTED {time.monotonic() - t0:.1f} s")
    xs = connect_xenstore()
    say(f"AGENT-READY dom{RealXen(xs).domid} imports {time.monotonic() - t0:.1f} s")
    while True:
        deadline = time.monotonic() + GUEST_WAIT
        while (conf := xs.read(CONF_KEY)) is None:
            if time.monotonic() > deadline:
                say(f"FAILED no {CONF_KEY} after {GUEST_WAIT:.0f} s")
                return 1
            time.sleep(POLL)
        with open(CONF_FILE, "wb") as f:
            f.write(conf)
        try:
            xs.rm(CONF_KEY)
        except OSError as exc:  # then a restart needs a new value
            say(f"AGENT-CONF not removed: {exc!r}")
        say("AGENT-CONF " + conf.decode(errors="replace").replace("\n", " "))
        rc = rm_agent.main(["--config-file", CONF_FILE])
        say(f"AGENT-EXITED {rc}")


if __name__ == "__main__":
    sys.exit(main())
