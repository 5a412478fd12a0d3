"""Offline temporal action detection scorer: mAP of an ActivityNet results JSON against the ground truth.

    python -m lightning_modules evaluate-tad --ground-truth thumos14.json --predictions results.json
    python -m lightning_modules evaluate-tad --ground-truth activity_net.v1-3.min.json \\
        --predictions results.json --tiou 0.5 0.55 0.6 0.65 0.7 0.75 0.8 0.85 0.9 0.95

Prints one JSON object, ``{"mAP@0.3": ..., ..., "average_mAP": ...}`` (fractions in [0, 1]), to stdout;
warnings (ignored labels, videos outside the ground truth) go to stderr. A malformed file exits with code 2
and a message naming the file and the fix. The ground truth is an ActivityNet / OpenTAD JSON (``--subset``
selects the videos) or a THUMOS14 CSV (``video,type,type_idx,start,end,startFrame,endFrame``; the whole file
is one subset). Bad arguments exit with code 2 through argparse.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from datamodules.base import AnnotationError
from lightning_modules.metrics.tad import (
    THUMOS_TIOUS,
    mean_average_precision,
    read_ground_truth,
    read_predictions,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_modules evaluate-tad",
        description="Temporal action detection mAP by the ActivityNet protocol.",
    )
    parser.add_argument("--ground-truth", required=True, help="ActivityNet/OpenTAD JSON or THUMOS14 CSV")
    parser.add_argument("--predictions", required=True, help='ActivityNet results JSON ({"results": {...}})')
    parser.add_argument("--subset", default="validation", help="subset of a JSON ground truth (validation)")
    parser.add_argument(
        "--tiou", type=float, nargs="+", default=list(THUMOS_TIOUS),
        help="tIoU thresholds (default: 0.3 0.4 0.5 0.6 0.7, THUMOS14; ActivityNet uses 0.5:0.05:0.95)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if not all(0.0 < t <= 1.0 for t in args.tiou):
        parser.error(f"--tiou thresholds must lie in (0, 1], got {args.tiou}")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ground_truth = read_ground_truth(args.ground_truth, args.subset)
            detections = read_predictions(args.predictions, ground_truth)
    except AnnotationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    print(json.dumps(mean_average_precision(detections, ground_truth, args.tiou)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
