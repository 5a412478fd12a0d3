"""Installing: pyproject.toml declares the ranges the code supports, constraints.txt the versions the suite ran with,
and ``make`` installs those."""

from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            out[canonicalize_name(name)] = version
    return out


def requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in (*project["dependencies"], *project["optional-dependencies"]["dev"])]


def test_every_dependency_has_a_range_and_a_pin_inside_it():
    pinned = pins()
    for req in requirements():
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} has no tested version in constraints.txt"
        assert Version(pinned[name]) in req.specifier, f"constraints.txt {name}=={pinned[name]} is outside {req}"
    torch = next(r for r in requirements() if r.name == "torch")
    assert str(torch.specifier) != f"=={pinned['torch']}"  # a range, not the tested version alone
    assert not any(name.startswith(("nvidia-", "cuda-")) or name == "triton" for name in pinned)  # follow the build


def test_make_installs_with_the_constraints(tmp_path):
    dry = subprocess.run(
        ["make", "-n", "-B", "venv", f"VENV={tmp_path / 'venv'}"], cwd=REPO, capture_output=True, text=True,
        check=True,
    ).stdout  # fmt: skip
    installs = [line for line in dry.splitlines() if "pip install" in line]
    assert len(installs) == 2 and all("-c constraints.txt" in line for line in installs)


def test_this_environment_has_the_tested_versions():
    """What ``make`` installed is what constraints.txt says (after a deliberate upgrade: ``make constraints``)."""
    wrong = {}
    for name, version in pins().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = (version, installed)
    assert wrong == {}
