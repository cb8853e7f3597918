"""Run the flow in this process with recovery on, alone or as one process of a cluster.

`python -m bytewax.run flows.fraud -r DIR -s SECS` does the same once `python -m bytewax.recovery
DIR N` has created the recovery partitions; `fraud run` creates them when missing, reads the
interval from settings, so the documented command is one line, and first checks that the store can
be trusted (`flows.recovery`): Bytewax's own runner does not.
"""

from __future__ import annotations

from datetime import timedelta

from bytewax.testing import cluster_main, run_main

from flows.fraud import build
from flows.recovery import RedisRegistry, recovery_config
from flows.recovery_check import RecoveryStoreError
from flows.shards import STATE_DIR
from service import telemetry
from service.runtime import settle_heap
from service.settings import Settings

__all__ = ["RecoveryStoreError", "recovery_config", "run"]


def run(
    settings: Settings, *, process_id: int = 0, addresses: list[str] | None = None, workers: int = 1
) -> None:
    """Run until the input ends (files, or Redis shards idle for FRAUD_SOURCE_IDLE_EXIT_S).

    The recovery store is checked before anything else starts: a refusal (RecoveryStoreError)
    costs no model load and leaves no half-started flow behind.
    """
    recovery = (
        None
        if settings.recovery_dir is None
        else recovery_config(
            settings.recovery_dir,
            settings.recovery_partitions,
            fresh=settings.recovery_fresh,
            registry=RedisRegistry(settings, process_id),
            processes=max(1, len(addresses or [])),
            shards=settings.state_shards,
        )
    )
    if settings.metrics_port:
        telemetry.serve(settings.metrics_port + process_id)
    state = None if recovery is None or settings.recovery_dir is None else settings.recovery_dir / STATE_DIR
    flow = build(settings, state_dir=state)
    settle_heap()
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
