"""Redis I/O against real servers: embedded server, stream sink (inside Bytewax), consumer."""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import bytewax.operators as op
import pytest
import redis
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSource, run_main
from prometheus_client import REGISTRY

from flows.redis_sink import RedisSinkError, RedisStreamSink, xadd_batch
from fraud.consumer import (
    ack,
    consume,
    ensure_group,
    format_alert,
    pending_count,
    read_alerts,
    stream_length,
)
from service.redis_client import RedisUnavailableError, connect, partition_client, redact
from service.redis_server import EmbeddedRedis, redis_url
from service.settings import Settings
from testkit.streams import drain, txn_ids

if TYPE_CHECKING:
    from testkit.private_redis import RedisTestServer

pytestmark = pytest.mark.redis

STREAM = "t:alerts"


def make_alert(i: int) -> dict[str, str]:
    reasons = [
        {"feature": "amount_z", "value": 4.2, "contribution": 0.31},
        {"feature": "merchant_new", "value": None, "contribution": -0.05},
    ]
    return {
        "txn_id": f"t{i}",
        "card_id": f"c{i % 3}",
        "merchant_id": "m7",
        "ts": "2024-05-01T12:00:00Z",
        "score": "0.9134",
        "xgb_score": "0.95",
        "online_score": "0.84",
        "threshold": "0.5",
        "model_version": "v3",
        "reasons": json.dumps(reasons),
        "latency_ms": "1.5",
    }


def xadd_errors() -> float:
    return REGISTRY.get_sample_value("fraud_redis_errors_total", {"op": "xadd"}) or 0.0


def run_sink_flow(url: str, items: list[dict[str, str]], maxlen: int = 1000) -> None:
    flow = Dataflow("redis_sink_test")
    stream = op.input("inp", flow, TestingSource(items, batch_size=7))
    op.output("alerts", stream, RedisStreamSink(url, STREAM, maxlen))
    run_main(flow)


# -- embedded server --------------------------------------------------------------------------


@pytest.fixture
def embedded_dir(tmp_path: Path) -> Iterator[Path]:
    """A data dir whose embedded server (if any) is stopped after the test."""
    data_dir = tmp_path / "r"
    yield data_dir
    EmbeddedRedis(data_dir).stop()


def test_embedded_redis_persists_across_restart(embedded_dir: Path) -> None:
    server = EmbeddedRedis(embedded_dir).start()
    assert not server.reused
    assert server.url == f"unix://{embedded_dir.resolve()}/redis.sock"
    with connect(server.url) as client:
        assert client.config_get("port") == {"port": "0"}  # no TCP listener
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        xadd_batch(client, STREAM, [make_alert(i) for i in range(5)], 1000)
    server.stop()
    assert not server.is_running()

    again = EmbeddedRedis(embedded_dir).start()
    assert not again.reused
    with connect(again.url) as client:
        assert txn_ids(client, STREAM) == [f"t{i}" for i in range(5)]


def test_embedded_redis_reuses_running_server(embedded_dir: Path) -> None:
    first = EmbeddedRedis(embedded_dir).start()
    second = EmbeddedRedis(embedded_dir).start()
    assert second.reused
    with connect(first.url) as a, connect(second.url) as b:
        assert a.info("server")["run_id"] == b.info("server")["run_id"]
        a.set("k", "v")
        assert b.get("k") == b"v"


def test_redis_url_prefers_configured_url(embedded_dir: Path) -> None:
    configured = Settings(redis_url="redis://:pw@example.invalid:6379/0", redis_dir=embedded_dir)
    assert redis_url(configured) == "redis://:pw@example.invalid:6379/0"
    assert not EmbeddedRedis(embedded_dir).is_running()  # nothing started for it

    url = redis_url(Settings(redis_url=None, redis_dir=embedded_dir))
    assert url.startswith("unix://")
    with connect(url) as client:
        assert client.ping()


