"""The Bytewax recovery store: create it once, and refuse to resume from one that would lie.

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

The store's identity: on creation a uuid goes to `store.json` in the directory and to Redis, next
to the outputs it produced, in the hash `<alerts stream>:recovery-store` (one field per cluster
process, as each host may have its own directory). A directory that is missing or empty, or
holds another store, while Redis names one, would restart every input from its start (or from
another store's positions) beside outputs that say otherwise: refused. So is a store whose record
Redis lost once it had it (`fraud reset`, or Redis lost its data): it would resume past inputs
whose outputs are gone. An unreachable Redis does not block the start (the flow meets the outage
itself); the record is written on a later start.

Every refusal is a `RecoveryStoreError` naming the file and the fixes. `fresh=True`
(`fraud run --fresh`, FRAUD_RECOVERY_FRESH=1) moves a refused store aside, never deleting it, and
starts a new one; a store that passes is used as it is, so a forgotten FRAUD_RECOVERY_FRESH=1 does
not replay everything on each restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from bytewax.recovery import RecoveryConfig, init_db_dir

from service.settings import Settings

logger = logging.getLogger(__name__)

STORE_FILE = "store.json"
LOCK_FILE = ".init.lock"  # inside the directory, only where its parent is not writable
TABLES = frozenset({"parts", "exs", "fronts", "commits", "snaps"})
PART_NAME = re.compile(r"part-(\d+)\.sqlite3")
REDIS_TIMEOUT_S = 3.0


class RecoveryStoreError(RuntimeError):
    """The recovery store cannot be trusted; the message names the file and says what to do."""


class _NotAPartition(Exception):
    """A file SQLite reads, but that is not the partition its name says."""


class RegistryUnavailable(Exception):
    """The store registry (Redis) could not be read or written; the check goes on without it."""


def fixes(directory: Path) -> str:
    """The three ways out of a refusal, in one sentence."""
    return (
        f"Fix: restore {directory} from a backup (all its files from one moment); or run "
        "`fraud reset --yes` and replay the input with `fraud run --fresh`; or pass --fresh "
        "(FRAUD_RECOVERY_FRESH=1) to move the store aside and start over from the beginning of the "
        "input (outputs already in Redis stay, and their dedupe markers keep a replay from writing "
        "anything twice)."
    )


def _damaged(directory: Path, problems: list[str]) -> RecoveryStoreError:
    found = "; ".join(" ".join(problem.split()) for problem in problems)  # one line, for `fraud run`
    return RecoveryStoreError(
        f"recovery store {directory} is damaged: {found}. Resuming from it could lose state, or mix "
        "state from different moments, and give wrong results. " + fixes(directory)
    )


# -- what the store's files say ----------------------------------------------------------------


@dataclass
class _Part:
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


def _read_part(path: Path, index: int) -> _Part:
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
        part = _Part(path, index, int(parts[0][1]), int(commits[0][1]) if commits else None)
        for ex, workers, resume in conn.execute("SELECT ex_num, worker_count, resume_epoch FROM exs"):
            part.exs[int(ex)] = (int(workers), int(resume))
        for ex, worker, front in conn.execute("SELECT ex_num, worker_index, worker_frontier FROM fronts"):
            part.fronts[(int(ex), int(worker))] = int(front)
    return part


def _resume_epoch(parts: list[_Part]) -> tuple[int, int | None, int | None]:
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


def _at(part: _Part) -> str:
    return "has never committed" if part.commit is None else f"is at epoch {part.commit}"


def _consistency(parts: list[_Part], *, whole: bool) -> list[str]:
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
    behind: list[_Part] = []
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


def _read_meta(directory: Path) -> dict[str, Any] | None:
    path = directory / STORE_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise _damaged(directory, [f"{path} cannot be read ({exc})"]) from exc
    if not isinstance(meta, dict) or not meta.get("id"):
        raise _damaged(directory, [f"{path} holds no store id"])
    return meta


def _write_meta(directory: Path, meta: dict[str, Any]) -> None:
    """Write `store.json` whole or not at all (temporary file, fsync, rename)."""
    tmp = directory / f".{STORE_FILE}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / STORE_FILE)


def _has_store(directory: Path) -> bool:
    """Anything a store leaves: partition files (or their WAL), or `store.json`."""
    if not directory.is_dir():
        return False
    return any(p.name == STORE_FILE or ".sqlite3" in p.name for p in directory.iterdir())


def check_store(directory: Path, *, processes: int = 1) -> StoreInfo | None:
    """The store in `directory` if every check passes; None if there is none (missing or empty
    directory). Raises RecoveryStoreError naming each damaged file. Modifies nothing.

    With `processes` > 1 the directory may be one host's of several (see `_consistency`).
    """
    directory = Path(directory).resolve()
    if not _has_store(directory):
        return None
    meta = _read_meta(directory)
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
    parts: list[_Part] = []
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
        problems = _consistency(parts, whole=processes == 1)
    if problems:
        raise _damaged(directory, problems)
    newest = max((p.commit for p in parts if p.commit is not None), default=None)
    return StoreInfo(directory, meta, count, newest, _resume_epoch(parts)[0])


# -- the store's identity, next to its outputs -----------------------------------------------


class StoreRegistry(Protocol):
    """Where the ids of the stores that produced the outputs are kept (Redis, next to them): one
    record per cluster process, as the hosts of a cluster may each have their own directory."""

    where: str
    process: str

    def get(self) -> dict[str, dict[str, Any]]: ...

    def put(self, record: dict[str, Any]) -> None: ...


def store_key(settings: Settings) -> str:
    """The Redis key (a hash: process id -> store record) naming the recovery stores behind the
    output streams; `fraud reset` deletes it with them."""
    return f"{settings.alerts_stream}:recovery-store"


class RedisRegistry:
    """This process's record in the hash at `store_key(settings)`, with short timeouts."""

    def __init__(self, settings: Settings, process_id: int = 0) -> None:
        self.settings = settings
        self.key = store_key(settings)
        self.process = str(process_id)
        self.where = f"Redis key {self.key}"

    @contextlib.contextmanager
    def _client(self) -> Iterator[Any]:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        from service.redis_server import connect, redact, redis_url

        try:
            url = redis_url(self.settings)  # may start the embedded server, which the flow needs anyway
        except Exception as exc:  # an embedded server that cannot start: the flow reports it
            raise RegistryUnavailable(f"no Redis: {exc}") from exc
        self.where = f"Redis key {self.key} at {redact(url)}"
        client = connect(
            url,
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        try:
            yield client
        except redis.exceptions.NoPermissionError as exc:
            raise RegistryUnavailable(
                f"{redact(url)}: the Redis user may not read or write {self.key}: add +hgetall +hset "
                f"to its ACL ({exc})"
            ) from exc
        except (redis.RedisError, OSError) as exc:
            raise RegistryUnavailable(f"{redact(url)}: {type(exc).__name__}: {exc}") from exc
        finally:
            client.close()

    def get(self) -> dict[str, dict[str, Any]]:
        with self._client() as client:
            raw = client.hgetall(self.key)
        records: dict[str, dict[str, Any]] = {}
        for field_, value in raw.items():
            text = value.decode() if isinstance(value, bytes) else str(value)
            try:
                record = json.loads(text)
            except ValueError:
                record = None
            name = field_.decode() if isinstance(field_, bytes) else str(field_)
            records[name] = record if isinstance(record, dict) else {"id": text}
        return records

    def put(self, record: dict[str, Any]) -> None:
        with self._client() as client:
            client.hset(self.key, self.process, json.dumps(record))


def _describe(record: dict[str, Any]) -> str:
    created = f" created {record['created']}" if record.get("created") else ""
    where = f" in {record['directory']}" if record.get("directory") else ""
    return f"store {record.get('id')}{created}{where}"


def _mismatch(
    info: StoreInfo | None, directory: Path, records: dict[str, dict[str, Any]], registry: StoreRegistry
) -> str | None:
    """Why the store in `directory` (None: there is none) is not the one behind the outputs, whose
    records Redis holds; None when it is, or may become it by being recorded."""
    own = records.get(registry.process)
    meta = (info.meta if info else None) or {}
    if own is None:
        # No record for this process: a new store, a new process of the cluster (sharing a
        # recorded directory, or with a new one of its own), or the records were deleted.
        if meta.get("recorded") and meta.get("id") not in {r.get("id") for r in records.values()}:
            return (
                f"{registry.where} has no record of the {_describe(meta)} ({directory / STORE_FILE}), "
                "though it was recorded there: the outputs were reset (`fraud reset`) or Redis lost its "
                "data, and resuming would skip every input the store already processed. "
            )
        return None
    if info is None:
        return (
            f"recovery directory {directory} is missing or holds no store, but {registry.where} says the "
            f"outputs were written with {_describe(own)}: starting here would restart every input "
            "from its beginning as if nothing had run. "
        )
    if own.get("id") in (meta.get("id"), meta.get("replaces")):
        return None  # the same store, or the --fresh one that replaced it
    if meta.get("takes_over") and not meta.get("recorded"):
        return None  # a --fresh store that could not reach Redis when it started
    found = _describe(meta) if info.meta is not None else "no store id"
    return (
        f"{directory / STORE_FILE} has {found}, but {registry.where} says the outputs were written "
        f"with {_describe(own)}: this directory is not the store behind them. "
    )


def _record(info: StoreInfo, registry: StoreRegistry) -> None:
    """Tell Redis this store is the one behind the outputs, then remember that it was told."""
    meta = info.meta or {}
    registry.put({k: meta[k] for k in ("id", "created", "directory", "partitions") if k in meta})
    _write_meta(info.directory, {**meta, "recorded": True})


# -- creating, locking, moving aside --------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def _new_meta(directory: Path, partitions: int, **extra: Any) -> dict[str, Any]:
    return {
        "id": uuid.uuid4().hex,
        "created": _now().isoformat(timespec="seconds"),
        "directory": str(directory),
        "partitions": partitions,
        "recorded": False,
        **extra,
    }


def _create(directory: Path, partitions: int, **extra: Any) -> StoreInfo:
    """New partitions, then `store.json`: a crash in between leaves partitions without an id, which
    the next start adopts (no record in Redis) or refuses (so --fresh moves them aside)."""
    directory.mkdir(parents=True, exist_ok=True)
    init_db_dir(directory, partitions)
    meta = _new_meta(directory, partitions, **extra)
    _write_meta(directory, meta)
    return StoreInfo(directory, meta, partitions, None, 1)


def _adopt(info: StoreInfo) -> StoreInfo:
    """Give a store made before `store.json` existed (or by `python -m bytewax.recovery`) an id."""
    meta = _new_meta(info.directory, info.partitions, adopted=True)
    _write_meta(info.directory, meta)
    logger.info("recovery store %s had no %s: gave it id %s", info.directory, STORE_FILE, meta["id"])
    return StoreInfo(info.directory, meta, info.partitions, info.epoch, info.resume_epoch)


def _lock_path(directory: Path) -> Path:
    """A lock beside the directory, so that moving the directory aside does not move the lock
    other processes wait on; inside it only when its parent is read-only (then it cannot be
    renamed either)."""
    parent = directory.parent
    if os.access(parent, os.W_OK):
        return parent / f".{directory.name}.lock"
    return directory / LOCK_FILE


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock for `directory`: the processes of a cluster start together and share
    it, and exactly one of them may check, create or move it at a time (racing into
    `init_db_dir` is a UNIQUE-constraint panic inside Bytewax)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    path = _lock_path(directory)
    if path.parent == directory:
        directory.mkdir(exist_ok=True)
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _move_aside(directory: Path, tag: str) -> Path:
    """Rename `directory` to `<dir>.<tag>-<UTC time>` (tag: damaged, or replaced for a sound store
    that is not the one behind the outputs), or, where it cannot be renamed (a mount point), move
    its files into `<dir>/<tag>-<UTC time>/` (Bytewax reads only the top level). Nothing is deleted."""
    stamp = _now().strftime("%Y%m%dT%H%M%SZ")
    target = directory.with_name(f"{directory.name}.{tag}-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = directory.with_name(f"{directory.name}.{tag}-{stamp}-{n}")
    try:
        directory.rename(target)
        return target
    except OSError:
        inner = directory / f"{tag}-{stamp}"
        inner.mkdir()
        for entry in directory.iterdir():
            if entry != inner and entry.name != LOCK_FILE:
                entry.rename(inner / entry.name)
        return inner


def recovery_config(
    directory: Path,
    partitions: int,
    *,
    fresh: bool = False,
    registry: StoreRegistry | None = None,
    processes: int = 1,
) -> RecoveryConfig:
    """Bytewax recovery in `directory`: checked, or created (with `partitions` partitions) if none.

    Raises RecoveryStoreError when the store is damaged, or is not the one `registry` (Redis) says
    produced the outputs; with `fresh`, such a store is moved aside instead and a new one started.
    Without a registry (tests, Bytewax's own runner) only the files are checked. `processes`: how
    many processes the cluster has (`check_store`).
    """
    directory = Path(directory).resolve()
    with _locked(directory):
        info: StoreInfo | None = None
        refusal: RecoveryStoreError | None = None
        tag = "damaged"
        try:
            info = check_store(directory, processes=processes)
        except RecoveryStoreError as exc:
            refusal = exc
        records: dict[str, dict[str, Any]] = {}
        reachable = False
        if registry is not None:
            try:
                records, reachable = registry.get(), True
            except RegistryUnavailable as exc:
                logger.warning(
                    "could not check recovery store %s against Redis (%s); going on without that check",
                    directory,
                    exc,
                )
        if refusal is None and reachable and registry is not None:
            why = _mismatch(info, directory, records, registry)
            refusal, tag = (
                (None, tag) if why is None else (RecoveryStoreError(why + fixes(directory)), "replaced")
            )
        if refusal is not None:
            if not fresh:
                raise refusal
            moved = _move_aside(directory, tag) if _has_store(directory) else None
            own = records.get(registry.process, {}) if registry is not None else {}
            info = _create(directory, partitions, replaces=own.get("id"), takes_over=True)
            logger.warning(
                "FRAUD_RECOVERY_FRESH: %s; started recovery store %s in %s from the beginning of every "
                "input (refused because: %s)",
                f"moved the refused store to {moved}" if moved else "no store to move aside",
                info.id,
                directory,
                str(refusal).split(" Fix: ")[0],
            )
        elif info is None:
            info = _create(directory, partitions, replaces=None)
            logger.info("created recovery store %s with %d partitions in %s", info.id, partitions, directory)
        elif info.meta is None:
            info = _adopt(info)
        own_id = records.get(registry.process, {}).get("id") if registry is not None else None
        if (
            reachable
            and registry is not None
            and (own_id != info.id or not (info.meta or {}).get("recorded"))
        ):
            try:
                _record(info, registry)
            except RegistryUnavailable as exc:
                logger.warning(
                    "could not record recovery store %s in Redis (%s); will on a later start", info.id, exc
                )
    return RecoveryConfig(str(directory))
