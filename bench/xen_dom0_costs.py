"""What things cost in dom0 of the xenbox (Xen 4.17 PV dom0 under QEMU/TCG), next to the host.

Why: Table 1's agent path (``bench/xen_table1.py``) runs Python in a PV dom0 under TCG, where
the price list is nothing like a laptop's: there is no vDSO clock (``clocksource`` is
``xen``), so reading the clock is a system call, and every system call, event-channel
operation and TCP send goes through the emulated hypervisor.  These numbers are why the
agent batches event-channel reads/unmasks and notifies, and what part of a key's echo is
the platform's (the TCP send to the viewer) rather than the agent's.

Measured by the same script on the host and in dom0 (dom0's Debian python3, the checkout
shared at /mnt/src): per-call time of ``time.monotonic()``, ``os.getppid()``, one Python loop
iteration, one ctypes call, ``epoll.poll(0)``, a 4-byte send+recv over a socketpair, and a
TCP ``send`` (TCP_NODELAY) of 64 B..50 kB to a sink on the host (dom0: through the NIC and
QEMU's user-mode network, as an RFB update to a viewer); and the agent's own steps for one
echo, on an 8x16 glyph cell of an 800x600 screen: the numpy calls its display and encoder make
(emulated SSE: each call costs far more than its Python), reading one UPDATE from the out ring,
the compare and the Raw encoding, and one turn of the asyncio loop.

Run (exclusive box lock):
    flock -x -w 1800 /tmp/xb/box.lock .venv/bin/python bench/xen_dom0_costs.py \\
        --update BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SECTION_START = "<!-- dom0costs:start -->"
SECTION_END = "<!-- dom0costs:end -->"
SIZES = (64, 600, 5000, 50000)


def measure(tcp: tuple[str, int] | None) -> dict[str, float]:
    """Microseconds per call (median of rounds); runs on the host and in dom0."""
    import ctypes
    import select

    def per_call(fn, n: int, rounds: int = 5) -> float:
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            fn(n)
            times.append((time.perf_counter() - t) / n * 1e6)
        return sorted(times)[rounds // 2]

    def clock(n: int) -> None:
        m = time.monotonic
        for _ in range(n):
            m()

    def getppid(n: int) -> None:
        g = os.getppid
        for _ in range(n):
            g()

    def loop(n: int) -> None:
        s = 0
        for i in range(n):
            s += i

    libc = ctypes.CDLL(None)

    def ctypes_call(n: int) -> None:
        a = libc.abs
        for _ in range(n):
            a(-3)

    a, b = socket.socketpair()

    def pair(n: int) -> None:
        for _ in range(n):
            a.send(b"ping")
            b.recv(16)

    ep = select.epoll()
    ep.register(b.fileno(), select.EPOLLIN)

    def epoll0(n: int) -> None:
        for _ in range(n):
            ep.poll(0)

    out = {
        **agent_steps(per_call),
        "time.monotonic()": per_call(clock, 500),
        "os.getppid()": per_call(getppid, 500),
        "Python loop iteration": per_call(loop, 20000),
        "ctypes call (libc abs)": per_call(ctypes_call, 2000),
        "epoll.poll(0)": per_call(epoll0, 500),
        "socketpair send+recv 4 B": per_call(pair, 200),
    }
    if tcp is not None:
        s = socket.create_connection(tcp)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for size in SIZES:
            data = b"x" * size
            ts = []
            for _ in range(40):
                t = time.perf_counter()
                s.sendall(data)
                ts.append((time.perf_counter() - t) * 1e6)
                time.sleep(0.02)  # one update at a time, as a viewer gets them
            out[f"TCP send {size} B to the host"] = sorted(ts)[len(ts) // 2]
        s.close()
    return out


def agent_steps(per_call) -> dict[str, float]:
    """The agent's per-echo steps, on an 8x16 cell of an 800x600 screen."""
    import asyncio

    import numpy as np

    from dmore_nova.rm_vm.backends.vfb import VfbDisplay
    from dmore_nova.rm_vm.rfb.display import Rect
    from dmore_nova.rm_vm.rfb.encodings.raw import RawEncoder
    from dmore_nova.rm_vm.rfb.pixelformat import NATIVE
    from dmore_nova.xen.io import fbif as F

    live = np.zeros((600, 800), np.uint32)
    disp = VfbDisplay()
    disp.attach(live)
    glyph = Rect(16, 32, 8, 16)
    cell = live[32:48, 16:24]

    def slice_copy(n: int) -> None:
        for _ in range(n):
            live[32:48, 16:24].copy()

    def changed(n: int) -> None:
        for i in range(n):
            cell[0, 0] = i          # differs from the copy each time
            disp.changed(glyph)

    enc = RawEncoder()
    fb = disp.framebuffer()

    def raw(n: int) -> None:
        for _ in range(n):
            enc.encode(fb, glyph, NATIVE)

    page = F.XenfbPage(memoryview(bytearray(4096)), "x86_64-abi")
    update = [F.XenfbUpdate(x=16, y=32, width=8, height=16)]

    def ring(n: int) -> None:
        for _ in range(n):
            F.fb_out_put(page, update)
            F.fb_out_read(page)  # what the agent reads with

    def loop_turns(n: int) -> None:
        loop = asyncio.new_event_loop()
        left = [n]
        done = loop.create_future()

        def again() -> None:
            left[0] -= 1
            if left[0]:
                loop.call_soon(again)
            else:
                done.set_result(None)
        loop.call_soon(again)
        loop.run_until_complete(done)
        loop.close()

    return {
        "numpy: copy an 8x16 slice": per_call(slice_copy, 200),
        "VfbDisplay.changed(8x16 glyph), pixels differ": per_call(changed, 200),
        "Raw encoding of the 8x16 glyph (32 bpp)": per_call(raw, 200),
        "one UPDATE into and out of the vfb out ring": per_call(ring, 200),
        "asyncio loop turn (call_soon)": per_call(loop_turns, 200),
    }


