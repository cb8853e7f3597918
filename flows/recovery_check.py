"""The recovery store's check: is a Bytewax recovery store safe to resume from?

Bytewax 0.21.1 keeps recovery in SQLite files `part-N.sqlite3` (WAL mode), one per partition, each
with five tables: `parts` (the file's index and the partition count), `exs` (one row per run:
workers, resume epoch), `fronts` (per run and worker: the epoch it finished), `commits` (the epoch
this partition last committed, after which older snapshots are garbage-collected) and `snaps`
(every state key's pickled snapshot by epoch: input positions, feature state, label index,
pending vectors, the online model). `exs`, `fronts` and `snaps` rows are spread over the partitions
by a hash; a resume reads all of them, resumes at the epoch the progress rows say, and loads each
key's newest snapshot before it. Bytewax itself only refuses a partition whose commit is *newer*
than that epoch; one rolled back to an *older* epoch (a truncated `-wal`, or one file restored from
an older backup) is read as it is, so its keys resume from old state while the inputs, whose
positions sit in another partition, go on from the newest one: the events between are lost for
those keys, without a word. (That fits the tester's run: alerts missing, and labels dead-lettered
as `unknown_txn` because their transactions' index entries were in the rolled-back partition.)

What holds in a store Bytewax wrote, read from its source (src/recovery.rs, src/timely.rs,
src/inputs.rs at v0.21.1) and seen in killed runs, and what `check_store` therefore tests before
Bytewax opens the store:

- every partition commits every epoch, and an input only starts epoch e+1 once every partition
  has committed e (the probe sits behind the committer): so the commit epochs of all partitions
  differ by at most one. A partition further behind was rolled back.
- one worker commits its partitions in index order, each in its own transaction, so a crash
  between two leaves a prefix one epoch ahead of the rest: with a single worker, a partition
  behind one with a higher index was rolled back. This is what catches a `part-0.sqlite3-wal`
  cut short by a few transactions, which leaves part 0 one epoch behind (SQLite drops the
  incomplete transaction at the cut and everything after it).
- a commit of epoch e comes after the progress rows say e finished, so every commit is below the
  resume epoch those rows give, and no run has progress rows without its own `exs` row; otherwise
  the partition holding them was rolled back.
- every `part-N.sqlite3` of `0..count-1` exists, opens, passes `PRAGMA quick_check`, has the
  five tables and says it is partition N of count; no other `*.sqlite3` file is in the directory
  (Bytewax would read it as a partition). Any SQLite error is reported with the file's path.

What no check can see: a partition that lost only transactions after its last commit (snapshots of
the epoch in progress) while the progress of that epoch is recorded in another partition; a
partition exactly one commit behind where a crash between two commits could have left it (with one
worker, the last partitions by index; with several workers, any) that lost snapshots besides that
commit (losing the commit alone is harmless). With several processes (`fraud run -a`), whose hosts
may each keep a directory with copies of partitions the others write, only the partitions committed
in this directory are compared and the progress-row checks are skipped. A single partition, or a
whole store restored from one backup, rolled back by a truncated WAL is not damage: SQLite drops
whole transactions from the end, so what remains is the store as it was at an earlier commit, and
the resume replays from there (the sinks' dedupe markers keep a replay from writing anything
twice).

`flows.recovery` creates the store, records its identity and runs this check before every start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

STORE_FILE = "store.json"
TABLES = frozenset({"parts", "exs", "fronts", "commits", "snaps"})
PART_NAME = re.compile(r"part-(\d+)\.sqlite3")


class RecoveryStoreError(RuntimeError):
    """The recovery store cannot be trusted; the message names the file and says what to do."""


class _NotAPartition(Exception):
    """A file SQLite reads, but that is not the partition its name says."""


def fixes(directory: Path) -> str:
    """The three ways out of a refusal, in one sentence."""
    return (
        f"Fix: restore {directory} from a backup (all its files from one moment); or run "
        "`fraud reset --yes` and replay the input with `fraud run --fresh`; or pass --fresh "
        "(FRAUD_RECOVERY_FRESH=1) to move the store aside and start over from the beginning of the "
        "input (outputs already in Redis stay, and their dedupe markers keep a replay from writing "
        "anything twice)."
    )


def damaged(directory: Path, problems: list[str]) -> RecoveryStoreError:
    found = "; ".join(" ".join(problem.split()) for problem in problems)  # one line, for `fraud run`
    return RecoveryStoreError(
        f"recovery store {directory} is damaged: {found}. Resuming from it could lose state, or mix "
        "state from different moments, and give wrong results. " + fixes(directory)
    )


# -- what the store's files say ----------------------------------------------------------------


@dataclass
class Part:
    """What one partition file holds about the store's progress."""

    path: Path
    index: int
    count: int
    commit: int | None  # None: never committed (a new store, or a crash in its first epoch)
    exs: dict[int, tuple[int, int]] = field(default_factory=dict)  # ex_num -> (workers, resume epoch)
    fronts: dict[tuple[int, int], int] = field(default_factory=dict)  # (ex_num, worker) -> frontier