def test_clients_parse_replies_in_c(redis_url: str) -> None:
    # The install brings hiredis (pyproject: redis[hiredis]): a backlog replayed through Redis
    # runs 8-28 % faster with it than with redis-py's Python parser (docs/benchmarks.md). A
    # dependency dropped by mistake would only show as a slower flow.
    with partition_client(redis_url, 5.0) as client:
        client.ping()
        conn = client.connection_pool.get_connection()
        try:
            assert type(conn._parser).__name__ == "_HiredisParser"  # noqa: SLF001 (no public name for it)
        finally:
            client.connection_pool.release(conn)


# -- sink -------------------------------------------------------------------------------------


def test_xadd_batch_returns_ids_in_order(redis_client: redis.Redis) -> None:
    ids = xadd_batch(redis_client, STREAM, [make_alert(i) for i in range(4)], 1000)
    assert [entry_id for entry_id, _ in redis_client.xrange(STREAM)] == [i.encode() for i in ids]
    assert all(isinstance(i, str) for i in ids)
    assert xadd_batch(redis_client, STREAM, [], 1000) == []


def test_reset_streams_deletes_those_streams_and_only_their_markers(redis_client: redis.Redis) -> None:
    """`fraud reset`'s Redis part: the named streams and their de-duplication markers, counted; a
    stream whose name has glob characters does not take another stream's markers with it."""
    from flows.redis_sink import Dedupe, reset_streams, write_entries

    assert reset_streams(redis_client, []) == (0, 0)
    for stream, n in (("a*b", 3), ("axb", 2), ("c", 4)):
        write_entries(redis_client, stream, [make_alert(i) for i in range(n)], None, dedupe=Dedupe("txn_id"))
    assert reset_streams(redis_client, ["a*b", "c", "missing"]) == (2, 7)
    assert not redis_client.exists("a*b", "c") and redis_client.xlen("axb") == 2
    again = write_entries(
        redis_client, "axb", [make_alert(i) for i in range(2)], None, dedupe=Dedupe("txn_id")
    )
    assert again == [None, None]  # axb's markers are still there: its duplicates are still refused
    assert reset_streams(redis_client, ["axb"]) == (1, 2)
    # More markers than one DEL takes (1,000 keys a call): every batch is counted.
    write_entries(redis_client, "big", [make_alert(i) for i in range(2_500)], None, dedupe=Dedupe("txn_id"))
    assert reset_streams(redis_client, ["big"]) == (1, 2_500)
    assert not list(redis_client.scan_iter(match="*big*"))


def test_xadd_batch_keeps_the_stream_near_its_maxlen(redis_client: redis.Redis) -> None:
    """The cap is approximate (`MAXLEN ~`: Redis drops whole nodes of 100 entries), never ignored."""
    for start in range(0, 1000, 250):
        xadd_batch(redis_client, STREAM, [make_alert(i) for i in range(start, start + 250)], 10)
    assert 10 <= redis_client.xlen(STREAM) <= 110


def test_sink_in_dataflow_writes_every_item_in_order(redis_url: str, redis_client: redis.Redis) -> None:
    items = [make_alert(i) for i in range(50)]
    run_sink_flow(redis_url, items)
    assert txn_ids(redis_client, STREAM) == [f"t{i}" for i in range(50)]
    _, fields = redis_client.xrange(STREAM, count=1)[0]
    assert {k.decode(): v.decode() for k, v in fields.items()} == items[0]


def test_sink_trims_the_stream(redis_url: str, redis_client: redis.Redis) -> None:
    n = 3000
    run_sink_flow(redis_url, [{"txn_id": f"t{i}"} for i in range(n)], maxlen=10)
    length = redis_client.xlen(STREAM)
    assert 10 <= length < 300  # approximate: whole macro nodes (100 entries) are dropped
    _, last = redis_client.xrevrange(STREAM, count=1)[0]
    assert last[b"txn_id"] == f"t{n - 1}".encode()


