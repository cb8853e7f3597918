"""`fraud top`: the frame as a pure function of two metric snapshots and the newest alerts, the
command once against a metrics page and Redis (each up or down), and the live view driven in tmux
against a running flow (`fraud run` reading Redis, paced input)."""

from __future__ import annotations

import contextlib
import http.server
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

from fraud.cli import app
from fraud.datagen import GeneratorConfig, write_files
from fraud.top import (
    View,
    bucket_increase,
    fit,
    histogram_quantile,
    increase,
    parse_metrics,
    rate,
    render,
)
from service.redis_client import connect
from service.settings import get_settings
from testkit import drill
from testkit.streams import entries
from testkit.system import free_port

ROOT = Path(__file__).resolve().parents[1]
LATENCY = "fraud_end_to_end_latency_seconds"


def exposition(
    *,
    txns: float,
    alerts: float,
    latency: dict[str, float],
    dead: dict[tuple[str, str], float],
    labels: tuple[float, float],
    learned: float,
    drift: float,
) -> str:
    """A metrics page shaped like the flow's (`service.telemetry`), with the given values."""
    lines = [
        "# TYPE fraud_transactions counter",
        f"fraud_transactions_total {txns}",
        "# TYPE fraud_alerts counter",
        f"fraud_alerts_total {alerts}",
        "# TYPE fraud_labels counter",
        f'fraud_labels_total{{is_fraud="true"}} {labels[0]}',
        f'fraud_labels_total{{is_fraud="false"}} {labels[1]}',
        "# TYPE fraud_online_labels_learned counter",
        f"fraud_online_labels_learned_total {learned}",
        "# TYPE fraud_dead_letters counter",
        *(f'fraud_dead_letters_total{{kind="{k}",reason="{r}"}} {v}' for (k, r), v in dead.items()),
        "# TYPE fraud_drift_events counter",
        f'fraud_drift_events_total{{kind="data",state="drifting"}} {drift}',
        'fraud_drift_events_total{kind="concept",state="drifting"} 0.0',
        f"# TYPE {LATENCY} histogram",
        *(f'{LATENCY}_bucket{{le="{le}"}} {v}' for le, v in latency.items()),
        f"{LATENCY}_count {latency['+Inf']}",
        f"{LATENCY}_sum 1.5",
        "# TYPE fraud_model info",
        'fraud_model_info{schema_hash="4e979ded0081",shadow="xgb-shadow-2",version="xgb-champion-1"} 1.0',
        "# TYPE fraud_source_lag_seconds gauge",
        'fraud_source_lag_seconds{shard="0"} 0.5',
        'fraud_source_lag_seconds{shard="1"} 1.25',
        "# TYPE fraud_pending_transactions gauge",
        "fraud_pending_transactions 42.0",
    ]
    return "\n".join(lines) + "\n"


# Two scrapes 2 s apart. Latency observations between them, per bucket (not cumulative):
# (0.001, 0.0025]: 50, (0.0025, 0.005]: 40, (0.005, 0.01]: 8, (0.01, 0.025]: 2; 100 in all.
BEFORE = exposition(
    txns=1000,
    alerts=10,
    latency={"0.001": 5, "0.0025": 25, "0.005": 35, "0.01": 40, "0.025": 40, "+Inf": 41},
    dead={("txn", "bad_json"): 2, ("txn", "schema"): 0, ("label", "bad_json"): 1},
    labels=(3, 97),
    learned=150,
    drift=1,
)
AFTER = exposition(
    txns=1600,
    alerts=16,
    latency={"0.001": 5, "0.0025": 75, "0.005": 125, "0.01": 138, "0.025": 140, "+Inf": 141},
    dead={("txn", "bad_json"): 6, ("txn", "schema"): 1, ("label", "bad_json"): 3},
    labels=(5, 195),
    learned=300,
    drift=2,
)


def two_scrapes() -> View:
    old, new = parse_metrics(BEFORE, at=10.0), parse_metrics(AFTER, at=12.0)
    return View("http://127.0.0.1:9/metrics", "fraud:alerts", 2.0, now=new, last=old, since=old)


