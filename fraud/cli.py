"""`fraud …`: generate data, train, evaluate, run the flow, read alerts. Calls what the flow calls."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from service.settings import SAMPLES, get_settings

app = typer.Typer(help="Real-time card fraud scoring.", no_args_is_help=True, add_completion=False)


def _text(value: Any) -> str:
    """A Redis value as text; invalid UTF-8 shows as `\\xNN` rather than raising (stream data is untrusted)."""
    from fraud.display import decode

    return decode(value)


def _print_json(doc: Any) -> None:
    # ensure_ascii (the default, made explicit): control characters from stream data leave as \uNNNN
    typer.echo(json.dumps(doc, indent=2, default=str, ensure_ascii=True))


@app.command()
def generate(
    out: Annotated[Path, typer.Option(help="Output directory.")] = SAMPLES,
    seed: int = 7,
    days: int = 90,
    cards: int = 1000,
    merchants: int = 200,
    fraud_rate: float = 0.009,
    drift_day: Annotated[int, typer.Option(help="Day the late fraud pattern starts; 0 disables it.")] = 60,
    gzip: Annotated[bool, typer.Option("--gzip/--no-gzip", help="Write .jsonl.gz files.")] = True,
    mix: Annotated[
        str | None,
        typer.Option(help="Fraud pattern weights, e.g. card_testing=1,compromised_terminal=2."),
    ] = None,
    label_policy: Annotated[
        str, typer.Option(metavar="[all|fraud_and_sample]", help="Label all txns, or fraud + a legit sample.")
    ] = "all",
    legit_label_share: Annotated[
        float, typer.Option(help="With fraud_and_sample: chance that a legit txn gets a label.")
    ] = 1.0,
    label_delay: Annotated[
        str, typer.Option(metavar="[lognormal|fixed|spread]", help="How long labels take to arrive.")
    ] = "lognormal",
    label_delay_days: Annotated[float, typer.Option(help="fixed: the delay of every label, in days.")] = 7.0,
    label_delay_min_days: Annotated[float, typer.Option(help="spread: shortest label delay, in days.")] = 1.0,
    label_delay_max_days: Annotated[float, typer.Option(help="spread: longest label delay, in days.")] = 35.0,
    minimal: Annotated[
        bool, typer.Option("--minimal/--full-fields", help="Only the required fields (+ pattern on fraud).")
    ] = False,
    labels_after_end: Annotated[
        bool, typer.Option(help="Keep labels that arrive after the last day (to judge the last days).")
    ] = False,
    world: Annotated[
        str | None,
        typer.Option(
            help="A named world of fraud/worlds.py (benchmarks/quality.py); takes --seed, --cards "
            "and --merchants, and sets everything else."
        ),
    ] = None,
) -> None:
    """Write deterministic synthetic transactions.jsonl and labels.jsonl (delayed labels)."""
    from fraud.datagen import LABEL_DELAYS, LABEL_POLICIES, GeneratorConfig, parse_mix, write_files

    if world is not None:
        from fraud.worlds import WORLDS

        if world not in WORLDS:
            raise typer.BadParameter(f"must be one of {', '.join(WORLDS)}", param_hint="--world")
        _print_json(write_files(out, WORLDS[world].config(seed, cards, merchants), compress=gzip))
        return

    if label_policy not in LABEL_POLICIES:
        raise typer.BadParameter(f"must be one of {', '.join(LABEL_POLICIES)}", param_hint="--label-policy")
    if label_delay not in LABEL_DELAYS:
        raise typer.BadParameter(f"must be one of {', '.join(LABEL_DELAYS)}", param_hint="--label-delay")
    policy = LABEL_POLICIES[LABEL_POLICIES.index(label_policy)]  # the same string, typed as the Literal
    delay = LABEL_DELAYS[LABEL_DELAYS.index(label_delay)]
    try:
        weights = None if mix is None else parse_mix(mix)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--mix") from None
    try:
        cfg = GeneratorConfig(
            seed=seed, days=days, n_cards=cards, n_merchants=merchants, fraud_rate_target=fraud_rate,
            drift_day=drift_day or None, mix=weights, label_policy=policy, legit_label_share=legit_label_share,
            label_delay=delay,
            label_delay_days=label_delay_days, label_delay_min_days=label_delay_min_days,
            label_delay_max_days=label_delay_max_days, minimal=minimal, labels_after_end=labels_after_end,
        )  # fmt: skip
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    _print_json(write_files(out, cfg, compress=gzip))


@app.command()
def train(
    transactions: Path | None = None,
    labels: Path | None = None,
    out: Annotated[Path | None, typer.Option(help="Artifact directory (default: FRAUD_MODEL_PATH).")] = None,
    start_day: Annotated[float, typer.Option(help="First training day (days of history before it).")] = 0,
    train_days: float = 38,
    gap_days: Annotated[float, typer.Option(help="Days skipped after training: the label delay.")] = 7,
    valid_days: Annotated[float, typer.Option(help="Days that tune the model and its threshold.")] = 10,
    test_days: Annotated[float, typer.Option(help="Days judged after validation.")] = 10,
    k: Annotated[int, typer.Option(min=1, help="Cards reviewed per day, for Card Precision@k.")] = 100,
    search: Annotated[
        bool, typer.Option("--search/--no-search", help="Tune XGBoost on validation (8 fits).")
    ] = True,
    seed: int = 0,
) -> None:
    """Replay a file through the feature engine, train and tune XGBoost, judge a later period, save."""
    from fraud import train as training
    from service.runtime import new_pipeline

    s = get_settings()
    txns = transactions or s.transactions_path
    labs = labels or s.labels_path
    if labs is None:
        raise typer.BadParameter("training needs a labels file (--labels or FRAUD_LABELS_PATH)")
    split = training.Split(train_days, valid_days, test_days, gap_days, start_day)
    try:
        report = training.train(
            s, new_pipeline(s), txns, labs, out or s.model_path, split=split, k=k, search=search, seed=seed
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    _print_json(report)


@app.command()
def evaluate(
    transactions: Path | None = None,
    labels: Path | None = None,
    drift_day: Annotated[
        float, typer.Option(help="Split periods at this day (the late pattern's start).")
    ] = 60,
    end_day: float = 90,
    start_day: float = 55,
    k: Annotated[int, typer.Option(min=1, help="Cards reviewed per day, for Card Precision@k.")] = 100,
) -> None:
    """Replay through the serving scorer; judge XGBoost alone and XGBoost + the online model."""
    from fraud import train as training
    from service.runtime import load_model, new_pipeline

    s = get_settings()
    pipeline = new_pipeline(s)
    labs = labels or s.labels_path
    if labs is None:
        raise typer.BadParameter("evaluation needs a labels file")
    periods = [("before_drift", start_day, drift_day), ("after_drift", drift_day, end_day)]
    report = training.evaluate(
        s, pipeline, load_model(s, pipeline), transactions or s.transactions_path, labs, periods, k=k
    )
    _print_json(report)


@app.command()
def run(
    process_id: Annotated[
        int, typer.Option("--process-id", "-i", help="This process's index in --addresses.")
    ] = 0,
    addresses: Annotated[
        str | None, typer.Option("--addresses", "-a", help="host:port;host:port of every process.")
    ] = None,
    workers: Annotated[int, typer.Option("--workers", "-w", help="Worker threads in this process.")] = 1,
    fresh: Annotated[
        bool,
        typer.Option(
            "--fresh",
            help="If the recovery store is damaged, missing or not the one behind the outputs, move it "
            "aside and start a new one (FRAUD_RECOVERY_FRESH=1) instead of refusing.",
        ),
    ] = False,
) -> None:
    """Run the flow here with recovery (FRAUD_RECOVERY_DIR, created if missing), alone or in a cluster.

    A recovery store that cannot be trusted is refused with one line naming the file and the fix,
    and exit status 2, before anything starts.
    """
    from flows.runner import RecoveryStoreError
    from flows.runner import run as run_flow

    s = get_settings()
    if fresh:
        s = s.model_copy(update={"recovery_fresh": True})
    try:
        run_flow(
            s,
            process_id=process_id,
            addresses=addresses.split(";") if addresses else None,
            workers=workers,
        )
    except RecoveryStoreError as exc:
        typer.echo(f"fraud run: refused: {exc}", err=True)
        raise typer.Exit(2) from None
    except Exception as exc:
        why = _redis_failure(exc)
        if why is None:
            raise
        typer.echo(f"fraud run: stopped: {why}", err=True)
        raise typer.Exit(1) from None


def _redis_failure(exc: BaseException) -> BaseException | None:
    """The Redis configuration error or spent outage budget behind `exc` (Bytewax wraps a step's
    exception in its own, several levels deep), so that `fraud run` prints it as one line instead
    of a traceback of hundreds; None for anything else, which keeps its traceback."""
    from service.redis_client import RedisConfigError, RedisUnavailableError

    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, RedisConfigError | RedisUnavailableError):
            return e
        todo += [e.__cause__, e.__context__]
    return None


@app.command()
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
        _quiet_stdout()
        typer.echo(f"output closed; alerts not shown stay pending for {consumer!r} in {group!r}", err=True)
        return
    finally:
        client.close()
    typer.echo(f"{n} alert(s)", err=True)


@app.command()
def features(
    out: Annotated[Path, typer.Option(help="CSV file to write (.csv.gz for gzip).")],
    transactions: Path | None = None,
    labels: Path | None = None,
) -> None:
    """Replay a file through the feature engine; write one CSV row of features per transaction."""
    from features.export import export_matrix
    from service.runtime import new_pipeline

    s = get_settings()
    stats = export_matrix(new_pipeline(s), transactions or s.transactions_path, labels or s.labels_path, out)
    _print_json(
        {
            "out": str(out),
            "rows": stats.rows,
            "late": stats.late,
            "labels_joined": stats.labels,
            "dead_letters": stats.dead_letter_total,
            "dead_letters_by_reason": dict(sorted(stats.dead_letters.items())),
        }
    )


@app.command()
def replay(
    transactions: Annotated[
        Path | None, typer.Argument(help="Transactions file (default: FRAUD_TRANSACTIONS_PATH).")
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option(help="Labels file (default: FRAUD_LABELS_PATH; '' for none: transactions only)."),
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(min=0.001, help="Records per second overall (default: as fast as possible)."),
    ] = None,
    shards: Annotated[
        int | None, typer.Option(min=1, help="Shard streams (default: FRAUD_INPUT_SHARDS).")
    ] = None,
    maxlen: Annotated[
        int | None,
        typer.Option(min=0, help="Approximate trim per shard (default: FRAUD_STREAM_MAXLEN; 0: none)."),
    ] = None,
) -> None:
    """Push a file (+ labels) into the input shard streams in event time, for `FRAUD_SOURCE=redis`."""
    import redis
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from fraud.producer import count_lines, replay_files
    from service.redis_client import connect, redact
    from service.redis_server import redis_url

    s = get_settings()
    txns = transactions or s.transactions_path
    labs = s.labels_path if labels is None else (Path(labels) if labels else None)
    for p in (txns, labs):
        if p is not None and not p.is_file():
            raise typer.BadParameter(f"input file {p} does not exist")
    n_shards = shards or s.input_shards
    trim = s.stream_maxlen if maxlen is None else (maxlen or None)
    url = redis_url(s)
    client = connect(url)
    progress = Progress(
        TextColumn("replay"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), transient=True,
    )  # fmt: skip
    try:
        with progress:
            task = progress.add_task("replay", total=count_lines(txns, labs))
            summary = replay_files(
                client, txns, labs, s.input_stream, n_shards, rate=rate, maxlen=trim,
                on_progress=lambda n: progress.advance(task, n),
            )  # fmt: skip
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        typer.echo(f"replay to {redact(url)} failed: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from exc
    finally:
        client.close()
    _print_json({"redis": redact(url), **summary})


@app.command("alert-precision")
def alert_precision(labels: Path | None = None) -> None:
    """Precision and recall of the alerts now in the stream, judged by a labels file (read-only).

    Reads the stream in pages of 1000 entries (XRANGE … COUNT); an entry
    without a readable txn_id counts as an alert that no label matches.
    """
    from fraud.consumer import scan_stream
    from fraud.train import read_truth
    from service.redis_client import connect
    from service.redis_server import redis_url

    s = get_settings()
    labs = labels or s.labels_path
    if labs is None:
        raise typer.BadParameter("needs a labels file (--labels or FRAUD_LABELS_PATH)")
    truth = read_truth(labs)
    client = connect(redis_url(s))
    try:
        alerted = [_text(f.get(b"txn_id", b"")) for _, f in scan_stream(client, s.alerts_stream)]
    finally:
        client.close()
    labelled = [t for t in alerted if t in truth]
    hits = sum(truth[t] for t in labelled)
    frauds = sum(truth.values())
    _print_json(
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


@app.command("dead-letters")
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
    entries, total = _newest(s.dlq_stream, count)
    try:
        for entry_id, fields in entries or []:
            f = {_text(k): v for k, v in (fields or {}).items()}
            head = (
                f"{show(entry_id)} {show(f.get('kind'))}:{show(f.get('reason'))} txn={show(f.get('txn_id'))}"
            )
            write_line(sys.stdout, f"{head} {show(f.get('detail'))}")
            write_line(sys.stdout, f"    raw: {show(f.get('raw'), 200, missing='')}")
            if f.get("origin"):
                write_line(sys.stdout, f"    from: {show(f['origin'])}")
    except BrokenPipeError:  # `fraud dead-letters | head`: read-only, nothing to keep pending
        _quiet_stdout()
        return
    typer.echo(f"{total} dead letter(s) in {s.dlq_stream}", err=True)


@app.command("drift")
def drift_events(
    count: Annotated[int, typer.Option(help="How many of the newest to show.")] = 20,
) -> None:
    """Show the newest drift events (read-only: XREVRANGE): data drift (a feature's or the
    score's PSI against the training rows) and concept drift (a model missing more frauds)."""
    from fraud.display import show, write_line

    s = get_settings()
    entries, total = _newest(s.drift_stream, count)
    try:
        for _, fields in entries or []:
            f = {_text(k): v for k, v in (fields or {}).items()}
            write_line(
                sys.stdout,
                f"{show(f.get('at'))} {show(f.get('kind'))} {show(f.get('what'))} {show(f.get('state'))}: "
                f"{show(f.get('value'))} against {show(f.get('threshold'))}, since {show(f.get('since'))}",
            )
    except BrokenPipeError:
        _quiet_stdout()
        return
    typer.echo(f"{total} drift event(s) in {s.drift_stream}", err=True)


def _newest(stream: str, count: int) -> tuple[list[Any], int]:
    """The newest `count` entries of `stream` (XREVRANGE) and its length: read-only."""
    from service.redis_client import connect
    from service.redis_server import redis_url

    client = connect(redis_url(get_settings()))
    try:
        return list(client.xrevrange(stream, count=count) or []), int(client.xlen(stream))
    finally:
        client.close()


def _quiet_stdout() -> None:
    """After the reader of a pipe left: point stdout at /dev/null, so that the interpreter's final
    flush does not raise BrokenPipeError again (a traceback on exit)."""
    import contextlib
    import os

    with contextlib.suppress(OSError, ValueError):  # no real descriptor (e.g. under CliRunner)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@app.command()
def reset(yes: Annotated[bool, typer.Option("--yes", help="Really delete.")] = False) -> None:
    """Delete the output streams (with their consumer groups and de-duplication markers) and the
    record of the recovery store that wrote them: `fraud run --fresh` then replays into them."""
    from flows.recovery import store_key
    from flows.recovery_check import STORE_FILE
    from flows.redis_sink import reset_streams
    from service.redis_client import connect, redact
    from service.redis_server import redis_url

    s = get_settings()
    if not yes:
        raise typer.BadParameter("this deletes streams; pass --yes")
    url = redis_url(s)
    streams = [s.alerts_stream, s.dlq_stream, s.late_stream, s.decision_stream]
    client = connect(url)
    try:
        n, markers = reset_streams(client, streams)
        client.delete(store_key(s))
    finally:
        client.close()
    typer.echo(f"reset {redact(url)}: deleted {n} stream(s) of {', '.join(streams)} and {markers} marker(s)")
    if s.recovery_dir is not None and (s.recovery_dir / STORE_FILE).exists():
        typer.echo(
            f"the recovery store in {s.recovery_dir} still holds the old input positions: "
            "`fraud run --fresh` moves it aside and replays the input from its beginning"
        )


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
