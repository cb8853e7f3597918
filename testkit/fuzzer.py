"""A seeded fuzzer for the whole flow: hostile records mixed into valid traffic, through a real
Redis, with the books checked afterwards.

`entries(n, seed)` builds `n` input-stream entries: valid transactions and labels of a generated
world, with hostile records spliced in (broken and binary JSON, nesting too deep, payloads and
strings too large, amounts and times out of range, missing and mistyped fields, control
characters, duplicates, labels for unknown or already labelled transactions, entries without a
kind or payload...), ending with a tail of fresh valid transactions that must still be scored.
`run(url, entries)` pushes them into the input shards, runs the real flow in this process
(Redis source and sinks, decision log on) and returns the accounting:

    records in = transactions scored + dead letters + labels joined

checked exactly, with every transaction scored at most once, every dead letter written once with
a documented reason, and the tail scored. `python -m benchmarks.fuzz` runs it at scale; the test suite
runs a short version.
"""

from __future__ import annotations

import json
import random
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from features.events import MAX_FIELD_CHARS, MAX_RECORD_BYTES, REASONS
from flows.redis_source import ENTRY_KIND, ENTRY_PAYLOAD, shard_stream
from fraud.producer import route

Entry = dict[str, bytes | str]
Mutation = Callable[[random.Random, dict[str, Any]], Entry]

HOSTILE_SHARE = 0.4
TAIL = 200  # fresh valid transactions at the very end: the flow must still be scoring


def _txn(payload: str | bytes) -> Entry:
    return {ENTRY_KIND: "txn", ENTRY_PAYLOAD: payload}


def _deep(depth: int, obj: bool) -> str:
    return ('{"a":' * depth + "1" + "}" * depth) if obj else ("[" * depth + "]" * depth)


def _random_bytes(rng: random.Random, n: int) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(n))


_CONTROL = "\x1b[2J\x1b]0;pwned\x07\r\x08\x00\u202e\u2066\x9b"
_ODD_TEXT = ["", " ", "null", "💳", "é" * 10, _CONTROL, "a\nb", "\\", '"', "\ud7ff", "x" * MAX_FIELD_CHARS]

# Each mutation turns a valid transaction (a dict) into one hostile input-stream entry.
MUTATIONS: dict[str, Mutation] = {
    "truncated": lambda r, t: _txn(json.dumps(t)[: r.randrange(1, len(json.dumps(t)))]),
    "binary": lambda r, t: _txn(_random_bytes(r, r.randrange(1, 200))),
    "binary_in_string": lambda r, t: _txn(json.dumps(t).encode().replace(b'"m', b'"\xff\xfe', 1)),
    "not_utf8_card": lambda r, t: _txn(json.dumps(t).encode().replace(t["card_id"].encode(), b"\xc3(", 1)),
    "deep_array": lambda r, t: _txn(json.dumps(t)[:-1] + ',"x":' + _deep(r.choice([63, 65, 100, 900, 2_000, 20_000]), False) + "}"),
    "deep_object": lambda r, t: _txn(json.dumps(t)[:-1] + ',"x":' + _deep(r.choice([63, 65, 900, 3_000]), True) + "}"),
    "too_large": lambda r, t: _txn(json.dumps({**t, "pad": "p" * (MAX_RECORD_BYTES + r.randrange(10))})),
    "long_id": lambda r, t: _txn(json.dumps({**t, r.choice(["card_id", "txn_id", "merchant_id", "device_id", "ip", "mcc"]): "z" * (MAX_FIELD_CHARS + 1 + r.randrange(5_000))})),
    "huge_amount": lambda r, t: _txn(json.dumps({**t, "amount": r.choice([1e308, 3.5e38, 1.4e154, 1e9 + 1, 1e39])})),
    "inf_amount": lambda r, t: _txn(json.dumps(t).replace(json.dumps(t["amount"]), r.choice(["1e999", "-1e999", "NaN", "Infinity", "-0.0e0"]), 1)),
    "negative_amount": lambda r, t: _txn(json.dumps({**t, "amount": -r.random() * 100})),
    "amount_type": lambda r, t: _txn(json.dumps({**t, "amount": r.choice(["12.5", None, True, [1], {"v": 1}])})),
    "bad_ts": lambda r, t: _txn(json.dumps({**t, "ts": r.choice([0, -1, 1_767_600_000, 2**63, "2026-01-05", "2026-01-05T10:00:00", "yesterday", None, 1.5e12, 9e15])})),
    "missing_field": lambda r, t: _txn(json.dumps({k: v for k, v in t.items() if k != r.choice(["txn_id", "ts", "card_id", "merchant_id", "amount"])})),
    "wrong_type": lambda r, t: _txn(json.dumps({**t, r.choice(["txn_id", "card_id", "merchant_id"]): r.choice([1, None, [], {}, True])})),
    "odd_strings": lambda r, t: _txn(json.dumps({**t, r.choice(["card_id", "merchant_id", "device_id", "channel", "mcc", "country"]): r.choice(_ODD_TEXT)})),
    "bad_location": lambda r, t: _txn(json.dumps({**t, "lat": r.choice([91, -200, "x", None]), "lon": r.choice([0, 181, None])})),
    "half_location": lambda r, t: _txn(json.dumps({**{k: v for k, v in t.items() if k not in ("lat", "lon")}, "lat": 10.0})),
    "scalar_garbage": lambda r, t: _txn(r.choice(["1 ", "true", "null", '"s"', "[1]", "-0"]) + r.choice(["", " x", "}", "{}", json.dumps(t)])),
    "not_object": lambda r, t: _txn(r.choice(["[]", "{}", '""', "0", "[" + json.dumps(t) + "]"])),
    "extra_fields": lambda r, t: _txn(json.dumps({**t, "extra": _CONTROL, "nested": {"a": [1, {"b": None}]}, "k" * 200: 1})),
    "whitespace": lambda r, t: _txn(r.choice(["", " ", "\n", "\t\t"])),
    "unknown_kind": lambda r, t: {ENTRY_KIND: r.choice(["refund", "", "TXN", "\x1b[31m", "k" * 500]), ENTRY_PAYLOAD: json.dumps(t)},
    "no_payload": lambda r, t: {ENTRY_KIND: "txn", "body": json.dumps(t)},
    "no_kind": lambda r, t: {ENTRY_PAYLOAD: json.dumps(t), "x": _random_bytes(r, 8)},
    "label_unknown_txn": lambda r, t: {ENTRY_KIND: "label", ENTRY_PAYLOAD: json.dumps({"txn_id": "never-" + str(r.random()), "is_fraud": True, "ts": t["ts"]})},
    "label_bad": lambda r, t: {ENTRY_KIND: "label", ENTRY_PAYLOAD: r.choice(["{", "[]", json.dumps({"txn_id": t["txn_id"], "is_fraud": "yes", "ts": t["ts"]}), json.dumps({"txn_id": t["txn_id"]}), '{"txn_id": 1, "is_fraud": true, "ts": 0}'])},
}  # fmt: skip


