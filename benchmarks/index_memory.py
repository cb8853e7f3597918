"""Memory the flow holds per transaction waiting for its label (capacity planning).

    python -m benchmarks.index_memory [--transactions 400000] [--cards 100000]
                                      [--step both|index|pending] [--shards 16]

Two steps keep state for every transaction for `FRAUD_LABEL_TTL_DAYS` of wall-clock time, in the
shards of `flows.shards`: the `index` (what its label needs days later: event time, entity keys)
and `pending` (the feature vector it was scored with, for the online model to learn with its
label). This runs `decode -> index -> pending` in Bytewax (one worker, the default feature set,
the rows given the entity features of the bundled sample's transactions instead of running
the entity chain) over synthetic transactions and reads the process RSS when the last transaction has passed, against the RSS
before the run (input records already built): the growth divided by the transaction count is
what each waiting transaction costs, Bytewax's own bookkeeping included. That figure also
carries what does not grow with the held transactions (Bytewax's start-up, and the epoch's changes
in flight when a snapshot saves them, which grow with the rate, not the backlog), so the RSS
growth over the run's second half, divided by its transactions, is printed too: what each more
transaction costs, the figure a 60-day backlog is sized by. It runs as `fraud run`
does, with Bytewax recovery and the shards' deltas in files (in a temporary directory);
`--no-recovery` without (each snapshot is then a copy of the shard, held until Bytewax drops it).
`--step index` or `--step pending` measures one of the two alone; `--shards N`, with N shards
per step (`FRAUD_STATE_SHARDS`).

The flow's figure also moves with how the C heap serves what the run allocates and frees around
the tables (an epoch's changed keys, the deltas written ahead), by tens of bytes a transaction
from one run to the next. `--tables-only` measures the tables alone, without Bytewax: the same
transactions' index entries (`TxnEntry` as the index encodes it) and packed vectors put in
`--shards` index and pending tables, the RSS growth and the tables' own `nbytes` per transaction.
"""

from __future__ import annotations

import gc
import json
import tempfile
from datetime import timedelta
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, run_main

from benchmarks.common import START_MS, parser
from features.engine import FeatureEngine, FeatureRow, FeatureVector, TxnEntry
from features.event_files import replay
from features.table import Table, pack_vector
from flows.expiry import Expiry
from flows.ordering import ordered
from flows.routing import DEFAULT_SHARDS, Shards, Workers
from flows.shards import state_files
from flows.steps import IndexLogic, PendingLogic, decode_record, entry_bytes, is_valid, pending_key, txn_key
from service.runtime import new_pipeline
from service.settings import SAMPLES, Settings
from testkit.system import rss_bytes

TTL = timedelta(days=60)  # `FRAUD_LABEL_TTL_DAYS`'s default: the index notes each id in its bucket

SAMPLE_ROWS = 20_000


def sample_parts(pipeline: Any, n: int) -> list[list[list[float]]]:
    """The entity features of the bundled sample's first `n` transactions, as the entity chain
    adds them to a row (one list per entity): the vectors `pending` keeps are packed, and what
    they cost depends on their values."""
    engine = FeatureEngine(pipeline)
    first = len(pipeline.names) - sum(len(plan.names) for plan in pipeline.plans)
    out: list[list[list[float]]] = []
    for it in engine.run(replay(SAMPLES / "transactions.jsonl.gz", SAMPLES / "labels.jsonl.gz")):
        if isinstance(it, FeatureVector):
            values, at, row = list(it.values), first, []
            for plan in pipeline.plans:
                row.append(values[at : at + len(plan.names)])
                at += len(plan.names)
            out.append(row)
            if len(out) == n:
                break
    return out


