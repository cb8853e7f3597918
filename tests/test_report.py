"""`fraud report`: one HTML file that a browser draws offline, with charts of the right numbers.

The report of a generated world with a late pattern is built through the command (a replay of the
files through the serving scorer), then drawn by headless Chromium with every host name unresolvable:
the screenshot is not blank, every chart was drawn by plotly with its title, and nothing is loaded
from the network. The numbers behind the charts are checked by hand on small inputs.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import redis
from typer.testing import CliRunner

from flows.outputs import alert_entry, decision_entry
from fraud import report
from fraud.cli import app
from fraud.datagen import GeneratorConfig, write_files
from fraud.train import scored_batches
from models import evaluation
from service.runtime import load_model, new_pipeline, new_scorer
from service.settings import get_settings

CHROMIUM = Path(os.environ.get("FRAUD_TEST_CHROMIUM", "/usr/bin/chromium"))
CHARTS = {
    "roc": "ROC curve per model",
    "pr": "Precision-recall curve per model",
    "scores": "Final score distribution: frauds vs genuine",
    "alerts": "Alerts and precision per day",
    "card-precision": "Card Precision@20 per day",
    "patterns": "Recall per fraud pattern",
    "adaptation": "Adaptation: recall of XGBoost alone vs final (7-day trailing window)",
    "latency": "Latency histogram",
    "reasons": "Top alert reasons",
}
WIDTH, HEIGHT = 1400, 5600  # CSS pixels; drawn at half scale, so the PNG is 700 x 2800
SCALE = 0.5
FINAL_RED = (214, 39, 40)  # `report.COLORS["final"]`, #d62728


@dataclass
class Built:
    html: Path
    summary: dict[str, object]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """40 days of 200 cards, the late pattern from day 30, reported by `fraud report` (replay)."""
    out = tmp_path_factory.mktemp("report-world")
    config = GeneratorConfig(
        seed=3,
        days=40,
        n_cards=200,
        n_merchants=60,
        drift_day=30,
        fraud_rate_target=0.02,
        labels_after_end=True,
    )
    write_files(out, config)
    with pytest.MonkeyPatch.context() as mp:  # no developer FRAUD_* variable may leak into the run
        for name in list(os.environ):
            if name.startswith("FRAUD_") and not name.startswith("FRAUD_TEST_"):
                mp.delenv(name)
        get_settings.cache_clear()
        files = ["--transactions", str(out / "transactions.jsonl"), "--labels", str(out / "labels.jsonl")]
        result = CliRunner().invoke(
            app, ["report", "--out", str(out / "report.html"), *files, "--drift-day", "30", "--k", "20"]
        )
        assert result.exit_code == 0, result.output
        yield Built(out / "report.html", json.loads(result.stdout))
    get_settings.cache_clear()


def chromium(*args: str, cwd: Path, binary: Path = CHROMIUM) -> subprocess.CompletedProcess[bytes]:
    """Headless Chromium on the report, every host name unresolvable (so a chart that needed the
    network would not be drawn), with time for plotly's scripts to run."""
    if not binary.is_file():
        pytest.fail(
            f"{binary} is missing: the report test draws the report in headless Chromium; "
            "install it with `apt-get install chromium` (`make test` does) or name another binary "
            "in FRAUD_TEST_CHROMIUM"
        )
    command = [
        str(binary), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        "--no-first-run", f"--user-data-dir={cwd / 'profile'}", "--host-resolver-rules=MAP * ~NOTFOUND",
        f"--window-size={WIDTH},{HEIGHT}", f"--force-device-scale-factor={SCALE}",
        "--virtual-time-budget=15000", *args,
    ]  # fmt: skip
    done = subprocess.run(command, cwd=cwd, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done


def png_pixels(data: bytes) -> np.ndarray:
    """The pixels of an 8-bit, non-interlaced RGB or RGBA PNG (what Chromium writes), as
    (height, width, channels) uint8; decoded here with zlib, so no imaging library is needed."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, [], b""
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat.append(body)
    w, h, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
    bpp = 3 if color == 2 else 4
    stride = w * bpp
    rows = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(h, stride + 1)
    out = np.zeros((h, stride), np.uint8)
    prev = np.zeros(stride, np.uint8)
    for r in range(h):
        kind, line = int(rows[r, 0]), rows[r, 1:]
        if kind == 0:  # None
            cur = line.copy()
        elif kind == 1:  # Sub: a running sum along the row, per channel (uint8 wraps as PNG does)
            cur = np.cumsum(line.reshape(w, bpp), axis=0, dtype=np.uint8).reshape(-1)
        elif kind == 2:  # Up
            cur = line + prev
        else:  # Average, Paeth: each byte needs the one decoded just before it
            got, up = bytearray(line.tobytes()), prev.tobytes()
            for x in range(stride):
                a = got[x - bpp] if x >= bpp else 0
                b = up[x]
                if kind == 3:
                    got[x] = (got[x] + ((a + b) >> 1)) & 255
                    continue
                c = up[x - bpp] if x >= bpp else 0
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                got[x] = (got[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            cur = np.frombuffer(bytes(got), np.uint8)
        out[r] = cur
        prev = out[r]
    return out.reshape(h, w, bpp)


class Sources(HTMLParser):
    """Every URL a tag of a page loads or links to (scripts' own text is not parsed as tags)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.scripts = 0
        self.loaded: list[str] = []  # src of scripts, href of stylesheets: not inline, whatever the URL

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.scripts += tag == "script"
        found = dict(attrs)
        outside = found.get("src") if tag == "script" else found.get("href") if tag == "link" else None
        if outside is not None:
            self.loaded.append(f"{tag} {outside}")
        self.urls += [
            v or ""
            for k, v in attrs
            if k in ("src", "href", "xlink:href", "srcset", "data", "action", "poster")
        ]
        self.urls += re.findall(r"url\(([^)]*)\)", " ".join(v or "" for k, v in attrs if k == "style"))


def network_urls(page: str) -> list[str]:
    parser = Sources()
    parser.feed(page)
    return [u for u in parser.urls if re.match(r"\s*['\"]?\s*(https?:)?//", u, re.IGNORECASE)]


def test_the_screenshot_shows_the_charts(built: Built) -> None:
    shot = built.html.parent / "shot.png"
    chromium(f"--screenshot={shot}", built.html.as_uri(), cwd=built.html.parent)
    pixels = png_pixels(shot.read_bytes())
    assert pixels.shape[:2] == (round(HEIGHT * SCALE), round(WIDTH * SCALE))
    rgb = pixels[:, :, :3].reshape(-1, 3)
    assert rgb.std() > 20, f"the screenshot is (nearly) blank: pixel standard deviation {rgb.std():.1f}"
    assert (rgb != 255).any(axis=1).mean() > 0.03, "almost every pixel is white"
    # The final model's traces and bars are drawn in their own red: the plots are there, not only text.
    assert (rgb == FINAL_RED).all(axis=1).sum() > 1000


def test_every_chart_is_drawn_by_plotly_with_its_title(built: Built) -> None:
    done = chromium("--dump-dom", built.html.as_uri(), cwd=built.html.parent)
    dom = done.stdout.decode()
    starts = [(m.start(), m.group(1)) for m in re.finditer(r'id="chart-([\w-]+)"', dom)]
    assert [key for _, key in starts] == list(CHARTS), "the chart containers, in order"
    for (at, key), (end, _) in zip(starts, [*starts[1:], (len(dom), "")], strict=True):
        drawn = dom[at:end]
        assert 'class="main-svg"' in drawn, f"plotly did not draw {key}"
        traces = re.findall(r'class="trace (scatter|bars)\b', drawn)
        assert traces, f"{key}: no trace plotted"
        titles = re.findall(r'class="gtitle"[^>]*>([^<]*)<', drawn)
        assert titles == [CHARTS[key]], f"{key}: title {titles}"
        if key == "adaptation":  # --drift-day's marker
            assert "late pattern starts (day 30)" in drawn
    assert not network_urls(dom), network_urls(dom)


def test_the_file_stands_alone(built: Built) -> None:
    """plotly.js is inline, once; no tag loads or links anything from the network."""
    page = built.html.read_text(encoding="utf-8")
    assert not network_urls(page), network_urls(page)
    parser = Sources()
    parser.feed(page)
    assert parser.scripts == 1 + len(CHARTS)  # plotly.js, then one per chart
    assert not parser.loaded, "the page needs files beside it"
    assert page.count("plotly.js v") == 1
    assert built.summary["charts"] == list(CHARTS.values())
    assert built.summary["bytes"] == built.html.stat().st_size < 7_000_000
    # The late pattern is found (first seen from --drift-day on): the adaptation curve has its pair.
    assert re.search(r'"name":\s*"final, late pattern"', page)
    assert "merchant_cashout" in page


# --- the numbers behind the charts -------------------------------------------------------------


T0 = 1_767_225_600_000  # 2026-01-01T00:00Z
DAY = 86_400_000
LATE = T0 + 100 * DAY  # labels that arrive after every transaction


def scored(rows: list[tuple[float, str, float, bool]], threshold: float = 0.5) -> report.Scored:
    """Transactions of (day + fraction, card, final score, alert); XGBoost and River score alike."""
    final = np.array([r[2] for r in rows])
    return report.Scored(
        source="test",
        txn_ids=[f"t{i}" for i in range(len(rows))],
        ts_ms=np.array([T0 + round(r[0] * DAY) for r in rows], dtype=np.int64),
        cards=[r[1] for r in rows],
        scores={"xgboost": final, "river": final, "final": final},
        alert=np.array([r[3] for r in rows]),
        threshold=np.full(len(rows), threshold),
        reasons=Counter({"amount": 3, "rule: <b>big</b>": 1}),
        latency_ms=np.array([0.5, 1.0, 2.0]),
        latency_about="test latencies",
    )


def chart(charts: list[report.Chart], key: str) -> report.Chart:
    return next(c for c in charts if c.key == key)


def test_alerts_and_precision_per_day_are_counted_by_hand() -> None:
    rows = [
        (0.1, "a", 0.9, True),  # day 0: fraud, alerted
        (0.2, "b", 0.8, True),  # day 0: genuine, alerted
        (0.3, "c", 0.7, True),  # day 0: no label: an alert, not judged
        (0.4, "d", 0.1, False),  # day 0: genuine, quiet
        (2.1, "e", 0.95, True),  # day 2: fraud, alerted
        (2.2, "a", 0.99, True),  # day 2: card a, whose fraud label arrived on day 1: not judged
        (3.5, "f", 0.2, False),  # day 3: fraud, missed; no alert that day
    ]
    labels = {
        "t0": (True, T0 + round(1.5 * DAY)),
        "t1": (False, LATE),
        "t3": (False, LATE),
        "t4": (True, LATE),
        "t5": (True, LATE),
        "t6": (True, LATE),
    }
    charts, summary = report.build_charts(scored(rows), labels, {}, k=2)
    bars, line = chart(charts, "alerts").figure.data
    assert list(bars.x) == [0, 1, 2, 3]
    assert list(bars.y) == [3, 0, 2, 0]
    # Day 0: t0 and t1 judged, one fraud: 1/2. Day 2: only t4 judged (t5's card was known): 1/1.
    assert list(line.y) == [0.5, None, 1.0, None]
    assert summary["alerts"] == "5 (3 judged, 2 fraud)"
    assert summary["judged"] == "5 (3 fraud)"  # t0, t1, t3, t4, t6


def test_card_precision_per_day_follows_the_evaluation_rules() -> None:
    rows = [
        (0.1, "a", 0.9, True),
        (0.2, "a", 0.1, False),  # card a's fraud, scored low, still counts for the card
        (0.3, "b", 0.8, True),
        (0.4, "c", 0.7, False),
        (1.1, "b", 0.3, False),
        (1.2, "c", 0.6, False),
    ]
    labels = {f"t{i}": (i in (1, 5), LATE) for i in range(6)}
    charts, summary = report.build_charts(scored(rows), labels, {}, k=2)
    days, values = report.daily_card_precision(
        np.array([0, 0, 0, 0, 1, 1]), np.array(list("aabcbc")), np.array([0, 1, 0, 0, 0, 1]),
        np.array([r[2] for r in rows]), 2,
    )  # fmt: skip
    # Day 0: top 2 cards a (0.9, fraud) and b: 1/2. Day 1: c (fraud) and b: 1/2.
    assert list(days) == [0, 1] and list(values) == [0.5, 0.5]
    final = chart(charts, "card-precision").figure.data[2]
    assert list(final.y) == [0.5, 0.5]
    assert summary["Final (combined): Card Precision@2"] == "0.500"
    for d in (0, 1):
        m = np.array([int(r[0]) == d for r in rows])
        one_day = evaluation.card_precision_at_k(
            np.zeros(m.sum()), np.array(list("aabcbc"))[m], np.array([0, 1, 0, 0, 0, 1])[m],
            np.array([r[2] for r in rows])[m], 2,
        )  # fmt: skip
        assert values[d] == one_day


def test_recall_per_pattern_and_the_adaptation_curve() -> None:
    rows = [
        (0.1, "a", 0.9, True),  # early pattern, caught
        (0.2, "b", 0.2, False),  # early pattern, missed
        (5.1, "c", 0.3, True),  # late pattern: XGBoost alone (0.3 < 0.5) misses, the final alert catches
        (6.1, "d", 0.1, False),  # late pattern, missed by both
        (6.2, "e", 0.1, False),  # genuine
    ]
    labels = {f"t{i}": (i < 4, LATE) for i in range(5)}
    patterns = {"t0": "early", "t1": "early", "t2": "late", "t3": "late"}
    charts, summary = report.build_charts(scored(rows), labels, patterns, drift_day=5, window=2)
    xgb, final = chart(charts, "patterns").figure.data
    assert list(xgb.x) == ["early", "late"] and list(xgb.y) == [0.5, 0.0] and list(final.y) == [0.5, 0.5]
    assert list(final.text) == ["1/2", "1/2"]
    adapt = chart(charts, "adaptation").figure.data
    assert [t.name for t in adapt] == [
        "XGBoost alone, all frauds", "XGBoost alone, late pattern", "final, all frauds", "final, late pattern"
    ]  # fmt: skip
    # Two-day window ending on each day 0..6: days 0-1 see t0, t1; days 5-6 see t2 (and t3 on day 6).
    assert list(adapt[2].y) == [0.5, 0.5, None, None, None, 1.0, 0.5]
    assert list(adapt[0].y) == [0.5, 0.5, None, None, None, 0.0, 0.0]
    assert list(adapt[3].y) == [None, None, None, None, None, 1.0, 0.5]
    assert summary["fraud patterns"] == "early, late"
    # Text from the data is escaped for plotly, which reads some HTML in labels.
    assert list(chart(charts, "reasons").figure.data[0].y) == ["rule: &lt;b&gt;big&lt;/b&gt;", "amount"]


def test_curves_are_thinned_and_keep_their_ends() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(20_000) < 0.05
    s = rng.random(20_000) + y * 0.3
    c = report.curves(y, s)
    assert c is not None
    assert c.fpr.size <= report.MAX_CURVE_POINTS and c.recall.size <= report.MAX_CURVE_POINTS
    assert (c.fpr[0], c.tpr[0], c.fpr[-1], c.tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert c.recall[-1] == 1.0 and c.precision[-1] == pytest.approx(y.mean())
    assert np.all(np.diff(c.fpr) >= 0) and np.all(np.diff(c.recall) >= 0)
    assert c.auc == evaluation.roc_auc(y, s) and c.ap == evaluation.average_precision(y, s)
    assert report.curves(np.zeros(3), np.ones(3)) is None


def test_a_missing_chromium_fails_naming_the_install(tmp_path: Path) -> None:
    """Not a skip: the suite fails with the command that fixes it."""
    with pytest.raises(pytest.fail.Exception, match=r"apt-get install chromium"):
        chromium("--version", cwd=tmp_path, binary=tmp_path / "no-chromium")


@pytest.mark.redis
def test_the_decision_log_reports_what_the_replay_reports(
    small_gz: Path, redis_client: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Decisions written as the flow writes them (`flows.outputs`) read back as the replay scored
    them; `fraud report --from-decisions` draws every chart from them and the alerts' latencies."""
    txns, labels = small_gz / "transactions.jsonl.gz", small_gz / "labels.jsonl.gz"
    for name, value in {
        "FRAUD_REDIS_URL": redis_url,
        "FRAUD_DECISION_STREAM": "rpt:decisions",
        "FRAUD_ALERTS_STREAM": "rpt:alerts",
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    s = get_settings()
    pipeline = new_pipeline(s)
    scorer = new_scorer(s, load_model(s, pipeline))
    decisions = [
        d for batch in scored_batches(scorer, pipeline, txns, labels, s.label_ttl_days) for d in batch
    ]
    for i, d in enumerate(decisions):
        d.latency_s = 0.001 * (1 + i % 7)
        redis_client.xadd(s.decision_stream, decision_entry(d, scorer.names))  # type: ignore[arg-type]
        if (alert := alert_entry(d)) is not None:
            redis_client.xadd(s.alerts_stream, alert)  # type: ignore[arg-type]
    redis_client.xadd(s.decision_stream, decision_entry(decisions[0], scorer.names))  # type: ignore[arg-type]

    logged = report.decisions_scored(redis_client, s, page=100)
    replayed = report.replay_scored(s, txns, labels)
    assert logged.txn_ids == replayed.txn_ids == [d.txn.txn_id for d in decisions]  # the repeat is dropped
    assert np.array_equal(logged.ts_ms, replayed.ts_ms) and logged.cards == replayed.cards
    for m in report.MODELS:
        np.testing.assert_allclose(logged.scores[m], replayed.scores[m], atol=1e-6)
    assert np.array_equal(logged.alert, replayed.alert) and logged.alert.any()
    assert logged.reasons == replayed.reasons and sum(logged.reasons.values()) >= logged.alert.sum()
    np.testing.assert_allclose(
        logged.latency_ms, [1.0 * (1 + i % 7) for i, d in enumerate(decisions) if d.alert], atol=1e-3
    )

    out = tmp_path / "from-decisions.html"
    result = CliRunner().invoke(
        app, ["report", "--from-decisions", "--labels", str(labels), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["transactions"] == str(len(decisions))
    page = out.read_text(encoding="utf-8")
    drawn = dict(re.findall(r'Plotly\.newPlot\(\s*"chart-([\w-]+)",\s*\[(.)', page))
    assert list(drawn) == list(CHARTS)
    # Every chart has traces but the patterns one: a decision log does not name them.
    assert {key for key, first in drawn.items() if first != "{"} == {"patterns"}
    assert report.NOT_NAMED in page
    assert not network_urls(page)


@pytest.mark.redis
def test_an_empty_or_unreadable_decision_log_is_one_line(
    redis_client: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FRAUD_REDIS_URL", redis_url)
    get_settings.cache_clear()
    args = ["report", "--from-decisions", "--out", str(tmp_path / "r.html")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert (
        result.stderr == "fraud report: the decision stream 'fraud:decisions' is empty: run the flow with "
        "FRAUD_DECISION_LOG=1 (FRAUD_DECISION_STREAM names the stream) before reporting on it\n"
    )
    redis_client.xadd("fraud:decisions", {"txn_id": "t1", "score": "0.5"})
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "fraud report: decision " in result.stderr and "has no 'xgb_score' field" in result.stderr
    assert not (tmp_path / "r.html").exists()
