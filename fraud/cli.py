"""`fraud …`: generate data, train, evaluate, run the flow, read alerts. Calls what the flow calls."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from fraud import model_commands, report, stream_commands, top
from fraud.display import print_json
from service.settings import SAMPLES, get_settings

app = typer.Typer(help="Real-time card fraud scoring.", no_args_is_help=True, add_completion=False)
app.command()(stream_commands.alerts)
app.command("alert-precision")(stream_commands.alert_precision)
app.command("dead-letters")(stream_commands.dead_letters)
app.command("drift")(stream_commands.drift)
app.command("report")(report.report_command)
app.command()(top.top)
app.add_typer(model_commands.app, name="model")
app.add_typer(model_commands.rules_app, name="rules")


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
        print_json(write_files(out, WORLDS[world].config(seed, cards, merchants), compress=gzip))
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
    print_json(write_files(out, cfg, compress=gzip))


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
    train_from: Annotated[
        str | None,
        typer.Option(
            help="Calendar bounds instead of day counts: first training time (default: the data's first day)."
        ),
    ] = None,
    train_to: Annotated[
        str | None, typer.Option(help="End of training (a date, RFC 3339 time or epoch ms).")
    ] = None,
    valid_to: Annotated[
        str | None, typer.Option(help="End of validation (it starts --gap-days after --train-to).")
    ] = None,
    test_to: Annotated[
        str | None, typer.Option(help="End of the test period (it starts at --valid-to).")
    ] = None,
    k: Annotated[int, typer.Option(min=1, help="Cards reviewed per day, for Card Precision@k.")] = 100,
    search: Annotated[
        bool, typer.Option("--search/--no-search", help="Tune XGBoost on validation (8 fits).")
    ] = True,
    seed: int = 0,
    from_decisions: Annotated[
        bool,
        typer.Option(
            "--from-decisions",
            help="Train on the features the flow served (FRAUD_DECISION_STREAM, written with "
            "FRAUD_DECISION_LOG=1) instead of replaying files; labels from --labels, else from the "
            "input shard streams (FRAUD_INPUT_STREAM). The model is registered as a candidate "
            "version (`fraud model list`); --out also keeps a copy there.",
        ),
    ] = False,
) -> None:
    """Replay a file through the feature engine, train and tune XGBoost, judge a later period, save."""
    from fraud import train as training
    from service.runtime import new_pipeline

    s = get_settings()
    split = _periods(
        start_day, train_days, gap_days, valid_days, test_days, (train_from, train_to, valid_to, test_to)
    )
    if from_decisions:
        # The decision log: a log that cannot be trained on, or Redis out of reach, is one line on
        # stderr and exit status 1 (`log_client`); periods without fraud labels a usage error.
        from fraud.decision_log import log_client, train_from_decisions
        from models.registry import Registry

        if transactions is not None:
            raise typer.BadParameter("does not apply with --from-decisions", param_hint="--transactions")
        if labels is not None and not labels.is_file():
            raise typer.BadParameter(f"labels file {labels} does not exist", param_hint="--labels")
        staging = out or Path(tempfile.mkdtemp(prefix="fraud-candidate-"))
        try:
            with log_client("fraud train", s) as client:
                report = train_from_decisions(
                    client, s, new_pipeline(s), staging, labels=labels, split=split, k=k,
                    search=search, seed=seed,
                )  # fmt: skip
            report["registered"] = f"{Registry(s.model_registry).add(staging)} in {s.model_registry}"
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        finally:
            if out is None:
                shutil.rmtree(staging, ignore_errors=True)
        print_json(report)
        return
    txns = transactions or s.transactions_path
    labs = labels or s.labels_path
    if labs is None:
        raise typer.BadParameter("training needs a labels file (--labels or FRAUD_LABELS_PATH)")
    try:
        report = training.train(
            s, new_pipeline(s), txns, labs, out or s.model_path, split=split, k=k, search=search, seed=seed
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    print_json(report)


def _periods(
    start_day: float,
    train_days: float,
    gap_days: float,
    valid_days: float,
    test_days: float,
    bounds: tuple[str | None, str | None, str | None, str | None],
) -> Any:
    """`fraud train`'s periods: calendar bounds when --train-to, --valid-to and --test-to are given
    (--train-from optional), else the day counts from the data's first day."""
    from fraud import train as training

    train_from, *ends = bounds
    if not any(bounds):
        return training.Split(train_days, valid_days, test_days, gap_days, start_day)
    if None in ends:
        raise typer.BadParameter(
            "calendar periods need --train-to, --valid-to and --test-to (--train-from is optional)"
        )
    try:
        train_to, valid_to, test_to = (training.parse_when(e) for e in ends if e is not None)
        start = None if train_from is None else training.parse_when(train_from)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    return training.Calendar(train_to, valid_to, test_to, start, gap_days)


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
    from_decisions: Annotated[
        bool,
        typer.Option(
            "--from-decisions",
            help="Judge what the flow served instead (FRAUD_DECISION_STREAM): each champion version, "
            "and each shadow against its champion on the same labelled transactions; labels from "
            "--labels, else from the input shard streams.",
        ),
    ] = False,
) -> None:
    """Replay through the serving scorer; judge XGBoost alone and XGBoost + the online model."""
    from fraud import train as training
    from service.runtime import load_model, new_pipeline

    s = get_settings()
    if from_decisions:
        from fraud.decision_log import compare_models, log_client

        with log_client("fraud evaluate", s) as client:
            print_json(compare_models(client, s, labels))
        return
    pipeline = new_pipeline(s)
    labs = labels or s.labels_path
    if labs is None:
        raise typer.BadParameter("evaluation needs a labels file")
    periods = [("before_drift", start_day, drift_day), ("after_drift", drift_day, end_day)]
    report = training.evaluate(
        s, pipeline, load_model(s, pipeline), transactions or s.transactions_path, labs, periods, k=k
    )
    print_json(report)


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
    print_json(
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
    print_json({"redis": redact(url), **summary})


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
    streams = s.output_streams
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
