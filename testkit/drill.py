"""Run `fraud run` as real OS processes against Redis, and compare what they wrote.

Used by the crash and scale-out tests, `benchmarks.crash_drill` and `benchmarks.redis_throughput`:
every run gets its own stream names (a tag), reads the input shards until they are idle, and
writes alerts and, here, a decision log to compare scores. The throwaway server they run against
is `testkit.private_redis.private_redis`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from flows.redis_source import shard_stream
from fraud.producer import replay_files
from service.redis_client import connect
from testkit.private_redis import private_redis
from testkit.streams import entries

ROOT = Path(__file__).resolve().parents[1]


def flow_env(url: str, tag: str, shards: int, workdir: Path, **overrides: str) -> dict[str, str]:
    """Environment of a `fraud run` reading `<tag>:in:{i}` and writing `<tag>:<stream>`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUD_")}
    env.update(
        FRAUD_SOURCE="redis", FRAUD_REDIS_URL=url, FRAUD_INPUT_STREAM=f"{tag}:in", FRAUD_INPUT_SHARDS=str(shards),
        FRAUD_SOURCE_IDLE_EXIT_S="1.5", FRAUD_ALERTS_STREAM=f"{tag}:alerts", FRAUD_DLQ_STREAM=f"{tag}:dlq",
        FRAUD_LATE_STREAM=f"{tag}:late", FRAUD_DECISION_STREAM=f"{tag}:decisions",
        FRAUD_RECOVERY_DIR=str(workdir / f"{tag}-recovery"), FRAUD_PROGRESS_INTERVAL_S="600",
        FRAUD_MODEL_REGISTRY=str(workdir / f"{tag}-registry"),
        PYTHONPATH=str(ROOT),
    )  # fmt: skip
    env.update(overrides)
    return env


@contextmanager
def private_client() -> Iterator[tuple[str, redis.Redis]]:
    """A throwaway redis-server (`private_redis`): its URL and a client, closed and stopped after."""
    with private_redis() as url:
        client = connect(url)
        try:
            yield url, client
        finally:
            client.close()


def replay(client: redis.Redis, files: tuple[Path, Path | None], tag: str, shards: int, **kwargs: Any) -> int:
    """Replay (transactions, labels) files into the `<tag>:in` shards a `flow_env(tag)` run reads
    (`fraud.producer.replay_files`; `rate=` paces it): the transactions replayed."""
    return int(replay_files(client, *files, f"{tag}:in", shards, **kwargs)["transactions"])


Entry = tuple[bytes, dict[bytes, bytes]]  # a stream entry as redis-py reads it: id, fields


def labels_in_shard0(client: redis.Redis, tag: str, shards: int) -> list[list[Entry]]:
    """The entries of the `<tag>:in` shards as a label feed that does not know the card would
    leave them: every label in shard 0, among shard 0's entries in the order they were replayed
    (event time); each transaction where it is."""
    streams: list[list[Entry]] = [client.xrange(shard_stream(f"{tag}:in", i)) for i in range(shards)]  # type: ignore[misc]
    labels = [e for s in streams[1:] for e in s if e[1][b"kind"] == b"label"]
    first = sorted(streams[0] + labels, key=lambda e: tuple(int(x) for x in e[0].split(b"-")))
    return [first] + [[e for e in s if e[1][b"kind"] != b"label"] for s in streams[1:]]


def write(client: redis.Redis, tag: str, shard: int, items: list[Entry]) -> None:
    """Append `items`' fields to the `<tag>:in` shard `shard` (new ids), in order."""
    pipe = client.pipeline(transaction=False)
    for _, fields in items:
        pipe.xadd(shard_stream(f"{tag}:in", shard), fields)  # type: ignore[arg-type]
    pipe.execute()


def start(env: Mapping[str, str], *args: str) -> subprocess.Popen[bytes]:
    """`python -m fraud.cli run ARGS` in the repository, output captured."""
    return subprocess.Popen(
        [sys.executable, "-m", "fraud.cli", "run", *args],
        cwd=ROOT,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def reap(proc: subprocess.Popen[bytes]) -> None:
    """Kill `proc` if it still runs and collect it, so no process or pipe outlives its caller."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def finish(proc: subprocess.Popen[bytes], timeout_s: float = 600) -> str:
    """Wait for a run to end by itself; its output, or an error carrying the output's tail.

    On a timeout the process is killed and collected before the error propagates.
    """
    try:
        out = proc.communicate(timeout=timeout_s)[0].decode(errors="replace")
    finally:
        reap(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"fraud run exited with {proc.returncode}:\n{out[-3000:]}")
    return out


def finish_all(procs: list[subprocess.Popen[bytes]], timeout_s: float = 600) -> list[str]:
    """`finish` each process of a cluster; if one fails, the others are killed and collected too."""
    try:
        return [finish(proc, timeout_s) for proc in procs]
    finally:
        for proc in procs:
            reap(proc)


def kill_when(proc: subprocess.Popen[bytes], ready: Callable[[], bool], timeout_s: float = 120) -> None:
    """SIGKILL `proc` as soon as `ready()` holds (polled every 5 ms)."""
    deadline = time.monotonic() + timeout_s
    try:
        while not ready():
            if proc.poll() is not None:
                raise RuntimeError("the run ended before the kill point")
            if time.monotonic() > deadline:
                raise RuntimeError("kill point not reached in time")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        reap(proc)


@dataclass
class Outcome:
    """What a run left in its streams: alert ids in order, and scores per decided transaction."""

    alerts: list[str]
    scores: dict[str, tuple[str, str, str]]
    decisions_written: int

    @classmethod
    def read(cls, client: redis.Redis, tag: str) -> Outcome:
        alerts = [f["txn_id"] for f in entries(client, f"{tag}:alerts")]
        decisions = entries(client, f"{tag}:decisions")
        scores = {e["txn_id"]: (e["score"], e["xgb_score"], e["online_score"]) for e in decisions}
        return cls(alerts, scores, len(decisions))

    def compare(self, expected: Outcome) -> dict[str, int]:
        """Missing, extra and duplicated alerts, and decisions whose scores differ, against `expected`."""
        got, want = set(self.alerts), set(expected.alerts)
        counts = Counter(self.alerts)
        return {
            "alerts_expected": len(want),
            "alerts_written": len(self.alerts),
            "missing": len(want - got),
            "extra": len(got - want),
            "duplicated": sum(n - 1 for n in counts.values() if n > 1),
            "decisions_written": self.decisions_written,
            "decisions_duplicated": self.decisions_written - len(self.scores),
            "scores_different": sum(1 for t, s in expected.scores.items() if self.scores.get(t) != s),
        }
