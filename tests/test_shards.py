"""Per-transaction state in fixed shards, saved as deltas (`flows.shards`)."""

from __future__ import annotations

import ctypes
import os
import pickle
import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from flows import durable, shards
from flows.routing import DEFAULT_SHARDS, Shards, one_per_worker, worker_of
from flows.shards import (
    KEEP,
    FullState,
    Manifest,
    ShardTable,
    StateFiles,
    StateFilesError,
)


class Table(ShardTable):
    """A shard of str -> bytes, changed by hand."""

    __slots__ = ()
    value_type = bytes

    def apply(self, events: list[Any]) -> list[Any]:
        return events


def test_every_worker_count_dividing_the_shard_count_gets_the_same_number_of_shards() -> None:
    for count in (1, 2, 12, DEFAULT_SHARDS, 48, 96):
        keys = Shards(count).keys
        assert len(set(keys)) == count and keys == one_per_worker("shard", count)
        for n in (n for n in range(1, count + 1) if count % n == 0):  # the jth shard on worker j % n
            assert [worker_of(k, n) for k in keys] == [j % n for j in range(count)], (count, n)
    assert DEFAULT_SHARDS == 16
    shards = Shards()
    spread = Counter(shards.of(f"t{i:09d}") for i in range(16_000))
    assert set(spread) == set(shards.keys) and min(spread.values()) > 800  # ~1,000 each
    assert shards.of("t000000001") == Shards(16).of("t000000001")
    assert Shards(48).of("t000000001") in Shards(48).keys
    with pytest.raises(ValueError, match="at least one shard"):
        Shards(0)


def test_a_shard_refuses_state_saved_with_another_shard_count(tmp_path: Path) -> None:
    """A key's shard depends on the count: a resume with another one would look for each key in
    another shard than the one holding it, so it is refused, naming the count to set."""
    for files in (None, StateFiles(tmp_path, "index")):
        table = Table(files, None, Shards(12))
        table.name("t1")
        table.put("a", b"1")
        snap = pickle.loads(pickle.dumps(table.snapshot()))
        assert snap.shards == 12
        assert Table(files, snap, Shards(12)).items == {"a": b"1"}
        with pytest.raises(
            StateFilesError, match="in 12 shards and FRAUD_STATE_SHARDS is 16: set FRAUD_STATE_SHARDS=12"
        ):
            Table(files, snap)
    old = FullState("shard0", {"a": b"1"})  # as a version that did not record the count
    with pytest.raises(StateFilesError, match=r"older version.*fraud reset"):
        Table(None, old)


def _one_entry(files: StateFiles | None) -> tuple[Table, Manifest | FullState]:
    """A shard holding {"a": b"1"}, and its first snapshot."""
    table = Table(files, None)
    table.name("t1")
    table.put("a", b"1")
    return table, table.snapshot()


def _random_changes(table: Table, rng: random.Random, n: int) -> None:
    for _ in range(n):
        k = f"t{rng.randrange(300)}"
        if rng.random() < 0.35:
            table.drop(k)
        else:
            table.put(k, rng.randbytes(rng.randrange(1, 40)))


class CompactTable(Table):
    """The same shard in a `features.table.Table`, as the index and `pending` keep theirs."""

    __slots__ = ()
    compact = True


def _records(files: StateFiles, m: Manifest) -> int:
    """How many records the manifest's byte ranges hold."""
    count = 0
    for name, start, end in m.segments:
        data = (files.directory(m.shard) / name).read_bytes()[start:end]
        at = 0
        while at < len(data):
            at += 8 + int.from_bytes(data[at : at + 8], "little")
            count += 1
    return count


