"""What `fraud train` needs in memory, against the float32 feature matrix it trains on.

    python -m benchmarks.train_memory [--cards 11200 --days 90]         (generates a world)
    python -m benchmarks.train_memory --transactions F --labels F       (your files)

Runs `fraud train --no-search` (the default feature set, the default periods or `--train-days`
etc. passed through) as a child process and prints its wall time and peak RSS, the size of the
float32 matrix of all its rows (transactions x features x 4 bytes), their ratio, and the peak per
million transactions. The generated world is `fraud generate`'s (seed 11), about 88 transactions
per card over 90 days. `--stages` then repeats the work in this process and prints the resident
memory after each stage (dataset built, model fitted): where the peak comes from.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import ROOT, log, parser, run_measured
from features.event_files import open_text
from service.runtime import new_pipeline
from service.settings import Settings


def _memory() -> tuple[float, float]:
    """(resident, peak resident) MB of this process, from /proc/self/status."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def stages(transactions: Path, labels: Path) -> None:
    """Resident memory after each stage of `fraud train --no-search`, in this process."""
    from fraud import dataset
    from fraud import train as training

    def show(stage: str) -> None:
        rss, peak = _memory()
        print(f"  {stage:<34} resident {rss:7,.0f} MB   peak so far {peak:7,.0f} MB")

    print("stages (this process):")
    show("imports")
    settings = Settings()
    pipeline = new_pipeline(settings)
    data = dataset.build_dataset(pipeline, transactions, labels, label_ttl_days=settings.label_ttl_days)
    show(f"dataset built ({len(data):,} rows)")
    training.fit(data, list(pipeline.names), training.Split(), search=False)
    show("model fitted")


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--transactions", type=Path)
    ap.add_argument("--labels", type=Path)
    ap.add_argument("--cards", type=int, default=11200)
    ap.add_argument("--merchants", type=int, default=2000)
    ap.add_argument("--days", type=int, default=90)
    ap.add_argument("--stages", action="store_true", help="also measure each stage in this process")
    ap.add_argument("train_args", nargs="*", help="passed to fraud train (after --)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        txns, labels = args.transactions, args.labels
        if txns is None:
            log(f"generating {args.cards:,} cards over {args.days} days")
            subprocess.run(
                [sys.executable, "-m", "fraud.cli", "generate", "--out", tmp, "--cards", str(args.cards),
                 "--merchants", str(args.merchants), "--days", str(args.days), "--seed", "11"],
                cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            txns, labels = Path(tmp) / "transactions.jsonl.gz", Path(tmp) / "labels.jsonl.gz"
        with open_text(txns) as f:
            rows = sum(1 for line in f if line.strip())
        width = len(new_pipeline(Settings()).names)
        log(f"training on {rows:,} transactions")
        train = run_measured(
            "fraud train", "fraud.cli",
            ["train", "--transactions", str(txns), "--labels", str(labels), "--no-search", "--out",
             str(Path(tmp) / "model"), *args.train_args],
        )  # fmt: skip
        wall, peak_mb = train.wall_s, train.peak_mb * 2**20 / 1e6  # decimal MB, like the matrix
        report = json.loads(train.stdout)
        if args.stages:
            stages(txns, labels)
    matrix_mb = rows * width * 4 / 1e6
    print(
        f"fraud train --no-search: {rows:,} transactions x {width} features, trained on "
        f"{report['train']['rows']:,} rows; {wall:.1f} s wall"
    )
    print(
        f"peak RSS {peak_mb:,.0f} MB; float32 matrix {matrix_mb:,.0f} MB; ratio {peak_mb / matrix_mb:.2f}; "
        f"{peak_mb / rows * 1e6:,.0f} MB per million transactions; test AP {report['test']['ap']:.4f}"
    )


if __name__ == "__main__":
    main()
