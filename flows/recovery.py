"""The Bytewax recovery store: create it once, record which store produced the outputs, and refuse
to resume from one that would lie (the file checks are in `flows.recovery_check`).

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
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from bytewax.recovery import RecoveryConfig, init_db_dir

from flows.recovery_check import STORE_FILE, RecoveryStoreError, StoreInfo, check_store, fixes, has_store
from flows.routing import DEFAULT_SHARDS
from service.settings import Settings

logger = logging.getLogger(__name__)

LOCK_FILE = ".init.lock"  # inside the directory, only where its parent is not writable
REDIS_TIMEOUT_S = 3.0


class RegistryUnavailable(Exception):
    """The store registry (Redis) could not be read or written; the check goes on without it."""


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    """Write `store.json` whole or not at all (temporary file, fsync, rename)."""
    tmp = directory / f".{STORE_FILE}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / STORE_FILE)


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

        from service.redis_client import connect, redact
        from service.redis_server import redis_url

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
    write_meta(info.directory, {**meta, "recorded": True})


# -- creating, locking, moving aside --------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


# The layout of the state the flow saves (step ids, snapshot shapes). A store holding state of
# another layout is refused: resuming would find no state under the new step ids and go on from
# the inputs' saved positions with empty windows, silently. 2: `flows.ordering.ordered` steps;
# 3: the index and `pending` in fixed shards with their deltas in `state/` (`flows.shards`); 4: the
# entity steps in fixed shards too; 5: the index's entries as msgpack bytes, `pending`'s vectors
# packed (`features.table`); 6: the expiry buckets in the index's entries, none in the `stamp`
# step (`flows.expiry`); 7: the shard count chosen (`FRAUD_STATE_SHARDS`, recorded as "shards"),
# the shard keys derived from it.
STATE_LAYOUT = 7


def outdated(directory: Path, layout: Any) -> RecoveryStoreError:
    return RecoveryStoreError(
        f"recovery store {directory} holds state of layout {layout}, saved by an older version of the "
        f"flow; this version saves layout {STATE_LAYOUT} and cannot resume from it (the windows, "
        "the pending labels and the online model would start empty while the inputs resume where "
        "they stopped). " + fixes(directory)
    )


def other_shards(directory: Path, saved: Any, shards: int) -> RecoveryStoreError:
    return RecoveryStoreError(
        f"recovery store {directory} keeps the keyed steps' state in {saved} shards and "
        f"FRAUD_STATE_SHARDS is {shards}: every key would be looked for in another shard than the one "
        f"holding it. Set FRAUD_STATE_SHARDS={saved} to resume it, or start a new store. " + fixes(directory)
    )


def _new_meta(directory: Path, partitions: int, **extra: Any) -> dict[str, Any]:
    return {
        "id": uuid.uuid4().hex,
        "layout": STATE_LAYOUT,
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
    write_meta(directory, meta)
    return StoreInfo(directory, meta, partitions, None, 1)


def _adopt(info: StoreInfo) -> StoreInfo:
    """Give a store made before `store.json` existed (or by `python -m bytewax.recovery`) an id."""
    meta = _new_meta(info.directory, info.partitions, adopted=True)
    write_meta(info.directory, meta)
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
    shards: int = DEFAULT_SHARDS,
) -> RecoveryConfig:
    """Bytewax recovery in `directory`: checked, or created (with `partitions` partitions) if none.

    Raises RecoveryStoreError when the store is damaged, or is not the one `registry` (Redis) says
    produced the outputs; with `fresh`, such a store is moved aside instead and a new one started.
    Without a registry (tests, Bytewax's own runner) only the files are checked. `processes`: how
    many processes the cluster has (`check_store`). `shards`: the keyed steps' shard count
    (`FRAUD_STATE_SHARDS`), recorded in a new store; a store that holds state saved with another
    count is refused.
    """
    directory = Path(directory).resolve()
    with _locked(directory):
        info: StoreInfo | None = None
        refusal: RecoveryStoreError | None = None
        tag = "damaged"
        try:
            info = check_store(directory, processes=processes)
            layout = (info.meta or {}).get("layout", 1) if info is not None else STATE_LAYOUT
            if info is not None and info.epoch is not None and layout != STATE_LAYOUT:
                tag = "outdated"
                raise outdated(directory, layout)
            saved = (info.meta or {}).get("shards", shards) if info is not None else shards
            if info is not None and info.epoch is not None and saved != shards:
                tag = "other-shards"
                raise other_shards(directory, saved, shards)
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
            moved = _move_aside(directory, tag) if has_store(directory) else None
            own = records.get(registry.process, {}) if registry is not None else {}
            info = _create(directory, partitions, replaces=own.get("id"), takes_over=True, shards=shards)
            logger.warning(
                "FRAUD_RECOVERY_FRESH: %s; started recovery store %s in %s from the beginning of every "
                "input (refused because: %s)",
                f"moved the refused store to {moved}" if moved else "no store to move aside",
                info.id,
                directory,
                str(refusal).split(" Fix: ")[0],
            )
        elif info is None:
            info = _create(directory, partitions, replaces=None, shards=shards)
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
