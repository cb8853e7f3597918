"""A recovery store that cannot be trusted is refused (`flows.recovery`): checks on a store a real
crash left, damaged copies of it, the epoch rules, and the store's identity in Redis."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import struct
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from bytewax.recovery import RecoveryConfig
from bytewax.testing import TestingSink, TestingSource, run_main
from typer.testing import CliRunner

import flows.runner
from features.event_files import merged_records
from flows.fraud import build
from flows.recovery import STATE_LAYOUT, RedisRegistry, recovery_config
from flows.recovery_check import Part, RecoveryStoreError, check_store, consistency
from flows.routing import DEFAULT_SHARDS
from fraud.cli import app
from fraud.datagen import GeneratorConfig, write_files
from service.settings import Settings, get_settings
from testkit.run import decisions_of
from testkit.system import free_port

ZERO = timedelta(0)


# -- A recovery store that cannot be trusted is refused (flows/recovery.py, flows/recovery_check.py) ----------------------

KILL_EARLY, KILL_LATE = 300, 600  # records read before each SIGKILL (batches of 10: one epoch each)


class _KillAt:
    """Records for TestingSource that SIGKILL this process when the input reaches record `at`:
    the same crash point in every run (the input only asks for a batch once the epoch before it
    is committed in every partition)."""

    def __init__(self, items: list[object], at: int | None) -> None:
        self.items, self.at = items, at

    def __iter__(self) -> Any:

        for i, item in enumerate(self.items):
            if i == self.at:
                os.kill(os.getpid(), signal.SIGKILL)
            yield item


def _records(data: Path) -> tuple[Settings, list[object]]:
    txns, labels = data / "transactions.jsonl", data / "labels.jsonl"
    settings = Settings(
        transactions_path=txns, labels_path=labels, online_warmup_labels=50, progress_interval_s=600
    )
    return settings, [(k, line, f"{k}:{n + 1}") for k, line, n in merged_records(txns, labels)]


def _run_until_killed(data: str, db: str, at: int) -> None:
    """Run the flow with recovery in `db`, in a process of its own that `_KillAt` kills."""
    settings, records = _records(Path(data))
    flow = build(
        settings,
        source=TestingSource(_KillAt(records, at), batch_size=10),
        alerts=TestingSink([]),
        dead_letters=TestingSink([]),
        decisions=TestingSink([]),
        late=TestingSink([]),
        drift=TestingSink([]),
    )
    run_main(flow, epoch_interval=ZERO, recovery_config=RecoveryConfig(db))


def _decisions(settings: Settings, records: list[object], db: Path | None) -> dict[str, float]:
    """Scores by txn_id of a run over `records` (resuming from `db` with Bytewax alone, unchecked)."""
    recovery = None if db is None else RecoveryConfig(str(db))
    return {d.txn.txn_id: d.score for d in decisions_of(settings, records, batch_size=10, recovery=recovery)}


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 3-partition store SIGKILLed twice (the files a crash leaves: db, -wal, -shm), with a copy
    taken after the first kill (an older backup), and the data it ran on."""

    root = tmp_path_factory.mktemp("crashed")
    data = root / "data"
    write_files(data, GeneratorConfig(seed=11, days=12, n_cards=60, n_merchants=50, drift_day=None))
    db = root / "store"
    recovery_config(db, 3)
    ctx = multiprocessing.get_context("spawn")
    copies: dict[str, Path] = {"data": data}
    for name, at in (("early", KILL_EARLY), ("late", KILL_LATE)):
        proc = ctx.Process(target=_run_until_killed, args=(str(data), str(db), at))
        proc.start()
        proc.join(120)
        assert proc.exitcode == -9, f"the run was to be killed at record {at}: exit {proc.exitcode}"
        copies[name] = root / name
        shutil.copytree(db, copies[name])
    assert (copies["late"] / "part-0.sqlite3-wal").stat().st_size > 0  # a crash leaves the WAL
    return copies


def _damage(crashed: dict[str, Path], tmp_path: Path, name: str = "late") -> Path:

    db = tmp_path / "store"
    shutil.copytree(crashed[name], db)
    return db


