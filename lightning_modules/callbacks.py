"""Callbacks shared by every task: bad-input report, end-of-fit summary."""

from __future__ import annotations

import logging
import time

import lightning as L
import torch.distributed as dist
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from datamodules.base import BadVideoError

log = logging.getLogger(__name__)


class BadVideoReport(L.Callback):
    """Counts, per stage and epoch, the samples skipped as bad videos: each skipped sample once over all DDP ranks
    (padding repeats included once), logged as ``<stage>/skipped_videos`` with the reasons printed; the sanity
    check is counted apart and not logged. When every sample of a split was skipped the run stops with an error
    saying so, instead of failing later on a metric that was never computed.

    A run that fails (e.g. on a bad video under ``bad_video: error``) stops every DDP rank: the process that
    started the others (``strategy: ddp``) kills them before it exits, instead of leaving them blocked in a
    collective until its timeout (30 minutes; gloo notices the closed connection, NCCL does not). A failing
    rank it started makes Lightning's launcher kill the rest."""

    _SPLIT = {"train": "training", "val": "validation", "test": "test", "predict": "predict"}

    @staticmethod
    def _eval_stage(trainer: L.Trainer) -> str:
        return "sanity" if trainer.sanity_checking else "val"

    def _start(self, trainer: L.Trainer, stage: str) -> None:
        if hasattr(trainer.datamodule, "start_epoch"):
            trainer.datamodule.start_epoch(stage)

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "epoch_skips"):
            return
        skips, samples = dm.epoch_skips(stage), dm.epoch_samples(stage)
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered: list = [None] * trainer.world_size
            dist.all_gather_object(gathered, (skips, samples))
            skips = {i: s for rank_skips, _ in gathered for i, s in rank_skips.items()}
            samples = sum(n for _, n in gathered)
        left_out = dm.setup_skips(stage) if hasattr(dm, "setup_skips") else {}
        if stage in ("train", "val", "test"):
            count = len(skips) + sum(left_out.values())
            pl_module.log(f"{stage}/skipped_videos", float(count), rank_zero_only=True)
        if skips:
            rank_zero_info(f"[{stage}] bad input policy '{dm.bad_video}': {dm.skip_summary(skips)}")
        if left_out and stage != "sanity":
            kinds = "; ".join(f"{n} x {kind}" for kind, n in left_out.most_common())
            rank_zero_info(f"[{stage}] left out at set-up (bad_video: skip; in {stage}/skipped_videos): {kinds}")
        if skips and samples == 0 and stage != "sanity":
            files = sorted({path for path, _ in skips.values()})
            raise BadVideoError(
                f"every {self._SPLIT[stage]} video was skipped as bad ({dm.skip_summary(skips)}; first: "
                f"{', '.join(files[:3])}): nothing is left to {'train on' if stage == 'train' else 'evaluate'}. "
                "Fix or replace the files, or point the data module at the right folder and lists"
            )

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            return  # every rank stops by itself (and saves), or Lightning ends the ranks it started
        launcher = trainer.strategy.launcher
        started = launcher.procs if isinstance(launcher, _SubprocessScriptLauncher) else []
        running = [p for p in started if p.poll() is None]
        if running:
            log.error(
                "run failed: stopping the DDP ranks this process started (pids %s)", [p.pid for p in running]
            )
        for p in running:
            p.kill()  # SIGKILL, as Lightning's launcher does: SIGTERM does not end a rank in a collective
        for p in running:
            p.wait(timeout=30)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        if getattr(dm, "skip_counts", None):
            rank_zero_info(f"dropped at setup under bad_video '{dm.bad_video}': {dict(dm.skip_counts)}")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, "train")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "train")

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, self._eval_stage(trainer))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, self._eval_stage(trainer))

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, "test")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "test")

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, "predict")

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "predict")


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


class ValidationSchedule(L.Callback):
    """Validate at (1-based) epoch ``first_epoch`` and every ``every`` epochs after it, and at the last epoch;
    no validation before (the trainer's ``check_val_every_n_epoch`` is set per epoch).

    The papers' schedules: EVAD (PySlowFast's ``TRAIN.EVAL_PERIOD`` 5 and ``TEST_AFTER_EPOCH`` 5 with 0-based
    epochs) validates at epochs 5, 6, ..., 12; the block-drop recoveries every 5 epochs from epoch 10.
    """

    def __init__(self, first_epoch: int = 1, every: int = 1):
        if first_epoch < 1 or every < 1:
            raise ValueError(f"first_epoch and every must be >= 1, got {first_epoch}, {every}")
        self.first_epoch, self.every = first_epoch, every

    def validates(self, epoch: int, max_epochs: int | None) -> bool:
        """Whether the (1-based) ``epoch`` is validated."""
        if epoch == max_epochs:
            return True
        return epoch >= self.first_epoch and (epoch - self.first_epoch) % self.every == 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        # Lightning validates when (epoch) % check_val_every_n_epoch == 0: 1 validates, a larger number does not
        trainer.check_val_every_n_epoch = 1 if self.validates(epoch, trainer.max_epochs) else epoch + 1
