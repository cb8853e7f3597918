"""Fuzz the whole flow: hostile records mixed into valid traffic, through a private Redis.

    python -m benchmarks.fuzz [--records 100000] [--seeds 1 2] [--shards 2] [--hostile 0.4]

For each seed, builds the entries (`testkit.fuzzer.entries`: a generated world's records with hostile
ones spliced in, ending with 200 fresh valid transactions), pushes them into the input shards of a
private redis-server, runs the real flow over them in this process, and prints the books: records
in, scored, dead letters by reason, labels joined, whether they balance exactly (in = scored +
dead letters + labels joined), duplicates (none allowed), internal errors (none expected), whether
the final transactions were scored, and whether the flow crashed. Exits 1 if any run fails.
"""

from __future__ import annotations

import sys

from benchmarks.common import parser
from testkit import fuzzer
from testkit.private_redis import private_redis


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1])
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--hostile", type=float, default=fuzzer.HOSTILE_SHARE, help="share of hostile records")
    args = ap.parse_args()
    failed = 0
    with private_redis() as url:
        for seed in args.seeds:
            plan = fuzzer.entries(args.records, seed, args.hostile)
            b = fuzzer.run(url, plan, prefix=f"fuzz{seed}", shards=args.shards)
            hostile = sum(v for k, v in plan.kinds.items() if not k.startswith("valid_"))
            print(
                f"seed {seed}: {b.records_in:,} records in ({hostile:,} hostile, {len(fuzzer.MUTATIONS)} kinds) -> "
                f"{b.scored:,} scored + {b.dead_letters:,} dead letters + {b.labels_joined:,} labels joined "
                f"= {b.scored + b.dead_letters + b.labels_joined:,} ({'balanced' if b.balanced else 'UNBALANCED'}) "
                f"in {b.seconds:.1f}s"
            )
            print(
                f"seed {seed}: duplicates scored {b.scored - b.distinct_scored}, dead letters written twice "
                f"{b.dead_letters - b.distinct_dead_letters}, internal errors {b.reasons.get('internal_error', 0)}, "
                f"final transactions scored {b.tail_scored}/{b.tail}, crashes {0 if b.crashed is None else 1}"
                + (f" ({b.crashed})" if b.crashed else "")
            )
            print(f"seed {seed}: dead letters by reason {b.reasons}")
            print(f"seed {seed}: {'OK' if b.ok else 'FAILED'}")
            failed += not b.ok
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
