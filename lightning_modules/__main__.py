"""``python -m lightning_modules``: the Lightning CLI (fit / validate / test / predict) and the offline tools."""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import textwrap
from collections.abc import Sequence

from lightning_modules import catalogue
from lightning_modules.tools.submit import SRUN_TRIAL_ENV, srun_trial  # the standard library only

PROG = "python -m lightning_modules"

#: The Lightning CLI's commands, each with its description (Lightning's own stop at a docstring's first line).
LIGHTNING_COMMANDS = {
    "fit": "train a task from a recipe (--config recipes/NAME.yaml, several stack); the run directory keeps the "
    "config, logs and checkpoints, and the same --run_id resumes it",
    "validate": "one pass over the validation set with a checkpoint (--ckpt_path), metrics as in fit",
    "test": "one pass over the test set with a checkpoint (--ckpt_path)",
    "predict": "run a checkpoint over the data module's predict set (--ckpt_path)",
}

#: Commands beside the Lightning CLI's: name -> (module with ``main(argv)``, one-line description).
TOOLS = {
    "compress": (
        "lightning_modules.compression.command",
        "progressive block drop of a trained task: score candidate drops, remove the chosen block, recover with "
        "LoRA and alignment losses, round by round, resumable; writes a report and the compressed model",
    ),
    "convert-checkpoint": (
        "lightning_modules.tools.convert_checkpoint",
        "turn an official trained model (EVAD model zoo, HaltingVT release, OpenTAD AdaTAD / ActionFormer) into a "
        "checkpoint of the recipe's task, converted strictly, for validate / test / predict --ckpt_path",
    ),
    "extract-features": (
        "lightning_modules.tools.extract_features",
        "a recipe's backbone features of videos (temporal detection: stitched over its windows, (T, C); "
        "classification: per view), one .npy per video and an index, resumable, one process per GPU",
    ),
    "diagnose-tad": (
        "lightning_modules.tools.diagnose_tad",
        "DETAD error analysis of one or more TAD models' predictions against a ground truth: false positives by "
        "error type, false-negative rates by coverage, length and instance count; PNG plots and one JSON object",
    ),
    "evaluate-ava": (
        "lightning_modules.tools.evaluate_ava",
        "score spatio-temporal detections (AVA CSV) against an AVA ground truth by the official frame-mAP@0.5 "
        "protocol (label map, excluded timestamps, 50 detections per keyframe); prints one JSON object",
    ),
    "evaluate-tad": (
        "lightning_modules.tools.evaluate_tad",
        "score temporal detections (ActivityNet results JSON) against a ground truth (ActivityNet JSON or "
        "THUMOS14 CSV) by the ActivityNet protocol; prints one JSON object",
    ),
    "check-videos": (
        "lightning_modules.tools.check_videos",
        "decode every video of a list (folder, text or Kinetics list, ActivityNet/THUMOS JSON, AVA CSV): first, "
        "middle and last frame; writes the list without the bad videos and a CSV/JSON report of why each is bad",
    ),
    "prepare-ava": (
        "lightning_modules.tools.prepare_ava",
        "cut AVA movies to the annotated 15 minutes (seconds 900-1801) and optionally extract frames at 30 fps "
        "in the layout the AVA data module reads; parallel, resumable",
    ),
    "kinetics-lists": (
        "lightning_modules.tools.kinetics_lists",
        "Kinetics-style video lists and a class index from a <split>/<class>/<video> folder tree; Mini-Kinetics "
        "as a subset by class list and video-id lists",
    ),
    "convert-thumos": (
        "lightning_modules.tools.convert_thumos",
        "THUMOS14's official per-class annotation files to the temporal detection JSON and class list, with "
        "durations read from the videos",
    ),
    "convert-activitynet": (
        "lightning_modules.tools.convert_activitynet",
        "check the official ActivityNet-1.3 JSON against the videos: fps and frame counts filled in, videos "
        "without a file and duration mismatches reported",
    ),
    "submit": (
        "lightning_modules.tools.submit",
        "submit a recipe to SLURM with the allocation its trainer settings need (nodes, GPUs, tasks per node); "
        "CLI overrides after --",
    ),
    "accuracy-vs-macs": (
        "lightning_modules.pictures.tradeoff",
        "plot runs' last validation accuracy against GMACs (multiply-accumulates) per clip, from their CSV logs",
    ),
}


def overview() -> str:
    """The top-level help: every command, task and data module with its whole description, wrapped to the
    terminal. Built without importing torch or Lightning."""
    width = max(60, min(shutil.get_terminal_size().columns, 120))

    def section(title: str, rows: dict[str, str]) -> list[str]:
        """Names in a column with their texts beside them; long names (class paths) on a line of their own."""
        pad = max(len(name) for name in rows) + 4
        lines = [title]
        for name, text in rows.items():
            if pad > 24:
                lines += [f"  {name}", *textwrap.wrap(text, width, initial_indent=" " * 6, subsequent_indent=" " * 6)]
                continue
            lines += textwrap.wrap(
                text, width, initial_indent=f"  {name:<{pad - 2}}", subsequent_indent=" " * pad,
                break_on_hyphens=False,
            )  # fmt: skip
        return [*lines, ""]

    tasks = {path: catalogue.summary(path) for path in catalogue.TASKS}
    data = {path: catalogue.summary(path) for path in catalogue.DATA_MODULES}
    return "\n".join([
        f"usage: {PROG} COMMAND [options]",
        "",
        *textwrap.wrap(
            "EVAD, HaltingVT and progressive block drop on one video-ViT core, run from YAML recipes: "
            f"{PROG} fit --config recipes/haltingvt_minik.yaml. '{PROG} COMMAND --help' lists a command's "
            "options; 'fit --config RECIPE --print_config' shows every knob of a recipe.",
            width,
        ),
        "",
        *section("Training and evaluation (the Lightning CLI):", LIGHTNING_COMMANDS),
        *section("Other commands:", {name: text for name, (_, text) in TOOLS.items()}),
        *section("Tasks (a recipe's model.class_path):", tasks),
        *section("Data modules (a recipe's data.class_path):", data),
    ])


def run(argv: Sequence[str] | None = None) -> int:
    """The process's exit status: a tool's own (an int), 0 for a tool that returns its results (``compress``:
    the round records, for callers in Python), and 0 after a Lightning command (which raises on failure)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(overview(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "fit" and SRUN_TRIAL_ENV in os.environ:
        return srun_trial(argv)  # a sweep trial in the batch shell of recipes/slurm/sweep_agent.sbatch
    if argv[0] in TOOLS:
        status = importlib.import_module(TOOLS[argv[0]][0]).main(argv[1:])
        return status if isinstance(status, int) else 0
    from lightning_modules.cli import main  # torch and Lightning: seconds, not needed for the help above

    main(argv, prog=PROG, descriptions=LIGHTNING_COMMANDS)
    return 0


if __name__ == "__main__":
    sys.exit(run())
