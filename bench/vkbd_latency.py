"""RFB KeyEvent received -> xenkbd KEY event in the guest's ring + event-channel notify.

The seed paper's Table 1 measured 108.2 us for D-MORE's path (97.2 us conventional).  This is
the same hop in our agent: the timer starts when the KeyEvent bytes are handed to the viewer's
``data_received`` (what asyncio calls when the socket is readable) and stops when that call
returns, by which time the protocol core has parsed the message, the vkbd backend has mapped
the keysym, written the ring slot, bumped ``in_prod`` and notified the frontend's port.  A
guest-side check confirms every sample's event really is in the ring.

Two modes in one run: **warm**, samples back to back (the hop's own cost), and **paced**, a
random 1-3 ms pause before each sample, as real keystrokes never come back to back (the CPU
idles in between and the next key meets cold caches).  A separate, instrumented pass
(``--breakdown``) times the stages inside the hop, to say where the time goes; its own
overhead makes its totals larger, so the table's numbers come from the uninstrumented passes.

    .venv/bin/python bench/vkbd_latency.py [--samples N] [--breakdown] [--update BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import benchmeta  # noqa: E402

from dmore_nova.rm_vm.agent import RMAgent  # noqa: E402
from dmore_nova.rm_vm.backends import vkbd as vkbd_mod  # noqa: E402
from dmore_nova.xen.io import kbdif as K  # noqa: E402
from dmore_nova.xen.io.xenbus import XenbusState  # noqa: E402
from dmore_nova.xen.sim.supervisor import Supervisor  # noqa: E402
from tests.integration.manual_frontend import ManualKbd, plug  # noqa: E402

SECTION_START, SECTION_END = "<!-- vkbd:start -->", "<!-- vkbd:end -->"
MODES = ("warm", "paced")
#: Targets of issue 3 for this hop.
TARGET_P50_US, TARGET_P99_US = 30.0, 200.0


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


class Stages:
    """Instrumented pass: wraps the vkbd backend's ``key``, the ring write and the notify."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {"translate + queue": [], "ring write": [],
                                              "notify": []}
        self._undo: list[Callable[[], None]] = []

    @staticmethod
    def _timed(fn: Callable, sink: list[float]) -> Callable:
        def wrapper(*a, **kw):
            t0 = time.perf_counter_ns()
            try:
                return fn(*a, **kw)
            finally:
                sink.append((time.perf_counter_ns() - t0) / 1000)
        return wrapper

    def install(self, agent: RMAgent) -> None:
        vkbd = agent.vkbd
        key, put, notify = vkbd.key, vkbd_mod.K.kbd_in_put, vkbd.evtchns.notify
        key_times: list[float] = []
        vkbd.key = self._timed(key, key_times)
        vkbd_mod.K.kbd_in_put = self._timed(put, self.times["ring write"])
        vkbd.evtchns.notify = self._timed(notify, self.times["notify"])
        self._key_times = key_times

        def undo() -> None:
            del vkbd.key
            vkbd_mod.K.kbd_in_put = put
            del vkbd.evtchns.notify
        self._undo.append(undo)

    def finish(self, warmup: int) -> dict[str, float]:
        for undo in self._undo:
            undo()
        ring, notify = self.times["ring write"][warmup:], self.times["notify"][warmup:]
        keys = self._key_times[warmup:]
        rest = [k - r - n for k, r, n in zip(keys, ring, notify, strict=True)]
        return {"translate + queue": statistics.median(rest),
                "ring write": statistics.median(ring), "notify": statistics.median(notify),
                "vkbd total": statistics.median(keys)}


