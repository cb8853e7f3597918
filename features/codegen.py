"""The generated hot path of a plan: straight-line Python per declared feature set.

`compile_plan` writes two functions for a plan's integer buffers, from its declaration: `fast`
computes the features of one event, and `observe` is the whole in-order hot path (encode, insert,
read the windows, evict), which hands anything else to the plan's general insertion.
`kernel_program` encodes the plan for the compiled window reads (`features/_kernel.c`), and with
them `observe` itself runs compiled (`features._kernel.Appender`), handing the generated function
whatever is not its fast path. What each aggregation inlines, or which kernel op computes it, is
its entry in `features.aggregations`; the buffer layout is `features.buffer`. This module reads a
plan through `Layout` only.
"""

from __future__ import annotations

import zlib
from array import array
from bisect import bisect_right
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from features import buffer
from features.aggregations import AGGREGATIONS, KERNEL_PYTHON, Context
from features.buffer import BIAS, INT_LIMIT, MINUTE_MS, MISSING, NAN, PRESIZE_AT, EntityState

if TYPE_CHECKING:
    from features.events import Transaction

Step = tuple[str, int, int, int]
"""One feature of a plan: (aggregation, source column or -1, window ms, label delay ms)."""
Fast = Callable[[EntityState, int, int, int], list[float]]
Observe = Callable[[EntityState, "Transaction"], tuple[list[float], bool]]
MAX_COLUMNS = 64  # the most columns `features._kernel.Appender` takes


class Layout(Context, Protocol):
    """What the generated code is built from (`features.plan.EntityPlan` is one)."""

    code: str  # the buffer's typecode: "i" (32-bit, with a time origin) or "q"
    width: int  # segments: event times, then one per column
    fields: list[str]  # the columns: numeric ones first
    num_fields: list[str]
    nullable: list[bool]  # per numeric column: may hold MISSING
    ints: set[int]  # numeric columns that never hold MISSING
    summed: list[int]  # numeric columns with block sums on long keys
    prefix_min: int
    lazy_min: int
    lazy_shift: int
    retention_ms: int
    windows: list[int]  # the distinct unshifted windows (ms): one window start each
    steps: list[Step]
    kernel: Any  # features._kernel.window_features, or None: the window reads in Python

    def observe_general(self, s: EntityState, txn: Transaction) -> tuple[list[float], bool]: ...


def _fast_path(plan: Layout, agg: str, j: int, w: int) -> bool:
    """Whether the feature may take its aggregation's fast paths (template, kernel op) at all."""
    a = AGGREGATIONS[agg]
    return (not a.integer_column or j in plan.ints) and (not a.windowed or w in plan.windows)


def kernel_ops(plan: Layout) -> list[tuple[int, int, int, int, int]]:
    """Per feature: (op, column, window index or -1, scale, lookback) for the kernel; a feature a
    label delay may shift reads its own (t - delay - window, t - delay]: (op, column, -1, window,
    delay); a distance or speed reads two columns: (op, latitude's column, longitude's column,
    their scale, lookback), when both have the same scale (else Python computes it)."""
    ops = []
    lat, lon = plan.lat_column, plan.lon_column
    for agg, j, w, delay in plan.steps:
        a = AGGREGATIONS[agg]
        if a.delayed and a.kernel_op is not None:
            ops.append((a.kernel_op, j, -1, w, delay))
            continue
        if a.geo and a.kernel_op is not None:
            same = min(lat, lon) >= 0 and plan.scales[lat] == plan.scales[lon]
            ops.append(
                (a.kernel_op, lat, lon, plan.scales[lat], plan.lookback_ms)
                if same
                else (KERNEL_PYTHON, j, -1, 1, plan.lookback_ms)
            )
            continue
        win = plan.windows.index(w) if w in plan.windows else -1
        op = a.kernel_op
        if op is None or not _fast_path(plan, agg, j, w):
            op = KERNEL_PYTHON
        scale = plan.scales[j] if 0 <= j < len(plan.num_fields) else 1
        ops.append((op, j, win, scale, plan.lookback_ms))
    return ops


def kernel_program(plan: Layout) -> bytes:
    """This plan for `features._kernel.window_features` (the format is in its source)."""
    words = [
        8 if plan.code == "q" else 4, plan.block, plan.bias, len(plan.windows), *plan.windows, len(plan.steps)
    ]  # fmt: skip
    for op in kernel_ops(plan):
        words += op
    return array("q", words).tobytes()


