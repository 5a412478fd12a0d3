"""Frame-level detection AP: box IoU, PASCAL VOC matching and AP, and a DDP-exact Metric base for per-frame rows.

Shared by the AVA protocol (``metrics.ava``) and the UCF101-24 / JHMDB frame- and video-mAP (``video_map``):

- A table of boxes on frames (``FrameBoxes``): ground truth, or detections with a score each.
- IoU of continuous coordinates, without the +1 of pixel-index conventions (areas ``(x2 - x1) * (y2 - y1)``).
- Per class, detections are ranked by score; each one, in rank order, is compared with the ground-truth boxes
  of its frame and class and takes the one of highest IoU (the PASCAL VOC rule): a true positive if that IoU
  >= the threshold and that box is still unmatched, else a false positive (also when a second box would have
  matched). Detections on frames without ground truth are false positives.
- AP is the VOC all-point interpolated area under the precision/recall curve (VOC2010+, not 11-point). A class
  with ground truth and no detection has AP 0; a class without ground truth has AP NaN and is left out of the
  mean (``nan_mean``). ``frame_mAP@0.5:0.95`` averages the mAP over IoU 0.5, 0.55, ..., 0.95.
- Ties in score keep their input order (a stable sort); among equal IoUs the first listed ground-truth box is
  the one compared.
- ``keep_top_detections`` caps one frame's detections by score with the official AVA reader's tie rule.
- ``FrameDetectionRows`` gathers the rows of every rank as flat tensors and counts a frame the distributed
  sampler repeats only once, so the metric is exact under DDP padding.
"""

from __future__ import annotations

import csv
import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric

from lightning_modules.metrics.classification import first_occurrences
from lightning_modules.metrics.tad import interpolated_average_precision

IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.5:0.05:0.95


@dataclass(frozen=True)
class FrameBoxes:
    """A flat table of boxes on frames, one row each: ground truth, or detections when ``scores`` is set."""

    frame: np.ndarray  # (N,) int64 index into frames
    boxes: np.ndarray  # (N, 4) float64 x1, y1, x2, y2
    labels: np.ndarray  # (N,) int64 class label (for AVA, the action id)
    scores: np.ndarray | None = None  # (N,) float64
    frames: tuple[tuple[str, int], ...] = ()  # (video, timestamp) of each frame index


# IoU, matching, AP ------------------------------------------------------------------------------------------


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
    """Row indices (ascending) of one frame's detections that the official AVA reader's cap keeps.

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


DetectionRow = tuple[str, int, float, float, float, float, int, float]  # video, time, box, action id, score


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

    def detection_rows(self, video_names: Sequence[str] | None = None) -> list[DetectionRow]:
        """The de-duplicated detections of all ranks as AVA CSV rows (action id = label column + 1), frames in
        key order.

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
        """Write the de-duplicated detections in the official AVA CSV format (see ``detection_rows``).

        Under DDP every rank must call this; global rank 0 writes the file.
        """
        rows = self.detection_rows(video_names)
        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            write_ava_detections(path, rows)
        return Path(path)


def as_matrix(x: Tensor | np.ndarray | Sequence, width: int, name: str) -> np.ndarray:
    """``x`` as a float64 numpy array (rows, width); an empty input is (0, width)."""
    array = torch.as_tensor(x).detach().cpu().double().numpy()
    if array.size == 0:
        return array.reshape(0, width)
    if array.ndim != 2 or array.shape[1] != width:
        raise ValueError(f"{name} must have shape (rows, {width}), got {tuple(array.shape)}")
    return array


__all__ = [
    "IOU_THRESHOLDS",
    "DetectionRow",
    "FrameBoxes",
    "FrameDetectionRows",
    "as_matrix",
    "average_precision_from_matches",
    "best_overlaps",
    "box_iou",
    "frame_average_precision",
    "keep_top_detections",
    "nan_mean",
    "paired_iou",
    "summarize_frame_map",
    "write_ava_detections",
]
