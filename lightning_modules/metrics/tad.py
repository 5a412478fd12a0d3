"""Temporal action detection mAP by the ActivityNet detection protocol, its file readers, a DDP-exact Metric.

The protocol, per class: detections are sorted by score, highest first; each one is matched to the ground
truth segment of the same video with the highest tIoU among those not yet matched at that threshold; a match
with tIoU >= threshold is a true positive, anything else a false positive. AP is the all-point interpolated
area under the precision/recall curve (precision made non-increasing, summed over the recall steps). mAP at a
threshold is the mean over the classes that have ground truth (such a class without any detection has AP 0;
detections of a class the ground truth lacks are ignored); ``average_mAP`` is the mean over the thresholds.

Ties are broken by input order, in both places where they can occur: detections of equal score keep their
input order (a stable sort), and among unmatched ground truth of equal tIoU the first listed is taken.
Segments are used as given, not clipped to the video's duration.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric

from datamodules.activitynet import load_database
from datamodules.base import AnnotationError
from lightning_modules.metrics.classification import first_occurrences

THUMOS_TIOUS = (0.3, 0.4, 0.5, 0.6, 0.7)
ACTIVITYNET_TIOUS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
THUMOS_CSV_HEADER = "video,type,type_idx,start,end,startFrame,endFrame"
THUMOS_IGNORED_LABEL = "Ambiguous"


def map_key(tiou: float) -> str:
    """``mAP@0.5``, ``mAP@0.55``: the threshold with at most 4 significant digits and no trailing zeros."""
    return f"mAP@{float(tiou):.4g}"


@dataclass(frozen=True)
class TemporalSegments:
    """A flat table of temporal segments, one row each: ground truth, or detections when ``scores`` is set."""

    video: np.ndarray  # (N,) int64 index into video_names
    segments: np.ndarray  # (N, 2) float64 start, end in seconds
    labels: np.ndarray  # (N,) int64 index into class_names
    scores: np.ndarray | None = None  # (N,) float64
    video_names: tuple[str, ...] = ()
    class_names: tuple[str, ...] = ()


def segment_iou(segment: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """tIoU of a ``(start, end)`` segment against ``candidates`` (M, 2) -> (M,); 0 where the union is empty.

    Several segments (D, 2) give the pairwise tIoU (D, M).
    """
    segment = np.asarray(segment, dtype=np.float64)
    candidates = np.asarray(candidates, dtype=np.float64).reshape(-1, 2)
    start, end = segment[..., 0, None], segment[..., 1, None]  # (D, 1) or (1,)
    inter = (np.minimum(end, candidates[:, 1]) - np.maximum(start, candidates[:, 0])).clip(min=0)
    union = (candidates[:, 1] - candidates[:, 0]) + (end - start) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def interpolated_average_precision(precision: np.ndarray, recall: np.ndarray) -> float:
    """All-point interpolated AP: precision made non-increasing from the right, summed over recall steps."""
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * envelope[steps]))


def class_average_precision(
    det_video: np.ndarray,
    det_segments: np.ndarray,
    det_scores: np.ndarray,
    gt_video: np.ndarray,
    gt_segments: np.ndarray,
    tious: Sequence[float],
) -> np.ndarray:
    """AP (T,) of one class's detections against that class's ground truth, at each tIoU threshold."""
    thresholds = np.asarray(tious, dtype=np.float64)
    order = np.argsort(-det_scores, kind="stable")
    sorted_video = det_video[order]
    true_positive = np.zeros((len(thresholds), len(order)), dtype=bool)
    # Matching only ever competes within a video: walk each video's detections in the global score order.
    by_video = np.argsort(sorted_video, kind="stable")
    bounds = np.flatnonzero(np.diff(sorted_video[by_video])) + 1
    gt_rows = {int(v): np.flatnonzero(gt_video == v) for v in np.unique(gt_video)}
    for positions in np.split(by_video, bounds) if len(order) else []:
        rows = gt_rows.get(int(sorted_video[positions[0]]))
        if rows is None:
            continue
        ious = segment_iou(det_segments[order[positions]], gt_segments[rows])  # (D, G)
        matched = np.zeros((len(thresholds), len(rows)), dtype=bool)  # (T, G)
        # A detection under the lowest threshold with every ground truth is a false positive at all of them.
        for k in np.flatnonzero(ious.max(1) >= thresholds.min()):
            allowed = (ious[k][None, :] >= thresholds[:, None]) & ~matched
            best = np.where(allowed, ious[k][None, :], -1.0).argmax(1)  # first of equal tIoU
            hit = allowed[np.arange(len(thresholds)), best]
            matched[np.flatnonzero(hit), best[hit]] = True
            true_positive[hit, positions[k]] = True
    tp = np.cumsum(true_positive, axis=1)
    precision = tp / np.arange(1, len(order) + 1)
    recall = tp / len(gt_video)
    return np.array([interpolated_average_precision(p, r) for p, r in zip(precision, recall)])


def average_precision_per_class(
    detections: TemporalSegments, ground_truth: TemporalSegments, tious: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """The classes present in the ground truth (C,) and their AP (T, C)."""
    classes = np.unique(ground_truth.labels)
    ap = np.zeros((len(tious), len(classes)))
    for c, label in enumerate(classes):
        det, gt = detections.labels == label, ground_truth.labels == label
        ap[:, c] = class_average_precision(
            detections.video[det], detections.segments[det], detections.scores[det],
            ground_truth.video[gt], ground_truth.segments[gt], tious,
        )  # fmt: skip
    return classes, ap


def mean_average_precision(
    detections: TemporalSegments, ground_truth: TemporalSegments, tious: Sequence[float] = THUMOS_TIOUS
) -> dict[str, float]:
    """``{"mAP@<t>": ..., "average_mAP": ...}`` as fractions; NaN when the ground truth is empty."""
    classes, ap = average_precision_per_class(detections, ground_truth, tious)
    per_tiou = ap.mean(1) if len(classes) else np.full(len(tious), np.nan)
    out = {map_key(t): float(m) for t, m in zip(tious, per_tiou)}
    out["average_mAP"] = float(per_tiou.mean())
    return out


# Files ------------------------------------------------------------------------------------------------------


def json_number(value: Any, where: str, field: str) -> float:
    """``value`` as a finite float, or an ``AnnotationError`` naming ``where`` and ``field``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):
        raise AnnotationError(f"{where}: {field} must be a finite number, got {value!r}")
    return number


