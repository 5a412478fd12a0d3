"""What ``predict`` writes into the run directory, in formats people and other tools read.

- Classification: ``predictions_predict.json`` in the ActivityNet classification results layout
  (``{"results": {video: [{"label", "score"}, ...]}}``, best first) and ``predictions_predict.csv`` (one row per
  video and rank: ``video, path, rank, class_index, label, score``).
- Temporal detection: the ActivityNet detection results JSON (``metrics.tad.write_predictions``) and an SRT
  subtitle file per video (``subtitles``), each detection shown while it lasts with its class and score.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

#: The results file layout's version line, as ActivityNet's evaluation kit writes it.
RESULTS_VERSION = "VERSION 1.3"


def write_class_predictions(
    out_dir: str | Path,
    names: Sequence[str],
    paths: Sequence[str],
    scores: Tensor | np.ndarray,
    class_names: Sequence[str],
    top_k: int = 5,
    stage: str = "predict",
) -> tuple[Path, Path]:
    """The ``top_k`` classes of each video (rows of ``scores``, (N, C) probabilities) as
    ``predictions_<stage>.json`` and ``.csv`` in ``out_dir``; returns both paths."""
    scores = np.asarray(scores.detach().cpu() if isinstance(scores, Tensor) else scores, dtype=np.float64)
    if scores.ndim != 2 or len(scores) != len(names) or len(names) != len(paths):
        raise ValueError(f"{len(names)} names, {len(paths)} paths and scores of shape {scores.shape} do not match")
    if scores.shape[1] != len(class_names):
        raise ValueError(f"scores have {scores.shape[1]} classes, class_names {len(class_names)}")
    k = min(top_k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        name: [{"label": class_names[c], "score": float(row[c])} for c in best]
        for name, row, best in zip(names, scores, order, strict=True)
    }
    json_path, csv_path = out / f"predictions_{stage}.json", out / f"predictions_{stage}.csv"
    content = {"version": RESULTS_VERSION, "results": results, "external_data": {"used": False, "details": ""}}
    json_path.write_text(json.dumps(content, indent=1))
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "path", "rank", "class_index", "label", "score"])
        for name, path, row, best in zip(names, paths, scores, order, strict=True):
            for rank, c in enumerate(best, 1):
                writer.writerow([name, path, rank, int(c), class_names[c], f"{row[c]:.6f}"])
    return json_path, csv_path


def srt_time(seconds: float) -> str:
    """``HH:MM:SS,mmm`` (SubRip), rounded to the millisecond, never negative."""
    ms = max(round(seconds * 1000), 0)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


def subtitles(
    segments: np.ndarray, scores: np.ndarray, labels: Sequence[str], min_score: float = 0.0, top_k: int | None = 20
) -> str:
    """SubRip text of one video's detections: the ``top_k`` best with a score of at least ``min_score``, in
    order of start, each shown over its segment as ``label (score)``. Overlapping detections are separate
    entries (players stack them)."""
    keep = [i for i in np.argsort(-np.asarray(scores), kind="stable") if scores[i] >= min_score]
    keep = sorted(keep[:top_k] if top_k is not None else keep, key=lambda i: (segments[i][0], -scores[i]))
    blocks = [
        f"{n}\n{srt_time(segments[i][0])} --> {srt_time(segments[i][1])}\n{labels[i]} ({scores[i]:.2f})\n"
        for n, i in enumerate(keep, 1)
    ]
    return "\n".join(blocks)


__all__ = ["RESULTS_VERSION", "srt_time", "subtitles", "write_class_predictions"]