def test_sink_rides_out_a_restart(
    redis_server_factory: Callable[..., RedisTestServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_server_factory(password="s3cret", appendonly=True)
    sink = RedisStreamSink(server.url, STREAM, 1000)
    part = sink.build("alerts", 0, 1)
    restarter = threading.Timer(0.5, server.start)
    errors = xadd_errors()
    try:
        part.write_batch([make_alert(i) for i in range(10)])
        server.stop()
        restarter.start()
        started = time.monotonic()
        with caplog.at_level(logging.INFO, logger="flows.redis_sink"):
            part.write_batch([make_alert(i) for i in range(10, 20)])
        assert time.monotonic() - started >= 0.4  # it really waited for the restart
    finally:
        restarter.join()  # before the fixture stops the server, even if the test failed
        part.close()
    with connect(server.url) as client:
        assert txn_ids(client, STREAM) == [f"t{i}" for i in range(20)]
    logged = [r for r in caplog.records if r.name == "flows.redis_sink"]
    assert [r.levelno for r in logged] == [logging.WARNING, logging.INFO]  # not one per attempt
    assert "answers again after" in logged[1].getMessage()
    assert all("writing 10 entries" in r.getMessage() for r in logged)  # the batch that waited
    assert xadd_errors() - errors >= 2  # every failed attempt is counted
    assert all("'alerts'" in r.getMessage() and ":***@" in r.getMessage() for r in logged)
    assert "s3cret" not in caplog.text


def test_sink_gives_up_naming_the_step(
    redis_server_factory: Callable[..., RedisTestServer], failures: list[str]
) -> None:
    server = redis_server_factory(password="s3cret")
    url = server.url
    server.stop()
    sink = RedisStreamSink(url, STREAM, 1000, retry_budget_s=0.5, initial_backoff_s=0.01)
    part = sink.build("alerts_out", 0, 1)
    try:
        with pytest.raises(RedisSinkError, match=r"'alerts_out'.*retry budget of 0.5s") as info:
            part.write_batch([make_alert(0)])
    finally:
        part.close()
    assert isinstance(info.value, RedisUnavailableError)
    assert "s3cret" not in str(info.value)
    assert failures == [str(info.value)]  # the progress summary says why the flow stopped


def test_sink_retries_at_its_configured_backoff(redis_server_factory: Callable[..., RedisTestServer]) -> None:
    """The sink's `initial_backoff_s` and `max_backoff_s` reach its retries: with a short first
    delay it tries more often in a budget than the defaults (0.1 s doubling to 5 s) would, and
    more often still with a short cap. The count is in the give-up message."""
    server = redis_server_factory()
    url = server.url
    server.stop()

    def attempts(**backoff: float) -> int:
        part = RedisStreamSink(url, STREAM, 1000, retry_budget_s=1.0, **backoff).build("alerts_out", 0, 1)
        try:
            with pytest.raises(RedisSinkError, match=r"writing 3 entries") as info:
                part.write_batch([make_alert(i) for i in range(3)])
        finally:
            part.close()
        found = re.search(r"\((\d+) attempts\)", str(info.value))
        assert found is not None, str(info.value)
        return int(found.group(1))

    assert attempts(initial_backoff_s=0.01) >= 7  # 0.01 s doubling: 8 in 1 s; from 0.1 s: 5
    assert attempts(initial_backoff_s=0.01, max_backoff_s=0.02) >= 20  # ~45 in 1 s; uncapped: 8


def test_sink_without_dedupe_counts_no_duplicates(redis_url: str) -> None:
    stream = "no-dedupe"
    before = REGISTRY.get_sample_value("fraud_sink_duplicates_total", {"stream": stream})
    part = RedisStreamSink(redis_url, stream, 1).build("alerts_out", 0, 1)  # a cap of 1 is allowed
    try:
        part.write_batch([make_alert(i) for i in range(3)])
    finally:
        part.close()
    assert REGISTRY.get_sample_value("fraud_sink_duplicates_total", {"stream": stream}) == before
    with pytest.raises(ValueError):
        RedisStreamSink(redis_url, stream, 0)
    with pytest.raises(ValueError, match="retry_budget_s must be > 0, got 0"):
        RedisStreamSink(redis_url, stream, 10, retry_budget_s=0)  # a sink that could never retry


def fill_past_maxmemory(client: redis.Redis) -> list[str]:
    """Write about 3 MB, then cap the server's memory 1 MB below what it uses (noeviction): every
    write is refused with OOM until the returned keys are deleted."""
    keys = [f"filler:{i}" for i in range(30)]
    for key in keys:
        client.set(key, b"x" * 100_000)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) - 1_000_000)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        client.set("one-more", "x")
    return keys