def _segment(value: Any, where: str, allow_empty: bool) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise AnnotationError(f"{where}: 'segment' must be [start, end] in seconds, got {value!r}")
    start, end = (
        json_number(value[0], where, "segment start (s)"),
        json_number(value[1], where, "segment end (s)"),
    )
    if end < start or (end == start and not allow_empty):
        raise AnnotationError(
            f"{where}: segment [{start}, {end}] is empty or reversed; the end must come after the start"
        )
    return start, end


def load_json(path: Path, key: str, layout: str) -> dict[str, Any]:
    """The object under ``key`` of the JSON file ``path``; an ``AnnotationError`` naming the file and the
    expected ``layout`` if it is not valid JSON or lacks that object."""
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AnnotationError(f"{path}: not valid JSON ({err}); expected {layout}") from None
    mapping = content.get(key) if isinstance(content, dict) else None
    if not isinstance(mapping, dict):
        raise AnnotationError(f"{path}: no {key!r} mapping of video id -> entries; expected {layout}")
    return mapping


_Row = tuple[str, float, float, str, float]  # video, start, end, label, score


def _table(rows: list[_Row], videos: list[str], classes: list[str], scored: bool) -> TemporalSegments:
    video_index = {name: i for i, name in enumerate(videos)}
    class_index = {name: i for i, name in enumerate(classes)}
    return TemporalSegments(
        video=np.array([video_index[r[0]] for r in rows], dtype=np.int64),
        segments=np.array([(r[1], r[2]) for r in rows], dtype=np.float64).reshape(-1, 2),
        labels=np.array([class_index[r[3]] for r in rows], dtype=np.int64),
        scores=np.array([r[4] for r in rows], dtype=np.float64) if scored else None,
        video_names=tuple(videos),
        class_names=tuple(classes),
    )


def _ground_truth_json(path: Path, subset: str) -> tuple[list[_Row], list[str]]:
    database = load_database(path)
    rows, videos = [], []
    for video, entry in database.items():
        if entry["subset"] != subset:
            continue
        videos.append(video)
        where = f"{path}: video {video!r}"
        for ann in entry.get("annotations", []):
            rows.append((video, *_segment(ann.get("segment"), where, allow_empty=False), ann["label"], 1.0))
    if not videos:
        subsets = sorted({entry["subset"] for entry in database.values()})
        raise AnnotationError(
            f"{path}: no video of subset {subset!r}; the file has subsets {subsets}, pick one with --subset"
        )
    return rows, videos


