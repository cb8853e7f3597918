"""`fraud top`: a live view of a running flow in the terminal, refreshed every `--interval` seconds.

Two read-only sources, each allowed to fail on its own without stopping the view:

- the flow's Prometheus endpoint (`fraud run` serves it with FRAUD_METRICS_PORT): throughput and
  alerts per second from counter deltas between the last two scrapes, end-to-end latency
  percentiles from the histogram's bucket deltas over `--window` seconds (what PromQL's
  `histogram_quantile(q, rate(…_bucket[window]))` computes), dead letters by reason, labels joined
  and learned, drift events, the model served and the one shadowed;
- the alerts stream (FRAUD_ALERTS_STREAM): its newest entries by XREVRANGE. Never a consumer group
  read or an XACK: watching takes nothing away from `fraud alerts`.

Stream content is untrusted: every field shown goes through `fraud.display` (control characters
escaped, each field capped) and every line is cut to the terminal's width, so no entry can move the
cursor, clear the screen or push the layout around. `render` (samples and alerts -> lines) is a pure
function; `watch` scrapes, renders and redraws with plain ANSI sequences.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
import unicodedata
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, TextIO

import typer

from fraud.display import cap, decode, escape, loads, show

LATENCY = "fraud_end_to_end_latency_seconds"
QUANTILES = (0.5, 0.95, 0.99)
# Caps of the alert columns: short enough that a line of the newest alerts fits a wide terminal.
TXN_CAP = 40
TS_CAP = 32
MODEL_CAP = 32
REASON_CAP = 60
ERROR_CAP = 300
# The flow's page is some 30 KiB; a URL that serves far more is not it.
MAX_PAGE_BYTES = 16 * 2**20
# A terminal narrower than this still gets lines of this length (it wraps them).
MIN_WIDTH = 40

SeriesKey = tuple[str, tuple[tuple[str, str], ...]]
RawAlert = tuple[Any, Mapping[Any, Any]]  # (entry id, fields) as XREVRANGE returns them


@dataclass(frozen=True)
class Snapshot:
    """One scrape of the metrics endpoint: sample name + labels -> value, at `at` seconds
    (a monotonic clock: only differences between snapshots matter)."""

    at: float
    samples: Mapping[SeriesKey, float]

    def get(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, tuple(sorted(labels.items()))))

    def series(self, name: str) -> list[tuple[dict[str, str], float]]:
        """Every sample called `name`, with its labels."""
        return [(dict(labels), v) for (n, labels), v in self.samples.items() if n == name]

    def total(self, name: str) -> float | None:
        """The sum over every label set of `name`; None when the endpoint has no such sample."""
        values = [v for _, v in self.series(name)]
        return math.fsum(values) if values else None


def parse_metrics(text: str, at: float) -> Snapshot:
    """A snapshot of Prometheus' text exposition format; ValueError when it is not that format."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[SeriesKey, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    except (TypeError, IndexError, KeyError) as exc:  # the parser's other ways to fail on garbage
        raise ValueError(f"not a metrics page: {type(exc).__name__}: {exc}") from exc
    return Snapshot(at, samples)


def increase(new: float | None, old: float | None) -> float | None:
    """How much a counter grew from `old` to `new`; a counter that went down was reset (the flow
    restarted), so all of `new` is growth, as PromQL's `increase` counts it."""
    if new is None:
        return None
    if old is None or new < old:
        return new
    return new - old


def rate(new: Snapshot, old: Snapshot | None, name: str, **labels: str) -> float | None:
    """Per second growth of one counter between two snapshots (summed over labels when none are given)."""
    if old is None or new.at <= old.at:
        return None
    pick = (lambda s: s.get(name, **labels)) if labels else (lambda s: s.total(name))
    grown = increase(pick(new), pick(old))
    return None if grown is None else grown / (new.at - old.at)


def _bound(le: str) -> float:
    return math.inf if le in ("+Inf", "Inf", "inf") else float(le)


