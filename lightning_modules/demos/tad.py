"""``make demo-tad``: the quickstart temporal action detector, from its pretrained backbone to its target.

AdaTAD fine-tunes a VideoMAE pretrained on Kinetics; the quickstart does the same at toy scale, in two stages run
through the CLI a user runs:

1. backbone: the dense quickstart ViT (``recipes/quickstart/synthetic_dense_vit.yaml``, as ``make demo`` trains
   it) learns to classify the synthetic motion clips, the stand-in for Kinetics. It runs as
   ``runs/quickstart_dense/tad_backbone``, the checkpoint the detector recipe names; once finished it is reused
   (an interrupted one resumes). ``--pretrained PATH`` takes another checkpoint of that ViT, ``--pretrained
   none`` trains the detector from scratch.
2. detector: ``recipes/quickstart/tad_synthetic.yaml`` fine-tunes that backbone with an ActionFormer head on the
   synthetic untrimmed videos (written on first use).

Prints the validation mAP at tIoU 0.3:0.1:0.7 and their average, with the wall time of each stage, against the
target (average mAP >= 0.70 within 10 minutes of detector training on 2 CPU cores). Results go to
``runs/demo_tad/summary.json``; the detections are in the detector's run directory (``predictions_val.json``,
scored again here by the offline scorer).

    python -m lightning_modules.demos.tad [--out runs/demo_tad] [--pretrained PATH|none]
        [--backbone-args "<CLI overrides for stage 1>"] [-- <CLI overrides for stage 2>]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import time
from collections.abc import Sequence
from pathlib import Path

from lightning_modules.cli import main as cli_main
from lightning_modules.metrics.tad import mean_average_precision, read_ground_truth, read_predictions

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "quickstart"
RECIPE = RECIPES / "tad_synthetic.yaml"
BACKBONE_RECIPE = RECIPES / "synthetic_dense_vit.yaml"
BACKBONE_RUN = "tad_backbone"
TARGET_MAP = 0.70
TARGET_MINUTES = 10.0


def train_backbone(out: Path, overrides: Sequence[str]) -> dict:
    """Stage 1: fit the dense quickstart ViT as run ``tad_backbone``, or reuse the one a previous demo finished.

    The record (checkpoint, validation top-1, minutes) is kept in ``out/backbone.json`` and trusted while the
    checkpoint it names exists and the recipe's text and the stage's overrides are the same; after a change of
    the recipe the run continues from its last checkpoint to the recipe's epochs.
    """
    record_path = out / "backbone.json"
    recipe = hashlib.sha256(BACKBONE_RECIPE.read_bytes()).hexdigest()
    if record_path.exists():
        record = json.loads(record_path.read_text())
        same = record["overrides"] == list(overrides) and record.get("recipe_sha256") == recipe
        if Path(record["checkpoint"]).exists() and same:
            return {**record, "reused": True}
    start = time.perf_counter()
    cli = cli_main(["fit", "--config", str(BACKBONE_RECIPE), f"--run_id={BACKBONE_RUN}", *overrides])
    minutes = (time.perf_counter() - start) / 60
    # Where every run keeps it (also when a run finished earlier resumes as a no-op fit).
    last = Path(cli.trainer.default_root_dir) / "checkpoints" / "last.ckpt"
    if not last.exists():
        raise RuntimeError(f"{BACKBONE_RECIPE.name}: fit ended without {last} to start the detector from")
    top1 = cli.trainer.callback_metrics.get("val/top1")
    record = {
        "checkpoint": str(last),
        "val_top1": None if top1 is None else float(top1),
        "minutes": minutes,
        "overrides": list(overrides),
        "recipe_sha256": recipe,
    }
    out.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=2))
    return {**record, "reused": False}


def report(figures: dict[str, float], minutes: float, backbone: dict | None) -> str:
    met = figures["average_mAP"] >= TARGET_MAP and minutes <= TARGET_MINUTES
    thresholds = [k for k in figures if k.startswith("mAP@")]
    lines = [
        "  ".join(f"{k:>8}" for k in [*thresholds, "average"]),
        "  ".join(f"{100 * figures[k]:>7.2f}%" for k in [*thresholds, "average_mAP"]),
    ]
    if backbone is None:
        lines.append("backbone: trained from scratch with the detector (no pretraining)")
    else:
        top1 = "" if backbone["val_top1"] is None else f", val top-1 {100 * backbone['val_top1']:.2f}%"
        when = "finished earlier, reused" if backbone.get("reused") else "this run"
        took = (
            f"{backbone['minutes']:.1f} min" if backbone.get("minutes") is not None else "time not recorded"
        )
        lines.append(f"backbone: {backbone['checkpoint']} ({took}, {when}{top1})")
    lines.append(
        f"quickstart TAD: average mAP {100 * figures['average_mAP']:.2f}% after {minutes:.1f} min of detector "
        f"training; target (>= {100 * TARGET_MAP:.0f}% within {TARGET_MINUTES:.0f} min): "
        + ("met" if met else "NOT met")
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_modules.demos.tad", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", default="runs/demo_tad", help="where the summary goes")
    parser.add_argument(
        "--pretrained",
        default=None,
        help="a checkpoint of the quickstart ViT to start the detector from instead of stage 1, or 'none' for a "
        "detector trained from scratch",
    )
    parser.add_argument(
        "--backbone-args", default="", help="CLI overrides for stage 1 (one shell-quoted string)"
    )
    parser.add_argument(
        "overrides", nargs=argparse.REMAINDER, help="after --: CLI overrides for the detector run"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    overrides = [a for a in args.overrides if a != "--"]
    if args.pretrained is None:
        backbone: dict | None = train_backbone(out, shlex.split(args.backbone_args))
    elif args.pretrained.lower() == "none":
        backbone = None
    else:
        backbone = {"checkpoint": args.pretrained, "val_top1": None, "minutes": None, "reused": True}
    pretrained = "null" if backbone is None else backbone["checkpoint"]

    start = time.perf_counter()
    cli = cli_main(["fit", "--config", str(RECIPE), f"--model.init_args.pretrained={pretrained}", *overrides])
    minutes = (time.perf_counter() - start) / 60
    run_dir = Path(cli.trainer.default_root_dir)
    logged = {k.removeprefix("val/"): float(v) for k, v in cli.trainer.callback_metrics.items()
              if k.startswith("val/") and "mAP" in k}  # fmt: skip
    if "average_mAP" not in logged:
        raise RuntimeError(
            f"{RECIPE.name}: fit ended without validation mAP; check max_epochs / val settings"
        )
    # The written detections, scored again from the files as a user of the official evaluator would.
    dm = cli.datamodule
    truth = read_ground_truth(dm.annotation_path, dm.subsets["val"])
    offline = mean_average_precision(
        read_predictions(run_dir / "predictions_val.json", truth), truth, cli.model.tious
    )
    summary = {"logged": logged, "offline": offline, "minutes": minutes, "run_dir": str(run_dir),
               "backbone": backbone, "target_average_mAP": TARGET_MAP, "target_minutes": TARGET_MINUTES,
               "met": logged["average_mAP"] >= TARGET_MAP and minutes <= TARGET_MINUTES}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n" + report(logged, minutes, backbone))
    print(f"run: {run_dir}; summary: {out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
