"""`fraud model list | add | promote | shadow | rollback` and `fraud rules check | load | show | off`:
the model registry, the rules in force, and the running flow.

A command checks the version (it loads, it fits the flow's feature schema) or the rule file (it
parses against the flow's features), writes an operator
command into the input (`features.events.Control`, on input shard 0) and records the new state in
the registry (`state.json`, `rules.txt`). The flow applies the command at its place in the canonical order:
every process switches at the same event, and a replay after a crash switches there again. A flow
that reads files (`FRAUD_SOURCE=file`) has no input to send it: it serves the registry's state at
its next start.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from fraud.display import print_json
from service.settings import Settings, get_settings

app = typer.Typer(help="Model versions: list, add, promote, shadow, roll back.", no_args_is_help=True)


def send_command(
    settings: Settings, command: str, version: str = "", digest: str = "", text: str = ""
) -> str:
    """Write an operator command into input shard 0, signed when FRAUD_COMMAND_KEY is set; return
    its stream entry id ("" when the flow reads files and there is no input to write to)."""
    if settings.source != "redis":
        return ""
    from features.privacy import command_signature
    from flows.redis_source import ENTRY_KIND, ENTRY_PAYLOAD, shard_stream
    from service.redis_client import connect
    from service.redis_server import redis_url

    payload: dict[str, Any] = {"command": command, "version": version, "digest": digest}
    if text:
        payload["text"] = text
    if settings.command_key is not None:
        key = settings.command_key.get_secret_value().encode()
        payload["sig"] = command_signature(key, command, version, digest)
    client = connect(redis_url(settings))
    try:
        entry = client.xadd(
            shard_stream(settings.input_stream, 0),
            {ENTRY_KIND: "control", ENTRY_PAYLOAD: json.dumps(payload)},
        )
    finally:
        client.close()
    return entry.decode() if isinstance(entry, bytes) else str(entry)


def _registry(settings: Settings) -> Any:
    from models.registry import Registry

    return Registry(settings.model_registry)


def _checked(settings: Settings, version: str) -> str:
    """The digest of `version`, once it loads and fits the flow's feature schema."""
    from models.artifact import ArtifactError, check_schema
    from service.runtime import new_pipeline

    registry = _registry(settings)
    try:
        digest: str = registry.digest(version)
        pipeline = new_pipeline(settings)
        check_schema(registry.load(version, digest), pipeline.schema_hash, pipeline.names)
    except ArtifactError as exc:
        raise typer.BadParameter(str(exc)) from None
    return digest


def _bootstrapped(settings: Settings) -> Any:
    """The registry's state; before its first champion, the artifact the flow serves
    (FRAUD_MODEL_PATH) is registered and becomes it, so that `rollback` can return to it."""
    registry = _registry(settings)
    state = registry.state()
    if state.champion is None:
        version = registry.add(settings.model_path)
        state = replace(state, champion=version, history=[version])
        registry.save_state(state)
    return state


def _said(what: str, entry: str) -> None:
    where = f"sent to the flow's input (entry {entry})" if entry else "the flow serves it from its next start"
    typer.echo(f"{what}: {where}")


@app.command("list")
def list_versions(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False,
) -> None:
    """Every registered version with its role, threshold and test-period quality."""
    s = get_settings()
    registry = _registry(s)
    state = registry.state()
    rows = []
    for version in registry.versions():
        meta = json.loads((registry.path(version) / "meta.json").read_text(encoding="utf-8"))
        test = meta.get("metrics", {}).get("test", {})
        role = "champion" if version == state.champion else "shadow" if version == state.shadow else ""
        rows.append(
            {
                "version": version,
                "role": role,
                "trained_at": meta.get("trained_at"),
                "threshold": meta.get("threshold"),
                "test_ap": test.get("ap"),
                "test_auc": test.get("auc"),
                "source": meta.get("metrics", {}).get("source"),
            }
        )
    if as_json:
        print_json({"registry": str(s.model_registry), "history": state.history, "versions": rows})
        return
    if not rows:
        typer.echo(
            f"no versions in {s.model_registry} (the flow serves {s.model_path}); `fraud model add DIR`"
        )
        return
    for r in rows:
        ap = "" if r["test_ap"] is None else f"test AP {r['test_ap']:.3f}"
        typer.echo(
            f"{r['role']:<9} {r['version']}  trained {r['trained_at']}  threshold {r['threshold']:.4f}  {ap}"
        )


