"""Key -> visible-echo latency of our RFB server, measured side by side with QEMU's VNC server.

Why this method: what a console user feels is the time from pressing a key to seeing it.  Both
servers here show a text console that echoes typed characters (QEMU: its monitor on a ``vc``
console; ours: the built-in demo display), and both are driven by the *same* raw client
(``rfb_client.py``) in the same run, in alternating blocks, so machine noise hits both alike.

One sample:
  1. The client always keeps an incremental FramebufferUpdateRequest outstanding (it sends a new
     one the moment an update is in), as noVNC does.
  2. After a random 10-60 ms pause (so the key lands at a random phase of any server timer, e.g.
     QEMU's 30 ms display refresh and its 250 ms cursor blink), it writes KeyEvent down for a
     printable character and takes ``t0`` just before the write.
  3. ``t1`` is when the first FramebufferUpdate that makes the screen *differ from every idle
     state* has been completely received.  Idle states are learnt before measuring: the screen
     fingerprints seen while nothing is typed (QEMU's blinking cursor gives two).  So a cursor
     blink that happens to arrive first is skipped and counted, never taken for the echo.
  4. Key up, then BackSpace (down+up) erases the character; its echo is awaited (the screen must
     return to an idle state) but not counted, so the line never fills and every sample starts
     from the same screen.

Run:  .venv/bin/python bench/key_latency.py --samples 300 --markdown
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import benchmeta
from rfb_client import ENC_DESKTOPSIZE, ENC_RAW, RFBClient, RFBError, Update

REPO = Path(__file__).resolve().parent.parent
XK_BackSpace = 0xFF08
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
SECTION_START = "<!-- key-latency:start -->"
SECTION_END = "<!-- key-latency:end -->"
TARGET_P50_MS = 1.0
TARGET_RATIO = 0.5


# -- servers --------------------------------------------------------------------------------------
def free_port(candidates: list[int]) -> int:
    """The first port in ``candidates`` nothing listens on (bind test on 127.0.0.1)."""
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port among {candidates[0]}..{candidates[-1]}")


def wait_listening(port: int, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@dataclass
class Server:
    label: str
    port: int
    proc: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_qemu(tmp: Path, qemu: str, geometry: str) -> Server:
    """QEMU with no machine and no VGA: the VNC server shows console 0, the monitor on a text
    ``vc``, which echoes typed keys.  ``-machine none`` means no guest CPU competes for the
    2 cores while we measure."""
    port = free_port(list(range(5940, 6000)))
    log = tmp / "qemu.log"
    cmd = [qemu, "-display", "none", "-vga", "none", "-monitor", f"vc:{geometry}",
           "-vnc", f"127.0.0.1:{port - 5900}", "-nodefaults", "-nic", "none",
           "-machine", "none", "-accel", "tcg"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    server = Server("QEMU", port, proc, log)
    try:
        wait_listening(port, proc, log, 20)
    except BaseException:
        server.stop()
        raise
    return server


def start_ours(tmp: Path, geometry: str, profile: Path | None) -> Server:
    port = free_port(list(range(5990, 6040)))
    log = tmp / "ours.log"
    py = [sys.executable]
    if profile is not None:
        py += ["-m", "cProfile", "-o", str(profile)]
    cmd = py + ["-m", "dmore_nova.rm_vm.rfb", "--listen", f"127.0.0.1:{port}",
                "--geometry", geometry]
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    server = Server("ours", port, proc, log)
    try:
        wait_listening(port, proc, log, 30)
    except BaseException:
        server.stop()
        raise
    return server


# -- measuring ------------------------------------------------------------------------------------
@dataclass
class Target:
    """One server, one viewer connection, and what was measured on it."""

    label: str
    client: RFBClient
    pipeline: int
    idle: set[int] = field(default_factory=set)
    samples_ns: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # non-echo updates seen before the echo
    echo_bytes: list[int] = field(default_factory=list)
    failures: int = 0
    resyncs: int = 0
    updates: int = 0

    def start(self, encodings: list[int]) -> None:
        c = self.client
        c.set_pixel_format_rgb888()
        c.set_encodings(encodings)
        c.request_update(incremental=False)
        for _ in range(self.pipeline - 1):
            c.request_update(incremental=True)

    def next_message(self, timeout: float):
        m = self.client.read_message(timeout)
        if isinstance(m, Update):
            # Re-request at once: one request always outstanding, as a browser viewer does.
            self.client.request_update(incremental=True)
            self.updates += 1
        return m

    def pump(self, seconds: float) -> None:
        """Consume whatever the server sends for ``seconds`` (keeps the request outstanding)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.next_message(left)

    def settle(self, quiet: float, limit: float) -> None:
        """Wait until no *new* screen appears for ``quiet`` seconds; the screens seen since the
        last new one are the idle states (QEMU's cursor blink cycles through two)."""
        seen: dict[int, float] = {}
        last_new = start = time.monotonic()
        seen[self.client.digest()] = last_new
        while True:
            now = time.monotonic()
            if now - last_new >= quiet:
                self.idle = {d for d, t in seen.items() if t >= last_new}
                return
            if now - start > limit:
                raise RuntimeError(f"{self.label}: screen still changing after {limit} s")
            m = self.next_message(min(0.05, quiet))
            if isinstance(m, Update) and m.changed:
                d, now = self.client.digest(), time.monotonic()
                if d not in seen:
                    last_new = now
                seen[d] = now

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.client.digest() not in self.idle:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.next_message(left)
        return True

    def sample(self, ch: str, timeout: float, record: bool) -> None:
        c = self.client
        t0 = c.key_event(ord(ch), True)
        skipped = 0
        deadline = time.monotonic() + timeout
        echo: Update | None = None
        while echo is None:
            left = deadline - time.monotonic()
            m = self.next_message(left) if left > 0 else None
            if m is None:
                break
            if isinstance(m, Update):
                if m.changed and c.digest() not in self.idle:
                    echo = m
                else:
                    skipped += 1
        c.key_event(ord(ch), False)
        c.key_event(XK_BackSpace, True)
        c.key_event(XK_BackSpace, False)
        if record:
            if echo is None:
                self.failures += 1
            else:
                self.samples_ns.append(echo.t_done_ns - t0)
                self.skipped.append(skipped)
                self.echo_bytes.append(echo.nbytes)
        if not self.wait_idle(timeout):
            self.resyncs += 1
            self.settle(quiet=1.0, limit=30)


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def summarize(t: Target) -> dict:
    ms = sorted(v / 1e6 for v in t.samples_ns)
    stats = {"n": len(ms), "failures": t.failures, "resyncs": t.resyncs}
    if ms:
        stats.update({
            "min": ms[0], "p50": percentile(ms, 50), "p90": percentile(ms, 90),
            "p99": percentile(ms, 99), "max": ms[-1], "mean": sum(ms) / len(ms),
            "echo_after_other_updates": sum(1 for s in t.skipped if s),
            "echo_update_bytes_p50": percentile(sorted(t.echo_bytes), 50),
        })
    stats["samples_ms"] = [round(v / 1e6, 4) for v in t.samples_ns]
    return stats