def buckets(snapshot: Snapshot, name: str) -> list[tuple[float, float]]:
    """`(upper bound, cumulative count)` of a histogram (labels other than `le` summed), sorted."""
    by_bound: dict[float, float] = {}
    for labels, value in snapshot.series(f"{name}_bucket"):
        if "le" in labels:
            with contextlib.suppress(ValueError):
                bound = _bound(labels["le"])
                by_bound[bound] = by_bound.get(bound, 0.0) + value
    return sorted(by_bound.items())


def bucket_increase(new: Snapshot, old: Snapshot | None, name: str) -> list[tuple[float, float]]:
    """The histogram's buckets as observed between two snapshots (all of `new` when `old` is None
    or the histogram was reset in between)."""
    now = buckets(new, name)
    if old is None:
        return now
    before = dict(buckets(old, name))
    grown = [(le, count - before.get(le, 0.0)) for le, count in now]
    return now if any(count < 0 for _, count in grown) else grown


def histogram_quantile(q: float, cumulative: Sequence[tuple[float, float]]) -> float | None:
    """The q-quantile of cumulative `(upper bound, count)` buckets, interpolated linearly inside
    the bucket it falls in, as Prometheus' `histogram_quantile` does: the first bucket starts at 0,
    and a quantile in the +Inf bucket is the highest finite bound. None without observations."""
    if len(cumulative) < 2 or not math.isinf(cumulative[-1][0]):
        return None
    counts: list[float] = []
    for _, count in cumulative:  # as Prometheus does: cumulative counts never go down
        counts.append(max(count, counts[-1]) if counts else count)
    total = counts[-1]
    if total <= 0:
        return None
    rank = q * total
    b = next(i for i, count in enumerate(counts) if count >= rank)
    if b == len(counts) - 1:
        return cumulative[-2][0]
    upper = cumulative[b][0]
    if b == 0 and upper <= 0:
        return upper
    lower, below = (cumulative[b - 1][0], counts[b - 1]) if b > 0 else (0.0, 0.0)
    in_bucket = counts[b] - below
    if in_bucket <= 0:
        return upper
    return lower + (upper - lower) * (rank - below) / in_bucket


@dataclass(frozen=True)
class View:
    """Everything one frame shows. `now` and `last` are the two latest scrapes (rates), `since`
    the oldest one inside the latency window; `alerts` the newest alerts, newest first."""

    metrics_url: str | None
    stream: str
    interval_s: float
    now: Snapshot | None = None
    last: Snapshot | None = None
    since: Snapshot | None = None
    metrics_error: str | None = None
    alerts: Sequence[RawAlert] = ()
    alerts_in_stream: int | None = None
    redis_error: str | None = None
    clock: str = ""  # wall-clock time of the frame, for the title line


def _count(value: float | None) -> str:
    return "?" if value is None else f"{value:,.0f}"


def _per_s(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f}/s" if value >= 10 or value == 0 else f"{value:,.2f}/s"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.3g} ms"
    return f"{value:.3g} s"


def _span(seconds: float) -> str:
    return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"


def _float(value: Any, spec: str) -> str:
    try:
        number = float(decode(value))
    except (TypeError, ValueError, OverflowError):
        return "?"
    return format(number, spec) if math.isfinite(number) else "?"


def top_reason(raw: Any) -> str:
    """The first of an alert's reasons (`feature=value (contribution)`, or the rule that fired)."""
    if raw is None:
        return "?"
    try:
        reasons = loads(decode(raw))
    except ValueError:
        return "?"
    if not isinstance(reasons, list):
        return "?"
    if not reasons:
        return "none"
    first = reasons[0]
    if not isinstance(first, dict):
        return "?"

    def name(value: Any) -> str:
        return show(value, REASON_CAP) if isinstance(value, str) and value else "?"

    if "rule" in first:
        return f"rule {name(first.get('rule'))} ({name(first.get('action'))})"
    value = first.get("value")
    shown = "na" if value is None else _float(value, ".4g")
    return f"{name(first.get('feature'))}={shown} ({_float(first.get('contribution'), '+.3f')})"


