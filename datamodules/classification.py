"""Video classification data: Kinetics-style lists -> clips -> (multi-view) uint8 batches."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from datamodules import synthetic
from datamodules.activitynet import class_names_of, load_database, read_activitynet
from datamodules.base import (
    CLIP_KEYS,
    AnnotationError,
    BadVideoPolicy,
    Problem,
    SampleKey,
    VideoDataModule,
    load_guarded,
    open_checked,
    seeded,
    split_key,
)
from datamodules.kinetics_list import VideoRecord, read_class_names, read_video_list
from datamodules.sampling import random_clip, uniform_clips
from datamodules.synthetic import ClassificationSet, chosen_settings
from datamodules.transforms import EvalClipTransform, TrainClipTransform
from datamodules.video_io import Decoder

log = logging.getLogger(__name__)


class ClipClassificationDataset(Dataset):
    """One sample per video: a random clip in training, ``num_clips`` uniform clips x crops in evaluation.

    Training samples: ``video`` uint8 (3, T, H, W). Evaluation samples: ``video`` uint8 (views, 3, T, H, W) with
    views = clips x crops. ``label`` is the class index, or a multi-hot float vector when ``multilabel``; ``index``
    identifies the sample (evaluation under DDP de-duplicates by it). With ``static_clips`` a training sample also
    carries ``static``: one of its frames repeated T times and augmented independently (HaltingVT's motion loss).
    """

    def __init__(
        self,
        records: Sequence[VideoRecord],
        num_classes: int,
        num_frames: int,
        frame_stride: int,
        transform: Callable[[Tensor], Tensor],
        train: bool,
        num_clips: int = 1,
        multilabel: bool = False,
        min_video_frames: int = 1,
        bad_video: BadVideoPolicy = "error",
        decode_threads: int = 1,
        static_clips: bool = False,
        decoder: Decoder = "auto",
    ):
        self.records = list(records)
        self.num_classes = num_classes
        self.num_frames = num_frames
        self.frame_stride = frame_stride
        self.transform = transform
        self.train = train
        self.num_clips = num_clips
        self.multilabel = multilabel
        self.min_video_frames = min_video_frames
        self.bad_video = bad_video
        self.decode_threads = decode_threads
        self.decoder = decoder
        self.static_clips = static_clips

    def __len__(self) -> int:
        return len(self.records)

    def target(self, record: VideoRecord) -> Tensor:
        """Class index (-1 for an unlabelled video to predict on) or multi-hot vector."""
        if self.multilabel:
            hot = torch.zeros(self.num_classes)
            hot[list(record.labels)] = 1.0
            return hot
        return torch.tensor(record.labels[0] if record.labels else -1)

    def load(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        video = open_checked(record.path, self.min_video_frames, self.decode_threads, self.decoder)
        sample = {"label": self.target(record), "index": index}
        if self.train:
            # Torch's generator is the one Lightning seeds per worker; numpy only draws from it.
            rng = np.random.default_rng(int(torch.randint(0, 2**62, ())))
            frames = video.get_frames(
                random_clip(video.num_frames, self.num_frames, self.frame_stride, rng)
            )
            sample["video"], plan = self.transform_with_seed(frames)
            if plan is not None:
                sample["video_plan"] = plan  # applied on the device (augment_on: device)
            if self.static_clips:
                # One of the clip's frames repeated over time, augmented on its own: same label, no motion.
                still = frames[int(rng.integers(len(frames)))]
                sample["static"], plan = self.transform_with_seed(still.expand(len(frames), *still.shape))
                if plan is not None:
                    sample["static_plan"] = plan
        else:
            idx = uniform_clips(video.num_frames, self.num_frames, self.frame_stride, self.num_clips)
            frames = video.get_frames(idx.reshape(-1)).unflatten(0, idx.shape)  # (clips, T, H, W, 3)
            sample["video"] = torch.cat([self.transform(f) for f in frames])  # (clips * crops, 3, T, H, W)
        return sample

    def __getitem__(self, key: int | SampleKey) -> dict[str, Any]:
        index, seed = split_key(key)
        with seeded(seed):
            return load_guarded(lambda: self.load(index), self.bad_video, index)

    def transform_with_seed(self, frames: Tensor) -> tuple[Tensor, Tensor | None]:
        """The training transform's clip and the plan of what it left for the device, if anything."""
        with_seed = getattr(self.transform, "with_seed", None)
        return with_seed(frames) if with_seed is not None else (self.transform(frames), None)


class VideoClassificationDataModule(VideoDataModule):
    """Kinetics-style classification lists (Kinetics, Mini-Kinetics, synthetic) or an ActivityNet JSON.

    A ``*_list`` ending in ``.json`` is read as ActivityNet annotations (``datamodules.activitynet``): training
    uses the ``train_subset`` entries, evaluation the ``eval_subset`` ones, videos are found under ``video_dir``,
    targets are multi-label (set ``multilabel: true``), and classes come from the JSON unless ``classes_file``
    exists. Videos the JSON lists but ``video_dir`` lacks are an error under ``bad_video: error``; under
    ``skip`` they are dropped, counted and logged once. ``predict_videos`` (files or folders, absolute or relative
    to the working directory or ``root``) are unlabelled videos for ``predict``, instead of ``predict_list``; the
    class names then come from ``classes_file`` (or ``num_classes``). ``augment_on``: where the
    training clips' transform (resize, crop, flip, RandAugment) runs, in the loader workers (``loader``) or on
    the batch once it is on the training device (``device``: the worker decodes only and draws each clip's
    parameters, the same ops follow from them there; README, "Loader workers per GPU").
    ``download_hint`` is added to the error raised when a list file is missing (what to download, where to put
    it). ``synthetic`` (``true``, or ``ClassificationSet`` settings such as ``{videos_per_class: 200}``) writes the
    embedded synthetic motion dataset to ``root`` on first use (rank 0 only), and again when its settings change.
    Remaining arguments (batch size, workers, ``bad_video`` policy, normalisation) are those of
    ``VideoDataModule``.
    """

    annotation_fixes: ClassVar[Mapping[str, str]] = {
        "missing": "fix the paths (the list's, or data.init_args.root) or download the videos, {skip}",
    }

    def __init__(
        self,
        root: str,
        train_list: str = "train.txt",
        val_list: str = "val.txt",
        test_list: str | None = None,
        predict_list: str | None = None,
        classes_file: str | None = "classes.txt",
        num_classes: int | None = None,
        multilabel: bool = False,
        num_frames: int = 8,
        frame_stride: int = 32,
        crop_size: int = 224,
        train_short_side: tuple[int, int] = (256, 320),
        eval_short_side: int = 256,
        flip: bool = True,
        randaugment_ops: int = 2,
        randaugment_magnitude: int = 9,
        test_num_clips: int = 1,
        test_num_crops: int = 1,
        min_video_frames: int | None = None,
        synthetic: bool | ClassificationSet = False,
        static_clips: bool = False,
        augment_on: Literal["loader", "device"] = "loader",
        download_hint: str | None = None,
        video_dir: str = "videos",
        train_subset: str = "training",
        eval_subset: str = "validation",
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.root = Path(root)
        self.lists = {"train": train_list, "val": val_list, "test": test_list or val_list}
        self.lists["predict"] = predict_list or self.lists["test"]
        self._class_names: list[str] | None = None
        self._missing_counted: set[str] = set()
        self.classes_file = classes_file
        self._num_classes = num_classes
        self.multilabel = multilabel
        self.num_frames = num_frames
        self.frame_stride = frame_stride
        self.crop_size = crop_size
        self.train_short_side = train_short_side
        self.eval_short_side = eval_short_side
        self.flip = flip
        self.randaugment_ops = randaugment_ops
        self.randaugment_magnitude = randaugment_magnitude
        self.augment_on = augment_on
        self.test_num_clips = test_num_clips
        self.test_num_crops = test_num_crops
        self.min_video_frames = min_video_frames or num_frames
        self.synthetic_set = chosen_settings(synthetic, "classification")
        self.synthetic = self.synthetic_set is not None
        self.static_clips = static_clips
        self.download_hint = download_hint
        self.video_dir = self.root / video_dir
        self.subsets = {
            "train": train_subset,
            "val": eval_subset,
            "test": eval_subset,
            "predict": eval_subset,
        }

    def prepare_data(self) -> None:
        if self.predicting_own_videos():
            return  # the files named, nothing else
        if self.synthetic and not synthetic.is_complete(self.root, **asdict(self.synthetic_set)):
            log.info("writing the synthetic classification set to %s", self.root)
            synthetic.generate_classification(self.root, self.synthetic_set)

    def is_json(self, stage: str) -> bool:
        return str(self.lists[stage]).endswith(".json")

    @property
    def class_names(self) -> list[str] | None:
        if self._class_names is None:
            if self.classes_file and (self.root / self.classes_file).is_file():
                self._class_names = read_class_names(self.root / self.classes_file)
            elif self.is_json("train"):
                self._class_names = class_names_of(load_database(self.root / self.lists["train"]))
            elif self.synthetic and self.classes_file == "classes.txt":
                return list(synthetic.CLASSIFICATION_CLASSES)  # the list the generator writes
        return self._class_names

    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            if self.synthetic and self.classes_file == "classes.txt":
                return len(synthetic.CLASSIFICATION_CLASSES)
            if not self.root.is_dir():
                raise FileNotFoundError(self.missing_root_message())
            names = self.class_names
            if names is None:
                raise ValueError(
                    f"number of classes unknown: set data.init_args.num_classes, or classes_file to a file under {self.root}"
                )
            self._num_classes = len(names)
        return self._num_classes

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """The device plans as plain ints before the transfer: read on the device, they would make the host wait
        for it on every batch."""
        for key in CLIP_KEYS:
            if isinstance(batch.get(f"{key}_plan"), torch.Tensor):
                batch[f"{key}_plan"] = batch[f"{key}_plan"].tolist()
        return super().on_before_batch_transfer(batch, dataloader_idx)

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Under ``augment_on: device``, the training clips' resize, crop, flip and RandAugment, on the device,
        before normalisation."""
        for key in CLIP_KEYS:
            plans = batch.pop(f"{key}_plan", None)
            if plans is not None:
                plans = plans.tolist() if isinstance(plans, torch.Tensor) else plans
                batch[key] = torch.stack([
                    self._train_transform.on_device(clip, plan) for clip, plan in zip(batch[key], plans, strict=True)
                ])  # fmt: skip
        return super().on_after_batch_transfer(batch, dataloader_idx)

    def build_dataset(self, stage: str) -> ClipClassificationDataset:
        train = stage == "train"
        if train:
            transform = TrainClipTransform(
                self.crop_size,
                self.train_short_side,
                self.flip,
                self.randaugment_ops,
                self.randaugment_magnitude,
                self.augment_on,
            )
            self._train_transform = transform
        else:
            transform = EvalClipTransform(self.crop_size, self.eval_short_side, self.test_num_crops)
        try:
            if stage == "predict" and self.predict_videos:
                records = [VideoRecord(str(p), ()) for p in self.predict_files]
            elif self.is_json(stage):
                records = self.activitynet_records(stage)
            else:
                records = read_video_list(self.root / self.lists[stage], self.root, self.num_classes)
                records = self.existing(records, self.root / self.lists[stage], stage)
        except AnnotationError as err:
            if not self.root.is_dir():
                raise AnnotationError(self.missing_root_message()) from None
            if self.download_hint and not (self.root / self.lists[stage]).is_file():
                raise AnnotationError(f"{err}\n{self.download_hint}") from None
            raise
        return ClipClassificationDataset(
            records,
            num_classes=self.num_classes,
            num_frames=self.num_frames,
            frame_stride=self.frame_stride,
            transform=transform,
            train=train,
            num_clips=1 if train else self.test_num_clips,
            multilabel=self.multilabel,
            min_video_frames=self.min_video_frames,
            bad_video=self.bad_video,
            decode_threads=self.decode_threads,
            decoder=self.decoder,
            static_clips=self.static_clips and train,
        )

    def missing_root_message(self) -> str:
        hint = f"\n{self.download_hint}" if self.download_hint else ""
        return (
            f"data root {self.root} does not exist: set data.init_args.root to the folder holding the videos and "
            f"the lists{hint}"
        )

    def existing(self, records: list[VideoRecord], list_file: Path, stage: str) -> list[VideoRecord]:
        """Check at setup that every listed video exists: the missing ones go through ``settle`` (an error naming
        them, or left out and counted once per list), and a list none of whose videos exists is an error."""
        missing = [r.path for r in records if not Path(r.path).is_file()]
        reading = [s for s, name in self.lists.items() if name and self.root / name == list_file]
        self.settle_missing(
            missing, len(records), str(list_file), "fix the paths in the list or data.init_args.root",
            reading or [stage],
        )
        gone = set(missing)
        return [r for r in records if r.path not in gone]

    def settle_missing(
        self, missing: list[str], listed: int, source: str, fix: str, stages: Sequence[str]
    ) -> None:
        """The set-up report of listed videos that are not there (each list or subset counted once, for the
        ``stages`` that read it)."""
        if not missing:
            return
        if len(missing) == listed:
            raise AnnotationError(
                f"{source}: none of its {listed} videos exists (first: {missing[0]}); {fix}"
            )
        if source in self._missing_counted:
            return
        count = f"{len(missing)} of {listed} listed videos missing"
        problems = [
            Problem("missing", source, f"video {path} does not exist ({count})", path) for path in missing
        ]
        self.settle(problems, source, stages)
        self._missing_counted.add(source)

    def activitynet_records(self, stage: str) -> list[VideoRecord]:
        json_file, subset = self.root / self.lists[stage], self.subsets[stage]
        split = read_activitynet(json_file, self.video_dir, subset, self.class_names)
        listed = len(split.missing) + len(split.records)
        fix = f"download them into {self.video_dir}"
        reading = [s for s in self.lists if self.lists[s] == self.lists[stage] and self.subsets[s] == subset]
        self.settle_missing(split.missing, listed, f"{json_file}, subset {subset!r}", fix, reading)
        several = sum(len(r.labels) > 1 for r in split.records)
        if several and not self.multilabel:
            log.warning(
                "%d '%s' videos of %s have several labels; with multilabel: false only the first (by class "
                "index) is used. Set data.init_args.multilabel: true for multi-label targets and mAP",
                several, subset, json_file,
            )  # fmt: skip
        return split.records
