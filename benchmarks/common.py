"""What every benchmark shares: the command line it starts with, a progress log, and the time
constants of the synthetic worlds."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


ROOT = Path(__file__).resolve().parents[1]


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's command line, its module docstring as the help text."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def log(msg: str) -> None:
    """Progress on stderr (stdout carries the figures, or the JSON object)."""
    print(msg, file=sys.stderr, flush=True)


DAY_MS = 86_400_000
START_MS = 1_767_571_200_000  # 2026-01-05T00:00:00Z
LATENESS_MS = 300_000
