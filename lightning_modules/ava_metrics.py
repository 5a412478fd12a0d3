"""Frame-mAP of spatio-temporal action detection by the AVA protocol: readers, writer, VOC AP, a DDP-exact Metric.

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
"""

from __future__ import annotations

import csv
import heapq
import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric

from datamodules.kinetics_list import AnnotationError
from lightning_modules.metrics import first_occurrences
from lightning_modules.tad_metrics import interpolated_average_precision

IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.5:0.05:0.95
AVA_MAX_DETECTIONS_PER_KEYFRAME = 50
AVA_CSV_COLUMNS = "video_id, timestamp, x1, y1, x2, y2, action_id"

DetectionRow = tuple[str, int, float, float, float, float, int, float]  # video, time, box, action id, score


@dataclass(frozen=True)
class FrameBoxes:
    """A flat table of boxes on frames, one row each: ground truth, or detections when ``scores`` is set."""

    frame: np.ndarray  # (N,) int64 index into frames
    boxes: np.ndarray  # (N, 4) float64 x1, y1, x2, y2
    labels: np.ndarray  # (N,) int64 class label (the AVA action id)
    scores: np.ndarray | None = None  # (N,) float64
    frames: tuple[tuple[str, int], ...] = ()  # (video, timestamp) of each frame index


# Protocol ---------------------------------------------------------------------------------------------------


def box_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """Pairwise IoU (N, M) of x1, y1, x2, y2 boxes, areas without +1; 0 where the union is empty."""
    a, b = np.asarray(boxes1, np.float64).reshape(-1, 1, 4), np.asarray(boxes2, np.float64).reshape(1, -1, 4)
    return paired_iou(a, b)


def paired_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise IoU of boxes (..., 4) that broadcast against each other, areas without +1."""
    width = (np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])).clip(min=0)
    height = (np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])).clip(min=0)
    inter = width * height
    union = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]) + (b[..., 2] - b[..., 0]) * (
        b[..., 3] - b[..., 1]
    )
    union = union - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def best_overlaps(
    det_group: np.ndarray, det_boxes: np.ndarray, gt_group: np.ndarray, gt_boxes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each detection, the ground-truth row of its group (frame and class) with the highest IoU.

    Groups are integer keys. Returns the row (first listed among equal IoUs; -1 when the group has no ground
    truth) and that IoU (-inf without ground truth), both (N,).
    """
    n = len(det_group)
    best_gt, best_iou = np.full(n, -1, dtype=np.int64), np.full(n, -np.inf)
    order = np.argsort(gt_group, kind="stable")
    sorted_groups = gt_group[order]
    low = np.searchsorted(sorted_groups, det_group, "left")
    counts = np.searchsorted(sorted_groups, det_group, "right") - low
    if counts.sum() == 0:
        return best_gt, best_iou
    # Every (detection, ground truth of its group) pair, flat.
    det_idx = np.repeat(np.arange(n), counts)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    gt_idx = order[np.repeat(low, counts) + within]
    ious = paired_iou(det_boxes[det_idx], gt_boxes[gt_idx])
    ranked = np.lexsort((gt_idx, -ious, det_idx))  # per detection: highest IoU, then first listed
    first = ranked[np.r_[True, det_idx[ranked][1:] != det_idx[ranked][:-1]]]
    best_gt[det_idx[first]], best_iou[det_idx[first]] = gt_idx[first], ious[first]
    return best_gt, best_iou


