"""Keyed state (the index, the entity steps, `pending`) in a fixed set of shards, saved as deltas.

A transaction waits weeks for its label, so the index and `pending` hold millions of entries, and
the entity steps hold every active card, merchant and device. One Bytewax key per transaction or
entity made each cost Bytewax's per-key bookkeeping, a pickle of its own at every epoch close and,
for an entity's idle timer, a place in the map Bytewax scans at every activation. Here a step keeps
its keys in a fixed set of Bytewax keys (`flows.routing.Shards`, `FRAUD_STATE_SHARDS`, 16 by default), each a
dict (`ShardTable`; for the index and `pending`, whose entries are bytes, a compact
`features.table.Table`), and a key goes to the shard its id hashes to (`Shards.of`). The shard
count is fixed for a recovery store's life, not tied to the worker count: after a resume on another
number of workers every key is still in the shard its id names, wherever Bytewax now runs that
shard. The shard keys are chosen so that every worker count dividing the shard count gets the same
number each (16: 1, 2, 4, 8 or 16 workers). Every shard of every keyed step is a snapshot at each
epoch close, and each costs Bytewax and the shard a fixed ~0.1-0.2 ms while the input waits
(`python -m benchmarks.redis_throughput` prints the closes; docs/benchmarks.md, "Fewer shards,
shorter closes", has them for 16 and 48): so no more shards than the workers need.

Bytewax saves a key's whole snapshot at each epoch close that touched it, which for a shard would
cost its whole content every few seconds. So when `fraud run` runs with recovery
(`FRAUD_RECOVERY_DIR`), a shard appends only what changed since its last snapshot to a file of its
own (`<FRAUD_RECOVERY_DIR>/state/<step>/<shard>/`, made durable before Bytewax's store records it; in
records of `CHUNK` keys, so a snapshot's memory does not grow with what the epoch changed) and
hands Bytewax a `Manifest`: which byte ranges of which files rebuild it. An epoch close holds the
whole input until the epoch is saved, so the shards whose entries are written once (the index,
`pending`) also write what changed once during the epoch (`ShardTable.ahead`), and the files are
made durable by one syncfs per filesystem (Linux; `flows.durable`), run in a thread as the snapshots are written,
rather than by an fsync per file. Once the deltas outweigh
the shard twice over, the next snapshot writes the whole shard to a new file and the chain
restarts there; files that left the chain are deleted `KEEP` snapshots later (a resume may use a
slightly older epoch), and a resumed shard deletes the files its manifest does not name (what a
crashed run wrote after its last complete epoch). Otherwise (no recovery, or Bytewax's own runner
with `-r DIR`) a snapshot is the shard's dict or table itself (for an entity step, the dict of its
states' frozen copies, refreshed for the keys that changed), lent copy-on-write: the shard copies
it before its next change only if the snapshot is still alive then. Bytewax drops a snapshot as
soon as it is taken when recovery is off, and with its own `-r DIR` pickles it within the step
that took it, so neither copies a shard (a copy at every epoch close cost time that grew with the
state; `ShardTable.copies` counts any). A flow that runs without recovery never touches a store's
files.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from time import monotonic
from typing import Any, BinaryIO, ClassVar
from zlib import crc32

import msgspec

from features.table import Table, table_of
from flows.durable import appended, start_sync, sync_files, watch
from flows.ordering import StepLogic
from flows.routing import Shards

logger = logging.getLogger(__name__)

KEEP = 8  # snapshots of a shard during which a file that left its chain is kept
MIN_COMPACT_BYTES = 1 << 20  # deltas smaller than this never trigger a rewrite
NEVER = float("inf")
CHUNK = 4096  # keys per record a snapshot encodes: bounds its memory, whatever an epoch changed


class StateFilesError(RuntimeError):
    """A shard's files do not hold what its manifest names: the recovery store is damaged."""