@app.command()
def add(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory written by `fraud train`.")],
) -> None:
    """Register an artifact as a candidate version (its files are copied, never changed after)."""
    from models.artifact import ArtifactError

    s = get_settings()
    try:
        version = _registry(s).add(artifact)
    except ArtifactError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(f"registered {version} in {s.model_registry}")


@app.command()
def promote(version: str) -> None:
    """Serve VERSION: the flow switches at this command's place in its input."""
    s = get_settings()
    digest = _checked(s, version)
    state = _bootstrapped(s)
    if version == state.champion:
        typer.echo(f"{version} is already the champion")
        return
    entry = send_command(s, "champion", version, digest)
    shadow = state.shadow
    if shadow == version:  # it no longer needs shadowing
        send_command(s, "shadow")
        shadow = None
    _registry(s).save_state(
        replace(state, champion=version, shadow=shadow, history=[*state.history, version])
    )
    _said(f"promoted {version}", entry)


@app.command()
def shadow(
    version: Annotated[str | None, typer.Argument(help="Version to score beside the champion.")] = None,
    off: Annotated[bool, typer.Option("--off", help="Stop shadowing.")] = False,
) -> None:
    """Score every transaction with VERSION too, without alerting (its scores go to the decision log)."""
    s = get_settings()
    if off == (version is not None):
        raise typer.BadParameter("give a VERSION or --off")
    state = _bootstrapped(s)
    if version is None:
        entry = send_command(s, "shadow")
        _registry(s).save_state(replace(state, shadow=None))
        _said("shadow off", entry)
        return
    digest = _checked(s, version)
    entry = send_command(s, "shadow", version, digest)
    _registry(s).save_state(replace(state, shadow=version))
    _said(f"shadowing {version}", entry)


@app.command()
def rollback() -> None:
    """Serve the champion before the current one again."""
    s = get_settings()
    state = _bootstrapped(s)
    if len(state.history) < 2:
        raise typer.BadParameter(f"nothing to roll back to: {state.champion} is the first champion")
    previous = state.history[-2]
    entry = send_command(s, "champion", previous, _checked(s, previous))
    _registry(s).save_state(replace(state, champion=previous, history=state.history[:-1]))
    _said(f"rolled back to {previous}", entry)


rules_app = typer.Typer(help="Rules beside the model: check, load, show, turn off.", no_args_is_help=True)


def _parsed(settings: Settings, path: Path) -> Any:
    """The rule set in `path`, parsed against the flow's features; a bad file is refused with
    every bad line (exit status 2) and nothing is sent."""
    from models.rules import RuleError, load_file
    from service.runtime import new_pipeline

    try:
        return load_file(path, new_pipeline(settings).names)
    except RuleError as exc:
        typer.echo(f"fraud rules: refused, nothing changed:\n{exc}", err=True)
        raise typer.Exit(2) from None


@rules_app.command()
def check(path: Path) -> None:
    """Parse a rule file against the flow's features; list its rules, or every bad line."""
    rules = _parsed(get_settings(), path)
    for r in rules.rules:
        typer.echo(f"line {r.line}: {r.name}: {r.text} -> {r.action}{' dry-run' if r.dry_run else ''}")
    typer.echo(f"{len(rules)} rule(s), digest {rules.digest[:12]}")


@rules_app.command()
def load(path: Path) -> None:
    """Check a rule file, then make it the rule set in force: the flow switches at this command's
    place in its input (no restart); the set it replaces stays if the file is refused."""
    from features.events import MAX_RECORD_BYTES

    s = get_settings()
    rules = _parsed(s, path)
    size = len(
        json.dumps({"command": "rules", "version": path.name, "digest": rules.digest, "text": rules.text})
    )
    if size > MAX_RECORD_BYTES:
        typer.echo(
            f"fraud rules: refused, nothing changed: {path} makes a command of {size:,} bytes; an input "
            f"record holds at most {MAX_RECORD_BYTES:,}",
            err=True,
        )
        raise typer.Exit(2)
    entry = send_command(s, "rules", path.name, rules.digest, rules.text)
    _registry(s).save_rules(rules.text)
    _said(f"loaded {len(rules)} rule(s) from {path} (digest {rules.digest[:12]})", entry)


@rules_app.command("show")
def show_rules() -> None:
    """Print the rule set in force (as recorded in the registry)."""
    text = _registry(get_settings()).rules()
    typer.echo(text if text else "no rules in force", nl=not text.endswith("\n"))


@rules_app.command()
def off() -> None:
    """Remove every rule: the model alone decides again."""
    from models.rules import digest

    s = get_settings()
    entry = send_command(s, "rules", "off", digest(""), "")
    _registry(s).save_rules("")
    _said("rules off", entry)
