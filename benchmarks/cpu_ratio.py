"""CPU per transaction: this flow against the naive peer, in paired runs on the same data.

    python -m benchmarks.cpu_ratio [--pairs 3] [--transactions N] [--baseline DIR] [--floor]

Runs `python -m bytewax.run flows.fraud` (what `make run` runs: file replay, an embedded-style
private Redis for the outputs, the default model and features) and the peer flow
`../shared/peers/naive_flow.py` (a plain Bytewax fraud flow written from Bytewax's examples)
alternately, `--pairs` times, on the same uncompressed copy of the bundled sample (its first
`--transactions` if given, with their labels). Each run is one OS process; its CPU time is the
user + system time the kernel accounted to it (`os.wait4`), imports and model loading included.
The Redis server's own CPU is not counted (the peer writes nothing). Before the pairs, each side
runs once, unmeasured, on the sample's first 2,000 transactions (or `--transactions`): the first
run after a change compiles the modules' bytecode, which the pairs must not count (so the runs
write bytecode even where PYTHONDONTWRITEBYTECODE is set). Prints each
pair and the median ratio flow / peer. The order alternates between pairs so that a drifting machine does not
favour one side. Exits 2 when the peer is not there.

`--baseline DIR`: a checkout of other code (an older commit, in a `git worktree`, with its C
modules built in place: `python setup.py build_ext --inplace`) whose flow runs in every pair
too, from that directory, on the same data; prints its ratio to the peer and the flow's CPU over
the baseline's, median of the pairs: the code before a change against the code after, measured
side by side.

`--floor`: also print the part of the flow's CPU that no change to the flow's steps can remove
while it does what it does today: importing its modules (a process that only imports
`flows.fraud`), and River learning every label and predicting every transaction (the default
`OnlineModel` on the sample's counts of labels and transactions, 43 random finite features,
timed in this process). Set against 1.5 x the peer's median CPU, it says how much is left for
everything else (features, ordering, XGBoost, Bytewax, the sinks).
"""

from __future__ import annotations

import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, parser
from testkit.private_redis import private_redis

PEER = ROOT.parent / "shared" / "peers" / "naive_flow.py"
SAMPLE = ROOT / "data" / "samples"


def sample(out: Path, limit: int | None) -> tuple[Path, Path, int]:
    """Uncompressed transactions (the first `limit`) and the labels of those, for both flows."""
    txns, labels = out / "tx.jsonl", out / "labels.jsonl"
    kept: set[str] = set()
    with gzip.open(SAMPLE / "transactions.jsonl.gz", "rt") as src, open(txns, "w") as dst:
        for line in src:
            if limit is not None and len(kept) >= limit:
                break
            kept.add(json.loads(line)["txn_id"])
            dst.write(line)
    with gzip.open(SAMPLE / "labels.jsonl.gz", "rt") as src, open(labels, "w") as dst:
        dst.writelines(line for line in src if json.loads(line)["txn_id"] in kept)
    return txns, labels, len(kept)


def cpu_of(cmd: list[str], env: dict[str, str], cwd: Path = ROOT) -> tuple[float, float, str]:
    """(CPU seconds, wall seconds, output) of one process run to its end; raises if it failed."""
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{output[-3000:]}")
    return usage.ru_utime + usage.ru_stime, wall, output


