"""XGBoost's cost per row by batch size: the ablation behind `FRAUD_SCORING_BATCH_SIZE`.

    python -m benchmarks.scoring_batch [--rows 8192] [--repeat 20] [--sizes 64,256,1024,4096]

Loads the served model as the flow does (`service.runtime.load_runtime`, the default settings:
the bundled model unless `FRAUD_*` says otherwise) and scores the same `--rows` rows (standard
normal values, float32, one column per feature the model reads) in batches of each size through
`XGBScorer.score`, the call the scorer makes: one `inplace_predict` per batch. Prints the median
over `--repeat` rounds of the microseconds per row for each size, and each size's cost relative to
the largest. The scorer makes one call per `FRAUD_SCORING_BATCH_SIZE` rows of what Bytewax hands it
(up to `FRAUD_SOURCE_BATCH_SIZE` records at a time), so a size below that splits a batch into calls
that each pay XGBoost's fixed cost.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from benchmarks.common import parser
from service.runtime import load_runtime
from service.settings import get_settings


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--sizes", default="64,256,1024,4096")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    xgb = load_runtime(get_settings(), need_redis=False).new_scorer().xgb
    X = np.random.default_rng(0).standard_normal((args.rows, len(xgb.feature_names))).astype(np.float32)
    xgb.score(X[:64])  # the first call sets XGBoost up: not counted
    per_row: dict[int, float] = {}
    for size in sizes:
        rounds = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            for s in range(0, len(X), size):
                xgb.score(X[s : s + size])
            rounds.append((time.perf_counter() - started) / len(X) * 1e6)
        per_row[size] = statistics.median(rounds)
    print(f"{args.rows:,} rows x {len(xgb.feature_names)} features, {xgb.booster.num_boosted_rounds()} trees")
    last = per_row[sizes[-1]]
    for size in sizes:
        print(f"batch {size:>5}: {per_row[size]:6.2f} µs/row ({per_row[size] / last:.2f}x batch {sizes[-1]})")


if __name__ == "__main__":
    main()
