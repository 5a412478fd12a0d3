"""What every task shares: optimiser with decay/no-decay groups, warmup + cosine schedule, pretrained loading.

What only some tasks do lives with its capability: block drop in ``lightning_modules.compression``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from models.checkpoint import load_pretrained

#: Parameters that never get weight decay besides biases and norms (1-D tensors).
NO_DECAY_NAMES = ("pos_embed", "cls_token", "time_embed", "mask_token", "q_bias", "v_bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or any(n in name for n in NO_DECAY_NAMES) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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


class VideoTask(L.LightningModule):
    """Base LightningModule: subclasses build their model in ``__init__`` and implement the steps.

    Schedule: linear warmup over ``warmup_epochs`` from ``warmup_start_factor`` x lr, then a cosine down to
    ``min_lr_ratio`` x lr reaching its end after ``schedule_epochs`` (default: ``trainer.max_epochs``), updated
    every optimiser step (``lr_interval: step``) or once per epoch (``epoch``, as mmengine's ``by_epoch``
    schedulers: HaltingVT's official LinearLR(0.1, 5 epochs) + CosineAnnealingLR(T_max=20, begin=5) is
    ``warmup_epochs: 5, warmup_start_factor: 0.1, schedule_epochs: 25, min_lr_ratio: 0, lr_interval: epoch``).
    ``lr_schedule: step`` replaces the cosine by a step decay: x ``lr_gamma`` at each of ``lr_milestones``
    (epochs, counted from the start of training), as EVAD's ``warmup_epochs: 2, lr_milestones: [5, 8]``.
    """

    def __init__(
        self,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        optimizer: Literal["adamw", "adam"] = "adamw",
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 1.0,
        warmup_start_factor: float = 0.01,
        min_lr_ratio: float = 0.01,
        schedule_epochs: float | None = None,
        lr_interval: Literal["step", "epoch"] = "step",
        lr_schedule: Literal["cosine", "step"] = "cosine",
        lr_milestones: Sequence[float] = (),
        lr_gamma: float = 0.1,
    ):
        super().__init__()
        if lr_interval not in ("step", "epoch"):
            raise ValueError(f"lr_interval must be 'step' or 'epoch', got {lr_interval!r}")
        if lr_schedule not in ("cosine", "step"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'step', got {lr_schedule!r}")
        if lr_schedule == "step" and list(lr_milestones) != sorted(lr_milestones):
            raise ValueError(f"lr_milestones must be ascending epochs, got {list(lr_milestones)}")
        self.lr = lr
        self.weight_decay = weight_decay
        self.optimizer_name = optimizer
        self.betas = betas
        self.warmup_epochs = warmup_epochs
        self.warmup_start_factor = warmup_start_factor
        self.min_lr_ratio = min_lr_ratio
        self.schedule_epochs = schedule_epochs
        self.lr_interval = lr_interval
        self.lr_schedule = lr_schedule
        self.lr_milestones = tuple(float(m) for m in lr_milestones)
        self.lr_gamma = lr_gamma

    def load_backbone(self, backbone: nn.Module, pretrained: str | None) -> None:
        """Load ``pretrained`` into ``backbone`` and report what was loaded. Tasks load in their constructor,
        before any trainer exists, so the report goes through Lightning's rank-zero logger, not ``self.print``."""
        if pretrained:
            report = load_pretrained(backbone, pretrained)
            rank_zero_info(report.summary())

    def empty_batch_loss(self) -> torch.Tensor:
        """Loss of a batch whose clips were all skipped bad videos: zero, but touching every parameter, so this
        rank still takes part in the DDP gradient all-reduce (returning None would leave the other ranks waiting).
        """
        return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0

    def optimizer_groups(self) -> list[dict]:
        """Parameter groups of the optimiser; tasks with several learning rates give each group its ``lr``."""
        return param_groups(self, self.weight_decay)

    def configure_optimizers(self):
        groups = self.optimizer_groups()
        cls = torch.optim.AdamW if self.optimizer_name == "adamw" else torch.optim.Adam
        opt = cls(groups, lr=self.lr, betas=self.betas)
        epochs = max(self.trainer.max_epochs or 1, 1)
        if self.lr_interval == "epoch":
            warmup, total = self.warmup_epochs, self.schedule_epochs or epochs
            milestones = self.lr_milestones
        else:
            steps = max(int(self.trainer.estimated_stepping_batches), 1)
            warmup = int(steps * self.warmup_epochs / epochs)
            # The cosine may span more epochs than are trained (AdaTAD on THUMOS: a 100-epoch cosine stopped at 60).
            total = int(steps * self.schedule_epochs / epochs) if self.schedule_epochs else steps
            milestones = tuple(int(steps * m / epochs) for m in self.lr_milestones)
        if self.lr_schedule == "step":
            start, gamma = self.warmup_start_factor, self.lr_gamma
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: warmup_step_decay(s, warmup, milestones, start, gamma)
            )
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: warmup_cosine(s, warmup, total, self.warmup_start_factor, self.min_lr_ratio)
            )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": self.lr_interval}}
