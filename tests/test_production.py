"""Production I/O end to end, with real processes: SIGKILL and resume, Redis restarts, a cluster.

Each test replays a generated file into Redis shard streams and runs `fraud run` as separate OS
processes reading them (FRAUD_SOURCE=redis), with recovery on, until the shards are idle.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from fraud.datagen import GeneratorConfig, write_files
from fraud.redis_server import connect
from fraud.replay import replay_files

pytestmark = [pytest.mark.redis, pytest.mark.e2e]
ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 120


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("prod-data")
    write_files(out, GeneratorConfig(seed=21, days=16, n_cards=220, n_merchants=60, drift_day=None))
    return out / "transactions.jsonl", out / "labels.jsonl"


def fill(client: redis.Redis, dataset: tuple[Path, Path], prefix: str, shards: int) -> int:
    summary = replay_files(client, dataset[0], dataset[1], f"{prefix}:in", shards)
    return int(summary["transactions"])


def env_for(url: str, tag: str, tmp: Path, shards: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUD_")}
    env.update(
        FRAUD_SOURCE="redis",
        FRAUD_REDIS_URL=url,
        FRAUD_INPUT_STREAM=f"{tag}:in",
        FRAUD_INPUT_SHARDS=str(shards),
        FRAUD_SOURCE_IDLE_EXIT_S="1.5",
        FRAUD_SOURCE_BATCH_SIZE="100",
        FRAUD_ALERTS_STREAM=f"{tag}:alerts",
        FRAUD_DLQ_STREAM=f"{tag}:dlq",
        FRAUD_LATE_STREAM=f"{tag}:late",
        FRAUD_DECISION_LOG="1",
        FRAUD_DECISION_STREAM=f"{tag}:decisions",
        FRAUD_THRESHOLD="0.2",
        FRAUD_ONLINE_WARMUP_LABELS="100",
        FRAUD_RECOVERY_DIR=str(tmp / f"{tag}-recovery"),
        FRAUD_SNAPSHOT_INTERVAL_S="0.05",
        FRAUD_PROGRESS_INTERVAL_S="60",
        PYTHONPATH=str(ROOT),
        **extra,
    )
    return env


def start(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "fraud.cli", "run", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def finish(proc: subprocess.Popen[bytes]) -> str:
    out, _ = proc.communicate(timeout=DEADLINE_S)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    return text


def wait_until(check: Callable[[], bool], proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        assert proc.poll() is None, "the flow ended before the kill point"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.005)


def scores(client: redis.Redis, stream: str) -> dict[str, tuple[str, str, str]]:
    """txn_id -> (score, xgb, online) from a decision log; asserts each transaction is there once."""
    entries = [{k.decode(): v.decode() for k, v in f.items()} for _, f in client.xrange(stream)]
    counts = Counter(e["txn_id"] for e in entries)
    assert not [t for t, n in counts.items() if n > 1], "a decision was written twice"
    return {e["txn_id"]: (e["score"], e["xgb_score"], e["online_score"]) for e in entries}


def alert_ids(client: redis.Redis, stream: str) -> list[str]:
    return [f[b"txn_id"].decode() for _, f in client.xrange(stream)]


@pytest.fixture
def baseline(
    dataset: tuple[Path, Path], redis_url: str, tmp_path: Path
) -> Iterator[tuple[int, list[str], dict]]:
    """One uninterrupted run over a single shard: the reference alerts and scores."""
    client = connect(redis_url)
    client.flushall()
    n = fill(client, dataset, "base", 1)
    finish(start(env_for(redis_url, "base", tmp_path, 1)))
    yield n, alert_ids(client, "base:alerts"), scores(client, "base:decisions")
    client.close()


def test_sigkill_at_several_points_then_resume(
    baseline: tuple[int, list[str], dict], dataset: tuple[Path, Path], redis_url: str, tmp_path: Path
) -> None:
    n, expected_alerts, expected_scores = baseline
    assert len(expected_scores) == n and expected_alerts
    client = connect(redis_url)
    fill(client, dataset, "crash", 1)
    env = env_for(redis_url, "crash", tmp_path, 1)
    for fraction in (0.2, 0.5, 0.8):  # kill -9 when this share of transactions has been decided
        proc = start(env)
        wait_until(lambda f=fraction: client.xlen("crash:decisions") >= f * n, proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        assert client.xlen("crash:decisions") < n, "killed too late to test anything"
    finish(start(env))

    alerts = alert_ids(client, "crash:alerts")
    assert len(alerts) == len(set(alerts)), "an alert was written twice"
    assert set(alerts) == set(expected_alerts), "alerts missing or extra after the kills"
    assert scores(client, "crash:decisions") == expected_scores  # state and online model survived
    client.close()


def test_redis_restart_mid_run_loses_nothing(
    baseline: tuple[int, list[str], dict],
    dataset: tuple[Path, Path],
    tmp_path: Path,
    redis_server_factory: Callable[..., object],
) -> None:
    n, expected_alerts, expected_scores = baseline
    server = redis_server_factory(appendonly=True)
    client = connect(server.url)  # type: ignore[attr-defined]
    fill(client, dataset, "bounce", 1)
    proc = start(env_for(server.url, "bounce", tmp_path, 1))  # type: ignore[attr-defined]
    wait_until(lambda: client.xlen("bounce:decisions") >= 0.3 * n, proc)
    client.close()
    server.stop()  # type: ignore[attr-defined]
    time.sleep(1.5)
    server.start()  # type: ignore[attr-defined]
    text = finish(proc)
    client = connect(server.url)  # type: ignore[attr-defined]
    alerts = alert_ids(client, "bounce:alerts")
    assert len(alerts) == len(set(alerts)) and set(alerts) == set(expected_alerts)
    assert scores(client, "bounce:decisions") == expected_scores
    assert "unreachable" in text.lower() or "retry" in text.lower(), text[-2000:]
    client.close()


def test_two_processes_over_two_shards_score_everything_once(
    baseline: tuple[int, list[str], dict], dataset: tuple[Path, Path], redis_url: str, tmp_path: Path
) -> None:
    n, _, _ = baseline
    client = connect(redis_url)
    fill(client, dataset, "pair", 2)
    ports = [_free_port(), _free_port()]
    addresses = ";".join(f"127.0.0.1:{p}" for p in ports)
    env = env_for(redis_url, "pair", tmp_path, 2, FRAUD_RECOVERY_PARTITIONS="2")
    procs = [start(env, "-i", str(i), "-a", addresses) for i in range(2)]
    for p in procs:
        finish(p)
    decided = scores(client, "pair:decisions")  # asserts no transaction was decided twice
    assert len(decided) == n
    alerts = alert_ids(client, "pair:alerts")
    assert len(alerts) == len(set(alerts)) > 0
    assert set(alerts) == {t for t, (score, _, _) in decided.items() if float(score) >= 0.2}
    # Not asserted: equality with the one-process alerts. Keyed steps see events in the order they
    # arrive from other workers, which differs between cluster layouts (see README, Scale-out).
    client.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
