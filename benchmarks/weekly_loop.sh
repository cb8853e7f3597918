#!/usr/bin/env bash
# The README's weekly loop, end to end on the bundled sample, against an embedded Redis of its own:
#
#   bash benchmarks/weekly_loop.sh            (from the repository root, after `make setup`)
#
# Days 0-59 of the sample are replayed into the input streams and run through the flow (decision
# log on, recovery on); a candidate is trained from the decision log and shadowed, a rule file is
# loaded; days 60-89 follow through the same flow (resumed); then champion and challenger are
# compared on the labels that arrived, the candidate is promoted and rolled back. Everything it
# writes (Redis data, registry, recovery store) lives in a temporary directory, removed at the end.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
WORK=$(mktemp -d)
export FRAUD_REDIS_DIR=$WORK/redis FRAUD_MODEL_REGISTRY=$WORK/registry FRAUD_RECOVERY_DIR=$WORK/recovery
export FRAUD_SOURCE=redis FRAUD_DECISION_LOG=1 FRAUD_SOURCE_IDLE_EXIT_S=3 FRAUD_COMMAND_KEY=weekly-loop-demo
FRAUD="$PY -m fraud.cli"
cleanup() {
  "$PY" -c "import os; from pathlib import Path; from service.redis_server import EmbeddedRedis; EmbeddedRedis(Path(os.environ['FRAUD_REDIS_DIR'])).stop()" || true
  rm -rf "$WORK"
}
trap cleanup EXIT
cd "$ROOT"
"$PY" - "$WORK" <<'PY'
import gzip, json, sys
from datetime import datetime
work = sys.argv[1]
def ts(line): return datetime.fromisoformat(json.loads(line)["ts"]).timestamp()
tx = gzip.open("data/samples/transactions.jsonl.gz", "rt").read().splitlines()
cut = ts(tx[0]) + 60 * 86400
for name in ("transactions", "labels"):
    lines = gzip.open(f"data/samples/{name}.jsonl.gz", "rt").read().splitlines()
    for part, keep in (("a", lambda l: ts(l) < cut), ("b", lambda l: ts(l) >= cut)):
        chosen = [l for l in lines if keep(l)]
        open(f"{work}/{name}-{part}.jsonl", "w").write("\n".join(chosen) + "\n")
        print(f"{name} days {'0-59' if part == 'a' else '60-89'}: {len(chosen):,}")
PY
cat > "$WORK/team.rules" <<'RULES'
far_above_usual: amount > 1000 and amount_ratio_to_mean_by_card_30d > 10 -> review
merchant_hopping: merchant_id_distinct_by_card_1h >= 6 -> alert
new_velocity: count_by_card_1h >= 8 -> alert dry-run
RULES
$FRAUD reset --yes
$FRAUD replay "$WORK/transactions-a.jsonl" --labels "$WORK/labels-a.jsonl" > /dev/null
$FRAUD run 2>&1 | grep "^\[done\]"
$FRAUD drift --count 3 2>&1 | tail -4
$FRAUD train --from-decisions --no-search --start-day 10 --train-days 28 --gap-days 7 --valid-days 7 --test-days 7 > "$WORK/train.json"
CAND=$("$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); print(r['version'])" "$WORK/train.json")
"$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); print('candidate', r['version'], '|', r['source'], '| validation AP', round(r['validation']['ap'], 4))" "$WORK/train.json"
$FRAUD model shadow "$CAND"
$FRAUD rules load "$WORK/team.rules"
$FRAUD replay "$WORK/transactions-b.jsonl" --labels "$WORK/labels-b.jsonl" > /dev/null
$FRAUD run 2>&1 | grep "^\[done\]\|command applied"
$FRAUD evaluate --from-decisions > "$WORK/eval.json"
"$PY" - "$WORK/eval.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(r["source"])
for v, m in r["champions"].items():
    f = m["final"]
    print(f"champion {v}: AP {f['ap']:.4f} AUC {f['auc']:.4f} on {f['n']:,} labelled decisions")
for p in r["shadows"]:
    c, s = p["champion_final"], p["challenger_final"]
    print(f"shadowed: {p['challenger']} beside {p['champion']} on the same {p['n']:,} labelled "
          f"transactions ({p['positives']} frauds): final AP {c['ap']:.4f} vs {s['ap']:.4f}, "
          f"XGBoost AP {p['champion_xgboost_ap']:.4f} vs {p['challenger_xgboost_ap']:.4f}, "
          f"alerts {c['alerts']} vs {s['alerts']}, precision {c['precision']:.3f} vs {s['precision']:.3f}")
PY
$FRAUD model promote "$CAND"
$FRAUD model rollback
$FRAUD model list
