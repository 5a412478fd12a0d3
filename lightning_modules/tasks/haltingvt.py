"""HaltingVT task: classification with token halting, ponder loss, optional distribution prior and motion loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.compression.task import Alignment
from lightning_modules.tasks.base import OptimizerSettings, ScheduleSettings
from lightning_modules.tasks.classification import VideoClassifier
from models.haltingvt import HaltingOutput, HaltingViT


def depth_prior(layers: int, mean: float, std: float) -> Tensor:
    """Target halting distribution over the joint layers: a Gaussian over depth, normalised to sum to 1."""
    depth = torch.arange(layers, dtype=torch.float64)
    target = torch.exp(-0.5 * ((depth - mean) / std) ** 2)
    return (target / target.sum()).float()


def prior_kl(halting: Tensor, prior: Tensor) -> Tensor:
    """A-ViT's distribution-prior loss: the per-layer halting scores (L,) normalised to sum 1 and clamped to
    [0.01, 0.99], then KL(prior || q) averaged over the L layers (A-ViT's ``KLDivLoss(reduction="batchmean")`` on
    an (L,) vector). Finite when every score is 0 (all tokens halted, or scores underflowing)."""
    q = (halting / halting.sum().clamp_min(torch.finfo(halting.dtype).tiny)).clamp(0.01, 0.99)
    return F.kl_div(q.log(), prior, reduction="sum") / len(q)


class HaltingVTClassifier(VideoClassifier):
    """HaltingVT on a ``HaltingViT`` backbone.

    Training objective: cross-entropy on the real clips (and on their static twins when the data module pairs
    them) + ``ponder_weight`` x mean ponder cost + ``prior_weight`` x KL(prior || halting distribution) +
    ``motion_weight`` x cross-entropy of the 2-way motion head (real 1 vs static 0). Static clips carry the real
    clip's label, and their classification loss counts ``static_label_weight`` times a real clip's (1, the
    official mean over both; 0 where a class cannot be told from one frame, e.g. left vs right motion).
    Training keeps halted tokens masked in place (``training_path: masked``) or removes them as evaluation does
    (``compact``, packed with autograd: a step costs what its active tokens cost; same loss and gradients).
    Evaluation removes halted tokens and logs, beside top-1/top-5, the mean multiply-accumulates per clip (G):
    ``<stage>/gmacs`` as the paper counts them (every layer's active tokens) and ``<stage>/gmacs_early_exit``,
    what inference costs when a sample stops at its class token's halt (its output is final there).
    ``early_exit: true`` evaluates and predicts that way (same scores, less compute); the paper's figure needs
    the tokens early exit skips, so it is then not logged — validate with ``early_exit: false`` for it. With
    ``early_exit: false`` both figures come from the one full pass (the early-exit one counted up to each
    sample's exit, exactly what the early-exit pass computes).
    Block drop compresses the joint blocks (the Glimpser stays); a recovery aligns every block's output with the
    teacher's on the masked training path.
    """

    def __init__(
        self,
        backbone: HaltingViT,
        num_classes: int,
        pretrained: str | None = None,
        trust_pickle: bool = False,
        ponder_weight: float = 5e-4,
        prior_weight: float = 0.0,
        prior_mean: float = 6.0,
        prior_std: float = 1.0,
        motion_weight: float = 1.0,
        static_label_weight: float = 1.0,
        training_path: Literal["compact", "masked"] = "masked",
        early_exit: bool = False,
        head_dropout: float = 0.0,
        label_smoothing: float = 0.0,
        multilabel: bool = False,
        multilabel_loss: Literal["bce", "softmax_ce"] = "bce",
        top_k: tuple[int, ...] = (1, 5),
        optimizer: OptimizerSettings = OptimizerSettings(name="adam", lr=1e-5, weight_decay=1e-5),
        schedule: ScheduleSettings = ScheduleSettings(warmup_epochs=5.0, warmup_start_factor=0.1, min_lr_ratio=0.0),
        predict_top_k: int = 5,
    ):
        super().__init__(
            backbone, num_classes, pretrained=pretrained, trust_pickle=trust_pickle, head_dropout=head_dropout,
            label_smoothing=label_smoothing, multilabel=multilabel, multilabel_loss=multilabel_loss, top_k=top_k,
            optimizer=optimizer, schedule=schedule, predict_top_k=predict_top_k,
        )  # fmt: skip
        self.ponder_weight = ponder_weight
        self.prior_weight = prior_weight
        self.prior_mean, self.prior_std = prior_mean, prior_std
        self.motion_weight = motion_weight
        self.static_label_weight = static_label_weight
        if training_path not in ("compact", "masked"):
            raise ValueError(f"training_path must be 'compact' or 'masked', got {training_path!r}")
        self.training_path = training_path
        self.early_exit = early_exit
        # Only built when used: under DDP every parameter must take part in the loss.
        self.motion_head = nn.Linear(backbone.embed_dim, 2) if motion_weight > 0 else None
        self.register_buffer(
            "prior", depth_prior(len(backbone.joint_blocks), prior_mean, prior_std), persistent=False
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if batch["batch_size"] == 0:
            return self.empty_batch_loss()
        video, label = batch["video"], batch["label"]
        paired = self.motion_head is not None
        if paired and "static" not in batch:
            raise ValueError(
                "motion_weight > 0 needs static clips: set data.init_args.static_clips: true (or "
                "model.init_args.motion_weight: 0 to train without the motion loss)"
            )
        if paired:
            video = torch.cat([video, batch["static"]])
            label = torch.cat([label, label])
        (out, logits), terms = self.aligned(
            lambda task: task.halting_forward(video),
            lambda student, teacher: self._score_alignment(student[1], teacher[1]),
        )
        n = batch["batch_size"]
        if paired:
            # The official loss is the mean over real and static clips (static_label_weight 1).
            w = self.static_label_weight
            loss_cls = (self.loss(logits[:n], label[:n]) + w * self.loss(logits[n:], label[n:])) / (1 + w)
        else:
            loss_cls = self.loss(logits, label)
        loss_ponder = out.ponder.mean()
        loss = loss_cls + self.ponder_weight * loss_ponder
        self.log_dict({"train/loss_cls": loss_cls, "train/ponder": loss_ponder}, batch_size=n)
        if self.prior_weight > 0:
            if len(self.prior) != len(out.halting):  # blocks dropped since the prior was built
                self.prior = depth_prior(len(out.halting), self.prior_mean, self.prior_std).to(self.prior)
            loss_prior = prior_kl(out.halting, self.prior)
            loss = loss + self.prior_weight * loss_prior
            self.log("train/prior_kl", loss_prior, batch_size=n)
        if paired:
            motion_target = torch.cat([torch.ones(n), torch.zeros(n)]).long().to(self.device)
            loss_motion = F.cross_entropy(self.motion_head(out.feature), motion_target)
            loss = loss + self.motion_weight * loss_motion
            self.log("train/loss_motion", loss_motion, batch_size=n)
        loss = loss + self.log_alignment(terms, n)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/active_last", out.active[:, -1].float().mean(), batch_size=n)
        return loss

    def halting_forward(self, video: Tensor) -> tuple[HaltingOutput, Tensor]:
        """The training forward (``training_path``): the halting output with its losses' terms, and the logits."""
        if self.training_path == "compact":
            out: HaltingOutput = self.backbone.forward_compact(video, losses=True)
        else:
            out = self.backbone.forward_masked(video)
        return out, self.head(out.feature)

    @classmethod
    def alignment_problem(cls, init_args: Mapping[str, Any], alignment: Alignment) -> str | None:
        if alignment.feature > 0 and init_args.get("training_path") == "compact":
            return (
                "feature alignment compares every token's block output with the teacher's, which the compact "
                "training path removes once halted: recover with model.init_args.training_path: masked (or "
                "compress.alignment.feature: 0)"
            )
        return None

    def macs_names(self) -> tuple[str, ...]:
        return ("gmacs_early_exit",) if self.early_exit else ("gmacs", "gmacs_early_exit")

    def clip_logits(self, clips: Tensor, stage: str | None) -> Tensor:
        out: HaltingOutput = self.backbone.forward_compact(clips, early_exit=self.early_exit)
        if stage is not None:
            grid = self.backbone.token_grid(clips.shape)
            head = self.backbone.embed_dim * self.num_classes
            if not self.early_exit:
                self.record_macs(stage, self.backbone.macs(out.active, grid) + head)
            # With early exit ``active`` holds what ran; a full pass derives it from each clip's exit layer.
            ran = out.active if self.early_exit else out.early_exit_active()
            executed = self.backbone.macs(ran, grid) + head
            self.record_macs(stage, executed, "gmacs_early_exit")
        return self.head(out.feature)
