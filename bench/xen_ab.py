"""Key -> echo of the agent in dom0 at two revisions, on one xenbox, in alternating blocks.

Why: on the xenbox (Xen in QEMU/TCG) the same path measured on two boots differs by more than
most changes to the agent do (``bench/xen_table1.py``: the conventional p50 ranged 19.9-25.2 ms
between runs).  This runs both revisions of the agent in *one* box session, in alternating
blocks (A B B A A B ...), with the same guest, client and method as Table 1
(:class:`xen_table1.Session`: the key's echo in the prompt cell), so that drift of the host
hits both alike; optionally the conventional path too, for the ratio.

The base revision's ``dmore_nova`` is extracted (``git archive``) under ``.ab/<rev>/`` in the
checkout, which dom0 sees at ``/mnt/src``; the agent for it is started through
``bench/ab_agent.py``, which puts that tree first on ``sys.path``.  The other side is the
checkout as it is (``HEAD`` plus what is not committed).

Run (exclusive box lock, a quiet machine):
    flock -x -w 1800 /tmp/xb/box.lock .venv/bin/python bench/xen_ab.py --base HEAD~1 \\
        --samples 100 --rounds 3 --json /tmp/ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (REPO / "bench", REPO):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import benchmeta  # noqa: E402
import xen_table1 as T  # noqa: E402

import tests.xen.dom0 as D  # noqa: E402

AB_DIR = REPO / ".ab"


def extract(rev: str) -> tuple[str, str]:
    """``dmore_nova`` of ``rev`` under ``.ab/<sha>``; (sha, path relative to the checkout)."""
    sha = subprocess.run(["git", "rev-parse", "--short=12", rev], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.strip()
    dest = AB_DIR / sha
    if not (dest / "dmore_nova").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", sha, "dmore_nova"], cwd=REPO, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return sha, str(dest.relative_to(REPO))


def measure_block(box, variant: str, tree: str | None, args: argparse.Namespace,
                  rng: random.Random) -> list[float]:
    """One block: start the guest served by ``variant`` and time ``args.samples`` keys."""
    if variant == "conventional":
        path = T.setup_conventional(box, False)
    else:
        D.AGENT = f"bench.ab_agent {tree}" if tree else "dmore_nova.cmd.rm_agent"
        path = T.setup_dmore_dom0(box, False)
    try:
        sess = T.Session(path, rng, args)
        sess.learn_glyphs()
        m = sess.measure(args.samples, args.timeout, args.pause)
        sess.viewer.close()
        if m.failures:
            print(f"[ab] {variant}: {m.failures} keys without echo", file=sys.stderr)
        return [v / 1e6 for v in m.samples_ns]
    finally:
        path.stop()
        D.AGENT = "dmore_nova.cmd.rm_agent"


def stats(ms: list[float]) -> dict:
    s = sorted(ms)
    return {"n": len(s), "p50": T.percentile(s, 50), "p90": T.percentile(s, 90)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision to compare the checkout with")
    ap.add_argument("--samples", type=int, default=100, help="keys per block")
    ap.add_argument("--rounds", type=int, default=3, help="blocks of each variant")
    ap.add_argument("--pause", type=lambda s: tuple(float(x) for x in s.split("-")),
                    default=(10.0, 60.0), help="pause between keys, ms (lo-hi)")
    ap.add_argument("--conventional", action="store_true",
                    help="also a block of QEMU's path per round (for the ratio)")
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    sha, tree = extract(args.base)
    variants = {f"base {sha}": tree, "checkout": None}
    if args.conventional:
        variants["conventional"] = None
    rng = random.Random(args.seed)
    load_before = os.getloadavg()
    xb = T.load_xenbox()
    box = xb.XenBox(xb.build(), forwards=T.FORWARDS)
    box.start(timeout=600)
    samples: dict[str, list[list[float]]] = {k: [] for k in variants}
    try:
        for r in range(args.rounds):
            order = list(variants)
            if r % 2:
                order.reverse()
            for name in order:
                kind = "conventional" if name == "conventional" else "dmore"
                t0 = time.monotonic()
                block = measure_block(box, kind, variants[name], args, rng)
                samples[name].append(block)
                s = stats(block)
                print(f"[ab] round {r + 1} {name}: p50 {s['p50']:.2f} ms p90 {s['p90']:.2f} ms "
                      f"n {s['n']} ({time.monotonic() - t0:.0f} s)", file=sys.stderr,
                      flush=True)
    finally:
        box.stop()
    pooled = {k: stats([v for b in blocks for v in b]) for k, blocks in samples.items()}
    dirty = benchmeta.sh(["git", "status", "--porcelain", "--", "dmore_nova"])
    result = {"base": sha, "pooled": pooled,
              "per_round": {k: [stats(b) for b in blocks] for k, blocks in samples.items()},
              "samples_ms": {k: [[round(v, 3) for v in b] for b in blocks]
                             for k, blocks in samples.items()},
              "meta": {**benchmeta.machine_info("xen_ab.py", sys.argv[1:] if argv is None
                                                else argv, load_before),
                       "dirty": dirty.splitlines(), "pause_ms": list(args.pause)}}
    for k, s in pooled.items():
        print(f"{k:24s} p50 {s['p50']:6.2f} ms  p90 {s['p90']:6.2f} ms  n {s['n']}")
    base, new = pooled[f"base {sha}"], pooled["checkout"]
    print(f"checkout/base: p50 {new['p50'] / base['p50']:.3f}, p90 {new['p90'] / base['p90']:.3f}")
    if "conventional" in pooled:
        conv = pooled["conventional"]
        for k in (f"base {sha}", "checkout"):
            print(f"{k}/conventional: p50 {pooled[k]['p50'] / conv['p50']:.3f}, "
                  f"p90 {pooled[k]['p90'] / conv['p90']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
