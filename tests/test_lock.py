"""The lock and pyproject agree: every dependency the library and its tests declare is pinned in
requirements.lock, at a version inside the declared range (Makefile: `make install` installs the lock)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).parents[1]


def _locked() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = Version(version)
    return pins


def _declared() -> list[Requirement]:
    """pyproject's dependencies and extras (markers evaluated: the lock is made for this Python)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    texts = [*project["dependencies"], *(r for group in extras.values() for r in group)]
    return [r for r in map(Requirement, texts) if r.marker is None or r.marker.evaluate()]


@pytest.mark.parametrize("requirement", _declared(), ids=str)
def test_every_declared_dependency_is_locked_inside_its_range(requirement):
    locked = _locked()
    name = canonicalize_name(requirement.name)
    assert name in locked, f"{requirement.name} is declared in pyproject.toml but not in requirements.lock"
    assert requirement.specifier.contains(locked[name], prereleases=True), (
        f"requirements.lock pins {requirement.name}=={locked[name]}, outside pyproject's {requirement.specifier}"
    )


def test_the_lock_pins_torch_to_the_cpu_wheel():
    """An unpinned or CUDA torch is a multi-GB download; the project installs the CPU wheel on this machine's disk."""
    assert str(_locked()["torch"]) == "2.13.0+cpu"
