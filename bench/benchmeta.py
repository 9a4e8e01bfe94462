"""What every benchmark records beside its numbers (machine, date, commit, command) and how it
rewrites only its own section of BENCHMARKS.md: shared by the bench/ scripts."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shlex
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEADER = ("# Benchmarks\n\nMeasured numbers of dmore-nova, each section with the command that "
          "produced it. Benchmarks live in `bench/`; they are not tests.\n")


def sh(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10,
                              cwd=REPO).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine_info(script: str, argv: list[str], load_before: tuple[float, float, float]) -> dict:
    """Command, date, machine, load and git commit (flagged when bench/ or dmore_nova/ differ)."""
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    dirty = sh(["git", "status", "--porcelain", "--", "dmore_nova", "bench"])
    return {
        "command": f"python bench/{script} " + shlex.join(argv),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "uname": sh(["uname", "-a"]), "cpu": cpu, "nproc": os.cpu_count(),
        "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
        "python": platform.python_version(),
        "git": sh(["git", "rev-parse", "--short", "HEAD"])
        + (" + uncommitted changes under dmore_nova/ or bench/" if dirty else ""),
    }


def update_section(path: Path, start: str, end: str, block: str) -> None:
    """Replace only the ``start``..``end`` section of BENCHMARKS.md (other sections are other
    benchmarks'); append it if it is not there yet."""
    text = path.read_text() if path.exists() else HEADER
    if start in text and end in text:
        pre, rest = text.split(start, 1)
        text = pre + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
