"""Callbacks shared by every task: bad-input report, end-of-fit summary."""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info


class BadVideoReport(L.Callback):
    """Logs, at the end of every epoch, how many samples the data module skipped as bad videos and why."""

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "skip_counts"):
            return
        total = torch.tensor(float(sum(dm.skip_counts.values())), device=pl_module.device)
        total = trainer.strategy.reduce(total, reduce_op="sum")
        pl_module.log(f"{stage}/skipped_videos", total, rank_zero_only=True)
        if total > 0:
            rank_zero_info(f"[{stage}] bad input policy '{dm.bad_video}': {dm.skip_summary()} (this rank)")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._report(trainer, pl_module, "val")


class FitSummary(L.Callback):
    """Prints the final validation figures and the wall time when fit ends."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        minutes = (time.perf_counter() - self._start) / 60
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        figures = ", ".join(f"{k} = {v:.4f}" for k, v in sorted(metrics.items()))
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        rank_zero_info(
            f"fit finished in {minutes:.1f} min after {trainer.current_epoch} epochs; final {figures}"
            + (f"; best checkpoint {best}" if best else "")
        )
