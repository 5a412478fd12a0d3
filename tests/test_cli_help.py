"""The command line a person meets first: the top-level help (instant, every command, task and data module with
its whole description), a subcommand's help (the program's own name, the tasks as known subclasses) and no
warning a user cannot act on."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import yaml

from lightning_modules import catalogue
from lightning_modules.__main__ import LIGHTNING_COMMANDS, PROG, TOOLS, run

REPO = Path(__file__).resolve().parents[1]
#: Classes the packages define only to be subclassed: no recipe names them.
BASES = {
    "lightning_modules.tasks.base.VideoTask",
    "datamodules.base.VideoDataModule",
    "datamodules.keyframes.KeyframeDetectionDataModule",
}


def defined_subclasses(package: str, base: type) -> set[str]:
    """Class paths of the subclasses of ``base`` that the modules of ``package`` define."""
    found = set()
    pkg = importlib.import_module(package)
    for info in pkgutil.walk_packages(pkg.__path__, f"{package}."):
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, base) and cls.__module__ == module.__name__:
                found.add(f"{module.__name__}.{name}")
    return found


def recipe_class_paths(key: str) -> set[str]:
    paths = set()
    for recipe in (REPO / "recipes").rglob("*.yaml"):
        config = yaml.safe_load(recipe.read_text()) or {}
        section = config.get(key) if isinstance(config, dict) else None
        if isinstance(section, dict) and "class_path" in section:
            paths.add(section["class_path"])
    return paths


def test_catalogue_holds_every_task_and_data_module():
    tasks = defined_subclasses("lightning_modules.tasks", L.LightningModule) - BASES
    data = defined_subclasses("datamodules", L.LightningDataModule) - BASES
    assert set(catalogue.TASKS) == tasks
    assert set(catalogue.DATA_MODULES) == data
    assert recipe_class_paths("model") <= tasks
    assert recipe_class_paths("data") <= data


def test_summary_is_the_docstrings_first_paragraph():
    from lightning_modules.tasks.haltingvt import HaltingVTClassifier

    first = inspect.getdoc(HaltingVTClassifier).split("\n\n")[0]
    assert catalogue.summary("lightning_modules.tasks.haltingvt.HaltingVTClassifier") == " ".join(
        first.replace("``", "").split()
    )
    with pytest.raises(ImportError, match="defines no class Nothing"):
        catalogue.summary("lightning_modules.tasks.haltingvt.Nothing")


def test_top_level_help_is_whole_and_imports_neither_torch_nor_lightning():
    probe = (
        "import sys; from lightning_modules.__main__ import run; status = run(['--help']); "
        "print('IMPORTED', status, sorted(m for m in ('torch', 'lightning') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "100"},
    ).stdout  # fmt: skip
    assert out.rstrip().endswith("IMPORTED 0 []")
    assert out.startswith(f"usage: {PROG} COMMAND")
    flat = " ".join(out.split())
    for name, text in {**LIGHTNING_COMMANDS, **{k: v for k, (_, v) in TOOLS.items()}}.items():
        assert f"{name} {' '.join(text.split())}" in flat  # the whole description, not its first line
    for path in (*catalogue.TASKS, *catalogue.DATA_MODULES):
        assert f"{path} {catalogue.summary(path)}" in flat
    assert max(len(line) for line in out.splitlines()) <= 100


def test_no_command_prints_the_help_to_stderr_and_fails(capsys):
    assert run([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("usage:")


def test_subcommand_help_names_the_program_and_lists_the_tasks(capsys, monkeypatch):
    # As on the command line: sys.argv holds the arguments that run() passes on (Lightning warned of both).
    monkeypatch.setattr(sys, "argv", [PROG, "fit", "--help"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SystemExit) as done:
            run(["fit", "--help"])
    assert done.value.code == 0
    assert [str(w.message) for w in caught if "args parameter" in str(w.message)] == []
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {PROG} [options] fit")
    assert " ".join(LIGHTNING_COMMANDS["fit"].split()) in " ".join(out.split())
    listed = "".join(out.split())  # the formatter breaks long class paths anywhere
    for path in (*catalogue.TASKS, *catalogue.DATA_MODULES):
        assert path in listed