def other_count(saved: int, count: int) -> StateFilesError:
    """The refusal of state saved in `saved` shards (0: by a version that did not say) by a flow
    with `count`: each key would be looked for in another shard than the one holding it."""
    what = f"in {saved} shards" if saved else "in shards of an older version"
    fix = f"set FRAUD_STATE_SHARDS={saved} to resume it, or " if saved else ""
    return StateFilesError(
        f"the recovery store keeps the keyed steps' state {what} and FRAUD_STATE_SHARDS is {count}: "
        f"{fix}`fraud reset --yes` and `fraud run --fresh` to start a new store"
    )


class Manifest(msgspec.Struct, frozen=True, array_like=True):
    """A shard's snapshot with a recovery directory: replay `segments` ((file, start, end) byte
    ranges of records, in order) to rebuild its `entries` entries.

    Pickling one makes the files it names durable first (`sync_files`): Bytewax pickles a
    snapshot in the worker that took it, before its store records it, and records an epoch as
    complete only after every snapshot of the epoch; so the bytes a manifest names are on disk
    before any resume can be given it. A shard starts its file's fsync as soon as its snapshot is
    written (`start_sync`), so the disk works while the worker takes the other snapshots, and the
    first pickle waits only for what is still running.
    """

    step: str
    shard: str
    segments: tuple[tuple[str, int, int], ...]
    entries: int
    base: int  # bytes of the whole-shard record the chain starts with (0: it starts empty)
    shards: int  # how many shards the step had (`Shards.count`): a resume must have as many

    def __reduce__(self) -> tuple[Any, ...]:
        sync_files()
        return (Manifest, (self.step, self.shard, self.segments, self.entries, self.base, self.shards))


class FullState:
    """A shard's snapshot without a recovery directory: its dict or table as of the snapshot, lent
    (the shard copies it before changing it while this is alive: `ShardTable.own`; values are
    immutable). Bytewax pickles it only when recovery is on."""

    __slots__ = ("__weakref__", "items", "shard", "shards")

    def __init__(self, shard: str, items: dict[str, Any], shards: int = 0) -> None:
        self.shard, self.items, self.shards = shard, items, shards  # shards: as `Manifest.shards`

    def __reduce__(self) -> tuple[Any, ...]:
        return (FullState, (self.shard, self.items, self.shards))


class StateFiles:
    """Where the shards of one step keep their files (`root/<step>/<shard>/`), and `epoch_s`, the
    epoch length, when the shards write their changes ahead of the epoch close (`ShardTable.ahead`).
    """

    def __init__(self, root: Path, step: str, epoch_s: float | None = None) -> None:
        self.root, self.step, self.epoch_s = root, step, epoch_s

    def directory(self, shard: str) -> Path:
        return self.root / self.step / shard


STATE_DIR = "state"  # inside the recovery directory: whatever moves, backs up or deletes the store takes them


def state_files(state_dir: Path | None, step: str, epoch_s: float | None = None) -> StateFiles | None:
    """Where `step`'s shards keep their files (`<state_dir>/<step>/<shard>/`); None without one.
    `epoch_s`: the epoch length, for the shards to write their changes ahead of each close."""
    return None if state_dir is None else StateFiles(state_dir, step, epoch_s)


AHEAD_FROM, AHEAD_SPAN = 0.55, 0.4  # a shard writes ahead at 55-95 % of the epoch after its snapshot


def ahead_fraction(step: str, shard: str) -> float:
    """When in the epoch `step`'s `shard` writes its changes ahead: spread over the shards, so that
    no batch waits for more than a few of them."""
    return AHEAD_FROM + AHEAD_SPAN * (crc32(f"{step}/{shard}".encode()) % 1000) / 1000


_HEADER = 8  # each record: its length (8 bytes, little-endian), then msgpack (puts, dels)


