"""Callbacks shared by every task: bad-input report, progress on terminals and in batch logs, model summary,
end-of-fit summary, validation schedule."""

from __future__ import annotations

import datetime
import logging
import math
import resource
import sys
import time
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelSummary, RichProgressBar
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from datamodules.base import BadVideoError
from lightning_modules.lightning_private import SubprocessScriptLauncher

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
        started = launcher.procs if isinstance(launcher, SubprocessScriptLauncher) else []
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


class _Pass:
    """The clock of one pass over a loader (a training epoch, a validation): when it began, from which batch,
    and the last line's time and batch."""

    def __init__(self) -> None:
        self.first: int | None = None
        self.start = self.last_time = time.monotonic()
        self.last_batch = 0

    def begin(self, batch_idx: int) -> None:
        if self.first is None:
            self.first = self.last_batch = batch_idx
            self.start = self.last_time = time.monotonic()

    def lap(self, done: int) -> tuple[float, float]:
        """(seconds per batch since the last line, batches per second over this pass so far)."""
        now = time.monotonic()
        per_batch = (now - self.last_time) / max(done - self.last_batch, 1)
        rate = (done - (self.first or 0)) / max(now - self.start, 1e-9)
        self.last_time, self.last_batch = now, done
        return per_batch, rate


class ProgressReport(RichProgressBar):
    """Rich's progress bar on a terminal; where stdout is not one (a SLURM job's log, ``> train.log``), plain lines
    that a log keeps, in the form mmengine's logger made familiar::

        Epoch(train) [3/20][ 200/1250]  eta: 1:02:03  time: 0.312  it/s: 3.21  lr: 1.0000e-05  train/loss: 1.2345  max_mem: 12034 MiB

    one every ``every_n_steps`` batches or ``every_seconds`` seconds, whichever comes first, and one at the end
    of each epoch; a validation, test or predict pass writes its own lines and ends with its logged metrics. ``eta``
    is the time left for the training batches of the whole fit at the current epoch's pace; ``time`` the seconds
    per batch since the last line, data loading included; ``max_mem`` the peak GPU memory allocated on this
    process's device (on a CPU run: the process's peak resident memory). ``plain`` forces one form (None: plain
    when stdout is not a terminal). Lightning's version number (``v_num``) is not shown in either form.
    """

    def __init__(
        self,
        refresh_rate: int = 1,
        leave: bool = False,
        plain: bool | None = None,
        every_n_steps: int = 50,
        every_seconds: float = 120.0,
        console_kwargs: dict[str, Any] | None = None,
    ):
        if every_n_steps < 1 or every_seconds <= 0:
            raise ValueError(f"every_n_steps must be >= 1 and every_seconds > 0, got {every_n_steps}, {every_seconds}")
        super().__init__(refresh_rate=refresh_rate, leave=leave, console_kwargs=console_kwargs)
        self.plain, self.every_n_steps, self.every_seconds = plain, every_n_steps, every_seconds
        self._writes = False
        # Training and evaluation keep their own clocks: a validation inside an epoch must not reset the epoch's
        self._train, self._eval = _Pass(), _Pass()
        self._lr: float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        plain = self.plain if self.plain is not None else not sys.stdout.isatty()
        self._writes = plain and trainer.is_global_zero
        if plain:
            self.disable()  # the Rich bar draws nothing; this callback's own hooks write the lines

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version (a W&B id and a CSV folder joined): no use to a reader
        return metrics

    # ------------------------------------------------------------------------------------------ plain lines

    @staticmethod
    def _clock(seconds: float) -> str:
        return str(datetime.timedelta(seconds=round(seconds))) if math.isfinite(seconds) else "?"

    @staticmethod
    def _memory(pl_module: L.LightningModule) -> str:
        device = pl_module.device
        if device.type == "cuda":
            return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
        return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (peak RSS)"

    @staticmethod
    def _value(value: Any) -> str:
        value = float(value.item() if isinstance(value, torch.Tensor) else value)
        if value.is_integer() and abs(value) < 1e9:
            return str(int(value))  # counts (samples, skipped videos)
        return f"{value:.4e}" if value != 0 and abs(value) < 1e-3 else f"{value:.4f}"

    def _due(self, timing: _Pass, done: int, total: float) -> bool:
        return (
            done % self.every_n_steps == 0 or done == total
            or time.monotonic() - timing.last_time >= self.every_seconds
        )  # fmt: skip

    @staticmethod
    def _counter(done: int, total: float) -> str:
        if not math.isfinite(total):
            return f"[{done}]"
        width = len(str(int(total)))
        return f"[{done:>{width}}/{int(total)}]"

    def _write(self, line: str) -> None:
        print(line, flush=True)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._train = _Pass()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._train.begin(batch_idx)  # a run resumed mid-epoch starts after batch 0
        # the lr this batch trains with (an epoch-wise schedule steps before on_train_batch_end of the last batch)
        self._lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        done, total = batch_idx + 1, self.total_train_batches
        if not self._writes or not self._due(self._train, done, total):
            return
        per_batch, rate = self._train.lap(done)
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        left = (total - done) + (epochs - trainer.current_epoch - 1) * total if epochs else math.inf
        if trainer.max_steps > 0:
            left = min(left, (trainer.max_steps - trainer.global_step) * trainer.accumulate_grad_batches)
        eta = left / rate if math.isfinite(left) else math.inf
        lr = self._lr
        fields = [
            f"Epoch(train) [{trainer.current_epoch + 1}/{epochs or '?'}]{self._counter(done, total)}",
            f"eta: {self._clock(eta)}",
            f"time: {per_batch:.3f}",
            f"it/s: {rate:.2f}",
            *([f"lr: {lr:.4e}"] if lr is not None else []),
            *(f"{k}: {self._value(v)}" for k, v in self.get_metrics(trainer, pl_module).items()),
            f"max_mem: {self._memory(pl_module)}",
        ]
        self._write("  ".join(fields))

    def _eval_start(self, trainer: L.Trainer) -> None:
        self._eval = _Pass()
        self._eval.begin(0)

    def _eval_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, kind: str, total: float,
                        batch_idx: int) -> None:  # fmt: skip
        done = batch_idx + 1
        if not self._writes or trainer.sanity_checking or not self._due(self._eval, done, total):
            return
        per_batch, rate = self._eval.lap(done)
        eta = (total - done) / rate if math.isfinite(total) else math.inf
        self._write(
            f"{kind}{self._counter(done, total)}  eta: {self._clock(eta)}  time: {per_batch:.3f}  it/s: {rate:.2f}  "
            f"max_mem: {self._memory(pl_module)}"
        )

    def _eval_end(self, trainer: L.Trainer, kind: str, prefix: str) -> None:
        if not self._writes or trainer.sanity_checking:
            return
        metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}
        took = self._clock(time.monotonic() - self._eval.start)
        values = [f"{k}: {self._value(v)}" for k, v in sorted(metrics.items())]
        self._write("  ".join([f"{kind.strip()} done in {took}", *values]))

    def _eval_kind(self, trainer: L.Trainer) -> str:
        if trainer.state.fn == "fit":
            epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
            return f"Epoch(val) [{trainer.current_epoch + 1}/{epochs}]"
        return "Validate "

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_start(trainer, pl_module)
        self._eval_start(trainer)

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        total = trainer.num_val_batches[dataloader_idx] if not trainer.sanity_checking else 0
        self._eval_batch_end(trainer, pl_module, self._eval_kind(trainer), total, batch_idx)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._eval_end(trainer, self._eval_kind(trainer), "val/")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_test_start(trainer, pl_module)
        self._eval_start(trainer)

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._eval_batch_end(trainer, pl_module, "Test ", trainer.num_test_batches[dataloader_idx], batch_idx)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_test_end(trainer, pl_module)
        self._eval_end(trainer, "Test", "test/")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_predict_start(trainer, pl_module)
        self._eval_start(trainer)

    def on_predict_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._eval_batch_end(trainer, pl_module, "Predict ", trainer.num_predict_batches[dataloader_idx], batch_idx)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_predict_end(trainer, pl_module)
        self._eval_end(trainer, "Predict", "predict/")


class RunModelSummary(ModelSummary):
    """Lightning's model summary (each top-level module's type, parameters and mode; the parameter totals) without
    its FLOPs column and total: Lightning counts them only for a model with an ``example_input_array`` and
    prints 0 otherwise. The tasks report their counted multiply-accumulates per clip in validation instead
    (``val/gmacs``; ``compress`` and the benchmarks count them with ``models.flops.count_macs``)."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(header_style="bold")
        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        for name, _ in columns:
            table.add_column(name or " ", justify="right" if name.startswith("Params") else "left")
        for row in zip(*(values for _, values in columns)):
            table.add_row(*row)
        console = Console(file=sys.stdout)
        console.print(table)
        console.print(
            f"Trainable params: {trainable_parameters:,}  Non-trainable params: "
            f"{total_parameters - trainable_parameters:,}  Total params: {total_parameters:,}  "
            f"Size: {model_size:.1f} MB  Modules in train mode: {total_training_modes['train']}, in eval mode: "
            f"{total_training_modes['eval']}",
            soft_wrap=True,
        )