def _written(entry_id: str) -> str:
    """Local wall-clock time an entry was added, from its id (`<ms>-<seq>`); ? for anything else."""
    ms, dash, _ = entry_id.partition("-")
    if not dash or not ms.isdigit() or len(ms) > 15:
        return "?"
    return time.strftime("%H:%M:%S", time.localtime(int(ms) / 1000))


def alert_line(entry_id: Any, fields: Mapping[Any, Any]) -> str:
    """One row of the newest alerts: written, event time, txn, score, model, top reason."""
    f = {decode(k): v for k, v in (fields or {}).items()}
    return (
        f"  {_written(decode(entry_id))}  {show(f.get('ts'), TS_CAP):<29}  "
        f"{show(f.get('txn_id'), TXN_CAP):<14}  {_float(f.get('score'), '.3f'):>6}  "
        f"{show(f.get('model_version'), MODEL_CAP):<28}  {top_reason(f.get('reasons'))}"
    )


def _columns(ch: str) -> int:
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def fit(line: str, width: int) -> str:
    """`line` cut to `width` terminal columns (an ellipsis marks the cut). A wide character (CJK,
    most emoji) takes two columns, so that no line of stream data wraps onto the next row."""
    width = max(width, MIN_WIDTH)
    if line.isascii():
        return line if len(line) <= width else line[: width - 1] + "…"
    if sum(map(_columns, line)) <= width:
        return line
    kept, used = [], 0
    for ch in line:
        used += _columns(ch)
        if used > width - 1:  # one column left for the ellipsis
            break
        kept.append(ch)
    return "".join(kept) + "…"


