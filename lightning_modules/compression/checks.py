"""What the compress command checks before it builds anything: a task that can be compressed, one process, and
an output folder that belongs to the checkpoint given."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace

from lightning_modules.compression.report import write_json
from lightning_modules.compression.task import Alignment, Compressible


def task_class_of(model: Namespace) -> type:
    """The task class a recipe's ``model.class_path`` names."""
    module, _, name = model.class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def refuse_uncompressible(model: Namespace, alignment: Alignment) -> None:
    """A task that does not implement ``Compressible``, or alignment losses it cannot give, stop the command."""
    task_class = task_class_of(model)
    if not issubclass(task_class, Compressible):
        raise TypeError(
            f"{task_class.__name__} ({model.class_path}) cannot be compressed: block drop needs a task that "
            "implements lightning_modules.compression.task.Compressible (its block stack, batch loss, cost "
            "inputs and compressed layout); the temporal detector, the classifiers and HaltingVT do"
        )
    problem = task_class.alignment_problem(model.get("init_args") or {}, alignment)
    if problem:
        raise ValueError(f"compress.alignment: {problem}")


def refuse_several_processes(trainer: Namespace) -> None:
    """Compression is driven by one process: under DDP every rank would run every round (scores, records and
    files written once per rank). Refuse a launch with several ranks, or a recipe asking for several devices."""
    devices, nodes = trainer.get("devices", "auto"), trainer.get("num_nodes", 1) or 1
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if devices in ("auto", None, -1, "-1"):
        accelerator = str(trainer.get("accelerator") or "auto")
        devices = torch.cuda.device_count() if accelerator in ("auto", "gpu", "cuda") else 1
    many = (len(devices) if isinstance(devices, list | tuple) else int(devices)) > 1 or nodes > 1
    launched = max(int(os.environ.get(k, "1") or 1) for k in ("WORLD_SIZE", "SLURM_NTASKS")) > 1
    if many or launched:
        raise ValueError(
            "compress runs as one process (it drives the rounds; under DDP every rank would run all of them): pass "
            "--trainer.devices=1 --trainer.num_nodes=1 and start one task (SLURM: --ntasks=1, one GPU)"
        )


def checkpoint_digest(checkpoint: Path) -> str:
    """SHA-256 of a checkpoint file, read in chunks."""
    digest = hashlib.sha256()
    with checkpoint.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def recorded_source(out: Path) -> dict[str, Any] | None:
    """The checkpoint record of the compression in ``out`` (``source.json``), None when there is none."""
    path = out / "source.json"
    return json.loads(path.read_text()) if path.is_file() else None


def record_source(out: Path, checkpoint: Path) -> None:
    """``out/source.json`` names the checkpoint a compression started from (path and SHA-256): a re-run into the
    same folder with another checkpoint is refused, not answered with the other's rounds."""
    source: dict[str, Any] = {"checkpoint": str(checkpoint), "sha256": checkpoint_digest(checkpoint)}
    path = out / "source.json"
    recorded = recorded_source(out)
    if recorded is not None:
        if recorded.get("sha256") != source["sha256"]:
            raise FileExistsError(
                f"{out} holds the compression of {recorded.get('checkpoint')} (SHA-256 "
                f"{str(recorded.get('sha256'))[:12]}...), not of {checkpoint} ({source['sha256'][:12]}...): give "
                f"another --compress.out_dir, or remove {out} to compress this checkpoint there"
            )
        return
    if (out / "rounds.json").is_file():
        raise FileExistsError(
            f"{out} holds rounds without a record of the checkpoint they compress (source.json, written since this "
            f"folder was made): they may not be rounds of {checkpoint}. Remove {out} to compress it there, or give "
            "another --compress.out_dir"
        )
    write_json(path, source)