def _ground_truth_csv(path: Path) -> tuple[list[_Row], list[str]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"video", "type", "start", "end"} - set(reader.fieldnames or [])
        if missing:
            raise AnnotationError(
                f"{path}: not a THUMOS14 ground-truth CSV, columns {sorted(missing)} are missing; expected "
                f"the header {THUMOS_CSV_HEADER} (start/end in seconds)"
            )
        rows, videos, ignored = [], {}, 0
        for line, row in enumerate(reader, start=2):
            video, label = (row["video"] or "").strip(), (row["type"] or "").strip()
            where = f"{path}: line {line}, video {video!r}"
            if not video or not label:
                raise AnnotationError(f"{where}: 'video' and 'type' must not be empty")
            videos.setdefault(video, None)
            if label == THUMOS_IGNORED_LABEL:
                ignored += 1
                continue
            rows.append((video, *_segment((row["start"], row["end"]), where, False), label, 1.0))
    if ignored:
        warnings.warn(f"{path}: {ignored} '{THUMOS_IGNORED_LABEL}' segments are not an action class; ignored")
    if not rows:
        raise AnnotationError(f"{path}: no ground-truth segment; expected rows under {THUMOS_CSV_HEADER}")
    return rows, list(videos)


def read_ground_truth(path: str | Path, subset: str = "validation") -> TemporalSegments:
    """Ground truth from an ActivityNet / OpenTAD JSON (``subset`` only) or a THUMOS14 CSV (the whole file).

    Classes are the labels present, sorted by name. Errors name the file, the video and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"ground-truth file {path} not found; pass the annotation JSON or CSV")
    if path.suffix.lower() == ".json":
        rows, videos = _ground_truth_json(path, subset)
    elif path.suffix.lower() == ".csv":
        rows, videos = _ground_truth_csv(path)
    else:
        raise AnnotationError(
            f"{path}: unknown ground-truth layout; give an ActivityNet/OpenTAD '.json' with a 'database' "
            f"mapping, or a THUMOS14 '.csv' with the header {THUMOS_CSV_HEADER}"
        )
    return _table(rows, videos, sorted({r[3] for r in rows}), scored=False)


def read_predictions(path: str | Path, ground_truth: TemporalSegments) -> TemporalSegments:
    """Detections from an ActivityNet results JSON, indexed like ``ground_truth``.

    A detection whose label is not a ground-truth class is dropped (it cannot change the mAP); one in a video
    the ground truth does not list is kept, and counts as a false positive. Both are reported as a warning.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"predictions file {path} not found; pass the results JSON of the test run")
    layout = '{"results": {video_id: [{"segment": [start, end], "label": class name, "score": number}]}}'
    results = load_json(path, "results", layout)
    classes, truth_videos = set(ground_truth.class_names), set(ground_truth.video_names)
    videos = dict.fromkeys(ground_truth.video_names)  # then the videos only the predictions list
    rows, unknown_labels, dropped, outside = [], set(), 0, 0
    for video, detections in results.items():
        where = f"{path}: video {video!r}"
        if not isinstance(detections, list):
            raise AnnotationError(f"{where}: expected a list of detections, got {type(detections).__name__}")
        videos.setdefault(video)
        for det in detections:
            if not isinstance(det, dict) or not isinstance(det.get("label"), str):
                raise AnnotationError(f"{where}: every detection needs a class name 'label', got {det!r}")
            segment = _segment(det.get("segment"), where, allow_empty=True)
            score = json_number(det.get("score"), where, "'score'")
            if det["label"] not in classes:
                unknown_labels.add(det["label"])
                dropped += 1
                continue
            outside += video not in truth_videos
            rows.append((video, *segment, det["label"], score))
    if dropped:
        shown = sorted(unknown_labels)[:3]
        warnings.warn(
            f"{path}: {dropped} detections of {len(unknown_labels)} labels absent from the ground truth "
            f"(e.g. {shown}) are ignored"
        )
    if outside:
        warnings.warn(
            f"{path}: {outside} detections in videos the ground truth does not list count as false "
            "positives; check the subset"
        )
    return _table(rows, list(videos), list(ground_truth.class_names), scored=True)


