"""Does a change decide exactly as the code before it? Every output of two checkouts, compared.

    python -m benchmarks.same_decisions --baseline DIR [--transactions N]

Runs `python -m bytewax.run flows.fraud` (the default features and model, the decision log on)
from this checkout and from DIR (another checkout, e.g. a `git worktree` of an older commit with
its C modules built in place: `python setup.py build_ext --inplace`), one after the other, on the
same uncompressed bundled sample (its first `--transactions` if given, with their labels), each
writing its own streams in one private Redis. Then compares, stream by stream (decision log,
alerts, dead letters, late, drift), every entry's fields but the arrival-time and latency ones:
the features, the scores, the alert and its reasons. Prints each stream's entry counts and
"same" or the first entry that differs; exits 1 when any stream differs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import redis

from benchmarks.common import ROOT, parser
from benchmarks.cpu_ratio import sample
from testkit.private_redis import private_redis

STREAMS = ("decision", "alerts", "dlq", "late", "drift")
VARIES = (b"latency", b"received")  # field names holding wall-clock times: they differ run to run


def run(checkout: Path, prefix: str, txns: Path, labels: Path, url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUD_")}
    env.update(
        FRAUD_TRANSACTIONS_PATH=str(txns), FRAUD_LABELS_PATH=str(labels), FRAUD_REDIS_URL=url,
        FRAUD_PROGRESS_INTERVAL_S="3600", FRAUD_DECISION_LOG="true",
        **{f"FRAUD_{s.upper()}_STREAM": f"{prefix}:{s}" for s in STREAMS},
    )  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "bytewax.run", "flows.fraud"],
        cwd=checkout, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if out.returncode:
        sys.exit(f"the flow in {checkout} exited {out.returncode}:\n{out.stderr[-3000:]}")


def entries(r: Any, stream: str) -> list[dict[bytes, bytes]]:
    return [
        {k: v for k, v in fields.items() if not any(part in k for part in VARIES)}
        for _, fields in r.xrange(stream)
    ]


def verdict(ours: list[Any], theirs: list[Any]) -> str:
    """ "same", or where the two lists of entries first part."""
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)
    if first is None and len(ours) == len(theirs):
        return "same"
    return f"DIFFERENT from entry {min(len(ours), len(theirs)) if first is None else first:,}"


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--baseline", type=Path, required=True, help="the other checkout (built)")
    ap.add_argument("--transactions", type=int, default=None, help="only the sample's first N")
    args = ap.parse_args()
    differ = False
    with tempfile.TemporaryDirectory() as tmp, private_redis() as url:
        txns, labels, n = sample(Path(tmp), args.transactions)
        run(ROOT, "this", txns, labels, url)
        run(args.baseline, "base", txns, labels, url)
        r = redis.Redis.from_url(url)
        print(f"{n:,} transactions; this checkout against {args.baseline}")
        for s in STREAMS:
            ours, theirs = entries(r, f"this:{s}"), entries(r, f"base:{s}")
            said = verdict(ours, theirs)
            differ = differ or said != "same"
            print(f"{s:>8}: {len(ours):,} and {len(theirs):,} entries, {said}")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