def _metrics_lines(view: View) -> Iterator[str]:
    now, last, since = view.now, view.last, view.since
    if now is None:
        if view.metrics_url is None:
            yield (
                "metrics    off: set FRAUD_METRICS_PORT (the port `fraud run` serves /metrics on) "
                "or pass --metrics URL"
            )
        else:
            why = f" ({escape(view.metrics_error)})" if view.metrics_error else ""
            yield f"waiting for metrics at {escape(view.metrics_url)}{why}"
        return
    if view.metrics_error:  # the last scrape failed: the numbers below are from an earlier one
        yield (
            f"waiting for metrics at {escape(view.metrics_url or '?')} ({escape(view.metrics_error)}); "
            "the numbers below are from the last scrape that worked"
        )

    model = next((labels for labels, v in now.series("fraud_model_info") if v), None)
    if model is None:
        yield "model      ? (no fraud_model_info yet)"
    else:
        shadow = show(model.get("shadow"), MODEL_CAP, missing="none")
        schema = show(model.get("schema_hash"), 16)
        yield f"model      {show(model.get('version'), 64)}  (schema {schema})   shadow: {shadow}"

    txns, alerts = now.total("fraud_transactions_total"), now.total("fraud_alerts_total")
    yield (
        f"throughput {_per_s(rate(now, last, 'fraud_transactions_total'))} txn   "
        f"alerts {_per_s(rate(now, last, 'fraud_alerts_total'))}   "
        f"(since start: {_count(txns)} txn, {_count(alerts)} alerts)"
    )

    window = bucket_increase(now, since, LATENCY)
    observed = window[-1][1] if window and math.isinf(window[-1][0]) else 0.0
    span = "since start" if since is None else f"last {_span(now.at - since.at)}"
    if observed > 0:
        parts = "   ".join(f"p{round(q * 100)} {_seconds(histogram_quantile(q, window))}" for q in QUANTILES)
        yield f"latency    {parts}   (end to end, {span}, {_count(observed)} decisions)"
    else:
        yield f"latency    - (no decisions, {span})"

    joined, frauds = now.total("fraud_labels_total"), now.get("fraud_labels_total", is_fraud="true")
    learned = now.total("fraud_online_labels_learned_total")
    yield (
        f"labels     {_count(joined)} joined ({_count(frauds)} fraud) {_per_s(rate(now, last, 'fraud_labels_total'))}"
        f"   learned by River: {_count(learned)} {_per_s(rate(now, last, 'fraud_online_labels_learned_total'))}"
    )

    by_reason: dict[str, tuple[float, float, set[str]]] = {}  # reason -> (total, grown, kinds)
    for labels, value in now.series("fraud_dead_letters_total"):
        reason, kind = labels.get("reason", "?"), labels.get("kind", "?")
        before = last.get("fraud_dead_letters_total", **labels) if last is not None else None
        total, grown, kinds = by_reason.get(reason, (0.0, 0.0, set()))
        if value > 0:
            kinds.add(kind)
        by_reason[reason] = (total + value, grown + (increase(value, before) or 0.0), kinds)
    dead = math.fsum(total for total, _, _ in by_reason.values())
    dt = now.at - last.at if last is not None and now.at > last.at else None
    dead_rate = rate(now, last, "fraud_dead_letters_total")
    yield f"dead       {_count(dead)} dead letters {_per_s(dead_rate)}" + (":" if dead else "")
    for reason, (total, grown, kinds) in sorted(by_reason.items(), key=lambda kv: (-kv[1][0], kv[0])):
        if total > 0:
            per_s = grown / dt if dt else None
            yield f"  {show(reason, 32):<16} {_count(total):>10}  {_per_s(per_s):>10}  ({', '.join(show(k, 16) for k in sorted(kinds))})"

    drift = {
        (labels.get("kind", "?"), labels.get("state", "?")): v
        for labels, v in now.series("fraud_drift_events_total")
    }
    drift_rate = rate(now, last, "fraud_drift_events_total")
    events = [
        f"{show(kind, 16)} {show(state, 16)} {_count(v)}"
        for (kind, state), v in sorted(drift.items())
        if v > 0
    ]
    yield f"drift      {', '.join(events) if events else 'no events'}   {_per_s(drift_rate)}"

    lags = [v for _, v in now.series("fraud_source_lag_seconds")]
    lag = f"{max(lags):.3g} s (worst of {len(lags)} shard{'s' if len(lags) > 1 else ''})" if lags else "-"
    yield (
        f"backlog    source lag {lag}   awaiting labels {_count(now.get('fraud_pending_transactions'))}"
        f"   late {_count(now.total('fraud_late_events_total'))}"
        # Labelled counters without a sample yet are absent from the page: nothing counted so far.
        f"   redis retries {_count(now.total('fraud_redis_errors_total') or 0.0)}"
    )


def render(view: View, width: int = 160) -> list[str]:
    """The frame for `view`: one line per item, each cut to `width` characters. Pure."""
    where = escape(view.metrics_url) if view.metrics_url else "no metrics"
    lines = [f"fraud top  {view.clock}  {where}  every {view.interval_s:g} s  (Ctrl-C or q quits)", ""]
    lines += _metrics_lines(view)
    lines.append("")
    in_stream = "" if view.alerts_in_stream is None else f" ({view.alerts_in_stream:,} in the stream)"
    lines.append(f"newest alerts in {escape(view.stream)}{in_stream}")
    if view.redis_error is not None:
        lines.append(f"  redis: {escape(view.redis_error)} (retrying every {view.interval_s:g} s)")
    elif not view.alerts:
        lines.append("  none yet")
    else:
        lines.append(
            f"  {'written':<8}  {'event time':<29}  {'txn':<14}  {'score':>6}  {'model':<28}  top reason"
        )
        for entry_id, fields in view.alerts:
            try:
                lines.append(alert_line(entry_id, fields))
            except Exception as exc:  # never expected: one entry must not take the view down
                lines.append(f"  {show(entry_id, 64)}  unprintable entry ({type(exc).__name__})")
    return [fit(line, width) for line in lines]


def _error(exc: BaseException) -> str:
    """`Type: message`, capped (a parse error may quote a line of the page); escaped when shown."""
    text = cap(str(exc).strip(), ERROR_CAP)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass
