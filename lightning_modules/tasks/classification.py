"""Video classification task: a backbone + linear head, trained with cross-entropy, scored per video."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics.utilities.distributed import gather_all_tensors

from datamodules.base import video_names
from lightning_modules.compression.task import Compressible
from lightning_modules.metrics.classification import VideoClassificationScores, first_occurrences
from lightning_modules.outputs import write_class_predictions
from lightning_modules.tasks.base import OptimizerSettings, ScheduleSettings, VideoTask
from models.blockdrop import MLPActivation, class_alignment
from models.checkpoint import LoadReport, load_pretrained
from models.flops import count_macs


class VideoClassifier(Compressible, VideoTask):
    """Any backbone that maps (B, 3, T, H, W) to a (B, D) clip feature, with a linear classifier on top.

    Multi-label targets train with per-class sigmoid BCE (``multilabel_loss: bce``) or with softmax
    cross-entropy on the normalised multi-hot target (``softmax_ce``, HaltingVT's ActivityNet protocol).
    Evaluation averages the scores of all views of a video (clips x crops), with the activation the loss used
    (softmax; sigmoid for ``bce``), and logs the mean GFLOPs (multiply-accumulates) per clip; a dense model's
    cost is counted once per clip shape. Block drop can compress it (``Compressible``): the backbone is the
    block stack, and its ``drop_blocks`` / ``mlp_activation`` rebuild a compressed model.

    ``predict`` writes each video's ``predict_top_k`` classes with their scores into the run directory
    (``lightning_modules.outputs.write_class_predictions``: ActivityNet-style JSON and a CSV), each video once
    under DDP.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        pretrained: str | None = None,
        trust_pickle: bool = False,
        head_dropout: float = 0.0,
        label_smoothing: float = 0.0,
        multilabel: bool = False,
        multilabel_loss: Literal["bce", "softmax_ce"] = "bce",
        top_k: tuple[int, ...] = (1, 5),
        optimizer: OptimizerSettings = OptimizerSettings(),
        schedule: ScheduleSettings = ScheduleSettings(),
        predict_top_k: int = 5,
    ):
        super().__init__(optimizer, schedule)
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone
        self.load_pretrained(pretrained, trust_pickle)
        self.head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(backbone.embed_dim, num_classes))
        nn.init.trunc_normal_(self.head[1].weight, std=0.02)
        nn.init.zeros_(self.head[1].bias)
        self.num_classes = num_classes
        if multilabel_loss not in ("bce", "softmax_ce"):
            raise ValueError(f"multilabel_loss must be 'bce' or 'softmax_ce', got {multilabel_loss!r}")
        self.multilabel = multilabel
        self.multilabel_loss = multilabel_loss
        self.label_smoothing = label_smoothing
        self.val_scores = VideoClassificationScores(num_classes, top_k, multilabel)
        self.test_scores = VideoClassificationScores(num_classes, top_k, multilabel)
        # Per stage and figure name ("gmacs", ...): this batch's clips, and rows (id, MACs of its views, views).
        self._macs: dict[str, dict[str, list[Tensor]]] = {"val": {}, "test": {}}
        self._video_macs: dict[str, dict[str, list[Tensor]]] = {"val": {}, "test": {}}
        self._dense_macs: dict[tuple[int, ...], int] = {}
        if predict_top_k < 1:
            raise ValueError(f"predict_top_k must be >= 1, got {predict_top_k}")
        self.predict_top_k = predict_top_k
        self._predicted: list[tuple[Tensor, Tensor]] = []

    def load_backbone(self, path: str, trust_pickle: bool = False) -> LoadReport:
        return load_pretrained(self.backbone, path, trust_pickle=trust_pickle)

    def forward(self, video: Tensor) -> Tensor:
        """(B, 3, T, H, W) -> (B, num_classes) logits."""
        return self.head(self.backbone(video))

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.multilabel and self.multilabel_loss == "softmax_ce":
            # Softmax cross-entropy on the multi-hot target normalised to sum 1 (HaltingVT on ActivityNet).
            target = target.float()
            return F.cross_entropy(logits, target / target.sum(-1, keepdim=True).clamp_min(1.0))
        if self.multilabel:
            return F.binary_cross_entropy_with_logits(logits, target.float())
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if batch["batch_size"] == 0:
            return self.empty_batch_loss()
        logits, terms = self.aligned(lambda task: task(batch["video"]), self._score_alignment)
        n = batch["batch_size"]
        loss = self.loss(logits, batch["label"]) + self.log_alignment(terms, n)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        if not self.multilabel:
            self.log("train/top1", (logits.argmax(-1) == batch["label"]).float().mean(), batch_size=n)
        return loss

    def block_stack(self) -> nn.Module:
        return self.backbone

    def batch_loss(self, batch: dict[str, Any]) -> Tensor:
        """The task's loss on a batch, nothing logged (block-drop scoring): per clip, each view of an evaluation
        batch (B, views, 3, T, H, W) a clip with its video's label."""
        video, label = batch["video"], batch["label"]
        if video.dim() == 6:
            label = label.repeat_interleave(video.shape[1], dim=0)
            video = video.flatten(0, 1)
        return self.loss(self(video), label)

    def cost_inputs(self, batch: dict[str, Any]) -> tuple[Tensor, ...]:
        """One clip of an evaluation batch (B, views, 3, T, H, W), as ``forward`` takes it."""
        return (batch["video"][0, :1],)

    def compressed_overrides(self, dropped: list[int], mlp_activation: MLPActivation) -> dict[str, Any]:
        """The backbone built without the ``dropped`` blocks (and with ReLU MLPs), no pretrained file to read."""
        stack = {"drop_blocks": list(dropped), "mlp_activation": mlp_activation}
        return {"model": {"init_args": {"pretrained": None, "backbone": {"init_args": stack}}}}

    def _score_alignment(self, student: Tensor, teacher: Tensor) -> dict[str, Tensor]:
        if self.alignment.prediction <= 0:
            return {}
        kl = class_alignment(student, teacher, self.alignment.temperature)
        return {"class_kl": self.alignment.prediction * kl}

    def clip_logits(self, clips: Tensor, stage: str | None) -> Tensor:
        """(N, 3, T, H, W) -> (N, num_classes) at evaluation; with ``stage`` ("val"/"test") the clips' cost is
        recorded through ``record_macs``."""
        if stage is not None:
            shape = tuple(clips.shape[1:])
            if shape not in self._dense_macs:
                self._dense_macs[shape] = count_macs(self, clips[:1])
            self.record_macs(stage, torch.full((len(clips),), self._dense_macs[shape], device=clips.device))
        return self(clips)

    def record_macs(self, stage: str, macs: Tensor, name: str = "gmacs") -> None:
        """Multiply-accumulates of each evaluated clip (N,), averaged into ``<stage>/<name>`` (G) at epoch end."""
        if stage in self._macs:
            self._macs[stage].setdefault(name, []).append(macs.detach().double())

    def macs_names(self) -> tuple[str, ...]:
        """The cost figures ``clip_logits`` records, each logged as ``<stage>/<name>``."""
        return ("gmacs",)

    def video_scores(self, video: Tensor, stage: str | None = None) -> Tensor:
        """(B, views, 3, T, H, W) -> (B, num_classes) view-averaged probabilities."""
        b, v = video.shape[:2]
        logits = self.clip_logits(video.flatten(0, 1), stage).unflatten(0, (b, v))
        probs = logits.sigmoid() if self.multilabel and self.multilabel_loss == "bce" else logits.softmax(-1)
        return probs.mean(1)

    def _eval_step(self, batch: dict[str, Any], metric: VideoClassificationScores, prefix: str) -> None:
        if batch["batch_size"] == 0:
            return
        scores = self.video_scores(batch["video"], prefix)
        self._macs_per_video(prefix, batch["index"], batch["video"].shape[1])
        metric.update(scores, batch["label"], batch["index"])  # also gives <prefix>/loss, each video once

    def _macs_per_video(self, stage: str, ids: Tensor, views: int) -> None:
        """Turn the batch's per-clip figures (clips flattened video by video) into one row per video."""
        for name, clips in self._macs.get(stage, {}).items():
            if not clips:
                continue
            macs = torch.cat(clips).view(len(ids), views)  # (B, views)
            clips.clear()
            rows = torch.stack([ids.to(macs), macs.sum(1), torch.full_like(macs[:, 0], views)], 1)
            self._video_macs[stage].setdefault(name, []).append(rows)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.val_scores, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.test_scores, "test")

    def _log_scores(self, metric: VideoClassificationScores, prefix: str) -> None:
        # Every rank takes part in the gather, even one whose batches were all skipped; a video the
        # distributed sampler's padding repeated counts once (as in the metric), and a video evaluated with
        # several views costs views x the per-clip figure.
        # The figure names are fixed by the model, so every rank gathers the same ones in the same order.
        for name in self.macs_names():
            rows = self._video_macs[prefix].pop(name, [])
            rows = torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.float64)
            rows = rows.to(self.device)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                rows = torch.cat(gather_all_tensors(rows))
            rows = rows[first_occurrences(rows[:, 0].long())]
            if len(rows):
                gmacs = rows[:, 1].sum() / rows[:, 2].sum() / 1e9
                self.log(f"{prefix}/{name}", gmacs.float(), rank_zero_only=False)
        if not metric.update_called:
            return
        for name, value in metric.compute().items():
            self.log(f"{prefix}/{name}", value, prog_bar=name == "top1", rank_zero_only=False)
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_scores(self.val_scores, "val")

    def on_test_epoch_end(self) -> None:
        self._log_scores(self.test_scores, "test")

    def on_predict_epoch_start(self) -> None:
        self._predicted = []

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        if batch["batch_size"] == 0:  # every video of the batch was skipped as bad
            return {"index": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0, self.num_classes)}
        scores = self.video_scores(batch["video"])
        self._predicted.append((batch["index"].detach(), scores.detach().float()))
        return {"index": batch["index"], "scores": scores}

    def on_predict_epoch_end(self) -> None:
        """Every rank's videos gathered (a video DDP padding repeated once), written by global rank 0."""
        ids = torch.cat([i for i, _ in self._predicted]) if self._predicted else torch.zeros(0, dtype=torch.long)
        scores = torch.cat([s for _, s in self._predicted]) if self._predicted else torch.zeros(0, self.num_classes)
        self._predicted = []
        rows = torch.cat([ids.to(self.device).double()[:, None], scores.to(self.device).double()], 1)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            rows = torch.cat(gather_all_tensors(rows))
        rows = rows[first_occurrences(rows[:, 0].long())].cpu()
        rows = rows[rows[:, 0].argsort()]
        if self._trainer is None or not self.trainer.is_global_zero:
            return
        dm = self.trainer.datamodule
        records = dm.dataset("predict").records
        paths = [str(records[int(i)].path) for i in rows[:, 0]]
        class_names = getattr(dm, "class_names", None) or [str(c) for c in range(self.num_classes)]
        json_path, csv_path = write_class_predictions(
            self.trainer.default_root_dir, video_names([Path(p) for p in paths]), paths, rows[:, 1:],
            class_names, self.predict_top_k,
        )  # fmt: skip
        rank_zero_info(f"predict: top-{self.predict_top_k} classes of {len(paths)} videos: {json_path}, {csv_path}")
