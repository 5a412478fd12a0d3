"""Temporal action detection task: the AdaTAD-form detector trained on windows, scored per video by mAP.

Training: ActionFormer's focal + DIoU losses on each window (ground truth in window steps, rescaled to the
head's steps), the positive count averaged over DDP ranks. Evaluation: each window's candidates are decoded
in head steps; at the end of the epoch the candidates of all windows of a video (gathered from every rank) are
converted to seconds, clipped to the video and merged by one NMS, then scored against the data module's ground
truth by the ActivityNet protocol (``<stage>/mAP@<tIoU>`` and ``<stage>/average_mAP``). The merged detections
are written as an ActivityNet results JSON (``predictions_<stage>.json`` in the run directory) for the official
evaluator or ``python -m lightning_modules evaluate-tad``.

ActivityNet: a class-agnostic head (``data.class_agnostic: true``) with ``external_class_scores`` (a JSON of
per-video class scores) fuses each proposal with the video's top classes, as AdaTAD does.

Predict (e.g. on one's own ``data.predict_videos``) runs the evaluation's windows, merging and post-processing
and writes ``predictions_predict.json`` (what ``evaluate-tad`` and ``diagnose-tad`` read) and, per video,
``subtitles/<video>.srt`` with its ``subtitles_top_k`` best detections, without scoring anything.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_modules.compression.task import Compressible
from lightning_modules.metrics.tad import (
    THUMOS_TIOUS,
    TemporalDetectionMAP,
    TemporalSegments,
    map_key,
    write_predictions,
)
from lightning_modules.outputs import subtitles
from lightning_modules.tasks.base import OptimizerSettings, ScheduleSettings, VideoTask, param_groups
from models.actionformer import ActionFormerHead, ActionFormerOutputs
from models.blockdrop import MLPActivation, detector_alignment
from models.checkpoint import LoadReport
from models.tad_postprocess import Detections, TADPostProcessor
from models.temporal_backbone import ChunkedVideoBackbone
from models.temporal_detector import TemporalActionDetector

HeadFactory = Callable[[int, int], ActionFormerHead]
_WEIGHT = {"class_kl": "prediction", "segment_diou": "segment"}  # alignment term -> its weight


def read_class_scores(path: str | Path, video_ids: list[str], class_names: list[str]) -> dict[int, Tensor]:
    """Video-level class scores for ActivityNet fusion: JSON ``{video_id: [score per class]}`` or
    ``{video_id: {class name: score}}``, optionally under ``"results"`` with the list's class order in ``"class"``
    (the CUHK classifier files AdaTAD uses); ids with or without a ``v_`` prefix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"external_class_scores {path} not found: give a JSON of per-video class scores"
        )
    content = json.loads(path.read_text())
    order = content.get("class") if isinstance(content.get("class"), list) else None  # CUHK's own class order
    content = content.get("results", content)
    out = {}
    for index, video in enumerate(video_ids):
        entry = content.get(video, content.get(f"v_{video}", content.get(video.removeprefix("v_"))))
        if entry is None:
            continue
        if order is not None:
            entry = dict(zip(order, entry))
        if isinstance(entry, dict):
            unknown = set(entry) - set(class_names)
            if unknown:
                raise ValueError(f"{path}: video {video!r} scores unknown classes {sorted(unknown)[:3]}")
            entry = [float(entry.get(name, 0.0)) for name in class_names]
        if len(entry) != len(class_names):
            raise ValueError(
                f"{path}: video {video!r} has {len(entry)} scores for {len(class_names)} classes"
            )
        out[index] = torch.tensor(entry, dtype=torch.float32)
    return out


