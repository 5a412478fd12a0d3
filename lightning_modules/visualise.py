"""Pictures: HaltingVT halting maps (which tokens are still active, per joint layer and frame), temporal
detection timelines (ground truth above the best detections, per video) and accuracy-vs-GFLOPs plots
across runs.

Halting maps come out of ``predict`` with the ``HaltingMapWriter`` callback::

    python -m lightning_modules predict --config recipes/quickstart/synthetic_haltingvt.yaml \\
        --ckpt_path <checkpoint> --data.init_args.predict_videos='[videos/left_0150.mp4]' \\
        --trainer.callbacks+=lightning_modules.visualise.HaltingMapWriter

Timelines come out of every validation, test and predict of the temporal detection task with the
``TemporalDetectionTimeline`` callback (``<run directory>/timelines/<video id>_<stage>.png``)::

    python -m lightning_modules fit --config recipes/quickstart/tad_synthetic.yaml \\
        --trainer.callbacks+=lightning_modules.visualise.TemporalDetectionTimeline

The accuracy-vs-GFLOPs plot reads the validation results the CSV logger wrote::

    python -m lightning_modules.visualise accuracy-vs-gflops runs/haltingvt_minik_* --out tradeoff.png
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from matplotlib.patches import Patch, Rectangle
from torch import Tensor

from models.tad_postprocess import Detections

# Brightness of a patch in a halting map panel: still active, halted in an earlier layer, dropped by the Glimpser.
ACTIVE, HALTED, DROPPED = 1.0, 0.35, 0.08


def patch_masks(kept: Tensor, depth: Tensor, grid: tuple[int, int, int], layers: int) -> np.ndarray:
    """Per-layer patch states of one sample: (layers + 1, T, h, w) brightness, row 0 after the Glimpser.

    ``kept``/``depth`` (T, P') as in ``models.haltingvt.HaltingMap``.
    """
    t, h, w = grid
    masks = np.full((layers + 1, t, h * w), DROPPED, dtype=np.float32)
    kept_np, depth_np = kept.cpu().numpy(), depth.cpu().numpy()
    for frame in range(t):
        masks[0, frame, kept_np[frame]] = ACTIVE
        for layer in range(layers):
            masks[layer + 1, frame, kept_np[frame]] = np.where(depth_np[frame] > layer, ACTIVE, HALTED)
    return masks.reshape(layers + 1, t, h, w)


def halting_figure(
    frames: np.ndarray,
    kept: Tensor,
    depth: Tensor,
    grid: tuple[int, int, int],
    layers: int,
    first_layer: int = 0,
    title: str = "",
    step: int = 1,
) -> plt.Figure:
    """Frames (t, H, W, 3) float in [0, 1], one column per token time step (the first frame of a tubelet); row 0
    the Glimpser's selection, then one row per joint layer with halted patches dimmed and dropped patches dark.
    ``first_layer`` numbers the rows; ``step`` is the tubelet length."""
    t, h, w = grid
    masks = patch_masks(kept, depth, grid, layers)
    size_y, size_x = frames.shape[1] // h, frames.shape[2] // w
    rows = layers + 1
    fig, axes = plt.subplots(rows, t, figsize=(1.1 * t + 1.0, 1.1 * rows + 0.6), squeeze=False)
    for r in range(rows):
        for c in range(t):
            shade = np.kron(masks[r, c], np.ones((size_y, size_x), dtype=np.float32))[..., None]
            ax = axes[r, c]
            ax.imshow(np.clip(frames[c] * shade, 0.0, 1.0))
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                label = "Glimpser" if r == 0 else f"block {first_layer + r - 1}"
                ax.set_ylabel(label, fontsize=8)
            if r == 0:
                ax.set_title(f"{'frame' if step == 1 else 'tubelet'} {c}", fontsize=8)
            if r > 0:
                active = int((masks[r, c] == ACTIVE).sum())
                ax.text(1, size_y * 0.9, str(active), color="yellow", fontsize=7)
    fig.suptitle(
        title or "active tokens per joint layer (dimmed: halted, dark: dropped by the Glimpser)", fontsize=9
    )
    fig.tight_layout()
    return fig


class HaltingMapWriter(L.Callback):
    """During ``predict``, writes one halting-map PNG per video (first view) to ``out_dir`` (default:
    ``<default_root_dir>/halting_maps``) and logs the images to W&B when a W&B logger is attached.

    ``max_videos`` caps how many pictures are written (None: all), per rank. Under DDP each rank draws the
    videos it predicts; only rank 0's pictures reach W&B (Lightning logs from rank 0), all of them reach
    ``out_dir``.
    """

    def __init__(self, out_dir: str | None = None, max_videos: int | None = 16, log_to_wandb: bool = True):
        self.out_dir = out_dir
        self.max_videos = max_videos
        self.log_to_wandb = log_to_wandb
        self.written: list[Path] = []

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not hasattr(getattr(pl_module, "backbone", None), "halting_map"):
            raise TypeError(
                f"HaltingMapWriter needs a HaltingVT backbone (models.haltingvt.HaltingViT); "
                f"{type(pl_module).__name__} has {type(getattr(pl_module, 'backbone', None)).__name__}"
            )
        self.written = []

    def on_predict_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        room = None if self.max_videos is None else self.max_videos - len(self.written)
        if batch["batch_size"] == 0 or room == 0:
            return
        dm = trainer.datamodule
        video = batch["video"][:, 0] if batch["video"].ndim == 6 else batch["video"]
        hmap, _ = pl_module.backbone.halting_map(video)
        mean = torch.as_tensor(dm.mean, device=video.device).view(3, 1, 1, 1)
        std = torch.as_tensor(dm.std, device=video.device).view(3, 1, 1, 1)
        out_dir = Path(self.out_dir or Path(trainer.default_root_dir) / "halting_maps")
        out_dir.mkdir(parents=True, exist_ok=True)
        records = dm.dataset("predict").records
        names = dm.class_names or [str(i) for i in range(pl_module.num_classes)]
        first = getattr(pl_module.backbone, "glimpser_blocks", 0)
        step = video.shape[2] // hmap.grid[0]
        new, captions = [], []
        for i in range(len(video) if room is None else min(room, len(video))):
            frames = (video[i].float() * std + mean).permute(1, 2, 3, 0).cpu().numpy()
            frames = frames[::step]  # first frame of each tubelet
            stem = Path(records[int(batch["index"][i])].path).stem
            score, label = outputs["scores"][i].max(0)
            caption = f"{stem}: predicted {names[int(label)]} ({float(score):.2f})"
            fig = halting_figure(
                frames, hmap.kept[i], hmap.depth[i], hmap.grid, hmap.layers, first, caption, step
            )
            path = out_dir / f"{stem}_halting.png"
            partial = path.with_suffix(f".{trainer.global_rank}.tmp.png")
            fig.savefig(partial, dpi=100)
            partial.replace(path)  # whole files only, even when DDP padding gives two ranks the same video
            plt.close(fig)
            new.append(path)
            captions.append(caption)
        self.written += new
        if self.log_to_wandb:
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(
                        key="predict/halting_map", images=[str(p) for p in new], caption=captions
                    )

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.written:
            rank_zero_info(f"wrote {len(self.written)} halting maps to {self.written[0].parent}")


# ---------------------------------------------------------------------------- temporal detection timelines

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

    Validation and test draw the detections the task scored: the video-level results (merged over windows
    and ranks) that it writes to ``<default_root_dir>/predictions_<stage>.json`` in its ``on_*_epoch_end``.
    Lightning calls that hook before the callbacks' ``on_validation_end`` / ``on_test_end``, where this reads
    the file. Nothing is drawn in the sanity check, nor when this evaluation did not rewrite the file.
    Predict writes no file: the windows' candidates from ``predict_step`` are gathered and merged per video
    with the task's post-processing (and class fusion), as evaluation does.
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
        self._windows: list[dict[str, Any]] = []
        self._predict_videos: list[int] = []

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
        index = {name: c for c, name in enumerate(dm.class_names)}
        detections = {}
        for video in self.drawn_videos(trainer, stage):
            entries = [d for d in results.get(dm.video_ids[video], []) if d["label"] in index]
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

    # ------------------------------------------------------------------- predict: the windows' candidates

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._windows = []
        self._predict_videos = self.drawn_videos(trainer, "predict")

    def on_predict_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        wanted = set(self._predict_videos)
        self._windows += [
            {k: v.cpu() if isinstance(v, Tensor) else v for k, v in window.items()}
            for window in outputs or []
            if window["video_index"] in wanted
        ]

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        windows, self._windows = self._windows, []
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            everyone: list = [None] * trainer.world_size
            dist.all_gather_object(everyone, windows)  # a window repeated by DDP padding is merged by NMS
            windows = [w for part in everyone for w in part]
        if trainer.is_global_zero:
            self._draw(trainer, "predict", self._merge(trainer, pl_module, windows))

    def _merge(
        self, trainer: L.Trainer, pl_module: L.LightningModule, windows: list[dict[str, Any]]
    ) -> dict[int, VideoDetections]:
        from lightning_modules.temporal_detection import read_class_scores  # the task's heavier imports

        dm = trainer.datamodule
        class_scores = {}
        if pl_module.external_class_scores:
            class_scores = read_class_scores(pl_module.external_class_scores, dm.video_ids, dm.class_names)
        elif pl_module.num_classes == 1 and len(dm.class_names) > 1:
            rank_zero_warn(
                "TemporalDetectionTimeline: a class-agnostic detector names classes only with "
                "model.init_args.external_class_scores; its timelines show class 0 for every detection"
            )
        durations = {v.video_index: v.duration for v in dm.dataset("predict").videos}
        detections = {}
        for video in self._predict_videos:
            parts = [Detections(w["segments"], w["scores"], w["labels"]) for w in windows
                     if w["video_index"] == video]  # fmt: skip
            if not parts:
                continue
            # The candidates are in seconds already: offset 0 and one second per step.
            merged = pl_module.postprocess.merge_windows(parts, [0.0] * len(parts), 1.0, durations[video])
            if video in class_scores:
                merged = pl_module.postprocess.fuse_video_classes(merged, class_scores[video])
            detections[video] = (merged.segments.numpy(), merged.scores.numpy(), merged.labels.numpy())
        return detections

    # ----------------------------------------------------------------------------------------------- drawing

    def _draw(self, trainer: L.Trainer, stage: str, detections: dict[int, VideoDetections]) -> None:
        dm = trainer.datamodule
        truth = dm.ground_truth(stage)
        durations = {v.video_index: v.duration for v in dm.dataset(stage).videos}
        out_dir = Path(self.out_dir or Path(trainer.default_root_dir) / "timelines")
        out_dir.mkdir(parents=True, exist_ok=True)
        none: VideoDetections = (np.zeros((0, 2)), np.zeros(0), np.zeros(0, dtype=np.int64))
        new, captions = [], []
        for video in self.drawn_videos(trainer, stage):
            video_id = dm.video_ids[video]
            segments, scores, labels = detections.get(video, none)
            caption = (f"{video_id} ({stage}): {len(truth[video]['labels'])} ground-truth segments, "
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


# ------------------------------------------------------------------------------------------ trade-off plot


@dataclass(frozen=True)
class RunResult:
    name: str
    accuracy: float
    gflops: float


def read_run_result(
    run: str | Path, accuracy_key: str = "val/top1", gflops_key: str = "val/gflops"
) -> RunResult:
    """The last row with both keys of a run's CSV log. ``run`` is a ``metrics.csv`` file, a run directory
    (``runs/<recipe>/<run id>``) or a recipe directory holding several runs, of which the newest that has such a
    row is taken (a later ``test`` run, whose log has no validation rows, is passed over). The point is named
    ``<recipe>/<run id>``, the two folders above the CSV file."""
    run = Path(run)
    files = [run] if run.is_file() else sorted(run.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no metrics.csv under {run}: run with a CSVLogger (every recipe has one)")
    for csv_file in reversed(files):
        with csv_file.open() as f:
            rows = [r for r in csv.DictReader(f) if r.get(accuracy_key) and r.get(gflops_key)]
        if rows:
            name = f"{csv_file.parent.parent.name}/{csv_file.parent.name}"
            return RunResult(name, float(rows[-1][accuracy_key]), float(rows[-1][gflops_key]))
    raise ValueError(
        f"no metrics.csv under {run} has a row with both {accuracy_key} and {gflops_key} "
        f"({len(files)} looked at): run validate (or fit) with this run's recipe first"
    )


def plot_accuracy_vs_gflops(
    results: Sequence[RunResult],
    out: str | Path,
    title: str = "accuracy vs GFLOPs",
    accuracy_label: str = "top-1 (%)",
) -> Path:
    """Scatter of accuracy (in %) against GFLOPs per clip, each point labelled with its run name."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for r in results:
        ax.scatter(r.gflops, 100 * r.accuracy, s=36)
        ax.annotate(
            r.name, (r.gflops, 100 * r.accuracy), textcoords="offset points", xytext=(4, 4), fontsize=8
        )
    ax.set_xlabel("GFLOPs per clip (multiply-accumulates)")
    ax.set_ylabel(accuracy_label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    most = max(r.gflops for r in results)
    ax.set_xlim(0, most * 1.2 if math.isfinite(most) and most > 0 else 1)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_modules.visualise", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    plot = sub.add_parser("accuracy-vs-gflops", help="plot runs' last validation accuracy against GFLOPs")
    plot.add_argument("runs", nargs="+", help="run directories (or metrics.csv files)")
    plot.add_argument("--out", default="accuracy_vs_gflops.png")
    plot.add_argument("--accuracy-key", default="val/top1", help="e.g. val/mAP for ActivityNet")
    args = parser.parse_args(argv)
    results = [read_run_result(r, args.accuracy_key) for r in args.runs]
    for r in results:
        print(f"{r.name}: {args.accuracy_key} {100 * r.accuracy:.2f}  GFLOPs {r.gflops:.4f}")
    print(f"wrote {plot_accuracy_vs_gflops(results, args.out, accuracy_label=args.accuracy_key)}")


if __name__ == "__main__":
    main()
