"""``make demo-tad``: train the quickstart temporal action detector on the synthetic set and check its target.

Trains ``recipes/quickstart/tad_synthetic.yaml`` (writing the synthetic untrimmed videos on first use), then
prints the validation mAP at tIoU 0.3:0.1:0.7 and their average with the wall time, against the target (average
mAP >= 0.70 within 10 minutes on 2 CPU cores). Results go to ``runs/demo_tad/summary.json``; the detections
are in the run directory (``predictions_val.json``, scored again here by the offline scorer).

    python -m lightning_modules.demo_tad [--out runs/demo_tad] [-- <CLI overrides>]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

from lightning_modules.cli import main as cli_main
from lightning_modules.tad_metrics import mean_average_precision, read_ground_truth, read_predictions

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart" / "tad_synthetic.yaml"
TARGET_MAP = 0.70
TARGET_MINUTES = 10.0


def report(figures: dict[str, float], minutes: float) -> str:
    met = figures["average_mAP"] >= TARGET_MAP and minutes <= TARGET_MINUTES
    thresholds = [k for k in figures if k.startswith("mAP@")]
    lines = [
        "  ".join(f"{k:>8}" for k in [*thresholds, "average"]),
        "  ".join(f"{100 * figures[k]:>7.2f}%" for k in [*thresholds, "average_mAP"]),
        f"quickstart TAD: average mAP {100 * figures['average_mAP']:.2f}% after {minutes:.1f} min of training; "
        f"target (>= {100 * TARGET_MAP:.0f}% within {TARGET_MINUTES:.0f} min): " + ("met" if met else "NOT met"),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m lightning_modules.demo_tad", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/demo_tad", help="where the summary goes")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="after --: CLI overrides for the run")
    args = parser.parse_args(argv)
    overrides = [a for a in args.overrides if a != "--"]
    start = time.perf_counter()
    cli = cli_main(["fit", "--config", str(RECIPE), *overrides])
    minutes = (time.perf_counter() - start) / 60
    run_dir = Path(cli.trainer.default_root_dir)
    logged = {k.removeprefix("val/"): float(v) for k, v in cli.trainer.callback_metrics.items()
              if k.startswith("val/") and "mAP" in k}  # fmt: skip
    if "average_mAP" not in logged:
        raise RuntimeError(f"{RECIPE.name}: fit ended without validation mAP; check max_epochs / val settings")
    # The written detections, scored again from the files as a user of the official evaluator would.
    dm = cli.datamodule
    truth = read_ground_truth(dm.annotation_path, dm.subsets["val"])
    offline = mean_average_precision(read_predictions(run_dir / "predictions_val.json", truth), truth, cli.model.tious)
    summary = {"logged": logged, "offline": offline, "minutes": minutes, "run_dir": str(run_dir),
               "target_average_mAP": TARGET_MAP, "target_minutes": TARGET_MINUTES,
               "met": logged["average_mAP"] >= TARGET_MAP and minutes <= TARGET_MINUTES}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n" + report(logged, minutes))
    print(f"run: {run_dir}; summary: {out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
