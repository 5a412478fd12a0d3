"""HaltingVT halting maps: which tokens are still active, per joint layer and frame (the paper's Fig. 4).

They come out of ``predict`` with the ``HaltingMapWriter`` callback::

    python -m lightning_modules predict --config recipes/quickstart/synthetic_haltingvt.yaml \\
        --ckpt_path <checkpoint> --data.init_args.predict_videos='[videos/left_0150.mp4]' \\
        --trainer.callbacks+=lightning_modules.pictures.halting.HaltingMapWriter
"""

from __future__ import annotations

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
from torch import Tensor

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