class TemporalActionDetection(Compressible, VideoTask):
    """``backbone`` (a ``ChunkedVideoBackbone`` over a VideoMAE ViT) + ``head`` (an ``ActionFormerHead`` given
    without its ``in_channels``/``num_classes``, which the task fills in) + ``postprocess``.

    ``pretrained``: a checkpoint of the backbone's ViT, loaded once the adapters or LoRA are attached (they keep
    their initial values). ``optimizer.lr`` is the head's learning rate, ``backbone_lr`` that of the backbone's
    trainable part (adapters, LoRA, norms, or everything under full fine-tuning). ``tious`` are the evaluation
    thresholds (THUMOS14 0.3:0.1:0.7; ActivityNet 0.5:0.05:0.95).
    """

    def __init__(
        self,
        backbone: ChunkedVideoBackbone,
        head: HeadFactory,
        num_classes: int,
        pretrained: str | None = None,
        trust_pickle: bool = False,
        postprocess: TADPostProcessor | None = None,
        tious: tuple[float, ...] = THUMOS_TIOUS,
        external_class_scores: str | None = None,
        missing_class_scores: Literal["error", "empty"] = "error",
        backbone_lr: float = 2e-4,
        backbone_weight_decay: float | None = None,
        optimizer: OptimizerSettings = OptimizerSettings(lr=1e-4),
        schedule: ScheduleSettings = ScheduleSettings(warmup_epochs=5.0, warmup_start_factor=0.001, min_lr_ratio=0.0),
        subtitles_top_k: int = 20,
        subtitles_min_score: float = 0.0,
    ):
        super().__init__(optimizer, schedule)
        self.save_hyperparameters(ignore=["backbone", "head", "postprocess"])
        self.detector = TemporalActionDetector(backbone, head(backbone.embed_dim, num_classes))
        self.load_pretrained(pretrained, trust_pickle)
        self.postprocess = postprocess or TADPostProcessor()
        self.num_classes = num_classes
        self.backbone_lr = backbone_lr
        self.backbone_weight_decay = backbone_weight_decay
        self.external_class_scores = external_class_scores
        if missing_class_scores not in ("error", "empty"):
            raise ValueError(f"missing_class_scores must be 'error' or 'empty', got {missing_class_scores!r}")
        self.missing_class_scores = missing_class_scores
        self.tious = tuple(tious)
        self.subtitles_top_k = subtitles_top_k
        self.subtitles_min_score = subtitles_min_score
        self._candidates: dict[str, list[dict[str, Any]]] = {"val": [], "test": [], "predict": []}
        self.metrics = nn.ModuleDict({s: TemporalDetectionMAP(self.tious) for s in ("val", "test", "predict")})

    def load_backbone(self, path: str, trust_pickle: bool = False) -> LoadReport:
        return self.detector.backbone.load_pretrained(path, trust_pickle=trust_pickle)

    def forward(self, video: Tensor, valid: Tensor | None = None):
        return self.detector(video, valid)

    def head_segments(self, batch: dict[str, Any], length: int) -> list[Tensor]:
        """Ground truth in window steps -> head steps."""
        scale = length / batch["video"].shape[2]
        return [s.to(self.device, torch.float32) * scale for s in batch["segments"]]

    def _mean_over_ranks(self, value: Tensor) -> Tensor:
        if self._trainer is None or self.trainer.world_size == 1:
            return value
        return self.trainer.strategy.reduce(value.to(self.device), reduce_op="mean")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if batch["batch_size"] == 0:
            return self.empty_batch_loss()
        labels = [lb.to(self.device) for lb in batch["labels"]]
        outputs, terms = self.aligned(
            lambda task: task(batch["video"], batch["valid"]),
            lambda student, teacher: self._prediction_alignment(student, teacher, batch, labels),
        )
        length = outputs.masks[0].shape[1]
        losses = self.detector.head.loss(
            outputs, self.head_segments(batch, length), labels, self._mean_over_ranks
        )
        n = batch["batch_size"]
        loss = losses["loss"] + self.log_alignment(terms, n)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict(
            {"train/cls_loss": losses["cls_loss"], "train/reg_loss": losses["reg_loss"]}, batch_size=n
        )
        return loss

    def block_stack(self) -> nn.Module:
        return self.detector.backbone.vit

    def cost_inputs(self, batch: dict[str, Any]) -> tuple[Tensor, ...]:
        """One window of an evaluation batch, as ``forward`` takes it."""
        return batch["video"][:1], batch["valid"][:1]

    def compressed_overrides(self, dropped: list[int], mlp_activation: MLPActivation) -> dict[str, Any]:
        """The ViT built without the ``dropped`` blocks (and with ReLU MLPs if asked), the LoRA merged (plain
        weights: ``finetune: full``), no pretrained backbone to read."""
        vit = {"init_args": {"drop_blocks": list(dropped), "mlp_activation": mlp_activation}}
        backbone = {"finetune": "full", "vit": vit}
        return {"model": {"init_args": {"pretrained": None, "backbone": {"init_args": backbone}}}}

    def batch_loss(self, batch: dict[str, Any]) -> Tensor:
        """Focal + DIoU loss on a batch, normalised by its own positive count, nothing logged (block-drop
        scoring; in eval mode the running normaliser is left as it is)."""
        outputs = self(batch["video"], batch["valid"])
        labels = [lb.to(self.device) for lb in batch["labels"]]
        segments = self.head_segments(batch, outputs.masks[0].shape[1])
        return self.detector.head.loss(outputs, segments, labels)["loss"]

    def _prediction_alignment(
        self,
        student: ActionFormerOutputs,
        teacher: ActionFormerOutputs,
        batch: dict[str, Any],
        labels: list[Tensor],
    ) -> dict[str, Tensor]:
        """Class-score KL over the valid points and segment DIoU at the ground truth's positive points."""
        a = self.alignment
        if a.prediction <= 0 and a.segment <= 0:
            return {}
        length = student.masks[0].shape[1]
        cls_targets, _ = self.detector.head.targets(student, self.head_segments(batch, length), labels)
        terms = detector_alignment(student, teacher, cls_targets.sum(-1) > 0, a.temperature)
        weighted = {
            "class_kl": a.prediction * terms["class_kl"],
            "segment_diou": a.segment * terms["segment_diou"],
        }
        return {name: value for name, value in weighted.items() if getattr(a, _WEIGHT[name]) > 0}

    # ------------------------------------------------------------------------------------------- evaluation

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        if batch["batch_size"] == 0:
            return
        outputs = self(batch["video"], batch["valid"])
        steps_per_window = outputs.masks[0].shape[1]
        head_step = batch["seconds_per_step"].double() * batch["video"].shape[2] / steps_per_window
        for i, dets in enumerate(self.postprocess.decode(outputs)):
            self._candidates[stage].append(
                {
                    "window": int(batch["index"][i]),
                    "video": int(batch["video_index"][i]),
                    "offset": float(batch["window_start"][i]),
                    "step": float(head_step[i]),
                    "duration": float(batch["duration"][i]),
                    "detections": Detections(dets.segments.cpu(), dets.scores.cpu(), dets.labels.cpu()),
                }
            )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _gathered_candidates(self, stage: str) -> list[dict[str, Any]]:
        """Every rank's window candidates, each window once (the DDP sampler repeats some to pad)."""
        mine, self._candidates[stage] = self._candidates[stage], []
        if self._trainer is not None and self.trainer.world_size > 1 and dist.is_initialized():
            everyone: list = [None] * self.trainer.world_size
            dist.all_gather_object(everyone, mine)
            mine = [c for part in everyone for c in part]
        return list({c["window"]: c for c in mine}.values())

    def video_detections(self, windows: list[dict[str, Any]], class_scores: Tensor | None) -> Detections:
        windows = sorted(windows, key=lambda c: c["window"])
        dm = self.trainer.datamodule if self._trainer is not None else None
        whole = getattr(dm, "mode", None) == "resize" if dm is not None else None  # None: one window is whole
        merged = self.postprocess.merge_windows(
            [c["detections"] for c in windows], [c["offset"] for c in windows], [c["step"] for c in windows],
            windows[0]["duration"], whole,
        )  # fmt: skip
        if class_scores is not None:
            merged = self.postprocess.fuse_video_classes(merged, class_scores)
        return merged

    def _evaluate(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None or not hasattr(dm, "ground_truth"):
            raise RuntimeError("temporal detection needs a data module with ground_truth(stage), e.g. "
                               "datamodules.temporal.TemporalDetectionDataModule")  # fmt: skip
        truth = dm.ground_truth(stage)
        by_video: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for c in self._gathered_candidates(stage):
            by_video[c["video"]].append(c)
        class_scores = {}
        video_ids = dm.stage_video_ids(stage) if hasattr(dm, "stage_video_ids") else dm.video_ids
        if self.external_class_scores:
            class_scores = read_class_scores(self.external_class_scores, video_ids, dm.class_names)
            missing = [video_ids[v] for v in sorted(truth) if v not in class_scores]
            if missing and self.missing_class_scores == "error":
                raise ValueError(
                    f"external_class_scores {self.external_class_scores} has no scores for {len(missing)} of the "
                    f"{len(truth)} {stage} videos (e.g. {missing[:3]}): their class-agnostic detections cannot "
                    "be named. Give a file that covers them (scoring the training set needs scores of training "
                    "videos), or set model.init_args.missing_class_scores to 'empty' to score them without "
                    "detections"
                )
            if missing:
                rank_zero_warn(
                    f"{stage}: {len(missing)} videos without external class scores are scored without detections "
                    f"(missing_class_scores: empty; e.g. {missing[:3]})"
                )
        elif self.num_classes == 1 and len(dm.class_names) > 1:
            raise ValueError(
                "a class-agnostic detector needs video-level class scores to name its detections: set "
                "model.init_args.external_class_scores to a JSON of per-video class scores"
            )
        rank, world = (
            (self.trainer.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)
        )
        metric = self.metrics[stage]
        metric.class_names = list(dm.class_names)  # labels of the written predictions
        empty = Detections(torch.zeros(0, 2), torch.zeros(0), torch.zeros(0, dtype=torch.long))
        for video in sorted(truth):
            if video % world != rank:  # each rank scores its share; the metric gathers them
                continue
            unnamed = self.external_class_scores and video not in class_scores
            dets = (
                self.video_detections(by_video[video], class_scores.get(video))
                if by_video[video] and not unnamed
                else empty
            )
            metric.update([{"segments": dets.segments, "scores": dets.scores, "labels": dets.labels}],
                          [truth[video]], [video])  # fmt: skip
        if stage == "predict":  # nothing to score against
            self._write_predictions(metric.predictions(video_ids))
            metric.reset()
            return
        scores = metric.compute()
        for name, value in scores.items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "average_mAP", rank_zero_only=False)
        if self._trainer is not None and self.trainer.log_dir:
            metric.write_results(Path(self.trainer.default_root_dir) / f"predictions_{stage}.json",
                                 video_ids)  # fmt: skip
        metric.reset()

    def _write_predictions(self, detections: TemporalSegments) -> None:
        """Global rank 0 writes the results JSON and a SubRip file per video into the run directory."""
        if self._trainer is None or not self.trainer.is_global_zero:
            return
        out = Path(self.trainer.default_root_dir)
        path = write_predictions(out / "predictions_predict.json", detections)
        folder = out / "subtitles"
        folder.mkdir(parents=True, exist_ok=True)
        for v, name in enumerate(detections.video_names):
            mine = detections.video == v
            labels = [detections.class_names[c] for c in detections.labels[mine]]
            text = subtitles(detections.segments[mine], detections.scores[mine], labels, self.subtitles_min_score,
                             self.subtitles_top_k)  # fmt: skip
            target = folder / f"{name}.srt"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        rank_zero_info(
            f"predict: detections of {len(detections.video_names)} videos in {path}, subtitles in {folder}"
        )

    def on_validation_epoch_start(self) -> None:
        self._candidates["val"] = []

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self._candidates["val"] = []
            return
        self._evaluate("val")

    def on_test_epoch_end(self) -> None:
        self._evaluate("test")

    def on_predict_epoch_start(self) -> None:
        self._candidates["predict"] = []

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """The windows' candidates, kept for the merge at the end of the pass (as evaluation)."""
        self._eval_step(batch, "predict")

    def on_predict_epoch_end(self) -> None:
        self._evaluate("predict")

    # -------------------------------------------------------------------------------------------- optimiser

    def optimizer_groups(self) -> list[dict]:
        """Backbone (trainable part) at ``backbone_lr``, head at ``lr``; no decay on biases, norms, scales, except
        that ``backbone_weight_decay`` (when set) decays every trainable backbone tensor alike."""
        decay = self.optimizer_settings.weight_decay
        if self.backbone_weight_decay is None:
            groups = [{**g, "lr": self.backbone_lr} for g in param_groups(self.detector.backbone, decay)]
        else:
            # OpenTAD's custom groups (lora / norm / patch_embed, or adapter): one decay for all, biases and norms too
            backbone = [p for p in self.detector.backbone.parameters() if p.requires_grad]
            groups = [{"params": backbone, "weight_decay": self.backbone_weight_decay, "lr": self.backbone_lr}]
        groups += [{**g, "lr": self.optimizer_settings.lr} for g in param_groups(self.detector.head, decay)]
        return [g for g in groups if g["params"]]

    def metric_names(self, stage: str = "val") -> list[str]:
        return [f"{stage}/{map_key(t)}" for t in self.tious] + [f"{stage}/average_mAP"]
