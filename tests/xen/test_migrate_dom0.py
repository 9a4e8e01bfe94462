"""Issue 5 §2 on real Xen 4.17: ``xl migrate`` (localhost) with the console open.

A vncdotool client stays connected to the dom0 RM agent and keeps typing into the guest's tty1
shell while xl migrates the guest.  The agent (``dmore-rm-agent`` with ``[agent]
follow_xl_migrate``: :mod:`dmore_nova.rm_vm.xl_follower` follows xl through xenstore) holds
input from the suspend request on, re-homes to the new domid (re-sending what the suspended
frontend had not consumed), re-maps the resumed frontends' new pages and re-binds their new
ports, replays what was held, and refreshes the viewer.  Afterwards every typed key must have
reached the guest once, in order, the client must never have been disconnected, and the old
backend nodes must be gone.
"""

from __future__ import annotations

import itertools
import json
import string
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.xen.dom0 import GUEST, ServedGuest, start_served_guest, stop_served_guest, wait_for
from tests.xen.screen import picture_problems

#: One key per this many seconds while xl migrates (a person typing steadily).
KEY_INTERVAL = 0.4
#: Longest marker typed (the tty1 line is 100 columns; the command must fit on one).
MAX_MARKER = 80
#: Keys of the marker kept for the switchover: once this few are left, typing pauses until
#: the agent saw the suspend request (a slow xl -- 60 s on a loaded machine -- would otherwise
#: let the typer finish before the guest suspends, and nothing would be held).
SWITCHOVER_KEYS = 30


@pytest.fixture(scope="module")
def served(xenbox) -> ServedGuest:
    t0 = time.monotonic()
    g = start_served_guest(xenbox, follow_migration=True)
    from tests.xen.conftest import TIMINGS
    TIMINGS["guest created + following agent up + tty1"] = time.monotonic() - t0
    yield g
    log = stop_served_guest(g)
    (Path(xenbox.run_dir) / "follow-agent-final.log").write_text(log)


