"""Frame-mAP and video-mAP of spatio-temporal action detection on UCF101-24 and JHMDB, and their Metric.

These datasets have no official evaluator; the conventions are those of the ACT-detector tools (reused by MOC
and others), with the PASCAL VOC parts shared with the AVA protocol (``frame_ap``):

- Frame-mAP@0.5: every (box, class) score of a frame is a detection of that class; per class, VOC matching at
  IoU 0.5 against the ground-truth boxes of that frame and class, VOC all-point AP, mean over the classes that
  have ground truth.
- Video-mAP: per video and class, the frame detections are linked into tubes (``TubeLinking``); tubes are
  matched to the ground-truth tubes of their video and class by the spatio-temporal tube IoU (``tube_iou``),
  with the same VOC rule and AP, at IoU 0.2, 0.5 and 0.75, and averaged over 0.5:0.05:0.95.

Where this differs from the ACT tools, on purpose: AP is VOC all-point interpolated (ACT integrates the raw
precision/recall curve by trapezoids); a detection is compared with the ground truth of highest IoU even when
that one is already matched (the VOC rule; ACT takes the best still unmatched); IoU has no +1 pixel term; the
per-frame NMS before linking is the usual hard NMS (ACT lowers the scores of overlapping boxes instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_modules.metrics.frame_ap import (
    IOU_THRESHOLDS,
    FrameBoxes,
    FrameDetectionRows,
    as_matrix,
    average_precision_from_matches,
    frame_average_precision,
    keep_top_detections,
    nan_mean,
    paired_iou,
)

VIDEO_IOU_THRESHOLDS = (0.2, 0.5, 0.75)


@dataclass(frozen=True)
class Tube:
    """A box per frame over ascending frame numbers, with one score (the mean of its linked boxes' scores)."""

    frames: np.ndarray  # (T,) int64, ascending
    boxes: np.ndarray  # (T, 4) float64 x1, y1, x2, y2
    score: float = 1.0


def tube_iou(a: Tube, b: Tube) -> float:
    """Spatio-temporal IoU: temporal IoU x the mean spatial IoU over the frames both tubes span.

    Temporal IoU counts frames, ends included: ``(min(ends) - max(starts) + 1) / (max(ends) - min(starts) + 1)``.
    A frame of the overlap on which either tube has no box adds spatial IoU 0. Disjoint tubes have IoU 0.
    """
    if len(a.frames) == 0 or len(b.frames) == 0:
        return 0.0
    start, end = max(a.frames[0], b.frames[0]), min(a.frames[-1], b.frames[-1])
    if end < start:
        return 0.0
    temporal = (end - start + 1) / (max(a.frames[-1], b.frames[-1]) - min(a.frames[0], b.frames[0]) + 1)
    span = np.arange(start, end + 1)
    ia = np.searchsorted(a.frames, span).clip(max=len(a.frames) - 1)
    ib = np.searchsorted(b.frames, span).clip(max=len(b.frames) - 1)
    present = (a.frames[ia] == span) & (b.frames[ib] == span)
    spatial = np.zeros(len(span))
    spatial[present] = paired_iou(a.boxes[ia[present]], b.boxes[ib[present]])
    return float(temporal * spatial.mean())


def tube_nms(tubes: Sequence[Tube], iou_threshold: float) -> list[int]:
    """Indices of the tubes kept by greedy NMS in score order (ties in input order): a tube is dropped when its
    ``tube_iou`` with a kept one exceeds ``iou_threshold``."""
    order = sorted(range(len(tubes)), key=lambda i: -tubes[i].score)
    kept: list[int] = []
    for i in order:
        if all(tube_iou(tubes[i], tubes[k]) <= iou_threshold for k in kept):
            kept.append(i)
    return kept


@dataclass(frozen=True)
class TubeLinking:
    """Greedy online linking of one class's frame detections in one video into tubes (ACT-detector style).

    1. Per frame: hard NMS at ``nms_iou`` in score order (None: none), then the ``top_k`` best scores are the
       frame's candidates.
    2. Frames are visited in ascending order. A tube whose last box is more than ``max_gap + 1`` frames back
       is finished. The other tubes, by decreasing mean score (older first among equal), each take the
       highest-scoring remaining candidate whose IoU with the tube's last box is >= ``link_iou``; a tube left
       without one after missing more than ``max_gap`` frames is finished. Candidates no tube took start new
       tubes. (``max_gap=0``: a tube must extend on every consecutive frame, as ACT with single frames.)
    3. A tube spans its first to its last linked frame; boxes on skipped frames are interpolated linearly.
       Its score is the mean of its linked boxes' scores. Tubes shorter than ``min_length`` frames or scoring
       below ``min_score`` are dropped; then tube NMS at ``tube_nms_iou`` (``tube_iou``; None: none).

    Ties in score keep input order, at every step.
    """

    link_iou: float = 0.5
    max_gap: int = 0
    top_k: int = 10
    nms_iou: float | None = 0.6
    min_length: int = 15
    min_score: float = 0.005
    tube_nms_iou: float | None = 0.3

    def __post_init__(self):
        if self.max_gap < 0 or self.top_k < 1 or self.min_length < 1:
            raise ValueError(f"need max_gap >= 0, top_k >= 1 and min_length >= 1, got {self}")

    def candidates(
        self, frames: np.ndarray, boxes: np.ndarray, scores: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Step 1 for all frames at once: the distinct frames (F,), candidate boxes (F, K, 4) and scores
        (F, K) in decreasing score order, and each frame's number of candidates (F,)."""
        order = np.lexsort((-scores, frames))  # by frame, then score (stable)
        distinct, starts, counts = np.unique(frames[order], return_index=True, return_counts=True)
        width = int(counts.max())
        grid = np.full((len(distinct), width), -1, dtype=np.int64)  # (F, W) rows, best score first
        grid[
            np.repeat(np.arange(len(distinct)), counts), np.arange(len(order)) - np.repeat(starts, counts)
        ] = order
        alive = grid >= 0
        if self.nms_iou is not None:
            chunk = max(1, 4_000_000 // (width * width))  # bound the (frames, W, W) IoU block
            for lo in range(0, len(distinct), chunk):
                block = boxes[grid[lo : lo + chunk].clip(min=0)]  # (f, W, 4)
                ious = paired_iou(block[:, :, None], block[:, None, :])  # (f, W, W)
                kept = alive[lo : lo + chunk]
                for r in range(width - 1):  # greedy: a kept box suppresses the lower-scored overlapping ones
                    kept[:, r + 1 :] &= ~(kept[:, r, None] & (ious[:, r, r + 1 :] > self.nms_iou))
        alive &= np.cumsum(alive, axis=1) <= self.top_k
        number = alive.sum(1)
        k = int(number.max())
        slots = np.full((len(distinct), k), -1, dtype=np.int64)
        slots[np.repeat(np.arange(len(distinct)), number), np.cumsum(alive, 1)[alive] - 1] = grid[alive]
        return (
            distinct,
            boxes[slots.clip(min=0)],
            np.where(slots >= 0, scores[slots.clip(min=0)], -np.inf),
            number,
        )

    def link(self, frames: np.ndarray, boxes: np.ndarray, scores: np.ndarray) -> list[Tube]:
        """Tubes from one class's detections of one video: ``frames`` (N,) frame numbers, ``boxes`` (N, 4),
        ``scores`` (N,) of that class. Tubes come in order of their first frame (then creation)."""
        frames = np.asarray(frames, dtype=np.int64).reshape(-1)
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(scores) == 0 or scores.max() < self.min_score:
            return []  # a tube's mean score cannot exceed its best box score
        distinct, cand_boxes, cand_scores, number = self.candidates(frames, boxes, scores)
        # IoU of every candidate with the candidates up to max_gap + 1 frames (of those listed) later.
        lagged = {
            d: paired_iou(cand_boxes[:-d, :, None], cand_boxes[d:, None, :]).tolist()  # [i][j_then][j_now]
            for d in range(1, min(self.max_gap + 1, len(distinct) - 1) + 1)
        }
        score_list, frame_list = cand_scores.tolist(), distinct.tolist()
        active: list[_Track] = []  # tracks store (frame position, candidate slot) pairs
        finished: list[_Track] = []
        created = 0
        for i, frame in enumerate(frame_list):
            reachable = [t for t in active if frame - frame_list[t.last[0]] - 1 <= self.max_gap]
            finished += [t for t in active if frame - frame_list[t.last[0]] - 1 > self.max_gap]
            reachable.sort(key=lambda t: (-t.total / len(t.links), t.serial))
            taken = [False] * int(number[i])
            active = []
            for t in reachable:
                then, slot = t.last
                row = lagged[i - then][then][slot]
                best = next((j for j in range(len(taken)) if not taken[j] and row[j] >= self.link_iou), None)
                if best is not None:  # candidates are in score order: the first valid one scores highest
                    taken[best] = True
                    t.add((i, best), score_list[i][best])
                if best is not None or frame - frame_list[t.last[0]] <= self.max_gap:
                    active.append(t)
                else:
                    finished.append(t)
            for j in (j for j in range(len(taken)) if not taken[j]):
                created += 1
                active.append(_Track(created, (i, j), score_list[i][j]))
        tubes = []
        for t in sorted(finished + active, key=lambda t: (t.links[0][0], t.serial)):
            first, last = frame_list[t.links[0][0]], frame_list[t.last[0]]
            if last - first + 1 >= self.min_length and t.total / len(t.links) >= self.min_score:
                positions, slots = np.array(t.links).T
                tubes.append(
                    _interpolated(distinct[positions], cand_boxes[positions, slots], t.total / len(t.links))
                )
        if self.tube_nms_iou is not None:
            tubes = [tubes[i] for i in sorted(tube_nms(tubes, self.tube_nms_iou))]
        return tubes


class _Track:
    """A tube being built: a creation number, its (frame position, candidate slot) links and score sum."""

    def __init__(self, serial: int, link: tuple[int, int], score: float):
        self.serial, self.links, self.total = serial, [link], score

    @property
    def last(self) -> tuple[int, int]:
        return self.links[-1]

    def add(self, link: tuple[int, int], score: float) -> None:
        self.links.append(link)
        self.total += score


def _interpolated(frames: np.ndarray, boxes: np.ndarray, score: float) -> Tube:
    """A tube over every frame from the first to the last linked one, boxes interpolated linearly between."""
    span = np.arange(frames[0], frames[-1] + 1)
    return Tube(span, np.stack([np.interp(span, frames, boxes[:, k]) for k in range(4)], axis=1), score)


def link_detections(
    video: np.ndarray,
    frame: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    linking: TubeLinking,
) -> list[tuple[int, int, Tube]]:
    """``(video, label, tube)`` of every video and class, linked from flat detection rows; ordered by video,
    then label, then tube."""
    out: list[tuple[int, int, Tube]] = []
    order = np.lexsort((labels, video))
    pairs = np.stack([video[order], labels[order]], 1)
    starts = np.flatnonzero(np.r_[True, np.any(np.diff(pairs, axis=0) != 0, axis=1)]) if len(order) else []
    for rows in np.split(order, starts[1:]) if len(order) else []:
        v, c = int(video[rows[0]]), int(labels[rows[0]])
        out += [(v, c, tube) for tube in linking.link(frame[rows], boxes[rows], scores[rows])]
    return out


def ground_truth_tubes(
    video: np.ndarray, frame: np.ndarray, boxes: np.ndarray, labels: np.ndarray, tube_ids: np.ndarray
) -> list[tuple[int, int, Tube]]:
    """``(video, label, tube)`` of every ground-truth tube, assembled from per-frame rows sharing a tube id."""
    out: list[tuple[int, int, Tube]] = []
    if len(video) == 0:
        return out
    order = np.lexsort((frame, tube_ids, video))
    keys = np.stack([video[order], tube_ids[order]], 1)
    starts = np.flatnonzero(np.r_[True, np.any(np.diff(keys, axis=0) != 0, axis=1)])
    for rows in np.split(order, starts[1:]):
        v, tube = int(video[rows[0]]), int(tube_ids[rows[0]])
        if len(np.unique(labels[rows])) != 1:
            raise ValueError(
                f"video {v}: ground-truth tube {tube} has several labels {np.unique(labels[rows])}"
            )
        if np.any(np.diff(frame[rows]) == 0):
            raise ValueError(f"video {v}: ground-truth tube {tube} has two boxes on one frame")
        out.append(
            (v, int(labels[rows[0]]), Tube(frame[rows].astype(np.int64), boxes[rows].astype(np.float64)))
        )
    return out


def video_average_precision(
    detections: Sequence[tuple[int, int, Tube]],
    ground_truth: Sequence[tuple[int, int, Tube]],
    classes: Sequence[int],
    thresholds: Sequence[float],
) -> np.ndarray:
    """VOC AP (T, C) of detected tubes against ground-truth tubes, both ``(video, label, tube)``.

    Tubes are ranked by score (ties in input order); each is compared with the ground-truth tube of its video
    and label of highest ``tube_iou`` (first listed among equal) and is a true positive if that IoU reaches
    the threshold and no better-ranked tube claimed it.
    """
    by_group: dict[tuple[int, int], list[int]] = {}
    for g, (v, c, _) in enumerate(ground_truth):
        by_group.setdefault((v, c), []).append(g)
    best_gt, best_iou = np.full(len(detections), -1, dtype=np.int64), np.full(len(detections), -np.inf)
    for d, (v, c, tube) in enumerate(detections):
        candidates = by_group.get((v, c), [])
        if candidates:
            ious = [tube_iou(tube, ground_truth[g][2]) for g in candidates]
            best = int(np.argmax(ious))
            best_gt[d], best_iou[d] = candidates[best], ious[best]
    return average_precision_from_matches(
        np.array([t.score for _, _, t in detections], dtype=np.float64),
        np.array([c for _, c, _ in detections], dtype=np.int64),
        best_gt, best_iou, np.array([c for _, c, _ in ground_truth], dtype=np.int64), classes, thresholds,
    )  # fmt: skip


def video_map(
    detections: Sequence[tuple[int, int, Tube]],
    ground_truth: Sequence[tuple[int, int, Tube]],
    classes: Sequence[int],
) -> dict[str, float]:
    """``video_mAP@0.2``, ``@0.5``, ``@0.75`` and ``@0.5:0.95`` (means over the classes with ground truth)."""
    thresholds = sorted(set(VIDEO_IOU_THRESHOLDS) | set(IOU_THRESHOLDS))
    per_threshold = nan_mean(video_average_precision(detections, ground_truth, classes, thresholds), axis=1)
    at = dict(zip(thresholds, per_threshold))
    out = {f"video_mAP@{t:g}": float(at[t]) for t in VIDEO_IOU_THRESHOLDS}
    out["video_mAP@0.5:0.95"] = float(np.mean([at[t] for t in IOU_THRESHOLDS]))
    return out


class FrameVideoMAP(FrameDetectionRows):
    """Frame-mAP@0.5 and video-mAP of UCF101-24 / JHMDB detections, exact under DDP padding.

    ``update(preds, target, video_ids, frame_indices)`` takes one entry per frame: ``preds[i]`` a dict with
    ``boxes`` (N, 4) x1, y1, x2, y2 and ``scores`` (N, num_classes), the final score of every box for every
    class; ``target[i]`` a dict with ``boxes`` (M, 4) in the same coordinates, ``labels`` (M,) class indices
    and, for video-mAP, ``tube_ids`` (M,) the integer identity of each box's ground-truth tube within the video;
    ``video_ids`` (B,) and ``frame_indices`` (B,) integers naming the frame. A repeated (video, frame) is counted
    once. ``max_detections_per_frame`` keeps only the best (box, class) pairs of a frame (None: all), which
    bounds memory when a model emits many boxes.

    Video-mAP links the gathered detections of each video and class at ``compute`` (``linking``, default
    ``TubeLinking()``); a video's frames should therefore all be evaluated, and its ground-truth tubes are
    assembled from the frames seen. Linking is pure Python per video and class (about 0.1 s per UCF101-24 video
    of 24 classes); ``video_map=False`` skips it, e.g. during validation.
    """

    gt_columns = ("gt_boxes", "gt_labels", "gt_tubes")

    def __init__(
        self,
        num_classes: int,
        video_map: bool = True,
        linking: TubeLinking | None = None,
        max_detections_per_frame: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.video_map = video_map
        self.linking = linking if linking is not None else TubeLinking()
        self.max_detections_per_frame = max_detections_per_frame

    def update(
        self,
        preds: Sequence[dict[str, Tensor]],
        target: Sequence[dict[str, Tensor]],
        video_ids: Tensor | Sequence[int],
        frame_indices: Tensor | Sequence[int],
    ) -> None:
        if len(preds) != len(target):
            raise ValueError(f"one preds and target per frame: {len(preds)} != {len(target)}")
        columns = np.arange(self.num_classes)
        entries = []
        for p, t in zip(preds, target):
            boxes = as_matrix(p["boxes"], 4, "boxes")
            scores = as_matrix(p["scores"], self.num_classes, "scores")
            if len(scores) != len(boxes):
                raise ValueError(f"one row of scores per box: {len(scores)} != {len(boxes)} boxes")
            picked = scores.reshape(-1)  # box-major, then class
            row_boxes, row_labels = np.repeat(boxes, self.num_classes, axis=0), np.tile(columns, len(boxes))
            keep = keep_top_detections(picked, row_labels, row_boxes, self.max_detections_per_frame)
            gt_boxes = as_matrix(t["boxes"], 4, "boxes")
            labels = torch.as_tensor(t["labels"]).detach().long().cpu().numpy().reshape(-1)
            if "tube_ids" in t:
                tubes = torch.as_tensor(t["tube_ids"]).detach().long().cpu().numpy().reshape(-1)
            elif self.video_map:
                raise ValueError("video-mAP needs target['tube_ids'] (M,), the ground-truth tube of each box")
            else:
                tubes = np.full(len(labels), -1)
            if not len(labels) == len(gt_boxes) == len(tubes):
                raise ValueError(
                    f"target boxes, labels, tube_ids differ in length: {len(gt_boxes)}, {len(labels)}"
                )
            entries.append({
                "det_boxes": row_boxes[keep], "det_scores": picked[keep], "det_labels": row_labels[keep],
                "gt_boxes": gt_boxes, "gt_labels": labels, "gt_tubes": tubes,
            })  # fmt: skip
        self._append(video_ids, frame_indices, entries)

    def compute(self) -> dict[str, Tensor]:
        keys, det, gt = self._gathered()
        classes = list(range(self.num_classes))
        detections = FrameBoxes(det["frame"], det["det_boxes"], det["det_labels"], det["det_scores"])
        truth = FrameBoxes(gt["frame"], gt["gt_boxes"], gt["gt_labels"])
        ap = frame_average_precision(detections, truth, classes, (0.5,))
        out = {"frame_mAP@0.5": float(nan_mean(ap[0]))}
        if self.video_map:
            video, frame = keys[:, 0], keys[:, 1]
            tubes = link_detections(
                video[det["frame"]], frame[det["frame"]], det["det_boxes"], det["det_labels"], det["det_scores"],
                self.linking,
            )  # fmt: skip
            truth_tubes = ground_truth_tubes(
                video[gt["frame"]], frame[gt["frame"]], gt["gt_boxes"], gt["gt_labels"], gt["gt_tubes"]
            )
            out.update(video_map(tubes, truth_tubes, classes))
        return {k: torch.tensor(v, dtype=torch.float32, device=self.device) for k, v in out.items()}