def write_predictions(path: str | Path, detections: TemporalSegments) -> Path:
    """Write an ActivityNet results JSON: every video of ``video_names`` in order, even without detection."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in detections.video_names}
    for v, (start, end), label, score in zip(
        detections.video, detections.segments, detections.labels, detections.scores
    ):
        name, label = detections.video_names[v], detections.class_names[label]
        results[name].append({"segment": [float(start), float(end)], "label": label, "score": float(score)})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {"version": "VERSION 1.3", "results": results, "external_data": {"used": False, "details": ""}}
    path.write_text(json.dumps(content))
    return path


# Metric ----------------------------------------------------------------------------------------------------


_DETECTION_STATES = ("det_segments", "det_scores", "det_labels")
_TRUTH_STATES = ("gt_segments", "gt_labels")


def _rows(starts: Tensor, lengths: Tensor) -> Tensor:
    """The row indices ``starts[i] .. starts[i] + lengths[i] - 1`` of every entry, concatenated."""
    within = torch.arange(int(lengths.sum()), device=lengths.device)
    entry_start = torch.cumsum(lengths, 0) - lengths
    return (within - torch.repeat_interleave(entry_start, lengths)) + torch.repeat_interleave(starts, lengths)


class TemporalDetectionMAP(Metric):
    """mAP at each tIoU threshold and ``average_mAP`` by the ActivityNet protocol, exact under DDP padding.

    ``update(preds, target, video_ids)`` takes one entry per video: ``preds[i]`` a dict with ``segments``
    (N, 2) start/end in seconds, ``scores`` (N,) and ``labels`` (N,) class indices; ``target[i]`` a dict with
    ``segments`` (M, 2) and ``labels`` (M,); ``video_ids`` (B,) the videos' integer indices in the evaluation
    set. A video's detections come in once, already merged over its windows (e.g. the overlapping THUMOS
    windows, then NMS), in video seconds: the metric does not merge windows, so a video's windows must be
    evaluated on one rank. A video id seen again (Lightning's distributed sampler pads the evaluation set by
    repeating videos) is dropped after gathering, so each video counts exactly once. Detections of equal score
    are ranked by video id, then by their order within the video, so the result does not depend on the number
    of ranks.

    ``class_names`` only name the labels in the exported results JSON (``write_results``); labels are indices.
    Other keyword arguments go to torchmetrics' ``Metric`` (e.g. ``dist_sync_fn``).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(
        self, tious: Sequence[float] = THUMOS_TIOUS, class_names: Sequence[str] | None = None, **kwargs: Any
    ):
        super().__init__(**kwargs)
        if not tious or not all(0.0 < float(t) <= 1.0 for t in tious):
            raise ValueError(f"tious must be thresholds in (0, 1], got {tious!r}")
        self.tious = tuple(float(t) for t in tious)
        self.class_names = tuple(class_names) if class_names is not None else None
        # One row per update entry (video id, its number of detections and of ground-truth segments), and the
        # entries' detections and ground truth as flat rows in the same order: tensors only, so they gather.
        for name in ("entry_video", "entry_num_det", "entry_num_gt", *_DETECTION_STATES, *_TRUTH_STATES):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def _tensor(self, x: Tensor | Sequence, dtype: torch.dtype) -> Tensor:
        return torch.as_tensor(x).detach().to(self.device, dtype)

    def update(
        self,
        preds: Sequence[dict[str, Tensor]],
        target: Sequence[dict[str, Tensor]],
        video_ids: Tensor | Sequence[int],
    ) -> None:
        ids = self._tensor(video_ids, torch.long).flatten()
        if not len(preds) == len(target) == len(ids):
            raise ValueError(f"one preds and target per video id: {len(preds)}, {len(target)}, {len(ids)}")
        rows: dict[str, list[Tensor]] = {name: [] for name in (*_DETECTION_STATES, *_TRUTH_STATES)}
        for p, t, video in zip(preds, target, ids.tolist()):
            entry = {
                "det_segments": self._tensor(p["segments"], torch.float64).reshape(-1, 2),
                "det_scores": self._tensor(p["scores"], torch.float64).flatten(),
                "det_labels": self._tensor(p["labels"], torch.long).flatten(),
                "gt_segments": self._tensor(t["segments"], torch.float64).reshape(-1, 2),
                "gt_labels": self._tensor(t["labels"], torch.long).flatten(),
            }
            for group in (_DETECTION_STATES, _TRUTH_STATES):
                if len({len(entry[name]) for name in group}) > 1:
                    raise ValueError(f"video {video}: {', '.join(group)} must have one row per segment")
            for name, value in entry.items():
                rows[name].append(value)
        self.entry_video.append(ids)
        self.entry_num_det.append(self._tensor([len(s) for s in rows["det_scores"]], torch.long))
        self.entry_num_gt.append(self._tensor([len(s) for s in rows["gt_labels"]], torch.long))
        for name, values in rows.items():
            getattr(self, name).append(torch.cat(values))

    def _deduplicated(self) -> tuple[np.ndarray, TemporalSegments, TemporalSegments]:
        """The distinct video ids, ascending, and their detections and ground truth (first occurrence)."""
        empty = torch.zeros(0, device=self.device)  # a state no update has filled
        state = {
            name: (torch.cat(value) if value else empty) if isinstance(value, list) else value
            for name, value in self.metric_state.items()
        }
        ids = state["entry_video"].long()
        keep = first_occurrences(ids)
        keep = keep[torch.argsort(ids[keep], stable=True)]  # ascending id: an order no rank count changes

        def rows_of(counts: Tensor) -> tuple[Tensor, np.ndarray]:
            counts = counts.long()
            rows = _rows((torch.cumsum(counts, 0) - counts)[keep], counts[keep])
            return rows, torch.repeat_interleave(ids[keep], counts[keep]).cpu().numpy()

        def column(name: str, rows: Tensor, dtype: type) -> np.ndarray:
            return state[name][rows].cpu().numpy().astype(dtype)

        det_rows, det_video = rows_of(state["entry_num_det"])
        gt_rows, gt_video = rows_of(state["entry_num_gt"])
        detections = TemporalSegments(
            video=det_video,
            segments=column("det_segments", det_rows, np.float64).reshape(-1, 2),
            labels=column("det_labels", det_rows, np.int64),
            scores=column("det_scores", det_rows, np.float64),
        )
        truth = TemporalSegments(
            video=gt_video,
            segments=column("gt_segments", gt_rows, np.float64).reshape(-1, 2),
            labels=column("gt_labels", gt_rows, np.int64),
        )
        return ids[keep].cpu().numpy(), detections, truth

    def compute(self) -> dict[str, Tensor]:
        _, detections, truth = self._deduplicated()
        if len(truth.labels) == 0:
            warnings.warn("TemporalDetectionMAP: no ground-truth segment was given; every mAP is NaN")
        scores = mean_average_precision(detections, truth, self.tious)
        return {k: torch.tensor(v, dtype=torch.float32, device=self.device) for k, v in scores.items()}

    def predictions(self, video_names: Sequence[str] | None = None) -> TemporalSegments:
        """The de-duplicated detections of all ranks, named for ``write_predictions``.

        ``video_names[i]`` names video id ``i`` (default: the id as text). Under DDP every rank must call
        this, since it gathers the states.
        """
        with self.sync_context(dist_sync_fn=self.dist_sync_fn):
            videos, detections, _ = self._deduplicated()
        if video_names is not None and len(videos) and videos.max() >= len(video_names):
            raise ValueError(f"video id {videos.max()} has no name: video_names has {len(video_names)} names")
        names = [str(video_names[v]) if video_names is not None else str(v) for v in videos]
        labels = detections.labels
        if self.class_names is not None and len(labels) and labels.max() >= len(self.class_names):
            raise ValueError(f"label {labels.max()} has no name: {len(self.class_names)} class_names")
        classes = self.class_names or tuple(str(c) for c in range(int(labels.max(initial=-1)) + 1))
        return TemporalSegments(
            video=np.searchsorted(videos, detections.video), segments=detections.segments, labels=labels,
            scores=detections.scores, video_names=tuple(names), class_names=classes,
        )  # fmt: skip

    def write_results(self, path: str | Path, video_names: Sequence[str] | None = None) -> Path:
        """Write the de-duplicated detections as an ActivityNet results JSON (see ``predictions``).

        Under DDP every rank must call this; global rank 0 writes the file.
        """
        detections = self.predictions(video_names)
        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            write_predictions(path, detections)
        return Path(path)
