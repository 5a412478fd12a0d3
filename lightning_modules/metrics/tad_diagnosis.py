"""Error analysis of temporal action detectors by the DETAD protocol (Alwassel et al., ECCV 2018).

Two analyses of one model's detections against the ground truth, at one or more tIoU thresholds (the numbers
are averaged over the thresholds, as DETAD averages over 0.5:0.05:0.95 on ActivityNet and uses 0.5 on THUMOS14):

- False positives. Per class, the detections ranked by score are cut to the top ``limit_factor * G`` (G: the
  class's number of ground-truth instances; DETAD's limit is 10) and split into rank groups: group k holds the
  ranks ``(k - 1) * G + 1 .. k * G``. Matched by the ActivityNet protocol, each detection is a true positive or
  a false positive of one type, decided by the ground-truth instance of its video (any class) with the highest
  tIoU: at least the threshold and the same class, a double detection (that instance was already taken); at
  least the threshold and another class, a wrong label; from ``BACKGROUND_TIOU`` (0.1) up to the threshold,
  a localisation error (same class) or a confusion error (another class); below 0.1 (or a video without
  ground truth), a background error. The profile is the share of each type per rank group; the impact of a
  type is the gain in average mAP (``metrics.tad.mean_average_precision``, on the cut detections) when the
  detections of that type are removed.
- False negatives. A ground-truth instance is missed when no detection matches it, counting a match only
  where the class's normalised precision (recall * N / (recall * N + false positives), N the mean number of
  instances per class) is above ``FN_MIN_PRECISION`` (5%). Missed shares are reported per bin of coverage
  (instance length / video duration), length (seconds) and the number of instances of the class in the video,
  with DETAD's bins (``ACTIVITYNET_BINS``, ``THUMOS14_BINS``; right-closed, the lowest edge included).

Detections and ground truth are ``TemporalSegments`` sharing video and class indices, as
``metrics.tad.read_predictions`` gives them. Matching follows ``metrics.tad`` exactly, ties included.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from datamodules.base import AnnotationError
from lightning_modules.metrics.tad import (
    TemporalSegments,
    json_number,
    load_json,
    map_key,
    mean_average_precision,
    segment_iou,
)

ERROR_TYPES = ("true_positive", "double_detection", "wrong_label", "localisation", "confusion", "background")
TRUE_POSITIVE, DOUBLE_DETECTION, WRONG_LABEL, LOCALISATION, CONFUSION, BACKGROUND = range(len(ERROR_TYPES))
ERROR_COLOURS = ("#33a02c", "#b2df8a", "#1f78b4", "#fb9a99", "#e31a1c", "#a6cee3")
BACKGROUND_TIOU = 0.1
LIMIT_FACTOR = 10
FN_MIN_PRECISION = 0.05

Bins = Mapping[str, tuple[tuple[float, ...], tuple[str, ...]]]  # characteristic -> (edges, bin labels)
SIZES = ("XS", "S", "M", "L", "XL")
ACTIVITYNET_BINS: Bins = {
    "coverage": ((0.0, 0.2, 0.4, 0.6, 0.8, 1.0), SIZES),
    "length": ((0.0, 30.0, 60.0, 120.0, 180.0, math.inf), SIZES),
    "num_instances": ((-1.0, 1.0, 4.0, 8.0, math.inf), SIZES[:4]),
}
THUMOS14_BINS: Bins = {
    "coverage": ((0.0, 0.02, 0.04, 0.06, 0.08, 1.0), SIZES),
    "length": ((0.0, 3.0, 6.0, 12.0, 18.0, math.inf), SIZES),
    "num_instances": ((-1.0, 1.0, 40.0, 80.0, math.inf), SIZES[:4]),
}


def _split(keys: np.ndarray) -> list[np.ndarray]:
    """Positions of ``keys`` grouped by value, each group in its original order."""
    by_key = np.argsort(keys, kind="stable")
    return np.split(by_key, np.flatnonzero(np.diff(keys[by_key])) + 1) if len(keys) else []


def _by_score(detections: TemporalSegments) -> np.ndarray:
    return np.argsort(-detections.scores, kind="stable")


def select(segments: TemporalSegments, keep: np.ndarray) -> TemporalSegments:
    """The rows of ``segments`` where the boolean mask (or index array) ``keep`` selects, names unchanged."""
    return replace(
        segments, video=segments.video[keep], segments=segments.segments[keep], labels=segments.labels[keep],
        scores=None if segments.scores is None else segments.scores[keep],
    )  # fmt: skip


def match_detections(detections: TemporalSegments, ground_truth: TemporalSegments, tiou: float) -> np.ndarray:
    """(N,) the ground-truth row each detection matches at ``tiou`` by the ActivityNet protocol, -1 if none.

    Detections go highest score first (equal scores in input order); each takes the unmatched instance of its
    video and class with the highest tIoU, if that is at least ``tiou`` (the first listed of equal tIoU).
    """
    matched = np.full(len(detections.labels), -1, dtype=np.int64)
    num_classes = int(max(detections.labels.max(initial=-1), ground_truth.labels.max(initial=-1))) + 1
    truth_rows = {
        int(ground_truth.video[rows[0]] * num_classes + ground_truth.labels[rows[0]]): rows
        for rows in _split(ground_truth.video * num_classes + ground_truth.labels)
    }
    order = _by_score(detections)
    for positions in _split((detections.video * num_classes + detections.labels)[order]):
        dets = order[positions]  # one video and class, best score first
        rows = truth_rows.get(int(detections.video[dets[0]] * num_classes + detections.labels[dets[0]]))
        if rows is None:
            continue
        ious = segment_iou(detections.segments[dets], ground_truth.segments[rows])  # (D, G)
        taken = np.zeros(len(rows), dtype=bool)
        for k in np.flatnonzero(ious.max(1) >= tiou):
            allowed = (ious[k] >= tiou) & ~taken
            if allowed.any():
                best = int(np.argmax(np.where(allowed, ious[k], -1.0)))
                taken[best] = True
                matched[dets[k]] = rows[best]
    return matched


def classify_detections(
    detections: TemporalSegments,
    ground_truth: TemporalSegments,
    tiou: float,
    background_tiou: float = BACKGROUND_TIOU,
) -> np.ndarray:
    """(N,) each detection's index in ``ERROR_TYPES`` at ``tiou`` (see the module docstring)."""
    matched = match_detections(detections, ground_truth, tiou)
    types = np.where(matched >= 0, TRUE_POSITIVE, BACKGROUND)
    truth_rows = {int(ground_truth.video[rows[0]]): rows for rows in _split(ground_truth.video)}
    missed = np.flatnonzero(matched < 0)
    for positions in _split(detections.video[missed]):
        dets = missed[positions]
        rows = truth_rows.get(int(detections.video[dets[0]]))
        if rows is None:
            continue  # a video without ground truth: background
        ious = segment_iou(detections.segments[dets], ground_truth.segments[rows])  # (D, G)
        top = ious.max(1)
        same = ground_truth.labels[rows[ious.argmax(1)]] == detections.labels[dets]  # the first of equal tIoU
        overlap, near = top >= tiou, top >= background_tiou
        types[dets] = np.select(
            [overlap & same, overlap, near & same, near], [DOUBLE_DETECTION, WRONG_LABEL, LOCALISATION, CONFUSION],
            BACKGROUND,
        )  # fmt: skip
    return types