@dataclass
class Plan:
    """The entries to push, in order, with what was put in them."""

    entries: list[Entry] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)  # what each entry is: valid_txn, a mutation...
    tail: list[str] = field(default_factory=list)  # txn_ids of the final valid transactions


def entries(n: int, seed: int = 0, hostile_share: float = HOSTILE_SHARE) -> Plan:
    """About `n` entries: a generated world's records with hostile ones spliced in, then `TAIL`
    fresh valid transactions. Deterministic for a seed."""
    from fraud.datagen import GeneratorConfig, write_files

    rng = random.Random(seed)
    valid_needed = int(n * (1 - hostile_share))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        # The sample's density: about 45 transactions per card over 60 days.
        cards = max(20, valid_needed // 45)
        write_files(out, GeneratorConfig(seed=seed, days=60, n_cards=cards, n_merchants=max(50, cards // 20)))
        from features.event_files import merged_records

        records = list(merged_records(out / "transactions.jsonl", out / "labels.jsonl"))
    records = records[:valid_needed]
    txns = [json.loads(line) for kind, line, _ in records if kind == "txn"]
    plan = Plan()
    names = sorted(MUTATIONS)
    hostile = n - len(records) - TAIL
    slots = sorted(rng.randrange(len(records) + 1) for _ in range(max(0, hostile)))
    j = 0
    last_txn: dict[str, Any] = txns[0]
    for i, (kind, line, _) in enumerate(records):
        while j < len(slots) and slots[j] == i:
            plan.entries.append(_hostile(rng, names, last_txn, records, plan))
            j += 1
        plan.entries.append({ENTRY_KIND: kind, ENTRY_PAYLOAD: line})
        plan.kinds[f"valid_{kind}"] += 1
        if kind == "txn":
            last_txn = json.loads(line)
    while j < len(slots):
        plan.entries.append(_hostile(rng, names, last_txn, records, plan))
        j += 1
    last_ts = max(t["ts"] for t in txns[-50:]) if txns and isinstance(txns[-1]["ts"], int) else None
    for k in range(TAIL):
        t = dict(rng.choice(txns), txn_id=f"tail-{seed}-{k}")
        if last_ts is not None:
            t["ts"] = last_ts + 1000 * (k + 1)
        plan.entries.append({ENTRY_KIND: "txn", ENTRY_PAYLOAD: json.dumps(t)})
        plan.tail.append(t["txn_id"])
        plan.kinds["valid_txn"] += 1
    return plan


def _hostile(
    rng: random.Random,
    names: list[str],
    base: dict[str, Any],
    records: list[tuple[str, str, int]],
    plan: Plan,
) -> Entry:
    """One hostile entry; also exact copies of earlier records (duplicate transactions, labels)."""
    roll = rng.random()
    if roll < 0.04:
        kind, line, _ = rng.choice(records)
        plan.kinds[f"copy_{kind}"] += 1
        return {ENTRY_KIND: kind, ENTRY_PAYLOAD: line}
    name = rng.choice(names)
    plan.kinds[name] += 1
    # A fresh id: a mutation the contract accepts (odd but valid strings, extra fields, the
    # largest amounts) is then scored, through every feature step, instead of being a duplicate.
    return MUTATIONS[name](rng, dict(base, txn_id=f"fz-{len(plan.entries)}"))


@dataclass
class Books:
    """What came out of a fuzz run, and whether it adds up."""

    records_in: int
    scored: int
    distinct_scored: int
    dead_letters: int
    distinct_dead_letters: int
    labels_joined: int
    reasons: dict[str, int]
    tail_scored: int
    tail: int
    seconds: float
    crashed: str | None = None

    @property
    def balanced(self) -> bool:
        return self.records_in == self.scored + self.dead_letters + self.labels_joined

    @property
    def ok(self) -> bool:
        return (
            self.crashed is None
            and self.balanced
            and self.scored == self.distinct_scored
            and self.dead_letters == self.distinct_dead_letters
            and set(self.reasons) <= set(REASONS)
            and self.reasons.get("internal_error", 0) == 0
            and self.tail_scored == self.tail
        )


def push(client: redis.Redis, prefix: str, shards: int, plan: Plan, batch: int = 1000) -> None:
    """XADD the entries to their shards (valid records by card, labels after their transaction)."""
    txn_shards: dict[str, int] = {}
    streams = [shard_stream(prefix, i) for i in range(shards)]
    for start in range(0, len(plan.entries), batch):
        with client.pipeline(transaction=False) as pipe:
            for e in plan.entries[start : start + batch]:
                kind, payload = e.get(ENTRY_KIND), e.get(ENTRY_PAYLOAD)
                shard = 0
                if isinstance(kind, str) and isinstance(payload, str):
                    shard = route(kind, payload, shards, txn_shards)
                pipe.xadd(streams[shard], e)  # type: ignore[arg-type]
            pipe.execute()


def _labels_joined() -> float:
    from prometheus_client import REGISTRY

    return sum(
        s.value
        for f in REGISTRY.collect()
        if f.name == "fraud_labels"
        for s in f.samples
        if s.name.endswith("_total")
    )


def run(url: str, plan: Plan, *, prefix: str = "fuzz", shards: int = 2) -> Books:
    """Push `plan` into `<prefix>:in:{i}`, run the flow over it in this process, count the outputs."""
    import time

    from bytewax.testing import run_main

    from flows.fraud import build
    from flows.redis_source import RedisShardSource
    from service.redis_client import connect
    from service.settings import Settings

    client = connect(url)
    s = Settings(
        redis_url=url,
        alerts_stream=f"{prefix}:alerts",
        dlq_stream=f"{prefix}:dlq",
        late_stream=f"{prefix}:late",
        decision_stream=f"{prefix}:decisions",
        decision_log=True,
        stream_maxlen=10 * len(plan.entries) + 1000,
        progress_interval_s=600,
    )
    push(client, f"{prefix}:in", shards, plan)
    before = _labels_joined()
    started = time.monotonic()
    crashed = None
    try:
        source = RedisShardSource(url, f"{prefix}:in", shards, idle_exit_s=1.0)
        run_main(build(s, source=source))
    except Exception as exc:  # a crash is the finding: reported, not raised
        crashed = f"{type(exc).__name__}: {str(exc)[:500]}"
    seconds = time.monotonic() - started
    decision_entries: Any = client.xrange(s.decision_stream)
    dead_entries: Any = client.xrange(s.dlq_stream)
    decided = [f[b"txn_id"] for _, f in decision_entries]
    dead = [f for _, f in dead_entries]
    tail = set(plan.tail)
    books = Books(
        records_in=len(plan.entries),
        scored=len(decided),
        distinct_scored=len(set(decided)),
        dead_letters=len(dead),
        distinct_dead_letters=len({f[b"id"] for f in dead}),
        labels_joined=round(_labels_joined() - before),
        reasons=dict(Counter(f[b"reason"].decode() for f in dead).most_common()),
        tail_scored=sum(1 for t in decided if t.decode() in tail),
        tail=len(tail),
        seconds=round(seconds, 1),
        crashed=crashed,
    )
    client.close()
    return books