async def measure(host, samples: int, paced: bool, stages: Stages | None = None,
                  warmup: int = 50) -> tuple[list[float], dict[str, float] | None]:
    with host.toolstack() as ts:
        guest = ts.create_domain(f"bench-{'paced' if paced else 'warm'}-{len(ts.list_domains())}",
                                 512)
    xen0 = host.xen(0)
    plug(xen0.xenstore, guest, 0, "vkbd")
    agent = RMAgent(xen0, guest)
    port = await agent.start("127.0.0.1", 0)
    kernel = host.kernel(guest)
    kbd = ManualKbd(kernel, 0)
    kbd.publish()
    while agent.vkbd.state is not XenbusState.Connected:
        await asyncio.sleep(0.01)
    # A real viewer: connect and finish the handshake, then drive its Viewer directly.
    loop = asyncio.get_running_loop()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)

    async def recv(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            buf += await loop.sock_recv(sock, n - len(buf))
        return buf

    await recv(12)
    await loop.sock_sendall(sock, b"RFB 003.008\n")
    n = (await recv(1))[0]
    await recv(n)
    await loop.sock_sendall(sock, b"\x01")
    await recv(4)
    await loop.sock_sendall(sock, b"\x01")
    await recv(20)  # ServerInit: size + pixel format
    await recv(struct.unpack(">I", await recv(4))[0])  # desktop name
    while not agent.server.viewers or agent.server.viewers[0].conn.state.name != "NORMAL":
        await asyncio.sleep(0.01)
    viewer = agent.server.viewers[0]
    page = K.XenkbdPage(kbd.page)
    if stages is not None:
        stages.install(agent)
    times: list[float] = []
    for i in range(samples + warmup):
        msg = struct.pack(">BBxxI", 4, 1, ord("a") + i % 26)
        prod = page.in_prod
        t0 = time.perf_counter_ns()
        viewer.data_received(msg)
        t1 = time.perf_counter_ns()
        assert page.in_prod == (prod + 1) & 0xFFFFFFFF, (
            f"event not in the ring: {agent.vkbd.closed_reason} {len(agent.vkbd.queue)} {prod}")
        page.in_cons = page.in_prod  # the guest consumes
        if i >= warmup:
            times.append((t1 - t0) / 1000)
        # "warm": back to back.  "paced": a random 1-3 ms pause first, as real keystrokes are
        # never back to back; the CPU may idle (and other processes run) in between, which is
        # what a single key press meets.
        await asyncio.sleep(random.uniform(0.001, 0.003) if paced else 0)
    breakdown = stages.finish(warmup) if stages is not None else None
    sock.close()
    await agent.stop()
    kernel.close()
    xen0.close()
    return times, breakdown


def _reference_work() -> bytes:
    """A fixed piece of pure-Python work (dict, struct, bytes), about as long as the hop."""
    slots = {}
    for i in range(60):
        slots[i] = struct.pack("<I", i)
    return b"".join(slots.values())


def platform_floor(samples: int) -> dict[str, dict[str, float]]:
    """The same warm/paced regimes applied to work that is not ours: how much slower the
    machine itself runs the same code after a 1-3 ms pause.  ``send`` is a 4-byte datagram to
    another process blocked in ``recv`` (what a notify costs the sim, minus our code)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # the waiting peer
        a.close()
        while b.recv(16):
            pass
        os._exit(0)
    b.close()
    out: dict[str, dict[str, float]] = {}
    try:
        for name, fn in (("pure-Python reference work", _reference_work),
                         ("4-byte send to a waiting process", lambda: a.send(b"\0\0\0\0"))):
            out[name] = {}
            for mode in MODES:
                times = []
                for i in range(samples + 50):
                    if mode == "paced":
                        time.sleep(random.uniform(0.001, 0.003))
                    t0 = time.perf_counter_ns()
                    fn()
                    t1 = time.perf_counter_ns()
                    if i >= 50:
                        times.append((t1 - t0) / 1000)
                out[name][mode] = statistics.median(times)
    finally:
        a.close()
        os.waitpid(pid, 0)
    return out


def run(samples: int, breakdown: bool) -> dict:
    base = tempfile.mkdtemp(prefix="dbench", dir="/tmp")
    shm = f"/dev/shm/dbench-{os.getpid()}"
    sup = Supervisor(base, shm)
    host = sup.start_host("b", log_level="WARNING")
    result: dict = {"runs": {}, "breakdown": {}}
    try:
        for mode in MODES:
            times, _ = asyncio.run(measure(host, samples, mode == "paced"))
            result["runs"][mode] = times
        if breakdown:
            for mode in MODES:
                _, stages = asyncio.run(measure(host, samples, mode == "paced", Stages()))
                result["breakdown"][mode] = stages
    finally:
        sup.stop_host("b")
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    result["floor"] = platform_floor(min(samples, 2000))
    return result


def table(result: dict) -> str:
    rows = ["| path | samples | min µs | p50 µs | p90 µs | p99 µs | max µs | mean µs |",
            "|---|---|---|---|---|---|---|---|"]
    for mode, times in result["runs"].items():
        p50, p90, p99 = (percentile(times, p) for p in (50, 90, 99))
        rows.append(f"| sim, agent as dom0, {mode} | {len(times)} | {min(times):.1f} | "
                    f"{p50:.1f} | {p90:.1f} | {p99:.1f} | {max(times):.1f} | "
                    f"{statistics.mean(times):.1f} |")
    rows += ["", "The machine itself, same regimes, same run (medians in µs):", "",
             "| work | warm | paced | paced / warm |", "|---|---|---|---|"]
    for name, m in result["floor"].items():
        rows.append(f"| {name} | {m['warm']:.1f} | {m['paced']:.1f} | "
                    f"{m['paced'] / m['warm']:.1f}× |")
    hop = {mode: percentile(times, 50) for mode, times in result["runs"].items()}
    rows.append(f"| the hop (this benchmark) | {hop['warm']:.1f} | {hop['paced']:.1f} | "
                f"{hop['paced'] / hop['warm']:.1f}× |")
    if result["breakdown"]:
        stages = list(next(iter(result["breakdown"].values())))
        rows += ["", "Instrumented pass, medians in µs:", "",
                 "| mode | " + " | ".join(stages) + " |", "|---" * (len(stages) + 1) + "|"]
        for mode, b in result["breakdown"].items():
            rows.append(f"| {mode} | " + " | ".join(f"{b[s]:.1f}" for s in stages) + " |")
    return "\n".join(rows)


def verdict(result: dict) -> str:
    lines = []
    for mode, times in result["runs"].items():
        p50, p99 = percentile(times, 50), percentile(times, 99)
        ok = p50 <= TARGET_P50_US and p99 <= TARGET_P99_US
        lines.append(f"- {mode}: p50 {p50:.1f} µs, p99 {p99:.1f} µs against the targets p50 ≤ "
                     f"{TARGET_P50_US:.0f} / p99 ≤ {TARGET_P99_US:.0f} µs: "
                     f"**{'met' if ok else 'not met'}**")
    return "\n".join(lines)


def markdown(result: dict, notes: str) -> str:
    m = result["meta"]
    return f"""{SECTION_START}
## RFB KeyEvent → guest's vkbd ring + notify

From the moment a viewer's KeyEvent bytes are handed to the server's `data_received` to the
return of that call, by which time the protocol core parsed it, the vkbd backend mapped the keysym,
wrote the `xenkbd_key` slot, bumped `in_prod` and notified the frontend's event channel. The agent
runs as dom0 of a sim host; the guest side is in the same process (it checks `in_prod` after every
sample and consumes). Two modes in one run: **warm** = samples back to back; **paced** = a random
1–3 ms pause before each sample, as real keystrokes never come back to back (the CPU idles in
between). The seed paper's table 1, for comparison only (end to end on real Xen, different
hardware): 97.2 µs conventional, 108.2 µs D-MORE. The anchor for the whole path (QEMU's VNC
server and xenfb backend, key → echo) is in the key-latency and Table 1 sections.