def _wal_commits(wal: Path) -> list[int]:
    """Byte offsets where each transaction of the WAL's current generation ends: a frame with a
    non-zero "database size" field ends one; frames with another salt are from before the WAL
    was last restarted after a checkpoint, and SQLite ignores them."""

    data = wal.read_bytes()
    page_size = struct.unpack(">I", data[8:12])[0]
    salt = data[16:24]
    ends, offset = [], 32
    while offset + 24 + page_size <= len(data):
        if data[offset + 8 : offset + 16] != salt:
            break
        if struct.unpack(">I", data[offset + 4 : offset + 8])[0]:
            ends.append(offset + 24 + page_size)
        offset += 24 + page_size
    return ends


def test_a_crash_leaves_a_store_that_passes_the_check(crashed: dict[str, Path]) -> None:
    """What SIGKILL leaves (a WAL, a stale -shm, partitions one epoch apart) is not damage."""

    for name in ("early", "late"):
        info = check_store(crashed[name])
        assert info is not None and info.partitions == 3 and info.epoch is not None
        assert info.resume_epoch == info.epoch + 1
    early, late = check_store(crashed["early"]), check_store(crashed["late"])
    assert early is not None and late is not None
    assert (late.epoch or 0) > (early.epoch or 0) > 0


def test_a_store_of_an_older_state_layout_is_refused_naming_fraud_reset(
    crashed: dict[str, Path], tmp_path: Path
) -> None:
    """Its state sits under step ids this flow no longer has: resuming would start every window
    empty while the inputs go on where they stopped. Refused (or, with --fresh, moved aside)."""

    db = _damage(crashed, tmp_path)
    assert json.loads((db / "store.json").read_text())["layout"] == STATE_LAYOUT
    recovery_config(db, 3)  # this flow's own layout: resumed
    meta = json.loads((db / "store.json").read_text())
    (db / "store.json").write_text(json.dumps({**meta, "layout": 1}))
    with pytest.raises(
        RecoveryStoreError, match=r"holds state of layout 1, saved by an older version"
    ) as refused:
        recovery_config(db, 3)
    assert "fraud reset --yes" in str(refused.value) and "--fresh" in str(refused.value)
    recovery_config(db, 3, fresh=True)
    (aside,) = tmp_path.glob("store.outdated-*")
    assert json.loads((aside / "store.json").read_text())["layout"] == 1
    info = check_store(db)
    assert (
        info is not None
        and info.epoch is None
        and info.meta is not None
        and info.meta["layout"] == STATE_LAYOUT
    )


def test_a_store_saved_with_another_shard_count_is_refused_naming_the_count(
    crashed: dict[str, Path], tmp_path: Path
) -> None:
    """A key's shard depends on the count (FRAUD_STATE_SHARDS): resuming with another would look
    for every key in a shard that does not hold it. Refused, naming the count to set (or, with
    --fresh, moved aside)."""
    db = _damage(crashed, tmp_path)
    assert json.loads((db / "store.json").read_text())["shards"] == DEFAULT_SHARDS == 16
    recovery_config(db, 3)  # the count it was made with: resumed
    with pytest.raises(
        RecoveryStoreError, match=r"in 16 shards and FRAUD_STATE_SHARDS is 48: every key"
    ) as refused:
        recovery_config(db, 3, shards=48)
    assert "Set FRAUD_STATE_SHARDS=16" in str(refused.value) and "--fresh" in str(refused.value)
    recovery_config(db, 3, fresh=True, shards=48)
    (aside,) = tmp_path.glob("store.other-shards-*")
    assert json.loads((aside / "store.json").read_text())["shards"] == 16
    assert json.loads((db / "store.json").read_text())["shards"] == 48


