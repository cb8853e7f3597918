"""The Redis shard-stream source and `fraud replay`, against a real Redis server."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis
from bytewax import operators as op
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, run_main
from prometheus_client import REGISTRY
from typer.testing import CliRunner

from features.event_files import merged_records
from flows.redis_source import RedisShardSource, _ShardPartition, shard_of, shard_stream
from fraud.cli import app
from fraud.datagen import GeneratorConfig, write_files
from fraud.producer import replay_files
from service.redis_client import RedisUnavailableError, connect
from service.settings import get_settings
from testkit.system import free_port

if TYPE_CHECKING:
    from testkit.private_redis import RedisTestServer

pytestmark = pytest.mark.redis

Record = tuple[str, str]
GENEROUS_S = 2.0  # a liveness bound, not a performance assertion


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("replay-small")
    write_files(out, GeneratorConfig(seed=2, days=3, n_cards=30, n_merchants=50, drift_day=None))
    return out / "transactions.jsonl", out / "labels.jsonl"


def expected(files: tuple[Path, Path]) -> list[Record]:
    return [(kind, line) for kind, line, _ in merged_records(*files)]


def drain(part: _ShardPartition, timeout_s: float = 10.0) -> list[Record]:
    """Poll until an empty batch (after having data or not); (kind, payload) of each record, after
    checking that its origin names the shard stream and the entry id the position moved to."""
    out: list[Record] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = part.next_batch()
        if not batch:
            return out
        for kind, payload, origin in batch:
            stream, _, entry_id = origin.partition("#")
            assert stream == part._stream and entry_id.count("-") == 1, origin  # noqa: SLF001
            out.append((kind, payload))
        assert batch[-1][2] == f"{part._stream}#{part.snapshot()}"  # noqa: SLF001
    raise AssertionError("shard did not drain")


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def poll_like_bytewax(part: _ShardPartition, timeout_s: float) -> list[Record]:
    """Call next_batch whenever the partition asks to be woken (next_awake), as Bytewax does."""
    got: list[Record] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        awake = part.next_awake()
        if awake is not None:
            time.sleep(max(0.0, (awake - datetime.now(UTC)).total_seconds()))
        got += [(kind, payload) for kind, payload, _ in part.next_batch()]
    return got


def test_replay_then_read_every_shard_exactly_once_in_card_order(
    redis_url: str, redis_client: redis.Redis, small: tuple[Path, Path]
) -> None:
    shards = 3
    summary = replay_files(redis_client, *small, "t:in", shards, batch=64)
    want = expected(small)
    assert summary["records"] == len(want) == sum(summary["per_shard"])
    assert summary["transactions"] == sum(1 for k, _ in want if k == "txn")

    source = RedisShardSource(redis_url, "t:in", shards, batch_size=50, block_ms=0)
    assert source.list_parts() == ["0", "1", "2"]
    got: dict[int, list[Record]] = {}
    for i in range(shards):
        part = source.build_part("in", str(i), None)
        try:
            got[i] = drain(part)
        finally:
            part.close()
    assert [len(got[i]) for i in range(shards)] == summary["per_shard"]
    assert Counter(r for recs in got.values() for r in recs) == Counter(want)  # each exactly once

    txn_shard: dict[str, int] = {}
    for i, recs in got.items():
        by_card: dict[str, list[str]] = defaultdict(list)
        for kind, line in recs:
            doc = json.loads(line)
            if kind == "txn":
                assert shard_of(doc["card_id"], shards) == i
                txn_shard[doc["txn_id"]] = i
                by_card[doc["card_id"]].append(line)
        for card, lines in by_card.items():  # per-card order is the file's (event-time) order
            assert lines == [ln for k, ln in want if k == "txn" and json.loads(ln)["card_id"] == card]
    for i, recs in got.items():
        for kind, line in recs:
            if kind == "label":
                assert txn_shard[json.loads(line)["txn_id"]] == i  # a label sits with its transaction


def test_a_paced_replay_sends_steady_small_flushes(
    redis_client: redis.Redis, small: tuple[Path, Path]
) -> None:
    """`rate` is kept on average and spread over `flushes_per_s` pipelines a second: a steady
    stream, not bursts (a burst is read and processed as one batch, so it sets the latency)."""
    flushes: list[int] = []
    began = time.monotonic()
    summary = replay_files(
        redis_client, *small, "p:in", 2, rate=4000, flushes_per_s=200, on_progress=flushes.append
    )
    took = time.monotonic() - began
    n = summary["records"]
    assert set(flushes[:-1]) == {20} and sum(flushes) == n  # 4,000/s in 200 flushes: 20 each
    assert took >= (n - 20) / 4000  # never ahead of the rate
    with pytest.raises(ValueError, match="flushes_per_s must be > 0"):
        replay_files(redis_client, *small, "p:in", 2, rate=10, flushes_per_s=0)


def test_unroutable_records_go_to_shard_zero(redis_client: redis.Redis, tmp_path: Path) -> None:
    txns, labels = tmp_path / "t.jsonl", tmp_path / "l.jsonl"
    good = {"txn_id": "t1", "ts": 1000, "card_id": "card-a", "merchant_id": "m", "amount": 1}
    txns.write_text(json.dumps(good) + '\nnot json\n{"txn_id": "t2", "ts": 2000}\n')
    labels.write_text('{"txn_id": "t1", "is_fraud": true, "ts": 3000}\n{"txn_id": "zz", "ts": 4000}\n')
    shards = 7
    card_shard = shard_of("card-a", shards)
    assert card_shard != 0
    summary = replay_files(redis_client, txns, labels, "u:in", shards)
    assert summary["per_shard"][card_shard] == 2  # the transaction and its label
    assert summary["per_shard"][0] == 3  # not JSON, no card_id, label of an unknown transaction


def test_resume_from_snapshot_has_no_gap_and_no_repeat(
    redis_url: str, redis_client: redis.Redis, small: tuple[Path, Path]
) -> None:
    replay_files(redis_client, *small, "r:in", 1)
    source = RedisShardSource(redis_url, "r:in", 1, batch_size=40, block_ms=0)
    part = source.build_part("in", "0", None)
    first = [(kind, payload) for kind, payload, _ in part.next_batch() + part.next_batch()]
    state = part.snapshot()
    part.close()
    resumed = source.build_part("in", "0", state)
    try:
        rest = drain(resumed)
    finally:
        resumed.close()
    assert len(first) == 80
    assert first + rest == expected(small)


def test_linger_lets_a_caught_up_shard_fill_its_next_batch(redis_url: str, redis_client: redis.Redis) -> None:
    """`linger_ms`: after a read that caught up (fewer entries than a batch) Bytewax comes back
    only after the linger, so what arrives meanwhile comes as one batch; a full batch (a backlog)
    is read on at once, and without a linger a caught-up shard is read again at once."""
    stream = shard_stream("l:in", 0)
    for i in range(5):
        redis_client.xadd(stream, {"kind": "txn", "payload": f'{{"n": {i}}}'})
    lingering = RedisShardSource(redis_url, "l:in", 1, batch_size=3, linger_ms=200).build_part(
        "in", "0", None
    )
    plain = RedisShardSource(redis_url, "l:in", 1, batch_size=3).build_part("in", "0", None)
    try:
        assert len(lingering.next_batch()) == 3 and lingering.next_awake() is None  # full: read on
        before = datetime.now(UTC)
        assert len(lingering.next_batch()) == 2  # caught up: wait for the next batch to fill
        awake = lingering.next_awake()
        assert awake is not None and before + timedelta(milliseconds=150) <= awake
        assert awake <= datetime.now(UTC) + timedelta(milliseconds=200)
        assert len(plain.next_batch()) == 3 and len(plain.next_batch()) == 2
        assert plain.next_awake() is None  # no linger: Bytewax reads again at once
        assert lingering.next_batch() == [] and lingering.next_awake() is not None  # poll_ms
    finally:
        lingering.close()
        plain.close()
    with pytest.raises(ValueError, match="linger_ms"):
        RedisShardSource(redis_url, "l:in", 1, linger_ms=-1)


def test_the_first_read_after_an_epoch_close_measures_how_long_the_close_held_the_input(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """Bytewax takes a partition's snapshot as it closes an epoch and polls it again once the
    epoch is saved: that gap is `fraud_epoch_pause_seconds` (and the summary's pause line), once
    per close; reads between closes add nothing."""
    from flows import outputs

    redis_client.xadd(shard_stream("p:in", 0), {"kind": "txn", "payload": "{}"})
    part = RedisShardSource(redis_url, "p:in", 1).build_part("in", "0", None)
    count, total = metric("fraud_epoch_pause_seconds_count"), metric("fraud_epoch_pause_seconds_sum")
    closes = outputs.EPOCH_PAUSES.n
    try:
        part.next_batch()  # no close yet
        assert metric("fraud_epoch_pause_seconds_count") == count
        part.snapshot()
        time.sleep(0.05)  # the close's snapshots and recovery writes
        assert len(part.next_batch()) == 0
        part.next_batch()
    finally:
        part.close()
    assert metric("fraud_epoch_pause_seconds_count") == count + 1
    assert 0.05 <= metric("fraud_epoch_pause_seconds_sum") - total < 0.05 + GENEROUS_S
    assert outputs.EPOCH_PAUSES.n == closes + 1


def test_latency_counts_from_when_redis_added_the_record_not_from_when_the_flow_read_it(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """A record that waited in its stream (an epoch close holding the input, a backlog) waited:
    its arrival is the entry id's time (Redis's clock at XADD), so the decision's latency counts
    the wait. A file's record arrives when it is read; an id ahead of this clock reads as no wait."""
    from flows.stamping import arrival_ns
    from flows.steps import decode_record

    write_files(tmp_path, GeneratorConfig(seed=3, days=1, n_cards=3, n_merchants=50, drift_day=None))
    payload = (tmp_path / "transactions.jsonl").read_text().splitlines()[0]
    added = time.time_ns()
    redis_client.xadd(shard_stream("a:in", 0), {"kind": "txn", "payload": payload})
    time.sleep(0.2)  # the record waits in the stream, unread
    part = RedisShardSource(redis_url, "a:in", 1).build_part("in", "0", None)
    try:
        (record,) = part.next_batch()
    finally:
        part.close()
    read = time.time_ns()
    txn = decode_record(record)
    assert added - 1_000_000 <= txn.received_ns <= added + 1_000_000  # the id's millisecond
    assert read - txn.received_ns >= 200_000_000

    now = time.time_ns()
    assert arrival_ns("transactions.jsonl:7", now) == now  # a file: read now
    assert arrival_ns("a:in:{0}#", now) == now  # a tick's origin names no entry
    assert arrival_ns("a:in:{0}#1700000000000-3", now) == 1_700_000_000_000 * 1_000_000
    assert arrival_ns(f"a:in:{{0}}#{now // 1_000_000 + 60_000}-0", now) == now  # Redis's clock ahead