@pytest.mark.parametrize("kind", [Table, CompactTable])
def test_each_snapshot_rebuilds_the_shard_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: type[Table]
) -> None:
    """Random puts and drops over many snapshots, with rewrites of the whole shard along the way:
    every manifest still kept rebuilds exactly the entries of its moment, and files that left the
    chain are deleted once `KEEP` later snapshots no longer need them. Deltas and rewrites are
    written `CHUNK` keys per record (here 7), and rebuild the same."""
    monkeypatch.setattr(shards, "MIN_COMPACT_BYTES", 2_000)  # rewrite often
    monkeypatch.setattr(shards, "CHUNK", 7)
    files = StateFiles(tmp_path, "index")
    rng = random.Random(5)
    table = kind(files, None)
    table.name("t1")
    taken: list[tuple[Manifest, dict[str, bytes]]] = []
    for _ in range(60):
        _random_changes(table, rng, rng.randrange(0, 80))
        m = table.snapshot()
        assert isinstance(m, Manifest) and m.entries == len(table.items)
        taken.append((m, dict(table.items.items())))
    directory = files.directory(table.shard or "")
    assert any(m.base for m, _ in taken)  # the whole shard was rewritten along the way
    assert len(list(directory.iterdir())) < 10  # and the files that left the chain went
    for m, items in taken[-KEEP:]:  # what a resume may use
        assert kind(files, m).items == items
    for m, items in taken:  # older ones: rebuilt exactly, or refused, never wrong
        try:
            assert kind(files, m).items == items
        except StateFilesError as exc:
            assert "cannot read" in str(exc)
    first = Table(StateFiles(tmp_path, "pending"), None)
    first.name("t1")
    for i in range(20):
        first.put(f"t{i}", b"v")
    m = first.snapshot()
    assert isinstance(m, Manifest) and _records(StateFiles(tmp_path, "pending"), m) == 3  # 7 + 7 + 6 keys


@pytest.mark.parametrize("kind", [Table, CompactTable])
def test_writing_ahead_of_each_snapshot_rebuilds_the_same_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: type[Table]
) -> None:
    """A shard that writes its changes during the epoch (`ahead`), sometimes rewriting itself
    whole there: every manifest rebuilds exactly the entries of its snapshot, though the files
    hold bytes written after it (ahead of a close a crash may never let come), and the files that
    left the chain are kept while a resumable manifest names them."""
    monkeypatch.setattr(shards, "MIN_COMPACT_BYTES", 2_000)
    monkeypatch.setattr(shards, "CHUNK", 7)
    files = StateFiles(tmp_path, "index", epoch_s=0.0)  # due as soon as a snapshot is taken
    rng = random.Random(7)
    table = kind(files, None)
    table.name("t1")
    taken: list[tuple[Manifest, dict[str, bytes]]] = []
    wrote_ahead = 0
    for _ in range(60):
        _random_changes(table, rng, rng.randrange(0, 80))
        size = sum(p.stat().st_size for p in tmp_path.rglob("*.log"))
        had = bool(table.changed)
        table.ahead()
        assert not table.changed or not taken  # written (due from the first snapshot on)
        if taken and had:
            wrote_ahead += 1
            assert sum(p.stat().st_size for p in tmp_path.rglob("*.log")) != size
        _random_changes(table, rng, rng.randrange(0, 20))
        m = table.snapshot()
        assert isinstance(m, Manifest) and m.entries == len(table.items)
        taken.append((m, dict(table.items.items())))
    assert wrote_ahead > 40 and any(m.base for m, _ in taken)
    for m, items in taken[-KEEP:]:
        assert kind(files, m).items == items
    for m, items in taken:
        try:
            assert kind(files, m).items == items
        except StateFilesError as exc:
            assert "cannot read" in str(exc)


def test_a_shard_writes_what_changed_whenever_it_reaches_a_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With files, a shard of values written once writes what changed as soon as it reaches
    `CHUNK` keys, between snapshots and whatever its time in the epoch (here none: write-ahead
    off), so the keys it holds until written stay bounded; every manifest still rebuilds the
    entries of its snapshot. Fewer keys wait for their time; a mutable shard never writes ahead."""
    monkeypatch.setattr(shards, "CHUNK", 7)
    files = StateFiles(tmp_path, "pending")  # no epoch length: no timed write
    table = Table(files, None)
    table.name("t1")
    rng = random.Random(11)
    taken: list[tuple[Manifest, dict[str, bytes]]] = []
    wrote = 0
    for i in range(40):
        for j in range(rng.randrange(0, 30)):
            table.put(f"k{i}-{j}", b"%d" % j)
            if rng.random() < 0.2:
                table.drop(f"k{i}-{rng.randrange(0, j + 1)}")
            had = len(table.changed)
            table.ahead()
            assert len(table.changed) < 7
            wrote += had >= 7
        m = table.snapshot()
        assert isinstance(m, Manifest)
        taken.append((m, dict(table.items.items())))
    assert wrote > 20
    for m, items in taken[-KEEP:]:
        assert Table(files, m).items == items
    few = Table(StateFiles(tmp_path, "index"), None)
    few.name("t1")
    for j in range(6):
        few.put(f"f{j}", b"x")
    few.ahead()
    assert len(few.changed) == 6  # below a chunk, not due: kept for the snapshot
    entities = Entities(StateFiles(tmp_path, "card"), None)
    entities.name("e1")
    entities.changed.update(f"e{j}" for j in range(20))
    entities.ahead()
    assert len(entities.changed) == 20


class Entities(Table):
    """A shard whose values change in place, as an entity step's feature states do."""

    __slots__ = ()
    mutable = True

    def frozen(self, value: Any) -> Any:
        return bytes(value)


