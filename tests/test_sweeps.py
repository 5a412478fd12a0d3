"""Every W&B sweep in recipes/sweeps/ runs as W&B would run it: W&B's own sweep engine (the `sweeps`
package) accepts the file, each configuration it proposes, passed to the recipe as the agent's ``${args}``,
lands on the swept key with the proposed value, and the metric it optimises is one the task really logs."""

from __future__ import annotations

import contextlib
import io
import json
import random
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import yaml
from sweeps import RunState, SweepRun, next_run, schema_violations_from_proposed_config
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

from lightning_modules.cli import main, resolved_config
from lightning_modules.compression.command import main as compress_main
from lightning_modules.compression.report import SUMMARY_KEYS
from tests.quick import quick_overrides

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "recipes" / "sweeps").glob("*.yaml"))
# Sweeps whose trial is a Lightning fit (the others run `compress`).
FIT_SWEEPS = [p for p in SWEEPS if "compress" not in yaml.safe_load(p.read_text())["command"]]
# Task recipes only (a block-drop recipe has no model of its own: it stacks on one).
QUICKSTARTS = sorted(p for p in (REPO / "recipes" / "quickstart").glob("*.yaml") if "blockdrop" not in p.name)
PROPOSALS = 3  # the first is random for bayes; the others come from its model of the trials before


def load(sweep: Path) -> dict:
    return yaml.safe_load(sweep.read_text())


def recipe_of(spec: dict) -> Path:
    command = [str(c) for c in spec["command"]]
    return REPO / command[command.index("--config") + 1]


def cli_args(spec: dict, args: list[str]) -> list[str]:
    """What the agent passes to the Lightning CLI: the command after the module name, ``${args}`` expanded."""
    command = [str(c) for c in spec["command"]]
    assert command[:4] == ["${env}", "${interpreter}", "-m", "lightning_modules"], command
    return [a for c in command[4:] for a in (args if c == "${args}" else [c])]


def print_config(args: list[str], capsys) -> dict:
    try:
        if args[0] == "compress":
            return compress_config(args[1:])
        return resolved_config(args)
    except SystemExit as failed:
        raise AssertionError(f"the CLI refused {args}: {capsys.readouterr().err[-1500:]}") from failed


def compress_config(args: list[str]) -> dict:
    """What ``compress --print_config`` prints for ``args``."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            compress_main([*args, "--print_config"])
        except SystemExit as done:
            if done.code not in (0, None):
                raise
    return yaml.safe_load(out.getvalue())


def lookup(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"{dotted}: no '{part}' in the printed config"
        node = node[part]
    return node


def as_sent(proposal: dict) -> dict:
    """A proposal as the agent receives it from the W&B server: JSON, so plain Python numbers."""
    return json.loads(json.dumps(proposal, default=lambda x: x.item()))


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda p: p.name)
def test_wandb_engine_accepts_the_sweep(sweep):
    spec = load(sweep)
    assert schema_violations_from_proposed_config(spec) == []
    assert spec["command"][-1] == "${args}" and spec["program"] == "lightning_modules"


# The fake scores give the engine's Gaussian process little to fit; it warns about its length scale.
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda p: p.name)
def test_every_proposal_reaches_the_recipe(sweep, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the agent runs the command from the repository root, as the recipe paths assume
    spec = load(sweep)
    untouched = print_config(cli_args(spec, []), capsys)
    random.seed(0)
    np.random.seed(0)
    runs: list[SweepRun] = []
    for trial in range(PROPOSALS):
        proposal = next_run(spec, runs)
        assert proposal is not None, f"{sweep.name}: the engine ran out after {trial} proposals"
        values = as_sent(proposal.config)
        assert set(values) == set(spec["parameters"])
        config = print_config(cli_args(spec, create_sweep_command_args({"args": values})["args"]), capsys)
        for key, chosen in values.items():
            printed = lookup(config, key)
            expected = chosen["value"]
            if isinstance(expected, float):
                expected = pytest.approx(expected, rel=1e-12)
            assert printed == expected, key
            # The CLI coerced the value to the argument's declared type, as it would in the real run.
            assert type(printed) is type(lookup(untouched, key)), key
        # A finished trial with a score, so bayes fits its model on the trials so far for the next proposal.
        score = 0.1 + 0.2 * trial
        runs.append(
            SweepRun(
                name=f"trial{trial}",
                state=RunState.finished,
                config=proposal.config,
                summary_metrics={spec["metric"]["name"]: score},
                history=[{spec["metric"]["name"]: score}],
            )
        )


@cache
def quickstart_recipe(model_class: str) -> Path:
    for recipe in QUICKSTARTS:
        if load(recipe)["model"]["class_path"] == model_class:
            return recipe
    raise AssertionError(f"no recipe in recipes/quickstart/ trains {model_class}: add one to see its metrics")


@pytest.fixture(scope="module")
def logged_metrics(tmp_path_factory, synthetic_classification):
    """The names a task class logs in validation, from one short validate of its quickstart recipe."""
    seen: dict[str, set[str]] = {}

    def names(model_class: str) -> set[str]:
        if model_class not in seen:
            run_dir = tmp_path_factory.mktemp("validate")
            cli = main(
                ["validate", "--config", str(quickstart_recipe(model_class)),
                 *quick_overrides(run_dir, synthetic_classification), "--trainer.limit_val_batches=1",
                 "--trainer.callbacks=[]"]
            )  # fmt: skip
            seen[model_class] = set(cli.trainer.callback_metrics)
        return seen[model_class]

    return names


@pytest.mark.parametrize("sweep", FIT_SWEEPS, ids=lambda p: p.name)
def test_sweep_metric_is_logged_by_the_task(sweep, logged_metrics):
    spec = load(sweep)
    model_class = load(recipe_of(spec))["model"]["class_path"]
    logged = logged_metrics(model_class)
    assert {"val/top1", "val/gmacs"} <= logged  # the validate really ran and logged the task's scores
    name, goal = spec["metric"]["name"], spec["metric"]["goal"]
    assert name in logged, f"{sweep.name}: {name} is not logged by {model_class}; it logs {sorted(logged)}"
    assert goal == ("minimize" if name.endswith(("loss", "gmacs")) else "maximize"), name


@pytest.mark.parametrize("sweep", sorted(set(SWEEPS) - set(FIT_SWEEPS)), ids=lambda p: p.name)
def test_compress_sweep_optimises_a_summary_compress_logs(sweep):
    """A compress trial's metric is one of the summary values compress logs to W&B (tests/test_compress.py reads
    them back from a real offline run); its trials write to their own directories."""
    spec = load(sweep)
    assert spec["metric"] == {"name": "compress/score", "goal": "maximize"}
    assert spec["metric"]["name"] in SUMMARY_KEYS
    assert any(str(c).startswith("--compress.out_dir=") and "{run_id}" in str(c) for c in spec["command"])
