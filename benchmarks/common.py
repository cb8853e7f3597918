"""What every benchmark shares: the command line it starts with, a progress log, and the time
constants of the synthetic worlds."""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


ROOT = Path(__file__).resolve().parents[1]


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's command line, its module docstring as the help text."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


# `python -m <module> <args>` in a child process, which prints its own peak RSS on stderr last (so
# that only that process counts, not a generator or another child before it).
_MEASURED = """
import resource, runpy, sys
module, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
finally:
    print(f"peak_rss_kb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr)
"""


@dataclass(frozen=True)
class Measured:
    """What a measured child printed, how long it ran, and its own peak RSS (MiB)."""

    stdout: str
    stderr: str
    wall_s: float
    peak_mb: float


def run_measured(name: str, module: str, args: list[str], env: dict[str, str] | None = None) -> Measured:
    """`python -m module args` from the repository root, measured; exits naming `name` with the
    child's output if it fails. `stderr` is the child's without the measurement line."""
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", _MEASURED, module, *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    wall = time.monotonic() - started
    if out.returncode != 0:
        sys.exit(f"{name} failed (exit {out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    body, _, tail = out.stderr.rpartition("peak_rss_kb=")
    return Measured(out.stdout, body, wall, int(tail.split()[0]) / 1024)


def time_collections(into: list[float]) -> Callable[[str, dict[str, int]], None]:
    """From now on, add the garbage collector's pauses in this process to `into[0]` (seconds, wall
    clock); the callback, for `gc.callbacks.remove`."""
    began = [0.0]

    def timer(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            into[0] += time.perf_counter() - began[0]

    gc.callbacks.append(timer)
    return timer


def log(msg: str) -> None:
    """Progress on stderr (stdout carries the figures, or the JSON object)."""
    print(msg, file=sys.stderr, flush=True)


DAY_MS = 86_400_000
START_MS = 1_767_571_200_000  # 2026-01-05T00:00:00Z
LATENESS_MS = 300_000