def test_typing_continues_through_xl_migrate(served: ServedGuest, vncdotool_connect, xenbox):
    from tests.xen.conftest import TIMINGS
    c = vncdotool_connect("127.0.0.1", served.rfb_port, timeout=60)
    wait_for(lambda: any(s.lines[s.cursor[0]].startswith("guest# ") for s in served.screens()),
             90, "the guest's prompt")
    old = served.domid
    assert served.status()["abs_pointer"] is True  # the frontend asked for it at probe time
    assert served.xs_read(f"/local/domain/{old}/device/vkbd/0/request-abs-pointer") == "1"
    old_refs = {k: served.xs_read(f"/local/domain/{old}/device/vkbd/0/{k}")
                for k in ("page-ref", "event-channel")}

    typed: list[str] = []
    migrated = threading.Event()
    errors: list[BaseException] = []

    def suspend_seen() -> bool:
        try:
            return any(e["what"] == "suspend-requested" for e in served.status()["events"])
        except (OSError, ValueError, KeyError):
            return False

    def typer() -> None:
        try:
            c.type("echo MIG")
            for ch in itertools.cycle(string.ascii_lowercase + string.digits):
                if migrated.is_set() or len(typed) >= MAX_MARKER:
                    break
                while (len(typed) >= MAX_MARKER - SWITCHOVER_KEYS and not migrated.is_set()
                       and not suspend_seen()):
                    time.sleep(0.1)
                c.type(ch)
                typed.append(ch)
                time.sleep(KEY_INTERVAL)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    t = threading.Thread(target=typer, name="typer")
    t.start()
    time.sleep(2)  # some keys before xl starts
    t0 = time.monotonic()
    r = served.sh(f'xl migrate -s "" {GUEST} "xl migrate-receive" 2>&1', 300, check=False)
    TIMINGS["xl migrate (localhost)"] = time.monotonic() - t0
    time.sleep(2)  # and some after
    migrated.set()
    t.join(60)
    assert not errors, errors
    assert r.rc == 0 and "Migration successful" in r.output, r.output[-2000:]
    # libxl got its answer when it removed the source's vinput backend
    assert "unable to remove device" not in r.output, r.output[-2000:]
    c.type(" >/dev/hvc0")
    c.key("enter")

    new = int(served.sh(f"xl domid {GUEST}").output.strip())
    assert new != old
    marker = "MIG" + "".join(typed)
    assert len(typed) > 10, typed
    # No key lost, none doubled, in order: the guest's shell echoed exactly what was typed.
    wait_for(lambda: marker + "\n" in served.console_log().replace("\r", ""), 90,
             f"{marker} on hvc0")
    log = served.console_log().replace("\r", "")
    assert log.count(marker) == 1

    st = served.status()
    events = {e["what"]: e for e in st["events"]}
    assert st["guest_domid"] == new and st["rehomes"] == 1 and st["migrations"] == 1
    # Typing went on through the switchover: keys were held while the guest was suspended and
    # replayed after the re-map/re-bind, none dropped.
    assert events["thawed"]["replayed"] > 0, events
    assert st["held_dropped"] == 0 and st["vkbd_dropped"] == 0
    # (vkbd_requeued: events re-sent from the old ring; kept with the run's files)
    (Path(xenbox.run_dir) / "status-after-migrate.json").write_text(json.dumps(st, indent=1))
    TIMINGS["  input held (suspend request -> thaw)"] = (events["thawed"]["t"]
                                                         - events["suspend-requested"]["t"])
    TIMINGS["  guest started -> devices re-connected"] = events["devices-connected"]["seconds"]
    # request-abs-pointer: the resumed kbdfront does not write it again; the agent remembers.
    assert served.xs_read(f"/local/domain/{new}/device/vkbd/0/request-abs-pointer") is None
    assert st["abs_pointer"] is True

    # Re-mapped and re-bound: the new domain's devices are connected to the agent.
    fe_k, fe_f = f"/local/domain/{new}/device/vkbd/0", f"/local/domain/{new}/device/vfb/0"
    assert served.xs_read(f"{fe_k}/backend") == f"/local/domain/0/backend/vinput/{new}/0"
    for path in (f"{fe_k}/state", f"{fe_f}/state", f"/local/domain/0/backend/vinput/{new}/0/state",
                 f"/local/domain/0/backend/vfb/{new}/0/state"):
        assert served.xs_read(path) == "4", path
    assert served.xs_read(f"{fe_k}/page-ref") != old_refs["page-ref"]  # a new frame
    agent_log = served.agent_log()
    assert f"re-homed to dom{new}" in agent_log
    assert f"vkbd-{new}-0: connected (mapped + bound port" in agent_log
    assert f"vfb-{new}-0: connected (mapped + bound port" in agent_log
    # The old backend nodes are gone (libxl's vinput after our Closed; our own vfb).
    assert served.xs_tree(f"/local/domain/0/backend/vinput/{old}") == {}
    assert served.xs_tree(f"/local/domain/0/backend/vfb/{old}") == {}
    assert served.qemu_for_guest() == ""

    # The client was never disconnected: one RFB session in the agent's log, still open, and
    # it shows the guest's screen as the guest has it now.
    assert agent_log.count("session started") == 1 and ": closed:" not in agent_log
    screen = wait_for(lambda: next((s for s in reversed(served.screens())
                                    if any(marker in line for line in s.lines)
                                    and s.lines[s.cursor[0]].rstrip() == "guest#"), None),
                      90, "the guest's screen with the command and a new prompt")
    last: list[np.ndarray] = []

    def client_shows_it() -> bool:
        last[:] = [c.capture()]
        return not picture_problems(last[0], screen)
    try:
        wait_for(client_shows_it, 60, "the client's picture to match the guest's screen", 1.0)
    finally:
        if last:
            Image.fromarray(last[0]).save(Path(xenbox.run_dir) / "vncdotool-after-migrate.png")
    assert ": closed:" not in served.agent_log()