@pytest.mark.parametrize("dedupe_field", ["txn_id", None], ids=["script", "xadd"])
def test_sink_backs_off_while_redis_is_full(
    redis_server_factory: Callable[..., RedisTestServer],
    caplog: pytest.LogCaptureFixture,
    dedupe_field: str | None,
) -> None:
    # OOM comes as an OOM error from XADD, and (Redis 6) wrapped in a script error from the
    # dedupe script: both are "wait", not "refused".
    server = redis_server_factory()
    part = RedisStreamSink(server.url, STREAM, 1000, dedupe_field=dedupe_field).build("alerts", 0, 1)
    outcome: list[BaseException | None] = []

    def write() -> None:
        try:
            part.write_batch([make_alert(i) for i in range(5)])
            outcome.append(None)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    errors = xadd_errors()
    writer = threading.Thread(target=write)
    with connect(server.url) as admin, caplog.at_level(logging.INFO, logger="flows.redis_sink"):
        fillers = fill_past_maxmemory(admin)
        writer.start()
        deadline = time.monotonic() + 10
        while xadd_errors() == errors and writer.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert writer.is_alive(), f"the sink did not wait for memory: {outcome}"
        admin.delete(*fillers)  # memory is freed: the write must go through now
        writer.join(timeout=15)
        assert outcome == [None]
        assert txn_ids(admin, STREAM) == [f"t{i}" for i in range(5)]
    part.close()
    logged = [r for r in caplog.records if r.name == "flows.redis_sink"]
    assert [r.levelno for r in logged] == [logging.WARNING, logging.INFO]
    assert "command not allowed when used memory > 'maxmemory'" in logged[0].getMessage()