def sink() -> tuple[int, threading.Thread]:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(4)

    def run() -> None:
        while True:
            c, _ = ls.accept()
            while c.recv(1 << 16):
                pass
            c.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return ls.getsockname()[1], t


def run(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(REPO / "bench"))
    import benchmeta

    from tests.xen.conftest import load_xenbox

    load_before = os.getloadavg()
    port, _ = sink()
    host = measure(("127.0.0.1", port))
    xb = load_xenbox()
    art = xb.build()
    with xb.XenBox(art, forwards=(5900,)) as box:
        r = box.sh(f"cd /mnt/src && python3 bench/xen_dom0_costs.py --inner {port}", 600)
        dom0 = json.loads(r.output.strip().splitlines()[-1])
        clocksource = box.sh("cat /sys/devices/system/clocksource/clocksource0/"
                             "current_clocksource", check=False).output.strip()
    return {"host": host, "dom0": dom0, "dom0_clocksource": clocksource,
            "meta": benchmeta.machine_info("xen_dom0_costs.py", args.argv, load_before)}


def markdown(result: dict) -> str:
    m = result["meta"]
    rows = ["| operation | host µs | dom0 µs | dom0 / host |", "|---|---|---|---|"]
    for k, h in result["host"].items():
        d = result["dom0"][k]
        rows.append(f"| {k} | {h:.2f} | {d:.1f} | {d / h:.0f}× |")
    return "\n".join([
        SECTION_START,
        "## What things cost in the xenbox's dom0 (PV dom0 under QEMU/TCG)",
        "",
        "Per-call times of the operations a key's echo is made of, by the same script on the "
        "host and in dom0 (dom0's python3), medians. Method: docstring of "
        "`bench/xen_dom0_costs.py`.",
        "",
        "```",
        m["command"],
        "```",
        "",
        *rows,
        "",
        f"- dom0 clocksource: `{result['dom0_clocksource']}` (no vDSO: reading the clock is a "
        "system call).",
        f"- date: {m['date']}; git: {m['git']}",
        f"- machine: `{m['uname']}`; CPU: {m['cpu']}; nproc: {m['nproc']}; load average "
        f"before/after: {m['loadavg_before'][0]:.2f}/{m['loadavg_after'][0]:.2f}",
        SECTION_END,
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inner", type=int, metavar="PORT", help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--update", type=Path, default=None, metavar="BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.inner is not None:  # in dom0
        print(json.dumps(measure(("10.0.2.2", args.inner))))  # QEMU user net: the host
        return 0
    args.argv = sys.argv[1:] if argv is None else argv
    result = run(args)
    text = markdown(result)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.update:
        sys.path.insert(0, str(REPO / "bench"))
        import benchmeta
        benchmeta.update_section(args.update, SECTION_START, SECTION_END, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
