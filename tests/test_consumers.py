"""The stream readers survive anything in the stream (issue 12): `fraud alerts`, `fraud
dead-letters` and `fraud alert-precision` against a real Redis holding hostile entries.

Each reader must neither raise nor let an entry's content reach the terminal raw (escape
sequences, other controls, bidi overrides), text output caps each field, and `fraud alerts`
shows again what an interrupted run read but did not show.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

from fraud.cli import app
from fraud.consumer import alert_json, ensure_group, format_alert, pending_count, read_alerts, scan_stream
from fraud.display import FIELD_CAP
from service.redis_client import connect
from testkit.streams import drain

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parents[1]
ALERTS = "fraud:alerts"  # the settings' defaults, which the CLI commands read
DLQ = "fraud:dlq"
ESCAPES = "\x1b[2J\x1b[H\x1b]0;pwned\x07\x1b]8;;http://evil\x1b\\link\x1b]8;;\x1b\\\r\x08\x00\x7f\x9b\x85\u202e\u2066\u2028\ufeff"
RawFields = dict[bytes, bytes]


def alert(i: int, **extra: str) -> dict[str, str]:
    reasons = [{"feature": "amount_z", "value": 4.2, "contribution": 0.31}]
    return {
        "txn_id": f"t{i}",
        "card_id": f"c{i % 7}",
        "merchant_id": "m1",
        "ts": "2024-05-01T12:00:00Z",
        "score": "0.91",
        "xgb_score": "0.9",
        "online_score": "0.2",
        "threshold": "0.5",
        "model_version": "v1",
        "reasons": json.dumps(reasons),
        **extra,
    }


def add(client: redis.Redis, stream: str, entries: list[Any]) -> list[str]:
    """XADD every entry (str or raw bytes fields) in one round trip; their ids in order."""
    pipe = client.pipeline(transaction=False)
    for fields in entries:
        pipe.xadd(stream, fields)
    return [entry_id.decode() for entry_id in pipe.execute()]


def assert_terminal_safe(text: str) -> None:
    """No ESC, no other control or format character: line breaks between lines only."""
    assert "\x1b" not in text
    bad = {ch for ch in text if not ch.isprintable() and ch != "\n"}
    assert not bad, sorted(bad)[:10]


def json_ids(text: str) -> list[str]:
    return [json.loads(line)["id"] for line in text.splitlines()]


@pytest.fixture
def cli(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """A runner for `fraud …` commands against the test server (default stream names)."""
    monkeypatch.setenv("FRAUD_REDIS_URL", redis_url)
    return CliRunner()


class CutOutput(io.StringIO):
    """An output that breaks like a closed pipe on line `fail_at` (0-based)."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at = fail_at
        self.lines = 0

    def write(self, s: str) -> int:
        if self.lines == self.fail_at:
            raise BrokenPipeError(32, "Broken pipe")
        self.lines += s.count("\n")
        return super().write(s)


# -- hostile content ----------------------------------------------------------------------------


def test_recursion_bomb_in_reasons_is_shown_not_fatal(redis_client: redis.Redis, cli: CliRunner) -> None:
    bomb = "[" * 100_000
    ids = add(
        redis_client, ALERTS, [alert(0, reasons=bomb), alert(1), alert(2, reasons="[" * 5000 + "]" * 5000)]
    )
    n, text = drain(redis_client, ALERTS, group="text", as_json=False)
    assert n == 3 and len(text.splitlines()) == 3
    assert text.splitlines()[0].endswith("reasons: ?") and "amount_z=4.2" in text.splitlines()[1]
    n, text = drain(redis_client, ALERTS, group="json", as_json=True)
    rows = [json.loads(line) for line in text.splitlines()]
    assert n == 3 and [row["id"] for row in rows] == ids
    assert rows[0]["fields"]["reasons"] == bomb  # complete, still the raw string
    assert pending_count(redis_client, ALERTS, "text") == pending_count(redis_client, ALERTS, "json") == 0

    result = cli.invoke(app, ["alerts", "--group", "cli"])
    assert result.exit_code == 0, result.output
    assert "3 alert(s)" in result.stderr and len(result.stdout.splitlines()) == 3


