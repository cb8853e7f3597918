"""Mutation score per module, from the last `make mutation` run (mutmut's results in `mutants/`).

    make mutation                       (runs mutmut over [tool.mutmut] source_paths, then this)
    make mutation SAMPLE=50 SEED=2026   (a random sample of 50 mutants per module, then this)
    python -m benchmarks.mutation       (the table again, from what mutmut saved)
    python -m benchmarks.mutation --sample 50 --seed 2026   (the sample's names, one per line)

mutmut changes one thing at a time in the modules `pyproject.toml` lists (an operator, a constant,
an argument dropped) and runs the tests that execute the changed function against each mutant:
a mutant is *killed* when a test fails, *survives* when every test passes. The score of a module
is killed / (mutants - equivalent), where equivalent mutants (a change no behaviour can show, such
as a different chunk size) are listed with their reason in `tests/mutation_equivalent.txt`.
Timeouts count as killed (the mutant made a test hang), mutants no test executes as survivors,
and mutants not run (yet) are counted apart and left out of the score. Prints one line per
module, then each survivor by name (`mutmut show NAME` prints its diff), and writes the same to
`mutants/report.txt` (of the first directory, with `--mutants DIR ...`: results of clones that
each ran some modules, merged).

A whole run takes hours on a small machine (the flow's tests are slow and every mutant runs the
tests that execute its function). A random sample of each module's mutants gives an unbiased
estimate of its score: the last column is the lower end of the score's 95 % interval (Wilson's,
from the mutants judged), the score a module can be said to reach whatever the mutants not run
(the score itself for a module whose every mutant ran).
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

from benchmarks.common import ROOT, parser

KILLED = {
    1: "killed",
    3: "killed",
    -24: "timeout",
    24: "timeout",
    36: "timeout",
    152: "timeout",
    255: "timeout",
}
SURVIVED = {0: "survived", 5: "no tests", 33: "no tests"}


def equivalent(path: Path = ROOT / "tests" / "mutation_equivalent.txt") -> dict[str, str]:
    """Mutant name -> why it is equivalent (lines `name  # reason`)."""
    out: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            name, _, why = line.partition("#")
            if name.strip():
                out[name.strip()] = why.strip()
    return out


def results(dirs: list[Path]) -> dict[str, dict[str, int | None]]:
    """Module -> mutant -> mutmut's exit code, from one or more `mutants` directories (runs of
    the same code split over several clones): for each mutant, a kill if any directory killed it
    (a survivor run again by name in another clone, once tests were added, is killed there while
    the first clone still holds its old result), else the last directory that ran it."""
    out: dict[str, dict[str, int | None]] = {}
    for mutants in dirs:
        for meta in sorted(mutants.rglob("*.py.meta")):
            module = str(meta.relative_to(mutants))[: -len(".meta")]
            codes = out.setdefault(module, {})
            for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
                if codes.get(name) in KILLED:
                    continue
                if code is not None or name not in codes:
                    codes[name] = code
    return out


def sample(mutants: Path, n: int, seed: int) -> list[str]:
    """Up to `n` mutant names per module, drawn at random (the same for the same seed and mutants)."""
    names: list[str] = []
    for module, codes in sorted(results([mutants]).items()):
        pool = sorted(codes)
        names += sorted(random.Random(f"{seed}:{module}").sample(pool, min(n, len(pool))))
    return names


def lower_bound(killed: int, judged: int, z: float = 1.96) -> float:
    """The lower end of Wilson's score interval for killed / judged (95 % for z = 1.96)."""
    p = killed / judged
    centre = p + z * z / (2 * judged)
    spread = z * math.sqrt(p * (1 - p) / judged + z * z / (4 * judged * judged))
    return (centre - spread) / (1 + z * z / judged)


def report(mutants: Path | list[Path], same: dict[str, str]) -> list[str]:
    """The table and the survivors' names, for mutmut's results in `mutants` (one directory or several)."""
    lines = [
        f"{'module':<28} {'mutants':>8} {'killed':>7} {'timeout':>8} {'survived':>9} {'equiv.':>7} "
        f"{'unrun':>6}  score  95% ≥"
    ]
    survivors: list[str] = []
    for module, codes in sorted(results(mutants if isinstance(mutants, list) else [mutants]).items()):
        kinds: Counter[str] = Counter()
        for name, code in codes.items():
            if name in same:
                kinds["equivalent"] += 1
            elif code in KILLED:
                kinds[KILLED[code]] += 1
            elif code in SURVIVED:
                kinds["survived"] += 1
                survivors.append(f"{name}  ({SURVIVED[code]})")
            else:
                kinds["unrun"] += 1  # not checked (yet), skipped, suspicious, segfault
        judged = len(codes) - kinds["equivalent"] - kinds["unrun"]
        caught, score = kinds["killed"] + kinds["timeout"], "not run"
        if judged:  # every mutant run: the score is exact; a sample: the lower end of its 95 % interval
            bound = lower_bound(caught, judged) if kinds["unrun"] else caught / judged
            score = f"{caught / judged:6.1%} {bound:6.1%}"
        lines.append(
            f"{module:<28} {len(codes):>8} {kinds['killed']:>7} {kinds['timeout']:>8} {kinds['survived']:>9} "
            f"{kinds['equivalent']:>7} {kinds['unrun']:>6}  {score}"
        )
    lines += ["", f"survivors ({len(survivors)}):", *(f"  {s}" for s in survivors)]
    return lines


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument(
        "--mutants",
        type=Path,
        nargs="+",
        default=[ROOT / "mutants"],
        help="mutmut's results directory; several (clones that ran parts of the same code) merge",
    )
    ap.add_argument("--sample", type=int, metavar="N", help="print N random mutant names per module and stop")
    ap.add_argument("--seed", type=int, default=2026, help="the sample's seed (default 2026)")
    args = ap.parse_args()
    for d in args.mutants:
        if not d.is_dir():
            raise SystemExit(f"no mutmut results in {d}: run `make mutation` first")
    if args.sample is not None:
        names = sample(args.mutants[0], args.sample, args.seed)
        if not names:
            raise SystemExit(f"no mutants in {args.mutants[0]}: mutmut has not generated them")
        print("\n".join(names))
        return
    text = "\n".join(report(args.mutants, equivalent()))
    print(text)
    (args.mutants[0] / "report.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