def test_rates_come_from_counter_deltas_and_a_reset_counts_from_zero() -> None:
    view = two_scrapes()
    assert view.now is not None
    assert rate(view.now, view.last, "fraud_transactions_total") == 300.0
    assert rate(view.now, view.last, "fraud_alerts_total") == 3.0
    assert rate(view.now, view.last, "fraud_labels_total") == 50.0  # (2 + 98) / 2 s, over both labels
    assert rate(view.now, view.last, "fraud_dead_letters_total", kind="txn", reason="bad_json") == 2.0
    assert rate(view.now, None, "fraud_transactions_total") is None  # one scrape: no rate yet
    assert increase(5.0, 100.0) == 5.0  # the flow restarted: its counter began again at 0
    assert increase(None, 1.0) is None


def test_latency_quantiles_match_a_hand_computation_over_bucket_deltas() -> None:
    view = two_scrapes()
    assert view.now is not None
    window = bucket_increase(view.now, view.since, LATENCY)
    assert window == [(0.001, 0), (0.0025, 50), (0.005, 90), (0.01, 98), (0.025, 100), (math.inf, 100)]
    # p50: rank 50 is the last of (0.001, 0.0025]'s 50: 0.001 + 0.0015 * 50/50.
    assert histogram_quantile(0.5, window) == pytest.approx(0.0025)
    # p95: rank 95 is the 5th of the 8 in (0.005, 0.01]: 0.005 + 0.005 * 5/8.
    assert histogram_quantile(0.95, window) == pytest.approx(0.008125)
    # p99: rank 99 is the 1st of the 2 in (0.01, 0.025]: 0.01 + 0.015 * 1/2.
    assert histogram_quantile(0.99, window) == pytest.approx(0.0175)
    # As Prometheus: the first bucket starts at 0, the +Inf bucket answers the highest finite bound.
    assert histogram_quantile(0.5, [(0.1, 10), (math.inf, 10)]) == pytest.approx(0.05)
    assert histogram_quantile(0.99, [(0.1, 1), (math.inf, 10)]) == 0.1
    assert histogram_quantile(0.5, [(0.1, 0), (math.inf, 0)]) is None
    # A histogram reset between the scrapes (negative deltas): what the new process observed.
    restarted = parse_metrics(BEFORE, at=20.0)
    assert bucket_increase(restarted, view.now, LATENCY)[-1] == (math.inf, 41)


def test_the_frame_of_two_scrapes() -> None:
    lines = render(two_scrapes(), width=160)
    text = "\n".join(lines)
    print(text)
    assert "model      xgb-champion-1  (schema 4e979ded0081)   shadow: xgb-shadow-2" in lines
    assert "throughput 300.0/s txn   alerts 3.00/s   (since start: 1,600 txn, 16 alerts)" in lines
    assert (
        "latency    p50 2.5 ms   p95 8.12 ms   p99 17.5 ms   (end to end, last 2 s, 100 decisions)" in lines
    )
    assert "labels     200 joined (5 fraud) 50.0/s   learned by River: 300 75.0/s" in lines
    # Dead letters by reason, kinds summed: bad_json 6 + 3 (grew 4 + 2 in 2 s), schema 1 (grew 1).
    assert "dead       10 dead letters 3.50/s:" in lines
    assert re.search(r"^  bad_json +9 +3\.00/s +\(label, txn\)$", text, re.M)
    assert re.search(r"^  schema +1 +0\.50/s +\(txn\)$", text, re.M)
    assert "drift      data drifting 2   0.50/s" in lines
    assert any(
        line.startswith("backlog    source lag 1.25 s (worst of 2 shards)   awaiting labels 42")
        for line in lines
    )
    assert lines[-1] == "  none yet"


def test_the_first_frame_has_no_rates_and_latency_since_start() -> None:
    now = parse_metrics(AFTER, at=12.0)
    text = "\n".join(render(View("http://x/metrics", "fraud:alerts", 2.0, now=now)))
    assert "throughput -/s txn" not in text and "throughput - txn   alerts -" in text
    assert "(end to end, since start, 141 decisions)" in text


def test_waiting_for_metrics_and_redis_down_are_lines_of_the_frame() -> None:
    view = View(
        "http://127.0.0.1:1/metrics",
        "fraud:alerts",
        0.5,
        metrics_error="URLError: <urlopen error [Errno 111] Connection refused>",
        redis_error="ConnectionError: Error 111 connecting to 127.0.0.1:1. Connection refused.",
    )
    lines = render(view)
    assert lines[2] == (
        "waiting for metrics at http://127.0.0.1:1/metrics "
        "(URLError: <urlopen error [Errno 111] Connection refused>)"
    )
    assert (
        lines[-1].startswith("  redis: ConnectionError: Error 111") and "(retrying every 0.5 s)" in lines[-1]
    )
    off = render(View(None, "fraud:alerts", 2.0))
    assert any("set FRAUD_METRICS_PORT" in line for line in off)