def test_escape_sequences_are_shown_visibly(redis_client: redis.Redis) -> None:
    evil = alert(0, txn_id=f"t0{ESCAPES}", card_id="c\n1\tx", model_version="é😀 ok")
    evil["reasons"] = json.dumps([{"feature": ESCAPES, "value": 1, "contribution": 0.5}])
    add(redis_client, ALERTS, [evil])
    n, text = drain(redis_client, ALERTS, group="text", as_json=False)
    assert n == 1 and len(text.splitlines()) == 1  # the \n and U+2028 in fields broke no line
    assert_terminal_safe(text)
    assert "txn=t0\\x1b[2J\\x1b[H\\x1b]0;pwned\\x07" in text and "\\r\\x08\\x00\\x7f\\x9b\\x85" in text
    assert "\\u202e\\u2066\\u2028\\ufeff" in text and "card=c\\n1\\tx" in text
    assert "model=é😀 ok" in text  # ordinary printable Unicode is kept

    n, text = drain(redis_client, ALERTS, group="json", as_json=True)
    assert n == 1 and text.isascii() and "\x1b" not in text
    fields = json.loads(text)["fields"]
    assert fields["txn_id"] == f"t0{ESCAPES}" and fields["reasons"][0]["feature"] == ESCAPES  # exact


def test_huge_field_is_capped_in_text_and_complete_in_json(redis_client: redis.Redis, cli: CliRunner) -> None:
    huge = "é" * 10_000_000
    add(redis_client, ALERTS, [alert(0, merchant_id=huge), alert(1)])
    n, text = drain(redis_client, ALERTS, group="text", as_json=False)
    first = text.splitlines()[0]
    assert n == 2 and len(text) < 10_000
    assert f"merchant={'é' * FIELD_CAP}… ({10_000_000 - FIELD_CAP} more characters)  score=" in first
    n, text = drain(redis_client, ALERTS, group="json", as_json=True)
    assert n == 2 and json.loads(text.splitlines()[0])["fields"]["merchant_id"] == huge

    add(redis_client, DLQ, [{"kind": "txn", "reason": "too_large", "detail": huge, "raw": huge}])
    result = cli.invoke(app, ["dead-letters"])
    assert result.exit_code == 0, result.output
    assert (
        len(result.stdout) < 10_000
        and f"raw: {'é' * 200}… ({10_000_000 - 200} more characters)" in result.stdout
    )