def compile_plan(plan: Layout) -> tuple[Fast, Observe]:
    """Straight-line Python for this plan's integer buffers: `fast(s, n, idx, rel)` computes the
    features of the event at `idx`; `observe(s, txn)` is the whole in-order hot path (append,
    features, evict).

    The aggregations with a kernel op are read by the kernel in one call when it is built
    (`_kernel_reads`), else inlined from their templates (`_python_reads`); the others call
    their reference function. A widened key, and anything but an in-order append of exactly
    storable values, takes `plan.observe_general`.
    """
    width, summed, block = plan.width, plan.summed, plan.block
    # `reads` computes `out` from (s, n, idx, rel); it is the body of `fast` and part of `observe`.
    reads = _kernel_reads(plan) if plan.kernel is not None else _python_reads(plan)
    fast = ["def fast(s, n, idx, rel):", *reads]
    if plan.kernel is None:
        fast.append("    m.release()")
    fast.append("    return out")

    observe = [
        "def observe(s, txn):",
        "    size = len(s)",
        "    if size < 2: return general(s, txn)",  # a new or widened key
        f"    n = (size - 1) // {width}",
        f"    rel = txn.ts_ms - s[0] * {MINUTE_MS} - {plan.bias}",
        "    if rel < s[n]: return general(s, txn)",
    ]
    if plan.code == "i":
        observe.append(f"    if rel >= {INT_LIMIT}: return general(s, txn)")
    for j, field in enumerate(plan.fields):
        observe.append(f"    v{j} = txn.{field}")
        if j < len(plan.num_fields):
            scale = plan.scales[j]
            missing = f"a{j} = {MISSING}" if plan.nullable[j] else "return general(s, txn)"
            observe += [
                f"    if v{j} is None: {missing}",
                "    else:",
                f"        a{j} = round(v{j} * {scale})",
                f"        if a{j} / {scale} != v{j} or not -{INT_LIMIT} < a{j} < {INT_LIMIT}:"
                " return general(s, txn)",
            ]
        else:
            observe.append(
                f"    a{j} = 0 if v{j} is None else ((crc32(v{j}.encode()) or 1) ^ {BIAS}) - {BIAS}"
            )
    # Insert each column's value at the end of its segment, last segment first.
    cols = len(plan.fields)
    for j in range(cols - 1, -1, -1):
        observe.append(f"    s.append(a{j})" if j == cols - 1 else f"    s.insert(1 + {j + 2} * n, a{j})")
    observe.append("    s.insert(1 + n, rel)")
    observe += ["    idx = n", "    n += 1", f"    if n == {PRESIZE_AT}: presize(s)"]
    if summed:
        observe.append("    if s.prefix is not None:")
        observe.append(f"        if (n + s.prefix.shift) % {block} == 0: extend_prefix(s, n)")
        observe.append(f"    elif n >= {plan.prefix_min}: build_prefix(s, n, {tuple(summed)}, {block})")
    observe += reads
    # Eviction inline: in an in-order append the newest event is this one, at position n. A
    # short key drops each event as it expires; a long one (hot merchant) once n/32 have, since
    # every deletion moves the whole buffer. Expired events left in place are outside every
    # window of an in-order event, and a late event drops them before it reads the state.
    R = plan.retention_ms
    observe += [
        f"    if s[1 + (n >> {plan.lazy_shift} if n >= {plan.lazy_min} else 0)] <= rel - {R}:",
        *(["        m = memoryview(s)"] if plan.kernel is not None else []),
        f"        k = bisect_right(m, rel - {R}, 1, n) - 1",
        "        m.release()",
        *[f"        del s[1 + {seg} * n:1 + {seg} * n + k]" for seg in range(width - 1, -1, -1)],
        f"        if s.prefix is not None: shrink_prefix(s, n - k, k, {block})",
        *(["    else:", "        m.release()"] if plan.kernel is None else []),
        "    if s.labels is not None:",
        f"        evict_labels(s, s[0] * {MINUTE_MS} + {plan.bias} + rel - {R})",
        "    return out, False",
    ]

    scope: dict[str, Any] = {
        "bisect_right": bisect_right, "NAN": NAN, "crc32": zlib.crc32, "plan": plan,
        "general": plan.observe_general, "build_prefix": buffer.build_prefix,
        "evict_labels": buffer.evict_labels, "shrink_prefix": buffer.shrink_prefix,
        "wsum": buffer.window_sum, "presize": buffer.presize, "kernel": plan.kernel,
        "program": kernel_program(plan) if plan.kernel is not None else b"",
    }  # fmt: skip
    # Features left to their reference function call it as `ref<k>` (k: the feature's position).
    scope.update((f"ref{k}", AGGREGATIONS[agg].reference) for k, (agg, *_) in enumerate(plan.steps))
    # A long key's block sums gain a block when its last one fills (`observe` and the compiled
    # append both call this).
    extend = ["def extend_prefix(s, n):", *(
        f"    q = s.prefix.sums[{j}]; q.append(q[-1] + sum(s[{j + 2} * n + 1 - {block}:{j + 2} * n + 1]))"
        for j in summed
    )] if summed else []  # fmt: skip
    exec("\n".join(extend), scope)
    exec("\n".join(fast), scope)
    exec("\n".join(observe), scope)
    return scope["fast"], _compiled_observe(plan, scope) or scope["observe"]