def test_a_shard_writes_ahead_once_per_epoch_at_its_own_time(tmp_path: Path) -> None:
    """Not before its time in the epoch (`ahead_fraction`, spread over the shards), once, and the
    close then writes only what changed after; a shard of values changed in place never does."""
    from flows.shards import AHEAD_FROM, AHEAD_SPAN, ahead_fraction

    fractions = {ahead_fraction("index", k) for k in Shards(48).keys}
    assert len(fractions) > 40 and AHEAD_FROM <= min(fractions) <= max(fractions) < AHEAD_FROM + AHEAD_SPAN
    files = StateFiles(tmp_path, "pending", epoch_s=0.2)
    table = Table(files, None)
    table.name("t1")
    # its file exists from its first event: the first epoch close does not create it
    assert [p.stat().st_size for p in files.directory(table.shard or "").iterdir()] == [0]
    table.put("a", b"1")
    table.ahead()  # no snapshot yet: no place in an epoch
    assert table.changed == {"a"}
    m1 = table.snapshot()
    for i in range(20):
        table.put(f"k{i}", b"v")
    table.ahead()  # too early
    assert len(table.changed) == 20
    time.sleep(0.2)
    table.ahead()
    assert not table.changed
    table.put("late", b"w")
    table.ahead()  # once per epoch
    assert table.changed == {"late"}
    m2 = table.snapshot()
    assert isinstance(m1, Manifest) and isinstance(m2, Manifest)
    assert _records(files, m2) == 3  # the first snapshot's, the one written ahead, the close's
    assert Table(files, m2).items == {"a": b"1", "late": b"w"} | {f"k{i}": b"v" for i in range(20)}
    assert Table(files, m1).items == {"a": b"1"}
    entity = Entities(StateFiles(tmp_path, "card", epoch_s=0.0), None)  # values changed in place
    entity.name("t1")
    entity.put("c1", bytearray(b"1"))
    entity.snapshot()
    entity.items["c1"] += b"2"
    entity.changed.add("c1")
    entity.ahead()  # a busy entity would be written twice an epoch: only at snapshots
    assert entity.changed == {"c1"}
    off = Table(StateFiles(tmp_path, "index"), None)  # no epoch length: only at snapshots
    off.name("t1")
    off.put("a", b"1")
    off.snapshot()
    off.put("b", b"2")
    time.sleep(0.01)
    off.ahead()
    assert off.changed == {"b"}


def test_a_resumed_shard_deletes_what_a_crashed_run_wrote_after_its_epoch(tmp_path: Path) -> None:
    files = StateFiles(tmp_path, "pending")
    first, m1 = _one_entry(files)
    first.put("b", b"2")
    first.snapshot()  # written, but its epoch never completed: the resume uses m1
    stray = files.directory(first.shard or "") / "stray.log"
    stray.write_bytes(b"from a run whose state was not kept")

    assert isinstance(m1, Manifest)
    resumed = Table(files, pickle.loads(pickle.dumps(m1)))
    assert resumed.items == {"a": b"1"}
    resumed.put("c", b"3")
    m2 = resumed.snapshot()
    assert not stray.exists()
    assert isinstance(m2, Manifest) and len({name for name, _, _ in m2.segments}) == 2  # a file of its own
    assert Table(files, m2).items == {"a": b"1", "c": b"3"}
    assert Table(files, m1).items == {"a": b"1"}  # a crash now would resume from m1 again: still there


def test_damaged_or_missing_files_are_refused_with_a_clear_error(tmp_path: Path) -> None:
    files = StateFiles(tmp_path, "index")
    _, m = _one_entry(files)
    assert isinstance(m, Manifest)
    (name, _, end), *_ = m.segments
    path = files.directory(m.shard) / name
    good = path.read_bytes()
    path.write_bytes(good[:9] + b"\xc1" * (len(good) - 9))  # same length, not what was written
    with pytest.raises(StateFilesError, match="does not hold what its last snapshot wrote"):
        Table(files, m)
    path.write_bytes(good[: end - 3])
    with pytest.raises(StateFilesError, match="damaged"):
        Table(files, m)
    path.unlink()
    with pytest.raises(StateFilesError, match="cannot read"):
        Table(files, m)
    with pytest.raises(StateFilesError, match="FRAUD_RECOVERY_DIR is not set"):
        Table(None, m)


