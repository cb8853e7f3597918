"""`fraud alerts`, `fraud alert-precision`, `fraud dead-letters`, `fraud drift`: the commands that
read the flow's output streams (`fraud.cli` registers them). Stream content is untrusted:
everything shown goes through `fraud.display`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from fraud.display import decode, print_json
from service.settings import get_settings


def alerts(
    stream: Annotated[str | None, typer.Option(help="Stream to read (default: FRAUD_ALERTS_STREAM).")] = None,
    group: str = "fraud-cli",
    consumer: str = "cli",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep waiting for new alerts.")] = False,
    limit: Annotated[int | None, typer.Option(help="Stop after this many.")] = None,
    claim_idle: Annotated[
        float,
        typer.Option(
            min=0,
            help="Also show entries other consumers of the group read but left unacknowledged for "
            "this many minutes (XAUTOCLAIM).",
        ),
    ] = 5.0,
) -> None:
    """Read alerts as a member of a consumer group; XACK each once printed.

    Shows this consumer's pending alerts first (those an interrupted run
    did not show), then alerts other consumers left unacknowledged for
    --claim-idle minutes, then new ones. Text lines escape control
    characters and cap each field at 512 characters; --json is complete.
    """
    from fraud.consumer import consume
    from service.redis_client import connect
    from service.redis_server import redis_url

    s = get_settings()
    client = connect(redis_url(s))
    try:
        n = consume(
            client,
            stream or s.alerts_stream,
            group,
            consumer,
            follow=follow,
            as_json=as_json,
            limit=limit,
            out=sys.stdout,
            claim_idle_ms=round(claim_idle * 60_000),
        )
        sys.stdout.flush()
    except BrokenPipeError:
        # `fraud alerts | head`: the reader left. What reached the pipe was acknowledged, the rest
        # stays pending for this consumer's next run. Point stdout at /dev/null so the interpreter's
        # final flush does not raise again.
        quiet_stdout()
        typer.echo(f"output closed; alerts not shown stay pending for {consumer!r} in {group!r}", err=True)
        return
    finally:
        client.close()
    typer.echo(f"{n} alert(s)", err=True)


def alert_precision(labels: Path | None = None) -> None:
    """Precision and recall of the alerts now in the stream, judged by a labels file (read-only).

    Reads the stream in pages of 1000 entries (XRANGE … COUNT); an entry
    without a readable txn_id counts as an alert that no label matches.
    """
    from fraud.consumer import scan_stream
    from fraud.dataset import read_truth
    from service.redis_client import connect
    from service.redis_server import redis_url

    s = get_settings()
    labs = labels or s.labels_path
    if labs is None:
        raise typer.BadParameter("needs a labels file (--labels or FRAUD_LABELS_PATH)")
    truth = read_truth(labs)
    client = connect(redis_url(s))
    try:
        alerted = [decode(f.get(b"txn_id", b"")) for _, f in scan_stream(client, s.alerts_stream)]
    finally:
        client.close()
    labelled = [t for t in alerted if t in truth]
    hits = sum(truth[t] for t in labelled)
    frauds = sum(truth.values())
    print_json(
        {
            "alerts": len(alerted),
            "distinct_transactions": len(set(alerted)),
            "alerts_with_a_label": len(labelled),
            "true_frauds_alerted": hits,
            "precision": hits / len(labelled) if labelled else None,
            "frauds_in_labels": frauds,
            "recall": hits / frauds if frauds else None,
        }
    )


def dead_letters(
    count: Annotated[int, typer.Option(help="How many of the newest to show.")] = 20,
) -> None:
    """Show the newest dead letters with their reasons (read-only: XREVRANGE).

    Dead letters hold whatever a producer sent, so values are shown safely:
    invalid UTF-8 as \\xNN, control characters escaped, the raw payload
    capped at 200 characters and other fields at 512, a missing field as ?.
    """
    from fraud.display import show, write_line

    s = get_settings()
    entries, total = newest(s.dlq_stream, count)
    try:
        for entry_id, fields in entries or []:
            f = {decode(k): v for k, v in (fields or {}).items()}
            head = (
                f"{show(entry_id)} {show(f.get('kind'))}:{show(f.get('reason'))} txn={show(f.get('txn_id'))}"
            )
            write_line(sys.stdout, f"{head} {show(f.get('detail'))}")
            write_line(sys.stdout, f"    raw: {show(f.get('raw'), 200, missing='')}")
            if f.get("origin"):
                write_line(sys.stdout, f"    from: {show(f['origin'])}")
    except BrokenPipeError:  # `fraud dead-letters | head`: read-only, nothing to keep pending
        quiet_stdout()
        return
    typer.echo(f"{total} dead letter(s) in {s.dlq_stream}", err=True)


def drift(
    count: Annotated[int, typer.Option(help="How many of the newest to show.")] = 20,
) -> None:
    """Show the newest drift events (read-only: XREVRANGE): data drift (a feature's or the
    score's PSI against the training rows) and concept drift (a model missing more frauds)."""
    from fraud.display import show, write_line

    s = get_settings()
    entries, total = newest(s.drift_stream, count)
    try:
        for _, fields in entries or []:
            f = {decode(k): v for k, v in (fields or {}).items()}
            write_line(
                sys.stdout,
                f"{show(f.get('at'))} {show(f.get('kind'))} {show(f.get('what'))} {show(f.get('state'))}: "
                f"{show(f.get('value'))} against {show(f.get('threshold'))}, since {show(f.get('since'))}",
            )
    except BrokenPipeError:
        quiet_stdout()
        return
    typer.echo(f"{total} drift event(s) in {s.drift_stream}", err=True)


def newest(stream: str, count: int) -> tuple[list[Any], int]:
    """The newest `count` entries of `stream` (XREVRANGE) and its length: read-only."""
    from service.redis_client import connect
    from service.redis_server import redis_url

    client = connect(redis_url(get_settings()))
    try:
        return list(client.xrevrange(stream, count=count) or []), int(client.xlen(stream))
    finally:
        client.close()


def quiet_stdout() -> None:
    """After the reader of a pipe left: point stdout at /dev/null, so that the interpreter's final
    flush does not raise BrokenPipeError again (a traceback on exit)."""
    import contextlib
    import os

    with contextlib.suppress(OSError, ValueError):  # no real descriptor (e.g. under CliRunner)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