def _compiled_observe(plan: Layout, scope: dict[str, Any]) -> Observe | None:
    """`observe` compiled (`features._kernel.Appender`), which hands what is not its fast path to
    the generated `observe`; None where the window reads are not compiled."""
    from features import aggregations  # read now: tests build plans with and without the kernel

    if plan.kernel is None or aggregations.APPENDER is None or len(plan.fields) > MAX_COLUMNS:
        return None
    numeric = len(plan.num_fields)
    header = [
        8 if plan.code == "q" else 4, plan.width, plan.bias, int(plan.code == "i"), INT_LIMIT,
        plan.retention_ms, plan.lazy_shift, plan.lazy_min, PRESIZE_AT, plan.prefix_min, plan.block,
        len(plan.fields),
    ]  # fmt: skip
    for j in range(len(plan.fields)):
        header += [0, plan.scales[j], int(plan.nullable[j])] if j < numeric else [1, 0, 0]
    observe: Observe = aggregations.APPENDER(
        array("q", header).tobytes(), ("ts_ms", *plan.fields), scope["program"], buffer.presize,
        buffer.build_prefix, scope.get("extend_prefix"), buffer.shrink_prefix, buffer.evict_labels,
        tuple(plan.summed), scope["observe"],
    )  # fmt: skip
    return observe


def _reference_call(k: int, step: Step, start: str) -> str:
    """The call of feature k's reference function, its window starting at index `start`."""
    _, j, w, delay = step
    return f"ref{k}(plan, s, n, s, idx, rel, {start}, {j}, {w}, {delay})"


def _kernel_reads(plan: Layout) -> list[str]:
    """One kernel call reads every window; what it leaves to Python comes back as the window's
    first index and is computed by the feature's reference function."""
    return ["    out = kernel(s, n, idx, rel, program, s.prefix, s.labels)"] + [
        f"    out[{k}] = {_reference_call(k, plan.steps[k], f'int(out[{k}])')}"
        for k, (op, *_) in enumerate(kernel_ops(plan))
        if op == KERNEL_PYTHON
    ]


def _python_reads(plan: Layout) -> list[str]:
    """The same reads inlined in Python from the aggregations' templates. They leave the
    memoryview `m` open: `fast` releases it, and `observe` releases it around its eviction."""
    steps = plan.steps
    inline = [
        AGGREGATIONS[agg].template is not None and _fast_path(plan, agg, j, w) for agg, j, w, _ in steps
    ]
    shares = [AGGREGATIONS[agg].shared if inline[k] else None for k, (agg, *_) in enumerate(steps)]
    # Binary searches go through a memoryview: on an array subclass `bisect` pays a Python-level
    # __getitem__ per probe; the view is released before the buffer is resized.
    body = ["    end = idx + 1", "    pre = s.prefix", "    m = memoryview(s)"]
    body += [f"    st{w} = bisect_right(m, rel - {w}, 1, end) - 1" for w in plan.windows]
    used = sorted({j for _, j, _, _ in steps if j >= 0})
    body += [f"    o{j} = 1 + {j + 1} * n" for j in used]
    # Nested windows share work: a longer window's sum (or max/min) extends the next shorter
    # one's over the events between their starts, so each event is read once, not per window.
    for j in plan.summed:
        ws = sorted({w for e, (_, jj, w, _) in zip(shares, steps, strict=True) if e == "sum" and jj == j})
        scale = plan.scales[j]
        if not ws:
            continue
        body.append("    if pre is not None:")
        body += [
            f"        t{j}_{w} = wsum(s, pre, {j}, o{j}, st{w}, end, {plan.block}) / {scale}" for w in ws
        ]
        body.append("    else:")
        for k, w in enumerate(ws):
            upto = "end" if k == 0 else f"st{ws[k - 1]}"
            body.append(f"        r = {'' if k == 0 else 'r + '}sum(s[o{j} + st{w}:o{j} + {upto}])")
            body.append(f"        t{j}_{w} = r / {scale}")
    extremes = sorted({(e, j) for e, (_, j, _, _) in zip(shares, steps, strict=True) if e in ("max", "min")})
    for ext, j in extremes:
        ws = sorted({w for e, (_, jj, w, _) in zip(shares, steps, strict=True) if e == ext and jj == j})
        for k, w in enumerate(ws):
            if k == 0:
                body.append(f"    {ext}{j}_{w} = {ext}(s[o{j} + st{w}:o{j} + end])")
            else:
                prev = f"{ext}{j}_{ws[k - 1]}"
                body.append(f"    seg = s[o{j} + st{w}:o{j} + st{ws[k - 1]}]")
                body.append(f"    {ext}{j}_{w} = {ext}({prev}, {ext}(seg)) if seg else {prev}")
    exprs = []
    for k, (agg, j, w, delay) in enumerate(steps):
        template = AGGREGATIONS[agg].template
        if not inline[k] or template is None:
            exprs.append(_reference_call(k, (agg, j, w, delay), f"st{w}" if w in plan.windows else "0"))
            continue
        shared = {"sum": f"t{j}_{w}", "max": f"max{j}_{w}", "min": f"min{j}_{w}", None: ""}[shares[k]]
        scale = plan.scales[j] if 0 <= j < len(plan.num_fields) else 1
        exprs.append(
            template.format(
                start=f"st{w}", col=f"o{j}", scale=scale, lookback=plan.lookback_ms, shared=shared
            )
        )
    return [*body, "    out = [" + ", ".join(exprs) + "]"]