@pytest.mark.parametrize("cut", ["last transaction", "half of it"])
def test_a_truncated_wal_is_refused_naming_the_file(
    crashed: dict[str, Path], tmp_path: Path, cut: str
) -> None:
    """The tester's case: part-0.sqlite3-wal loses its end. SQLite reads what is left without a
    word, so part 0 is at an older epoch than parts 1 and 2. Even the smallest loss, its last
    transaction (the commit of the last epoch), shows: one worker commits part 0 before the others.
    The check reads the store as it is: no file changes (SQLite may rebuild the -shm index)."""

    db = _damage(crashed, tmp_path)
    wal = db / "part-0.sqlite3-wal"
    ends = _wal_commits(wal)
    assert len(ends) >= 4, ends
    keep = ends[-2] if cut == "last transaction" else ends[len(ends) // 2]
    os.truncate(wal, keep + 100)  # into the next transaction's first frame: it is incomplete
    before = {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest()
        for f in db.glob("*.sqlite3*")
        if "shm" not in f.name
    }
    with pytest.raises(RecoveryStoreError) as refused:
        check_store(db)
    message = str(refused.value)
    assert f"{db / 'part-0.sqlite3'} is at epoch" in message
    assert "truncated" in message and "--fresh" in message and "fraud reset --yes" in message
    assert "backup" in message and "\n" not in message
    after = {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest()
        for f in db.glob("*.sqlite3*")
        if "shm" not in f.name
    }
    assert after == before


def test_a_partition_from_an_older_backup_is_refused_where_bytewax_resumes_wrongly(
    crashed: dict[str, Path], tmp_path: Path
) -> None:
    """part-1 restored from the copy taken 30 epochs earlier: Bytewax itself resumes from the
    others' epoch without a word, and the keys in part 1 miss 30 epochs of events."""

    db = _damage(crashed, tmp_path)
    for suffix in ("", "-wal", "-shm"):
        shutil.copy2(crashed["early"] / f"part-1.sqlite3{suffix}", db / f"part-1.sqlite3{suffix}")
    with pytest.raises(
        RecoveryStoreError, match=r"part-1\.sqlite3 is at epoch \d+ while the others are at \d+"
    ):
        check_store(db)

    settings, records = _records(crashed["data"])
    expected = _decisions(settings, records, None)
    resumed = _decisions(settings, records, db)  # what Bytewax alone does with this store
    assert resumed and resumed.keys() <= expected.keys()
    assert sum(resumed[t] != expected[t] for t in resumed) > 0


def test_missing_corrupt_and_stray_files_are_named(tmp_path: Path) -> None:

    original = tmp_path / "original"
    recovery_config(original, 3)
    assert check_store(original) is not None

    def damaged(name: str) -> Path:
        db = tmp_path / name
        shutil.copytree(original, db)
        return db

    cases: list[tuple[Path, str]] = []
    db = damaged("missing")
    (db / "part-2.sqlite3").unlink()
    cases.append((db, r"part-2\.sqlite3 is missing \(the store has 3 partitions\)"))
    db = damaged("garbage")
    (db / "part-1.sqlite3").write_bytes(b"not a database at all" * 500)
    cases.append((db, r"part-1\.sqlite3 cannot be read \(sqlite3 DatabaseError: file is not a database\)"))
    db = damaged("empty")
    (db / "part-0.sqlite3").write_bytes(b"")
    cases.append((db, r"part-0\.sqlite3 is not a Bytewax recovery partition"))
    db = damaged("cut")
    with open(db / "part-1.sqlite3", "r+b") as f:
        f.truncate(2 * 4096)
    cases.append((db, r"part-1\.sqlite3 cannot be read"))
    db = damaged("swapped")
    (db / "part-0.sqlite3").rename(db / "part-x")
    (db / "part-1.sqlite3").rename(db / "part-0.sqlite3")
    (db / "part-x").rename(db / "part-1.sqlite3")
    cases.append((db, r"part-0\.sqlite3 says it is partition \[\(1, 3\)\], not 0"))
    db = damaged("stray")
    shutil.copy2(db / "part-0.sqlite3", db / "part-0.backup.sqlite3")
    cases.append((db, r"part-0\.backup\.sqlite3 is not a partition of this store, but Bytewax would read it"))
    for db, pattern in cases:
        with pytest.raises(RecoveryStoreError, match=pattern) as refused:
            check_store(db)
        assert str(db) in str(refused.value) and "\n" not in str(refused.value), db.name


def _part(index: int, commit: int | None, **progress: Any) -> Any:

    return Part(Path(f"/r/part-{index}.sqlite3"), index, 3, commit, **progress)


def test_the_epoch_rules_accept_every_crash_state_and_nothing_else() -> None:
    """Bytewax commits every partition every epoch and starts no epoch before all committed the
    last: partitions differ by one epoch at most, and one worker commits them in index order."""

    one = {"exs": {0: (1, 1)}, "fronts": {(0, 0): 61}}  # run 0, one worker, finished epoch 60
    two = {"exs": {0: (2, 1)}, "fronts": {(0, 0): 61, (0, 1): 61}}

    def problems(commits: list[int | None], progress: dict[str, Any], whole: bool = True) -> list[str]:
        parts = [_part(i, c) for i, c in enumerate(commits)]
        parts[2].exs, parts[2].fronts = progress["exs"], progress["fronts"]
        return consistency(parts, whole=whole)

    assert problems([60, 60, 60], one) == []
    assert problems([60, 59, 59], one) == []  # killed between the commits of part 0 and part 1
    assert problems([59, 60, 60], one) != []  # part 0 is committed first: it lost its last commit
    assert problems([60, 59, 60], one) != []
    assert problems([59, 60, 59], two) == []  # two workers commit in any order: not detectable
    assert problems([57, 60, 60], two) != []
    assert problems([None, 60, 60], two) != []  # a fresh file put in its place
    assert problems([None, None, None], {"exs": {}, "fronts": {}}) == []  # a new store
    assert problems([1, None, None], {"exs": {0: (1, 1)}, "fronts": {(0, 0): 2}}) == []
    # The partition holding the progress rolled back: the others' commits are past its resume epoch.
    assert problems([60, 60, 60], {"exs": {0: (1, 1)}, "fronts": {(0, 0): 60}}) != []
    assert problems([60, 60, 60], {"exs": {0: (1, 1)}, "fronts": {(1, 0): 61}}) != []  # run 1's start lost
    # One host's directory of a cluster: the partitions other hosts write were never committed here.
    assert problems([None, 60, 59], two, whole=False) == []
    assert problems([None, 60, 50], two, whole=False) != []


# -- The store's identity in Redis, --fresh, and `fraud run` ---------------------------------------


def _registry(redis_url: str, stream: str = "rec:alerts", process_id: int = 0) -> Any:

    return RedisRegistry(Settings(redis_url=redis_url, alerts_stream=stream), process_id)


def _store_id(db: Path) -> str:

    return str(json.loads((db / "store.json").read_text())["id"])


@pytest.mark.redis
def test_a_deleted_store_is_refused_until_reset(
    tmp_path: Path, redis_url: str, redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:

    db = tmp_path / "store"
    registry = _registry(redis_url)
    recovery_config(db, 2, registry=registry)
    first = _store_id(db)
    assert registry.get()["0"]["id"] == first
    recovery_config(db, 2, registry=registry)  # the same store again: fine

    shutil.rmtree(db)
    with pytest.raises(
        RecoveryStoreError, match=r"is missing or holds no store, but Redis key rec:alerts:recovery-store"
    ) as refused:
        recovery_config(db, 2, registry=registry)
    assert str(db) in str(refused.value) and first in str(refused.value)
    assert "fraud reset --yes" in str(refused.value) and "--fresh" in str(refused.value)
    assert not db.exists() or not any(db.iterdir())  # nothing was created

    monkeypatch.setenv("FRAUD_REDIS_URL", redis_url)
    monkeypatch.setenv("FRAUD_ALERTS_STREAM", "rec:alerts")
    result = CliRunner().invoke(app, ["reset", "--yes"])
    assert result.exit_code == 0, result.output
    assert registry.get() == {}
    recovery_config(db, 2, registry=registry)  # reset and replay: a new store
    assert _store_id(db) != first and registry.get()["0"]["id"] == _store_id(db)


@pytest.mark.redis
def test_another_store_or_a_lost_record_is_refused(tmp_path: Path, redis_url: str, redis_client: Any) -> None:

    registry = _registry(redis_url)
    mine, other = tmp_path / "mine", tmp_path / "other"
    recovery_config(other, 2)  # a store never recorded anywhere
    recovery_config(mine, 2, registry=registry)
    with pytest.raises(
        RecoveryStoreError, match=r"other/store\.json has store .*this directory is not the store"
    ):
        recovery_config(other, 2, registry=registry)

    redis_client.delete("rec:alerts:recovery-store")  # `fraud reset`, or Redis lost its data
    with pytest.raises(
        RecoveryStoreError, match=r"has no record of the store .* though it was recorded there"
    ):
        recovery_config(mine, 2, registry=registry)

    # A second process of a cluster sharing the directory has no record yet: it adds its own.
    redis_client.hset("rec:alerts:recovery-store", "0", f'{{"id": "{_store_id(mine)}"}}')
    recovery_config(mine, 2, registry=_registry(redis_url, process_id=1), processes=2)
    assert registry.get()["1"]["id"] == _store_id(mine)


@pytest.mark.redis
def test_fresh_moves_a_refused_store_aside_and_starts_a_new_one(
    tmp_path: Path, redis_url: str, redis_client: Any, caplog: pytest.LogCaptureFixture
) -> None:

    registry = _registry(redis_url)
    db = tmp_path / "store"
    recovery_config(db, 3, registry=registry)
    old = _store_id(db)
    (db / "part-1.sqlite3").unlink()
    with caplog.at_level(logging.WARNING, logger="flows.recovery"):
        recovery_config(db, 3, registry=registry, fresh=True)
    (aside,) = tmp_path.glob("store.damaged-*")
    assert sorted(f.name for f in aside.iterdir()) == ["part-0.sqlite3", "part-2.sqlite3", "store.json"]
    assert _store_id(aside) == old  # moved, not deleted
    new = check_store(db)
    assert new is not None and new.id != old and registry.get()["0"]["id"] == new.id
    (line,) = [r.getMessage() for r in caplog.records if "FRAUD_RECOVERY_FRESH" in r.getMessage()]
    assert str(aside) in line and "part-1.sqlite3 is missing" in line
    recovery_config(db, 3, registry=registry, fresh=True)  # a store that passes is kept, flag or not
    assert _store_id(db) == new.id and len(list(tmp_path.glob("store.damaged-*"))) == 1


def test_a_store_on_a_mount_point_is_moved_aside_inside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory that is a mount point cannot be renamed (EBUSY): its files move into a
    subdirectory, which Bytewax does not read, and the new store starts beside them."""

    db = tmp_path / "store"
    recovery_config(db, 2)
    (db / "part-1.sqlite3").write_bytes(b"")
    rename = Path.rename

    def busy(self: Path, target: Any) -> Any:
        if self == db:
            raise OSError(errno.EBUSY, "Device or resource busy", str(self))
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", busy)
    recovery_config(db, 2, fresh=True)
    (inner,) = db.glob("damaged-*")
    assert sorted(f.name for f in inner.iterdir()) == ["part-0.sqlite3", "part-1.sqlite3", "store.json"]
    assert (inner / "part-1.sqlite3").stat().st_size == 0  # moved as it was
    assert check_store(db) is not None


def test_an_unreachable_redis_does_not_block_the_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:

    port = free_port()
    db = tmp_path / "store"
    with caplog.at_level(logging.WARNING, logger="flows.recovery"):
        recovery_config(db, 2, registry=_registry(f"redis://127.0.0.1:{port}/0"))
    assert (db / "store.json").exists() and "going on without that check" in caplog.text


@pytest.mark.redis
def test_a_redis_user_without_the_hash_commands_is_told_what_to_add(
    tmp_path: Path, redis_url: str, redis_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The README's minimal ACL for the writers lacks HGETALL and HSET: the start goes on, and
    the warning says what the ACL needs."""

    redis_client.execute_command(
        "ACL", "SETUSER", "rec-writer", "on", ">rec-pw", "resetkeys", "~rec:*", "-@all", "+ping", "+set"
    )
    try:
        server = urlsplit(redis_url)
        url = server._replace(netloc="rec-writer:rec-pw@" + server.netloc.rpartition("@")[2]).geturl()
        with caplog.at_level(logging.WARNING, logger="flows.recovery"):
            recovery_config(tmp_path / "store", 2, registry=_registry(url))
    finally:
        redis_client.execute_command("ACL", "DELUSER", "rec-writer")
    assert "add +hgetall +hset to its ACL" in caplog.text and "rec-pw" not in caplog.text
    assert (tmp_path / "store" / "store.json").exists()


@pytest.mark.redis
def test_fraud_run_refuses_in_one_line_and_fresh_sets_the_setting(
    tmp_path: Path, redis_url: str, redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:

    db = tmp_path / "store"
    recovery_config(db, 2)
    (db / "part-0.sqlite3").write_bytes(b"\0" * 10_000)
    monkeypatch.setenv("FRAUD_REDIS_URL", redis_url)
    monkeypatch.setenv("FRAUD_RECOVERY_DIR", str(db))
    result = CliRunner().invoke(app, ["run"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(
        f"fraud run: refused: recovery store {db} is damaged: {db / 'part-0.sqlite3'}"
    )

    seen: list[Settings] = []
    monkeypatch.setattr(flows.runner, "run", lambda s, **_: seen.append(s))
    get_settings.cache_clear()
    assert CliRunner().invoke(app, ["run", "--fresh"]).exit_code == 0
    monkeypatch.setenv("FRAUD_RECOVERY_FRESH", "1")
    get_settings.cache_clear()
    assert CliRunner().invoke(app, ["run"]).exit_code == 0
    assert [s.recovery_fresh for s in seen] == [True, True]
