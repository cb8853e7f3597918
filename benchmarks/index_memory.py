"""Memory the flow's transaction index holds per transaction (capacity planning).

    python benchmarks/index_memory.py [--transactions 400000] [--cards 100000]

The `index` step keeps, for every transaction, what its label needs days later (event time,
entity keys, whether it was labelled) as one Bytewax key per transaction id, for
`FRAUD_LABEL_TTL_DAYS` of wall-clock time. This runs `decode -> index` alone in Bytewax (one
worker, the default feature set) over synthetic transactions and reads the process RSS when the
last transaction has passed the index, against the RSS before the run (input records already
built): the growth divided by the transaction count is what each indexed transaction costs,
Bytewax's own per-key bookkeeping included.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bytewax.operators as op  # noqa: E402
from bytewax.dataflow import Dataflow  # noqa: E402
from bytewax.testing import TestingSink, TestingSource, run_main  # noqa: E402

from flows.steps import IndexLogic, decode_record, is_valid, txn_key  # noqa: E402
from fraud.runtime import new_pipeline  # noqa: E402
from fraud.settings import Settings  # noqa: E402

T0_MS = 1_767_571_200_000


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transactions", type=int, default=400_000)
    ap.add_argument("--cards", type=int, default=100_000)
    args = ap.parse_args()
    n, cards = args.transactions, args.cards
    pipeline = new_pipeline(Settings())
    records = [
        ("txn", json.dumps({
            "txn_id": f"t{i:09d}", "ts": T0_MS + i * 1000, "card_id": f"c{i % cards:07d}",
            "merchant_id": f"m{i % 5000:05d}", "amount": 12.5, "device_id": f"d{i % (cards * 7 // 10):07d}",
        }))
        for i in range(n)
    ]  # fmt: skip
    last_id = f"t{n - 1:09d}"
    at_last: list[int] = []

    def probe(kv: tuple[str, Any]) -> bool:
        if kv[0] == last_id:
            gc.collect()
            at_last.append(rss_bytes())
        return False

    flow = Dataflow("index_memory")
    decoded = op.branch(
        "valid", op.map("decode", op.input("in", flow, TestingSource(records, 1000)), decode_record), is_valid
    )
    index = partial(IndexLogic, pipeline, timedelta(days=60))
    indexed = op.stateful_batch("index", op.key_on("key", decoded.trues, txn_key), index)
    op.output("out", op.filter("probe", indexed, probe), TestingSink([]))
    gc.collect()
    before = rss_bytes()
    run_main(flow, epoch_interval=timedelta(seconds=5))
    growth = at_last[0] - before
    print(
        f"index: {n:,} transactions ({n / cards:.1f} per card) held -> RSS +{growth / 2**20:,.1f} MiB, "
        f"{growth / n:,.0f} bytes per transaction"
    )


if __name__ == "__main__":
    main()
