"""Error analysis of temporal action detectors by the DETAD protocol: one ground truth, one or more models.

    python -m lightning_modules diagnose-tad --ground-truth activity_net.v1-3.min.json \\
        --predictions dense.json dropped.json --names dense dropped --out diagnosis/
    python -m lightning_modules diagnose-tad --ground-truth thumos14_test.csv --predictions results.json \\
        --durations thumos14_durations.json --out diagnosis/

Writes to ``--out`` ``false_positives.png`` (each model's false-positive profile over the rank groups 1G..10G,
side by side), ``fp_removed_error_map.png`` (the average-mAP gain from removing each false-positive type),
``false_negatives.png`` (false-negative rate per bin of coverage, length and number of instances, the models'
bars side by side) and ``diagnosis.json``, the JSON object also printed to stdout::

    {"tious": [...], "bins": "activitynet", "models": {name: {"predictions": file, "mAP": {...},
     "false_positives": {...}, "false_negatives": {...}}}}

Shares and mAPs are fractions; ``mAP`` scores all the detections, the false-positive analysis the top 10G of
each class (see ``lightning_modules.metrics.tad_diagnosis``). Coverage needs the videos' durations: the ActivityNet
JSON's ``duration``, else ``--durations`` (JSON ``{video id: seconds}``); without either it is skipped with a
warning (``"coverage": null``). ``--bins auto`` takes DETAD's THUMOS14 bins for a CSV ground truth and its
ActivityNet bins otherwise. Warnings go to stderr; a malformed file exits with code 2 and a message naming
the file and the fix; bad arguments exit with code 2 through argparse.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from datamodules.base import AnnotationError
from lightning_modules.metrics.tad import mean_average_precision, read_ground_truth, read_predictions
from lightning_modules.metrics.tad_diagnosis import (
    ACTIVITYNET_BINS,
    THUMOS14_BINS,
    false_negative_analysis,
    false_positive_analysis,
    plot_error_impact,
    plot_false_negatives,
    plot_false_positives,
    read_durations,
)

BINS = {"activitynet": ACTIVITYNET_BINS, "thumos14": THUMOS14_BINS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_modules diagnose-tad",
        description="DETAD false-positive and false-negative analysis of temporal action detections.",
    )
    parser.add_argument("--ground-truth", required=True, help="ActivityNet/OpenTAD JSON or THUMOS14 CSV")
    parser.add_argument(
        "--predictions", required=True, nargs="+", help="ActivityNet results JSONs, one per model"
    )
    parser.add_argument("--names", nargs="+", help="one name per predictions file (default: the file names)")
    parser.add_argument("--out", required=True, help="directory for the pictures and diagnosis.json")
    parser.add_argument("--subset", default="validation", help="subset of a JSON ground truth (validation)")
    parser.add_argument(
        "--tiou", type=float, nargs="+", default=[0.5],
        help="tIoU thresholds, the numbers averaged over them (default 0.5; DETAD on ActivityNet: 0.5:0.05:0.95)",
    )  # fmt: skip
    parser.add_argument("--durations", help="JSON {video id: seconds} for the videos the ground truth lacks")
    parser.add_argument(
        "--bins", choices=["auto", *BINS], default="auto",
        help="DETAD's characteristic bins (auto: thumos14 for a CSV ground truth, else activitynet)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if not all(0.0 < t <= 1.0 for t in args.tiou):
        parser.error(f"--tiou thresholds must lie in (0, 1], got {args.tiou}")
    names = args.names or [Path(p).stem for p in args.predictions]
    if len(names) != len(args.predictions):
        parser.error(f"--names gives {len(names)} names for {len(args.predictions)} --predictions files")
    if len(set(names)) != len(names):
        parser.error(f"model names must differ, got {names}; name the models with --names")
    bins_name = args.bins
    if bins_name == "auto":
        bins_name = "thumos14" if Path(args.ground_truth).suffix.lower() == ".csv" else "activitynet"

    report: dict = {"tious": args.tiou, "bins": bins_name, "models": {}}
    positives, negatives = {}, {}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ground_truth = read_ground_truth(args.ground_truth, args.subset)
            durations = read_durations(args.ground_truth, ground_truth, args.durations)
            for name, path in zip(names, args.predictions):
                detections = read_predictions(path, ground_truth)
                positives[name] = false_positive_analysis(detections, ground_truth, args.tiou)
                negatives[name] = false_negative_analysis(
                    detections, ground_truth, durations, args.tiou, BINS[bins_name]
                )
                report["models"][name] = {
                    "predictions": str(path),
                    "mAP": mean_average_precision(detections, ground_truth, args.tiou),
                    "false_positives": positives[name].to_dict(),
                    "false_negatives": negatives[name].to_dict(list(BINS[bins_name])),
                }
    except AnnotationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for message in dict.fromkeys(str(w.message) for w in caught):
        print(f"warning: {message}", file=sys.stderr)
    out = Path(args.out)
    plot_false_positives(positives, out / "false_positives.png")
    plot_error_impact(positives, out / "fp_removed_error_map.png")
    plot_false_negatives(negatives, out / "false_negatives.png")
    text = json.dumps(report, indent=2)
    (out / "diagnosis.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
