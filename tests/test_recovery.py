"""Feature state and the online model survive a crash through Bytewax recovery."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSource

from features.event_files import merged_records
from flows.shards import ShardTable
from fraud.datagen import GeneratorConfig, write_files
from service.settings import Settings
from testkit.run import decisions_of
from testkit.values import same

ZERO = timedelta(0)


@pytest.mark.parametrize(("crash_at", "files"), [(0.3, True), (0.75, True), (0.5, False)])
def test_resume_gives_the_uninterrupted_features_and_scores(
    tmp_path: Path, crash_at: float, files: bool
) -> None:
    """`files`: the shards of the index, the entity steps and `pending` save deltas in the
    recovery directory (as `fraud run` does), or whole copies in Bytewax's store (as with
    `bytewax.run -r`)."""
    write_files(tmp_path, GeneratorConfig(seed=11, days=12, n_cards=60, n_merchants=50, drift_day=None))
    txns, labels = tmp_path / "transactions.jsonl", tmp_path / "labels.jsonl"
    db = tmp_path / "recovery"
    settings = Settings(
        transactions_path=txns, labels_path=labels, online_warmup_labels=50, progress_interval_s=60
    )
    records: list[object] = [(k, line, f"{k}:{n + 1}") for k, line, n in merged_records(txns, labels)]
    copies = ShardTable.copies
    expected = {d.txn.txn_id: d for d in decisions_of(settings, records)}
    assert ShardTable.copies == copies  # Bytewax drops each snapshot at once: nothing copied
    state = db / "state" if files else None

    db.mkdir()
    init_db_dir(db, 1)
    cut = int(len(records) * crash_at)
    crashing = [*records[:cut], TestingSource.ABORT(), *records[cut:]]
    recovery = RecoveryConfig(str(db))
    first = decisions_of(settings, crashing, recovery=recovery, state_dir=state)
    assert 0 < len(first) < len(expected)  # it really stopped part-way
    second = decisions_of(settings, crashing, recovery=recovery, state_dir=state)
    # Bytewax's own store pickles each snapshot within the step that took it: nothing copied.
    assert ShardTable.copies == copies

    resumed = {d.txn.txn_id: d for d in first + second}  # a replayed epoch may score a txn twice
    assert resumed.keys() == expected.keys()
    for txn_id, d in resumed.items():
        e = expected[txn_id]
        assert same(d.values, e.values), txn_id
        assert (d.xgb, d.online, d.score) == (e.xgb, e.online, e.score), txn_id
    assert any(d.online > 0 for d in second)  # the online model was restored, not restarted
    shard_files = list((db / "state").rglob("*.log"))
    assert {f.parent.parent.name for f in shard_files} == (
        {"index", "card", "merchant", "device", "pending"} if files else set()
    )


def test_a_flow_without_recovery_never_touches_a_recovery_store(tmp_path: Path) -> None:
    """FRAUD_RECOVERY_DIR in the environment of a flow run without recovery (`make run`,
    `bytewax.run` without -r): the shards keep whole-copy snapshots and write no file, so they
    cannot delete the files a real store's snapshots name."""
    write_files(tmp_path, GeneratorConfig(seed=11, days=3, n_cards=30, n_merchants=50, drift_day=None))
    txns, labels = tmp_path / "transactions.jsonl", tmp_path / "labels.jsonl"
    store = tmp_path / "recovery"
    kept = store / "state" / "index" / "shard0" / "1-1.log"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"a snapshot's delta")
    settings = Settings(transactions_path=txns, labels_path=labels, recovery_dir=store)
    records: list[object] = [(k, line, f"{k}:{n + 1}") for k, line, n in merged_records(txns, labels)]
    assert decisions_of(settings, records)
    assert [p for p in store.rglob("*") if p.is_file()] == [kept]


def _make_recovery(directory: str, start: Any) -> None:
    from flows.runner import recovery_config

    start.wait(60)  # all processes reach recovery_config at the same moment, as a cluster's do
    recovery_config(Path(directory), 4)


def test_processes_starting_together_share_one_recovery_directory(tmp_path: Path) -> None:
    """The processes of a cluster all create the recovery partitions on start: exactly one must."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    for attempt in range(3):
        directory = tmp_path / f"r{attempt}"
        start = ctx.Barrier(4)
        procs = [ctx.Process(target=_make_recovery, args=(str(directory), start)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0]
        assert sorted(f.name for f in directory.glob("part-*")) == [f"part-{i}.sqlite3" for i in range(4)]
