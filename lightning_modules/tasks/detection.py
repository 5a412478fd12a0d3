"""Spatio-temporal action detection task: EVAD trained on keyframe clips, scored by frame-mAP.

Training: the detector's loss (the localiser's set losses on every box stage, the action BCE on every decoder
layer), each term logged under ``train/``. Evaluation: per keyframe, the detector's boxes (or the data module's
``proposals``, an off-the-shelf person detector's boxes, with ``use_proposals``) with a score per action, scored
at the end of the epoch:

- AVA (a data module with ``action_ids``): ``AVAFrameMAP``, the official protocol (PASCAL VOC AP at IoU 0.5 over
  the evaluated classes of the data module, e.g. the 60 of the ActivityNet label map while 80 are trained; every
  (box, action) row kept unless ``max_detections_per_keyframe``), logged as ``<stage>/frame_mAP@0.5`` and
  ``<stage>/frame_mAP@0.5:0.95``; per-class APs at test.
- UCF101-24 / JHMDB (batches with ``frame``, ``classes``, ``tube_ids``): ``FrameVideoMAP``, ``frame_mAP@0.5``
  and, at test, video-mAP from linked tubes.

``<stage>/gmacs`` is the giga multiply-accumulates of one clip of the epoch's first batch through the whole
detector at the current keep rate. At test and predict the detections go to ``detections_<stage>.csv`` in the run
directory, as the official AVA CSV (``video_id, timestamp, x1, y1, x2, y2, action_id, score``, boxes normalised
to [0, 1]; for UCF101-24 / JHMDB the timestamp is the 1-based frame number and the action id the class index +
1), which ``python -m lightning_modules evaluate-ava`` or the official tool scores.

The keep rate is the detector's (``--model.init_args.detector.init_args.keep_rate``): a ``validate`` / ``test``
with a checkpoint and that argument evaluates the trained weights at another rate; no retraining.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_modules.metrics.ava import AVAFrameMAP
from lightning_modules.metrics.person_ap import PersonAP
from lightning_modules.metrics.video_map import FrameVideoMAP
from lightning_modules.tasks.base import OptimizerSettings, ScheduleSettings, VideoTask, named_param_groups
from models.checkpoint import LoadReport
from models.evad import EVAD, ActionDetections
from models.flops import count_macs

STAGES = ("val", "test", "predict")
#: Parameters of the detector trained at ``head_lr_mult`` x the learning rate: those the official code keeps under
#: ``det_head`` (its optimizer scales exactly that prefix): the localiser's box stages and the whole context
#: refinement decoder (projection, mask token, layers, action heads). The feature pyramid and the proposal boxes
#: and features sit outside it and train at 1x, as the encoder's final norm, which the decoder holds here.
HEAD_PARAMETERS = ("localiser.stages.", "decoder.")
ENCODER_NORM = "decoder.norm."


def is_head_parameter(name: str) -> bool:
    """Whether the detector's parameter ``name`` trains at the heads' learning rate."""
    return name.startswith(HEAD_PARAMETERS) and not name.startswith(ENCODER_NORM)


def _normalised(boxes: Tensor, size: Tensor) -> Tensor:
    """Pixel boxes (n, 4) of an image of ``size`` (h, w) -> x1, y1, x2, y2 in [0, 1]."""
    height, width = (float(v) for v in size)
    scale = boxes.new_tensor([width, height, width, height])
    return (boxes.float() / scale).clamp(0.0, 1.0)


class SpatioTemporalDetection(VideoTask):
    """EVAD (``detector``, configured in the recipe) on AVA-style keyframes or UCF101-24 / JHMDB frames.

    ``num_classes`` comes from the data module (linked by the CLI) and must equal the detector's: the recipe
    sets both. ``multilabel`` (linked from the data module: AVA multi-hot, UCF101-24 / JHMDB one class per
    actor) is recorded with the hyperparameters only: EVAD's action loss is a per-class sigmoid BCE for both, as
    the official code trains it. ``use_proposals``: classify the data module's ``proposals`` (given person boxes, e.g. AVA's
    ``proposals_csv``) instead of the localiser's boxes at evaluation; training always uses the localiser.

    ``pretrained``: a checkpoint of the detector's backbone (its final norm goes to the decoder, see ``EVAD``).

    Optimisation (the official recipe, the defaults of ``optimizer`` and ``schedule``): AdamW, weight decay 1e-4
    except on 1-D tensors, positions and the mask token; ``optimizer.lr`` 2.5e-5 (batch 16) for the backbone,
    ``head_lr_mult`` (8) x that for the box stages and the context refinement decoder (``HEAD_PARAMETERS``; the
    pyramid, proposals and the encoder's final norm at 1x); linear warmup over 2 epochs from 0.1 x lr, then x0.1
    at epoch 5 and x0.01 at epoch 8 (``schedule.kind: step``, ``milestones: [5, 8]``), updated every optimiser
    step. ``max_detections_per_keyframe``: AVA's per-keyframe cap of (box, action) rows; null keeps every row, as
    the official PySlowFast helper EVAD scores with (50 is the ActivityNet tool's rule, ``evaluate-ava``'s
    default). Validation and test also log the localiser's person-detection AP (``<stage>/person_AP@0.5``,
    COCO's evaluator as the official person meter; not with ``use_proposals``).
    """

    def __init__(
        self,
        detector: EVAD,
        num_classes: int,
        pretrained: str | None = None,
        trust_pickle: bool = False,
        multilabel: bool = True,
        use_proposals: bool = False,
        max_detections_per_keyframe: int | None = None,
        head_lr_mult: float = 8.0,
        optimizer: OptimizerSettings = OptimizerSettings(lr=2.5e-5, weight_decay=1e-4),
        schedule: ScheduleSettings = ScheduleSettings(
            kind="step", warmup_epochs=2.0, warmup_start_factor=0.1, milestones=(5.0, 8.0), gamma=0.1,
            min_lr_ratio=0.0,
        ),
    ):
        super().__init__(optimizer, schedule)
        if detector.num_classes != num_classes:
            raise ValueError(
                f"the detector classifies {detector.num_classes} actions but the data has {num_classes}: set "
                f"model.init_args.detector.init_args.num_classes to {num_classes} in the recipe"
            )
        if head_lr_mult <= 0:
            raise ValueError(f"head_lr_mult must be > 0, got {head_lr_mult}")
        if max_detections_per_keyframe is not None and max_detections_per_keyframe < 1:
            raise ValueError(
                f"max_detections_per_keyframe must be >= 1 or null, got {max_detections_per_keyframe}"
            )
        self.save_hyperparameters(ignore=["detector"])
        self.detector = detector
        self.num_classes = num_classes
        self.use_proposals = use_proposals
        self.head_lr_mult = head_lr_mult
        self.max_detections_per_keyframe = max_detections_per_keyframe
        self.load_pretrained(pretrained, trust_pickle)
        self.metrics = nn.ModuleDict()  # built at setup, when the data module says which protocol applies
        self.person_metrics = nn.ModuleDict()
        self._protocol: Literal["ava", "frames"] | None = None
        self._action_ids: list[int] = []

    def load_backbone(self, path: str, trust_pickle: bool = False) -> LoadReport:
        return self.detector.load_pretrained(path, trust_pickle=trust_pickle)

    # ---------------------------------------------------------------------------------------------- setup

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None:
            raise RuntimeError(
                "spatio-temporal detection needs its data module (datamodules.ava.AVADataModule or "
                "datamodules.act_pickle.ActPickleDataModule) to choose the evaluation protocol"
            )
        if hasattr(dm, "action_ids"):
            self._protocol = "ava"
            self._action_ids = list(dm.action_ids)
            evaluated = dict(getattr(dm, "evaluated_label_map", dict(zip(self._action_ids, dm.class_names))))
            width = max(self._action_ids)  # the metric's score columns are action id - 1
            cap = self.max_detections_per_keyframe
            self.metrics = nn.ModuleDict(
                {s: AVAFrameMAP(width, evaluated, cap, per_class=s == "test") for s in STAGES}
            )
        else:
            self._protocol = "frames"
            self.metrics = nn.ModuleDict(
                {s: FrameVideoMAP(self.num_classes, video_map=s == "test") for s in STAGES}
            )
        # the localiser's own boxes are scored as person detections (not the given proposals')
        self.person_metrics = nn.ModuleDict(
            {} if self.use_proposals else {s: PersonAP() for s in ("val", "test")}
        )

    # ------------------------------------------------------------------------------------------- training

    def forward(self, video: Tensor, image_sizes: Tensor, given_boxes: Sequence[Tensor] | None = None):
        return self.detector(video, image_sizes, given_boxes)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if batch["batch_size"] == 0:
            return self.empty_batch_loss()
        n = batch["batch_size"]
        outputs = self(batch["video"], batch["image_size"])
        targets = [
            {"boxes": b.to(self.device, torch.float32), "labels": lb.to(self.device, torch.float32)}
            for b, lb in zip(batch["boxes"], batch["labels"])
        ]
        losses = self.detector.loss(outputs, targets)
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in losses.items() if k != "loss"}, batch_size=n)
        return losses["loss"]

    # ----------------------------------------------------------------------------------------- evaluation

    def given_boxes(self, batch: dict[str, Any]) -> list[Tensor] | None:
        """The data module's proposals when ``use_proposals``, else None (the localiser's boxes)."""
        if not self.use_proposals:
            return None
        if "proposals" not in batch:
            raise ValueError(
                "use_proposals is set but the batches carry no 'proposals': give the data module a "
                "proposals_csv (person-detector boxes) or set model.init_args.use_proposals to false"
            )
        return [p.to(self.device, torch.float32) for p in batch["proposals"]]

    def cost_inputs(self, batch: dict[str, Any]) -> tuple[Any, ...]:
        """One clip of an evaluation batch, as ``forward`` takes it."""
        given = self.given_boxes(batch)
        return batch["video"][:1], batch["image_size"][:1], None if given is None else given[:1]

    def clip_gmacs(self, batch: dict[str, Any]) -> float:
        """Giga multiply-accumulates of one clip through the detector as it is now (keep rate included).

        The counter refuses trainable parameters (a view of one still asks for gradient under no_grad), so the
        detector is frozen for the count and its flags restored after."""
        trainable = [p for p in self.detector.parameters() if p.requires_grad]
        training = self.detector.training
        try:
            self.detector.requires_grad_(False).eval()
            return count_macs(self.detector, *self.cost_inputs(batch)) / 1e9
        finally:
            for p in trainable:
                p.requires_grad_(True)
            self.detector.train(training)

    def detections(self, batch: dict[str, Any], stage: str | None = None) -> list[ActionDetections]:
        """The detector's detections of the batch; at ``val`` / ``test`` the localiser's proposals also go to
        the stage's person AP."""
        outputs = self(batch["video"], batch["image_size"], self.given_boxes(batch))
        if stage in self.person_metrics:
            boxes, scores = self.detector.person_proposals(outputs)
            sizes = batch["image_size"]
            times = batch["timestamp"] if self._protocol == "ava" else batch["frame"]
            self.person_metrics[stage].update(
                [_normalised(b, size) for b, size in zip(boxes, sizes)], scores,
                [_normalised(b, size) for b, size in zip(batch["boxes"], sizes)], batch["video_index"], times,
            )  # fmt: skip
        return self.detector.predict(outputs)

    def _update(self, batch: dict[str, Any], stage: str, detections: list[ActionDetections]) -> None:
        preds, targets = [], []
        for i, det in enumerate(detections):
            size = batch["image_size"][i]
            scores, labels = det.action_scores.float(), batch["labels"][i].float()
            if self._protocol == "ava":
                scores, labels = self._id_columns(scores), self._id_columns(labels.to(scores.device))
            preds.append({"boxes": _normalised(det.boxes, size), "scores": scores})
            target = {"boxes": _normalised(batch["boxes"][i], size), "labels": labels}
            if self._protocol == "frames":
                target = {**target, "labels": batch["classes"][i], "tube_ids": batch["tube_ids"][i]}
            targets.append(target)
        times = batch["timestamp"] if self._protocol == "ava" else batch["frame"]
        self.metrics[stage].update(preds, targets, batch["video_index"], times)

    def _id_columns(self, values: Tensor) -> Tensor:
        """(n, C) over the label map's classes -> (n, max action id), column ``action id - 1``: the columns
        ``AVAFrameMAP`` scores and writes."""
        out = values.new_zeros(len(values), max(self._action_ids))
        out[:, torch.tensor(self._action_ids, device=values.device) - 1] = values
        return out

    def _eval_step(self, batch: dict[str, Any], batch_idx: int, stage: str) -> list[ActionDetections]:
        if batch["batch_size"] == 0:
            return []
        if batch_idx == 0 and stage != "predict":
            self.log(f"{stage}/gmacs", self.clip_gmacs(batch), batch_size=1, sync_dist=True)
        detections = self.detections(batch, stage)
        self._update(batch, stage, detections)
        return detections

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Per keyframe: video index, timestamp (or frame) and the detections, in pixels of the resized clip;
        all of them also go to ``detections_predict.csv`` at the end."""
        detections = self._eval_step(batch, batch_idx, "predict")
        if not detections:
            return []
        times = batch["timestamp"] if "timestamp" in batch else batch["frame"]
        return [
            {"video_index": int(batch["video_index"][i]), "time": int(times[i]), "boxes": d.boxes.cpu(),
             "person_scores": d.person_scores.cpu(), "action_scores": d.action_scores.cpu()}
            for i, d in enumerate(detections)
        ]  # fmt: skip

    def _evaluate(self, stage: str) -> None:
        metric = self.metrics[stage]
        scores = metric.compute()
        if stage in self.person_metrics:
            scores.update(self.person_metrics[stage].compute())
            self.person_metrics[stage].reset()
        for name, value in scores.items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "frame_mAP@0.5", rank_zero_only=False)
        if stage == "test":
            self.write_detections(stage)
        metric.reset()

    def write_detections(self, stage: str) -> Path | None:
        """The stage's gathered detections as ``detections_<stage>.csv`` in the run directory (every rank must
        call this under DDP; rank 0 writes)."""
        if self._trainer is None:
            return None
        dm = self.trainer.datamodule
        path = Path(self.trainer.default_root_dir) / f"detections_{stage}.csv"
        names = dm.video_names(stage)
        return self.metrics[stage].write_detections(path, names)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self.metrics["val"].reset()
            if "val" in self.person_metrics:
                self.person_metrics["val"].reset()
            return
        self._evaluate("val")

    def on_test_epoch_end(self) -> None:
        self._evaluate("test")

    def on_predict_epoch_end(self) -> None:
        self.write_detections("predict")
        self.metrics["predict"].reset()

    # ------------------------------------------------------------------------------------------- optimiser

    def optimizer_groups(self) -> list[dict]:
        """The official groups: ``head_lr_mult`` x ``lr`` for ``HEAD_PARAMETERS`` (the box stages and the context
        refinement decoder with its projection, mask token and action heads), ``lr`` for the rest (backbone,
        feature pyramid, proposal boxes and features, the encoder's final norm); no weight decay on 1-D tensors
        (biases, norms, q/v biases), positions and the mask token."""
        lr = self.optimizer_settings.lr
        parts: dict[bool, list[tuple[str, nn.Parameter]]] = {True: [], False: []}
        for name, p in self.detector.named_parameters():
            if p.requires_grad:
                parts[is_head_parameter(name)].append((name, p))
        groups = []
        for head, named in parts.items():
            for group in named_param_groups(named, self.optimizer_settings.weight_decay):
                if group["params"]:
                    groups.append({**group, "lr": lr * self.head_lr_mult if head else lr})
        return groups

    def metric_names(self, stage: str = "val") -> list[str]:
        return [f"{stage}/frame_mAP@0.5"]


__all__ = ["HEAD_PARAMETERS", "SpatioTemporalDetection", "is_head_parameter"]
