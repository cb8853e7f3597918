"""The long replay's generated world (`benchmarks.long_replay`, `benchmarks.engine_age`): its
options, its files (generated once, cached under `.fraud/bench/`), and the control's files (the
world from the warm-up before its last tenth on)."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks.common import DAY_MS, ROOT, log
from fraud.datagen import GeneratorConfig, write_files
from service.runtime import new_pipeline
from service.settings import Settings


def warmup_transactions(txns: Path, cutoff: datetime) -> int:
    """How many transactions happen before `cutoff`."""
    with txns.open("rb") as f:
        return sum(1 for line in f if datetime.fromisoformat(json.loads(line)["ts"]) < cutoff)


def control_files(txns: Path, labels: Path, late_from: int, warmup: timedelta) -> tuple[Path, Path, int]:
    """The control replay's files (written once, beside the world's): the world's transactions from
    `warmup` before transaction `late_from` (0-based, in file order: the start of the last tenth)
    on, and the labels of those transactions; and how many of them come before `late_from`."""
    ts = [datetime.fromisoformat(json.loads(line)["ts"]) for line in txns.open("rb")]
    begin = next(i for i, t in enumerate(ts) if t >= ts[late_from] - warmup)
    out = txns.parent / f"control-{begin}"
    out_txns, out_labels = out / "transactions.jsonl", out / "labels.jsonl"
    if not out_labels.is_file():
        out.mkdir(exist_ok=True)
        kept: set[str] = set()
        with txns.open("rb") as src, out_txns.open("wb") as dst:
            for i, line in enumerate(src):
                if i >= begin:
                    kept.add(json.loads(line)["txn_id"])
                    dst.write(line)
        with labels.open("rb") as src, (out / "labels.part").open("wb") as dst:
            dst.writelines(line for line in src if json.loads(line)["txn_id"] in kept)
        (out / "labels.part").rename(out_labels)  # last: its presence says the files are whole
    return out_txns, out_labels, late_from - begin


def world_options(ap: Any) -> None:
    """The options that name the generated world ."""
    ap.add_argument("--days", type=int, default=180, help="the measured run's days")
    ap.add_argument("--cards", type=int, default=8500)
    ap.add_argument("--label-delay-days", type=float, default=7.0)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument(
        "--warmup-days",
        type=int,
        default=None,
        help="replayed before the measured run, not counted (default: the features' longest "
        "look-back plus the label delay)",
    )


def world(args: Any) -> tuple[Path, Path, int, int]:
    """The world's transaction and label files (generated once, cached), how many transactions
    its warm-up holds, and how many it holds in all; sets `args.warmup_days` when not given."""
    if args.warmup_days is None:
        lookback_ms = max(plan.lookback_ms for plan in new_pipeline(Settings()).plans)
        args.warmup_days = math.ceil(lookback_ms / DAY_MS + args.label_delay_days)
    days = args.warmup_days + args.days
    data = ROOT / ".fraud" / "bench" / f"long-{days}d-{args.cards}c-{args.label_delay_days:g}l-{args.seed}"
    txns, labels = data / "transactions.jsonl", data / "labels.jsonl"
    config = GeneratorConfig(
        seed=args.seed,
        days=days,
        n_cards=args.cards,
        n_merchants=max(200, args.cards // 20),
        drift_day=None,
        label_delay="fixed",
        label_delay_days=args.label_delay_days,
    )
    if not labels.is_file():
        log(f"generating {data} ...")
        write_files(data, config)
    cutoff = datetime.fromisoformat(config.start).astimezone(UTC) + timedelta(days=args.warmup_days)
    warm = warmup_transactions(txns, cutoff)
    with txns.open("rb") as f:
        total = sum(1 for _ in f)  # every generated transaction is valid: each is decided
    if not 0 < warm < total:
        raise SystemExit(f"the warm-up holds {warm:,} of the {total:,} transactions: more --days")
    return txns, labels, warm, total