def test_empty_stream_returns_promptly_malformed_entries_and_idle_exit(
    redis_url: str, redis_client: redis.Redis
) -> None:
    for block_ms in (0, 50):
        part = RedisShardSource(redis_url, "e:in", 1, block_ms=block_ms).build_part("in", "0", None)
        t0 = time.monotonic()
        assert part.next_batch() == []  # block_ms=0 must not mean "block forever"
        assert time.monotonic() - t0 < GENEROUS_S
        awake = part.next_awake()  # nothing there: Bytewax comes back in poll_ms, the worker is free
        assert awake is not None and awake <= datetime.now(UTC) + timedelta(milliseconds=5)
        part.close()

    stream = shard_stream("e:in", 0)
    redis_client.xadd(stream, {"payload": '{"txn_id": "x"}'})
    redis_client.xadd(stream, {"kind": "weird", "payload": "{}"})
    redis_client.xadd(stream, {"kind": "txn", "payload": b"\xff{}"})
    part = RedisShardSource(redis_url, "e:in", 1, block_ms=0, idle_exit_s=0.2).build_part("in", "0", None)
    try:
        batch = part.next_batch()
        assert [k for k, _, _ in batch] == ["unknown", "unknown", "txn"]
        assert len({origin for _, _, origin in batch}) == 3
        assert json.loads(batch[0][1]) == {"payload": '{"txn_id": "x"}'}
        assert json.loads(batch[1][1]) == {"kind": "weird", "payload": "{}"}
        assert batch[2][1] == "\udcff{}"  # the byte 0xff, kept (surrogateescape)
        deadline = time.monotonic() + 10
        with pytest.raises(StopIteration):
            while time.monotonic() < deadline:
                assert part.next_batch() == []
                time.sleep(0.05)
    finally:
        part.close()


