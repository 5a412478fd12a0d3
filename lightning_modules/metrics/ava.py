"""Frame-mAP of spatio-temporal action detection by the AVA protocol: readers, writer, the cap, the Metric.

The protocol, as the official ActivityNet AVA evaluator (``get_ava_performance.py``) computes it:

- Only the classes of the label map (``.pbtxt``) are evaluated; rows of other classes are skipped, in the ground
  truth silently (AVA lists 80 actions and evaluates 60), in the detections with a counted warning.
- A keyframe is ``(video_id, int(timestamp))``. Excluded keyframes lose their ground truth and detections.
- At most 50 detections per keyframe, across classes, are kept by score (after the label-map filter). Where
  scores tie at the cut, the official reader's rule decides: rows are pushed in file order onto a min-heap of
  ``(score, action id, y1, x1, y2, x2)``, and a row replaces the heap's minimum only if its score is strictly
  higher. ``keep_top_detections`` implements exactly that rule.
- Detections whose box is empty (``x2 == x1`` or ``y2 == y1``) are dropped after the cap, as the official
  evaluator drops them; they are neither true nor false positives.
- Per class, detections are ranked by score; each one, in rank order, is compared with the ground-truth
  boxes of its keyframe and class and takes the one of highest IoU (the PASCAL VOC rule): a true positive if
  that IoU >= the threshold and that box is still unmatched, else a false positive (also when a second box
  would have matched). Detections on keyframes without ground truth are false positives.
- IoU of continuous coordinates, without the +1 of pixel-index conventions (areas ``(x2 - x1) * (y2 - y1)``).
- AP is the VOC all-point interpolated area under the precision/recall curve (VOC2010+, not 11-point). A class
  with ground truth and no detection has AP 0; a class without ground truth has AP NaN and is left out of the
  mean (``nanmean``).
- ``frame_mAP@0.5:0.95`` (not part of the official tool) averages the mAP over IoU 0.5, 0.55, ..., 0.95.

Ties in score: the official evaluator ranks with numpy's unstable ``argsort``, so its order among equal scores
is unspecified. Here ties keep their input order (a stable sort): file order for the CSV readers, and
(video, timestamp, box, class) order in ``AVAFrameMAP``. The same order decides, among equal IoUs, which
ground-truth box a detection is compared with (the first listed).

The IoU, VOC matching and AP, the cap's tie rule and the Metric base that counts DDP repeats once are shared
with UCF101-24 / JHMDB and live in ``lightning_modules.metrics.frame_ap``; this module holds the AVA files (label map,
ground truth, excluded_timestamps and detections CSVs), the 50-per-keyframe cap and ``AVAFrameMAP``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from datamodules.ava_annotations import csv_rows, parse_box, parse_finite, parse_int, read_label_map
from datamodules.base import AnnotationError
from lightning_modules.metrics.frame_ap import (
    IOU_THRESHOLDS,
    FrameBoxes,
    FrameDetectionRows,
    as_matrix,
    frame_average_precision,
    keep_top_detections,
    summarize_frame_map,
)

AVA_MAX_DETECTIONS_PER_KEYFRAME = 50
AVA_CSV_COLUMNS = "video_id, timestamp, x1, y1, x2, y2, action_id"


# Files (the label map, excluded timestamps and CSV rows are read by datamodules.ava_annotations) ---------------


def read_ava_ground_truth(
    path: str | Path, label_map: Mapping[int, str], excluded_timestamps: Iterable[tuple[str, int]] = ()
) -> FrameBoxes:
    """Ground truth of an AVA CSV (``video_id, timestamp, x1, y1, x2, y2, action_id[, person_id]``).

    Rows of classes outside ``label_map`` and of excluded keyframes are skipped. Keyframes are numbered in order of
    first appearance; rows keep file order. Errors name the file, the line and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"ground-truth file {path} not found; pass the AVA CSV (e.g. ava_val_v2.2.csv)")
    excluded = frozenset(excluded_timestamps)
    frames: dict[tuple[str, int], int] = {}
    rows: list[tuple[int, float, float, float, float, int]] = []
    for where, fields in csv_rows(path):
        if len(fields) not in (7, 8):
            raise AnnotationError(
                f"{where}: expected 7 or 8 columns '{AVA_CSV_COLUMNS}[, person_id]', got {len(fields)}"
            )
        key = (fields[0], parse_int(fields[1], where, "timestamp"))
        box = parse_box(fields[2:6], where)
        action = parse_int(fields[6], where, "action_id")
        if action not in label_map or key in excluded:
            continue
        rows.append((frames.setdefault(key, len(frames)), *box, action))
    if not rows:
        raise AnnotationError(
            f"{path}: no ground-truth row of a label-map class outside the excluded_timestamps; expected rows "
            f"'{AVA_CSV_COLUMNS}, person_id' with action ids from the label map"
        )
    table = np.array(rows, dtype=np.float64)
    return FrameBoxes(
        frame=table[:, 0].astype(np.int64), boxes=table[:, 1:5], labels=table[:, 5].astype(np.int64),
        frames=tuple(frames),
    )  # fmt: skip