def average_precision_from_matches(
    scores: np.ndarray,
    labels: np.ndarray,
    best_gt: np.ndarray,
    best_iou: np.ndarray,
    gt_labels: np.ndarray,
    classes: Sequence[int],
    thresholds: Sequence[float],
) -> np.ndarray:
    """VOC AP (T, C) per threshold and class, from each detection's best ground truth (``best_overlaps``).

    Detections are ranked by score, ties in input order. At each threshold, a detection is a true positive if
    its best IoU reaches the threshold and no better-ranked detection has claimed the same ground truth.
    ``gt_labels`` (all ground-truth rows) give the number of positives per class; a class without any has AP
    NaN.
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    by_rank = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    true_positive = np.zeros((len(thresholds), len(by_rank)), dtype=bool)
    for t, threshold in enumerate(thresholds):
        candidates = by_rank[best_iou[by_rank] >= threshold]  # rank order
        _, first = np.unique(best_gt[candidates], return_index=True)  # the best-ranked claim of each box
        true_positive[t, candidates[first]] = True
    ap = np.full((len(thresholds), len(classes)), np.nan)
    ranked_labels = labels[by_rank]
    for c, label in enumerate(classes):
        positives = int(np.count_nonzero(gt_labels == label))
        if positives == 0:
            continue
        hits = true_positive[:, by_rank[ranked_labels == label]]  # (T, D) in rank order
        tp = np.cumsum(hits, axis=1)
        precision, recall = tp / np.arange(1, hits.shape[1] + 1), tp / positives
        ap[:, c] = [interpolated_average_precision(p, r) for p, r in zip(precision, recall)]
    return ap


def _groups(frame: np.ndarray, labels: np.ndarray, span: int) -> np.ndarray:
    return frame.astype(np.int64) * span + labels.astype(np.int64)


def frame_average_precision(
    detections: FrameBoxes,
    ground_truth: FrameBoxes,
    classes: Sequence[int],
    thresholds: Sequence[float] = IOU_THRESHOLDS,
) -> np.ndarray:
    """Per-frame VOC AP (T, C) of ``classes`` at each IoU threshold; frame indices shared by both tables."""
    labels = np.concatenate([detections.labels, ground_truth.labels, [0]])
    if labels.min() < 0:
        raise ValueError(f"labels must be non-negative, got {labels.min()}")
    span = int(labels.max()) + 1
    best_gt, best_iou = best_overlaps(
        _groups(detections.frame, detections.labels, span), detections.boxes,
        _groups(ground_truth.frame, ground_truth.labels, span), ground_truth.boxes,
    )  # fmt: skip
    return average_precision_from_matches(
        detections.scores, detections.labels, best_gt, best_iou, ground_truth.labels, classes, thresholds
    )


def nan_mean(values: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """Mean over the finite entries (NaN where there are none), without numpy's empty-slice warning."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    count = finite.sum(axis=axis)
    total = np.where(finite, values, 0.0).sum(axis=axis)
    return np.divide(total, count, out=np.full_like(total, np.nan, dtype=np.float64), where=count > 0)


def summarize_frame_map(ap: np.ndarray, thresholds: Sequence[float] = IOU_THRESHOLDS) -> dict[str, float]:
    """``frame_mAP@0.5`` and ``frame_mAP@0.5:0.95`` from AP (T, C) at ``thresholds`` (which must hold those)."""
    per_threshold = nan_mean(ap, axis=1)
    index = {round(float(t), 4): i for i, t in enumerate(thresholds)}
    missing = [t for t in IOU_THRESHOLDS if round(t, 4) not in index]
    if missing:
        raise ValueError(f"thresholds {list(thresholds)} lack {missing}, needed for frame_mAP@0.5:0.95")
    at = [per_threshold[index[round(t, 4)]] for t in IOU_THRESHOLDS]
    return {"frame_mAP@0.5": float(at[0]), "frame_mAP@0.5:0.95": float(np.mean(at))}


def keep_top_detections(
    scores: np.ndarray, labels: np.ndarray, boxes: np.ndarray, capacity: int | None
) -> np.ndarray:
    """Row indices (ascending) of one keyframe's detections that the official AVA reader keeps.

    The ``capacity`` best scores survive; at a tie across the cut, the official min-heap rule decides (rows in
    order; a row enters a full heap only by a strictly higher score than its minimum, and the minimum evicted is
    the smallest ``(score, label, y1, x1, y2, x2)``). Rows below the cut never matter, so the heap only runs on
    the rows at or above it, and only when the cut splits a tie. ``capacity`` None or < 1 keeps everything.
    """
    n = len(scores)
    if capacity is None or capacity < 1 or n <= capacity:
        return np.arange(n)
    cut = np.partition(scores, n - capacity)[n - capacity]  # the capacity-th highest score
    above, at = scores > cut, scores == cut
    if np.count_nonzero(above) + np.count_nonzero(at) == capacity:
        return np.flatnonzero(above | at)
    heap: list[tuple] = []
    for i in np.flatnonzero(above | at):
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        entry = (float(scores[i]), int(labels[i]), y1, x1, y2, x2, int(i))
        if len(heap) < capacity:
            heapq.heappush(heap, entry)
        elif entry[0] > heap[0][0]:
            heapq.heapreplace(heap, entry)
    return np.sort(np.array([entry[-1] for entry in heap], dtype=np.int64))


