"""Offline AVA scorer: frame-mAP of a detections CSV against the ground truth, by the official AVA protocol.

    python -m lightning_modules evaluate-ava --label-map ava_action_list_v2.2_for_activitynet_2019.pbtxt \\
        --ground-truth ava_val_v2.2.csv --detections detections.csv \\
        --excluded-timestamps ava_val_excluded_timestamps_v2.2.csv

Prints one JSON object to stdout: ``{"frame_mAP@0.5": ..., "frame_mAP@0.5:0.95": ..., "per_class": {name: AP
at IoU 0.5}}`` (fractions in [0, 1]; ``null`` for a class without ground truth, which the mean leaves out).
Warnings (detections of classes outside the label map, empty boxes, keyframes the ground truth lacks) go to
stderr. A malformed file exits with code 2 and a message naming the file, the line and the fix; bad arguments
exit with code 2 through argparse. The protocol is described in ``lightning_modules.metrics.ava``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings

from datamodules.ava_annotations import read_excluded_timestamps, read_label_map
from datamodules.base import AnnotationError
from lightning_modules.metrics.ava import (
    AVA_MAX_DETECTIONS_PER_KEYFRAME,
    ava_frame_map,
    read_ava_detections,
    read_ava_ground_truth,
)


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_modules evaluate-ava",
        description="AVA frame-mAP at IoU 0.5 by the official ActivityNet AVA protocol.",
    )
    parser.add_argument("--label-map", required=True, help="label map .pbtxt of the evaluated classes")
    parser.add_argument("--ground-truth", required=True, help="AVA ground-truth CSV (e.g. ava_val_v2.2.csv)")
    parser.add_argument(
        "--detections", required=True, help="detections CSV: video,timestamp,x1,y1,x2,y2,id,score"
    )
    parser.add_argument("--excluded-timestamps", help="CSV of excluded keyframes: video_id,timestamp")
    parser.add_argument(
        "--max-detections-per-keyframe", type=int, default=AVA_MAX_DETECTIONS_PER_KEYFRAME,
        help="detections kept per keyframe by score, as the official reader (default 50; 0 keeps all)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            label_map = read_label_map(args.label_map)
            excluded_timestamps = read_excluded_timestamps(args.excluded_timestamps)
            ground_truth = read_ava_ground_truth(args.ground_truth, label_map, excluded_timestamps)
            detections = read_ava_detections(
                args.detections,
                ground_truth,
                label_map,
                excluded_timestamps,
                args.max_detections_per_keyframe,
            )
    except AnnotationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    scores = ava_frame_map(detections, ground_truth, label_map)
    scores = {
        **{k: _json_number(v) for k, v in scores.items() if k != "per_class"},
        "per_class": {name: _json_number(v) for name, v in scores["per_class"].items()},
    }
    print(json.dumps(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