def test_without_a_recovery_directory_a_snapshot_is_a_copy(tmp_path: Path) -> None:
    table, snap = _one_entry(None)
    table.put("b", b"2")
    assert isinstance(snap, FullState) and snap.items == {"a": b"1"}  # that moment's entries
    back = Table(None, pickle.loads(pickle.dumps(snap)))
    assert back.items == {"a": b"1"} and back.shard == table.shard
    # Given a directory later, the first delta holds every entry (no file had them).
    moved = Table(StateFiles(tmp_path, "index"), pickle.loads(pickle.dumps(snap)))
    m = moved.snapshot()
    assert isinstance(m, Manifest) and Table(StateFiles(tmp_path, "index"), m).items == {"a": b"1"}


@pytest.mark.parametrize("kind", [Table, CompactTable])
def test_a_snapshot_without_files_is_copied_only_while_it_is_held(kind: type[Table]) -> None:
    """Without a recovery directory the snapshot lends the shard's entries: a shard copies them
    before its next change only if the snapshot is still alive (Bytewax pickling it later); a
    dropped one (recovery off) costs no copy, however many entries the shard holds."""
    table = kind(None, None)
    table.name("t1")
    for i in range(50):
        table.put(f"k{i}", b"%d" % i)
    snap = table.snapshot()
    assert isinstance(snap, FullState) and snap.items is table.items  # lent, not copied
    copies = ShardTable.copies
    items = table.own()  # what a step's `apply` changes: a copy, since `snap` is held
    assert ShardTable.copies == copies + 1
    assert items is table.items and items is not snap.items
    table.put("new", b"n")
    table.drop("k0")
    assert "new" in items and "k0" not in items  # the caller's entries are the shard's
    assert dict(snap.items.items()) == {f"k{i}": b"%d" % i for i in range(50)}  # that moment's
    table.put("k1", b"changed")
    assert snap.items["k1"] == b"1"

    held = table.items
    snap = table.snapshot()
    del snap  # what Bytewax does with a snapshot when recovery is off
    table.put("later", b"l")
    table.drop("k2")
    assert table.own() is held  # changed in place: no copy
    again = table.snapshot()
    assert isinstance(again, FullState)
    table.drop("k3")  # `drop` and `put` copy by themselves too
    assert "k3" in again.items and "k3" not in table.items and table.items is not again.items


def test_without_files_a_mutable_shard_s_snapshot_loses_what_it_dropped() -> None:
    """Without files, a shard whose values change in place saves frozen copies, refreshed for the
    keys noted as changed: a key it drops must leave the next snapshot (a shard of immutable
    values notes nothing there: its snapshot is the table itself)."""
    table = Entities(None, None)
    table.name("e1")
    for i in range(5):
        table.put(f"e{i}", b"%d" % i)
    first = table.snapshot()
    assert isinstance(first, FullState) and set(first.items) == {f"e{i}" for i in range(5)}
    table.drop("e1")
    table.put("e9", b"9")
    second = table.snapshot()
    assert isinstance(second, FullState) and set(second.items) == {"e0", "e2", "e3", "e4", "e9"}
    assert Entities(None, pickle.loads(pickle.dumps(second))).items == {k: v for k, v in table.items.items()}

    plain = Table(None, None)
    plain.name("t1")
    plain.put("a", b"1")
    plain.drop("a")
    plain.put("b", b"2")
    assert not plain.changed
    snap = plain.snapshot()
    assert isinstance(snap, FullState) and dict(snap.items.items()) == {"b": b"2"}


def _pickled_once_the_disk_is_done(m: Manifest, disk: threading.Event) -> None:
    """Pickling `m` (as Bytewax does) waits while the test's disk is busy, and ends once `disk`
    lets it finish."""
    pickled = threading.Thread(target=pickle.dumps, args=(m,))
    pickled.start()
    pickled.join(0.2)
    assert pickled.is_alive()  # the manifest waits for the disk
    disk.set()
    pickled.join(30)
    assert not pickled.is_alive()


