"""Odd input at the edges: binary payloads keep their bytes from a file, through the input streams
and the flow, into the dead-letter stream; `fraud replay --labels ''` replays transactions only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from bytewax.testing import TestingSink, run_main
from typer.testing import CliRunner

from flows.fraud import build
from flows.redis_source import RedisShardSource
from fraud.cli import app
from fraud.datagen import GeneratorConfig, write_files
from fraud.producer import replay_files
from service.settings import Settings, get_settings

pytestmark = [pytest.mark.redis]

BINARY = b'{"txn_id": "bin-1", "card_id": "\xff\xfe\xc3", "merchant_id": "m\x80"}'


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("hostile")
    write_files(out, GeneratorConfig(seed=4, days=2, n_cards=20, n_merchants=50, drift_day=None))
    txns = out / "transactions.jsonl"
    lines = txns.read_bytes().splitlines()
    lines.insert(10, BINARY)
    txns.write_bytes(b"\n".join(lines) + b"\n")
    return txns, out / "labels.jsonl"


def test_a_binary_payload_reaches_the_dead_letters_byte_exact(
    small: tuple[Path, Path], redis_url: str, redis_client: redis.Redis
) -> None:
    txns, labels = small
    replay_files(redis_client, txns, labels, "hx:in", 2)
    stored = [f[b"payload"] for s in ("hx:in:{0}", "hx:in:{1}") for _, f in redis_client.xrange(s)]
    assert BINARY in stored  # the replay pushed the line's bytes, not a lossy decoding of them

    settings = Settings(redis_url=redis_url, dlq_stream="hx:dlq", progress_interval_s=600)
    source = RedisShardSource(redis_url, "hx:in", 2, idle_exit_s=0.5)
    decisions: list[object] = []
    run_main(build(settings, source=source, decisions=TestingSink(decisions)))
    dead = redis_client.xrange("hx:dlq")
    assert len(dead) == 1
    fields = dead[0][1]
    assert fields[b"reason"] == b"bad_json" and fields[b"raw"] == BINARY
    assert len(decisions) == sum(1 for line in txns.read_bytes().splitlines() if line != BINARY)


def test_replay_with_empty_labels_replays_transactions_only(
    small: tuple[Path, Path], redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    txns, labels = small
    monkeypatch.setenv("FRAUD_REDIS_URL", redis_url)
    monkeypatch.setenv("FRAUD_LABELS_PATH", str(labels))  # a configured default, overridden by ''
    monkeypatch.setenv("FRAUD_INPUT_STREAM", "hx:only")
    get_settings.cache_clear()
    result = CliRunner().invoke(app, ["replay", str(txns), "--labels", "", "--shards", "1"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["labels"] == 0 and summary["records"] == len(txns.read_bytes().splitlines())
    kinds = {f[b"kind"] for _, f in redis_client.xrange("hx:only:{0}")}
    assert kinds == {b"txn"}


def test_fraud_run_stops_on_a_wrong_password_with_one_line_and_no_traceback(
    redis_server_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """A configuration error is not retried, and `fraud run` says what it is in one line (the
    Bytewax error wrapping it would be a traceback of hundreds of lines)."""
    server = redis_server_factory(password="right")
    url = server.url.replace(":right@", ":wrong@")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FRAUD_", "RUST_BACKTRACE"))}
    env.update(FRAUD_SOURCE="redis", FRAUD_REDIS_URL=url, FRAUD_RECOVERY_DIR=str(tmp_path / "rec"))
    fraud = Path(sys.executable).with_name("fraud")
    out = subprocess.run([str(fraud), "run"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("fraud run: stopped: ") and "authentication failed" in last, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "wrong" not in out.stderr + out.stdout  # password redacted
    assert "[stopped]" in out.stdout and "[done]" not in out.stdout
