"""The control channel's asyncio shell (dmore_nova.rm_vm.xs_control) with an in-memory xenstore
and a recording agent: the failure branches the sim test cannot reach quickly (xl never renames
the incoming domain; an agent hook raising; xenstore unreadable)."""

from __future__ import annotations

import asyncio
import json
import socket
from types import SimpleNamespace

import pytest

from dmore_nova.rm_vm.control import ACK_KEY, REQUEST_KEY, Phase
from dmore_nova.rm_vm.xs_control import XenstoreControl
from dmore_nova.xen.api import XenError


class MemStore:
    """Enough of api.XenStore: a dict, watches that fire on writes under their path."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.watches: dict[str, str] = {}
        self.events: list[tuple[str, str]] = []
        self.r, self.w = socket.socketpair()
        self.fail_reads = False

    def read(self, path):
        if self.fail_reads:
            raise XenError(110, "xenstore READ timed out")
        return self.data.get(path)

    def write(self, path, value):
        self.data[path] = value.encode() if isinstance(value, str) else value
        for wpath, token in self.watches.items():
            if path == wpath or path.startswith(wpath + "/"):
                self.events.append((path, token))
                self.w.send(b"x")

    def rm(self, path):
        for k in [k for k in self.data if k == path or k.startswith(path + "/")]:
            del self.data[k]

    def mkdir(self, path):
        self.data.setdefault(path, b"")

    def set_perms(self, path, perms):
        pass

    def directory(self, path):
        return sorted({k[len(path) + 1:].split("/")[0] for k in self.data
                       if k.startswith(path + "/")})

    def run_transaction(self, fn):
        return fn(self)

    def watch(self, path, token):
        self.watches[path] = token

    def unwatch(self, path, token):
        self.watches.pop(path, None)

    def watch_fileno(self):
        return self.r.fileno()

    def read_watch_events(self):
        self.r.recv(4096)
        ev, self.events = self.events, []
        return ev


class Xen:
    def __init__(self, xs: MemStore, domid: int) -> None:
        self.xenstore, self._domid = xs, domid

    @property
    def domid(self):
        return self._domid


class FakeAgent:
    def __init__(self, xs: MemStore, *, plug_vfb: bool = False) -> None:
        self.xen = Xen(xs, 5)
        self.plug_vfb, self.devid, self.guest_domid = plug_vfb, 0, 4
        self.calls: list[str] = []
        self.held: list = [1, 2]
        self.held_dropped = self.requeued_input = self.rehomes = 0
        self.fail_on: str | None = None
        self.vkbd = SimpleNamespace(dropped=0, abs_pointer=True)

    def _call(self, name):
        self.calls.append(name)
        if self.fail_on == name:
            raise RuntimeError(f"{name} broke")

    def release_devices(self):
        self._call("release")

    def reconnect_devices(self):
        self._call("reconnect")
        return 2

    async def wait_until(self, pred, timeout):
        return True

    def devices_connected(self):
        return True

    def thaw(self):
        self._call("thaw")
        return len(self.held)

    def refresh(self):
        return 1

    def rehome(self, xen, domid):
        self._call(f"rehome {domid}")


async def settle(ctl: XenstoreControl, xs: MemStore, seq: str, states=None) -> dict:
    for _ in range(200):
        await asyncio.sleep(0.01)
        raw = xs.data.get(ACK_KEY)
        ack = json.loads(raw) if raw else {}
        if ack.get("seq") == seq and (states is None or ack.get("state") in states):
            return ack
    raise AssertionError(f"no ack for {seq}: {xs.data.get(ACK_KEY)!r}")


def run(coro):
    return asyncio.run(coro)


def test_refused_request_changes_nothing_and_prepare_resume_call_the_hooks():
    async def main():
        xs = MemStore()
        agent = FakeAgent(xs)
        ctl = XenstoreControl(agent, xs)
        ctl.start()
        xs.write(REQUEST_KEY, "1 incoming 9 guest")
        ack = await settle(ctl, xs, "1")
        assert ack == {"seq": "1", "state": "error",
                       "error": "incoming is not allowed while serving"}
        assert agent.calls == [] and ctl.phase is Phase.SERVING
        xs.write(REQUEST_KEY, "2 prepare")
        ack = await settle(ctl, xs, "2")
        assert ack["state"] == "prepared" and ack["domid"] == 5 and ack["held"] == 2
        assert agent.calls == ["release"] and ctl.phase is Phase.PREPARED
        xs.write(REQUEST_KEY, "3 resume")
        ack = await settle(ctl, xs, "3")
        assert (ack["state"], ack["reconnected"], ack["replayed"]) == ("resumed", 2, 2)
        assert agent.calls == ["release", "reconnect", "thaw"] and ctl.phase is Phase.SERVING
        await ctl.stop()
    run(main())


def test_incoming_never_renamed_goes_back_to_prepared_and_unplugs():
    async def main():
        xs = MemStore()
        agent = FakeAgent(xs, plug_vfb=True)
        ctl = XenstoreControl(agent, xs, rename_timeout=0.3)
        ctl.start()
        xs.write(REQUEST_KEY, "1 prepare")
        await settle(ctl, xs, "1")
        xs.write("/local/domain/9/name", "guest--incoming")
        xs.write(REQUEST_KEY, "2 incoming 9 guest")
        ack = await settle(ctl, xs, "2", ("plugged",))
        assert ack["vfb"] is True and xs.data["/local/domain/9/device/vfb/0/backend"] == \
            b"/local/domain/5/backend/vfb/9/0"
        xs.write("/local/domain/9/name", "something-else")  # a watch event, not the name
        ack = await settle(ctl, xs, "2", ("error",))
        assert ack["error"] == "dom9 not named 'guest' after 0 s"
        assert ctl.phase is Phase.PREPARED and ctl.proto.busy is None
        assert "rehome 9" not in agent.calls
        assert xs.directory("/local/domain/9/device/vfb") == []
        assert xs.directory("/local/domain/5/backend/vfb") == []
        # then resume from there works
        xs.write(REQUEST_KEY, "3 resume")
        ack = await settle(ctl, xs, "3")
        assert ack["state"] == "resumed" and ack["noop"] is False
        await ctl.stop()
    run(main())


def test_incoming_renamed_rehomes_and_acks_done():
    async def main():
        xs = MemStore()
        agent = FakeAgent(xs)
        ctl = XenstoreControl(agent, xs)
        ctl.start()
        xs.write(REQUEST_KEY, "1 prepare")
        await settle(ctl, xs, "1")
        xs.write(REQUEST_KEY, "2 incoming 9 guest")
        ack = await settle(ctl, xs, "2", ("plugged",))
        assert ack["vfb"] is False
        await asyncio.sleep(0.05)
        assert agent.calls == ["release"]
        xs.write("/local/domain/9/name", "guest")
        ack = await settle(ctl, xs, "2", ("done",))
        assert (ack["old"], ack["new"], ack["backend"], ack["replayed"]) == (4, 9, 5, 2)
        assert agent.calls == ["release", "rehome 9", "thaw"]
        assert ctl.phase is Phase.SERVING and "/local/domain/9/name" not in xs.watches
        await ctl.stop()
    run(main())


@pytest.mark.parametrize("hook, phase", [("release", Phase.SERVING),
                                         ("reconnect", Phase.PREPARED)])
def test_a_hook_that_raises_is_an_error_ack_and_the_agent_goes_on(hook, phase):
    async def main():
        xs = MemStore()
        agent = FakeAgent(xs)
        agent.fail_on = hook
        ctl = XenstoreControl(agent, xs)
        ctl.start()
        if hook == "reconnect":
            xs.write(REQUEST_KEY, "1 prepare")
            await settle(ctl, xs, "1")
        xs.write(REQUEST_KEY, "2 " + ("prepare" if hook == "release" else "resume"))
        ack = await settle(ctl, xs, "2")
        assert ack == {"seq": "2", "state": "error", "error": f"RuntimeError: {hook} broke"}
        assert ctl.phase is phase and ctl.proto.busy is None
        await ctl.stop()
    run(main())


def test_unreadable_request_waits_for_the_next_event():
    async def main():
        xs = MemStore()
        agent = FakeAgent(xs)
        ctl = XenstoreControl(agent, xs)
        ctl.start()
        xs.fail_reads = True
        xs.write(REQUEST_KEY, "1 prepare")
        await asyncio.sleep(0.05)
        assert ACK_KEY not in xs.data and agent.calls == []
        xs.fail_reads = False
        xs.write(REQUEST_KEY, "1 prepare")  # the next event (e.g. after our resume)
        ack = await settle(ctl, xs, "1")
        assert ack["state"] == "prepared"
        await ctl.stop()
    run(main())
