"""The whole flow run in this process over a list of records (`TestingSource`), for its decisions."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from bytewax.recovery import RecoveryConfig
from bytewax.testing import TestingSink, TestingSource, run_main

from flows.fraud import build
from models.serving import Decision
from service.settings import Settings


def decisions_of(
    settings: Settings,
    records: list[object],
    *,
    batch_size: int = 50,
    recovery: RecoveryConfig | None = None,
    state_dir: Path | None = None,
) -> list[Decision]:
    """The decisions of `build(settings)` over `records`, an epoch per batch (alerts, dead letters
    and late transactions discarded); resuming from `recovery` with Bytewax alone, unchecked; the
    index and `pending` shards save deltas in `state_dir` when given (as `fraud run` does)."""
    out: list[Decision] = []
    flow = build(
        settings,
        source=TestingSource(records, batch_size=batch_size),
        alerts=TestingSink([]),
        dead_letters=TestingSink([]),
        decisions=TestingSink(out),
        late=TestingSink([]),
        drift=TestingSink([]),
        state_dir=state_dir,
    )
    run_main(flow, epoch_interval=timedelta(0), recovery_config=recovery)
    return out