- Command: `{m['command']}`
- Date: {m['date']}, commit {m['git']}
- Machine: {m['cpu']}, {m['nproc']} cores, Python {m['python']} (`{m['uname']}`)
- Load average before / after: {m['loadavg_before'][0]:.2f} / {m['loadavg_after'][0]:.2f}

{table(result)}

{verdict(result)}

{notes}
{SECTION_END}"""


NOTES = """How the hop got here: the notify was a hypercall request with a reply (85 µs round
trip), then a posted request whose replies had to be read every 32 keys (the old p99 tail); it is
now one 4-byte datagram on the event-channel handle's own socket, as libxenevtchn's notify is an
ioctl on the evtchn fd. The sim host runs
`SCHED_BATCH` so its wake-up does not preempt the notifier. The hot path packs each key slot once
(cached per keycode), reads the ring indices once, skips the 2**32-wrap slot scan unless the
unconsumed window crosses the wrap, and parses KeyEvent first.
In the paced mode every stage is several times slower than warm although the code and the work
are the same: after a 1-3 ms pause this machine (a VM on a shared host) runs *any* code slower,
as the reference rows show for work that is not ours (pure Python, and a bare 4-byte send to a
waiting process). Pinning the agent and the sim host to one CPU (`taskset -c 0`) does not change
the paced p50 (75 µs in a 2,000-sample run) but cuts its p99 tail (129 µs), which comes from
other processes running on the agent's CPU in the pauses."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--breakdown", action="store_true",
                    help="also run an instrumented pass per mode (stage medians)")
    ap.add_argument("--update", type=Path, default=None, metavar="BENCHMARKS.md",
                    help="rewrite this benchmark's section of that file")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    result = run(args.samples, args.breakdown)
    result["meta"] = benchmeta.machine_info("vkbd_latency.py", sys.argv[1:] if argv is None
                                            else argv, load_before)
    print(table(result))
    print(verdict(result))
    if args.update:
        benchmeta.update_section(args.update, SECTION_START, SECTION_END,
                                 markdown(result, NOTES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