HOSTILE = "\x1b[2J\x1b]0;pwned\x07\r\b\u202eevil\u200b\n\x9b31m\x00"


def test_hostile_alerts_are_escaped_capped_and_kept_to_the_width() -> None:
    alerts = [
        (
            b"1700000000000-0",
            {
                b"ts": HOSTILE.encode(),
                b"txn_id": b"t" * 1_000_000 + HOSTILE.encode(),
                b"score": b"0.97",
                b"model_version": b"\xff\xfe" + b"m" * 10_000,
                b"reasons": json.dumps([{"feature": HOSTILE, "value": 1e308, "contribution": "x"}]).encode(),
            },
        ),
        (b"\x1b[2J", {b"score": b"1e999", b"reasons": b"[" * 100_000, HOSTILE.encode(): HOSTILE.encode()}),
        (
            b"1-0",
            {
                b"txn_id": b"t42",
                b"score": b"nan",
                b"reasons": b'[{"rule": "night \\u001b[31m", "action": "review"}]',
            },
        ),
        (b"2-0", {b"reasons": b'{"not": "a list"}'}),
        (b"3-0", {}),
    ]
    view = View("http://127.0.0.1:9/metrics\x1b[2J", "alerts\x1b]0;x\x07", 2.0, alerts=alerts)
    started = time.monotonic()
    lines = render(view, width=120)
    assert time.monotonic() - started < 1.0  # a megabyte field is capped before it is escaped
    for line in lines:
        assert line.isprintable(), repr(line)  # no ESC, CR, BS, NUL, C1, bidi or zero-width left
        assert len(line) <= 120
    assert lines[-5].endswith("…")  # cut to the width
    lines = render(view, width=10_000)  # everything, to read what each field became
    rows = lines[-5:]
    assert "\\x1b[2J\\x1b]0;pwned\\x07\\r\\x08\\u202eevil" in rows[0]  # shown, not obeyed
    assert "t" * 40 + "… (" in rows[0]  # the txn is capped
    assert "\\xff\\xfe" + "m" * 10 in rows[0]
    assert "  ?  " in rows[1] and "score" not in rows[1]  # a bad id's time, inf/deep JSON as ?
    assert rows[1].split()[-1] == "?"
    assert "t42" in rows[2] and "rule night \\x1b[31m (review)" in rows[2]
    assert rows[3].split()[-1] == "?" and rows[4].split()[-1] == "?"
    assert "http://127.0.0.1:9/metrics\\x1b[2J" in lines[0]
    assert "newest alerts in alerts\\x1b]0;x\\x07" in lines[-7]


def test_wide_characters_count_two_columns() -> None:
    assert fit("a" * 50, 40) == "a" * 39 + "…"
    assert fit("界" * 30, 40) == "界" * 19 + "…"  # 38 columns, and the ellipsis
    assert fit("界" * 20, 40) == "界" * 20  # exactly 40 columns
    assert fit("é" * 40, 40) == "é" * 40


def test_a_metrics_page_that_is_not_one_is_an_error() -> None:
    with pytest.raises(ValueError):
        parse_metrics("<html>\x1b[2J</html>", at=0.0)


# --- The command, --once ---------------------------------------------------------------------


