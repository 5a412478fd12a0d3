"""Pictures of spatio-temporal action detection: predicted vs ground-truth boxes with their actions on the
keyframe, and the tokens EVAD keeps after each pruning layer over the clip (the paper's Fig. 4).

The ``EVADPictures`` callback draws both for the first keyframes of every ``predict`` (and, with
``stages: [validate, predict]``, of every validation), into ``<run directory>/pictures/`` and as W&B images::

    python -m lightning_modules predict --config recipes/quickstart/evad_synthetic.yaml --ckpt_path <ckpt> \\
        --trainer.callbacks+=lightning_modules.pictures.detection.EVADPictures
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from matplotlib.patches import Rectangle
from torch import Tensor

#: The data module's name of each stage (``video_names(stage)``).
DATA_STAGE = {"validate": "val", "test": "test", "predict": "predict"}
#: Brightness of a patch in a kept-token panel: kept, dropped.
KEPT, DROPPED = 1.0, 0.15


def token_masks(kept: Mapping[int, Tensor], grid: tuple[int, int, int]) -> np.ndarray:
    """One sample's kept tokens after each pruning block as (layers + 1, t, h, w) brightness: row 0 is the input
    (every token), then one row per block of ``kept`` ({block: (n_kept,) original positions, time-major})."""
    t, h, w = grid
    masks = np.full((len(kept) + 1, t * h * w), DROPPED, dtype=np.float32)
    masks[0] = KEPT
    for row, block in enumerate(sorted(kept), start=1):
        masks[row, kept[block].cpu().numpy()] = KEPT
    return masks.reshape(len(kept) + 1, t, h, w)


def kept_tokens_figure(
    frames: np.ndarray, kept: Mapping[int, Tensor], grid: tuple[int, int, int], title: str = ""
) -> plt.Figure:
    """Frames (t, H, W, 3) float in [0, 1], one per temporal token slice; one row per pruning block with the
    dropped patches darkened and the kept count of each slice written in its corner."""
    t, h, w = grid
    masks = token_masks(kept, grid)
    size_y, size_x = frames.shape[1] // h, frames.shape[2] // w
    blocks = ["input", *(f"after block {b}" for b in sorted(kept))]
    fig, axes = plt.subplots(len(blocks), t, figsize=(1.2 * t + 1.0, 1.2 * len(blocks) + 0.6), squeeze=False)
    for r, name in enumerate(blocks):
        for c in range(t):
            shade = np.kron(masks[r, c], np.ones((size_y, size_x), dtype=np.float32))[..., None]
            ax = axes[r, c]
            ax.imshow(np.clip(frames[c, : h * size_y, : w * size_x] * shade, 0.0, 1.0))
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
            if r == 0:
                ax.set_title(f"slice {c}" + (" (key)" if c == t // 2 else ""), fontsize=8)
            ax.text(1, size_y * 0.9, str(int((masks[r, c] == KEPT).sum())), color="yellow", fontsize=7)
    fig.suptitle(title or "tokens kept after each pruning block (dark: dropped)", fontsize=9)
    fig.tight_layout()
    return fig


def _action_text(scores: np.ndarray, names: Sequence[str], threshold: float, top: int = 3) -> str:
    order = np.argsort(-scores)[:top]
    picked = [f"{names[k]} {scores[k]:.2f}" for k in order if scores[k] >= threshold]
    return ", ".join(picked) or f"({names[order[0]]} {scores[order[0]]:.2f})"


def keyframe_figure(
    frame: np.ndarray,
    gt_boxes: np.ndarray,
    gt_labels: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    class_names: Sequence[str],
    threshold: float = 0.3,
    max_boxes: int = 5,
    title: str = "",
) -> plt.Figure:
    """The keyframe (H, W, 3) float in [0, 1] with the ground truth (green, dashed: ``gt_boxes`` (G, 4) pixels,
    ``gt_labels`` (G, C) multi-hot) and the ``max_boxes`` detections of highest top score (``boxes`` (N, 4)
    pixels, ``scores`` (N, C)), each labelled with its actions scoring at least ``threshold`` (else its best)."""
    fig, ax = plt.subplots(figsize=(6, 6 * frame.shape[0] / frame.shape[1] + 0.5))
    ax.imshow(np.clip(frame, 0.0, 1.0))
    for box, labels in zip(gt_boxes, gt_labels, strict=True):
        x1, y1, x2, y2 = box
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="lime", lw=1.5, ls="--"))
        text = ", ".join(class_names[k] for k in np.flatnonzero(labels)) or "(no action)"
        ax.text(
            x1, y2, text, color="black", fontsize=7, va="top", bbox={"fc": "lime", "alpha": 0.7, "pad": 1}
        )
    order = np.argsort(-scores.max(axis=1))[:max_boxes] if len(scores) else []
    for rank, i in enumerate(order):
        x1, y1, x2, y2 = boxes[i]
        colour = plt.get_cmap("tab10")(rank % 10)
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec=colour, lw=1.5))
        ax.text(x1, y1, _action_text(scores[i], class_names, threshold), color="white", fontsize=7,
                va="bottom", bbox={"fc": colour, "alpha": 0.8, "pad": 1})  # fmt: skip
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or "detections (solid) vs ground truth (dashed)", fontsize=9)
    fig.tight_layout()
    return fig


class EVADPictures(L.Callback):
    """Draws, for the first ``max_keyframes`` keyframes of each stage in ``stages`` (``predict``, ``validate``,
    ``test``), the detections against the ground truth and the kept tokens per pruning block, as PNGs in
    ``out_dir`` (default ``<default_root_dir>/pictures``) and W&B images (key ``<stage>/keyframes`` and
    ``<stage>/kept_tokens``) when a W&B logger is attached.

    The callback runs the task's detector once more on the drawn keyframes (``pl_module(video, image_size,
    given boxes)`` -> ``models.evad.EVADOutput``, its ``predict``), reading ``video`` (normalised), ``boxes``,
    ``labels``, ``image_size``, ``video_index`` and ``timestamp`` / ``frame`` from the batch. Under DDP each rank
    draws its own keyframes into ``out_dir``.

    At the end of a ``predict`` the keyframe pictures of each video are also laid out in time order as one
    ``<video>_predict_strip.png``, ``strip_columns`` to a row (None: no strips). ``max_keyframes`` None draws
    every keyframe.
    """

    def __init__(
        self,
        out_dir: str | None = None,
        max_keyframes: int | None = 8,
        stages: list[str] | None = None,
        threshold: float = 0.3,
        log_to_wandb: bool = True,
        strip_columns: int | None = 4,
    ):
        self.out_dir = out_dir
        self.strip_columns = strip_columns
        self._keyframes: list[tuple[str, int, Path]] = []
        self.max_keyframes = max_keyframes
        self.stages = stages or ["predict"]
        self.threshold = threshold
        self.log_to_wandb = log_to_wandb
        self.written: list[Path] = []

    def _start(self, stage: str) -> None:
        self._stage, self._count = stage, 0
        self.written = []
        self._keyframes = []

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start("predict")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start("validate")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start("test")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._draw(trainer, pl_module, batch)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if not trainer.sanity_checking:
            self._draw(trainer, pl_module, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._draw(trainer, pl_module, batch)

    def _draw(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict[str, Any]) -> None:
        room = len(batch["video"]) if self.max_keyframes is None else self.max_keyframes - self._count
        if self._stage not in self.stages or room <= 0 or batch.get("batch_size", 1) == 0:
            return
        dm = trainer.datamodule
        video = batch["video"][:room]
        sizes = batch["image_size"][:room]
        given = pl_module.given_boxes(batch)
        with torch.no_grad():
            outputs = pl_module(video, sizes, None if given is None else given[:room])
            detections = pl_module.detector.predict(outputs)
        names = list(getattr(dm, "class_names", None) or [])
        mean = torch.as_tensor(dm.mean, device=video.device).view(3, 1, 1, 1)
        std = torch.as_tensor(dm.std, device=video.device).view(3, 1, 1, 1)
        out_dir = Path(self.out_dir or Path(trainer.default_root_dir) / "pictures")
        out_dir.mkdir(parents=True, exist_ok=True)
        grid = tuple(outputs.grid)
        new = {"keyframes": [], "kept_tokens": []}
        captions = []
        for i, det in enumerate(detections):
            height, width = (int(v) for v in sizes[i])
            clip = (video[i].float() * std + mean).permute(1, 2, 3, 0).cpu().numpy()  # (T, H, W, 3)
            step = clip.shape[0] // grid[0]
            key = clip[clip.shape[0] // 2, :height, :width]
            scores = det.action_scores.float().cpu().numpy()
            classes = names or [str(k) for k in range(scores.shape[1])]
            stem = self._stem(dm, batch, i)
            fig = keyframe_figure(
                key, batch["boxes"][i].cpu().numpy(), batch["labels"][i].cpu().numpy(),
                det.boxes.float().cpu().numpy(), scores, classes, self.threshold, title=stem,
            )  # fmt: skip
            new["keyframes"].append(self._save(fig, out_dir / f"{stem}_{self._stage}_boxes.png", trainer))
            time = batch["timestamp"][i] if "timestamp" in batch else batch["frame"][i]
            video_name = dm.video_names(DATA_STAGE[self._stage])[int(batch["video_index"][i])]
            self._keyframes.append((video_name, int(time), new["keyframes"][-1]))
            kept = {block: positions[i] for block, positions in outputs.kept.items()}
            fig = kept_tokens_figure(clip[::step], kept, grid, title=f"{stem}: kept tokens")
            new["kept_tokens"].append(self._save(fig, out_dir / f"{stem}_{self._stage}_tokens.png", trainer))
            captions.append(stem)
        self._count += len(captions)
        self.written += new["keyframes"] + new["kept_tokens"]
        if self.log_to_wandb and captions:
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    for kind, paths in new.items():
                        logger.log_image(
                            key=f"{self._stage}/{kind}", images=[str(p) for p in paths], caption=captions
                        )

    def _stem(self, dm: Any, batch: dict[str, Any], i: int) -> str:
        """``<video id>_t<timestamp>`` (AVA) or ``<video>_f<frame>`` (UCF101-24/JHMDB) of sample ``i``."""
        index = int(batch["video_index"][i])
        parts = [dm.video_names(DATA_STAGE[self._stage])[index]]
        for key in ("timestamp", "frame"):
            if key in batch:
                parts.append(f"{key[0]}{int(batch[key][i])}")
        return "_".join(parts)

    @staticmethod
    def _save(fig: plt.Figure, path: Path, trainer: L.Trainer) -> Path:
        partial = path.with_suffix(f".{trainer.global_rank}.tmp.png")
        fig.savefig(partial, dpi=90)
        plt.close(fig)
        partial.replace(path)
        return path

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.strip_columns and self._keyframes:
            by_video: dict[str, list[tuple[int, Path]]] = {}
            for video, time, path in self._keyframes:
                by_video.setdefault(video, []).append((time, path))
            for video, pictures in by_video.items():
                path = self._keyframes[0][2].parent / f"{video}_predict_strip.png"
                strip = picture_strip([p for _, p in sorted(pictures)], self.strip_columns)
                partial = path.with_suffix(f".{trainer.global_rank}.tmp.png")
                plt.imsave(partial, strip)
                partial.replace(path)
                self.written.append(path)
        if self.written:
            rank_zero_info(f"wrote {len(self.written)} EVAD pictures to {self.written[0].parent}")


def picture_strip(paths: Sequence[Path], columns: int) -> np.ndarray:
    """The images at ``paths`` (PNG) in reading order, ``columns`` to a row, each row as high as its tallest
    image, on white: (H, W, 4) float in [0, 1]."""
    images = [plt.imread(p) for p in paths]
    images = [np.dstack([im, np.ones(im.shape[:2])]) if im.shape[2] == 3 else im for im in images]
    width = max(im.shape[1] for im in images)
    rows = []
    for start in range(0, len(images), columns):
        part = images[start : start + columns]
        height = max(im.shape[0] for im in part)
        row = np.ones((height, width * columns, 4), dtype=np.float32)
        for k, im in enumerate(part):
            row[: im.shape[0], k * width : k * width + im.shape[1]] = im
        rows.append(row)
    return np.concatenate(rows, axis=0)
