"""The managed plugin's dependency lock agrees with pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def test_the_lock_pins_every_dependency_within_its_declared_range():
    """packaging/requirements.lock (what the managed plugin installs) satisfies pyproject.toml: a stale
    lock fails here, not in a build. `make lock` regenerates it."""
    root = ROOT
    declared = [Requirement(r) for r in tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]]
    pinned = {}
    for line in (root / "packaging" / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith((" ", "#")):
            name, _, version = line.split(" ")[0].partition("==")
            pinned[_normalized(name)] = version
    for requirement in declared:
        name = _normalized(requirement.name)
        assert name in pinned, f"{name} is not in the lock: run make lock"
        assert requirement.specifier.contains(pinned[name]), (
            f"{name}=={pinned[name]} is outside {requirement.specifier}"
        )
    assert all(
        "--hash=sha256:" in block for block in (root / "packaging" / "requirements.lock").read_text().split("==")[1:]
    )


def _normalized(name: str) -> str:
    """A project name as PEP 503 compares them (ruamel.yaml == ruamel-yaml)."""
    return re.sub(r"[-_.]+", "-", name).lower()