class _Page(http.server.BaseHTTPRequestHandler):
    body = AFTER.encode()

    def do_GET(self) -> None:  # the name BaseHTTPRequestHandler calls
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def metrics_page() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _env(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()


@pytest.mark.redis
def test_once_prints_one_frame_from_the_page_and_the_stream(
    metrics_page: str, redis_client: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(3):
        redis_client.xadd(
            "top1:alerts", {"txn_id": f"t{i}", "score": "0.9", "model_version": "v1", "reasons": "[]"}
        )
    _env(monkeypatch, FRAUD_REDIS_URL=redis_url, FRAUD_ALERTS_STREAM="top1:alerts")
    result = CliRunner().invoke(
        app, ["top", "--once", "--interval", "0.1", "--metrics", metrics_page, "--alerts", "2"]
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.count("fraud top ") == 1 and "\x1b" not in out  # not a terminal: no escape sequences
    assert "model      xgb-champion-1" in out and "throughput 0.0/s txn" in out  # the same page twice
    assert "newest alerts in top1:alerts (3 in the stream)" in out
    assert "t2" in out and "t1" in out and "t0" not in out  # the newest two, read-only:
    assert redis_client.xinfo_groups("top1:alerts") == []  # no consumer group made


@pytest.mark.redis
def test_once_with_nothing_up_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    _env(
        monkeypatch,
        FRAUD_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        FRAUD_METRICS_PORT=str(free_port()),
    )
    result = CliRunner().invoke(app, ["top", "--once", "--interval", "0.1"])
    assert result.exit_code == 0, result.output
    assert re.search(r"waiting for metrics at http://127\.0\.0\.1:\d+/metrics \(URLError", result.output)
    assert "  redis: ConnectionError" in result.output


# --- Live, in tmux, against a running flow ---------------------------------------------------


def _tmux() -> str:
    path = shutil.which("tmux")
    if path is None:
        pytest.fail("tmux is not installed: the live view is tested in it (apt-get install tmux)")
    return path


# Runs argv[2:] and writes its exit status to argv[1] (negative: the signal that killed it). Ctrl-C
# reaches both processes (one foreground process group); this wrapper's handler does nothing, so it
# keeps waiting. A handler rather than SIG_IGN: an ignored SIGINT would stay ignored in the child.
RECORD_EXIT = (
    "import signal, subprocess, sys; signal.signal(signal.SIGINT, lambda *_: None); "
    "rc = subprocess.call(sys.argv[2:]); open(sys.argv[1] + '.tmp', 'w').write(str(rc)); "
    "__import__('os').replace(sys.argv[1] + '.tmp', sys.argv[1])"
)


class Tmux:
    """A tmux server of its own (-S, a socket in a fresh directory), so no user session is
    touched; `close` kills it whole and removes the directory."""

    def __init__(self, env: dict[str, str]) -> None:
        self.binary = _tmux()
        self.home = Path(tempfile.mkdtemp(prefix="fraud-top-"))  # short: a socket path has ~100 bytes
        self.socket = str(self.home / "tmux")
        # COLUMNS and LINES (pytest-xdist's workers have them: 80 x 24) would override the pane's size.
        self.env = {k: v for k, v in env.items() if k not in ("TMUX", "TMUX_PANE", "COLUMNS", "LINES")}

    def __call__(self, *args: str) -> str:
        done = subprocess.run(
            [self.binary, "-S", self.socket, *args], env=self.env, capture_output=True, text=True, timeout=10
        )
        if done.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def start(self, session: str, *command: str) -> None:
        """The command in a detached 160x50 session, under `RECORD_EXIT`: tmux 3.3 sometimes marks
        a dead pane without its exit status (`#{pane_dead_status}` stays empty). The pane stays
        after the command exits, to read what it left on the screen."""
        line = shlex.join([sys.executable, "-c", RECORD_EXIT, str(self.home / session), *command])
        self("new-session", "-d", "-s", session, "-x", "160", "-y", "50", "-c", str(ROOT), line,
             ";", "set-option", "-wg", "remain-on-exit", "on")  # fmt: skip

    def screen(self, session: str) -> str:
        return self("capture-pane", "-p", "-t", session)

    def exit_status(self, session: str) -> str | None:
        """None while the session's command runs; then its exit status."""
        path = self.home / session
        return path.read_text() if path.exists() else None

    def close(self) -> None:
        subprocess.run([self.binary, "-S", self.socket, "kill-server"], capture_output=True, timeout=10)
        shutil.rmtree(self.home, ignore_errors=True)


def _wait(what: str, check: Callable[[], bool], timeout_s: float, screen: Callable[[], str]) -> None:
    """Poll `check` until it holds; past `timeout_s`, fail showing what `screen` shows."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            shown = screen()
            pytest.fail(f"{what}: not within {timeout_s} s; the screen:\n{shown}")
        time.sleep(0.2)


def _top(*args: str) -> tuple[str, ...]:
    return (sys.executable, "-m", "fraud.cli", "top", *args)


def _ended(tmux: Tmux, session: str) -> str:
    """Wait for the pane's process to exit; its exit status."""
    status: list[str | None] = [None]

    def gone() -> bool:
        status[0] = tmux.exit_status(session)
        return status[0] is not None

    _wait("the view did not exit", gone, 10, lambda: tmux.screen(session))
    return str(status[0])


def _view_env(url: str, tag: str, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUD_")}
    env.update(
        FRAUD_REDIS_URL=url,
        FRAUD_ALERTS_STREAM=f"{tag}:alerts",
        FRAUD_METRICS_PORT=str(port),
        PYTHONPATH=str(ROOT),
        TERM="xterm-256color",
    )
    return env


@pytest.mark.redis
def test_the_view_waits_for_a_flow_that_is_not_up_and_q_quits(redis_url: str) -> None:
    tmux = Tmux(_view_env(redis_url, f"top-{uuid.uuid4().hex[:8]}", free_port()))
    try:
        tmux.start("wait", *_top("--interval", "0.3"))
        _wait(
            "no 'waiting for metrics' frame",
            lambda: "waiting for metrics at http://127.0.0.1:" in tmux.screen("wait"),
            15,
            lambda: tmux.screen("wait"),
        )
        assert "none yet" in tmux.screen("wait")  # Redis is up, the stream empty
        tmux("send-keys", "-t", "wait", "q")
        assert _ended(tmux, "wait") == "0"
    finally:
        tmux.close()


class _StopReplay(Exception):
    pass


@pytest.mark.redis
@pytest.mark.e2e
def test_the_live_view_of_a_running_flow_in_tmux(redis_url: str, tmp_path: Path) -> None:
    _tmux()
    data = tmp_path / "data"
    write_files(data, GeneratorConfig(seed=21, days=20, n_cards=150, n_merchants=50, drift_day=None))
    tag, port = f"top-{uuid.uuid4().hex[:8]}", free_port()
    client = connect(redis_url)
    stop = threading.Event()

    def paced(_: int) -> None:
        if stop.is_set():
            raise _StopReplay

    def feed() -> None:  # ~3,000 records at 300/s: the flow has input for ~10 s, unless stopped
        with contextlib.suppress(_StopReplay):
            drill.replay(
                client,
                (data / "transactions.jsonl", data / "labels.jsonl"),
                tag,
                1,
                rate=300,
                on_progress=paced,
            )

    env = drill.flow_env(
        redis_url, tag, 1, tmp_path, FRAUD_METRICS_PORT=str(port), FRAUD_SOURCE_IDLE_EXIT_S="2",
        FRAUD_THRESHOLD="0.2", FRAUD_SNAPSHOT_INTERVAL_S="0.5", FRAUD_SOURCE_BATCH_SIZE="100",
    )  # fmt: skip
    tmux = Tmux(_view_env(redis_url, tag, port))
    feeder = threading.Thread(target=feed, daemon=True)
    flow = None
    try:
        tmux.start("live", *_top("--interval", "0.5", "--window", "5"))
        feeder.start()
        flow = drill.start(env)
        version = json.loads((ROOT / "models/artifacts/default/meta.json").read_text())["version"]
        seen: dict[str, str] = {}

        def live() -> bool:
            screen = tmux.screen("live")
            seen["screen"] = screen
            throughput = re.search(r"^throughput ([\d,.]+)/s txn", screen, re.M)
            alerts = re.findall(r"^  \d\d:\d\d:\d\d  .{29}  (\S+) +([\d.]+)  (\S+)", screen, re.M)
            return bool(
                throughput and float(throughput[1].replace(",", "")) > 0 and alerts and version in screen
            )

        _wait("no live frame with throughput, model and alerts", live, 40, lambda: seen.get("screen", ""))
        screen = seen["screen"]
        print(screen)
        in_stream = {e["txn_id"]: e for e in entries(client, f"{tag}:alerts")}
        rows = re.findall(r"^  \d\d:\d\d:\d\d  .{29}  (\S+) +([\d.]+)  (\S+)", screen, re.M)
        matched = [
            (txn, score)
            for txn, score, model in rows
            if txn in in_stream
            and f"{float(in_stream[txn]['score']):.3f}" == score
            and model == in_stream[txn]["model_version"]
        ]
        assert matched, (rows, list(in_stream)[:5])
        assert f"model      {version}" in screen
        assert re.search(r"^latency    p50 [\d.]+ m?s", screen, re.M), screen

        tmux("send-keys", "-t", "live", "C-c")
        assert _ended(tmux, "live") == "0"
        assert "Traceback" not in tmux.screen("live")
    finally:
        stop.set()
        tmux.close()
        if flow is not None:
            drill.reap(flow)
        feeder.join(timeout=10)
        client.delete(*[k for k in client.scan_iter(f"{tag}:*")] or [f"{tag}:none"])
        client.close()