def rank_groups(
    detections: TemporalSegments, ground_truth: TemporalSegments, limit_factor: int = LIMIT_FACTOR
) -> np.ndarray:
    """(N,) each detection's rank group k in 1..``limit_factor``: it ranks ``(k - 1) * G + 1 .. k * G`` by score
    among its class's detections (G: the class's ground-truth instances); 0 beyond ``limit_factor * G`` or
    for a class without ground truth."""
    order = _by_score(detections)
    rank = np.empty(len(order), dtype=np.int64)
    for positions in _split(detections.labels[order]):
        rank[order[positions]] = np.arange(len(positions))
    num_classes = int(max(detections.labels.max(initial=-1), ground_truth.labels.max(initial=-1))) + 1
    instances = np.bincount(ground_truth.labels, minlength=num_classes)[detections.labels]
    inside = (instances > 0) & (rank < limit_factor * instances)
    return np.where(inside, rank // np.maximum(instances, 1) + 1, 0)


def _json_number(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


@dataclass(frozen=True)
class FalsePositiveAnalysis:
    """DETAD's false-positive profile and error impact of one model (see the module docstring).

    ``profile[k - 1, e]`` is the share of rank group k's detections of type ``ERROR_TYPES[e]``, averaged over
    the thresholds (NaN for a group without detections); ``mAP_gain[type]`` is the average mAP of the cut
    detections without that type's detections minus ``average_mAP``, theirs with all of them.
    """

    tious: tuple[float, ...]
    limit_factor: int
    group: np.ndarray  # (N,) rank group of every detection, 0 outside the cut
    error_type: np.ndarray  # (T, N) index into ERROR_TYPES, at each threshold (cut detections only, else -1)
    group_sizes: np.ndarray  # (K,) detections per rank group
    profile: np.ndarray  # (K, len(ERROR_TYPES))
    average_mAP: float
    mAP_gain: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        groups = [f"{k}G" for k in range(1, self.limit_factor + 1)]
        return {
            "limit_factor": self.limit_factor,
            "group_sizes": dict(zip(groups, self.group_sizes.tolist())),
            "profile": {
                g: {name: _json_number(v) for name, v in zip(ERROR_TYPES, row)}
                for g, row in zip(groups, self.profile)
            },
            "average_mAP": self.average_mAP,
            "mAP_gain": self.mAP_gain,
        }


def false_positive_analysis(
    detections: TemporalSegments,
    ground_truth: TemporalSegments,
    tious: Sequence[float] = (0.5,),
    limit_factor: int = LIMIT_FACTOR,
    background_tiou: float = BACKGROUND_TIOU,
) -> FalsePositiveAnalysis:
    """DETAD's false-positive analysis of the top ``limit_factor * G`` detections of every class."""
    if not tious or not all(0.0 < float(t) <= 1.0 for t in tious):
        raise ValueError(f"tious must be thresholds in (0, 1], got {tious!r}")
    group = rank_groups(detections, ground_truth, limit_factor)
    cut = np.flatnonzero(group > 0)
    analysed = select(detections, cut)
    error_type = np.full((len(tious), len(group)), -1, dtype=np.int64)
    profile = np.zeros((limit_factor, len(ERROR_TYPES)))
    sizes = np.bincount(group[cut] - 1, minlength=limit_factor)
    base, without = [], {name: [] for name in ERROR_TYPES[1:]}
    for t, tiou in enumerate(tious):
        types = classify_detections(analysed, ground_truth, tiou, background_tiou)
        error_type[t, cut] = types
        counts = np.zeros_like(profile)
        np.add.at(counts, (group[cut] - 1, types), 1)
        profile += counts / np.maximum(sizes, 1)[:, None]
        base.append(mean_average_precision(analysed, ground_truth, [tiou])[map_key(tiou)])
        for e, name in enumerate(ERROR_TYPES[1:], start=1):
            # Removing false positives leaves every match at this threshold as it was, so rescoring the rest
            # is the same as striking those ranks from the precision/recall curve.
            kept = select(analysed, types != e)
            without[name].append(mean_average_precision(kept, ground_truth, [tiou])[map_key(tiou)])
    profile /= len(tious)
    profile[sizes == 0] = np.nan
    average = float(np.mean(base))
    return FalsePositiveAnalysis(
        tious=tuple(float(t) for t in tious), limit_factor=limit_factor, group=group, error_type=error_type,
        group_sizes=sizes, profile=profile, average_mAP=average,
        mAP_gain={name: float(np.mean(v)) - average for name, v in without.items()},
    )  # fmt: skip


def detected_instances(
    detections: TemporalSegments,
    ground_truth: TemporalSegments,
    tiou: float,
    min_precision: float = FN_MIN_PRECISION,
) -> np.ndarray:
    """(M,) whether each ground-truth instance is detected at ``tiou`` by DETAD's false-negative rule.

    A match counts only where the normalised precision of its class's ranked detections, up to and including
    that rank, is above ``min_precision``; 0 counts every match.
    """
    matched = match_detections(detections, ground_truth, tiou)
    detected = np.zeros(len(ground_truth.labels), dtype=bool)
    classes, instances = np.unique(ground_truth.labels, return_counts=True)
    if not len(classes):
        return detected
    per_class = dict(zip(classes.tolist(), instances.tolist()))
    mean_instances = len(ground_truth.labels) / len(classes)
    order = _by_score(detections)
    for positions in _split(detections.labels[order]):
        dets = order[positions]  # one class, best score first
        if int(detections.labels[dets[0]]) not in per_class:
            continue
        hit = matched[dets] >= 0
        recall = np.cumsum(hit) / per_class[int(detections.labels[dets[0]])]
        false_positives = np.cumsum(~hit)
        precision = recall * mean_instances / (recall * mean_instances + false_positives)
        detected[matched[dets[hit & (precision > min_precision)]]] = True
    return detected


def instance_characteristics(
    ground_truth: TemporalSegments, durations: np.ndarray | Sequence[float] | None = None
) -> dict[str, np.ndarray]:
    """(M,) per ground-truth instance: ``length`` (s), ``num_instances`` (of its class in its video) and,
    with ``durations`` (V,) (seconds per ground-truth video index, NaN unknown), ``coverage`` (length /
    duration, NaN where the duration is unknown)."""
    length = ground_truth.segments[:, 1] - ground_truth.segments[:, 0]
    key = ground_truth.video * (int(ground_truth.labels.max(initial=-1)) + 1) + ground_truth.labels
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    out = {"length": length, "num_instances": counts[inverse].astype(np.float64)}
    if durations is not None:
        duration = np.asarray(durations, dtype=np.float64)[ground_truth.video]
        out["coverage"] = np.divide(length, duration, out=np.full_like(length, np.nan), where=duration > 0)
    return out


def bin_index(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Index of the right-closed bin ``(edges[i], edges[i + 1]]`` of each value, the lowest edge included;
    -1 outside the edges or NaN."""
    values = np.asarray(values, dtype=np.float64)
    index = np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="left") - 1
    index[values == edges[0]] = 0
    index[(index < 0) | (index >= len(edges) - 1) | np.isnan(values)] = -1
    return index


@dataclass(frozen=True)
class FalseNegativeAnalysis:
    """DETAD's false-negative rates of one model: ``rate`` over all instances and, per characteristic and
    bin, ``rates[name][bin]`` (NaN for an empty bin) of ``instances[name][bin]`` instances. A characteristic
    without values (coverage without video durations) is absent."""

    tious: tuple[float, ...]
    min_precision: float
    missed: np.ndarray  # (T, M) bool per threshold and ground-truth instance
    rate: float
    rates: dict[str, dict[str, float]]
    instances: dict[str, dict[str, int]]

    def to_dict(self, characteristics: Sequence[str] = ()) -> dict[str, Any]:
        """JSON-ready numbers; ``characteristics`` listed but absent (skipped) are given as None."""
        out: dict[str, Any] = {"min_precision": self.min_precision, "rate": _json_number(self.rate)}
        for name in dict.fromkeys([*self.rates, *characteristics]):
            out[name] = None
            if name in self.rates:
                out[name] = {
                    b: {"instances": n, "rate": _json_number(self.rates[name][b])}
                    for b, n in self.instances[name].items()
                }
        return out


def false_negative_analysis(
    detections: TemporalSegments,
    ground_truth: TemporalSegments,
    durations: np.ndarray | Sequence[float] | None = None,
    tious: Sequence[float] = (0.5,),
    bins: Bins = ACTIVITYNET_BINS,
    min_precision: float = FN_MIN_PRECISION,
) -> FalseNegativeAnalysis:
    """DETAD's false-negative analysis. Coverage needs ``durations`` (see ``instance_characteristics``);
    without any it is skipped with a warning, as are instances whose video has none or which are longer
    than their video (DETAD leaves out coverage above 1)."""
    if not tious or not all(0.0 < float(t) <= 1.0 for t in tious):
        raise ValueError(f"tious must be thresholds in (0, 1], got {tious!r}")
    missed = np.stack([~detected_instances(detections, ground_truth, t, min_precision) for t in tious])
    values = instance_characteristics(ground_truth, durations)
    coverage = values.get("coverage")
    if "coverage" in bins and (coverage is None or np.isnan(coverage).all()):
        warnings.warn(
            "coverage skipped: no video duration is known; give the durations (the ground-truth JSON's "
            "'duration' per video, or a JSON of video -> seconds)"
        )
        values.pop("coverage", None)
    elif "coverage" in bins and (np.isnan(coverage).any() or (coverage > 1).any()):
        warnings.warn(
            f"coverage: {int(np.isnan(coverage).sum())} instances in videos without a duration and "
            f"{int((coverage > 1).sum())} longer than their video are left out of its bins"
        )
    rates, instances = {}, {}
    for name, (edges, labels) in bins.items():
        if name not in values:
            continue
        index = bin_index(values[name], edges)
        rates[name], instances[name] = {}, {}
        for b, label in enumerate(labels):
            inside = index == b
            instances[name][label] = int(inside.sum())
            rates[name][label] = float(missed[:, inside].mean()) if inside.any() else math.nan
    return FalseNegativeAnalysis(
        tious=tuple(float(t) for t in tious), min_precision=min_precision, missed=missed,
        rate=float(missed.mean()) if missed.size else math.nan, rates=rates, instances=instances,
    )  # fmt: skip


def read_durations(
    ground_truth_path: str | Path, ground_truth: TemporalSegments, durations_path: str | Path | None = None
) -> np.ndarray | None:
    """(V,) seconds per ground-truth video (NaN unknown): the ActivityNet JSON's ``duration`` where given,
    else the ``durations_path`` JSON ``{video: seconds}``; None when neither knows any video."""
    ground_truth_path = Path(ground_truth_path)
    durations = np.full(len(ground_truth.video_names), np.nan)

    def fill(mapping: Mapping[str, Any], path: Path, field: str | None) -> None:
        for v, name in enumerate(ground_truth.video_names):
            entry = mapping.get(name)
            value = entry.get(field) if field is not None and isinstance(entry, dict) else entry
            if value is None or not np.isnan(durations[v]):
                continue
            seconds = json_number(value, f"{path}: video {name!r}", "the duration (s)")
            if seconds <= 0:
                raise AnnotationError(f"{path}: video {name!r}: the duration must be positive, got {seconds}")
            durations[v] = seconds

    if ground_truth_path.suffix.lower() == ".json":
        layout = '{"database": {video_id: {"duration": seconds, ...}}}'
        fill(load_json(ground_truth_path, "database", layout), ground_truth_path, "duration")
    if durations_path is not None:
        path = Path(durations_path)
        if not path.is_file():
            raise AnnotationError(f"durations file {path} not found; pass a JSON of video id -> seconds")
        try:
            mapping = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise AnnotationError(f"{path}: not valid JSON ({err}); expected {{video id: seconds}}") from None
        if not isinstance(mapping, dict):
            raise AnnotationError(f"{path}: expected a JSON object {{video id: seconds}}")
        fill(mapping, path, None)
    return None if np.isnan(durations).all() else durations


# Pictures --------------------------------------------------------------------------------------------------


def _save(fig: plt.Figure, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def _grouped_bars(ax: plt.Axes, groups: Sequence[str], series: Mapping[str, Sequence[float]]) -> None:
    """One cluster of bars per group, one bar per series, each labelled with its value (NaN: no bar)."""
    width = 0.8 / max(len(series), 1)
    for s, (name, values) in enumerate(series.items()):
        x = np.arange(len(groups)) + (s - (len(series) - 1) / 2) * width
        heights = np.nan_to_num(np.asarray(values, dtype=np.float64))
        bars = ax.bar(x, heights, width, label=name)
        for bar, value in zip(bars, values):
            if math.isfinite(value):
                ax.annotate(
                    f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=7,
                )  # fmt: skip
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def plot_false_positives(analyses: Mapping[str, FalsePositiveAnalysis], out: str | Path) -> Path:
    """The false-positive profile of every model, one panel each side by side: a stacked bar per rank group."""
    fig, axes = plt.subplots(1, len(analyses), figsize=(4.2 * len(analyses) + 1.8, 3.8), squeeze=False)
    for ax, (name, analysis) in zip(axes[0], analyses.items()):
        x = np.arange(1, analysis.limit_factor + 1)
        bottom = np.zeros(len(x))
        for e, (kind, colour) in enumerate(zip(ERROR_TYPES, ERROR_COLOURS)):
            share = 100 * np.nan_to_num(analysis.profile[:, e])
            ax.bar(x, share, 0.85, bottom=bottom, color=colour, label=kind.replace("_", " "))
            bottom += share
        ax.set_xticks(x, [f"{k}G" for k in x], fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_xlabel("top predictions (rank group)")
        ax.set_title(f"{name} (average mAP {100 * analysis.average_mAP:.1f})", fontsize=9)
    axes[0, 0].set_ylabel("error breakdown (%)")
    axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(fig, out)


def plot_error_impact(analyses: Mapping[str, FalsePositiveAnalysis], out: str | Path) -> Path:
    """Average-mAP gain (points) when each false-positive type is removed, the models' bars side by side."""
    fig, ax = plt.subplots(figsize=(1.3 * (len(ERROR_TYPES) - 1) + 0.8 * len(analyses), 3.8))
    kinds = ERROR_TYPES[1:]
    _grouped_bars(
        ax, [k.replace("_", "\n") for k in kinds],
        {name: [100 * a.mAP_gain[k] for k in kinds] for name, a in analyses.items()},
    )  # fmt: skip
    ax.set_ylabel("average-mAP improvement (points)")
    ax.set_title("removing one type of false positive", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    return _save(fig, out)


def plot_false_negatives(analyses: Mapping[str, FalseNegativeAnalysis], out: str | Path) -> Path:
    """False-negative rate (%) per bin of each characteristic, one panel each, the models' bars side by side."""
    names = list(dict.fromkeys(c for a in analyses.values() for c in a.rates))
    fig, axes = plt.subplots(
        1, max(len(names), 1), figsize=(4.0 * max(len(names), 1) + 1.0, 3.6), squeeze=False
    )
    titles = {"coverage": "coverage", "length": "length", "num_instances": "# instances"}
    for ax, characteristic in zip(axes[0], names):
        labels = list(next(a.rates[characteristic] for a in analyses.values() if characteristic in a.rates))
        series = {
            name: [100 * a.rates.get(characteristic, {}).get(b, math.nan) for b in labels]
            for name, a in analyses.items()
        }
        _grouped_bars(ax, labels, series)
        ax.set_ylim(0, 110)
        ax.set_title(titles.get(characteristic, characteristic), fontsize=9)
    axes[0, 0].set_ylabel("false negative (%)")
    axes[0, -1].legend(fontsize=8, frameon=False)
    return _save(fig, out)
