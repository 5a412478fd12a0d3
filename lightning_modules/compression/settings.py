"""The block-drop settings: the ``compress`` section of a recipe, checked when they are read."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from lightning_modules.compression.scoring import HIGHER_IS_BETTER
from lightning_modules.compression.task import Alignment
from lightning_modules.runs import resolve_run_id
from models.blockdrop import Recovery
from models.lora import LoraInit


@dataclass
class BlockDrop:
    """The block-drop settings (the recipe's ``compress`` section).

    ``checkpoint``: the trained, uncompressed task (a Lightning checkpoint of the recipe's model).
    Selection: ``metric`` (``map``: ``score_key`` on the scoring subset, the paper's default; ``train_loss``;
    ``feature_mse``; ``random``, seeded) or a fixed ``blocks`` order (original indices; overrides ``metric``).
    The scoring subset is the recipe's data with ``score_data`` applied to ``data.init_args`` (for TAD e.g.
    ``{eval_subset: training, eval_max_videos: 50}``); ``score_batches`` caps the batches of ``train_loss`` /
    ``feature_mse``. ``one_shot`` drops ``max_blocks`` blocks at once (the best single-drop scores) with one
    recovery. Stopping: ``max_blocks`` dropped, MACs at or below ``macs_target`` x the uncompressed model's,
    latency at or below ``latency_target`` x its latency (needs ``latency_repeats``), or
    the validation ``score_key`` more than ``score_tolerance`` below the uncompressed model's (that round is
    rejected and the previous one kept).
    Recovery: ``recovery`` (``lora``, ``full``, ``none``), ``head_trainable``, ``lora_rank`` (None: dim / 4),
    ``lora_init`` (``official``: A ~ N(0, 1/sqrt(rank)) as the block-drop code; ``peft``: peft's default),
    ``epochs``, ``lr`` (head) and ``backbone_lr`` (LoRA, norms, patch embedding), ``warmup_epochs`` and
    ``schedule_epochs`` (the cosine's length, which may exceed ``epochs``; each None: the recipe's), for the first
    round ``first_round_epochs`` / ``first_round_schedule_epochs`` when set (the official ActivityNet script
    trains round 1 for 8 epochs of a cosine over 10, later rounds 15 over 15); validation at epoch
    ``eval_first_epoch`` and every ``eval_every`` epochs after it, and at the last (the official loop: every 5
    from 10); ``keep`` the recovery's ``last`` epoch (the default: nothing is chosen on the evaluation set) or its
    ``best`` validated epoch by ``score_key`` (what the official loop keeps, scoring the test set), the
    ``alignment`` losses against the ``teacher`` (``original``: the uncompressed model; ``previous``: the
    previous round's). ``latency_repeats`` > 0 also times a forward of one input (min over repeats).
    ``relu_stage`` (the supplement's sparse model): after the rounds, the kept model's MLPs get ReLU for GELU and
    recover as a round does (``relu_epochs``, None: ``epochs``); the share of MLP activations that are exactly
    zero is measured on ``sparsity_batches`` evaluation inputs (one window or clip of each batch) before and after.
    ``out_dir`` may hold ``{run_id}``: the W&B sweep trial's run id (``WANDB_RUN_ID``), else the SLURM job id,
    else a new id (a sweep's trials then never share, nor resume, each other's rounds).
    """

    checkpoint: str
    out_dir: str = "runs/blockdrop"
    metric: Literal["map", "train_loss", "feature_mse", "random"] = "map"
    blocks: list[int] | None = None
    max_blocks: int = 3
    one_shot: bool = False
    macs_target: float | None = None
    latency_target: float | None = None
    score_tolerance: float | None = None
    score_key: str = "val/average_mAP"
    score_data: dict[str, Any] = field(default_factory=dict)
    score_batches: int | None = None
    recovery: Recovery = "lora"
    head_trainable: bool = True
    lora_rank: int | None = None
    lora_init: LoraInit = "official"
    epochs: int = 60
    first_round_epochs: int | None = None
    first_round_schedule_epochs: float | None = None
    eval_first_epoch: int = 10
    eval_every: int = 5
    keep: Literal["last", "best"] = "last"
    lr: float | None = None
    backbone_lr: float | None = None
    warmup_epochs: float | None = None
    schedule_epochs: float | None = None
    alignment: Alignment = field(default_factory=Alignment)
    teacher: Literal["original", "previous"] = "original"
    seed: int = 0
    latency_repeats: int = 0
    relu_stage: bool = False
    relu_epochs: int | None = None
    sparsity_batches: int = 4

    def __post_init__(self) -> None:
        if self.max_blocks < 1:
            raise ValueError(f"compress.max_blocks must be >= 1, got {self.max_blocks}")
        if self.metric not in (*HIGHER_IS_BETTER, "random"):
            raise ValueError(
                f"compress.metric must be map, train_loss, feature_mse or random, got {self.metric!r}"
            )
        if self.epochs < 0 or (self.first_round_epochs is not None and self.first_round_epochs < 0):
            raise ValueError(
                f"compress.epochs and first_round_epochs must be >= 0, got {self.epochs}, {self.first_round_epochs}"
            )
        if self.eval_first_epoch < 1 or self.eval_every < 1:
            raise ValueError(
                f"compress.eval_first_epoch and eval_every must be >= 1, got {self.eval_first_epoch}, {self.eval_every}"
            )
        if self.keep not in ("last", "best"):
            raise ValueError(f"compress.keep must be 'last' or 'best', got {self.keep!r}")
        if self.sparsity_batches < 1:
            raise ValueError(f"compress.sparsity_batches must be >= 1, got {self.sparsity_batches}")
        if self.latency_target is not None and self.latency_repeats < 1:
            raise ValueError(
                "compress.latency_target needs measured latencies: set compress.latency_repeats to 1 or more"
            )


def resolve_out_dir(out_dir: str) -> str:
    """``out_dir`` with ``{run_id}`` replaced: a W&B sweep trial's run id, else the SLURM job id, else a new id."""
    if "{run_id}" not in out_dir:
        return out_dir
    return out_dir.replace("{run_id}", os.environ.get("WANDB_RUN_ID") or resolve_run_id(None))
