"""The shape of the house: which room may import which, no reaching into another module's privates, every
``class_path`` of every recipe resolves, and ``lightning_modules/`` keeps its rooms."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "datamodules", "lightning_modules", "benchmarks")
LIGHTNING = {"lightning", "pytorch_lightning", "lightning_fabric"}
#: What a package may not import, by top-level package.
FORBIDDEN = {"models": {"lightning_modules", "datamodules"}, "datamodules": {"lightning_modules", "models"}}
#: ``lightning_modules/`` holds its rooms and, at its top, only what serves every room.
ROOMS = {"tasks", "metrics", "compression", "pictures", "tools", "demos"}
TOP = {"__init__.py", "__main__.py", "cli.py", "runs.py", "loggers.py", "callbacks.py", "weights.py", "catalogue.py",
       "lightning_private.py", "outputs.py"}


def modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def project_imports(tree: ast.AST) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every import of a project package in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in PACKAGES:
                found.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    found.append((alias.name, [], node.lineno))
    return found


def layering_breaches(package: str) -> list[str]:
    breaches = []
    for path in modules(package):
        for module, _, line in project_imports(ast.parse(path.read_text())):
            if module.split(".")[0] in FORBIDDEN.get(package, ()):
                breaches.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    return breaches


def private_imports(paths: list[Path]) -> list[str]:
    """Imports of a ``_name`` from another project module, and ``module._name`` on an imported project module."""
    found = []
    for path in paths:
        tree = ast.parse(path.read_text())
        aliases = set()
        for module, names, line in project_imports(tree):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            found += [f"{path.relative_to(REPO)}:{line} imports {module}.{n}" for n in private]
            aliases.add(module.split(".")[-1])
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                aliases |= {a.asname or a.name for a in node.names}
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def lightning_private_imports(paths: list[Path]) -> list[str]:
    """Imports of a ``_name`` from Lightning (``lightning``, ``pytorch_lightning``)."""
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in LIGHTNING:
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                found += [f"{path.relative_to(REPO)}:{node.lineno} imports {node.module}.{n}" for n in private]
    return found


def test_private_lightning_apis_are_imported_in_one_place_only():
    """lightning_modules/lightning_private.py lists each with its reason (why lightning is capped below 2.7)."""
    from lightning_modules import lightning_private

    everywhere = lightning_private_imports([p for package in PACKAGES for p in modules(package)])
    home = "lightning_modules/lightning_private.py"
    assert [f for f in everywhere if not f.startswith(f"{home}:")] == []
    imported = {f.rsplit(".", 1)[-1] for f in everywhere}
    assert imported == {"_collect_rng_states", "_set_rng_states", "_SubprocessScriptLauncher"}
    listed = " ".join(what for what, _, _ in lightning_private.USES)
    assert all(name in listed for name in imported)
    for _, where, why in lightning_private.USES:
        assert (REPO / where.split(" ")[0]).is_file() and why


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_rooms_import_nothing_from_the_rooms_above(package):
    assert layering_breaches(package) == []


def test_no_module_reaches_into_another_modules_privates():
    assert private_imports([p for package in PACKAGES for p in modules(package)]) == []


def test_the_checks_can_fail(tmp_path, monkeypatch):
    """The scanners see what they look for (a check that cannot fail proves nothing)."""
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from lightning_modules.metrics.tad import _private\nfrom models import vit\nvit._JointViT\n"
    )
    assert private_imports([bad]) == [
        "bad.py:1 imports lightning_modules.metrics.tad._private",
        "bad.py:3 uses vit._JointViT",
    ]
    bad.write_text("from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher, DDPLauncher\n")
    assert lightning_private_imports([bad]) == [
        "bad.py:1 imports lightning.pytorch.strategies.launchers._SubprocessScriptLauncher"
    ]
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.py").write_text("from lightning_modules.tasks.base import VideoTask\n")
    assert layering_breaches("models") == ["models/m.py:1 imports lightning_modules.tasks.base"]


def test_lightning_modules_keeps_its_rooms():
    root = REPO / "lightning_modules"
    rooms = {p.name for p in root.iterdir() if p.is_dir() and p.name != "__pycache__"}
    files = {p.name for p in root.glob("*.py")}
    assert rooms == ROOMS and files == TOP
    assert all((root / room / "__init__.py").is_file() for room in ROOMS)


def class_paths(node) -> list[str]:
    if isinstance(node, dict):
        found = [node["class_path"]] if isinstance(node.get("class_path"), str) else []
        return found + [c for value in node.values() for c in class_paths(value)]
    if isinstance(node, list):
        return [c for item in node for c in class_paths(item)]
    return []


RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_class_path_of_the_recipe_resolves(recipe):
    for path in class_paths(yaml.safe_load(recipe.read_text())):
        module, _, name = path.rpartition(".")
        assert isinstance(getattr(importlib.import_module(module), name), type), path


def test_every_recipe_names_at_least_one_class_it_can_find():
    assert sum(len(class_paths(yaml.safe_load(r.read_text()))) for r in RECIPES) > 50