def test_a_manifest_is_pickled_only_once_the_bytes_it_names_are_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytewax pickles a snapshot before its store records it: pickling waits until the shards'
    appends are fsynced. The fsyncs start in the background as each snapshot is written, so a
    snapshot does not wait for the disk and an epoch close waits once, for what is still running.
    (Durability itself cannot be observed without pulling the power; the fsync calls are.) This
    is the path without syncfs (not Linux); the next test covers syncfs."""
    durable.sync_files()  # what earlier tests wrote
    monkeypatch.setattr(durable, "_SYNCFS", None)
    synced: list[int] = []
    started: list[int] = []
    disk = threading.Event()  # the "disk" finishes an fsync only once the test lets it
    real = os.fsync

    def fsync(fd: int) -> None:
        started.append(os.fstat(fd).st_ino)
        assert disk.wait(30)
        real(fd)
        synced.append(os.fstat(fd).st_ino)

    monkeypatch.setattr(os, "fsync", fsync)
    files = StateFiles(tmp_path, "index")
    a, b = Table(files, None), Table(files, None)
    a.name("t1")
    b.name(next(f"t{i}" for i in range(2, 500) if Shards().of(f"t{i}") != a.shard))
    a.put("x", b"1")
    b.put("y", b"2")
    ma, mb = a.snapshot(), b.snapshot()  # returns while the disk is still busy
    assert isinstance(ma, Manifest) and isinstance(mb, Manifest)
    inodes = {(files.directory(m.shard) / m.segments[0][0]).stat().st_ino for m in (ma, mb)}
    assert synced == []
    deadline = time.monotonic() + 30
    while len(started) < 2 and time.monotonic() < deadline:  # before anything is pickled
        time.sleep(0.01)
    assert sorted(started) == sorted(inodes)
    waited = REGISTRY.get_sample_value("fraud_snapshot_seconds_total", {"step": "fsync"}) or 0.0
    _pickled_once_the_disk_is_done(ma, disk)
    assert sorted(synced) == sorted(inodes)  # both shards' files
    # the wait is what an epoch close spends on fsyncs: counted for the summary and /metrics
    assert (
        REGISTRY.get_sample_value("fraud_snapshot_seconds_total", {"step": "fsync"}) or 0.0
    ) >= waited + 0.2
    assert sorted(started) == sorted(inodes)  # once each
    pickle.dumps(mb)
    assert len(synced) == 2  # nothing new to sync
    a.put("z", b"3")
    pickle.dumps(a.snapshot())
    assert len(synced) == 3


def test_with_syncfs_a_manifest_is_pickled_once_its_filesystem_is_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Linux syncfs makes every shard file of the close durable (a few hundred fsyncs and their
    threads cost the worker more), in a thread kicked as each shard's snapshot is written: pickling
    a manifest waits for a run that started after the last write, a failure stops the pickling (so
    Bytewax never records the epoch), and a close with nothing new written waits for nothing."""
    if durable._SYNCFS is None:  # noqa: SLF001
        pytest.skip("no syncfs here (not Linux)")
    real = durable._SYNCFS  # noqa: SLF001
    durable.sync_files()  # what earlier tests wrote
    disk = threading.Event()
    calls: list[int] = []
    fail = [0]

    def syncfs(fd: int) -> int:
        calls.append(os.fstat(fd).st_dev)
        assert disk.wait(30)
        if fail[0]:
            ctypes.set_errno(fail[0])
            return -1
        return real(fd)

    monkeypatch.setattr(durable, "_fs_syncer", durable._FsSyncer(syncfs))  # noqa: SLF001
    files = StateFiles(tmp_path, "index")
    a, b = Table(files, None), Table(files, None)
    a.name("t1")
    b.name(next(f"t{i}" for i in range(2, 500) if Shards().of(f"t{i}") != a.shard))
    a.put("x", b"1")
    ma = a.snapshot()  # the filesystem's sync starts, and waits for the "disk"
    deadline = time.monotonic() + 30
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(calls) == 1
    b.put("y", b"2")
    mb = b.snapshot()  # written while that sync runs: it needs another
    _pickled_once_the_disk_is_done(mb, disk)
    assert len(set(calls)) == 1 and calls[0] == tmp_path.stat().st_dev
    assert len(calls) == 2  # a run that started after b's write
    pickle.dumps(ma)
    assert len(calls) == 2  # nothing new to sync
    a.put("z", b"3")
    fail[0] = 5  # EIO: write-back failed
    with pytest.raises(OSError, match="syncfs of the state files' filesystem failed"):
        pickle.dumps(a.snapshot())