def run(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    encodings = [ENC_RAW, ENC_DESKTOPSIZE]
    servers: list[Server] = []
    targets: list[Target] = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="key-latency-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            if not args.no_qemu:
                servers.append(start_qemu(tmp, args.qemu, args.geometry))
            if not args.no_ours:
                servers.append(start_ours(tmp, args.geometry, args.profile_ours))
            for s in servers:
                client = RFBClient.connect("127.0.0.1", s.port, timeout=10)
                t = Target(s.label, client, args.pipeline)
                t.start(encodings)
                targets.append(t)
            for t in targets:
                t.settle(quiet=args.settle, limit=60)
                # Warm-up: every character once (first-use costs such as glyph caches are not
                # what a user typing into a live console pays).
                for ch in CHARS:
                    t.sample(ch, args.timeout, record=False)
                    t.pump(rng.uniform(0.010, 0.060))
            blocks = -(-args.samples // args.block)
            i = 0
            for b in range(blocks):
                order = targets if b % 2 == 0 else targets[::-1]
                for t in order:
                    t.pump(0.1)
                    if not t.wait_idle(2.0):
                        t.resyncs += 1
                        t.settle(quiet=1.0, limit=30)
                    for _ in range(min(args.block, args.samples - b * args.block)):
                        t.pump(rng.uniform(args.min_pause, args.max_pause) / 1000)
                        t.sample(CHARS[i % len(CHARS)], args.timeout, record=True)
                        i += 1
        finally:
            for t in targets:
                t.client.close()
            for s in servers:
                s.stop()
    result = {
        "servers": {t.label: summarize(t) for t in targets},
        "meta": machine_info(args, load_before),
    }
    ours, qemu = result["servers"].get("ours"), result["servers"].get("QEMU")
    if ours and qemu and ours["n"] and qemu["n"]:
        result["ratio"] = {q: ours[q] / qemu[q] for q in ("p50", "p90")}
    return result


# -- reporting ------------------------------------------------------------------------------------
def machine_info(args: argparse.Namespace, load_before: tuple[float, float, float]) -> dict:
    return {
        **benchmeta.machine_info("key_latency.py", args.argv, load_before),
        "qemu": (benchmeta.sh([args.qemu, "--version"]).splitlines() or ["?"])[0],
        "pixel_format": "32 bpp little-endian true colour (as noVNC)",
        "encodings": "Raw (+ DesktopSize)",
        "geometry": args.geometry,
        "pause_ms": [args.min_pause, args.max_pause],
        "pipeline": args.pipeline,
    }


COLS = ("n", "min", "p50", "p90", "p99", "max", "mean")


def table(result: dict) -> str:
    rows = ["| server | " + " | ".join(c if c == "n" else f"{c} ms" for c in COLS)
            + " | failures | echo after another update |",
            "|---" * (len(COLS) + 3) + "|"]
    for label, s in result["servers"].items():
        vals = [str(s["n"]) if c == "n" else f"{s.get(c, float('nan')):.3f}" for c in COLS]
        rows.append(f"| {label} | " + " | ".join(vals)
                    + f" | {s['failures']} | {s.get('echo_after_other_updates', 0)} |")
    return "\n".join(rows)


def verdict(result: dict) -> list[str]:
    ours = result["servers"].get("ours")
    ratio = result.get("ratio")
    lines = []
    if ratio:
        lines.append(f"ratio ours/QEMU: p50 {ratio['p50']:.3f}, p90 {ratio['p90']:.3f}")
    if ours and ours["n"]:
        ok50 = ours["p50"] <= TARGET_P50_MS
        line = f"target ours p50 <= {TARGET_P50_MS} ms: {'met' if ok50 else 'MISSED'}"
        if ratio:
            okr = ratio["p50"] <= TARGET_RATIO and ratio["p90"] <= TARGET_RATIO
            line += f"; ratio <= {TARGET_RATIO} (p50 and p90): {'met' if okr else 'MISSED'}"
        lines.append(line)
    return lines


def markdown(result: dict) -> str:
    m = result["meta"]
    out = [
        SECTION_START,
        "## Key → echo latency",
        "",
        "Time from writing a KeyEvent (key down, printable character) to having completely "
        "received the first FramebufferUpdate that makes the screen differ from its idle states, "
        "measured by one raw RFB 3.8 client (`bench/rfb_client.py`, None auth, 32 bpp, Raw) "
        "against QEMU's VNC server (monitor on a `vc` text console, `-machine none`) and our "
        "server (`python -m dmore_nova.rm_vm.rfb`, demo echo display) in the same run, in "
        "alternating blocks. An incremental update request is always outstanding; keys are sent "
        f"after a random {m['pause_ms'][0]:g}–{m['pause_ms'][1]:g} ms pause; each character is "
        "erased with BackSpace (not counted). Method details: docstring of "
        "`bench/key_latency.py`.",
        "",
        "```",
        m["command"],
        "```",
        "",
        table(result),
        "",
    ]
    out += [f"- {line}" for line in verdict(result)]
    qemu, ours = result["servers"].get("QEMU"), result["servers"].get("ours")
    if qemu and qemu["n"]:
        out.append(f"- QEMU's samples spread from {qemu['min']:.1f} to {qemu['max']:.1f} ms "
                   f"(mean {qemu['mean']:.1f}): a key sent at a random phase waits for the next "
                   "tick of QEMU's 30 ms VNC refresh timer (`VNC_REFRESH_INTERVAL_BASE`). Ours "
                   "sends an update as soon as the display reports damage and a request is "
                   "outstanding.")
    if qemu and ours and qemu["n"] and ours["n"]:
        mins = f"minimum: QEMU {qemu['min']:.2f} ms, ours {ours['min']:.2f} ms"
        if abs(qemu["min"] - ours["min"]) < 0.1:
            mins += (" — about equal: the floor set by this Python client, loopback TCP and "
                     "wake-ups, not by either server")
        out.append(f"- {mins}. Tails (p99, max) move with whatever else runs on the 2 cores "
                   "(load average below).")
    out += [
        f"- date: {m['date']}; git: {m['git']}",
        f"- machine: `{m['uname']}`; CPU: {m['cpu']}; nproc: {m['nproc']}; "
        f"load average before/after: {m['loadavg_before'][0]:.2f}/{m['loadavg_after'][0]:.2f}",
        f"- {m['qemu']}; Python {m['python']}; screen {m['geometry']}",
        SECTION_END,
    ]
    return "\n".join(out)


def update_file(path: Path, block: str) -> None:
    benchmeta.update_section(path, SECTION_START, SECTION_END, block)

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=200, help="measured samples per server")
    p.add_argument("--block", type=int, default=25, help="samples per block before switching")
    p.add_argument("--min-pause", type=float, default=10.0, help="ms, random pause lower bound")
    p.add_argument("--max-pause", type=float, default=60.0, help="ms, random pause upper bound")
    p.add_argument("--timeout", type=float, default=2.0, help="s to wait for one echo")
    p.add_argument("--settle", type=float, default=1.0,
                   help="s without a new screen before the screen counts as stable")
    p.add_argument("--pipeline", type=int, default=1, help="update requests kept outstanding")
    p.add_argument("--geometry", default="800x600")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--qemu", default=shutil.which("qemu-system-x86_64") or "qemu-system-x86_64")
    p.add_argument("--no-qemu", action="store_true", help="measure only our server")
    p.add_argument("--no-ours", action="store_true", help="measure only QEMU")
    p.add_argument("--profile-ours", type=Path, default=None, metavar="FILE.prof",
                   help="run our server under cProfile (numbers then include its overhead)")
    p.add_argument("--json", type=Path, nargs="?", const=Path("-"), default=None,
                   metavar="FILE", help="write the results as JSON (to stdout without FILE)")
    p.add_argument("--markdown", action="store_true", help="print the BENCHMARKS.md block")
    p.add_argument("--update", type=Path, default=None, metavar="BENCHMARKS.md",
                   help="replace the key-latency section of this file")
    args = p.parse_args(argv)
    args.argv = argv
    if args.samples < 1 or args.block < 1 or args.pipeline < 1:
        p.error("--samples, --block and --pipeline must be >= 1")
    if not 0 <= args.min_pause <= args.max_pause:
        p.error("need 0 <= --min-pause <= --max-pause")
    try:
        result = run(args)
    except (RFBError, RuntimeError, OSError) as exc:
        print(f"key_latency: {exc}", file=sys.stderr)
        return 1
    print(table(result))
    for line in verdict(result):
        print(line)
    if args.profile_ours is not None and args.profile_ours.exists():
        import pstats

        print(f"\ncProfile of our server ({args.profile_ours}), top by cumulative time:")
        pstats.Stats(str(args.profile_ours)).sort_stats("cumulative").print_stats(30)
    if args.json is not None:
        text = json.dumps(result, indent=1)
        if str(args.json) == "-":
            print(text)
        else:
            args.json.write_text(text + "\n")
    block = markdown(result)
    if args.markdown:
        print()
        print(block)
    if args.update is not None:
        update_file(args.update, block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
