"""Submit a recipe to SLURM with the allocation its trainer settings need.

    python -m lightning_modules submit RECIPE.yaml [--nodes N] [--gpus-per-node G] [--cpus-per-task C]
        [--time HH:MM:SS] [--partition P] [--job-name NAME] [--dry-run] [any other sbatch option ...]
        [-- CLI overrides...]

Reads ``trainer.devices``, ``trainer.num_nodes`` and ``trainer.accelerator`` from the recipe (and from any
``--config`` files and ``--trainer.*`` overrides after ``--``) and prints, or submits, the matching ``sbatch`` of
``recipes/slurm/train.sbatch`` (one node) or ``recipes/slurm/train_multinode.sbatch``: one task per device
(``--ntasks-per-node`` = devices, as Lightning's SLURMEnvironment requires) and ``--gres=gpu:G`` when the recipe
trains on GPUs. Flags that disagree with the recipe are an error, not a silent change of the global batch: to
train a recipe at another scale, override it explicitly (``-- --trainer.devices=4
--trainer.accumulate_grad_batches=2``). ``--gpus-per-node 0`` runs an ``accelerator: auto`` recipe on CPU tasks.

Any other ``--option [value]`` before ``--`` goes to sbatch as given (``--account``, ``--qos``, ``--constraint``,
``--mem``, ``--mail-type``, ...); a ``--gres`` of a GPU type (``gpu:a100:8``) replaces the helper's and must ask for
the recipe's GPUs. The job is named after the stacked recipes (``haltingvt_minik+minik_g03_b05``: the recipe and
each ``--config`` after ``--``) unless ``--job-name`` says otherwise.

The run directory is ``<trainer.default_root_dir>/<job id>`` and the job's output ``runs/slurm/<name>-<job id>.out``.

A W&B sweep file instead of a recipe (``submit recipes/sweeps/haltingvt_minik.yaml --sweep-id ENTITY/PROJECT/ID
--array=0-7%4``) submits ``recipes/slurm/sweep_agent.sbatch`` with the allocation of the recipe its trials train
(the ``--config`` files of its command): one agent per array task, in the batch shell, whose trial (``python -m
lightning_modules fit ...``) re-launches itself with ``srun`` across the allocation's tasks (``SRUN_TRIAL_ENV``).
Overrides after ``--`` are appended to every trial.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SINGLE_NODE_SCRIPT = "recipes/slurm/train.sbatch"
MULTI_NODE_SCRIPT = "recipes/slurm/train_multinode.sbatch"
SWEEP_SCRIPT = "recipes/slurm/sweep_agent.sbatch"
#: Set by the sweep script to the overrides each trial gets (the submit helper's, then the allocation's nodes and
#: tasks per node, which win); a ``fit`` started with it re-launches itself under ``srun`` across the allocation.
SRUN_TRIAL_ENV = "EVT_SRUN_TRIAL"
OUTPUT_DIR = "runs/slurm"
GPU_ACCELERATORS = ("gpu", "cuda")


class SubmitError(ValueError):
    """The recipe and the requested allocation do not fit together."""


@dataclass
class Allocation:
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    script: str
    extra_overrides: list[str]


def effective_settings(recipe: Path, overrides: list[str]) -> dict[str, Any]:
    """The recipe's ``trainer`` and ``data.init_args`` sections as ``fit`` would run them, stacked ``--config``
    files and overrides applied (the CLI's own parser, through ``--print_config``; parsed once per command line)."""
    if not recipe.is_file():
        raise SubmitError(f"recipe {recipe} does not exist")
    configs = [recipe, *(Path(a.split("=", 1)[1]) for a in overrides if a.startswith("--config="))]
    configs += [Path(overrides[i + 1]) for i, a in enumerate(overrides[:-1]) if a == "--config"]
    # the files' versions and the directory relative paths start from are part of what was parsed
    stamp = (os.getcwd(), *(c.stat().st_mtime_ns if c.is_file() else None for c in configs))
    return copy.deepcopy(_parsed(str(recipe), tuple(overrides), stamp))


@functools.lru_cache(maxsize=8)
def _parsed(recipe: str, overrides: tuple[str, ...], stamp: tuple) -> dict[str, Any]:
    from lightning_modules.cli import resolved_config

    try:
        config = resolved_config(["fit", "--config", recipe, *overrides])
    except SystemExit:
        raise SubmitError(f"the CLI refused {recipe} with these overrides (its message is above)") from None
    return {"trainer": config.get("trainer") or {}, "data": (config.get("data") or {}).get("init_args") or {}}


def _count(value: Any, what: str, recipe: Path) -> int | None:
    """An explicit device or node count; None for "auto"/-1; lists of device ids count their entries."""
    if value in (None, "auto", -1, "-1"):
        return None
    if isinstance(value, list):
        return len(value)
    if isinstance(value, str) and "," in value:
        return len([v for v in value.split(",") if v.strip()])
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise SubmitError(f"{recipe}: cannot read {what}={value!r} as a count") from None
    if count < 1:
        raise SubmitError(f"{recipe}: {what}={value!r} must be at least 1")
    return count


def plan(
    recipe: Path, overrides: list[str], nodes: int | None = None, gpus_per_node: int | None = None
) -> Allocation:
    """The allocation the recipe needs, checked against the requested ``nodes`` and ``gpus_per_node``."""
    trainer = effective_settings(recipe, overrides)["trainer"]
    accelerator = str(trainer.get("accelerator", "auto")).lower()
    devices = _count(trainer.get("devices", "auto"), "trainer.devices", recipe)
    recipe_nodes = _count(trainer.get("num_nodes", 1), "trainer.num_nodes", recipe) or 1
    fix = "change the flag, or override the recipe after -- (e.g. -- --trainer.{key}={value})"

    if nodes is not None and nodes != recipe_nodes:
        raise SubmitError(
            f"{recipe} trains on trainer.num_nodes={recipe_nodes} but --nodes {nodes} was asked: "
            + fix.format(key="num_nodes", value=nodes)
        )
    extra: list[str] = []
    if accelerator == "cpu" or (accelerator == "auto" and gpus_per_node == 0):
        if gpus_per_node:
            raise SubmitError(
                f"{recipe} trains on trainer.accelerator=cpu but --gpus-per-node {gpus_per_node} was asked: drop the "
                "flag, or override the recipe after -- (e.g. -- --trainer.accelerator=gpu)"
            )
        gpus, tasks = 0, devices or 1
        if accelerator == "auto":
            extra = ["--trainer.accelerator=cpu"]  # no GPU is allocated; do not let auto find one on the node
    elif accelerator in GPU_ACCELERATORS or accelerator == "auto":
        if gpus_per_node == 0:
            raise SubmitError(
                f"{recipe} trains on trainer.accelerator={accelerator} but --gpus-per-node 0 was asked: override "
                "the recipe after -- (e.g. -- --trainer.accelerator=cpu)"
            )
        if devices is not None and gpus_per_node is not None and devices != gpus_per_node:
            raise SubmitError(
                f"{recipe} trains on trainer.devices={devices} GPUs per node but --gpus-per-node {gpus_per_node} "
                "was asked (the global batch would change): " + fix.format(key="devices", value=gpus_per_node)
            )
        gpus = gpus_per_node or devices
        if gpus is None:
            raise SubmitError(
                f"{recipe} sets trainer.devices={trainer.get('devices')!r}: pass --gpus-per-node"
            )
        tasks = gpus
    else:
        raise SubmitError(
            f"{recipe}: trainer.accelerator={accelerator!r} is not something SLURM allocates here"
        )
    script = SINGLE_NODE_SCRIPT if recipe_nodes == 1 else MULTI_NODE_SCRIPT
    return Allocation(recipe_nodes, tasks, gpus, script, extra)


def _repo_relative(path: Path) -> str:
    path = path.resolve()
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def sweep_trial(sweep: Path) -> tuple[Path, list[str]]:
    """The recipe a W&B sweep file's trials train (its command's first ``--config``) and the command's other fixed
    arguments, ``${...}`` macros left out."""
    import yaml

    spec = yaml.safe_load(sweep.read_text())
    command = [str(c) for c in spec.get("command") or []]
    if "fit" not in command:
        raise SubmitError(
            f"{sweep}: its trials do not run `fit` ({' '.join(command) or 'no command'}); a one-process sweep (e.g. "
            f"compress) needs no allocation from a recipe: sbatch {SWEEP_SCRIPT} ENTITY/PROJECT/SWEEP_ID"
        )
    fixed = [c for c in command[command.index("fit") + 1 :] if not c.startswith("${")]
    for i, arg in enumerate(fixed):
        if arg == "--config" and i + 1 < len(fixed):
            return REPO / fixed[i + 1], fixed[:i] + fixed[i + 2 :]
        if arg.startswith("--config="):
            return REPO / arg.split("=", 1)[1], fixed[:i] + fixed[i + 1 :]
    raise SubmitError(f"{sweep}: its command names no --config recipe")


def is_sweep(path: Path) -> bool:
    """Whether ``path`` is a W&B sweep file (``method`` and ``command``) rather than a recipe."""
    import yaml

    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(spec, dict) and "method" in spec and "command" in spec


def srun_trial(argv: list[str]) -> int:
    """Run ``python -m lightning_modules <argv>`` across the allocation's tasks, one rank each, with the overrides
    of ``SRUN_TRIAL_ENV`` appended (so the allocation's devices and nodes win): how a W&B agent's trial, started
    once in the batch shell of ``sweep_agent.sbatch``, trains on every GPU and node of the job."""
    env = dict(os.environ)
    extra = shlex.split(env.pop(SRUN_TRIAL_ENV))
    cmd = ["srun", "--kill-on-bad-exit=1", sys.executable, "-m", "lightning_modules", *argv, *extra]
    print(f"trial across {env.get('SLURM_NTASKS', '?')} task(s): {shlex.join(cmd)}", file=sys.stderr, flush=True)
    trial = subprocess.Popen(cmd, env=env)
    # A stopped trial (the agent's SIGTERM, scancel) reaches the ranks through srun, so they save and exit.
    forward = {sig: signal.signal(sig, lambda s, _: trial.send_signal(s)) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return trial.wait()
    finally:
        for sig, handler in forward.items():
            signal.signal(sig, handler)


def stacked_name(recipe: Path, overrides: list[str]) -> str:
    """``recipe`` and each ``--config`` file among the CLI overrides, by file name: ``base+overlay``."""
    names = [recipe.stem]
    for i, arg in enumerate(overrides):
        if arg == "--config" and i + 1 < len(overrides):
            names.append(Path(overrides[i + 1]).stem)
        elif arg.startswith("--config="):
            names.append(Path(arg.split("=", 1)[1]).stem)
    return "+".join(names)


def sbatch_options(extra: list[str]) -> list[tuple[str, str | None]]:
    """Other sbatch options as ``(--name, value or None)``: ``--opt value``, ``--opt=value`` or a bare ``--flag``."""
    options: list[tuple[str, str | None]] = []
    i = 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--") or arg == "--":
            raise SubmitError(
                f"{arg!r} is not an sbatch option: give options as --name value or --name=value, and CLI overrides "
                "after --"
            )
        if "=" in arg:
            name, value = arg.split("=", 1)
            options.append((name, value))
            i += 1
        elif i + 1 < len(extra) and not extra[i + 1].startswith("-"):
            options.append((arg, extra[i + 1]))
            i += 2
        else:
            options.append((arg, None))
            i += 1
    return options


def sbatch_command(
    recipe: Path,
    overrides: list[str],
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    cpus_per_task: int | None = None,
    time: str | None = None,
    partition: str | None = None,
    job_name: str | None = None,
    extra: list[str] | None = None,
    sweep_id: str | None = None,
) -> list[str]:
    """The ``sbatch`` command, to run from the repository root; ``extra``: other sbatch options, passed on. With
    ``sweep_id``, ``recipe`` is a W&B sweep file: the agent script with its trials' allocation."""
    sweep = recipe if sweep_id else None
    if sweep is not None:
        recipe, fixed = sweep_trial(sweep)
        alloc = plan(recipe, [*fixed, *overrides], nodes, gpus_per_node)
    else:
        alloc = plan(recipe, overrides, nodes, gpus_per_node)
    options = sbatch_options(extra or [])
    managed = {"--nodes", "--ntasks-per-node", "--ntasks", "--job-name"}
    clash = [name for name, _ in options if name in managed]
    if clash:
        raise SubmitError(f"{clash[0]} is set by the helper from the recipe; use its own flag or a CLI override")
    gres = [value for name, value in options if name == "--gres"]
    if gres:
        count = (gres[-1] or "").rsplit(":", 1)[-1]
        if not count.isdigit() or int(count) != alloc.gpus_per_node:
            raise SubmitError(
                f"--gres={gres[-1]} does not ask for the recipe's {alloc.gpus_per_node} GPUs per node "
                f"(trainer.devices); give --gres=gpu:<type>:{alloc.gpus_per_node}"
            )
    own_gres = f"--gres=gpu:{alloc.gpus_per_node}" if alloc.gpus_per_node else "--gres=none"
    name = job_name or (f"sweep-{sweep.stem}" if sweep is not None else stacked_name(recipe, overrides))
    cmd = [
        "sbatch",
        f"--job-name={name}",
        f"--nodes={alloc.nodes}",
        f"--ntasks-per-node={alloc.tasks_per_node}",
        *([] if gres else [own_gres]),
    ]
    if cpus_per_task is not None:
        cmd.append(f"--cpus-per-task={cpus_per_task}")
    if time is not None:
        cmd.append(f"--time={time}")
    if partition is not None:
        cmd.append(f"--partition={partition}")
    cmd += [option if value is None else f"{option}={value}" for option, value in options]
    if sweep is not None:
        return [*cmd, SWEEP_SCRIPT, sweep_id, *overrides, *alloc.extra_overrides]
    return [*cmd, alloc.script, _repo_relative(recipe), *overrides, *alloc.extra_overrides]


def describe(recipe: Path, overrides: list[str], alloc: Allocation) -> str:
    """Where the run goes and the global batch it trains with."""
    settings = effective_settings(recipe, overrides)
    trainer, data = settings["trainer"], settings["data"]
    root = trainer.get("default_root_dir") or f"runs/{recipe.stem}"
    lines = [f"run directory: {root}/<job id>; output: {OUTPUT_DIR}/<job name>-<job id>.out"]
    batch, accumulate = data.get("batch_size"), int(trainer.get("accumulate_grad_batches") or 1)
    if isinstance(batch, int):
        ranks = alloc.nodes * alloc.tasks_per_node
        lines.append(
            f"global batch: {batch} per device x {alloc.tasks_per_node} device(s) x {alloc.nodes} node(s) x "
            f"{accumulate} accumulated = {batch * ranks * accumulate}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m lightning_modules submit",
        description="Submit a recipe to SLURM with the allocation its trainer settings need "
        "(CLI overrides after --; any other sbatch option, e.g. --account A --qos Q, is passed on).",
    )
    parser.add_argument("recipe", type=Path, help="a recipe, or a W&B sweep file (with --sweep-id)")
    parser.add_argument(
        "--sweep-id", help="ENTITY/PROJECT/SWEEP_ID of the sweep (from `wandb sweep FILE`) when RECIPE is its file"
    )
    parser.add_argument("--nodes", type=int, help="nodes (must equal trainer.num_nodes)")
    parser.add_argument(
        "--gpus-per-node", type=int, help="GPUs per node (must equal trainer.devices; 0: CPU tasks)"
    )
    parser.add_argument("--cpus-per-task", type=int, help="CPU cores per task (the scripts ask for 10)")
    parser.add_argument("--time", help="time limit, HH:MM:SS or D-HH:MM:SS (the scripts ask for 48:00:00)")
    parser.add_argument("--partition", help="SLURM partition")
    parser.add_argument("--job-name", help="job name (default: the stacked recipes, base+overlay)")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch command, do not submit")
    args, extra = parser.parse_known_args(argv)
    try:
        if is_sweep(args.recipe) != bool(args.sweep_id):
            raise SubmitError(
                f"{args.recipe} is a W&B sweep file: pass --sweep-id ENTITY/PROJECT/SWEEP_ID (from `wandb sweep "
                f"{args.recipe}`)" if args.sweep_id is None else f"--sweep-id needs a sweep file, not {args.recipe}"
            )
        recipe, planned = args.recipe, overrides
        if args.sweep_id:
            recipe, fixed = sweep_trial(args.recipe)
            planned = [*fixed, *overrides]
        alloc = plan(recipe, planned, args.nodes, args.gpus_per_node)
        cmd = sbatch_command(
            args.recipe, overrides, args.nodes, args.gpus_per_node, args.cpus_per_task, args.time, args.partition,
            args.job_name, extra, args.sweep_id,
        )  # fmt: skip
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe(recipe, planned, alloc), file=sys.stderr)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    (REPO / OUTPUT_DIR).mkdir(parents=True, exist_ok=True)  # sbatch cannot create the output file's directory
    done = subprocess.run(
        [cmd[0], "--parsable", *cmd[1:]], check=False, cwd=REPO, capture_output=True, text=True
    )
    if done.returncode != 0:
        print(f"error: sbatch failed: {done.stderr.strip()}", file=sys.stderr)
        return done.returncode
    print(done.stdout.strip().split(";")[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
