"""Run the flow in this process with recovery on, alone or as one process of a cluster.

`python -m bytewax.run flows.fraud -r DIR -s SECS` does the same once `python -m bytewax.recovery
DIR N` has created the recovery partitions; `fraud run` creates them when missing and reads the
interval from settings, so the documented command is one line.
"""

from __future__ import annotations

import fcntl
from datetime import timedelta
from pathlib import Path

from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import cluster_main, run_main

from flows.fraud import build
from fraud import metrics
from fraud.settings import Settings


def recovery_config(directory: Path, partitions: int) -> RecoveryConfig:
    """Bytewax recovery in `directory`, creating its partition files the first time.

    The processes of a cluster start together and may share the directory: an exclusive lock on
    `.init.lock` makes exactly one of them create the partitions while the others wait, instead of
    racing into a UNIQUE-constraint panic inside Bytewax.
    """
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".init.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not any(directory.glob("part-*.sqlite3")):
            init_db_dir(directory, partitions)
    return RecoveryConfig(str(directory))


def run(
    settings: Settings, *, process_id: int = 0, addresses: list[str] | None = None, workers: int = 1
) -> None:
    """Run until the input ends (files, or Redis shards idle for FRAUD_SOURCE_IDLE_EXIT_S)."""
    if settings.metrics_port:
        metrics.serve(settings.metrics_port + process_id)
    flow = build(settings)
    recovery = (
        None
        if settings.recovery_dir is None
        else recovery_config(settings.recovery_dir, settings.recovery_partitions)
    )
    epoch = timedelta(seconds=settings.snapshot_interval_s)
    if addresses or workers > 1:
        cluster_main(
            flow,
            addresses or [],
            process_id,
            epoch_interval=epoch,
            recovery_config=recovery,
            worker_count_per_proc=workers,
        )
    else:
        run_main(flow, epoch_interval=epoch, recovery_config=recovery)