class ShardLog:
    """The files of one shard: appends deltas, rewrites the whole shard when the deltas outgrow
    it, and deletes files no manifest it may be resumed from still names."""

    def __init__(self, directory: Path, step: str, shard: str, value_type: Any) -> None:
        self.dir, self.step, self.shard = directory, step, shard
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(tuple[dict[str, value_type], list[str]])
        self.file: str | None = None  # this process's file: a resumed run never appends to old ones
        self.out: BinaryIO | None = None  # `file`, open for appending (unbuffered)
        self.path = ""  # `file`'s path
        self.end = 0  # `file`'s size: where the next record starts
        self.dev = 0  # the device `file` is on
        self.segments: list[tuple[str, int, int]] = []
        self.base_bytes = 0
        self.delta_bytes = 0
        self.retired: list[tuple[str, int]] = []  # (file, snapshot count when it left the chain)
        self.snapshots = 0
        self.swept = False

    # -- reading --

    def load(self, manifest: Manifest) -> dict[str, Any]:
        """The shard's entries as `manifest` saved them."""
        items: dict[str, Any] = {}
        for name, start, end in manifest.segments:
            path = self.dir / name
            try:
                with open(path, "rb") as f:
                    f.seek(start)
                    data = f.read(end - start)
            except OSError as exc:
                raise StateFilesError(
                    f"{self.step} shard {self.shard}: cannot read {path} ({exc.strerror or exc}), which "
                    "its last snapshot needs: the recovery store is damaged (restore it whole from a "
                    "backup, or `fraud reset --yes` and `fraud run --fresh`)"
                ) from exc
            if len(data) != end - start:
                raise StateFilesError(
                    f"{self.step} shard {self.shard}: {path} holds {start + len(data)} bytes, its last "
                    f"snapshot needs {end}: the recovery store is damaged (restore it whole from a "
                    "backup, or `fraud reset --yes` and `fraud run --fresh`)"
                )
            at = 0
            while at < len(data):
                size = int.from_bytes(data[at : at + _HEADER], "little")
                try:
                    puts, dels = self.decoder.decode(data[at + _HEADER : at + _HEADER + size])
                except (msgspec.DecodeError, ValueError) as exc:
                    raise StateFilesError(
                        f"{self.step} shard {self.shard}: {path} at byte {start + at} does not hold what "
                        f"its last snapshot wrote ({exc}): the recovery store is damaged (restore it whole "
                        "from a backup, or `fraud reset --yes` and `fraud run --fresh`)"
                    ) from exc
                items.update(puts)
                for k in dels:
                    items.pop(k, None)
                at += _HEADER + size
        if len(items) != manifest.entries:
            raise StateFilesError(
                f"{self.step} shard {self.shard}: its files rebuild {len(items)} entries, its last "
                f"snapshot had {manifest.entries}: the recovery store is damaged"
            )
        self.segments = list(manifest.segments)
        self.base_bytes = manifest.base
        self.delta_bytes = sum(end - start for _, start, end in manifest.segments) - manifest.base
        return items

    # -- writing --

    def write(
        self,
        delta: Iterable[tuple[dict[str, Any], list[str]]],
        entries: int,
        whole: Callable[[], Iterable[dict[str, Any]]],
        shards: int,
    ) -> Manifest:
        """Save the delta, as (puts, dels) records (or the whole shard, `whole()`'s records, when
        the deltas outgrew it), and return the manifest that rebuilds the shard's `entries`
        entries. Records are encoded one at a time: a caller handing bounded chunks bounds what a
        snapshot holds in memory, however many keys changed."""
        self.snapshots += 1
        self.append(delta, whole, ahead=False)
        self._collect()
        return Manifest(self.step, self.shard, tuple(self.segments), entries, self.base_bytes, shards)

    def append(
        self,
        delta: Iterable[tuple[dict[str, Any], list[str]]],
        whole: Callable[[], Iterable[dict[str, Any]]],
        *,
        ahead: bool = True,
    ) -> None:
        """Append the delta to the chain (or rewrite the shard whole) and start its fsync, without
        naming it in a manifest yet: what `write` does at a snapshot, and a shard writing ahead of
        one does between snapshots (a resume from an earlier manifest reads only the byte ranges
        that manifest names, so bytes past them are never read)."""
        if not self.swept:
            self._sweep()
        if self.delta_bytes > 2 * self.base_bytes + MIN_COMPACT_BYTES:
            # files that leave the chain are kept KEEP snapshots from the one that will name the new base
            self._rewrite(whole(), self.snapshots + ahead)
        else:
            for puts, dels in delta:
                if puts or dels:
                    self.delta_bytes += self._add(self.encoder.encode((puts, dels)))
        start_sync()

    def _add(self, payload: bytes) -> int:
        """Append a record to the chain; its size on disk."""
        name, start, end = self._append(payload)
        last = self.segments[-1] if self.segments else None
        if last is not None and last[0] == name and last[2] == start:
            self.segments[-1] = (name, last[1], end)
        else:
            self.segments.append((name, start, end))
        return end - start

    def _rewrite(self, records: Iterable[dict[str, Any]], at: int) -> None:
        old = {name for name, _, _ in self.segments}
        self.file = None  # a base starts a file of its own, so the old ones can go whole
        if self.out is not None:
            self.out.close()
            self.out = None
        self.segments, self.base_bytes, self.delta_bytes = [], 0, 0
        for puts in records:
            self.base_bytes += self._add(self.encoder.encode((puts, [])))
        if not self.segments:  # an empty shard: one empty record starts the chain
            self.base_bytes += self._add(self.encoder.encode(({}, [])))
        name = self.segments[0][0]
        self.retired += [(f, at) for f in sorted(old) if f != name]

    def _append(self, payload: bytes) -> tuple[str, int, int]:
        """One record at the end of this process's file: its length and payload in one write to
        an unbuffered file (the OS has it; `sync_files` makes it durable from another descriptor)."""
        f = self._file()
        start = self.end
        record = len(payload).to_bytes(_HEADER, "little") + payload
        written = f.write(record)
        while written < len(record):  # a raw write may take less than it was given
            written += f.write(memoryview(record)[written:])
        self.end = start + len(record)
        appended(self.path, self.dev)  # made durable before a manifest naming it is pickled
        assert self.file is not None  # (set by `_open`)
        return self.file, start, self.end

    def prepare(self) -> None:
        """Before the shard's first snapshot: delete what a resume does not need (`_sweep`) and
        create this process's file, so that the first epoch close (which holds the input) does
        not create a few hundred directories and files."""
        if not self.swept:
            self._sweep()
        self._file()

    def _file(self) -> BinaryIO:
        """This process's file, open for appending (created, or opened again, when it is not)."""
        f = self.out
        if self.file is not None and f is not None and not f.closed:
            return f
        if f is not None:
            f.close()
        if self.file is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.file = f"{time.time_ns():x}-{os.getpid()}.log"
        self.path = str(self.dir / self.file)
        f = self.out = open(self.path, "ab", buffering=0)  # noqa: SIM115 (kept open between snapshots)
        weakref.finalize(self, f.close)  # closed with its shard (or at exit), whichever first
        self.end = f.seek(0, os.SEEK_END)
        self.dev = watch(self.dir, f.fileno())
        return f

    def _sweep(self) -> None:
        """Delete what no manifest this shard may resume from names: files written after the epoch
        it resumed from (by a run that crashed), or by a run whose state was not kept."""
        self.swept = True
        keep = {name for name, _, _ in self.segments}
        if self.dir.is_dir():
            for path in self.dir.iterdir():
                if path.name not in keep and path.name != self.file:
                    path.unlink(missing_ok=True)

    def _collect(self) -> None:
        due = [f for f, at in self.retired if self.snapshots - at >= KEEP]
        if due:
            for f in due:
                (self.dir / f).unlink(missing_ok=True)
            self.retired = [(f, at) for f, at in self.retired if self.snapshots - at < KEEP]


