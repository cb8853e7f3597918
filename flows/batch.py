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


def opened(batch: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """A stateful step's output with its lists opened: each event its own `(key, event)` item,
    as the steps after it read them.

    Bytewax wraps every value a stateful step returns in a `(key, value)` tuple, building the
    key's Python string again for each: a step that returns a batch's events as one list
    (`flows.ordering.bundled`) pays that once per batch, and this op (`op.flat_map_batch`)
    makes the items in Python, the key shared. A value that is not a plain list (no event is
    one) passes as it is."""
    out: list[tuple[str, Any]] = []
    for kv in batch:
        v = kv[1]
        if type(v) is list:
            k = kv[0]
            out += [(k, e) for e in v]
        else:
            out.append(kv)
    return out
