"""The generated hot path of an `EntityPlan`: straight-line Python per declared feature set.

`compile_plan` writes two functions for a plan's integer buffers, from its declaration: `fast`
computes the features of one event, and `append` is the whole in-order hot path (encode, insert,
read the windows, evict). `kernel_program` encodes the plan for the compiled window reads
(`features/_kernel.c`). The layout and the general path they fall back to are in `features.state`.
"""

from __future__ import annotations

import zlib
from array import array
from bisect import bisect_right
from typing import TYPE_CHECKING, Any

from features.state import (
    BIAS,
    INT_LIMIT,
    KERNEL_OPS,
    KERNEL_PYTHON,
    MINUTE_MS,
    MISSING,
    NAN,
    PRESIZE_AT,
    presize,
    window_sum,
)

if TYPE_CHECKING:
    from features.state import EntityPlan


def kernel_ops(plan: EntityPlan) -> list[tuple[int, int, int, int, int]]:
    """Per feature: (op, column, window index or -1, scale, lookback) for the kernel."""
    ints = plan.ints
    ops = []
    for agg, j, w, _ in plan._steps:
        win = plan.windows.index(w) if w in plan.windows else -1
        op = KERNEL_OPS.get(agg, KERNEL_PYTHON)
        if agg in ("sum", "mean", "max", "min") and j not in ints:
            op = KERNEL_PYTHON
        if win < 0 and agg != "time_since_last":
            op = KERNEL_PYTHON
        scale = plan.scales[j] if 0 <= j < len(plan.num_fields) else 1
        ops.append((op, j, win, scale, plan.lookback_ms))
    return ops


def kernel_program(plan: EntityPlan) -> bytes:
    """This plan for `features._kernel.window_features` (the format is in its source)."""
    words = [8 if plan.code == "q" else 4, plan.block, len(plan.windows), *plan.windows, len(plan._steps)]
    for op in kernel_ops(plan):
        words += op
    return array("q", words).tobytes()


def compile_plan(plan: EntityPlan) -> tuple[Any, Any]:
    """Straight-line Python for this plan's integer buffers: `fast(s, n, idx, rel)` computes the
    features of the event at `idx`; `append(s, txn)` is the whole in-order hot path (append,
    features, evict).

    Counts, sums, means, max/min over scaled-integer columns, distinct counts and time since
    last are read by the kernel in one call when it is built (`_kernel_reads`), else inlined
    (`_python_reads`); other aggregations call `_feature`. A widened key takes `_compute`, and
    anything but an in-order append of exactly storable values takes `_observe`.
    """
    width, summed = plan.width, plan.summed
    # `reads` computes `out` from (s, n, idx, rel); it is the body of `fast` and part of `append`.
    reads = _kernel_reads(plan) if plan.kernel is not None else _python_reads(plan)
    fast = ["def fast(s, n, idx, rel):", *reads]
    if plan.kernel is None:
        fast.append("    m.release()")
    fast.append("    return out")

    append = [
        "def append(s, txn):",
        "    size = len(s)",
        "    if size < 2: return general(s, txn)",  # a new or widened key
        f"    n = (size - 1) // {width}",
        f"    rel = txn.ts_ms - s[0] * {MINUTE_MS} - {plan.bias}",
        "    if rel < s[n]: return general(s, txn)",
    ]
    if plan.code == "i":
        append.append(f"    if rel >= {INT_LIMIT}: return general(s, txn)")
    for j, field in enumerate(plan.fields):
        append.append(f"    v{j} = txn.{field}")
        if j < len(plan.num_fields):
            scale = plan.scales[j]
            missing = f"a{j} = {MISSING}" if plan.nullable[j] else "return general(s, txn)"
            append += [
                f"    if v{j} is None: {missing}",
                "    else:",
                f"        a{j} = round(v{j} * {scale})",
                f"        if a{j} / {scale} != v{j} or not -{INT_LIMIT} < a{j} < {INT_LIMIT}:"
                " return general(s, txn)",
            ]
        else:
            append.append(
                f"    a{j} = 0 if v{j} is None else ((crc32(v{j}.encode()) or 1) ^ {BIAS}) - {BIAS}"
            )
    # Insert each column's value at the end of its segment, last segment first.
    cols = len(plan.fields)
    for j in range(cols - 1, -1, -1):
        append.append(f"    s.append(a{j})" if j == cols - 1 else f"    s.insert(1 + {j + 2} * n, a{j})")
    append.append("    s.insert(1 + n, rel)")
    append += ["    idx = n", "    n += 1", f"    if n == {PRESIZE_AT}: presize(s)"]
    if summed:
        # A long key's block sums gain a block each time its last one fills.
        b = plan.block
        append.append("    if s.prefix is not None:")
        append.append(f"        if (n + s.prefix.shift) % {b} == 0:")
        append += [
            f"            q = s.prefix.sums[{j}]; q.append(q[-1] + sum(s[{j + 2} * n + 1 - {b}:{j + 2} * n + 1]))"
            for j in summed
        ]
        append.append(f"    elif n >= {plan.prefix_min}: build_prefix(s, n)")
    append += reads
    # Eviction inline: in an in-order append the newest event is this one, at position n. A
    # short key drops each event as it expires; a long one (hot merchant) once n/32 have, since
    # every deletion moves the whole buffer. Expired events left in place are outside every
    # window of an in-order event, and a late event drops them before it reads the state.
    R = plan.retention_ms
    append += [
        f"    if s[1 + (n >> {plan.lazy_shift} if n >= {plan.lazy_min} else 0)] <= rel - {R}:",
        *(["        m = memoryview(s)"] if plan.kernel is not None else []),
        f"        k = bisect_right(m, rel - {R}, 1, n) - 1",
        "        m.release()",
        *[f"        del s[1 + {seg} * n:1 + {seg} * n + k]" for seg in range(width - 1, -1, -1)],
        "        if s.prefix is not None: shrink_prefix(s, n - k, k)",
        *(["    else:", "        m.release()"] if plan.kernel is None else []),
        "    if s.labels is not None:",
        f"        evict_labels(s, s[0] * {MINUTE_MS} + {plan.bias} + rel - {R})",
        "    return out, False",
    ]

    scope: dict[str, Any] = {
        "bisect_right": bisect_right, "NAN": NAN, "crc32": zlib.crc32,
        "feature": plan._feature, "steps": plan._steps, "general": plan._observe,
        "build_prefix": plan._build_prefix, "evict_labels": plan._evict_labels,
        "shrink_prefix": plan._shrink_prefix, "wsum": window_sum, "presize": presize,
        "kernel": plan.kernel, "program": kernel_program(plan) if plan.kernel is not None else b"",
    }  # fmt: skip
    exec("\n".join(fast), scope)
    exec("\n".join(append), scope)
    return scope["fast"], scope["append"]