def tables_only(n: int, cards: int, shards: int, vectors: list[bytes]) -> None:
    """The index's and pending's tables alone: `n` transactions' entries, as the flow puts them."""
    index, pending = [Table() for _ in range(shards)], [Table() for _ in range(shards)]
    gc.collect()
    before = rss_bytes()
    for i in range(n):
        txn_id, s = f"t{i:09d}", i % shards
        keys = (f"c{i % cards:07d}", f"m{i % 5000:05d}", f"d{i % (cards * 7 // 10):07d}")
        index[s][txn_id] = entry_bytes(TxnEntry(START_MS + i * 1000, keys, False, 493_000))
        pending[s][txn_id] = vectors[i % len(vectors)]
    growth = rss_bytes() - before
    nbytes = sum(t.nbytes for t in index + pending)
    print(
        f"tables alone: {n:,} transactions in {shards} index and {shards} pending tables -> RSS "
        f"+{growth / 2**20:,.1f} MiB, {growth / n:,.1f} bytes per transaction (the tables' nbytes: "
        f"{nbytes / n:,.1f})"
    )


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--transactions", type=int, default=400_000)
    ap.add_argument("--cards", type=int, default=100_000)
    ap.add_argument("--step", choices=["both", "index", "pending"], default="both")
    ap.add_argument(
        "--shards", type=int, default=DEFAULT_SHARDS, help="FRAUD_STATE_SHARDS: each step's shard count"
    )
    ap.add_argument(
        "--no-recovery",
        action="store_true",
        help="run without Bytewax recovery (the shards' snapshots are then whole copies, held a while)",
    )
    ap.add_argument("--tables-only", action="store_true", help="the two tables alone, without Bytewax")
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
    marks = {f"t{n // 2 - 1:09d}": "half", f"t{n - 1:09d}": "last"}
    rss_at: dict[str, int] = {}

    def probe(kv: tuple[str, Any]) -> bool:
        it = kv[1]
        mark = marks.get(it.txn.txn_id) if isinstance(it, FeatureRow | FeatureVector) else None
        if mark is not None:
            gc.collect()
            rss_at[mark] = rss_bytes()
        return False

    flow = Dataflow("index_memory")
    decoded = op.branch(
        "valid", op.map("decode", op.input("in", flow, TestingSource(records, 1000)), decode_record), is_valid
    )
    shards = Shards(args.shards)
    keyed = op.key_on("key", decoded.trues, txn_key(shards))
    parts = sample_parts(pipeline, min(SAMPLE_ROWS, n))
    width = sum(len(plan.names) for plan in pipeline.plans)
    packed = [len(pack_vector(list(chain.from_iterable(p)))) for p in parts]
    print(
        f"the entity features of {len(parts):,} sample transactions ({width} per vector): packed "
        f"{sum(packed) / len(packed):,.1f} bytes on average, as float32 {4 * width}"
    )
    if args.tables_only:
        tables_only(n, cards, args.shards, [pack_vector(list(chain.from_iterable(p))) for p in parts])
        return
    count = [0]

    def scored_row(kv: tuple[str, Any]) -> tuple[str, Any]:
        row = kv[1] if isinstance(kv[1], FeatureRow) else pipeline.start(kv[1])[0]
        row.parts = parts[count[0] % len(parts)]  # real values, as the chain adds them
        count[0] += 1
        return kv[0], row

    tmp = tempfile.TemporaryDirectory(prefix="index-memory-")
    store = None if args.no_recovery else Path(tmp.name)
    held = keyed
    if args.step in ("both", "index"):
        index = partial(IndexLogic, pipeline, state_files(store, "index"), expiry=Expiry(TTL), shards=shards)
        held = ordered("index", held, logic=index, workers=Workers(1), key=txn_key(shards))
    if args.step in ("both", "pending"):
        rows = op.map("rows", held, scored_row)
        pending = partial(PendingLogic, pipeline, state_files(store, "pending"), shards=shards)
        held = ordered("pending", rows, logic=pending, workers=Workers(1), key=pending_key(shards))
    op.output("out", op.filter("probe", held, probe), TestingSink([]))
    recovery = None
    if store is not None:  # as `fraud run` runs it: Bytewax recovery, the shards' deltas in files
        init_db_dir(store, 1)
        recovery = RecoveryConfig(str(store))
    gc.collect()
    before = rss_bytes()
    run_main(flow, epoch_interval=timedelta(seconds=5), recovery_config=recovery)
    tmp.cleanup()
    growth = rss_at["last"] - before
    per = growth / n
    marginal = (rss_at["last"] - rss_at["half"]) / (n - n // 2)
    print(
        f"{args.step}{' (no recovery)' if args.no_recovery else ''}: {n:,} transactions ({n / cards:.1f} per card) held -> RSS +{growth / 2**20:,.1f} MiB, "
        f"{per:,.0f} bytes per transaction"
    )
    fixed = growth - marginal * n
    print(
        f"second half alone: {marginal:,.0f} bytes per transaction (what each more costs; the rest, "
        f"{fixed / 2**20:,.1f} MiB, is start-up and an epoch's changes in flight)"
    )
    print(
        f"1M transactions a day waiting 60 days: {marginal * 60e6 / 1e9:,.1f} GB over the cluster "
        f"({per * 60e6 / 1e9:,.1f} GB at the whole run's {per:,.0f} bytes)"
    )


if __name__ == "__main__":
    main()