# Files ------------------------------------------------------------------------------------------------------


def read_labelmap(path: str | Path) -> dict[int, str]:
    """The classes of an AVA label map ``.pbtxt`` (``item { name: "..." id: N }``), id -> name in file order.

    ``label_id`` is accepted for ``id``, as the official reader does.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"label map {path} not found; pass the .pbtxt listing the evaluated classes")
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{path}: not a text label map ({err}); expected a .pbtxt") from None
    labelmap: dict[int, str] = {}
    for item in re.finditer(r"item\s*\{(.*?)\}", text, flags=re.DOTALL):
        line = text.count("\n", 0, item.start()) + 1
        body = item.group(1)
        name = re.search(r'\bname\s*:\s*"([^"]*)"', body)
        class_id = re.search(r"\b(?:label_id|id)\s*:\s*(-?\d+)\b", body)
        if name is None or class_id is None:
            raise AnnotationError(
                f'{path}: line {line}: the item needs both name: "..." and id: N, e.g. '
                'item { name: "stand" id: 12 }'
            )
        number = int(class_id.group(1))
        if number < 1:
            raise AnnotationError(f"{path}: line {line}: class id {number} must be a positive integer")
        if number in labelmap:
            raise AnnotationError(
                f"{path}: line {line}: class id {number} is listed twice; ids must be unique"
            )
        labelmap[number] = name.group(1)
    if not labelmap:
        raise AnnotationError(f'{path}: no class found; expected items like item {{ name: "stand" id: 12 }}')
    return labelmap


def _csv_rows(path: Path) -> Iterable[tuple[str, list[str]]]:
    """Non-blank rows with their location ``"<file>: line <n>"``, fields stripped."""
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        try:
            for row in reader:
                fields = [field.strip() for field in row]
                if any(fields):
                    yield f"{path}: line {reader.line_num}", fields
        except (UnicodeDecodeError, csv.Error) as err:
            raise AnnotationError(f"{path}: line {reader.line_num + 1}: not a readable CSV ({err})") from None


def _integer(value: str, where: str, field: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise AnnotationError(f"{where}: {field} must be an integer, got {value!r}") from None


def _finite(value: str, where: str, field: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise AnnotationError(f"{where}: {field} must be a finite number, got {value!r}")
    return number


def _box(fields: Sequence[str], where: str) -> tuple[float, float, float, float]:
    """x1, y1, x2, y2 normalised to [0, 1], not reversed (may be empty)."""
    x1, y1, x2, y2 = (_finite(v, where, name) for v, name in zip(fields, ("x1", "y1", "x2", "y2")))
    if not all(0.0 <= v <= 1.0 for v in (x1, y1, x2, y2)):
        raise AnnotationError(
            f"{where}: box ({x1}, {y1}, {x2}, {y2}) lies outside [0, 1]; AVA boxes are normalised by the "
            "frame width and height (divide pixel coordinates by them, clip to [0, 1])"
        )
    if x2 < x1 or y2 < y1:
        raise AnnotationError(
            f"{where}: box ({x1}, {y1}, {x2}, {y2}) is reversed; columns are x1, y1, x2, y2 with x1 < x2, y1 < y2"
        )
    return x1, y1, x2, y2


def read_exclusions(path: str | Path | None) -> frozenset[tuple[str, int]]:
    """The excluded keyframes ``(video_id, timestamp)`` of an AVA exclusions CSV; empty for None."""
    if path is None:
        return frozenset()
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(
            f"exclusions file {path} not found; pass the excluded-timestamps CSV or omit it"
        )
    excluded = set()
    for where, fields in _csv_rows(path):
        if len(fields) != 2:
            raise AnnotationError(f"{where}: expected 2 columns 'video_id, timestamp', got {len(fields)}")
        excluded.add((fields[0], _integer(fields[1], where, "timestamp")))
    return frozenset(excluded)


def read_ava_ground_truth(
    path: str | Path, labelmap: Mapping[int, str], exclusions: Iterable[tuple[str, int]] = ()
) -> FrameBoxes:
    """Ground truth of an AVA CSV (``video_id, timestamp, x1, y1, x2, y2, action_id[, person_id]``).

    Rows of classes outside ``labelmap`` and of excluded keyframes are skipped. Keyframes are numbered in order of
    first appearance; rows keep file order. Errors name the file, the line and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"ground-truth file {path} not found; pass the AVA CSV (e.g. ava_val_v2.2.csv)")
    excluded = frozenset(exclusions)
    frames: dict[tuple[str, int], int] = {}
    rows: list[tuple[int, float, float, float, float, int]] = []
    for where, fields in _csv_rows(path):
        if len(fields) not in (7, 8):
            raise AnnotationError(
                f"{where}: expected 7 or 8 columns '{AVA_CSV_COLUMNS}[, person_id]', got {len(fields)}"
            )
        key = (fields[0], _integer(fields[1], where, "timestamp"))
        box = _box(fields[2:6], where)
        if box[2] == box[0] or box[3] == box[1]:
            raise AnnotationError(
                f"{where}: box {box} is empty; a ground-truth box needs x1 < x2 and y1 < y2"
            )
        action = _integer(fields[6], where, "action_id")
        if action not in labelmap or key in excluded:
            continue
        rows.append((frames.setdefault(key, len(frames)), *box, action))
    if not rows:
        raise AnnotationError(
            f"{path}: no ground-truth row of a label-map class outside the exclusions; expected rows "
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
    labelmap: Mapping[int, str],
    exclusions: Iterable[tuple[str, int]] = (),
    max_detections_per_keyframe: int | None = AVA_MAX_DETECTIONS_PER_KEYFRAME,
) -> FrameBoxes:
    """Detections of an AVA CSV (``video_id, timestamp, x1, y1, x2, y2, action_id, score``), indexed like
    ``ground_truth``: its keyframes first, then those only the detections list (their rows are false positives).

    As the official reader: rows of classes outside ``labelmap`` are dropped (a counted warning), then each
    keyframe keeps its ``max_detections_per_keyframe`` best rows (``keep_top_detections``), excluded keyframes go,
    and empty boxes are dropped (a counted warning). Rows keep file order.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"detections file {path} not found; pass the CSV written by the test run")
    excluded = frozenset(exclusions)
    frames = {key: i for i, key in enumerate(ground_truth.frames)}
    rows: list[tuple[int, float, float, float, float, int, float]] = []
    unknown: dict[int, int] = {}
    for where, fields in _csv_rows(path):
        if len(fields) != 8:
            raise AnnotationError(
                f"{where}: expected 8 columns '{AVA_CSV_COLUMNS}, score', got {len(fields)}"
            )
        key = (fields[0], _integer(fields[1], where, "timestamp"))
        box = _box(fields[2:6], where)
        action = _integer(fields[6], where, "action_id")
        score = _finite(fields[7], where, "score")
        if action not in labelmap:
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


def write_ava_detections(path: str | Path, rows: Iterable[DetectionRow]) -> Path:
    """Write detections as the official AVA CSV: ``video_id,timestamp,x1,y1,x2,y2,action_id,score``.

    ``rows`` are ``(video_id, timestamp, x1, y1, x2, y2, action_id, score)`` with boxes normalised to [0, 1].
    Timestamps are written with 4 digits and numbers at full precision, so reading the file back ranks the
    detections exactly as in memory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        for video, timestamp, x1, y1, x2, y2, action, score in rows:
            numbers = [repr(float(v)) for v in (x1, y1, x2, y2)]
            writer.writerow([video, f"{int(timestamp):04d}", *numbers, int(action), repr(float(score))])
    return path