class ShardTable(StepLogic):
    """A step logic holding one shard's entries (key -> value), saved as deltas (`ShardLog`)
    when the step has `StateFiles`, else as a lent `FullState`.

    Subclasses change entries only through `put` and `drop`, which note what changed since the
    last snapshot (where the snapshot needs it: a delta for the files, or a mutable shard's frozen
    copies to refresh; without either, a snapshot is the whole table), after taking the entries
    with `own()` (never `self.items` kept from before it: without files the last snapshot may
    still hold them); a subclass whose values change in place (`mutable`: an entity's feature
    state) notes the key in `changed` itself, and saves each value as `frozen(value)` (an
    immutable copy), which `restored` turns back into a value. `value_type` is what a saved value decodes
    as from the files. `shards`: the step's shard set (the default count if not given); a resume
    from a snapshot saved with another count is refused (`other_count`).
    """

    __slots__ = ("ahead_at", "changed", "files", "items", "lent", "log", "saved", "shard", "shards")
    value_type: ClassVar[Any] = Any
    copies: ClassVar[int] = 0  # tables and saved dicts this process copied for a snapshot still held
    mutable: ClassVar[bool] = False
    compact: ClassVar[bool] = False  # entries in a `features.table.Table` (bytes values), not a dict

    def __init__(
        self, files: StateFiles | None, resume: Manifest | FullState | None, shards: Shards | None = None
    ) -> None:
        self.files = files
        self.shards = shards or Shards()
        self.items: Any = Table() if self.compact else {}
        self.changed: set[str] = set()
        self.log: ShardLog | None = None
        self.shard: str | None = None
        # Without files, a mutable shard's snapshot is its values' frozen copies, kept here and
        # refreshed for the keys that changed.
        self.saved: dict[str, Any] | None = {} if self.mutable and files is None else None
        # Without files, the last snapshot's FullState (weakly): while it lives, it holds `items`
        # (or, for a mutable shard, `saved`) itself, which must be copied before they change.
        self.lent: weakref.ref[FullState] | None = None
        # With files and an epoch length: when (monotonic) this shard writes its changes ahead of
        # the next snapshot (`ahead`); set by each snapshot.
        self.ahead_at = NEVER
        if resume is not None and resume.shards != self.shards.count:
            raise other_count(resume.shards, self.shards.count)
        if type(resume) is Manifest:
            if files is None:
                raise StateFilesError(
                    f"the recovery store holds {resume.step} shard files, but FRAUD_RECOVERY_DIR is not "
                    "set: run with FRAUD_RECOVERY_DIR naming the recovery directory (`fraud run`)"
                )
            self.shard = resume.shard
            self.log = ShardLog(files.directory(resume.shard), resume.step, resume.shard, self.value_type)
            self.items = self._held(self.restored(self.log.load(resume)))
            self.log.prepare()
        elif type(resume) is FullState:
            self.shard = resume.shard
            self.items = self._held(self.restored(resume.items.copy()))
            self.changed = set(self.items)  # no file holds them yet: the first delta has them all

    def _held(self, items: Any) -> Any:
        return table_of(items) if self.compact and type(items) is not Table else items

    def restored(self, items: dict[str, Any]) -> dict[str, Any]:
        """The entries as loaded from a snapshot (a subclass may share common values again, or
        rebuild mutable values from their frozen copies)."""
        return items

    def frozen(self, value: Any) -> Any:
        """What a snapshot saves of `value` (a mutable subclass returns an immutable copy)."""
        return value

    def own(self) -> Any:
        """The entries, to change: copied first if the last snapshot still holds them (a caller
        keeps what this returns, not an older `self.items`)."""
        lent = self.lent
        if lent is not None and not self.mutable:  # (a mutable shard lends `saved`, not `items`)
            self.lent = None
            if lent() is not None:
                self.items = self.items.copy()
                ShardTable.copies += 1
        return self.items

    def put(self, key: str, value: Any) -> None:
        items = self.own() if self.lent is not None else self.items
        items[key] = value
        if self.files is not None or self.mutable:  # (else a snapshot is the whole table)
            self.changed.add(key)

    def drop(self, key: str) -> Any:
        value = (self.own() if self.lent is not None else self.items).pop(key, None)
        if value is not None and (self.files is not None or self.mutable):
            self.changed.add(key)
        return value

    def name(self, key: str) -> None:
        """Learn this shard's key from the first key (transaction id, entity) it gets (and, with
        files, create its file now rather than at the epoch close)."""
        self.shard = self.shards.of(key)
        if self.files is not None:
            self._log().prepare()

    def ahead(self) -> None:
        """Between batches: once its time in the epoch has come (`ahead_fraction`), write what
        changed so far to the files (the shard's fsync starts at once), so that the snapshot at
        the epoch close writes only what changes after it. An epoch close holds the whole input
        (Bytewax polls the sources again only once the epoch is saved); the shards writing ahead,
        each at its own moment, leave it a fraction of the work. A key that changes again after
        is written twice; a resume from the last complete epoch never reads past what its
        manifest names, so bytes written ahead of a close that never came are not read.

        Only shards whose values are written once (the index, `pending`: an entry is added, then
        dropped) write ahead: an entity's state changes with each of its events, and the busy
        ones (a large merchant's window) would be written twice an epoch (`python -m
        benchmarks.redis_throughput`: 10 % more CPU for the flow, for 5-10 ms less a close).

        Such a shard with files also writes what changed whenever that reaches `CHUNK` keys,
        whether or not its time has come (and with `FRAUD_SNAPSHOT_AHEAD` off): the keys noted
        since the last write are held as Python strings until written, which a fast replay or a
        backfill would otherwise pile up by the hundred thousand each epoch (`python -m
        benchmarks.index_memory`); at production rates an epoch changes far fewer."""
        changed = self.changed
        if not changed:
            return
        if len(changed) < CHUNK or self.mutable or self.files is None:
            if monotonic() < self.ahead_at:
                return
            self.ahead_at = NEVER  # once per epoch: the snapshot sets the next time
        log = self._log()
        self.changed = set()
        log.append(self._delta(changed), self._whole)

    def _log(self) -> ShardLog:
        assert self.files is not None and self.shard is not None
        if self.log is None:
            self.log = ShardLog(
                self.files.directory(self.shard), self.files.step, self.shard, self.value_type
            )
        return self.log

    def snapshot(self) -> Manifest | FullState:
        assert self.shard is not None, "a shard snapshots only after its first event"
        items, changed = self.items, self.changed
        self.changed = set()
        frozen = self.frozen
        if self.files is None:
            saved = self.saved
            if saved is None:
                held = FullState(self.shard, items, self.shards.count)
            else:
                lent = self.lent
                if lent is not None and lent() is not None:
                    saved = self.saved = saved.copy()  # the last snapshot still holds it
                    ShardTable.copies += 1
                for k in changed:
                    v = items.get(k)
                    if v is None:
                        saved.pop(k, None)
                    else:
                        saved[k] = frozen(v)
                held = FullState(self.shard, saved, self.shards.count)
            self.lent = weakref.ref(held)
            return held
        epoch_s = self.files.epoch_s
        if epoch_s is not None and not self.mutable:
            self.ahead_at = monotonic() + epoch_s * ahead_fraction(self.files.step, self.shard)
        return self._log().write(self._delta(changed), len(items), self._whole, self.shards.count)

    def _whole(self) -> Iterator[dict[str, Any]]:
        """The shard's entries as saved: a plain dict as it is, in one record; a table's values, or
        a mutable shard's frozen copies, `CHUNK` at a time (they are made for the snapshot: chunks
        bound how many at once)."""
        if not (self.mutable or self.compact):
            yield self.items
            return
        keys = list(self.items.keys())
        for i in range(0, len(keys), CHUNK):
            yield self._saved(keys[i : i + CHUNK])

    def _delta(self, changed: set[str]) -> Iterator[tuple[dict[str, Any], list[str]]]:
        """The changed keys' (puts, dels) records, `CHUNK` keys at a time."""
        items, keys = self.items, list(changed)
        for i in range(0, len(keys), CHUNK):
            chunk = keys[i : i + CHUNK]
            yield self._saved(chunk), [k for k in chunk if k not in items]

    def _saved(self, keys: list[str]) -> dict[str, Any]:
        """What a snapshot saves of `keys` still held: the values (immutable ones as they are, no
        call per key), or a mutable shard's frozen copies."""
        items = self.items
        if self.mutable:
            frozen = self.frozen
            return {k: frozen(items[k]) for k in keys if k in items}
        return self.storable({k: items[k] for k in keys if k in items})

    def storable(self, saved: dict[str, Any]) -> dict[str, Any]:
        """What the files keep of `saved`, a chunk of a compact shard's values (a mutable shard
        saves `frozen` copies; a plain dict shard is written as it is): a subclass replaces the
        values msgpack cannot hold, and `restored` turns them back."""
        return saved
