"""The tasks and data modules a recipe can name, for the command line's help.

Their one-line descriptions are read from the classes' docstrings without importing them (importing a task pulls
in torch, Lightning and the models: seconds, where ``python -m lightning_modules --help`` should be instant).
``tests/test_cli_help.py`` checks that these lists hold every task and data module the packages define.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util

#: ``model.class_path`` values: the LightningModules of this project.
TASKS = (
    "lightning_modules.tasks.classification.VideoClassifier",
    "lightning_modules.tasks.haltingvt.HaltingVTClassifier",
    "lightning_modules.tasks.detection.SpatioTemporalDetection",
    "lightning_modules.tasks.temporal_detection.TemporalActionDetection",
)

#: ``data.class_path`` values: the LightningDataModules of this project.
DATA_MODULES = (
    "datamodules.classification.VideoClassificationDataModule",
    "datamodules.ava.AVADataModule",
    "datamodules.act_pickle.ActPickleDataModule",
    "datamodules.temporal.TemporalDetectionDataModule",
)


def summary(class_path: str) -> str:
    """The first paragraph of the class's docstring as one line, read from its source file."""
    module, _, name = class_path.rpartition(".")
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ImportError(f"no module {module} (catalogue entry {class_path})")
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=spec.origin)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            doc = ast.get_docstring(node) or ""
            return " ".join(doc.split("\n\n")[0].replace("``", "").split())
    raise ImportError(f"{spec.origin} defines no class {name} (catalogue entry {class_path})")


def import_all() -> None:
    """Import every task and data module, so that the CLI's ``--help`` lists them as known subclasses."""
    for class_path in (*TASKS, *DATA_MODULES):
        importlib.import_module(class_path.rpartition(".")[0])