class HungServer:
    """A TCP server on 127.0.0.1 that accepts connections and never answers (a hung Redis)."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.port = int(self._sock.getsockname()[1])
        self._accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            self._accepted.append(conn)  # kept open, never read from nor written to

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for conn in self._accepted:
            conn.close()
        self._sock.close()


@pytest.fixture
def hung_server() -> Iterator[HungServer]:
    server = HungServer()
    yield server
    server.close()


def test_sink_gives_up_on_a_hung_server_within_its_budget(
    hung_server: HungServer, caplog: pytest.LogCaptureFixture, failures: list[str]
) -> None:
    url = f"redis://:s3cret@127.0.0.1:{hung_server.port}/0"
    part = RedisStreamSink(url, STREAM, 1000, retry_budget_s=2.0).build("alerts_out", 0, 1)
    errors = xadd_errors()
    started = time.monotonic()
    try:
        with (
            caplog.at_level(logging.INFO, logger="flows.redis_sink"),
            pytest.raises(RedisUnavailableError, match=r"'alerts_out'.*retry budget of 2s") as info,
        ):
            part.write_batch([make_alert(0)])
    finally:
        part.close()
    elapsed = time.monotonic() - started
    assert 2.0 <= elapsed < 10.0, elapsed  # the budget plus one socket timeout, not minutes
    assert isinstance(info.value, RedisSinkError) and "Timeout" in str(info.value)
    logged = [r for r in caplog.records if r.name == "flows.redis_sink"]
    assert [r.levelno for r in logged] == [logging.WARNING, logging.ERROR]  # not one per attempt
    assert xadd_errors() - errors >= 2  # it did retry, and counted each attempt
    assert failures == [str(info.value)]
    assert "s3cret" not in caplog.text + str(info.value)


# -- consumer ---------------------------------------------------------------------------------


def test_ensure_group_is_idempotent(redis_client: redis.Redis) -> None:
    assert ensure_group(redis_client, STREAM, "g") is True
    assert ensure_group(redis_client, STREAM, "g") is False
    assert stream_length(redis_client, STREAM) == 0  # MKSTREAM created it
    assert [g["name"] for g in redis_client.xinfo_groups(STREAM)] == [b"g"]


def test_read_and_ack(redis_client: redis.Redis) -> None:
    ensure_group(redis_client, STREAM, "g")
    ids = xadd_batch(redis_client, STREAM, [make_alert(i) for i in range(3)], 1000)
    alerts = read_alerts(redis_client, STREAM, "g", "me", count=10)
    assert [entry_id for entry_id, _ in alerts] == ids
    assert alerts[0][1] == make_alert(0)
    assert pending_count(redis_client, STREAM, "g") == 3
    assert ack(redis_client, STREAM, "g", ids) == 3
    assert pending_count(redis_client, STREAM, "g") == 0
    assert read_alerts(redis_client, STREAM, "g", "me") == []


def test_consume_prints_readable_lines_once_per_group(redis_client: redis.Redis) -> None:
    xadd_batch(redis_client, STREAM, [make_alert(i) for i in range(3)], 1000)
    n, text = drain(redis_client, STREAM, "g", as_json=False)
    lines = text.splitlines()
    assert n == 3 and len(lines) == 3
    assert "txn=t1" in lines[1] and "card=c1" in lines[1] and "merchant=m7" in lines[1]
    assert "2024-05-01T12:00:00Z" in lines[1]
    assert "score=0.913 (xgb 0.950, online 0.840" in lines[1]
    assert "model=v3" in lines[1]
    assert "amount_z=4.2 (+0.310)" in lines[1] and "merchant_new=na (-0.050)" in lines[1]
    assert pending_count(redis_client, STREAM, "g") == 0

    assert drain(redis_client, STREAM, "g", "other", as_json=False) == (0, "")  # same group: nothing new
    assert drain(redis_client, STREAM, "g2", as_json=False)[0] == 3  # another group sees everything


def test_consume_as_json_with_limit(redis_client: redis.Redis) -> None:
    ids = xadd_batch(redis_client, STREAM, [make_alert(i) for i in range(5)], 1000)
    n, text = drain(redis_client, STREAM, "g", as_json=True, limit=2)
    rows = [json.loads(line) for line in text.splitlines()]
    assert n == 2 and [row["id"] for row in rows] == ids[:2]
    assert rows[0]["fields"]["txn_id"] == "t0"
    reason = {"feature": "amount_z", "value": 4.2, "contribution": 0.31}
    assert rows[0]["fields"]["reasons"][0] == reason
    assert pending_count(redis_client, STREAM, "g") == 0  # only what was printed was read
    n, text = drain(redis_client, STREAM, "g", as_json=True)
    assert n == 3 and [json.loads(line)["id"] for line in text.splitlines()] == ids[2:]


def test_consume_follow_waits_for_new_alerts(redis_url: str, redis_client: redis.Redis) -> None:
    def produce() -> None:
        with connect(redis_url) as producer:
            xadd_batch(producer, STREAM, [make_alert(i) for i in range(3)], 1000)

    ensure_group(redis_client, STREAM, "g", start_id="$")
    timer = threading.Timer(0.3, produce)
    timer.start()
    out = io.StringIO()
    try:
        n = consume(redis_client, STREAM, "g", "me", follow=True, as_json=False, limit=3, out=out)
    finally:
        timer.join()
    assert n == 3
    shown = [line.split("txn=")[1].split()[0] for line in out.getvalue().splitlines()]
    assert shown == ["t0", "t1", "t2"]


def test_malformed_alert_is_printed_not_fatal(redis_client: redis.Redis) -> None:
    bad = {"txn_id": "t9", "score": "abc", "reasons": "not json"}
    line = format_alert(bad)
    assert "txn=t9" in line and "card=?" in line and "score=? (xgb ?" in line
    assert line.endswith("reasons: ?") and "model=?" in line
    odd = format_alert({"reasons": json.dumps([{"feature": "x", "value": None}, 3])})
    assert "reasons: x=na (?), ?" in odd
    assert format_alert({"reasons": "[]"}).endswith("reasons: none")

    xadd_batch(redis_client, STREAM, [bad, make_alert(1)], 1000)
    n, text = drain(redis_client, STREAM, "g", as_json=False)
    assert n == 2 and "txn=t9" in text
    n, text = drain(redis_client, STREAM, "g_json", as_json=True)
    assert n == 2 and json.loads(text.splitlines()[0])["fields"]["reasons"] == "not json"


# -- redaction --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://user:s3cret@host:6380/2", "rediss://user:***@host:6380/2"),
        ("redis://user:p@ss@host", "redis://user:***@host"),
        ("redis://s3cret@host:6379", "redis://***@host:6379"),
        ("rediss://user:@host", "rediss://user:***@host"),
        ("unix:///tmp/r.sock?db=0&password=s3cret", "unix:///tmp/r.sock?db=0&password=***"),
        ("redis://host:6379", "redis://host:6379"),
        ("unix:///tmp/r.sock", "unix:///tmp/r.sock"),
    ],
)
def test_redact_hides_passwords(url: str, expected: str) -> None:
    assert redact(url) == expected


@pytest.mark.parametrize("dedupe_field", ["txn_id", None], ids=["script", "xadd"])
def test_the_decision_log_is_trimmed_by_age_only_and_counts_what_it_removes(
    redis_url: str, redis_client: redis.Redis, dedupe_field: str | None
) -> None:
    """An audit trail: no count cap, whatever FRAUD_STREAM_MAXLEN says; entries older than the
    retention go (entry ids are the server's clock), and the trimmed counter says how many."""
    from flows.connectors import decision_log
    from service.runtime import load_runtime

    rt = load_runtime(Settings(stream_maxlen=3, decision_retention_days=1), need_redis=False)
    configured = decision_log(rt)
    assert isinstance(configured, RedisStreamSink)
    assert (configured.maxlen, configured.retention_s) == (None, 86_400)
    stream = f"decisions:{dedupe_field}"
    for i in range(40):  # two days old: beyond the retention
        redis_client.xadd(
            stream, {"txn_id": f"old-{i}"}, id=f"{int(time.time() * 1000) - 2 * 86_400_000 + i}-0"
        )
    day_ago = int(time.time() * 1000) - 86_400_000
    redis_client.xadd(stream, {"txn_id": "edge-old"}, id=f"{day_ago - 30_000}-0")  # 30 s past it: goes
    redis_client.xadd(stream, {"txn_id": "edge-young"}, id=f"{day_ago + 30_000}-0")  # 30 s inside: stays
    part = RedisStreamSink(redis_url, stream, None, dedupe_field=dedupe_field, retention_s=86_400).build(
        "log", 0, 1
    )
    before = REGISTRY.get_sample_value("fraud_stream_trimmed_total", {"stream": stream}) or 0.0
    for start in range(0, 300, 100):
        part.write_batch([make_alert(i) for i in range(start, start + 100)])
    part.close()
    kept = [fields[b"txn_id"].decode() for _, fields in redis_client.xrange(stream)]
    assert kept == ["edge-young"] + [make_alert(i)["txn_id"] for i in range(300)]  # no cap, none too old
    assert REGISTRY.get_sample_value("fraud_stream_trimmed_total", {"stream": stream}) == before + 41
