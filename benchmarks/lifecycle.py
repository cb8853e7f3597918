"""What the model lifecycle costs the scorer: a shadow model, a rule set, a live swap.

    python -m benchmarks.lifecycle [--repeats 3] [--limit N]

Replays the bundled sample's feature vectors and labels (computed once, as `fraud evaluate` does)
through fresh serving scorers, batch by batch as the flow hands them over, and measures the CPU
time of `Scorer.decide` over the whole replay for: the champion alone; with a shadow (a second
model of the same size scoring every transaction); with the example rule set of docs/rules.md (6
rules, one dry-run); with both. The variants run interleaved `--repeats` times (the machine is
shared: read the ratios, medians over the repeats). Then the pause of a live swap: the CPU time
of applying a `champion` command (the model loaded from the registry the first time, from the
process's cache after), and what the rules did to the decisions (alerts added, reviews,
suppressed).
"""

from __future__ import annotations

import dataclasses
import re
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from benchmarks.common import ROOT, log, parser
from features.engine import FeatureEngine, FeatureVector, LabelEvent
from features.event_files import replay
from features.events import Control
from models.artifact import load, save
from models.registry import Registry
from models.rules import digest as rules_digest
from models.serving import Decision, Item, LabelledVector, PendingVectors, Scorer
from service.runtime import load_runtime
from service.settings import Settings

DAY_MS = 86_400_000


def example_rules() -> str:
    """The rule set of docs/rules.md's Examples section."""
    text = (ROOT / "docs" / "rules.md").read_text()
    block = re.search(r"## Examples\s+```\n(.*?)```", text, re.DOTALL)
    assert block is not None, "docs/rules.md has no Examples block"
    return block.group(1)


def batches(settings: Settings, limit: int | None) -> list[list[Item]]:
    """The items the scorer gets, in batches of 256, as `fraud.train.scored_batches` makes them."""
    rt = load_runtime(settings, need_redis=False)
    waiting = PendingVectors(round(settings.label_ttl_days * DAY_MS))
    out: list[list[Item]] = [[]]
    n = 0
    for e in FeatureEngine(rt.pipeline).run(replay(settings.transactions_path, settings.labels_path)):
        if isinstance(e, FeatureVector):
            waiting.hold(e)
            out[-1].append(e)
            n += 1
        elif isinstance(e, LabelEvent) and (learned := waiting.join(e)) is not None:
            out[-1].append(learned)
        if len(out[-1]) >= 256:
            out.append([])
        if limit is not None and n >= limit:
            break
    return out


def run(scorer: Scorer, items: list[list[Item]]) -> tuple[float, list[Decision]]:
    decisions: list[Decision] = []
    started = time.process_time()
    for batch in items:
        decisions += scorer.decide(batch)
    return time.process_time() - started, decisions


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="transactions replayed (default: all)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        registry = Registry(Path(tmp) / "registry")
        base = load(Settings().model_path)
        registry.add(Settings().model_path)
        twin = dataclasses.replace(base, version=base.version.replace("-", "-9", 1))  # same size
        save(twin, Path(tmp) / "twin")
        registry.add(Path(tmp) / "twin")
        settings = Settings(model_registry=registry.root, drift_watch=False)
        rules = example_rules()
        shadow = Control("shadow", twin.version, registry.digest(twin.version))
        rule_set = Control("rules", "examples", rules_digest(rules), rules)
        log("computing the sample's feature vectors once")
        items = batches(settings, args.limit)
        txns = sum(isinstance(i, FeatureVector) for b in items for i in b)
        labels = sum(isinstance(i, LabelledVector) for b in items for i in b)
        variants = {
            "champion alone": [],
            "+ shadow": [shadow],
            "+ rules": [rule_set],
            "+ shadow + rules": [shadow, rule_set],
        }
        cpu: dict[str, list[float]] = {name: [] for name in variants}
        decided: dict[str, list[Decision]] = {}
        for r in range(args.repeats):
            for name, commands in variants.items():
                scorer = load_runtime(settings, need_redis=False).new_scorer()
                for c in commands:
                    scorer.apply(c)
                seconds, decided[name] = run(scorer, items)
                cpu[name].append(seconds)
                log(f"repeat {r + 1}: {name} {seconds:.2f} CPU-s")
        print(
            f"{txns:,} transactions, {labels:,} labels learned; CPU-s of Scorer.decide, median of {args.repeats}"
        )
        plain = statistics.median(cpu["champion alone"])
        for name, values in cpu.items():
            med = statistics.median(values)
            print(
                f"  {name:<18} {med:6.2f} CPU-s  ({med / txns * 1e6:5.1f} µs per transaction, "
                f"{med / plain:4.2f}x the champion alone)   runs: {', '.join(f'{v:.2f}' for v in values)}"
            )
        alone, ruled = decided["champion alone"], decided["+ rules"]
        actions = Counter(d.action for d in ruled)
        added = sum(1 for a, b in zip(alone, ruled, strict=True) if b.alert and not a.alert)
        suppressed = sum(1 for a, b in zip(alone, ruled, strict=True) if a.alert and not b.alert)
        hits = Counter(h.rule for d in ruled for h in d.hits)
        print(
            f"rules: {dict(actions)}; alerts added {added}, suppressed {suppressed}; hits per rule {dict(hits)}"
        )
        scorer = load_runtime(settings, need_redis=False).new_scorer()
        for what in ("first load", "cached"):
            started = time.perf_counter()
            scorer.apply(Control("champion", twin.version, registry.digest(twin.version)))
            print(
                f"live swap ({what}): {1000 * (time.perf_counter() - started):.1f} ms to apply a champion command"
            )


if __name__ == "__main__":
    main()