def ava_frame_map(
    detections: FrameBoxes, ground_truth: FrameBoxes, labelmap: Mapping[int, str]
) -> dict[str, Any]:
    """``{"frame_mAP@0.5", "frame_mAP@0.5:0.95", "per_class": {name: AP@0.5}}``; NaN for a class without GT."""
    classes = list(labelmap)
    ap = frame_average_precision(detections, ground_truth, classes, IOU_THRESHOLDS)
    out: dict[str, Any] = summarize_frame_map(ap, IOU_THRESHOLDS)
    out["per_class"] = {labelmap[c]: float(v) for c, v in zip(classes, ap[0])}
    return out


# Metric -----------------------------------------------------------------------------------------------------


_ENTRY_STATES = ("entry_video", "entry_time", "entry_num_det", "entry_num_gt")
_DETECTION_STATES = ("det_boxes", "det_scores", "det_labels")


class FrameDetectionRows(Metric):
    """The states of a per-frame detection metric, gathered as flat tensors and de-duplicated by frame key.

    Each update entry is one frame, keyed by ``(video id, time)`` (a timestamp or a frame number, integers);
    its detections and ground truth are flat rows. A key seen again (the distributed sampler pads the
    evaluation set by repeating samples) keeps its first occurrence after gathering, so each frame counts
    exactly once, and frames are ordered by key so the result does not depend on the number of ranks.
    Subclasses name extra ground-truth columns in ``gt_columns`` (``gt_boxes`` and ``gt_labels`` always).
    """

    full_state_update = False
    higher_is_better = True
    gt_columns: tuple[str, ...] = ("gt_boxes", "gt_labels")

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        for name in (*_ENTRY_STATES, *_DETECTION_STATES, *self.gt_columns):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def _tensor(self, x: Tensor | Sequence | np.ndarray, dtype: torch.dtype) -> Tensor:
        return torch.as_tensor(x).detach().to(self.device, dtype)

    def _append(
        self, video_ids: Tensor | Sequence[int], times: Tensor | Sequence[int], entries: list[dict[str, Any]]
    ) -> None:
        """Store one batch: ``entries[i]`` maps every detection and ground-truth state name to its rows."""
        videos = self._tensor(video_ids, torch.long).flatten()
        times = self._tensor(times, torch.long).flatten()
        if not len(videos) == len(times) == len(entries):
            raise ValueError(
                f"one entry per key: {len(entries)} entries, {len(videos)} ids, {len(times)} times"
            )
        if not entries:
            return
        if videos.min() < 0 or times.min() < 0 or times.max() >= 2**31:
            raise ValueError("video ids must be >= 0 and times (timestamps, frame numbers) in [0, 2**31)")
        self.entry_video.append(videos)
        self.entry_time.append(times)
        self.entry_num_det.append(self._tensor([len(e["det_scores"]) for e in entries], torch.long))
        self.entry_num_gt.append(self._tensor([len(e["gt_labels"]) for e in entries], torch.long))
        dtypes = {"det_boxes": torch.float64, "det_scores": torch.float64, "gt_boxes": torch.float64}
        for name in (*_DETECTION_STATES, *self.gt_columns):
            getattr(self, name).append(
                torch.cat([self._tensor(e[name], dtypes.get(name, torch.long)) for e in entries])
            )

    def _gathered(self) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The distinct keys (F, 2) ascending, and the detection and ground-truth columns of those frames.

        Both column dicts include ``frame`` (index into the keys); rows keep their order within a frame.
        """
        empty = torch.zeros(0, device=self.device)
        state = {
            name: (torch.cat(value) if value else empty) if isinstance(value, list) else value
            for name, value in self.metric_state.items()
        }
        videos, times = state["entry_video"].long(), state["entry_time"].long()
        keys = videos * 2**31 + times
        keep = first_occurrences(keys)
        keep = keep[torch.argsort(keys[keep], stable=True)]
        frame_keys = torch.stack([videos[keep], times[keep]], 1).cpu().numpy().reshape(-1, 2)

        def columns(count: str, names: Sequence[str], width: dict[str, int]) -> dict[str, np.ndarray]:
            counts = state[count].long()
            starts = (torch.cumsum(counts, 0) - counts)[keep]
            lengths = counts[keep]
            total = int(lengths.sum())
            within = torch.arange(total, device=counts.device)
            offsets = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
            rows = within - offsets + torch.repeat_interleave(starts, lengths)
            out = {"frame": torch.repeat_interleave(torch.arange(len(keep), device=counts.device), lengths)}
            for name in names:
                value = state[name]
                out[name] = value.reshape(-1, width[name])[rows] if name in width else value.reshape(-1)[rows]
            return {k: v.cpu().numpy() for k, v in out.items()}

        widths = {"det_boxes": 4, "gt_boxes": 4}
        return (
            frame_keys,
            columns("entry_num_det", _DETECTION_STATES, widths),
            columns("entry_num_gt", self.gt_columns, widths),
        )


def as_matrix(x: Tensor | np.ndarray | Sequence, width: int, name: str) -> np.ndarray:
    """``x`` as a float64 numpy array (rows, width); an empty input is (0, width)."""
    array = torch.as_tensor(x).detach().cpu().double().numpy()
    if array.size == 0:
        return array.reshape(0, width)
    if array.ndim != 2 or array.shape[1] != width:
        raise ValueError(f"{name} must have shape (rows, {width}), got {tuple(array.shape)}")
    return array


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
    from 1). ``labelmap`` (a ``.pbtxt`` path or ``{id: name}``) picks the evaluated classes, e.g. the 60 of
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
        labelmap: str | Path | Mapping[int, str] | None = None,
        max_detections_per_keyframe: int | None = AVA_MAX_DETECTIONS_PER_KEYFRAME,
        per_class: bool = True,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if isinstance(labelmap, (str, Path)):
            labelmap = read_labelmap(labelmap)
        if labelmap is None:
            labelmap = {c + 1: str(c + 1) for c in range(num_classes)}
        self.labelmap = dict(labelmap)
        outside = [c for c in self.labelmap if not 1 <= c <= num_classes]
        if outside:
            raise ValueError(
                f"label map ids {outside} have no score column (ids 1..num_classes={num_classes})"
            )
        self.num_classes = num_classes
        self.max_detections_per_keyframe = max_detections_per_keyframe
        self.per_class = per_class
        self._columns = np.array(sorted(c - 1 for c in self.labelmap), dtype=np.int64)

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
        classes = list(self.labelmap)
        ap = frame_average_precision(detections, truth, classes, IOU_THRESHOLDS)
        out = summarize_frame_map(ap, IOU_THRESHOLDS)
        if self.per_class:
            out.update({f"AP@0.5/{self.labelmap[c]}": float(v) for c, v in zip(classes, ap[0])})
        return {k: torch.tensor(v, dtype=torch.float32, device=self.device) for k, v in out.items()}

    def detection_rows(self, video_names: Sequence[str] | None = None) -> list[DetectionRow]:
        """The de-duplicated detections of all ranks as official CSV rows, keyframes in key order.

        ``video_names[i]`` names video id ``i`` (default: the id as text). Under DDP every rank must call this,
        since it gathers the states.
        """
        with self.sync_context(dist_sync_fn=self.dist_sync_fn):
            keys, det, _ = self._gathered()
        if video_names is not None and len(keys) and keys[:, 0].max() >= len(video_names):
            raise ValueError(f"video id {keys[:, 0].max()} has no name: video_names has {len(video_names)}")
        names = [str(video_names[v]) if video_names is not None else str(v) for v in keys[:, 0]]
        return [
            (names[f], int(keys[f, 1]), *(float(v) for v in box), int(label) + 1, float(score))
            for f, box, label, score in zip(
                det["frame"], det["det_boxes"], det["det_labels"], det["det_scores"]
            )
        ]

    def write_detections(self, path: str | Path, video_names: Sequence[str] | None = None) -> Path:
        """Write the de-duplicated detections as the official AVA CSV (see ``detection_rows``).

        Under DDP every rank must call this; global rank 0 writes the file.
        """
        rows = self.detection_rows(video_names)
        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            write_ava_detections(path, rows)
        return Path(path)