def read_ava_detections(
    path: str | Path,
    ground_truth: FrameBoxes,
    label_map: Mapping[int, str],
    excluded_timestamps: Iterable[tuple[str, int]] = (),
    max_detections_per_keyframe: int | None = AVA_MAX_DETECTIONS_PER_KEYFRAME,
) -> FrameBoxes:
    """Detections of an AVA CSV (``video_id, timestamp, x1, y1, x2, y2, action_id, score``), indexed like
    ``ground_truth``: its keyframes first, then those only the detections list (their rows are false positives).

    As the official reader: rows of classes outside ``label_map`` are dropped (a counted warning), then each
    keyframe keeps its ``max_detections_per_keyframe`` best rows (``keep_top_detections``), excluded keyframes go,
    and empty boxes are dropped (a counted warning). Rows keep file order.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"detections file {path} not found; pass the CSV written by the test run")
    excluded = frozenset(excluded_timestamps)
    frames = {key: i for i, key in enumerate(ground_truth.frames)}
    rows: list[tuple[int, float, float, float, float, int, float]] = []
    unknown: dict[int, int] = {}
    for where, fields in csv_rows(path):
        if len(fields) != 8:
            raise AnnotationError(
                f"{where}: expected 8 columns '{AVA_CSV_COLUMNS}, score', got {len(fields)}"
            )
        key = (fields[0], parse_int(fields[1], where, "timestamp"))
        box = parse_box(fields[2:6], where, allow_empty=True)
        action = parse_int(fields[6], where, "action_id")
        score = parse_finite(fields[7], where, "score")
        if action not in label_map:
            unknown[action] = unknown.get(action, 0) + 1
            continue
        rows.append((frames.setdefault(key, len(frames)), *box, action, score))
    if unknown:
        warnings.warn(
            f"{path}: {sum(unknown.values())} detections of {len(unknown)} action ids outside the label map "
            f"(e.g. {sorted(unknown)[:3]}) are ignored"
        )
    table = np.array(rows, dtype=np.float64).reshape(-1, 7)
    frame, boxes = table[:, 0].astype(np.int64), table[:, 1:5]
    labels, scores = table[:, 5].astype(np.int64), table[:, 6]
    keep = _capped(frame, scores, labels, boxes, max_detections_per_keyframe)
    names = list(frames)
    keep = keep[np.array([names[f] not in excluded for f in frame[keep]], dtype=bool)]
    empty = (boxes[keep, 2] <= boxes[keep, 0]) | (boxes[keep, 3] <= boxes[keep, 1])
    if empty.any():
        warnings.warn(f"{path}: {int(empty.sum())} detections with an empty box are ignored")
    keep = keep[~empty]
    outside = np.unique(frame[keep][frame[keep] >= len(ground_truth.frames)])
    if len(outside):
        warnings.warn(
            f"{path}: detections on {len(outside)} keyframes the ground truth does not list (e.g. "
            f"{names[outside[0]]}) count as false positives; check the split"
        )
    return FrameBoxes(frame[keep], boxes[keep], labels[keep], scores[keep], tuple(names))


def _capped(
    frame: np.ndarray, scores: np.ndarray, labels: np.ndarray, boxes: np.ndarray, capacity: int | None
) -> np.ndarray:
    """Rows (ascending) that survive ``keep_top_detections`` within each frame."""
    if capacity is None or capacity < 1 or len(frame) == 0:
        return np.arange(len(frame))
    counts = np.bincount(frame)
    if counts.max() <= capacity:
        return np.arange(len(frame))
    order = np.argsort(frame, kind="stable")
    starts = np.cumsum(counts) - counts
    drop = np.zeros(len(frame), dtype=bool)
    for f in np.flatnonzero(counts > capacity):
        rows = order[starts[f] : starts[f] + counts[f]]
        kept = keep_top_detections(scores[rows], labels[rows], boxes[rows], capacity)
        drop[rows] = True
        drop[rows[kept]] = False
    return np.flatnonzero(~drop)


def ava_frame_map(
    detections: FrameBoxes, ground_truth: FrameBoxes, label_map: Mapping[int, str]
) -> dict[str, Any]:
    """``{"frame_mAP@0.5", "frame_mAP@0.5:0.95", "per_class": {name: AP@0.5}}``; NaN for a class without GT."""
    classes = list(label_map)
    ap = frame_average_precision(detections, ground_truth, classes, IOU_THRESHOLDS)
    out: dict[str, Any] = summarize_frame_map(ap, IOU_THRESHOLDS)
    out["per_class"] = {label_map[c]: float(v) for c, v in zip(classes, ap[0])}
    return out


# Metric -----------------------------------------------------------------------------------------------------


def _score_rows(
    boxes: np.ndarray, scores: np.ndarray, columns: np.ndarray, capacity: int | None
) -> dict[str, np.ndarray]:
    """One frame's (N, 4) boxes and (N, C) scores as rows (box-major, then column), capped by the AVA rule."""
    picked = scores[:, columns]  # (N, E)
    row_boxes = np.repeat(boxes, len(columns), axis=0)  # (N * E, 4)
    row_labels = np.tile(columns, len(boxes))
    row_scores = picked.reshape(-1)
    keep = keep_top_detections(row_scores, row_labels, row_boxes, capacity)
    return {"det_boxes": row_boxes[keep], "det_scores": row_scores[keep], "det_labels": row_labels[keep]}


