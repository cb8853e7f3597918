"""Stateless steps over whole batches: one Python call per batch.

Bytewax's `map`, `filter`, `filter_map` and `branch` call Python once per item; the flow's
stateless steps see every record, so they take the batch (`op.flat_map_batch`) and loop in a
list comprehension instead. Order within a batch is kept, so watermarks stay behind the events
they cover.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Stream


def each(step_id: str, up: Stream[Any], fn: Callable[[Any], Any]) -> Stream[Any]:
    """`op.map`, a batch at a time."""
    return op.flat_map_batch(step_id, up, lambda batch: [fn(x) for x in batch])


def keep(step_id: str, up: Stream[Any], predicate: Callable[[Any], bool]) -> Stream[Any]:
    """`op.filter`, a batch at a time."""
    return op.flat_map_batch(step_id, up, lambda batch: [x for x in batch if predicate(x)])


def keep_map(step_id: str, up: Stream[Any], fn: Callable[[Any], Any]) -> Stream[Any]:
    """`op.filter_map` (None drops the item), a batch at a time."""
    return op.flat_map_batch(step_id, up, lambda batch: [y for y in map(fn, batch) if y is not None])