def test_redis_restart_mid_read_loses_and_repeats_nothing(
    redis_server_factory: Callable[..., RedisTestServer],
    small: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="flows.redis_source")
    server = redis_server_factory(appendonly=True, password="s3cret")
    with connect(server.url) as client:
        replay_files(client, *small, "k:in", 1)
    part = RedisShardSource(server.url, "k:in", 1, batch_size=30, block_ms=0).build_part("in", "0", None)
    try:
        got = [(kind, payload) for kind, payload, _ in part.next_batch()]
        errors = metric("fraud_redis_errors_total", op="xread")
        server.stop()
        for _ in range(3):
            assert part.next_batch() == []  # down: nothing, no exception
        awake = part.next_awake()
        assert awake is not None and awake > datetime.now(UTC)  # Bytewax is told to back off
        assert metric("fraud_redis_errors_total", op="xread") >= errors + 3
        assert part.snapshot() == part.snapshot()
        server.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (batch := part.next_batch()):
            time.sleep(0.05)
        got += [(kind, payload) for kind, payload, _ in batch] + drain(part)
        awake = part.next_awake()  # the backoff is over: only the short wait after an empty read
        assert awake is not None and awake <= datetime.now(UTC) + timedelta(milliseconds=5)
    finally:
        part.close()
    assert got == expected(small)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per outage, not once per failed poll
    assert any("again after" in r.getMessage() for r in caplog.records)
    assert "s3cret" not in caplog.text and "***" in caplog.text