class AVAFrameMAP(FrameDetectionRows):
    """AVA frame-mAP at IoU 0.5 (and averaged over 0.5:0.95) by the official protocol, exact under DDP padding.

    Score columns are AVA action ids minus one (column ``c`` is action ``c + 1``, as the AVA CSVs number them
    from 1). ``label_map`` (a ``.pbtxt`` path or ``{id: name}``) picks the evaluated classes, e.g. the 60 of
    ``ava_action_list_v2.2_for_activitynet_2019.pbtxt``; by default every column is evaluated.

    ``update(preds, target, video_ids, timestamps)`` takes one entry per keyframe: ``preds[i]`` a dict with
    ``boxes`` (N, 4) x1, y1, x2, y2 normalised to [0, 1] and ``scores`` (N, num_classes), the final score of every
    box for every action (the usual convention is person score x action score); ``target[i]`` a dict with
    ``boxes`` (M, 4) and ``labels`` (M, num_classes) multi-hot; ``video_ids`` (B,) and ``timestamps`` (B,)
    integers naming the keyframe. Each keyframe keeps its ``max_detections_per_keyframe`` best (box, action)
    pairs of the evaluated classes, as the official reader does (None keeps all). Excluded keyframes should
    not be passed. A repeated keyframe is counted once (see ``FrameDetectionRows``).

    ``compute()`` returns ``frame_mAP@0.5``, ``frame_mAP@0.5:0.95`` and, with ``per_class``, ``AP@0.5/<name>``
    of every evaluated class (NaN for a class without ground truth). ``write_detections`` exports the
    detections as the official CSV, so the official tool can score them.
    """

    def __init__(
        self,
        num_classes: int = 80,
        label_map: str | Path | Mapping[int, str] | None = None,
        max_detections_per_keyframe: int | None = AVA_MAX_DETECTIONS_PER_KEYFRAME,
        per_class: bool = True,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if isinstance(label_map, (str, Path)):
            label_map = read_label_map(label_map)
        if label_map is None:
            label_map = {c + 1: str(c + 1) for c in range(num_classes)}
        self.label_map = dict(label_map)
        outside = [c for c in self.label_map if not 1 <= c <= num_classes]
        if outside:
            raise ValueError(
                f"label map ids {outside} have no score column (ids 1..num_classes={num_classes})"
            )
        self.num_classes = num_classes
        self.max_detections_per_keyframe = max_detections_per_keyframe
        self.per_class = per_class
        self._columns = np.array(sorted(c - 1 for c in self.label_map), dtype=np.int64)

    def update(
        self,
        preds: Sequence[dict[str, Tensor]],
        target: Sequence[dict[str, Tensor]],
        video_ids: Tensor | Sequence[int],
        timestamps: Tensor | Sequence[int],
    ) -> None:
        if len(preds) != len(target):
            raise ValueError(f"one preds and target per keyframe: {len(preds)} != {len(target)}")
        entries = []
        for p, t in zip(preds, target):
            boxes = as_matrix(p["boxes"], 4, "boxes")
            scores = as_matrix(p["scores"], self.num_classes, "scores")
            gt_boxes = as_matrix(t["boxes"], 4, "boxes")
            labels = as_matrix(t["labels"], self.num_classes, "labels")
            if len(scores) != len(boxes) or len(labels) != len(gt_boxes):
                raise ValueError(
                    f"one row of scores per predicted box ({len(scores)} vs {len(boxes)}) and of labels per "
                    f"target box ({len(labels)} vs {len(gt_boxes)})"
                )
            entry = _score_rows(boxes, scores, self._columns, self.max_detections_per_keyframe)
            box_index, column = np.nonzero(labels[:, self._columns] > 0)  # (box, class) pairs, box-major
            entry["gt_boxes"], entry["gt_labels"] = gt_boxes[box_index], self._columns[column]
            entries.append(entry)
        self._append(video_ids, timestamps, entries)

    def compute(self) -> dict[str, Tensor]:
        _, det, gt = self._gathered()
        if len(gt["gt_labels"]) == 0:
            warnings.warn("AVAFrameMAP: no ground-truth box of an evaluated class was given; the mAP is NaN")
        detections = FrameBoxes(det["frame"], det["det_boxes"], det["det_labels"] + 1, det["det_scores"])
        truth = FrameBoxes(gt["frame"], gt["gt_boxes"], gt["gt_labels"] + 1)
        classes = list(self.label_map)
        ap = frame_average_precision(detections, truth, classes, IOU_THRESHOLDS)
        out = summarize_frame_map(ap, IOU_THRESHOLDS)
        if self.per_class:
            out.update({f"AP@0.5/{self.label_map[c]}": float(v) for c, v in zip(classes, ap[0])})
        return {k: torch.tensor(v, dtype=torch.float32, device=self.device) for k, v in out.items()}
