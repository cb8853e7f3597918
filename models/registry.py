"""The model registry: every artifact version in one directory, and which one serves.

```
<root>/<version>/model.ubj, meta.json   one directory per version (`models.artifact`)
<root>/state.json                        {"champion": V, "shadow": V | null, "history": [V, ...]}
<root>/rules.txt                         the rule set in force (`models.rules`), when there is one
```

`state.json` is what `fraud model list` shows and what a flow starting afresh serves; a running
flow changes model only when the command that changed the state reaches it through its input
(`features.events.Control`), at one place in the canonical order. A version's directory is never
rewritten: adding the same version with other bytes is refused. Commands identify a version's
model by the sha256 of its `model.ubj` (`digest`), so a flow never serves bytes other than those
the command was given. On several machines the root is a shared directory (or a copy kept in
step): every process loads the version a command names from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

from models.artifact import MODEL_FILE, ArtifactError, ModelArtifact, load

STATE_FILE = "state.json"
RULES_FILE = "rules.txt"


@dataclass(frozen=True)
class RegistryState:
    champion: str | None = None
    shadow: str | None = None
    history: list[str] = field(default_factory=list)
    """Champions in the order they were promoted (the last is the champion): what `rollback` walks back."""


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


_cache: dict[tuple[str, str], ModelArtifact] = {}
_cache_lock = threading.Lock()


class Registry:
    """A directory of versioned artifacts (see the module doc)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, version: str) -> Path:
        if not version or "/" in version or version.startswith("."):
            raise ArtifactError(f"not a version name: {version!r}")
        return self.root / version

    def versions(self) -> list[str]:
        """Every registered version, oldest first (versions sort by training time)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / MODEL_FILE).is_file())

    def digest(self, version: str) -> str:
        """sha256 of the version's model file: what a command names it by."""
        path = self.path(version) / MODEL_FILE
        if not path.is_file():
            raise ArtifactError(f"version {version} is not in the registry {self.root}")
        return file_digest(path)

    def add(self, artifact_dir: Path) -> str:
        """Copy the artifact in `artifact_dir` into the registry under its version; return it.
        Adding a version again with the same model is a no-op; with another model, an error."""
        artifact = load(artifact_dir)
        target = self.path(artifact.version)
        if target.exists():
            if self.digest(artifact.version) != file_digest(Path(artifact_dir) / MODEL_FILE):
                raise ArtifactError(
                    f"version {artifact.version} is already registered with another model; "
                    "a version's files are never replaced"
                )
            return artifact.version
        tmp = self.root / f".{artifact.version}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in (MODEL_FILE, "meta.json"):
            shutil.copy2(Path(artifact_dir) / name, tmp / name)
        os.replace(tmp, target)
        return artifact.version

    def load(self, version: str, digest: str | None = None) -> ModelArtifact:
        """The artifact of `version` (cached per process), refused if its model file is not the
        one `digest` names."""
        found = self.digest(version)
        if digest is not None and found != digest:
            raise ArtifactError(
                f"version {version} in {self.root} has model digest {found[:12]}, the command "
                f"named {digest[:12]}: the registry differs between machines"
            )
        with _cache_lock:
            cached = _cache.get((str(self.path(version).resolve()), found))
        if cached is None:
            cached = load(self.path(version))
            with _cache_lock:
                _cache[str(self.path(version).resolve()), found] = cached
        return cached

    def state(self) -> RegistryState:
        path = self.root / STATE_FILE
        if not path.is_file():
            return RegistryState()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return RegistryState(data.get("champion"), data.get("shadow"), list(data.get("history", [])))
        except (OSError, ValueError, AttributeError) as exc:
            raise ArtifactError(f"cannot read {path}: {exc}") from exc

    def rules(self) -> str:
        """The text of the rule set in force ("" when there is none)."""
        path = self.root / RULES_FILE
        return path.read_text(encoding="utf-8") if path.is_file() else ""

    def save_rules(self, text: str) -> None:
        """Record the rule set in force (atomically); an empty text removes it."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{RULES_FILE}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.root / RULES_FILE)

    def save_state(self, state: RegistryState) -> None:
        """Write `state.json` atomically (a reader sees the old state or the new one)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{STATE_FILE}.tmp"
        text = json.dumps(
            {"champion": state.champion, "shadow": state.shadow, "history": state.history}, indent=2
        )
        tmp.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp, self.root / STATE_FILE)