class Scraper:
    """The metrics history a frame needs: the snapshots of the last `window_s` seconds (at least
    the two latest), and why the last scrape failed."""

    url: str | None
    window_s: float
    timeout_s: float
    history: deque[Snapshot] = field(default_factory=deque)
    error: str | None = None

    def scrape(self) -> None:
        if self.url is None:
            return
        import urllib.request

        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout_s) as response:
                page = response.read(MAX_PAGE_BYTES + 1)
            if len(page) > MAX_PAGE_BYTES:
                raise ValueError(f"the page is over {MAX_PAGE_BYTES // 2**20} MiB: not the flow's metrics")
            body = page.decode("utf-8", errors="replace")
            snapshot = parse_metrics(body, time.monotonic())
        except (OSError, ValueError) as exc:  # refused, timed out, HTTP error, not a metrics page
            self.error = _error(exc)
            return
        self.error = None
        self.history.append(snapshot)
        while len(self.history) > 2 and self.history[1].at <= snapshot.at - self.window_s:
            self.history.popleft()

    def frame(self) -> dict[str, Any]:
        """The View fields about metrics."""
        h = self.history
        return {
            "now": h[-1] if h else None,
            "last": h[-2] if len(h) > 1 else None,
            "since": h[0] if len(h) > 1 else None,
            "metrics_error": self.error,
        }


@dataclass
class AlertReader:
    """The newest alerts (XREVRANGE, read-only) and the stream's length; reconnects after a failure."""

    stream: str
    count: int
    timeout_s: float
    client: Any = None
    error: str | None = None

    def read(self) -> tuple[list[RawAlert], int | None]:
        import redis

        try:
            if self.client is None:
                self.client = self._connect()
            entries = list(self.client.xrevrange(self.stream, count=self.count) or []) if self.count else []
            total = int(self.client.xlen(self.stream))
        except (redis.RedisError, OSError, RuntimeError) as exc:  # RuntimeError: no embedded server
            self.error = _error(exc)
            self.close()
            return [], None
        self.error = None
        return entries, total

    def _connect(self) -> Any:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        from service.redis_client import connect
        from service.redis_server import redis_url
        from service.settings import get_settings

        return connect(
            redis_url(get_settings()),
            socket_timeout=self.timeout_s,
            socket_connect_timeout=self.timeout_s,
            retry_on_timeout=False,
            retry=Retry(NoBackoff(), 0),  # a viewer retries on its next refresh, not in between
        )

    def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
            self.client = None