def test_outage_longer_than_the_budget_stops_the_source(
    caplog: pytest.LogCaptureFixture, failures: list[str]
) -> None:
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"  # nothing listens there
    source = RedisShardSource(url, "o:in", 1, retry_budget_s=1.0)
    part = source.build_part("in", "0", "1700000000000-5")
    errors = metric("fraud_redis_errors_total", op="xread")
    started = time.monotonic()
    try:
        with (
            caplog.at_level(logging.INFO, logger="flows.redis_source"),
            pytest.raises(RedisUnavailableError, match=r"retry budget of 1s") as info,
        ):
            poll_like_bytewax(part, timeout_s=20.0)
    finally:
        part.close()
    assert 1.0 <= time.monotonic() - started < 10.0  # about the budget, not forever
    message = str(info.value)
    assert "'o:in:{0}'" in message and "redis://:***@127.0.0.1:" in message and "s3cret" not in message
    assert "position 1700000000000-5 kept" in message and "restart resumes from the snapshot" in message
    assert part.snapshot() == "1700000000000-5"  # nothing was skipped
    assert metric("fraud_redis_errors_total", op="xread") - errors >= 3  # each attempt counted
    logged = [r for r in caplog.records if r.name == "flows.redis_source"]
    assert [r.levelno for r in logged] == [logging.WARNING, logging.ERROR]  # not one per attempt
    assert failures == [message]  # the progress summary says why the flow stopped


def test_lag_gauge_follows_the_position(redis_url: str, redis_client: redis.Redis) -> None:
    stream = shard_stream("g:in", 0)
    redis_client.xadd(stream, {"kind": "txn", "payload": "{}"}, id="1000-0")
    redis_client.xadd(stream, {"kind": "txn", "payload": "{}"}, id="4000-0")
    part = RedisShardSource(redis_url, "g:in", 1, batch_size=1, block_ms=0).build_part("in", "0", None)
    try:
        part.next_batch()  # reads 1000-0; the first unread entry is the newest one: no lag
        assert metric("fraud_source_lag_seconds", shard="0") == 0.0
        behind = RedisShardSource(redis_url, "g:in", 1, block_ms=0).build_part("in", "0", None)
        try:
            behind._refresh_lag(time.monotonic())  # nothing read: 1000-0 unread, newest 4000-0  # noqa: SLF001
            assert metric("fraud_source_lag_seconds", shard="0") == 3.0
        finally:
            behind.close()
    finally:
        part.close()


def test_bytewax_dataflow_reads_everything_and_ends_when_idle(
    redis_url: str, redis_client: redis.Redis, small: tuple[Path, Path]
) -> None:
    replay_files(redis_client, *small, "f:in", 2)
    out: list[tuple[str, str, str]] = []
    flow = Dataflow("redis_source_test")
    records = op.input("in", flow, RedisShardSource(redis_url, "f:in", 2, batch_size=100, idle_exit_s=0.5))
    op.output("out", records, TestingSink(out))
    run_main(flow)
    ticks = sorted(origin for kind, _, origin in out if kind == "tick")
    out = [r for r in out if r[0] != "tick"]
    assert Counter((kind, payload) for kind, payload, _ in out) == Counter(expected(small))
    assert len({origin for _, _, origin in out}) == len(out)  # every record has its own origin
    # Empty for 250 ms (FRAUD_SOURCE_IDLE_MS) before ending at 500 ms: each shard said so once.
    assert ticks == ["f:in:{0}#", "f:in:{1}#"]


def test_cli_replay_pushes_the_file_into_the_shards(
    redis_url: str, redis_client: redis.Redis, small: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FRAUD_REDIS_URL", redis_url)
    get_settings.cache_clear()
    txns, labels = small
    result = CliRunner().invoke(app, ["replay", str(txns), "--labels", str(labels), "--shards", "3"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    want = expected(small)
    assert summary["records"] == len(want)
    assert summary["labels"] == sum(1 for k, _ in want if k == "label")
    assert [redis_client.xlen(shard_stream("fraud:in", i)) for i in range(3)] == summary["per_shard"]
