"""Memory the flow's transaction index holds per transaction (capacity planning).

    python -m benchmarks.index_memory [--transactions 400000] [--cards 100000] [--step index|pending]

The `index` step keeps, for every transaction, what its label needs days later (event time,
entity keys, whether it was labelled) as one Bytewax key per transaction id, for
`FRAUD_LABEL_TTL_DAYS` of wall-clock time. This runs `decode -> index` alone in Bytewax (one
worker, the default feature set) over synthetic transactions and reads the process RSS when the
last transaction has passed the index, against the RSS before the run (input records already
built): the growth divided by the transaction count is what each indexed transaction costs,
Bytewax's own per-key bookkeeping included.

`--step pending` measures the other per-transaction step the same way: the scored feature vector
kept (one key per transaction id) until the label arrives.
"""

from __future__ import annotations

import gc
import json
from datetime import timedelta
from functools import partial
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main

from benchmarks.common import START_MS, parser
from features.engine import FeatureRow
from flows.ordering import ordered
from flows.routing import Workers
from flows.steps import IndexLogic, PendingLogic, decode_record, is_valid, pending_key, txn_key
from service.runtime import new_pipeline
from service.settings import Settings
from testkit.system import rss_bytes


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--transactions", type=int, default=400_000)
    ap.add_argument("--cards", type=int, default=100_000)
    ap.add_argument("--step", choices=["index", "pending"], default="index")
    args = ap.parse_args()
    n, cards = args.transactions, args.cards
    pipeline = new_pipeline(Settings())
    records = [
        ("txn", json.dumps({
            "txn_id": f"t{i:09d}", "ts": START_MS + i * 1000, "card_id": f"c{i % cards:07d}",
            "merchant_id": f"m{i % 5000:05d}", "amount": 12.5, "device_id": f"d{i % (cards * 7 // 10):07d}",
        }), f"bench:{i + 1}")
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
    keyed = op.key_on("key", decoded.trues, txn_key)
    if args.step == "index":
        index = partial(IndexLogic, pipeline)
        held = ordered("index", keyed, logic=index, workers=Workers(1), key=txn_key)
    else:
        widths = [len(plan.names) for plan in pipeline.plans]

        def scored_row(kv: tuple[str, Any]) -> tuple[str, FeatureRow]:
            row, _ = pipeline.start(kv[1])
            row.parts = [[float(i)] * w for i, w in enumerate(widths)]  # values as the chain adds them
            return kv[0], row

        rows = op.map("rows", keyed, scored_row)
        pending = partial(PendingLogic, pipeline)
        held = ordered("pending", rows, logic=pending, workers=Workers(1), key=pending_key)
    op.output("out", op.filter("probe", held, probe), TestingSink([]))
    gc.collect()
    before = rss_bytes()
    run_main(flow, epoch_interval=timedelta(seconds=5))
    growth = at_last[0] - before
    print(
        f"{args.step}: {n:,} transactions ({n / cards:.1f} per card) held -> RSS +{growth / 2**20:,.1f} MiB, "
        f"{growth / n:,.0f} bytes per transaction"
    )


if __name__ == "__main__":
    main()