class Screen:
    """Where frames go: a terminal is redrawn in place (alternate screen, cursor hidden, `q` read
    without Enter); anything else gets each frame appended, a blank line between frames."""

    def __init__(self, out: TextIO, inp: TextIO | None, live: bool) -> None:
        self.out = out
        self.live = live and out.isatty()
        self.keys_fd: int | None = None
        self.frames = 0
        self._saved: Any = None
        if self.live and inp is not None:
            with contextlib.suppress(Exception):  # no tty on stdin, or no termios (not POSIX)
                import termios
                import tty

                if inp.isatty():
                    fd = inp.fileno()
                    self._saved = termios.tcgetattr(fd)
                    tty.setcbreak(fd)  # keys arrive one by one; Ctrl-C still interrupts
                    self.keys_fd = fd

    def __enter__(self) -> Screen:
        if self.live:
            self._write("\x1b[?1049h\x1b[?25l")  # alternate screen, hide the cursor
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self._write("\x1b[?25h\x1b[?1049l")
        if self.keys_fd is not None:
            import termios

            with contextlib.suppress(Exception):
                termios.tcsetattr(self.keys_fd, termios.TCSADRAIN, self._saved)

    def size(self) -> tuple[int, int]:
        import shutil

        columns, rows = shutil.get_terminal_size((160, 50))
        return columns, rows

    def show(self, lines: list[str]) -> None:
        if self.live:
            rows = self.size()[1]
            body = "\x1b[K\n".join(lines[: max(rows - 1, 1)])
            self._write(f"\x1b[H{body}\x1b[K\x1b[J")
        else:  # frames one after another, a blank line between them
            self._write(("\n" if self.frames else "") + "\n".join(lines) + "\n")
        self.frames += 1

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True when the user pressed q."""
        deadline = time.monotonic() + seconds
        if self.keys_fd is None:
            time.sleep(max(seconds, 0.0))
            return False
        import os
        import select

        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.keys_fd], [], [], left)
            if ready:
                keys = os.read(self.keys_fd, 64)
                if not keys or b"q" in keys.lower():
                    return True
        return False

    def _write(self, text: str) -> None:
        try:
            self.out.write(text)
        except UnicodeEncodeError:
            encoding = getattr(self.out, "encoding", None) or "ascii"
            self.out.write(text.encode(encoding, errors="backslashreplace").decode(encoding))
        self.out.flush()


def watch(
    metrics_url: str | None,
    stream: str,
    *,
    count: int,
    interval_s: float,
    window_s: float,
    once: bool,
    out: TextIO,
    inp: TextIO | None,
) -> None:
    """Scrape, read, render, redraw every `interval_s` until Ctrl-C or q (`once`: one frame; it
    scrapes twice, `interval_s` apart, so that the frame has rates)."""
    timeout = min(max(interval_s, 0.5), 5.0)
    scraper = Scraper(metrics_url, window_s, timeout)
    reader = AlertReader(stream, count, timeout)
    screen = Screen(out, inp, live=not once)
    try:
        with screen:
            if once:
                scraper.scrape()
                if scraper.history:
                    time.sleep(interval_s)
            while True:
                started = time.monotonic()
                scraper.scrape()
                alerts, total = reader.read()
                view = View(
                    metrics_url, stream, interval_s, **scraper.frame(), alerts=alerts,
                    alerts_in_stream=total, redis_error=reader.error, clock=time.strftime("%Y-%m-%d %H:%M:%S"),
                )  # fmt: skip
                # One column spare on a terminal: a line that fills the last column leaves the cursor
                # there, and the erase-to-end-of-line after it would erase that last character.
                screen.show(render(view, screen.size()[0] - 1 if screen.live else 160))
                if once or screen.wait(interval_s - (time.monotonic() - started)):
                    break
    except KeyboardInterrupt:
        pass  # Ctrl-C is how the view ends
    except BrokenPipeError:  # `fraud top --once | head`: the reader left
        from fraud.stream_commands import quiet_stdout

        quiet_stdout()
    finally:
        reader.close()


def top(
    metrics: Annotated[
        str | None,
        typer.Option(
            metavar="URL",
            help="The flow's metrics page (default: http://127.0.0.1:<FRAUD_METRICS_PORT>/metrics).",
        ),
    ] = None,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between refreshes.")] = 2.0,
    window: Annotated[
        float, typer.Option(min=0.1, help="Seconds of history the latency percentiles cover.")
    ] = 30.0,
    alerts: Annotated[int, typer.Option(min=0, help="How many of the newest alerts to show.")] = 10,
    stream: Annotated[str | None, typer.Option(help="Alerts stream (default: FRAUD_ALERTS_STREAM).")] = None,
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit (for scripts).")] = False,
) -> None:
    """A live view of the running flow: throughput, alerts/s, latency p50/p95/p99, dead letters,
    labels, model, drift, and the newest alerts (read-only: XREVRANGE).

    Reads the metrics `fraud run` serves when FRAUD_METRICS_PORT is set, and the alerts stream.
    Either may be down: the view says so and keeps refreshing. Alert fields are shown escaped and
    capped. Ctrl-C or q quits; --once prints one frame (two scrapes --interval apart) and exits.
    """
    from service.settings import get_settings

    s = get_settings()
    url = metrics or (f"http://127.0.0.1:{s.metrics_port}/metrics" if s.metrics_port else None)
    watch(
        url, stream or s.alerts_stream, count=alerts, interval_s=interval, window_s=window,
        once=once, out=sys.stdout, inp=sys.stdin,
    )  # fmt: skip
