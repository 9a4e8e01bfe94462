"""Console blackout and cost of a co-migration, measured on ``dmore-nova demo``.

Why this method: what a console user sees during a live migration is a pause in the picture
(and, if things go wrong, lost keys or a dropped connection).  So the measuring client is a
viewer that types continuously, as a user would, and stamps every FramebufferUpdate:

1. ``dmore-nova demo`` runs as a subprocess (two sim hosts, the sim guest program with a real
   shell on its console, its RM VM, the console proxy); it is driven only through its control
   API, like ``dmore-nova migrate``.
2. One raw RFB 3.8 client (``rfb_client.py``, Raw, 32 bpp) connects *directly* to the RM
   agent's RFB endpoint.  A reader thread keeps one incremental update request outstanding
   and stamps each update with ``time.perf_counter()`` when its last byte is in.  A typist
   thread types ``echo <n><letters>`` lines at ``--rate`` keys/s; every key's echo makes an
   update, so a live console produces one every few ms.
3. For each migration (back and forth between the hosts, ``--migrations`` of them, typing all
   along): the **console blackout** is the largest gap between two consecutive updates that
   overlaps the switchover -- from the moment the RM agent froze input to its refresh, which
   the migration's record gives in CLOCK_MONOTONIC seconds, the clock of ``perf_counter``
   here (last update before -> first after, as this client saw it).  The longest gap earlier
   in the request (during pre-copy, while the console is live) is reported apart.  From the
   migration's record: guest downtime (source paused -> guest running on the destination),
   re-map + re-bind (RM re-home step + the backends' re-map/re-bind step), keys
   held during the switchover and replayed.
4. At the end the typist stops, and the keys the guest's kbdfront received (read over the guest
   program's control socket) are compared with every key typed: **keys lost** (typed, never
   received), **extra** (received more than typed: duplicates), **order** (received in typing
   order).  **Disconnects**: the client's socket closing, plus the records' viewer count.
5. Migration cost vs guest memory: for each ``--sizes`` (MiB), a fresh demo with a guest that
   big, ``--sweep-migrations`` migrations (typing too), the total co-migration time, the
   pre-copy time (the prepare step, which includes the destination domains' creation), the
   pages sent, downtime and blackout.

Target (issue 4): blackout <= guest downtime + 50 ms, 0 keys lost, 0 disconnects.

Run:  .venv/bin/python bench/migration_blackout.py --migrations 20 --update BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import benchmeta
from rfb_client import ENC_DESKTOPSIZE, ENC_RAW, RFBClient, RFBError, Update

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dmore_nova.xen.io import keymap  # noqa: E402
from dmore_nova.xen.sim.guest.control import GuestControl  # noqa: E402

SECTION_START = "<!-- migration:start -->"
SECTION_END = "<!-- migration:end -->"
TARGET_SLACK_MS = 50.0
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
XK_RETURN = 0xFF0D
KEY_ENTER = keymap.LINUX_KEYCODES["KEY_ENTER"]
START_TIMEOUT = 120.0
#: Seconds of typing before the first migration, between two, and after the last.
SETTLE = 0.4


# -- the demo ---------------------------------------------------------------------------------
class Demo:
    """``dmore-nova demo`` in a subprocess with its own run dir, memory dir and ports."""

    def __init__(self, memory_mb: int, log_dir: Path) -> None:
        self.run_dir = Path(tempfile.mkdtemp(prefix="dmb", dir="/tmp"))
        self.shm_dir = Path(f"/dev/shm/dmb-{os.getpid()}-{self.run_dir.name}")
        port, proxy_port = free_port(), free_port()
        self.api = f"http://127.0.0.1:{port}/api/"
        self.out = open(log_dir / f"demo-{memory_mb}M.out", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dmore_nova.cmd.dmore_nova", "demo", "--run-dir",
             str(self.run_dir), "--shm-dir", str(self.shm_dir), "--port", str(port),
             "--proxy-port", str(proxy_port), "--rfb-port", "0", "--guest-memory",
             f"{memory_mb}M"], stdin=subprocess.DEVNULL, stdout=self.out, stderr=self.out,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"demo exited with {self.proc.returncode}; see {self.out.name}")
            with contextlib.suppress(OSError, ValueError):
                if self.status()["demo"]["ready"]:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"demo not ready after {START_TIMEOUT}s")
            time.sleep(0.1)

    def _req(self, path: str, body: dict | None = None, timeout: float = 300.0) -> dict:
        req = urllib.request.Request(self.api + path,
                                     data=None if body is None else json.dumps(body).encode(),
                                     method="GET" if body is None else "POST")
        if body is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def status(self) -> dict:
        return self._req("status", timeout=10)

    def migrate(self, host: str) -> dict:
        return self._req("migrate", {"guest": "guest", "host": host})

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        shutil.rmtree(self.shm_dir, ignore_errors=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the viewer -------------------------------------------------------------------------------
def keycode(ch: str) -> int:
    return KEY_ENTER if ch == "\n" else keymap.keysym_to_linux(ord(ch))[0]


class TypingViewer:
    """A raw RFB client that types continuously and stamps every update (see the docstring)."""

    def __init__(self, host: str, port: int, rate: float) -> None:
        self.client = RFBClient.connect(host, port)
        self.client.set_pixel_format_rgb888()
        self.client.set_encodings([ENC_RAW, ENC_DESKTOPSIZE])
        self.period = 1.0 / rate
        self.updates: list[float] = []
        self.typed: list[str] = []
        self.disconnected: str | None = None
        self._send_lock = threading.Lock()
        self._typing = threading.Event()
        self._quit = threading.Event()
        self._orig_send = self.client._send
        self.client._send = self._locked_send  # the reader and the typist both send
        self.client.request_update(incremental=False)
        self._reader = threading.Thread(target=self._read, daemon=True, name="reader")
        self._typist = threading.Thread(target=self._type, daemon=True, name="typist")
        self._reader.start()
        self._typist.start()

    def _locked_send(self, data: bytes) -> None:
        with self._send_lock:
            self._orig_send(data)

    def _read(self) -> None:
        try:
            while not self._quit.is_set():
                msg = self.client.read_message(timeout=0.2)
                if isinstance(msg, Update):
                    self.updates.append(msg.t_done_ns / 1e9)
                    self.client.request_update(incremental=True)
        except (RFBError, OSError) as exc:
            if not self._quit.is_set():
                self.disconnected = str(exc)

    def _type(self) -> None:
        n = 0
        try:
            while not self._quit.is_set():
                if not self._typing.wait(0.1):
                    continue
                letters = "".join(ALPHABET[(n * 7 + k) % len(ALPHABET)] for k in range(20))
                for ch in f"echo {n:05d}{letters}\n":
                    if self._quit.is_set():
                        return
                    t_next = time.perf_counter() + self.period
                    keysym = XK_RETURN if ch == "\n" else ord(ch)
                    self.client.key_event(keysym, True)
                    self.client.key_event(keysym, False)
                    self.typed.append(ch)
                    delay = t_next - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                n += 1
                if not self._typing.is_set():
                    continue
        except (RFBError, OSError) as exc:
            self.disconnected = str(exc)

    def start_typing(self) -> None:
        self._typing.set()

    def stop_typing(self) -> None:
        """Stop after the current line (so the shell only ever sees whole echo lines)."""
        self._typing.clear()
        n = len(self.typed)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if len(self.typed) == n and (not self.typed or self.typed[-1] == "\n"):
                return
            n = len(self.typed)

    def close(self) -> None:
        self._quit.set()
        self._typing.set()
        self._typist.join(5)
        self._reader.join(5)
        self.client.close()


def blackout(updates: list[float], t0: float, t1: float) -> tuple[float, float, float] | None:
    """Largest gap between consecutive updates that overlaps [t0, t1]: (gap, before, after)."""
    best = None
    for a, b in zip(updates, updates[1:]):
        if b < t0 or a > t1:
            continue
        if best is None or b - a > best[0]:
            best = (b - a, a, b)
    return best


def largest_gap_within(updates: list[float], t0: float, t1: float) -> tuple[float, float,
                                                                          float] | None:
    """Largest gap between consecutive updates lying wholly inside [t0, t1]."""
    best = None
    for a, b in zip(updates, updates[1:]):
        if a >= t0 and b <= t1 and (best is None or b - a > best[0]):
            best = (b - a, a, b)
    return best


def compare_keys(typed: list[str], received: list[tuple[int, bool]]) -> dict:
    want = []
    for ch in typed:
        want += [(keycode(ch), True), (keycode(ch), False)]
    i = 0
    for ev in received:  # received must be `want` in order: count the longest in-order match
        if i < len(want) and ev == want[i]:
            i += 1
    return {"typed_events": len(want), "received_events": len(received),
            "lost": len(want) - i, "extra": len(received) - i, "in_order": received == want}


# -- runs ---------------------------------------------------------------------------------------
def run_migrations(demo: Demo, n: int, rate: float) -> dict:
    g = demo.status()["guests"][0]
    ctl = GuestControl(g["control_socket"])
    deadline = time.monotonic() + 20
    while not any("$" in line for line in (ctl.screen() or [])):
        if time.monotonic() > deadline:
            raise RuntimeError("no shell prompt on the guest's console")
        time.sleep(0.1)
    start = len(ctl.keys())
    viewer = TypingViewer(g["rm"]["rfb"]["host"], g["rm"]["rfb"]["port"], rate)
    samples = []
    try:
        viewer.start_typing()
        time.sleep(SETTLE)
        for _ in range(n):
            host = demo.status()["guests"][0]["host"]
            dst = "b" if host == "a" else "a"
            t0 = time.perf_counter()
            rec = demo.migrate(dst)
            t1 = time.perf_counter()
            time.sleep(SETTLE)
            # The switchover: from freezing input to the refresh (the demo's clock is
            # CLOCK_MONOTONIC, as perf_counter here).  Pre-copy stalls, if any, are reported
            # apart: the console is live then.
            win = rec["switchover_window"]
            w0, w1 = win["freeze"] or t0, win["refresh"] or t1
            gap = blackout(viewer.updates, w0, w1)
            pre = largest_gap_within(viewer.updates, t0, w0)
            samples.append({
                "ok": rec["ok"], "outcome": rec["outcome"],
                "blackout_ms": None if gap is None else gap[0] * 1e3,
                "precopy_gap_ms": None if pre is None else pre[0] * 1e3,
                "server_blackout_ms": rec["console_blackout_ms"],
                "downtime_ms": rec["guest_downtime_ms"],
                "remap_rebind_ms": (rec["rehome_ms"] or 0) + (rec["remap_rebind_ms"] or 0),
                "rehome_ms": rec["rehome_ms"], "remap_ms": rec["remap_rebind_ms"],
                "replay_ms": rec["steps_ms"].get("replay"),
                "total_ms": rec["total_ms"], "prepare_ms": rec["steps_ms"].get("prepare"),
                "pages_sent": rec["precopy"]["pages_sent"] if rec["precopy"] else None,
                "guest_pages": rec["precopy"]["guest_pages"] if rec["precopy"] else None,
                "held": rec["keys_held"], "lost_by_agent": rec["keys_lost"],
                "disconnects": rec["disconnects"],
            })
        viewer.stop_typing()
        want = 2 * len(viewer.typed)
        deadline = time.monotonic() + 20
        while len(ctl.keys()) - start < want and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.2)
        keys = compare_keys(viewer.typed, ctl.keys()[start:])
        rate_seen = len(viewer.typed) / max(
            (viewer.updates[-1] - viewer.updates[0]) if viewer.updates else 1, 1e-3)
    finally:
        viewer.close()
        ctl.close()
    return {"samples": samples, "keys": keys, "client_disconnected": viewer.disconnected,
            "typed_keys": len(viewer.typed), "rate_seen": rate_seen}


def percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    if not v:
        return float("nan")
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def stats(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    return {"n": len(values), "p50": percentile(values, 0.5), "max": max(values, default=float(
        "nan")), "min": min(values, default=float("nan")),
            "mean": statistics.fmean(values) if values else float("nan")}


def summarize(run: dict) -> dict:
    s = run["samples"]
    over = [x["blackout_ms"] - x["downtime_ms"] for x in s
            if x["blackout_ms"] is not None and x["downtime_ms"] is not None]
    return {
        "migrations": len(s), "ok": sum(x["ok"] for x in s),
        "blackout": stats([x["blackout_ms"] for x in s]),
        "precopy_gap": stats([x["precopy_gap_ms"] for x in s]),
        "server_blackout": stats([x["server_blackout_ms"] for x in s]),
        "downtime": stats([x["downtime_ms"] for x in s]),
        "remap_rebind": stats([x["remap_rebind_ms"] for x in s]),
        "rehome": stats([x["rehome_ms"] for x in s]),
        "remap": stats([x["remap_ms"] for x in s]),
        "replay": stats([x["replay_ms"] for x in s]),
        "total": stats([x["total_ms"] for x in s]),
        "prepare": stats([x["prepare_ms"] for x in s]),
        "blackout_minus_downtime": stats(over),
        "within_target": sum(1 for d in over if d <= TARGET_SLACK_MS),
        "held": sum(x["held"] for x in s),
        "disconnects": sum(x["disconnects"] for x in s) + (1 if run["client_disconnected"]
                                                             else 0),
        "keys": run["keys"], "typed_keys": run["typed_keys"],
        "pages_sent": stats([x["pages_sent"] for x in s]),
        "guest_pages": s[0]["guest_pages"] if s else None,
    }


def run_all(args: argparse.Namespace) -> dict:
    log_dir = Path(tempfile.mkdtemp(prefix="dmb-logs-"))
    load_before = os.getloadavg()
    result: dict = {"args": vars(args) | {"argv": None}, "log_dir": str(log_dir)}
    demo = Demo(args.memory, log_dir)
    try:
        main = run_migrations(demo, args.migrations, args.rate)
    finally:
        demo.stop()
    result["main"] = summarize(main) | {"memory_mb": args.memory}
    result["main_samples"] = main["samples"]
    sweep = []
    for size in args.sizes:
        d = Demo(size, log_dir)
        try:
            r = run_migrations(d, args.sweep_migrations, args.rate)
        finally:
            d.stop()
        sweep.append(summarize(r) | {"memory_mb": size})
    result["sweep"] = sweep
    result["meta"] = machine_info(args, load_before)
    shutil.rmtree(log_dir, ignore_errors=True)
    return result


# -- reporting -------------------------------------------------------------------------------------
def machine_info(args: argparse.Namespace, load_before: tuple[float, float, float]) -> dict:
    return benchmeta.machine_info("migration_blackout.py", args.argv, load_before)


def _f(v: float) -> str:
    return "-" if v != v else f"{v:.1f}"  # NaN -> "-"


def main_table(m: dict) -> str:
    rows = ["| per migration | n | p50 ms | max ms | min ms | mean ms |",
            "|---|---|---|---|---|---|"]
    for label, key in (("console blackout (client: last update before → first after)",
                         "blackout"),
                        ("guest downtime (source paused → running on the destination)",
                         "downtime"),
                        ("blackout − downtime", "blackout_minus_downtime"),
                        ("re-map + re-bind (RM re-home + backends connected)", "remap_rebind"),
                        ("· RM re-home step (RM VM switchover, agent attached there)",
                         "rehome"),
                        ("· re-map/re-bind step (new grant, frames, ports)", "remap"),
                        ("replay step (held keys into the ring)", "replay"),
                        ("console blackout as the RM agent logs it (freeze → first update)",
                         "server_blackout"),
                        ("longest update gap before the freeze (pre-copy; console live)",
                         "precopy_gap"),
                        ("whole co-migration", "total")):
        s = m[key]
        rows.append(f"| {label} | {s['n']} | {_f(s['p50'])} | {_f(s['max'])} | {_f(s['min'])} "
                    f"| {_f(s['mean'])} |")
    return "\n".join(rows)


def sweep_table(sweep: list[dict]) -> str:
    rows = ["| guest memory | migrations | pages sent p50 | prepare + pre-copy p50 ms | "
            "whole co-migration p50 / max ms | downtime p50 / max ms | blackout p50 / max ms "
            "| keys lost | disconnects |", "|---|---|---|---|---|---|---|---|---|"]
    for s in sweep:
        rows.append(
            f"| {s['memory_mb']} MiB | {s['migrations']} | {s['pages_sent']['p50']:.0f} | "
            f"{_f(s['prepare']['p50'])} | {_f(s['total']['p50'])} / {_f(s['total']['max'])} | "
            f"{_f(s['downtime']['p50'])} / {_f(s['downtime']['max'])} | "
            f"{_f(s['blackout']['p50'])} / {_f(s['blackout']['max'])} | {s['keys']['lost']} | "
            f"{s['disconnects']} |")
    return "\n".join(rows)


def verdict(m: dict) -> list[str]:
    k = m["keys"]
    ok_b = m["within_target"] == m["blackout_minus_downtime"]["n"] == m["migrations"]
    return [
        f"target blackout <= downtime + {TARGET_SLACK_MS:.0f} ms: "
        f"{'met' if ok_b else 'MISSED'} (within it in {m['within_target']} of "
        f"{m['migrations']} migrations; blackout − downtime p50 "
        f"{_f(m['blackout_minus_downtime']['p50'])} ms, max "
        f"{_f(m['blackout_minus_downtime']['max'])} ms)",
        f"keys: {m['typed_keys']} typed ({k['typed_events']} key events), "
        f"{k['received_events']} events received by the guest; lost {k['lost']}, extra "
        f"{k['extra']}, in order: {'yes' if k['in_order'] else 'NO'} — target 0 lost: "
        f"{'met' if k['lost'] == 0 and k['extra'] == 0 and k['in_order'] else 'MISSED'}",
        f"disconnects: {m['disconnects']} — target 0: "
        f"{'met' if m['disconnects'] == 0 else 'MISSED'}; migrations completed: "
        f"{m['ok']} of {m['migrations']}; key events held during switchovers and replayed: "
        f"{m['held']}",
    ]


def markdown(result: dict) -> str:
    m, meta, a = result["main"], result["meta"], result["args"]
    out = [
        SECTION_START,
        "## Live migration: console blackout, downtime, keys, cost vs memory",
        "",
        "`dmore-nova demo` (two sim hosts, the sim guest program with a bash console, its RM VM "
        "co-migrated with it, the console proxy) driven through its control API. One raw RFB "
        "client (`bench/rfb_client.py`, Raw, 32 bpp) connected directly to the RM agent types "
        f"`echo` lines at {a['rate']:g} keys/s all along and stamps every FramebufferUpdate; "
        "an incremental request is always outstanding, so every echo is an update. Blackout = "
        "the largest gap between two consecutive updates overlapping the switchover (input "
        "frozen → viewers refreshed, in the demo's CLOCK_MONOTONIC timestamps); "
        "downtime and re-map/re-bind come from the co-migration's own timings; keys are "
        "compared at the end with what the guest's kbdfront received. Method: docstring of "
        "`bench/migration_blackout.py`.",
        "",
        "```",
        meta["command"],
        "```",
        "",
        f"{m['migrations']} migrations back and forth, guest {m['memory_mb']} MiB:",
        "",
        main_table(m),
        "",
    ]
    out += [f"- {line}" for line in verdict(m)]
    out.append(
        "- what the console adds to the guest's downtime is the RM side once the guest runs "
        f"again: RM re-home p50 {_f(m['rehome']['p50'])} + re-map/re-bind p50 "
        f"{_f(m['remap']['p50'])} + replay p50 {_f(m['replay']['p50'])} ms, then the first "
        "(full) update; the source domains are released after the refresh, off this path")
    if a.get("note"):
        out.append(f"- {a['note']}")
    out += ["", "Cost vs guest memory (typing as above; a fresh demo per size):", "",
            sweep_table(result["sweep"]), ""]
    out += [
        f"- date: {meta['date']}; git: {meta['git']}",
        f"- machine: `{meta['uname']}`; CPU: {meta['cpu']}; nproc: {meta['nproc']}; "
        f"load average before/after: {meta['loadavg_before'][0]:.2f}/"
        f"{meta['loadavg_after'][0]:.2f}; Python {meta['python']}",
        SECTION_END,
    ]
    return "\n".join(out)


def update_file(path: Path, block: str) -> None:
    benchmeta.update_section(path, SECTION_START, SECTION_END, block)

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--migrations", type=int, default=20, help="measured migrations (>= 1)")
    p.add_argument("--memory", type=int, default=64, help="guest MiB of the main run")
    p.add_argument("--rate", type=float, default=100.0, help="keys typed per second")
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",") if x],
                   default=[64, 256, 1024], help="guest MiB of the sweep (comma-separated)")
    p.add_argument("--sweep-migrations", type=int, default=4)
    p.add_argument("--note", default="", help="a sentence added to the report (conditions)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE",
                   help="also write the results as JSON")
    p.add_argument("--from-json", type=Path, default=None, metavar="FILE",
                   help="do not measure: render the report of a run saved with --json")
    p.add_argument("--update", type=Path, default=None, metavar="BENCHMARKS.md",
                   help="replace the migration section of this file")
    args = p.parse_args(argv)
    args.argv = argv
    if args.migrations < 1 or args.sweep_migrations < 0 or not 1 <= args.rate <= 1000:
        p.error("need --migrations >= 1, --sweep-migrations >= 0, 1 <= --rate <= 1000")
    try:
        if args.from_json is not None:  # re-render a recorded run (same numbers)
            result = json.loads(args.from_json.read_text())
        else:
            result = run_all(args)
    except (RFBError, RuntimeError, OSError, ValueError) as exc:
        print(f"migration_blackout: {exc}", file=sys.stderr)
        return 1
    block = markdown(result)
    print(block)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    if args.update is not None:
        update_file(args.update, block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
