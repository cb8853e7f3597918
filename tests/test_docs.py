"""The documentation contract: what the docs name exists, and the configuration table is the settings object's."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from pydantic_core import PydanticUndefined

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
CONFIGURATION = ROOT / "docs" / "configuration.md"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A table row of docs/configuration.md: | `FRAUD_NAME` | default | meaning |
ROW = re.compile(r"^\|\s*`FRAUD_([A-Z0-9_]+)`\s*\|([^|]*)\|")


def env_name(field: str) -> str:
    return f"FRAUD_{field.upper()}"


def normalized(value: Any) -> str:
    """A default as the table writes it: unset, 0/1 for booleans, 30 for 30.0, paths as strings."""
    if value is None:
        return "unset"
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | float):
        number = float(value)
        return str(int(number)) if number.is_integer() else repr(number)
    text = str(value).strip().strip("`").strip()
    lowered = text.lower()
    if lowered in {"", "unset", "none"}:
        return "unset"
    if lowered in {"false", "true"}:
        return "1" if lowered == "true" else "0"
    try:
        return normalized(float(text.replace("_", "").replace(",", "")))
    except ValueError:
        return text


def field_default(name: str) -> Any:
    field = Settings.model_fields[name]
    if field.default_factory is not None:
        return field.default_factory()  # type: ignore[call-arg]
    return None if field.default is PydanticUndefined else field.default


def configuration_rows() -> dict[str, str]:
    rows: dict[str, str] = {}
    for line in CONFIGURATION.read_text().splitlines():
        if match := ROW.match(line.strip()):
            name = f"FRAUD_{match[1]}"
            assert name not in rows, f"{name} has two rows in docs/configuration.md"
            rows[name] = match[2].strip()
    return rows


def test_the_normalization_renders_defaults_as_the_table_does() -> None:
    assert [normalized(v) for v in (None, False, True, 30.0, 0.01, 4, Path("a/b"), "fraud:in")] == [
        "unset", "0", "1", "30", "0.01", "4", "a/b", "fraud:in"
    ]  # fmt: skip
    assert [normalized(v) for v in ("`30`", "unset", "`false`", "`1_000_000`", "`0.0`")] == [
        "30", "unset", "0", "1000000", "0"
    ]  # fmt: skip


def test_every_setting_has_a_row_in_the_configuration_table() -> None:
    rows = configuration_rows()
    missing = [env_name(name) for name in Settings.model_fields if env_name(name) not in rows]
    assert missing == [], f"settings without a row in docs/configuration.md: {missing}"


def test_every_configuration_row_is_a_setting() -> None:
    settings = {env_name(name) for name in Settings.model_fields}
    unknown = [name for name in configuration_rows() if name not in settings]
    assert unknown == [], f"docs/configuration.md documents settings that do not exist: {unknown}"


def test_each_documented_default_is_the_fields_default() -> None:
    rows = configuration_rows()
    wrong = {
        env_name(name): (rows[env_name(name)], normalized(field_default(name)))
        for name in Settings.model_fields
        if env_name(name) in rows and normalized(rows[env_name(name)]) != normalized(field_default(name))
    }
    assert wrong == {}, f"(documented, actual) defaults that differ: {wrong}"


def test_the_docs_name_no_setting_that_does_not_exist() -> None:
    settings = {env_name(name) for name in Settings.model_fields}
    unknown = {
        f"{doc.relative_to(ROOT)}: {name}"
        for doc in DOCS
        for name in re.findall(r"\bFRAUD_[A-Z0-9_]*[A-Z0-9]", doc.read_text())
        if name not in settings and not name.startswith("FRAUD_TEST_")
    }
    assert unknown == set()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_benchmark_command_in_the_docs_names_an_existing_module(doc: Path) -> None:
    text = doc.read_text()
    missing = sorted(
        {
            m
            for m in re.findall(r"python -m benchmarks\.(\w+)", text)
            if not (ROOT / "benchmarks" / f"{m}.py").is_file()
        }
    )
    assert missing == [], f"{doc.name} runs benchmarks that do not exist: {missing}"
    # Benchmarks run as modules from the repository root, not as scripts.
    assert re.findall(r"python3? benchmarks/\w+\.py", text) == []
