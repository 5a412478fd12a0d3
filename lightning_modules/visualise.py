"""Pictures: HaltingVT halting maps (which tokens are still active, per joint layer and frame) and
accuracy-vs-GFLOPs plots across runs.

Halting maps come out of ``predict`` with the ``HaltingMapWriter`` callback::

    python -m lightning_modules predict --config recipes/quickstart/synthetic_haltingvt.yaml \\
        --ckpt_path <checkpoint> --data.init_args.predict_videos='[videos/left_0150.mp4]' \\
        --trainer.callbacks+=lightning_modules.visualise.HaltingMapWriter

The accuracy-vs-GFLOPs plot reads the validation results the CSV logger wrote::

    python -m lightning_modules.visualise accuracy-vs-gflops runs/haltingvt_minik_* --out tradeoff.png
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import WandbLogger  # noqa: E402
from lightning.pytorch.utilities import rank_zero_info  # noqa: E402
from torch import Tensor  # noqa: E402

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