def _kernel_reads(plan: EntityPlan) -> list[str]:
    """One kernel call reads every window; what it leaves to Python comes back as the window's
    first index and is computed by `_feature`."""
    return ["    out = kernel(s, n, idx, rel, program, s.prefix)"] + [
        f"    out[{k}] = feature(s, n, s, idx, rel, int(out[{k}]), *steps[{k}])"
        for k, (op, *_) in enumerate(kernel_ops(plan))
        if op == KERNEL_PYTHON
    ]


def _python_reads(plan: EntityPlan) -> list[str]:
    """The same reads inlined in Python. They leave the memoryview `m` open: `fast` releases it,
    and `append` releases it around its eviction."""
    steps, ints = plan._steps, plan.ints
    # Binary searches go through a memoryview: on an array subclass `bisect` pays a Python-level
    # __getitem__ per probe (3x slower); the view is released before the buffer is resized.
    body = ["    end = idx + 1", "    pre = s.prefix", "    m = memoryview(s)"]
    body += [f"    st{w} = bisect_right(m, rel - {w}, 1, end) - 1" for w in plan.windows]
    used = sorted({j for agg, j, _, _ in steps if j >= 0})
    body += [f"    o{j} = 1 + {j + 1} * n" for j in used]
    # Nested windows share work: a longer window's sum (or max/min) extends the next shorter
    # one's over the events between their starts, so each event is read once, not per window.
    for j in plan.summed:
        ws, scale = (
            sorted({w for agg, jj, w, _ in steps if jj == j and agg in ("sum", "mean")}),
            plan.scales[j],
        )
        body.append("    if pre is not None:")
        body += [
            f"        t{j}_{w} = wsum(s, pre, {j}, o{j}, st{w}, end, {plan.block}) / {scale}" for w in ws
        ]
        body.append("    else:")
        for k, w in enumerate(ws):
            upto = "end" if k == 0 else f"st{ws[k - 1]}"
            body.append(f"        r = {'' if k == 0 else 'r + '}sum(s[o{j} + st{w}:o{j} + {upto}])")
            body.append(f"        t{j}_{w} = r / {scale}")
    extremes = sorted({(a, j) for a, j, _, _ in steps if a in ("max", "min") and j in ints})
    for ext, j in extremes:
        ws = sorted({w for a, jj, w, _ in steps if a == ext and jj == j})
        for k, w in enumerate(ws):
            if k == 0:
                body.append(f"    {ext}{j}_{w} = {ext}(s[o{j} + st{w}:o{j} + end])")
            else:
                prev = f"{ext}{j}_{ws[k - 1]}"
                body.append(f"    seg = s[o{j} + st{w}:o{j} + st{ws[k - 1]}]")
                body.append(f"    {ext}{j}_{w} = {ext}({prev}, {ext}(seg)) if seg else {prev}")
    exprs = []
    for k, (agg, j, w, _) in enumerate(steps):
        if agg == "count":
            exprs.append(f"float(end - st{w})")
        elif agg == "sum":
            exprs.append(f"t{j}_{w}")
        elif agg == "mean":
            exprs.append(f"t{j}_{w} / (end - st{w})")
        elif agg in ("max", "min") and j in ints:
            exprs.append(f"{agg}{j}_{w} / {plan.scales[j]}")
        elif agg == "distinct" and w in plan.windows:  # categorical hashes; 0 = absent
            exprs.append(f"float(len(set(s[o{j} + st{w}:o{j} + end]).difference((0,))))")
        elif agg == "time_since_last":
            exprs.append(f"((rel - s[idx]) / 1000.0 if idx and s[idx] > rel - {plan.lookback_ms} else NAN)")
        else:
            start = f"st{w}" if w in plan.windows else "0"
            exprs.append(f"feature(s, n, s, idx, rel, {start}, *steps[{k}])")
    return [*body, "    out = [" + ", ".join(exprs) + "]"]
