"""Runs that survive interruption: one directory per run, auto-resume, atomic checkpoints, signals.

Every ``fit``/``validate``/``test``/``predict`` of the CLI works in one shallow directory::

    <trainer.default_root_dir of the recipe, e.g. runs/quickstart_dense>/<run id>/
        config.yaml            the whole recipe as run
        checkpoints/last.ckpt  written at the end of every epoch (and on SIGTERM), atomically
        checkpoints/<best>     the monitored checkpoints
        metrics.csv            the CSV log (appended to on resume)
        wandb/                 W&B files of the same run id (offline runs sync later)
        hpc_ckpt_N.ckpt        Lightning's SLURM requeue checkpoints
        run.lock               while a fit runs: its host and process (a second fit of the run refuses)

The run id is ``--run_id`` when given, else the SLURM job id (``<job>_<array task>`` in an array), else a new
time stamp; every DDP rank agrees on it (the launching process passes it to the ranks it starts through
``EVT_RUN_ID``). ``fit`` with ``--resume auto`` (the default) continues from the newest intact of ``last.ckpt``
and the HPC checkpoints in the run directory (a truncated one is passed over, saying so), so re-running a killed
command with the same run id, or a requeued SLURM job, picks up where it stopped, in the same W&B run and CSV
file (rows logged after the restored step are dropped first). The run directory must be writable before anything
starts; the ``.part`` files of writes a kill interrupted are removed.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import os
import signal
import socket
import threading
import time
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_modules.lightning_private import collect_rng_states, set_rng_states

log = logging.getLogger(__name__)

RUN_ID_ENV = "EVT_RUN_ID"
#: Exit status of a run stopped by SIGTERM after saving: 128 + 15, what a shell reports for a killed job.
SIGTERM_EXIT = 128 + signal.SIGTERM


def slurm_run_id() -> str | None:
    """The SLURM job id, stable across requeues; ``<array job>_<task>`` for an array task."""
    if "SLURM_ARRAY_JOB_ID" in os.environ and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


_new_ids = itertools.count()


def new_run_id() -> str:
    """A time stamp, the process id and a count of the ids this process made before: two runs started by one
    process within the same second (the demo's two fits) get different directories, never each other's
    checkpoints."""
    return time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}-{next(_new_ids)}"


def resolve_run_id(explicit: str | None) -> str:
    """``explicit``, else the id the launching rank passed down, else the SLURM job id, else a new one."""
    return explicit or os.environ.get(RUN_ID_ENV) or slurm_run_id() or new_run_id()


@dataclass(frozen=True)
class RunDirectory:
    root: Path
    run_id: str

    @property
    def path(self) -> Path:
        return self.root / self.run_id

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def resume_checkpoint(self) -> Path | None:
        """The checkpoint a re-run continues from, or None for a new run: the newest intact one of
        ``checkpoints/last*.ckpt`` and Lightning's ``hpc_ckpt_N.ckpt`` (by time written, whatever its name);
        when none of those is intact (a truncated file), the newest intact checkpoint of the run, saying so."""
        last = _newest_first([*self.checkpoints.glob("last*.ckpt"), *self.path.glob("hpc_ckpt_*.ckpt")])
        whole = [p for p in last if intact(p)]
        if whole:
            return whole[0]
        others = [p for p in _newest_first(self.checkpoints.glob("*.ckpt")) if p not in last and intact(p)]
        if last and others:  # every last checkpoint is broken
            log.warning("%s cannot be read (truncated?): resuming from %s, the newest intact checkpoint of the run",
                        last[0], others[0])  # fmt: skip
            return others[0]
        if last:
            raise RuntimeError(
                f"{last[0]} cannot be read (truncated?) and the run holds no other checkpoint: remove "
                f"{self.checkpoints} to start the run afresh, or give --ckpt_path"
            )
        return None

    def remove_stale_parts(self) -> list[Path]:
        """Delete the ``.part`` files of checkpoint writes whose process is gone (killed mid-write)."""
        removed = []
        for part in [*self.checkpoints.glob(".*.part"), *self.path.glob(".*.part")]:
            pid = part.name.rsplit(".", 2)[-2]
            if not (pid.isdigit() and pid_alive(int(pid))):
                part.unlink(missing_ok=True)
                removed.append(part)
        return removed

    def check_writable(self) -> None:
        """Create the run's folders and write a probe file, so an unwritable place stops the run at once."""
        probe = self.checkpoints / f".write_test.{os.getpid()}"
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise PermissionError(
                f"cannot write the run directory {self.path} ({err.strerror or err}): set "
                "trainer.default_root_dir to a folder you can write"
            ) from None


def _newest_first(paths: Iterable[Path]) -> list[Path]:
    return sorted((p for p in paths if p.is_file()), key=lambda p: p.stat().st_mtime_ns, reverse=True)


def intact(path: Path) -> bool:
    """Whether a checkpoint file is whole: ``torch.save`` writes a zip archive, whose directory is at its end."""
    return zipfile.is_zipfile(path)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """One fit per run directory at a time: ``run.lock`` names its owner (host, process, SLURM job), and a thread
    refreshes it every ``beat`` seconds. A second fit of the run refuses to start while the owner lives; a lock
    whose owner is gone (its process dead on this host, not refreshed for ``stale`` seconds, or the same SLURM job
    before a requeue) is taken over."""

    NAME = "run.lock"

    def __init__(self, run_path: Path, beat: float = 15.0, stale: float = 90.0):
        self.path = run_path / self.NAME
        self.beat, self.stale = beat, stale
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _owner(self) -> dict[str, Any] | None:
        try:
            owner = json.loads(self.path.read_text())
            age = time.time() - self.path.stat().st_mtime
        except (OSError, ValueError):
            return None
        pid, job = int(owner.get("pid") or 0), os.environ.get("SLURM_JOB_ID")
        gone = (
            pid <= 0
            or (owner.get("host") == socket.gethostname() and not pid_alive(pid))
            or age > self.stale
            or (job is not None and owner.get("job") == job)  # this job before SLURM requeued it
        )
        return None if gone else owner

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner()
                if owner is not None:
                    raise RuntimeError(
                        f"run {self.path.parent} is being trained by process {owner.get('pid')} on "
                        f"{owner.get('host')} ({self.path}): wait for it, stop it, or give another --run_id"
                    ) from None
                self.path.unlink(missing_ok=True)  # its owner is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._thread = threading.Thread(target=self._refresh, daemon=True, name="run-lock")
            self._thread.start()
            return
        raise RuntimeError(f"could not take {self.path}: another fit took it at the same time")

    def _refresh(self) -> None:
        while not self._stop.wait(self.beat):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same directory, then renames it into place: a process
    killed mid-write leaves the previous checkpoint intact, never a truncated one."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class LastCheckpoint(ModelCheckpoint):
    """Owns ``last.ckpt``: written at the end of every training epoch (or every ``every_n_train_steps``), whatever
    the monitored metric does, so a killed run loses at most one epoch. Monitored checkpoints keep the best."""

    def __init__(self, dirpath: str | Path, every_n_train_steps: int | None = None):
        super().__init__(
            dirpath=dirpath,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=every_n_train_steps,
            every_n_epochs=None if every_n_train_steps else 1,
            save_on_train_epoch_end=True,
            enable_version_counter=False,  # always last.ckpt, never last-v1.ckpt beside a stale one
        )

    def _save_last(self, trainer: L.Trainer) -> None:
        # ModelCheckpoint writes last.ckpt only beside a top-k checkpoint; here it is the only thing written.
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._every_n_train_steps and trainer.global_step % self._every_n_train_steps == 0:
            self._save_last(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._every_n_train_steps:
            self._save_last(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass


class AppendingExperimentWriter(ExperimentWriter):
    """CSV writer that keeps an existing ``metrics.csv`` (Lightning's deletes it) and its columns."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])

    def drop_rows_from(self, step: int) -> int:
        """Remove rows logged at ``step`` or later (the lost part of an interrupted run); returns how many."""
        if not self._fs.isfile(self.metrics_file_path):
            return 0
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            rows = list(csv.DictReader(f))
        kept = [r for r in rows if not r.get("step") or int(float(r["step"])) < step]
        if len(kept) < len(rows):
            with self._fs.open(self.metrics_file_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)
        return len(rows) - len(kept)


class RunCSVLogger(CSVLogger):
    """CSV log written straight into the run directory (no name/version sub-folders) and appended to when the
    run resumes."""

    def __init__(self, save_dir: str = "runs", flush_logs_every_n_steps: int = 100):
        super().__init__(save_dir, name="", version="", flush_logs_every_n_steps=flush_logs_every_n_steps)

    @property
    def log_dir(self) -> str:
        return self.root_dir

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment


class RunState(L.Callback):
    """What a run needs to continue exactly where it stopped.

    - The random number generators (torch, numpy, python) travel in every checkpoint and are restored on resume,
      so a resumed run draws what the uninterrupted run would have drawn.
    - On SIGTERM (what schedulers send before a kill) every rank stops at the next batch, ``last.ckpt`` is
      written, and the CLI exits with status 143 instead of Lightning's 0, so a scheduler sees an interrupted job.
      With ``save_on_sigterm=False`` the last epoch's ``last.ckpt`` is kept instead (the compress command's
      recoveries: a re-run resumes at that epoch boundary and gives the uninterrupted result exactly).
    - On resume, CSV rows logged after the restored step (the lost part) are dropped before new ones are added.
    """

    def __init__(self, checkpoint_dir: str | Path, save_on_sigterm: bool = True):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.save_on_sigterm = save_on_sigterm

    def state_dict(self) -> dict[str, Any]:
        states = collect_rng_states(include_cuda=torch.cuda.is_available())
        # Tensors and plain values only, so the checkpoint still loads with torch.load(weights_only=True).
        kind, keys, pos, has_gauss, gauss = states["numpy"]
        states["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                           "has_gauss": int(has_gauss), "gauss": float(gauss)}  # fmt: skip
        version, internal, python_gauss = states["python"]
        states["python"] = {"version": version, "state": list(internal), "gauss": python_gauss}
        return {"rng": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "rng" not in state_dict:
            return
        states = dict(state_dict["rng"])
        n = states["numpy"]
        states["numpy"] = (
            n["kind"],
            n["keys"].numpy().astype("uint32"),
            n["pos"],
            n["has_gauss"],
            n["gauss"],
        )
        p = states["python"]
        states["python"] = (p["version"], tuple(p["state"]), p["gauss"])
        set_rng_states(states)

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # A mid-epoch checkpoint (SIGTERM): the data module's next training loader starts after the batches the
        # epoch already trained on (this runs before the loaders are built).
        loop = checkpoint.get("loops", {}).get("fit_loop", {})
        batches = loop.get("epoch_loop.batch_progress", {})
        done = batches.get("current", {}).get("processed", 0)
        epoch = loop.get("epoch_progress", {}).get("current", {}).get("processed", 0)
        dm = trainer.datamodule
        if done > 0 and not batches.get("is_last_batch", True) and hasattr(dm, "resume_epoch_at"):
            dm.resume_epoch_at(epoch, done)
            rank_zero_info(f"resuming mid-epoch: epoch {epoch} goes on after its first {done} batches")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not on_fit_start: Lightning restores the step counter after that hook, before this one.
        if trainer.global_step > 0 and trainer.is_global_zero:
            for lg in trainer.loggers:
                if isinstance(lg, RunCSVLogger):
                    dropped = lg.experiment.drop_rows_from(trainer.global_step)
                    if dropped:
                        rank_zero_info(
                            f"resumed at step {trainer.global_step}: dropped {dropped} later CSV rows"
                        )

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            if not self.save_on_sigterm:
                rank_zero_info("SIGTERM: stopping; the last epoch's last.ckpt is kept, and a re-run resumes there")
                return
            path = self.checkpoint_dir / "last.ckpt"
            trainer.save_checkpoint(path)
            rank_zero_info(f"SIGTERM: saved {path}; re-run the same command (same --run_id) to resume")
