"""Callbacks the tests add to real CLI runs (``--trainer.callbacks+=tests.helpers.KillAt``)."""

from __future__ import annotations

import json
import os
import signal

import lightning as L


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
