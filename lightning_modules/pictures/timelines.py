"""Temporal detection timelines: the ground truth above the best detections, per video.

They come out of every validation, test and predict of the temporal detection task with the
``TemporalDetectionTimeline`` callback (``<run directory>/timelines/<video id>_<stage>.png``)::

    python -m lightning_modules fit --config recipes/quickstart/tad_synthetic.yaml \\
        --trainer.callbacks+=lightning_modules.pictures.timelines.TemporalDetectionTimeline
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from matplotlib.patches import Patch, Rectangle
from torch import Tensor

#: One colour per class index (cycling past 20 classes), shared by ground truth and detections: tab20's ten
#: strong hues first, then their light twins, so that the first ten classes differ in hue.
CLASS_COLOURS = plt.get_cmap("tab20").colors[0::2] + plt.get_cmap("tab20").colors[1::2]

# (segments (n, 2) seconds, scores (n,), labels (n,)) of one video.
VideoDetections = tuple[np.ndarray, np.ndarray, np.ndarray]


def timeline_figure(
    truth_segments: np.ndarray | Tensor,
    truth_labels: np.ndarray | Tensor,
    pred_segments: np.ndarray | Tensor,
    pred_scores: np.ndarray | Tensor,
    pred_labels: np.ndarray | Tensor,
    class_names: Sequence[str],
    duration: float,
    top_k: int = 10,
    title: str = "",
) -> plt.Figure:
    """One video on a time axis (seconds, 0 to ``duration``): its ground-truth segments on the top row, and
    below, one row each, its ``top_k`` highest-scoring detections, best first, labelled with class and score.

    Segments (n, 2) are ``(start, end)`` in seconds and labels index ``class_names``; a bar's colour is its
    class. Every bar is a ``Rectangle`` patch of the axes with ``gid`` ``"truth"`` or ``"prediction"``.
    """
    truth_segments = np.asarray(truth_segments, dtype=np.float64).reshape(-1, 2)
    truth_labels = np.asarray(truth_labels, dtype=np.int64).reshape(-1)
    pred_segments = np.asarray(pred_segments, dtype=np.float64).reshape(-1, 2)
    pred_scores = np.asarray(pred_scores, dtype=np.float64).reshape(-1)
    pred_labels = np.asarray(pred_labels, dtype=np.int64).reshape(-1)
    best = np.argsort(-pred_scores, kind="stable")[:top_k]
    rows = 1 + len(best)
    fig, ax = plt.subplots(figsize=(10, 1.0 + 0.32 * rows))

    def bar(row: int, segment: np.ndarray, label: int, text: str, gid: str) -> None:
        (start, end), colour = segment, CLASS_COLOURS[label % len(CLASS_COLOURS)]
        edge = "black" if gid == "truth" else "none"
        ax.add_patch(
            Rectangle((start, row - 0.4), end - start, 0.8, facecolor=colour, edgecolor=edge, gid=gid)
        )
        ax.text(start, row, f" {text}", va="center", ha="left", fontsize=7, clip_on=True)

    for segment, label in zip(truth_segments, truth_labels):
        bar(0, segment, int(label), class_names[label], "truth")
    for row, i in enumerate(best, start=1):
        text = f"{class_names[pred_labels[i]]} {pred_scores[i]:.2f}"
        bar(row, pred_segments[i], int(pred_labels[i]), text, "prediction")
    if not len(best):
        ax.text(0.5, 0.5, "no detections", transform=ax.transAxes, ha="center", fontsize=8, color="grey")

    end = max([duration, *truth_segments[:, 1], *pred_segments[best, 1]])
    ax.set_xlim(0, end if end > 0 else 1.0)
    ax.set_ylim(rows - 0.5, -0.5)  # ground truth on top
    ax.set_yticks(range(rows), ["ground truth", *(f"#{r}" for r in range(1, rows))], fontsize=7)
    ax.axhline(0.5, color="black", linewidth=0.6)
    ax.set_xlabel("time (s)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    shown = sorted({int(c) for c in truth_labels} | {int(c) for c in pred_labels[best]})
    if shown:
        handles = [Patch(color=CLASS_COLOURS[c % len(CLASS_COLOURS)], label=class_names[c]) for c in shown]
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False)
    ax.set_title(title or f"ground truth and top-{top_k} detections", fontsize=9)
    fig.tight_layout()
    return fig


class TemporalDetectionTimeline(L.Callback):
    """After each validation, test and predict of ``TemporalActionDetection``: one ``timeline_figure`` PNG
    per video (ground truth above the ``top_k`` best detections) in ``out_dir`` (default
    ``<default_root_dir>/timelines``), named ``<video id>_<stage>.png``, for the first ``max_videos`` videos
    of the stage in annotation order (None: all); logged to W&B under ``<stage>/timelines`` when a W&B logger
    is attached. Only global rank 0 draws.

    Each stage draws the detections the task wrote: the video-level results (merged over windows and ranks)
    in ``<default_root_dir>/predictions_<stage>.json``, written in its ``on_*_epoch_end``, which Lightning
    calls before the callbacks' ``on_validation_end`` / ``on_test_end`` / ``on_predict_end``, where this reads
    the file. Nothing is drawn in the sanity check, nor when this pass did not rewrite the file. A predict
    over one's own videos has no ground truth: its timelines show the detections alone.
    """

    def __init__(
        self,
        out_dir: str | None = None,
        max_videos: int | None = 8,
        top_k: int = 10,
        log_to_wandb: bool = True,
    ):
        self.out_dir = out_dir
        self.max_videos = max_videos
        self.top_k = top_k
        self.log_to_wandb = log_to_wandb
        self.written: list[Path] = []
        self._results_stamp: dict[str, int | None] = {}

    def drawn_videos(self, trainer: L.Trainer, stage: str) -> list[int]:
        """The ``video_index`` of the videos drawn: the first ``max_videos`` of the stage."""
        videos = sorted(trainer.datamodule.ground_truth(stage))
        return videos if self.max_videos is None else videos[: self.max_videos]

    # ----------------------------------------------------------------- validation and test: the results file

    @staticmethod
    def results_file(trainer: L.Trainer, stage: str) -> Path:
        return Path(trainer.default_root_dir) / f"predictions_{stage}.json"

    def _stamp(self, trainer: L.Trainer, stage: str) -> None:
        path = self.results_file(trainer, stage)
        self._results_stamp[stage] = path.stat().st_mtime_ns if path.is_file() else None

    def _draw_results_file(self, trainer: L.Trainer, stage: str) -> None:
        path = self.results_file(trainer, stage)
        if not path.is_file() or path.stat().st_mtime_ns == self._results_stamp.get(stage):
            rank_zero_warn(f"TemporalDetectionTimeline: this {stage} run did not write {path}; no timelines")
            return
        dm = trainer.datamodule
        results = json.loads(path.read_text())["results"]
        names = dm.stage_video_ids(stage)
        index = {name: c for c, name in enumerate(dm.class_names)}
        detections = {}
        for video in self.drawn_videos(trainer, stage):
            entries = [d for d in results.get(names[video], []) if d["label"] in index]
            detections[video] = (
                np.array([d["segment"] for d in entries], dtype=np.float64).reshape(-1, 2),
                np.array([d["score"] for d in entries], dtype=np.float64),
                np.array([index[d["label"]] for d in entries], dtype=np.int64),
            )
        self._draw(trainer, stage, detections)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stamp(trainer, "val")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.is_global_zero:
            self._draw_results_file(trainer, "val")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stamp(trainer, "test")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self._draw_results_file(trainer, "test")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stamp(trainer, "predict")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self._draw_results_file(trainer, "predict")

    # ----------------------------------------------------------------------------------------------- drawing

    def _draw(self, trainer: L.Trainer, stage: str, detections: dict[int, VideoDetections]) -> None:
        dm = trainer.datamodule
        truth = dm.ground_truth(stage)
        durations = {v.video_index: v.duration for v in dm.dataset(stage).videos}
        out_dir = Path(self.out_dir or Path(trainer.default_root_dir) / "timelines")
        out_dir.mkdir(parents=True, exist_ok=True)
        none: VideoDetections = (np.zeros((0, 2)), np.zeros(0), np.zeros(0, dtype=np.int64))
        new, captions = [], []
        names = dm.stage_video_ids(stage)
        for video in self.drawn_videos(trainer, stage):
            video_id = names[video]
            segments, scores, labels = detections.get(video, none)
            own = stage == "predict" and bool(getattr(dm, "predict_videos", None))  # no annotation to show
            truth_text = "" if own else f"{len(truth[video]['labels'])} ground-truth segments, "
            caption = (f"{video_id} ({stage}): {truth_text}"
                       f"top {min(self.top_k, len(scores))} of {len(scores)} detections")  # fmt: skip
            fig = timeline_figure(
                truth[video]["segments"], truth[video]["labels"], segments, scores, labels, dm.class_names,
                durations[video], self.top_k, caption,
            )  # fmt: skip
            path = out_dir / f"{video_id}_{stage}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            new.append(path)
            captions.append(caption)
        if not new:
            return
        self.written += new
        rank_zero_info(f"wrote {len(new)} {stage} timelines to {out_dir}")
        if self.log_to_wandb:
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(
                        key=f"{stage}/timelines", images=[str(p) for p in new], caption=captions,
                        step=trainer.global_step,
                    )  # fmt: skip