def test_non_utf8_values_in_every_reader(redis_client: redis.Redis, cli: CliRunner, tmp_path: Path) -> None:
    raw: RawFields = {
        b"txn_id": b"t\xff\xfe",
        b"card_id": b"\xed\xa0\x80",  # an encoded surrogate: not UTF-8
        b"reasons": b'[{"feature": "\xc3(", "value": 1}]',
        b"\x80key": b"\xc0\xaf",
    }
    add(redis_client, ALERTS, [raw, alert(1)])
    n, text = drain(redis_client, ALERTS, group="text", as_json=False)
    assert n == 2 and "txn=t\\xff\\xfe  card=\\xed\\xa0\\x80" in text
    assert_terminal_safe(text)
    n, text = drain(redis_client, ALERTS, group="json", as_json=True)
    fields = json.loads(text.splitlines()[0])["fields"]
    assert n == 2 and fields["txn_id"] == "t\\xff\\xfe" and fields["\\x80key"] == "\\xc0\\xaf"

    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"txn_id": "t1", "is_fraud": true, "ts": 1714564800000}\n')
    result = cli.invoke(app, ["alert-precision", "--labels", str(labels)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["alerts"] == 2 and report["true_frauds_alerted"] == 1 and report["precision"] == 1.0

    add(
        redis_client,
        DLQ,
        [
            {b"kind": b"txn", b"reason": b"bad_json", b"raw": b"{\xff\x1b[2J", b"origin": b"f\xfe:3"},
            {b"raw": b"\x9b31m"},  # every other field missing
        ],
    )
    result = cli.invoke(app, ["dead-letters"])
    assert result.exit_code == 0, result.output
    assert " ?:? txn=? ?\n" in result.stdout and "raw: \\x9b31m" in result.stdout
    assert "txn:bad_json txn=? ?" in result.stdout and "raw: {\\xff\\x1b[2J" in result.stdout
    assert "from: f\\xfe:3" in result.stdout
    assert_terminal_safe(result.stdout)


def test_alert_precision_reads_the_stream_in_pages(
    redis_client: redis.Redis, cli: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = add(redis_client, ALERTS, [alert(i) for i in range(2500)])
    assert len(set(ids)) == 2500
    labels = tmp_path / "labels.jsonl"
    labels.write_text(
        "".join(
            f'{{"txn_id": "t{i}", "is_fraud": {str(i % 2 == 0).lower()}, "ts": 1714564800000}}\n'
            for i in range(10)
        )
    )
    counts: list[int | None] = []
    xrange = redis.Redis.xrange

    def spy(self: redis.Redis, *args: Any, **kw: Any) -> Any:
        counts.append(kw.get("count"))
        return xrange(self, *args, **kw)

    monkeypatch.setattr(redis.Redis, "xrange", spy)
    result = cli.invoke(app, ["alert-precision", "--labels", str(labels)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["alerts"] == report["distinct_transactions"] == 2500
    assert report["alerts_with_a_label"] == 10 and report["true_frauds_alerted"] == 5
    assert counts == [1000, 1000, 1000]


# -- re-delivery ----------------------------------------------------------------------------------


def test_a_batch_read_but_not_acknowledged_is_shown_again(redis_client: redis.Redis) -> None:
    ids = add(redis_client, ALERTS, [alert(i) for i in range(5)])
    ensure_group(redis_client, ALERTS, "g")
    read = read_alerts(redis_client, ALERTS, "g", "me", count=3)  # then the process died before XACK
    assert [entry_id for entry_id, _ in read] == ids[:3] and pending_count(redis_client, ALERTS, "g") == 3

    n, text = drain(
        redis_client, ALERTS, group="g", as_json=True, limit=2
    )  # --limit counts re-deliveries too
    assert n == 2 and json_ids(text) == ids[:2]
    n, text = drain(redis_client, ALERTS, group="g", as_json=True)
    assert n == 3 and json_ids(text) == ids[2:]  # own pending first, then new ones
    assert pending_count(redis_client, ALERTS, "g") == 0
    assert drain(redis_client, ALERTS, group="g", as_json=True) == (0, "")  # a clean run shows nothing twice


def test_output_failing_midway_acknowledges_exactly_what_was_shown(redis_client: redis.Redis) -> None:
    ids = add(redis_client, ALERTS, [alert(i) for i in range(250)])
    cut = CutOutput(fail_at=137)
    with pytest.raises(BrokenPipeError):
        drain(redis_client, ALERTS, group="g", as_json=True, out=cut)
    first = json_ids(cut.getvalue())
    assert first == ids[:137]
    assert pending_count(redis_client, ALERTS, "g") == 100 - 37  # the rest of the cut batch
    n, text = drain(redis_client, ALERTS, group="g", as_json=True)
    assert n == 250 - 137 and json_ids(text) == ids[137:]
    assert pending_count(redis_client, ALERTS, "g") == 0


def test_deleted_pending_entries_are_acknowledged(redis_client: redis.Redis) -> None:
    ids = add(redis_client, ALERTS, [alert(i) for i in range(4)])
    ensure_group(redis_client, ALERTS, "g")
    read_alerts(redis_client, ALERTS, "g", "me", count=4)
    redis_client.xdel(ALERTS, ids[1], ids[2])
    n, text = drain(redis_client, ALERTS, group="g", as_json=True)
    assert n == 2 and json_ids(text) == [ids[0], ids[3]]
    assert pending_count(redis_client, ALERTS, "g") == 0


def test_entries_abandoned_by_another_consumer_are_claimed_when_idle(redis_client: redis.Redis) -> None:
    ids = add(redis_client, ALERTS, [alert(i) for i in range(3)])
    ensure_group(redis_client, ALERTS, "g")
    read_alerts(redis_client, ALERTS, "g", "crashed", count=2)
    n, text = drain(redis_client, ALERTS, group="g", consumer="me", as_json=True)  # not idle 5 minutes yet
    assert n == 1 and json_ids(text) == ids[2:]
    assert pending_count(redis_client, ALERTS, "g") == 2
    n, text = drain(redis_client, ALERTS, group="g", consumer="me", as_json=True, claim_idle_ms=0)
    assert n == 2 and json_ids(text) == ids[:2]
    assert pending_count(redis_client, ALERTS, "g") == 0


def test_a_server_without_xautoclaim_leaves_abandoned_entries_and_shows_the_rest() -> None:
    """Redis before 6.2 has no XAUTOCLAIM: the reader shows its own pending entries and new ones,
    and leaves another consumer's abandoned entries where they are, instead of failing."""
    from testkit.private_redis import private_redis

    with (
        private_redis(["--rename-command", "XAUTOCLAIM", "xautoclaim-not-here"]) as url,
        connect(url) as client,
    ):
        ids = add(client, ALERTS, [alert(i) for i in range(3)])
        ensure_group(client, ALERTS, "g")
        read_alerts(client, ALERTS, "g", "crashed", count=2)
        with pytest.raises(redis.ResponseError, match="unknown command"):
            client.xautoclaim(ALERTS, "g", "me", 0)
        n, text = drain(client, ALERTS, group="g", consumer="me", as_json=True, claim_idle_ms=0)
        assert n == 1 and json_ids(text) == ids[2:]
        owners = {c["name"]: c["pending"] for c in client.xpending(ALERTS, "g")["consumers"]}
        assert owners == {b"crashed": 2}


def test_a_limited_reader_claims_no_more_abandoned_entries_than_it_shows(redis_client: redis.Redis) -> None:
    """`--limit 2` takes two of another consumer's abandoned entries, not a page of them: the rest
    stay with their consumer, for whoever claims them next."""
    ids = add(redis_client, ALERTS, [alert(i) for i in range(5)])
    ensure_group(redis_client, ALERTS, "g")
    read_alerts(redis_client, ALERTS, "g", "crashed", count=5)
    n, text = drain(redis_client, ALERTS, group="g", consumer="me", as_json=True, claim_idle_ms=0, limit=2)
    assert n == 2 and json_ids(text) == ids[:2]
    owners = {c["name"]: c["pending"] for c in redis_client.xpending(ALERTS, "g")["consumers"]}
    assert owners == {b"crashed": 3}


def test_cli_alerts_piped_to_a_reader_that_leaves(redis_url: str, redis_client: redis.Redis) -> None:
    """`fraud alerts | head -1`: no traceback; what was not written stays pending and comes next."""
    ids = add(
        redis_client, ALERTS, [alert(i) for i in range(3000)]
    )  # ~700 kB of lines: more than a pipe holds
    proc = subprocess.Popen(
        [sys.executable, "-m", "fraud.cli", "alerts"],
        cwd=ROOT,
        env={**os.environ, "FRAUD_REDIS_URL": redis_url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b"2024-05-01T12:00:00Z  txn=t0 ")
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 0, err
    assert "Traceback" not in err and "output closed" in err
    delivered = ids.index(redis_client.xinfo_groups(ALERTS)[0]["last-delivered-id"].decode()) + 1
    left = pending_count(redis_client, ALERTS, "fraud-cli")
    assert 0 < left <= 100 and delivered < 3000  # the rest of the batch being written when it broke
    written = delivered - left  # the lines that reached the pipe, acknowledged
    n, text = drain(redis_client, ALERTS, group="fraud-cli", consumer="cli", as_json=True)
    assert n == 3000 - written and json_ids(text) == ids[written:]
    assert pending_count(redis_client, ALERTS, "fraud-cli") == 0


def json_reader(redis_url: str) -> subprocess.Popen[bytes]:
    """`fraud alerts --json` in a process of its own, its output in a pipe the test reads."""
    return subprocess.Popen(
        [sys.executable, "-m", "fraud.cli", "alerts", "--json"],
        cwd=ROOT,
        env={**os.environ, "FRAUD_REDIS_URL": redis_url},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )


def test_a_reader_killed_between_reading_and_printing_loses_no_alert(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """The consumer's guarantee under a crash: `fraud alerts --json` SIGKILLed while it holds a
    batch it has read but not printed whole (its output pipe is full and nobody reads it). The
    next reader of the group shows every alert the killed one did not write out; none is lost,
    and only the batch in flight may be shown twice."""
    ids = add(redis_client, ALERTS, [alert(i) for i in range(3000)])
    proc = json_reader(redis_url)
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    stalled = (-1, 0.0)  # (entries delivered to the group, since when unchanged)
    while time.monotonic() < deadline:  # it reads batches until the pipe fills, then blocks
        groups = redis_client.xinfo_groups(ALERTS)
        last = groups[0]["last-delivered-id"].decode() if groups else "0-0"
        delivered = ids.index(last) + 1 if last in ids else 0  # "0-0": the group exists, none read yet
        if delivered != stalled[0]:
            stalled = (delivered, time.monotonic())
        elif delivered and time.monotonic() - stalled[1] > 1.0:
            break
        time.sleep(0.05)
    try:
        assert 0 < stalled[0] < 3000 and proc.poll() is None, "the reader did not block on its output"
        assert pending_count(redis_client, ALERTS, "fraud-cli") > 0  # a batch read, not all printed
    except AssertionError:  # no reader left running into the next test
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
        raise
    proc.kill()
    proc.wait(timeout=30)
    written = proc.stdout.read().decode()
    proc.stdout.close()
    first = json_ids("".join(line + "\n" for line in written.split("\n")[:-1]))  # whole lines only
    n, text = drain(redis_client, ALERTS, group="fraud-cli", consumer="cli", as_json=True)
    second = json_ids(text)
    assert n == len(second) and set(first) | set(second) == set(ids)  # nothing lost
    assert first == ids[: len(first)] and second[-1] == ids[-1]
    assert len(first) + len(second) - 3000 <= 100  # shown twice: at most the batch in flight
    assert pending_count(redis_client, ALERTS, "fraud-cli") == 0


def test_a_reader_killed_between_printing_and_acknowledging_shows_the_batch_again(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """The other crash point: `fraud alerts --json` has written a whole batch and dies before its
    XACK reaches Redis (held there: the test pauses Redis's writes once the batch is almost all
    read, then SIGKILLs the reader waiting on its XACK). Nothing was acknowledged, so the next
    reader of the group shows that batch again, then the rest: at least once, never lost."""
    ids = add(redis_client, ALERTS, [alert(i, note="x" * 2000) for i in range(150)])  # 100 lines > a pipe
    ours = {c["id"] for c in redis_client.client_list()}
    proc = json_reader(redis_url)
    assert proc.stdout is not None
    try:
        lines = [proc.stdout.readline() for _ in range(40)]  # the writer is blocked on the full pipe
        assert pending_count(redis_client, ALERTS, "fraud-cli") == 100  # one batch read, none acked
        redis_client.execute_command("CLIENT", "PAUSE", 20_000, "WRITE")  # XACK now waits
        lines += [proc.stdout.readline() for _ in range(60)]  # the rest of the batch: all printed
        time.sleep(0.5)
        assert proc.poll() is None and pending_count(redis_client, ALERTS, "fraud-cli") == 100
        proc.kill()
        proc.wait(timeout=30)
        # Unpause only once Redis has dropped the dead reader's connection: a held XACK of a
        # connection still open when writes resume would run (the reader had sent it).
        deadline = time.monotonic() + 20
        while {c["id"] for c in redis_client.client_list()} - ours and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not {c["id"] for c in redis_client.client_list()} - ours, "the reader's connection outlived it"
    finally:
        redis_client.execute_command("CLIENT", "UNPAUSE")
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
    first = json_ids(b"".join(lines).decode())
    assert first == ids[:100]  # the whole batch was shown, then the reader died
    assert pending_count(redis_client, ALERTS, "fraud-cli") == 100  # and none acknowledged
    n, text = drain(redis_client, ALERTS, group="fraud-cli", consumer="cli", as_json=True)
    assert n == 150 and json_ids(text) == ids  # shown again, then the rest
    assert pending_count(redis_client, ALERTS, "fraud-cli") == 0


def test_cli_dead_letters_piped_to_a_reader_that_leaves(redis_url: str, redis_client: redis.Redis) -> None:
    """`fraud dead-letters --count 3000 | head -1`: no BrokenPipeError traceback."""
    with redis_client.pipeline(transaction=False) as pipe:
        for i in range(3000):
            pipe.xadd(
                "fraud:dlq",
                {
                    "kind": "txn",
                    "reason": "bad_json",
                    "detail": "x" * 200,
                    "raw": "{" * 200,
                    "txn_id": f"t{i}",
                },
            )
        pipe.execute()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fraud.cli", "dead-letters", "--count", "3000"],
        cwd=ROOT,
        env={**os.environ, "FRAUD_REDIS_URL": redis_url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert b"bad_json" in proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err


# -- fuzz -----------------------------------------------------------------------------------------

CONTROLS = [
    *map(chr, range(0x20)), "\x7f", *map(chr, range(0x80, 0xA0)), "\u200b", "\u200d", "\u202a",
    "\u202e", "\u2066", "\u2069", "\u2028", "\u2029", "\ufeff", "\ue000", "\U000e0001",
    "\x1b[2J", "\x1b]0;title\x07", "\x1b]8;;http://x\x1b\\", "\x1b[1A\x1b[2K", "\x1bP+q\x1b\\",
]  # fmt: skip
PLAIN = ["a", "Z", "0", " ", "é", "€", "😀", "\\", '"', "[", "{", "😀\u200d😀"]
KEYS = ["txn_id", "card_id", "merchant_id", "ts", "score", "xgb_score", "online_score", "threshold",
        "model_version", "reasons", "kind", "reason", "detail", "raw", "origin"]  # fmt: skip


def hostile(rng: random.Random) -> bytes:
    """One value meant to break a reader."""
    kind = rng.randrange(12)
    if kind == 0:
        return rng.randbytes(rng.randrange(64))
    if kind == 1:
        return b"[" * rng.randrange(1_000, 40_000)
    if kind == 2:
        depth = rng.randrange(500, 3_000)
        return b"[" * depth + b"]" * depth
    if kind == 3:
        return "".join(rng.choice(CONTROLS + PLAIN) for _ in range(rng.randrange(1, 60))).encode()
    if kind == 4:
        return rng.choice(
            [b"nan", b"inf", b"-inf", b"1e999", b"9" * 5000, b"", b"-0", b"0x1f", b"1_0", b"\x00"]
        )
    if kind == 5:
        value = rng.choice([None, "x", [1, [2]], {"a": 1}, True, 1e308, -0.0])
        feature = rng.choice(["f", "", None, 3, ["x"], {"y": 1}, "".join(rng.choices(CONTROLS, k=5))])
        item = {"feature": feature, "value": value, "contribution": rng.choice([0.5, "x", None, [], 1])}
        return json.dumps([item, 1, "s", None, [item]] * rng.randrange(1, 30)).encode()
    if kind == 6:
        return rng.choice(
            [
                b"[NaN, Infinity]",
                b'[{"value": 1' + b"0" * 400 + b"}]",
                b'{"a": 1}',
                b'"s"',
                b"[1,2",
                b"[]",
                b"null",
            ]
        )
    if kind == 7:
        return rng.choice([b"\xed\xa0\x80", b"\xc0\xaf", b"\xe2\x82", b"\xf4\x90\x80\x80", b"\xff\xfe"])
    if kind == 8:
        return (
            json.dumps([{"feature": "x", "value": 1, "contribution": 1}] * rng.randrange(1_000, 5_000))
        ).encode()
    return "".join(rng.choices(PLAIN, k=rng.randrange(0, 20))).encode()


def hostile_entry(rng: random.Random, i: int) -> Any:
    shape = rng.randrange(100)
    if shape < 45:
        return alert(i)
    if shape < 48:
        return {b"": b""}  # the emptiest entry XADD accepts
    if shape < 50:  # huge
        return {
            rng.choice(KEYS).encode(): rng.choice([b"A", "é".encode(), b"\x1b[2J"])
            * rng.randrange(50_000, 200_000)
        }
    fields: RawFields = {}
    for key in rng.sample(KEYS, rng.randrange(1, len(KEYS))):
        fields[key.encode()] = hostile(rng)
    for _ in range(rng.randrange(3)):  # extra fields with hostile names
        fields[hostile(rng)[:100] or b"_"] = hostile(rng)
    return fields


def test_fuzz_every_reader_survives_hostile_streams(
    redis_client: redis.Redis, cli: CliRunner, tmp_path: Path
) -> None:
    rng = random.Random(1212)
    total = 3000
    ids = add(redis_client, ALERTS, [hostile_entry(rng, i) for i in range(total)])

    n, text = drain(redis_client, ALERTS, group="text", as_json=False)
    assert n == total and len(text.splitlines()) == total  # one line each, whatever the content
    assert_terminal_safe(text)
    assert pending_count(redis_client, ALERTS, "text") == 0

    n, text = drain(redis_client, ALERTS, group="json", as_json=True)
    assert n == total and text.isascii() and json_ids(text) == ids
    assert pending_count(redis_client, ALERTS, "json") == 0

    cut = CutOutput(fail_at=rng.randrange(1, total))  # interrupted, then resumed: each shown once
    with pytest.raises(BrokenPipeError):
        drain(redis_client, ALERTS, group="cut", as_json=True, out=cut)
    n, rest = drain(redis_client, ALERTS, group="cut", as_json=True)
    assert json_ids(cut.getvalue()) + json_ids(rest) == ids and n == total - cut.fail_at
    assert pending_count(redis_client, ALERTS, "cut") == 0

    labels = tmp_path / "labels.jsonl"
    labels.write_text(
        "".join(f'{{"txn_id": "t{i}", "is_fraud": true, "ts": 1714564800000}}\n' for i in range(total))
    )
    result = cli.invoke(app, ["alert-precision", "--labels", str(labels)])
    assert result.exit_code == 0, result.output
    valid = sum(
        1 for line in text.splitlines() if json.loads(line)["fields"].get("txn_id", "").startswith("t")
    )
    report = json.loads(result.stdout)
    assert report["alerts"] == total and report["alerts_with_a_label"] <= valid

    dead_ids = add(redis_client, DLQ, [hostile_entry(rng, i) for i in range(600)])
    result = cli.invoke(app, ["dead-letters", "--count", "600"])
    assert result.exit_code == 0, result.output
    assert_terminal_safe(result.stdout)
    heads = [line.split(" ", 1)[0] for line in result.stdout.splitlines() if not line.startswith("    ")]
    assert heads == dead_ids[::-1]


def reasons_shown(reasons: list[Any] | str) -> str:
    """The reasons part of `fraud alerts`' text line for an alert with these reasons."""
    raw = reasons if isinstance(reasons, str) else json.dumps(reasons)
    return format_alert(alert(0, reasons=raw)).split("  reasons: ", 1)[1]


def test_the_text_line_shows_each_kind_of_reason() -> None:
    """What an analyst reads for each reason: a rule with the action it took, a feature with its
    value (`na` when the model saw it missing, `?` when the entry does not say) and contribution."""
    assert reasons_shown([{"rule": "velocity_24h", "action": "review"}, {"rule": "blocklist"}]) == (
        "rule velocity_24h (review), rule blocklist (?)"
    )
    assert (
        reasons_shown(
            [
                {"feature": "amount", "value": 15_000_000.0, "contribution": 0.31},
                {"feature": "device_new", "value": None, "contribution": -0.05},
                {"feature": "hour", "contribution": 0.2},
                {"feature": 5, "value": 1, "contribution": 0.1},
                {"feature": "", "value": 2, "contribution": 0.1},
            ]
        )
        == "amount=1.5e+07 (+0.310), device_new=na (-0.050), hour=? (+0.200), ?=1 (+0.100), ?=2 (+0.100)"
    )
    assert (
        reasons_shown('[{"feature": "amount", "value": 1e999, "contribution": 1e999}]') == "amount=inf (+inf)"
    )
    assert reasons_shown([]) == "none" and reasons_shown("not json") == "?" and reasons_shown("{}") == "?"


def test_a_long_list_of_reasons_stops_once_past_the_field_cap() -> None:
    """Reasons are shown until their text passes `FIELD_CAP` characters, then counted: four
    reasons of exactly a quarter of the cap (with their separators) are not past it, so a fifth
    is shown, then the line says how many more there are."""
    name = "f" * (FIELD_CAP // 4 - len("=1 (+0.100)") - len(", "))
    reasons = [{"feature": name, "value": 1, "contribution": 0.1}] * 8
    part = f"{name}=1 (+0.100)"
    assert len(part) + 2 == FIELD_CAP // 4
    assert reasons_shown(reasons) == ", ".join([part] * 5) + "… (3 more reasons)"
    longer = [{"feature": name + "ff", "value": 1, "contribution": 0.1}] * 8  # four pass the cap
    assert reasons_shown(longer) == ", ".join([f"{name}ff=1 (+0.100)"] * 4) + "… (4 more reasons)"


def test_a_blocking_read_waits_for_the_next_alert(redis_url: str, redis_client: redis.Redis) -> None:
    ensure_group(redis_client, ALERTS, "g", start_id="$")
    timer = threading.Timer(0.3, lambda: add(redis.Redis.from_url(redis_url), ALERTS, [alert(1)]))
    timer.start()
    try:
        got = read_alerts(redis_client, ALERTS, "g", "me", block_ms=10_000)
    finally:
        timer.join()
    assert [fields["txn_id"] for _, fields in got] == ["t1"]
    assert read_alerts(redis_client, ALERTS, "g", "me", block_ms=None) == []  # returns at once


def test_scanning_a_stream_reads_every_entry_once_in_order_across_pages(redis_client: redis.Redis) -> None:
    """`scan_stream` pages by the last id seen, also across a sequence number at its maximum."""
    top = 2**64 - 1
    ids = ["5-1", f"5-{top - 1}", f"5-{top}", "6-0", "7-0", "7-1", "8-0"]
    for entry_id in ids:
        redis_client.xadd(ALERTS, {"n": entry_id}, id=entry_id)
    for page in (1, 2, 3, 100):
        scanned = list(itertools.islice(scan_stream(redis_client, ALERTS, page), 20))
        assert [entry_id for entry_id, _ in scanned] == ids, page
        assert [fields[b"n"].decode() for _, fields in scanned] == ids
    assert list(scan_stream(redis_client, "fraud:nothing-here", 10)) == []


def test_the_text_line_of_an_alert() -> None:
    """The whole line an analyst reads: time, ids, the three scores and the threshold to three
    decimals, the model, what a rule made of it (only when it is not a plain alert), the reasons."""
    assert format_alert(alert(0)) == (
        "2024-05-01T12:00:00Z  txn=t0  card=c0  merchant=m1  score=0.910 (xgb 0.900, online 0.200; "
        "threshold 0.500)  model=v1  reasons: amount_z=4.2 (+0.310)"
    )
    assert format_alert(alert(0, action="alert")) == format_alert(alert(0))
    assert "  model=v1  action=review  reasons: " in format_alert(alert(0, action="review"))
    assert "  model=v1  action=block  reasons: " in format_alert(alert(0, action="block"))
    assert "threshold ?)" in format_alert({**alert(0), "threshold": "high"})
    assert "  score=inf (xgb nan, " in format_alert({**alert(0), "score": "inf", "xgb_score": "nan"})


def test_the_json_line_of_an_alert_is_compact_ascii_strict_json() -> None:
    """`fraud alerts --json` writes one compact line per alert: no spaces after separators,
    every non-ASCII or control character escaped, reasons decoded; reasons holding NaN (not JSON)
    stay the raw string."""
    fields = alert(0, merchant_id="café\x1b")
    line = alert_json("1-0", fields)
    assert line.startswith(
        '{"id":"1-0","fields":{"txn_id":"t0","card_id":"c0","merchant_id":"caf\\u00e9\\u001b",'
    )
    assert line.isascii() and ", " not in line and '": ' not in line
    assert json.loads(line)["fields"]["reasons"] == [
        {"feature": "amount_z", "value": 4.2, "contribution": 0.31}
    ]
    nan = alert(0, reasons='[{"feature": "a", "value": NaN}]')
    assert json.loads(alert_json("1-0", nan))["fields"]["reasons"] == '[{"feature": "a", "value": NaN}]'


def test_a_long_pending_list_is_shown_whole_before_new_alerts(redis_client: redis.Redis) -> None:
    """A reader that died holding more than a batch (here 250 read, none acknowledged) gets them
    all back, page after page, before the alerts that came since."""
    ids = add(redis_client, ALERTS, [alert(i) for i in range(250)])
    ensure_group(redis_client, ALERTS, "g")
    for _ in range(3):
        read_alerts(redis_client, ALERTS, "g", "me", count=100)
    more = add(redis_client, ALERTS, [alert(i) for i in range(250, 260)])
    n, text = drain(redis_client, ALERTS, group="g", as_json=True)
    assert n == 260 and json_ids(text) == ids + more
    assert pending_count(redis_client, ALERTS, "g") == 0


def test_an_entry_the_reader_cannot_render_is_shown_as_such_and_acknowledged(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The safety net for a rendering bug (planted here: no entry makes the renderers raise): the
    entry gets a line naming it and the error, and is acknowledged, instead of stopping the reader
    and coming back forever."""
    ids = add(redis_client, ALERTS, [alert(0), alert(1)])

    def broken(*_: Any) -> str:
        raise RuntimeError("a bug")

    monkeypatch.setattr("fraud.consumer.format_alert", broken)
    monkeypatch.setattr("fraud.consumer.alert_json", broken)
    n, text = drain(redis_client, ALERTS, group="g", as_json=False)
    assert n == 2 and text.splitlines() == [f"{i}  unprintable entry (RuntimeError)" for i in ids]
    ids = add(redis_client, ALERTS, [alert(2)])
    n, text = drain(redis_client, ALERTS, group="g", as_json=True)
    assert n == 1 and text == f'{{"id":"{ids[0]}","error":"unprintable entry (RuntimeError)"}}\n'
    assert pending_count(redis_client, ALERTS, "g") == 0
