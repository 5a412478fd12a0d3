"""Temporal action detection data: THUMOS14 and ActivityNet-1.3 videos as fixed-length windows of frames.

Annotations are ActivityNet / OpenTAD-style JSON (``{"database": {id: {"subset", "duration", "annotations":
[{"label", "segment": [start_s, end_s]}]}}}``; ``frame`` and ``fps`` may be present and are not needed: frame
rate and count come from the decoder) plus an optional class list (one label per line, line number = class id;
without it the classes are the JSON's labels sorted by name).

Two ways to make windows (``mode``), as AdaTAD in OpenTAD:

- ``"sliding_window"`` (THUMOS14): a frame every ``frame_stride`` native frames. Training takes one random
  crop of ``window_size`` sampled frames per video and epoch (``random_truncation``); evaluation covers the
  whole video with windows ``window_overlap`` apart, the last one aligned to the end
  (``sliding_window_starts``). A window longer than what is left of the video repeats its last frame, and
  ``valid`` marks the real frames.
- ``"resize"`` (ActivityNet-1.3): the whole video resampled uniformly to ``window_size`` frames, one window.

Segments are in steps of the window: step ``k`` is at ``window_start + k * seconds_per_step`` seconds, so a
window's segments lie in ``[0, window_size]``. In sliding-window mode frame ``k`` of the window is shown at
exactly that time; in resize mode it is the frame shown in the middle of step ``k``, as in OpenTAD.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from datamodules import synthetic
from datamodules.activitynet import VIDEO_EXTENSIONS, class_names_of, load_database
from datamodules.base import (
    AnnotationError,
    Problem,
    VideoDataModule,
    video_names,
)
from datamodules.kinetics_list import read_class_names
from datamodules.sampling import sliding_window_starts
from datamodules.synthetic import TemporalSet, chosen_settings
from datamodules.temporal_windows import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TemporalEvalTransform,
    TemporalTrainTransform,
    TemporalVideo,
    TemporalWindowDataset,
    collate_windows,
)
from datamodules.video_io import VideoDecodeError, open_video

log = logging.getLogger(__name__)

ANNOTATION_FIXES = {
    "missing": "download it (as <id>.<ext> or v_<id>.<ext>) into the video folder, {skip}",
    "unknown_label": "add the label to the class list, or leave classes_file unset to take the classes "
    "from the JSON, {skip}",
    "segment_past_end": "fix the segment or the video's duration, raise data.init_args.end_tolerance, {skip}",
    "empty_segment": "fix the segment (start must be before end), {skip}",
    "duration_mismatch": "fix 'duration' in the JSON or replace the video file, raise "
    "data.init_args.duration_tolerance, {skip}",
}


class _DurationMismatch(ValueError):
    """A video file whose length disagrees with its JSON duration."""


class TemporalDetectionDataModule(VideoDataModule):
    """THUMOS14 / ActivityNet-1.3 temporal detection windows from OpenTAD-style JSON (see the module doc).

    Files: ``root/annotation_file``, ``root/classes_file`` (optional) and the videos in ``root/video_dir`` as
    ``<id>.<ext>`` or ``v_<id>.<ext>`` (``video_ext``, or any common container when unset). Training reads the
    ``train_subset`` entries (OpenTAD's THUMOS JSON calls the 200 validation videos "training"), evaluation
    the ``eval_subset`` ones. Defaults are AdaTAD's THUMOS14 setting; for ActivityNet-1.3 set
    ``mode: resize``, ``min_segment_fraction: 0.01`` and ``class_agnostic: true`` (AdaTAD fuses an external
    video classifier's classes).

    Checks, at setup, before any worker starts: a missing video, an unknown label, a segment with start >= end
    and one outside the video (by more than ``end_tolerance`` seconds) stop the run with the file, the video
    and the fix under ``bad_video: error``; under ``skip`` the video (if missing) or the segment is left out,
    counted by kind in ``skip_counts`` and logged once. Labels in ``ignore_labels`` (THUMOS's "Ambiguous") are
    dropped silently, as OpenTAD does, and duplicates are kept once (as the ActivityNet evaluation does).
    Training leaves out videos with no segment left (after ``min_segment_fraction``, OpenTAD's ``filter_gt``).
    The evaluation videos are opened at setup (in sliding-window mode their windows are planned from the frame
    count); one whose file is more than ``duration_tolerance`` seconds longer or shorter than its JSON
    ``duration`` (the segments are in the JSON's seconds, and ``resize`` scales them by it) stops the run, or is
    left out and counted under ``skip``.
    ``eval_max_videos`` evaluates the first N videos of the evaluation subset only (JSON order).
    ``predict_videos`` (files or folders) are windowed as evaluation videos, with no annotation (only the class
    list is read, for the detections' names); their ``video_index`` is their position in that list.

    ``augment_on``: where the training windows' resize, flip, RandAugment and colour jitter run, in the loader
    workers (``loader``) or on the batch once it is on the training device (``device``: the same ops from the
    same per-window draws; a worker then only decodes and crops, and keeps up with raw decoding, so a GPU needs
    far fewer workers: README, "Loader workers per GPU").

    ``synthetic`` (``true``, or ``TemporalSet`` settings such as ``{num_videos: 240, seconds: 12}``) writes the
    synthetic temporal set (``datamodules.synthetic.generate_temporal``) to ``root`` on first use, and again
    when its settings change, but never into a non-empty folder the generator did not write. ``download_hint``
    is added to the error raised when data is missing.
    """

    annotation_fixes: ClassVar[Mapping[str, str]] = ANNOTATION_FIXES

    def __init__(
        self,
        root: str,
        annotation_file: str = "annotations.json",
        classes_file: str | None = "category_idx.txt",
        video_dir: str = "videos",
        video_ext: str | None = None,
        train_subset: str = "training",
        eval_subset: str = "validation",
        mode: Literal["sliding_window", "resize"] = "sliding_window",
        window_size: int = 768,
        frame_stride: int = 4,
        window_overlap: float = 0.5,
        trunc_thresh: float = 0.75,
        crop_ratio: tuple[float, float] | None = (0.9, 1.0),
        window_ioa_thresh: float = 0.75,
        ignore_labels: tuple[str, ...] = ("Ambiguous",),
        class_agnostic: bool = False,
        min_segment_fraction: float = 0.0,
        end_tolerance: float = 1.0,
        duration_tolerance: float = 3.0,
        crop_size: int = 160,
        train_short_side: int = 182,
        eval_short_side: int = 160,
        area_range: tuple[float, float] = (0.08, 1.0),
        aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        randaugment_ops: int = 2,
        randaugment_magnitude: int = 9,
        color_jitter: tuple[float, float, float, float] | None = (0.5, 0.5, 0.5, 0.1),
        augment_on: Literal["loader", "device"] = "loader",
        synthetic: bool | TemporalSet = False,
        download_hint: str | None = None,
        eval_max_videos: int | None = None,
        batch_size: int = 2,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        **kwargs: Any,
    ):
        super().__init__(batch_size=batch_size, mean=mean, std=std, **kwargs)
        if mode not in ("sliding_window", "resize"):
            raise ValueError(f"mode must be 'sliding_window' or 'resize', got {mode!r}")
        if not 0.0 <= window_overlap < 1.0:
            raise ValueError(f"window_overlap must be in [0, 1), got {window_overlap}")
        if window_size < 1 or frame_stride < 1:
            raise ValueError(f"window_size and frame_stride must be >= 1, got {window_size}, {frame_stride}")
        if min(train_short_side, eval_short_side) < crop_size:
            raise ValueError(
                f"short sides {train_short_side}, {eval_short_side} must be >= crop_size {crop_size}"
            )
        self.root = Path(root)
        self.annotation_path = self.root / annotation_file
        self.classes_path = self.root / classes_file if classes_file else None
        self.video_dir = self.root / video_dir
        self.video_ext = video_ext
        self.subsets = {
            "train": train_subset,
            "val": eval_subset,
            "test": eval_subset,
            "predict": eval_subset,
        }
        self.mode = mode
        self.window_size = window_size
        self.frame_stride = frame_stride
        self.window_overlap = window_overlap
        self.trunc_thresh = trunc_thresh
        self.crop_ratio = crop_ratio
        self.window_ioa_thresh = window_ioa_thresh
        self.ignore_labels = tuple(ignore_labels)
        self.class_agnostic = class_agnostic
        self.min_segment_fraction = min_segment_fraction
        self.end_tolerance = end_tolerance
        self.duration_tolerance = duration_tolerance
        self.train_transform = TemporalTrainTransform(
            crop_size, train_short_side, area_range, aspect_ratio_range, flip, randaugment_ops,
            randaugment_magnitude, color_jitter, augment_on,
        )  # fmt: skip
        self.crop_size = crop_size
        self.eval_short_side = eval_short_side
        self.synthetic_set = chosen_settings(synthetic, "temporal")
        self.synthetic = self.synthetic_set is not None
        self.download_hint = download_hint
        if eval_max_videos is not None and eval_max_videos < 1:
            raise ValueError(
                f"eval_max_videos must be a positive number of videos or None, got {eval_max_videos}"
            )
        self.eval_max_videos = eval_max_videos
        self._database: dict[str, dict[str, Any]] | None = None
        self._class_names: list[str] | None = None
        self._video_files: dict[str, Path] | None = None
        self._subset_videos: dict[tuple[str, bool], list[TemporalVideo]] = {}

    # ------------------------------------------------------------------------------------------- files

    def prepare_data(self) -> None:
        if self.predicting_own_videos():
            return  # the files named, nothing else
        if not self.synthetic or synthetic.is_complete(self.root, "temporal", **asdict(self.synthetic_set)):
            return
        if synthetic.is_complete(self.root, kind=None) and not synthetic.is_complete(self.root, "temporal"):
            raise FileExistsError(
                f"{self.root} holds another kind of synthetic set; point data.init_args.root at an empty or "
                "new folder for the synthetic temporal set"
            )
        # The generator itself refuses a non-empty folder it did not write.
        log.info("writing the synthetic temporal detection set to %s", self.root)
        synthetic.generate_temporal(self.root, self.synthetic_set)

    def _missing_data(self, what: str) -> AnnotationError:
        message = (
            f"{what} not found. Temporal detection needs the annotations in OpenTAD's JSON format (THUMOS14: "
            "thumos_14_anno.json and category_idx.txt; ActivityNet-1.3: activity_net.v1-3.min.json and "
            f"category_idx.txt, from OpenTAD's tools/prepare_data) at {self.annotation_path}, the class list "
            f"at {self.classes_path}, and the videos in {self.video_dir} as <id>.mp4 or v_<id>.mp4; set "
            "data.init_args.root / annotation_file / classes_file / video_dir to where they are"
        )
        return AnnotationError(f"{message}\n{self.download_hint}" if self.download_hint else message)

    @property
    def database(self) -> dict[str, dict[str, Any]]:
        if self._database is None:
            if not self.annotation_path.is_file():
                raise self._missing_data(f"annotation file {self.annotation_path}")
            self._database = load_database(self.annotation_path)
        return self._database

    @property
    def video_ids(self) -> list[str]:
        """Video id of each ``video_index``: the JSON database's ids in file order."""
        return list(self.database)

    def stage_video_ids(self, stage: str) -> list[str]:
        """Video id of each ``video_index`` of ``stage``: ``video_ids``, or for a ``predict`` over
        ``predict_videos`` the files' names (``datamodules.base.video_names``)."""
        if stage == "predict" and self.predict_videos:
            return video_names(self.predict_files)
        return self.video_ids

    @property
    def class_names(self) -> list[str]:
        if self._class_names is None:
            if self.classes_path is not None and self.classes_path.is_file():
                self._class_names = read_class_names(self.classes_path)
            elif self.synthetic and self.classes_path == self.root / "category_idx.txt":
                self._class_names = list(synthetic.TEMPORAL_ACTIONS)  # the list the generator writes
            else:
                if self.classes_path is not None:
                    log.warning(
                        "class list %s not found: the classes are the labels of %s sorted by name",
                        self.classes_path, self.annotation_path,
                    )  # fmt: skip
                ignored = set(self.ignore_labels)
                self._class_names = [c for c in class_names_of(self.database) if c not in ignored]
        return self._class_names

    @property
    def num_classes(self) -> int:
        """Classes the detector predicts: 1 when ``class_agnostic``."""
        return 1 if self.class_agnostic else len(self.class_names)

    @property
    def video_files(self) -> dict[str, Path]:
        if self._video_files is None:
            if not self.video_dir.is_dir():
                raise self._missing_data(f"video folder {self.video_dir}")
            suffixes = {f".{self.video_ext.lstrip('.').lower()}"} if self.video_ext else set(VIDEO_EXTENSIONS)
            self._video_files = {p.stem: p for p in self.video_dir.iterdir() if p.suffix.lower() in suffixes}
        return self._video_files

    # ------------------------------------------------------------------------------------------ checks

    def where(self, video_id: str) -> str:
        """Where a set-up problem of ``video_id`` is: the annotation file and the video."""
        return f"{self.annotation_path}: video {video_id!r}"

    def stages_of(self, subset: str) -> list[str]:
        """The stages that read ``subset``."""
        return [stage for stage, name in self.subsets.items() if name == subset]

    def subset_videos(self, subset: str, opened: bool = False) -> list[TemporalVideo]:
        """The checked videos of ``subset`` (JSON order); ``opened``: each opened once for its frame count."""
        key = (subset, opened)
        if key not in self._subset_videos:
            if opened:
                videos, problems = [], []
                for video in self.subset_videos(subset):
                    try:
                        videos.append(self._opened(video))
                    except VideoDecodeError as err:
                        problems.append(Problem(err.kind, self.where(video.video_id), err.reason, err.path))
                    except _DurationMismatch as err:
                        problems.append(Problem("duration_mismatch", self.where(video.video_id), str(err), video.path))
                self.settle(problems, f"{self.annotation_path}, subset {subset!r}", self.stages_of(subset))
            else:
                videos = self._read_subset(subset)
            self._subset_videos[key] = videos
        return self._subset_videos[key]

    def _opened(self, video: TemporalVideo) -> TemporalVideo:
        """``video`` with its frame count, read from the file, whose length must agree with the JSON's duration
        (the segments are in the JSON's seconds; in ``resize`` mode they are scaled by it)."""
        if video.num_frames is not None:
            return video  # no duration in the JSON: it was the file's
        file = open_video(video.path, self.decode_threads, self.decoder)
        if abs(file.duration - video.duration) > self.duration_tolerance:
            raise _DurationMismatch(
                f"the JSON gives {video.duration:g} s but {video.path} holds {file.duration:.2f} s "
                f"({file.num_frames} frames at {file.fps:g} fps), more than duration_tolerance "
                f"{self.duration_tolerance:g} s apart"
            )
        return replace(video, num_frames=file.num_frames)

    def _read_subset(self, subset: str) -> list[TemporalVideo]:
        json_file, database, files = self.annotation_path, self.database, self.video_files
        index = {name: i for i, name in enumerate(self.class_names)}
        videos, problems = [], []
        for video_index, (video_id, entry) in enumerate(database.items()):
            if entry["subset"] != subset:
                continue
            path = files.get(video_id) or files.get(f"v_{video_id}")
            if path is None:
                reason = f"no video file {video_id}.* or v_{video_id}.* in {self.video_dir}"
                problems.append(Problem("missing", self.where(video_id), reason, video_id))
                continue
            duration, num_frames = entry.get("duration"), None
            if duration is None:  # optional in the JSON: the decoder knows
                try:
                    opened = open_video(path, self.decode_threads, self.decoder)
                except VideoDecodeError as err:
                    problems.append(Problem(err.kind, self.where(video_id), err.reason, err.path))
                    continue
                duration, num_frames = opened.duration, opened.num_frames
            elif not isinstance(duration, (int, float)) or not duration > 0:
                raise AnnotationError(
                    f"{json_file}: video {video_id!r}: 'duration' must be seconds > 0, got {duration!r}"
                )
            rows: list[tuple[float, float, int]] = []
            for ann in entry.get("annotations", []):
                label = ann["label"]
                if label in self.ignore_labels:
                    continue
                start, end = _segment(ann, json_file, video_id)
                where = f"segment [{start:g}, {end:g}] of {label!r}"
                if label not in index:
                    problems.append(
                        Problem(
                            "unknown_label", self.where(video_id), f"label {label!r} is not in the class list"
                        )
                    )
                elif start >= end:
                    problems.append(
                        Problem(
                            "empty_segment", self.where(video_id), f"{where} does not start before it ends"
                        )
                    )
                elif start < -self.end_tolerance or end > duration + self.end_tolerance:
                    reason = f"{where} is not within the video's {duration:g} s (+- {self.end_tolerance:g} s)"
                    problems.append(Problem("segment_past_end", self.where(video_id), reason))
                elif not any(
                    k == index[label] and abs(s - start) <= 1e-3 and abs(e - end) <= 1e-3 for s, e, k in rows
                ):
                    rows.append((start, end, index[label]))
            segments = np.array([r[:2] for r in rows], dtype=np.float64).reshape(-1, 2)
            labels = np.array([r[2] for r in rows], dtype=np.int64)
            videos.append(
                TemporalVideo(video_id, video_index, str(path), float(duration), segments, labels, num_frames)
            )
        self.settle(problems, f"{self.annotation_path}, subset {subset!r} (annotations)", self.stages_of(subset))
        if not videos:
            raise AnnotationError(f"{json_file}: subset {subset!r} has no usable video")
        return videos

    # ---------------------------------------------------------------------------------------- datasets

    def setup(self, stage: str) -> None:
        """Read and check the annotations (and plan the evaluation windows) before any worker starts."""
        stages = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
        for name in stages.get(stage, ()):
            self.dataset(name)

    @property
    def collate_fn(self) -> Callable[[Sequence[dict[str, Any]]], dict[str, Any]]:
        return collate_windows

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Under ``augment_on: device``, the training windows' resize, flip and photometric ops, on the device,
        before normalisation."""
        seeds, flips = batch.pop("photometric_seed", None), batch.pop("flip", None)
        if seeds is not None:
            transform, clips = self.train_transform, []
            for i, (clip, seed) in enumerate(zip(batch["video"], seeds, strict=True)):  # (3, T, h, w) uint8
                clip = clip.transpose(0, 1)
                if flips is not None:  # the worker cropped only
                    clip = transform.geometry(clip, bool(flips[i]))
                clips.append(transform.photometric(clip, seed).transpose(0, 1))
            batch["video"] = torch.stack(clips)
        return super().on_after_batch_transfer(batch, dataloader_idx)

    def _own_videos(self) -> list[TemporalVideo]:
        """The ``predict_videos`` files, opened once each for their length, without annotations."""
        videos, problems = [], []
        no_segments, no_labels = np.zeros((0, 2), np.float64), np.zeros(0, np.int64)
        for i, (path, name) in enumerate(zip(self.predict_files, video_names(self.predict_files), strict=True)):
            try:
                file = open_video(path, self.decode_threads, self.decoder)
            except VideoDecodeError as err:
                problems.append(Problem(err.kind, f"predict_videos: {path}", err.reason, err.path))
                continue
            videos.append(TemporalVideo(name, i, str(path), file.duration, no_segments, no_labels, file.num_frames))
        self.settle(problems, "predict_videos", ("predict",))
        if not videos:
            raise AnnotationError("predict_videos: no readable video")
        return videos

    def build_dataset(self, stage: str) -> TemporalWindowDataset:
        own = stage == "predict" and bool(self.predict_videos)
        if not own and not self.root.is_dir():
            raise self._missing_data(f"data root {self.root}")
        train = stage == "train"
        opened = not train  # evaluation videos are opened at set-up: windows planned, durations checked
        videos = self._own_videos() if own else self.subset_videos(self.subsets[stage], opened=opened)
        if not train and not own and self.eval_max_videos is not None:
            videos = videos[: self.eval_max_videos]  # e.g. block drop scoring on part of the training set
        if train:
            videos = [self._training_segments(v) for v in videos]
            videos = [v for v in videos if len(v.segments)]
            if not videos:
                raise AnnotationError(
                    f"{self.annotation_path}: no '{self.subsets[stage]}' video has a segment"
                )
            windows = [(i, 0) for i in range(len(videos))]
        elif self.mode == "sliding_window":
            windows = [
                (i, start)
                for i, v in enumerate(videos)
                for start in sliding_window_starts(
                    math.ceil(v.num_frames / self.frame_stride), self.window_size, self.window_overlap
                )
            ]
        else:
            windows = [(i, 0) for i in range(len(videos))]
        transform = (
            self.train_transform if train else TemporalEvalTransform(self.crop_size, self.eval_short_side)
        )
        return TemporalWindowDataset(
            videos, windows, transform, mode=self.mode, window_size=self.window_size,
            frame_stride=self.frame_stride, train=train, trunc_thresh=self.trunc_thresh,
            crop_ratio=self.crop_ratio, window_ioa_thresh=self.window_ioa_thresh,
            class_agnostic=self.class_agnostic, bad_video=self.bad_video, decode_threads=self.decode_threads,
            decoder=self.decoder,
        )  # fmt: skip

    def _training_segments(self, video: TemporalVideo) -> TemporalVideo:
        keep = (video.segments[:, 1] - video.segments[:, 0]) > self.min_segment_fraction * video.duration
        return replace(video, segments=video.segments[keep], labels=video.labels[keep])

    def ground_truth(self, stage: str = "val") -> dict[int, dict[str, Tensor]]:
        """The checked annotations of the videos the stage reads, per ``video_index``: ``segments`` (n, 2)
        float64 seconds and ``labels`` (n,) class indices (the real classes, even when ``class_agnostic``). In
        evaluation every usable video of the subset is there, with empty tensors when it has no action."""
        return {
            v.video_index: {
                "segments": torch.as_tensor(v.segments, dtype=torch.float64).reshape(-1, 2),
                "labels": torch.as_tensor(v.labels, dtype=torch.long),
            }
            for v in self.dataset(stage).videos
        }


def _segment(ann: dict[str, Any], json_file: Path, video_id: str) -> tuple[float, float]:
    segment = ann.get("segment")
    if (
        not isinstance(segment, (list, tuple))
        or len(segment) != 2
        or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in segment)
    ):
        raise AnnotationError(
            f"{json_file}: video {video_id!r}: 'segment' must be [start, end] in seconds, got {segment!r}"
        )
    return float(segment[0]), float(segment[1])


__all__ = ["ANNOTATION_FIXES", "TemporalDetectionDataModule"]
