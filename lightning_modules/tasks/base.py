"""What every task shares: optimiser with decay/no-decay groups, warmup + cosine schedule, pretrained loading.

What only some tasks do lives with its capability: block drop in ``lightning_modules.compression``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from models.checkpoint import LoadReport

#: Parameters that never get weight decay besides biases and norms (1-D tensors).
NO_DECAY_NAMES = ("pos_embed", "cls_token", "time_embed", "mask_token", "q_bias", "v_bias")


def named_param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """The trainable parameters of ``named`` in two groups: with ``weight_decay``, and without it (1-D tensors and
    ``NO_DECAY_NAMES``)."""
    decay, no_decay = [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or any(n in name for n in NO_DECAY_NAMES) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    return named_param_groups(model.named_parameters(), weight_decay)


def warmup_cosine(
    step: int, warmup_steps: int, total_steps: int, start_factor: float, min_ratio: float
) -> float:
    """LR multiplier: linear from ``start_factor`` to 1 over the warmup, then cosine down to ``min_ratio``."""
    if step < warmup_steps:
        return start_factor + (1.0 - start_factor) * step / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_step_decay(
    step: float, warmup_steps: float, milestones: Sequence[float], start_factor: float, gamma: float
) -> float:
    """LR multiplier: linear from ``start_factor`` to 1 over the warmup, then ``gamma`` to the power of the number
    of ``milestones`` reached (PySlowFast's ``steps_with_relative_lrs``: EVAD's x0.1 at epoch 5, x0.01 at 8)."""
    if step < warmup_steps:
        return start_factor + (1.0 - start_factor) * step / warmup_steps
    return gamma ** sum(step >= m for m in milestones)


@dataclass(frozen=True)
class OptimizerSettings:
    """The optimiser: ``name`` (AdamW, or Adam with L2-free updates), the base ``lr``, ``weight_decay`` (never on
    biases, norms and ``NO_DECAY_NAMES``) and Adam's ``betas``."""

    name: Literal["adamw", "adam"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        if self.name not in ("adamw", "adam"):
            raise ValueError(f"optimizer.name must be 'adamw' or 'adam', got {self.name!r}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"optimizer.lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")


@dataclass(frozen=True)
class ScheduleSettings:
    """The learning-rate schedule: linear warmup over ``warmup_epochs`` from ``warmup_start_factor`` x lr, then

    - ``kind: cosine``: a cosine down to ``min_lr_ratio`` x lr reaching its end after ``epochs`` (default:
      ``trainer.max_epochs``; it may exceed them, as AdaTAD's 100-epoch cosine stopped at 60 on THUMOS);
    - ``kind: step``: x ``gamma`` at each of ``milestones`` (epochs from the start of training), as EVAD's
      ``warmup_epochs: 2, milestones: [5, 8]``;

    updated every optimiser step (``interval: step``) or once per epoch (``epoch``, as mmengine's ``by_epoch``
    schedulers: HaltingVT's official LinearLR(0.1, 5 epochs) + CosineAnnealingLR(T_max=20, begin=5) is
    ``warmup_epochs: 5, warmup_start_factor: 0.1, epochs: 25, min_lr_ratio: 0, interval: epoch``).
    """

    kind: Literal["cosine", "step"] = "cosine"
    warmup_epochs: float = 1.0
    warmup_start_factor: float = 0.01
    min_lr_ratio: float = 0.01
    epochs: float | None = None
    interval: Literal["step", "epoch"] = "step"
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.interval not in ("step", "epoch"):
            raise ValueError(f"schedule.interval must be 'step' or 'epoch', got {self.interval!r}")
        if self.kind not in ("cosine", "step"):
            raise ValueError(f"schedule.kind must be 'cosine' or 'step', got {self.kind!r}")
        milestones = tuple(float(m) for m in self.milestones)
        if self.kind == "step" and list(milestones) != sorted(milestones):
            raise ValueError(f"schedule.milestones must be ascending epochs, got {list(milestones)}")
        object.__setattr__(self, "milestones", milestones)


class VideoTask(L.LightningModule):
    """Base LightningModule: subclasses build their model in ``__init__`` and implement the steps.

    Every task takes its optimiser and learning-rate schedule as two typed settings (``optimizer``,
    ``schedule``); a recipe sets only what departs from the task's defaults, e.g.
    ``model.init_args.optimizer.lr: 3e-4``. The settings travel in checkpoints as plain dictionaries.
    """

    def __init__(
        self,
        optimizer: OptimizerSettings = OptimizerSettings(),
        schedule: ScheduleSettings = ScheduleSettings(),
    ):
        super().__init__()
        self.optimizer_settings = optimizer
        self.schedule_settings = schedule

    def load_pretrained(self, pretrained: str | None, trust_pickle: bool = False) -> None:
        """Every task's ``pretrained`` argument: a checkpoint of its backbone (any format ``models.checkpoint``
        reads), loaded by ``load_backbone`` once the model is built, then reported. Nothing in the file runs
        unless the task's ``trust_pickle`` says so (full unpickling: only for files you made or trust). Tasks
        load in their constructor, before any trainer exists, so the report goes through Lightning's rank-zero
        logger."""
        if pretrained:
            rank_zero_info(self.load_backbone(pretrained, trust_pickle=trust_pickle).summary())

    def load_backbone(self, path: str, trust_pickle: bool = False) -> LoadReport:
        """Load a backbone checkpoint into this task's model; each task says where its backbone is."""
        raise NotImplementedError(f"{type(self).__name__} does not say where to load a pretrained backbone")

    def empty_batch_loss(self) -> torch.Tensor:
        """Loss of a batch whose clips were all skipped bad videos: zero, but touching every parameter, so this
        rank still takes part in the DDP gradient all-reduce (returning None would leave the other ranks waiting).
        """
        return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0

    def optimizer_groups(self) -> list[dict]:
        """Parameter groups of the optimiser; tasks with several learning rates give each group its ``lr``."""
        return param_groups(self, self.optimizer_settings.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Plain values only, so checkpoints load with torch.load(weights_only=True).
        hparams = checkpoint.get("hyper_parameters")
        if hparams is not None:
            for key, value in hparams.items():
                if is_dataclass(value) and not isinstance(value, type):
                    hparams[key] = asdict(value)

    def configure_optimizers(self):
        o, s = self.optimizer_settings, self.schedule_settings
        cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
        opt = cls(self.optimizer_groups(), lr=o.lr, betas=o.betas)
        epochs = max(self.trainer.max_epochs or 1, 1)
        if s.interval == "epoch":
            warmup, total, milestones = s.warmup_epochs, s.epochs or epochs, s.milestones
        else:
            steps = max(int(self.trainer.estimated_stepping_batches), 1)
            warmup = int(steps * s.warmup_epochs / epochs)
            total = int(steps * s.epochs / epochs) if s.epochs else steps
            milestones = tuple(int(steps * m / epochs) for m in s.milestones)
        if s.kind == "step":
            schedule = partial(
                warmup_step_decay, warmup_steps=warmup, milestones=milestones, start_factor=s.warmup_start_factor,
                gamma=s.gamma,
            )  # fmt: skip
        else:
            schedule = partial(
                warmup_cosine, warmup_steps=warmup, total_steps=total, start_factor=s.warmup_start_factor,
                min_ratio=s.min_lr_ratio,
            )  # fmt: skip
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": s.interval}}
