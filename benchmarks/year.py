"""A year of traffic on one machine: generate -> train -> replay -> evaluate, each stage's wall time
and peak memory.

    python -m benchmarks.year [--days 365] [--cards 8600] [--merchants 1500] [--keep DIR]

1. **generate**: `fraud generate` (seed 11, labels for every transaction, lognormal delays, the
   late fraud pattern from day 240), uncompressed files.
2. **train**: `fraud train --no-search` on calendar windows: train from day 30 to day 240,
   validate (after a week's gap) to day 277, test to day 307
   (`--train-from/--train-to/--valid-to/--test-to`).
3. **replay**: the flow (`python -m bytewax.run flows.fraud`) on the files with the trained model,
   the decision log on, into an embedded Redis of its own; then the decision stream's length
   against the transaction count (the audit trail must hold every decision: it is never trimmed
   by count, `FRAUD_DECISION_RETENTION_DAYS` only drops entries by age).
4. **evaluate**: `fraud evaluate --from-decisions` (what the flow served, joined with the labels
   file).

Each stage is a child process, measured on its own: wall time, and its peak RSS (`ru_maxrss`,
printed by the child itself). The embedded Redis's memory after the replay is printed too (it is
another process). Everything lives in a temporary directory (or `--keep DIR`), removed at the end
unless kept. `--days 60 --cards 300` is a quick version (the windows scale to the days; the
week's gap does not).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, START_MS, log, parser, run_measured
from service.runtime import new_pipeline
from service.settings import Settings


def stage(name: str, module: str, args: list[str], env: dict[str, str]) -> tuple[str, float, float]:
    """Run `python -m module args` measured; (stdout, wall seconds, peak RSS MB). The child's
    stderr (progress, the run summary) is echoed to ours."""
    log(f"[{name}] {module} {' '.join(args)}")
    run = run_measured(name, module, args, env)
    log(run.stderr.rstrip())
    return run.stdout, run.wall_s, run.peak_mb


def day(days: float) -> str:
    """The calendar bound `days` after the generator's first day, as fraud train takes it."""
    return str(int(START_MS + days * 86_400_000))


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--days", type=int, default=365)
    ap.add_argument("--cards", type=int, default=8600)
    ap.add_argument("--merchants", type=int, default=1500)
    ap.add_argument("--keep", type=Path, help="work here and keep everything")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="fraud-year-"))
    work.mkdir(parents=True, exist_ok=True)
    scale = args.days / 365
    # Windows: train on two thirds of the year after its first month, a week's gap (labels still
    # arriving), then a month to validate and a month to test.
    train_from, train_to = 30 * scale, 240 * scale
    valid_to = train_to + 7 + 30 * scale
    test_to = valid_to + 30 * scale
    env = {
        **os.environ,
        "FRAUD_REDIS_DIR": str(work / "redis"),
        "FRAUD_MODEL_PATH": str(work / "model"),
        "FRAUD_TRANSACTIONS_PATH": str(work / "transactions.jsonl"),
        "FRAUD_LABELS_PATH": str(work / "labels.jsonl"),
        "FRAUD_DECISION_LOG": "1",
        "FRAUD_PROGRESS_INTERVAL_S": "60",
    }
    env.pop("FRAUD_REDIS_URL", None)  # the embedded Redis in FRAUD_REDIS_DIR
    rows: list[tuple[str, float, float, str]] = []
    try:
        _, wall, peak = stage(
            "generate",
            "fraud.cli",
            ["generate", "--out", str(work), "--seed", "11", "--days", str(args.days), "--cards",
             str(args.cards), "--merchants", str(args.merchants), "--no-gzip",
             "--drift-day", str(round(240 * scale))],
            env,
        )  # fmt: skip
        with open(work / "transactions.jsonl") as f:
            n_txn = sum(1 for line in f if line.strip())
        with open(work / "labels.jsonl") as f:
            n_labels = sum(1 for line in f if line.strip())
        rows.append(("generate", wall, peak, f"{n_txn:,} transactions, {n_labels:,} labels"))

        out, wall, peak = stage(
            "train",
            "fraud.cli",
            ["train", "--transactions", str(work / "transactions.jsonl"), "--labels", str(work / "labels.jsonl"),
             "--no-search", "--out", str(work / "model"), "--train-from", day(train_from),
             "--train-to", day(train_to), "--valid-to", day(valid_to), "--test-to", day(test_to)],
            env,
        )  # fmt: skip
        report: dict[str, Any] = json.loads(out)
        width = len(new_pipeline(Settings()).names)
        matrix_mb = n_txn * width * 4 / 2**20
        rows.append((
            "train",
            wall,
            peak,
            f"{report['train']['rows']:,} training rows; float32 matrix of all {n_txn:,} rows "
            f"{matrix_mb:,.0f} MB (peak {peak / matrix_mb:.2f}x it); test AP {report['test']['ap']:.4f}",
        ))  # fmt: skip

        stage("reset", "fraud.cli", ["reset", "--yes"], env)
        out, wall, peak = stage("replay", "bytewax.run", ["flows.fraud"], env)
        log("\n".join(line for line in out.splitlines() if line.startswith("[done]")))
        logged = _decisions_logged(env)
        rows.append(("replay", wall, peak, f"{logged['decisions']:,} decisions logged for {n_txn:,} transactions; "
                     f"Redis {logged['redis_mb']:,.0f} MB after"))  # fmt: skip
        if logged["decisions"] != n_txn:
            log(f"the decision log holds {logged['decisions']:,} decisions for {n_txn:,} transactions")

        out, wall, peak = stage(
            "evaluate",
            "fraud.cli",
            ["evaluate", "--from-decisions", "--labels", str(work / "labels.jsonl")],
            env,
        )
        result = json.loads(out)
        finals = [m["final"] for m in result.get("champions", {}).values()]
        what = ", ".join(f"final AP {f['ap']:.4f} on {f['n']:,} labelled decisions" for f in finals)
        rows.append(("evaluate", wall, peak, what))
    finally:
        _stop_redis(env)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"a generated world of {args.days} days, {args.cards:,} cards, {args.merchants:,} merchants")
    print(f"{'stage':<10} {'wall':>9} {'peak RSS':>10}  what")
    for name, wall, peak, what in rows:
        print(f"{name:<10} {wall:8.0f}s {peak:8,.0f} MB  {what}")
    print(f"{'total':<10} {sum(r[1] for r in rows):8.0f}s")


def _decisions_logged(env: dict[str, str]) -> dict[str, Any]:
    """The decision stream's length and Redis's memory, from the embedded Redis of `env`."""
    code = (
        "import json; from service.settings import get_settings; from service.redis_server import redis_url; "
        "from service.redis_client import connect; s = get_settings(); c = connect(redis_url(s)); "
        "print(json.dumps({'decisions': c.xlen(s.decision_stream), "
        "'redis_mb': c.info('memory')['used_memory'] / 2**20}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def _stop_redis(env: dict[str, str]) -> None:
    code = (
        "import os; from pathlib import Path; from service.redis_server import EmbeddedRedis; "
        "EmbeddedRedis(Path(os.environ['FRAUD_REDIS_DIR'])).stop()"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=False)


if __name__ == "__main__":
    main()