def floor(n_txns: int, n_labels: int) -> tuple[float, float]:
    """(CPU seconds to import the flow's modules, CPU seconds of River for the sample's counts)."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("FRAUD_") and k != "PYTHONDONTWRITEBYTECODE"
    }
    imports, _, _ = cpu_of([sys.executable, "-c", "import flows.fraud, service.runtime"], env)
    import random

    from models.online import OnlineModel
    from service.runtime import new_online_model, new_pipeline
    from service.settings import Settings

    settings = Settings()
    names = new_pipeline(settings).names
    model: OnlineModel = new_online_model(settings)
    rng = random.Random(7)
    rows = [[rng.gauss(0, 1) for _ in names] for _ in range(1000)]
    started = time.process_time()
    for i in range(max(n_txns, n_labels)):  # as the scorer calls it
        row = rows[i % 1000]
        if i < n_labels:
            model.learn_values(names, row, i % 100 == 0)
        if i < n_txns:
            model.predict_values(names, row)
    return imports, time.process_time() - started


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--transactions", type=int, default=None, help="only the sample's first N")
    ap.add_argument("--floor", action="store_true", help="also print the CPU no step change removes")
    ap.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="a checkout of other code (built: its C modules in place) whose flow runs in every pair too",
    )
    args = ap.parse_args()
    if not PEER.is_file():
        print(f"the peer flow is not at {PEER}: nothing to compare with", file=sys.stderr)
        sys.exit(2)
    # The unmeasured first runs write the modules' bytecode, as a user's first run does: an
    # environment that forbids it (PYTHONDONTWRITEBYTECODE) would have every pair compile them.
    base = {
        k: v for k, v in os.environ.items() if not k.startswith("FRAUD_") and k != "PYTHONDONTWRITEBYTECODE"
    }
    ratios, peers, base_ratios, against_base = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp, private_redis() as url:
        warm = Path(tmp) / "warm"
        warm.mkdir()
        warm_txns, warm_labels, _ = sample(warm, min(2_000, args.transactions or 2_000))
        txns, labels, n = sample(Path(tmp), args.transactions)
        n_labels = sum(1 for _ in labels.open())

        def runs(pair: int, txns: Path, labels: Path) -> dict[str, tuple[list[str], dict[str, str], Path]]:
            flow_env = {
                **base,
                "FRAUD_TRANSACTIONS_PATH": str(txns),
                "FRAUD_LABELS_PATH": str(labels),
                "FRAUD_REDIS_URL": url,
                "FRAUD_PROGRESS_INTERVAL_S": "3600",
                # Fresh streams each run: the de-duplication markers of an earlier run would
                # otherwise turn its writes into cheap skips.
                **{
                    f"FRAUD_{s.upper()}_STREAM": f"cpu{pair}:{s}"
                    for s in ("alerts", "dlq", "late", "drift", "decision")
                },
            }
            flow = [sys.executable, "-m", "bytewax.run", "flows.fraud"]
            sides = {
                "flow": (flow, flow_env, ROOT),
                "peer": (
                    [sys.executable, "-m", "bytewax.run", f"{PEER}:flow"],
                    {**base, "NAIVE_TX": str(txns)},
                    ROOT,
                ),
            }
            if args.baseline is not None:  # its own streams: its writes are not the flow's duplicates
                sides["baseline"] = (
                    flow,
                    {**flow_env, **{k: f"base{v}" for k, v in flow_env.items() if k.endswith("_STREAM")}},
                    args.baseline,
                )
            return sides

        for cmd, env, cwd in runs(0, warm_txns, warm_labels).values():  # unmeasured: bytecode, caches
            cpu_of(cmd, env, cwd)
        for pair in range(1, args.pairs + 1):
            cmds = runs(pair, txns, labels)
            order = list(cmds)
            order = order[pair % len(order) :] + order[: pair % len(order)]  # each side first in turn
            got = {name: cpu_of(*cmds[name]) for name in order}
            (flow_cpu, flow_wall, _), (peer_cpu, peer_wall, _) = got["flow"], got["peer"]
            ratios.append(flow_cpu / peer_cpu)
            peers.append(peer_cpu)
            line = (
                f"pair {pair}: flow {flow_cpu:.1f} CPU-s ({flow_cpu / n * 1e6:,.0f} µs/tx, wall {flow_wall:.1f} s), "
                f"peer {peer_cpu:.1f} CPU-s ({peer_cpu / n * 1e6:,.0f} µs/tx, wall {peer_wall:.1f} s), "
                f"ratio {ratios[-1]:.2f}"
            )
            if "baseline" in got:
                base_cpu = got["baseline"][0]
                base_ratios.append(base_cpu / peer_cpu)
                against_base.append(flow_cpu / base_cpu)
                line += f"; baseline {base_cpu:.1f} CPU-s, ratio {base_ratios[-1]:.2f}"
            print(line, flush=True)
    print(
        f"median CPU ratio flow / peer over {len(ratios)} pair(s): {statistics.median(ratios):.2f} "
        f"({n:,} transactions; whole-process user + system CPU, Redis not counted)"
    )
    if base_ratios:
        print(
            f"baseline {args.baseline}: median CPU ratio baseline / peer {statistics.median(base_ratios):.2f}; "
            f"flow / baseline {statistics.median(against_base):.2f} (median of the pairs)"
        )
    if args.floor:
        imports, river = floor(n, n_labels)
        budget = 1.5 * statistics.median(peers)
        print(
            f"floor: imports {imports:.1f} CPU-s + River {river:.1f} CPU-s ({n_labels:,} labels learned, "
            f"{n:,} predictions) = {imports + river:.1f} CPU-s; 1.5 x the peer's median is "
            f"{budget:.1f} CPU-s, leaving {budget - imports - river:.1f} CPU-s for everything else"
        )


if __name__ == "__main__":
    main()
