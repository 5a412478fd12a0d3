"""Callbacks the tests add to real CLI runs (``--trainer.callbacks+=tests.helpers.KillAt``), and the ports their
DDP runs meet at."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
from pathlib import Path

import lightning as L

_PORTS = itertools.count()


def reserved_port() -> int:
    """A free TCP port below the kernel's ephemeral range (32768 and up), from a band of 1000 ports of this
    pytest-xdist worker. A DDP run's rendezvous port found the usual way (bind port 0, close, bind again later)
    can meanwhile be handed to another process's outgoing connection; with two workers running DDP side by side
    that happened (EADDRINUSE). Ports outside the ephemeral range are never handed out that way."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    for _ in range(1000):
        port = 20000 + 1000 * (worker % 12) + next(_PORTS) % 1000
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port in this worker's band")


class KillAt(L.Callback):
    """Sends ``sig`` to the training process when the given optimiser step is about to start (rank 0), after
    writing the ids of its child processes (loader workers, fork server) to ``pids_file`` if given."""

    def __init__(self, step: int, sig: str = "SIGKILL", pids_file: str | None = None):
        self.step = step
        self.sig = sig
        self.pids_file = pids_file

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step != self.step or not trainer.is_global_zero:
            return
        if self.pids_file:
            import psutil

            children = [p.pid for p in psutil.Process().children(recursive=True)]
            with open(self.pids_file, "w") as f:
                json.dump(children, f)
        os.kill(os.getpid(), getattr(signal, self.sig))


class RankRecord(L.Callback):
    """Writes what one DDP rank saw and ended with to ``<out_dir>/rank<r>.pt``, for tests to compare across
    ranks and against a single process:

    - ``batches``: every training batch as the step received it (sample ids, labels, clips, static clips);
    - ``start_state``: the weights the first optimiser step started from, ``first_loss`` that step's loss on
      this rank and ``first_grad`` the flat gradient it applied (after DDP's all-reduce);
    - ``names``, ``start_params``, ``params``: the trainable parameters' names and flat vectors before the
      first step and at the end of training; ``max_rank_diff``: the largest difference of ``params`` from any
      other rank's (all-gathered here);
    - ``val_ids``: the sample ids of the last validation's batches on this rank (padding repeats included),
      and ``val``: its ``val/*`` figures as this rank holds them (the sanity check is left out of both).
    """

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.record: dict = {"batches": [], "val": {}, "val_ids": []}

    @staticmethod
    def _flat(pl_module: L.LightningModule, grad: bool = False):
        import torch

        params = [p for p in pl_module.parameters() if p.requires_grad]
        return torch.cat([(p.grad if grad else p).detach().flatten() for p in params]).cpu().clone()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int):
        keys = ("index", "label", "video", "static")
        self.record["batches"].append({k: batch[k].detach().cpu().clone() for k in keys if k in batch})
        if trainer.global_step == 0 and "start_state" not in self.record:
            state = pl_module.state_dict()
            self.record["start_state"] = {k: v.detach().cpu().clone() for k, v in state.items()}
            self.record["names"] = [n for n, p in pl_module.named_parameters() if p.requires_grad]
            self.record["start_params"] = self._flat(pl_module)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if trainer.global_step == 0:
            self.record["first_grad"] = self._flat(pl_module, grad=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        if trainer.global_step == 1 and "first_loss" not in self.record:
            self.record["first_loss"] = float(outputs["loss"])

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["val_ids"] = []

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx,
                                  dataloader_idx: int = 0) -> None:  # fmt: skip
        if not trainer.sanity_checking:
            self.record["val_ids"] += batch["index"].tolist()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            metrics = trainer.callback_metrics
            self.record["val"] = {k: float(v) for k, v in metrics.items() if k.startswith("val/")}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = self._flat(pl_module)
        gathered = pl_module.all_gather(params.to(pl_module.device)).reshape(trainer.world_size, -1).cpu()
        self.record["params"] = params
        self.record["max_rank_diff"] = float((gathered - params).abs().max())

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import torch

        os.makedirs(self.out_dir, exist_ok=True)
        self.record["world_size"] = trainer.world_size
        torch.save(self.record, os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))


class SlurmRankLog(L.Callback):
    """Appends what each SLURM task did to ``<out_dir>/rank-<SLURM_PROCID>.txt``, one line per event:
    ``start job=<SLURM_JOB_ID> restart=<SLURM_RESTART_COUNT> rank=<global rank> world=<world size> step=<the
    global step training started from>``, ``paused step=<s>`` and ``end step=<s>``.

    With ``pause_at_step``, every rank sleeps ``pause_timeout`` seconds before that optimiser step (unless it resumed
    there), handling signals meanwhile: a test signals the job while all ranks sleep here, where Lightning's requeue
    handler (a checkpoint and a barrier, run inside the signal handler) cannot meet a rank blocked in a gradient
    all-reduce, and the job is killed before it takes another step, so it resumes from the HPC checkpoint.
    """

    def __init__(self, out_dir: str, pause_at_step: int | None = None, pause_timeout: float = 120.0):
        self.out_dir = out_dir
        self.pause_at_step = pause_at_step
        self.pause_timeout = pause_timeout
        self.start_step = 0

    def _write(self, line: str) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"rank-{os.environ.get('SLURM_PROCID', 'none')}.txt"), "a") as f:
            f.write(line + "\n")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = trainer.global_step
        self._write(
            f"start job={os.environ.get('SLURM_JOB_ID')} restart={os.environ.get('SLURM_RESTART_COUNT', '0')} "
            f"rank={trainer.global_rank} world={trainer.world_size} step={trainer.global_step}"
        )

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step != self.pause_at_step or self.start_step >= trainer.global_step:
            return
        import time

        self._write(f"paused step={trainer.global_step}")
        deadline = time.monotonic() + self.pause_timeout
        while time.monotonic() < deadline:
            time.sleep(0.1)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(f"end step={trainer.global_step}")



class LoadedFrom(L.Callback):
    """Compares, as fitting starts (before any optimiser step), the task's backbone with the weight file it was
    built from (``tests.paper_files.assert_loaded``): ``compared`` counts the equal tensors, ``error`` holds the
    first difference."""

    def __init__(self, weights: str, backbone: str):
        self.weights = weights
        self.backbone = backbone
        self.compared = 0
        self.error: str | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from tests.paper_files import assert_loaded, file_tensors

        try:
            self.compared = assert_loaded(pl_module.state_dict(), file_tensors(self.weights), self.backbone)
        except AssertionError as failed:
            self.error = str(failed)


def touch(path: str) -> None:
    """Create the file ``path``: what ``Payload`` calls while it is unpickled."""
    Path(path).touch()


class Payload:
    """Pickles as a call of ``touch(marker)``: whatever loads it with full unpickling creates ``marker``, so a test
    sees whether a loader ran code from a file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return touch, (self.marker,)