@dataclass(frozen=True)
class StoreInfo:
    """A store that passed the checks: its identity (None before `store.json` existed) and epochs."""

    directory: Path
    meta: dict[str, Any] | None
    partitions: int
    epoch: int | None  # newest committed epoch, None if never committed
    resume_epoch: int

    @property
    def id(self) -> str | None:
        return None if self.meta is None else str(self.meta.get("id"))


def _read_part(path: Path, index: int) -> Part:
    """Open `path` read-only and read its progress rows, as Bytewax will see them.

    With a `-wal` (a run that did not end cleanly) the URI has mode=ro: SQLite reads the WAL
    and never checkpoints it into the file; it rebuilds a stale `-shm` (the WAL's index, not
    data) or creates a missing one. Without one, immutable=1 reads the file alone and leaves no
    empty `-wal` and `-shm` behind.
    """
    wal = path.with_name(path.name + "-wal")
    has_wal = wal.exists() and wal.stat().st_size > 0
    uri = path.resolve().as_uri() + ("?mode=ro" if has_wal else "?mode=ro&immutable=1")
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5.0)) as conn:
        check = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
        if check != ["ok"]:
            raise sqlite3.DatabaseError("PRAGMA quick_check: " + " | ".join(map(str, check))[:300])
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if missing := TABLES - tables:
            raise _NotAPartition(
                f"is not a Bytewax recovery partition (no table {', '.join(sorted(missing))})"
            )
        parts = conn.execute("SELECT part_index, part_count FROM parts").fetchall()
        if len(parts) != 1 or parts[0][0] != index:
            raise _NotAPartition(f"says it is partition {parts}, not {index}")
        commits = conn.execute("SELECT part_index, commit_epoch FROM commits").fetchall()
        if any(i != index for i, _ in commits):
            raise _NotAPartition(f"holds the commits of other partitions: {commits}")
        part = Part(path, index, int(parts[0][1]), int(commits[0][1]) if commits else None)
        for ex, workers, resume in conn.execute("SELECT ex_num, worker_count, resume_epoch FROM exs"):
            part.exs[int(ex)] = (int(workers), int(resume))
        for ex, worker, front in conn.execute("SELECT ex_num, worker_index, worker_frontier FROM fronts"):
            part.fronts[(int(ex), int(worker))] = int(front)
    return part


def _resume_epoch(parts: list[Part]) -> tuple[int, int | None, int | None]:
    """(resume epoch, its run, that run's workers) computed as Bytewax's `resume_from` does: the
    newest run's smallest worker frontier, a worker without a row counting as the run's start."""
    exs = {ex: row for p in parts for ex, row in p.exs.items()}
    if not exs:
        return 1, None, None
    last = max(exs)
    workers, start = exs[last]
    progress = dict.fromkeys(range(workers), start)
    for p in parts:
        for (ex, worker), front in p.fronts.items():
            if ex == last:
                progress[worker] = max(progress.get(worker, start), front)
    return min(progress.values()), last, workers


def _at(part: Part) -> str:
    return "has never committed" if part.commit is None else f"is at epoch {part.commit}"


def consistency(parts: list[Part], *, whole: bool) -> list[str]:
    """Problems with how the partitions' epochs fit together (see the module docstring). A
    partition that never committed counts as epoch 0: the first commit is of epoch 1.

    `whole`: the directory holds the whole store (one process, or processes sharing it). One
    process of a cluster whose hosts each keep their own directory sees local copies of partitions
    that other processes write, never committed here, and only part of the progress rows; then only
    the partitions committed here are compared.
    """
    problems: list[str] = []
    if not whole:
        parts = [p for p in parts if p.commit is not None]
    epoch = {p.index: p.commit or 0 for p in parts}
    newest = max(epoch.values(), default=0)
    resume, last, workers = _resume_epoch(parts)
    if not whole:
        workers = None  # the runs' rows may be in other hosts' directories: the count is not known
    rolled_back = "its WAL or file was truncated, or it was restored from an older backup"
    behind: list[Part] = []
    for p in parts:
        if epoch[p.index] < newest - 1:
            behind.append(p)
            problems.append(f"{p.path} {_at(p)} while the others are at {newest}: {rolled_back}")
        elif epoch[p.index] == newest - 1 and workers == 1:
            # One worker commits the partitions in index order: only a suffix may lag by one.
            after = [q for q in parts if q.index > p.index and epoch[q.index] == newest]
            if after:
                behind.append(p)
                problems.append(
                    f"{p.path} {_at(p)} while {after[0].path.name}, which the one worker commits "
                    f"after it, is at {newest}: {rolled_back}"
                )
    if not whole:
        return problems
    orphans = sorted({ex for p in parts for ex, _ in p.fronts if last is None or ex > last})
    if orphans:
        problems.append(
            f"the progress of run {orphans[-1]} is recorded but not its start (the last run found is "
            f"{last}): the partition that held it was truncated or restored from an older backup"
        )
    elif newest >= resume and not behind:
        lagging = ", ".join(p.path.name for p in parts if epoch[p.index] < newest) or "not known"
        problems.append(
            f"the partitions committed epoch {newest} but the progress they record resumes at epoch "
            f"{resume}: the partition that held the last progress ({lagging}) was truncated or "
            "restored from an older backup"
        )
    return problems


def read_meta(directory: Path) -> dict[str, Any] | None:
    path = directory / STORE_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise damaged(directory, [f"{path} cannot be read ({exc})"]) from exc
    if not isinstance(meta, dict) or not meta.get("id"):
        raise damaged(directory, [f"{path} holds no store id"])
    return meta


def has_store(directory: Path) -> bool:
    """Anything a store leaves: partition files (or their WAL), or `store.json`."""
    if not directory.is_dir():
        return False
    return any(p.name == STORE_FILE or ".sqlite3" in p.name for p in directory.iterdir())


def check_store(directory: Path, *, processes: int = 1) -> StoreInfo | None:
    """The store in `directory` if every check passes; None if there is none (missing or empty
    directory). Raises RecoveryStoreError naming each damaged file. Modifies nothing.

    With `processes` > 1 the directory may be one host's of several (see `consistency`).
    """
    directory = Path(directory).resolve()
    if not has_store(directory):
        return None
    meta = read_meta(directory)
    problems: list[str] = []
    numbered: dict[int, Path] = {}
    for path in sorted(directory.glob("*.sqlite3")):
        match = PART_NAME.fullmatch(path.name)
        if match:
            numbered[int(match[1])] = path
        else:
            problems.append(
                f"{path} is not a partition of this store, but Bytewax would read it as one: move it out"
            )
    parts: list[Part] = []
    for index, path in sorted(numbered.items()):
        try:
            parts.append(_read_part(path, index))
        except sqlite3.Error as exc:
            problems.append(f"{path} cannot be read (sqlite3 {type(exc).__name__}: {exc})")
        except _NotAPartition as exc:
            problems.append(f"{path} {exc}")
    counts = {p.count for p in parts}
    if len(counts) > 1:
        problems.append(
            "the partitions disagree on their number: "
            + ", ".join(f"{p.path.name} says {p.count}" for p in parts)
        )
    if len(counts) == 1:
        count = counts.pop()
    elif meta is not None and isinstance(meta.get("partitions"), int):
        count = meta["partitions"]
    else:
        count = max(numbered, default=-1) + 1
    for index in range(count):
        if index not in numbered:
            problems.append(
                f"{directory / f'part-{index}.sqlite3'} is missing (the store has {count} partitions)"
            )
    problems += [
        f"{path} is not one of the store's {count} partitions" for i, path in numbered.items() if i >= count
    ]
    if not problems:
        problems = consistency(parts, whole=processes == 1)
    if problems:
        raise damaged(directory, problems)
    newest = max((p.commit for p in parts if p.commit is not None), default=None)
    return StoreInfo(directory, meta, count, newest, _resume_epoch(parts)[0])
