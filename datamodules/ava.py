"""AVA v2.2 spatio-temporal action detection: keyframe clips with person boxes and multi-hot action targets.

The annotations (the official CSVs, label map, excluded timestamps and optional person-detector proposals, as
PySlowFast lays them out under ``root/annotations``) are read by ``datamodules.ava_annotations``; a sample is a
keyframe: every person of one (video, timestamp), with a multi-hot target over the label map's classes.
Proposals (``proposals_csv``, evaluation only) are kept from ``proposal_score_threshold`` on (0.8 as PySlowFast
with its detector's boxes); they travel in the batch as ``proposals`` for the off-the-shelf-detector ablation.
Evaluation then covers the keyframes of the ground truth and of the proposals.

Timestamps -> frames. AVA annotates whole seconds 902..1798 of each movie, and the official 15-minute clips
start at second 900, so second ``s`` is ``s - timestamp_offset`` seconds into the file (``timestamp_offset``
900; 0 for the synthetic set, whose timestamps count from the start of the file). PySlowFast, and EVAD built on
it, extract frames at 30 fps from the clip and take list entry ``(s - 900) * 30`` (0-based; the file is
``<video>_<%06d>.jpg`` numbered from 1) as the keyframe; the clip is the 16 entries ``key - 32, key - 28, ...,
key + 28`` (16 frames at stride 4, keyframe 9th), clamped to the list. Here the clip lives on the same
``frame_rate`` grid in time (``keyframe_clip_indices``): a decoded video at any native rate gives the frames
shown at those grid times, and extracted frames (``frames_dir``) are the grid itself. ``frame_rate: null``
takes the video's native frames as the grid instead.

Transforms (EVAD): training flips at random (boxes too) and resizes the short side to ``train_short_side``
(288; 224 for the ablations), no crop; evaluation resizes to ``eval_short_side`` (288). The resize is bilinear
without antialiasing, as the official loader's ``cv2.resize(INTER_LINEAR)`` (``antialias: true`` filters
first). Boxes become pixels of the resized clip; batches pad every clip to a multiple of ``pad_multiple`` (32),
and normalise with mean 0.45, std 0.225. ``resize_on: device`` (the recipes') leaves the resize and flip to the
training device, where the batch equals the loader's to one grey level (``KeyframeDetectionDataModule``).

The dataset (one keyframe clip per sample, from a video file or a frame folder) is in ``datamodules.ava_dataset``;
the clip geometry, transforms, collation, frame folders and setup checks that AVA shares with UCF101-24/JHMDB
live in ``datamodules.keyframes``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from datamodules import synthetic
from datamodules.ava_annotations import (
    AVAKeyframe,
    read_ava_csv,
    read_excluded_timestamps,
    read_label_map,
    read_proposals_csv,
)
from datamodules.ava_dataset import AVAKeyframeDataset, VideoSource
from datamodules.base import AnnotationError, Problem, video_names
from datamodules.keyframes import (
    AVA_MEAN,
    AVA_STD,
    KeyframeDetectionDataModule,
    count_frames,
    grid_length,
    keyframe_grid_index,
)
from datamodules.synthetic import SpatiotemporalSet, chosen_settings
from datamodules.video_io import VideoDecodeError, open_video

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")


class AVADataModule(KeyframeDetectionDataModule):
    """AVA v2.2 keyframe detection data (see the module doc), or the synthetic AVA-style set.

    Files under ``root``: ``train_csv`` / ``val_csv``, their excluded timestamps, ``label_map``, and the videos as
    ``video_dir/<id>.<ext>`` (``video_ext``, or any common container) or, with ``frames_dir``, extracted frames
    ``frames_dir/<frame_pattern>`` (numbered from ``first_frame_number``, at ``frame_rate``). Path arguments left
    unset take the official names (``annotations/ava_train_v2.2.csv``, ...; videos in ``videos_15min``), or the
    synthetic set's (``annotations/train.csv``, ...; ``videos``) when ``synthetic``. Training reads the train
    CSV, validation / test / predict the val CSV (AVA's test labels are not public).

    Checks at setup, before any worker starts: malformed rows are errors naming file and line; every video of
    the stage is opened (or its frame folder counted) once, and a missing or unreadable video, a keyframe before
    the start of its video or past its end is an error naming the CSV line and the fix under ``bad_video:
    error``, and is counted and left out under ``skip``. A class of the label map with no row in the training
    CSV (a mistyped id) is an error under ``empty_classes: error`` (a warning under ``warn``; unset: error for
    real data, warning for the synthetic set); rows of ids the map leaves out are dropped with a warning counting
    them per id.

    ``synthetic`` (``true``, or ``SpatiotemporalSet`` settings such as ``{num_videos: 320, max_actors: 2}``)
    writes the synthetic AVA-style set (``synthetic.generate_spatiotemporal``) to ``root`` on first use, and
    again when its settings change, never into a folder it did not write.
    ``timestamp_offset`` unset is 900 (AVA's 15-minute clips start at second 900), or 0 when ``synthetic``.

    ``predict_videos`` (files or folders) are read without annotations: a keyframe every
    ``predict_keyframe_interval`` seconds from second 0 to the end of each file (AVA annotates one per second;
    the AVA CSV the task writes holds whole seconds), timestamps counted from the file's start. Only the label
    map is read (for the actions' names).
    """

    annotation_fixes: ClassVar[dict[str, str]] = {
        "keyframe_past_end": "check timestamp_offset and frame_rate, and that the video is complete, {skip}",
        "before_start": "set timestamp_offset to the second the video file starts at (900 for AVA's 15-minute "
        "clips, 0 for the synthetic set), {skip}",
    }

    def __init__(
        self,
        root: str,
        train_csv: str | None = None,
        val_csv: str | None = None,
        label_map: str | None = None,
        train_label_map: str | None = None,
        train_excluded_timestamps: str | None = None,
        val_excluded_timestamps: str | None = None,
        video_dir: str | None = None,
        video_ext: str | None = None,
        frames_dir: str | None = None,
        frame_pattern: str = "{video}/{video}_{index:06d}.jpg",
        first_frame_number: int = 1,
        timestamp_offset: float | None = None,
        frame_rate: float | None = 30.0,
        num_frames: int = 16,
        frame_stride: int = 4,
        train_short_side: int = 288,
        eval_short_side: int = 288,
        flip: bool = True,
        antialias: bool = False,
        pad_multiple: int = 32,
        num_actions: int | None = 80,
        keep_unlabelled_boxes: bool = True,
        empty_classes: Literal["error", "warn"] | None = None,
        proposals_csv: str | None = None,
        proposal_score_threshold: float = 0.8,
        synthetic: bool | SpatiotemporalSet = False,
        download_hint: str | None = None,
        predict_keyframe_interval: int = 1,
        batch_size: int = 8,
        mean: tuple[float, float, float] = AVA_MEAN,
        std: tuple[float, float, float] = AVA_STD,
        **kwargs: Any,
    ):
        super().__init__(pad_multiple=pad_multiple, batch_size=batch_size, mean=mean, std=std, **kwargs)
        if num_frames < 1 or frame_stride < 1:
            raise ValueError(f"num_frames and frame_stride must be >= 1, got {num_frames}, {frame_stride}")
        if frames_dir is not None and frame_rate is None:
            raise ValueError(
                "extracted frames (frames_dir) need their frame_rate (30 for PySlowFast's AVA frames)"
            )
        if frame_rate is not None and frame_rate <= 0:
            raise ValueError(f"frame_rate must be > 0 or null, got {frame_rate}")
        self.root = Path(root)
        self.synthetic_set = chosen_settings(synthetic, "spatiotemporal")
        self.synthetic = self.synthetic_set is not None
        names = (
            {
                "train_csv": "annotations/train.csv", "val_csv": "annotations/val.csv",
                "label_map": "annotations/label_map.pbtxt",
                "train_excluded_timestamps": "annotations/train_excluded_timestamps.csv",
                "val_excluded_timestamps": "annotations/val_excluded_timestamps.csv", "video_dir": "videos",
            }
            if self.synthetic
            else {
                "train_csv": "annotations/ava_train_v2.2.csv", "val_csv": "annotations/ava_val_v2.2.csv",
                "label_map": "annotations/ava_action_list_v2.2_for_activitynet_2019.pbtxt",
                "train_excluded_timestamps": "annotations/ava_train_excluded_timestamps_v2.2.csv",
                "val_excluded_timestamps": "annotations/ava_val_excluded_timestamps_v2.2.csv", "video_dir": "videos_15min",
            }
        )  # fmt: skip
        if train_label_map is not None:
            names["train_label_map"] = train_label_map
        given = {
            "train_csv": train_csv, "val_csv": val_csv, "label_map": label_map, "train_label_map": train_label_map,
            "train_excluded_timestamps": train_excluded_timestamps, "val_excluded_timestamps": val_excluded_timestamps, "video_dir": video_dir,
        }  # fmt: skip
        self.paths = {k: self.root / (given[k] if given[k] is not None else names[k]) for k in names}
        self.separate_training_classes = train_label_map is not None
        self.given_paths = {k for k, v in given.items() if v is not None}
        self.video_ext = video_ext
        self.frames_root = self.root / frames_dir if frames_dir is not None else None
        self.frame_pattern = frame_pattern
        self.first_frame_number = first_frame_number
        self.timestamp_offset = float(
            timestamp_offset if timestamp_offset is not None else (0.0 if self.synthetic else 900.0)
        )
        self.frame_rate = frame_rate
        self.num_frames = num_frames
        self.frame_stride = frame_stride
        self.train_short_side = train_short_side
        self.eval_short_side = eval_short_side
        self.flip = flip
        self.antialias = antialias
        self.num_actions = num_actions
        self.keep_unlabelled_boxes = keep_unlabelled_boxes
        # The synthetic set is drawn at random: a small one may lack a class without any typo.
        self.empty_classes = empty_classes or ("warn" if self.synthetic else "error")
        self.proposals_path = self.root / proposals_csv if proposals_csv is not None else None
        self.proposal_score_threshold = proposal_score_threshold
        self.download_hint = download_hint
        if predict_keyframe_interval < 1:
            raise ValueError(f"predict_keyframe_interval must be >= 1 second, got {predict_keyframe_interval}")
        self.predict_keyframe_interval = predict_keyframe_interval
        self._label_map: dict[int, str] | None = None
        self._evaluated_label_map: dict[int, str] | None = None
        self._video_files: dict[str, Path] | None = None
        self._sources: dict[str, VideoSource | VideoDecodeError] = {}

    # -------------------------------------------------------------------------------------------- files

    def prepare_data(self) -> None:
        if self.predicting_own_videos():
            return  # the files named, nothing else
        if not self.synthetic or synthetic.is_complete(self.root, "spatiotemporal", **asdict(self.synthetic_set)):
            return
        if synthetic.is_complete(self.root, kind=None) and not synthetic.is_complete(
            self.root, "spatiotemporal"
        ):
            raise FileExistsError(
                f"{self.root} holds another kind of synthetic set; point data.init_args.root at an empty or "
                "new folder for the synthetic AVA-style set"
            )
        log.info("writing the synthetic spatio-temporal detection set to %s", self.root)
        synthetic.generate_spatiotemporal(self.root, self.synthetic_set)

    def _missing(self, what: str) -> AnnotationError:
        message = (
            f"{what} not found. AVA needs the official annotations (ava_{{train,val}}_v2.2.csv, the excluded "
            "timestamps and ava_action_list_v2.2_for_activitynet_2019.pbtxt) and the 15-minute videos (or "
            "extracted frames, frames_dir); set data.init_args.root and the path arguments to where they are"
        )
        return AnnotationError(f"{message}\n{self.download_hint}" if self.download_hint else message)

    def _read_label_map(self, key: str) -> dict[int, str]:
        if not self.paths[key].is_file():
            raise self._missing(f"label map {self.paths[key]} ({key})")
        return read_label_map(self.paths[key])

    @property
    def label_map(self) -> dict[int, str]:
        """AVA action id -> name of the classes the model is trained on: ``train_label_map``'s when it is given
        (the official 80 of ``ava_action_list_v2.2.pbtxt``), else ``label_map``'s."""
        if self._label_map is None:
            key = "train_label_map" if self.separate_training_classes else "label_map"
            unwritten = not self.paths[key].is_file()
            if self.synthetic and key not in self.given_paths and unwritten:
                # Asked before prepare_data has written the set (the CLI links num_classes to the model first).
                return {k + 1: name for k, name in enumerate(synthetic.SPATIOTEMPORAL_ACTIONS)}
            self._label_map = self._read_label_map(key)
        return self._label_map

    @property
    def evaluated_label_map(self) -> dict[int, str]:
        """AVA action id -> name of the evaluated classes: ``label_map``'s (the 60 of the ActivityNet file),
        which must all be training classes."""
        if not self.separate_training_classes:
            return self.label_map
        if self._evaluated_label_map is None:
            evaluated = self._read_label_map("label_map")
            untrained = sorted(set(evaluated) - set(self.label_map))
            if untrained:
                raise AnnotationError(
                    f"{self.paths['label_map']}: action ids {untrained[:5]} are evaluated but not trained "
                    f"(absent from train_label_map {self.paths['train_label_map']}); give a training label map "
                    "that holds every evaluated class"
                )
            self._evaluated_label_map = evaluated
        return self._evaluated_label_map

    @property
    def action_ids(self) -> list[int]:
        """AVA action id of each class index (ascending ids): column ``c`` of ``labels`` is ``action_ids[c]``."""
        return sorted(self.label_map)

    @property
    def class_names(self) -> list[str]:
        return [self.label_map[a] for a in self.action_ids]

    @property
    def num_classes(self) -> int:
        return len(self.label_map)

    @property
    def multilabel(self) -> bool:
        return True

    def video_names(self, stage: str = "val") -> list[str]:
        """Video id of each ``video_index`` of ``stage`` (e.g. to write detections as the official CSV)."""
        return [s.video_id for s in self.dataset(stage).sources]

    @property
    def video_files(self) -> dict[str, Path]:
        if self._video_files is None:
            folder = self.paths["video_dir"]
            if not folder.is_dir():
                raise self._missing(f"video folder {folder}")
            suffixes = {f".{self.video_ext.lstrip('.').lower()}"} if self.video_ext else set(VIDEO_EXTENSIONS)
            self._video_files = {p.stem: p for p in folder.iterdir() if p.suffix.lower() in suffixes}
        return self._video_files

    def _source(self, video_id: str) -> VideoSource:
        """The video's frames, count and rate (opened once per data module); raises ``VideoDecodeError``."""
        if video_id not in self._sources:
            try:
                if self.frames_root is not None:
                    count = count_frames(
                        self.frames_root, video_id, self.frame_pattern, self.first_frame_number
                    )
                    rate = float(self.frame_rate)  # type: ignore[arg-type]  # required with frames_dir
                    found: VideoSource | VideoDecodeError = VideoSource(
                        video_id, str(self.frames_root), count, rate, frames=True
                    )
                else:
                    path = self.video_files.get(video_id)
                    if path is None:
                        where = self.paths["video_dir"] / f"{video_id}.{self.video_ext or 'mp4'}"
                        raise VideoDecodeError(where, "missing", "video file not found")
                    video = open_video(path, self.decode_threads, self.decoder)
                    found = VideoSource(video_id, str(path), video.num_frames, video.fps)
            except VideoDecodeError as err:
                found = err
            self._sources[video_id] = found
        found = self._sources[video_id]
        if isinstance(found, VideoDecodeError):
            raise found
        return found

    # ------------------------------------------------------------------------------------------ datasets

    def keyframes(self, stage: str) -> list[AVAKeyframe]:
        """The stage's keyframes as annotated (before the checks against the videos)."""
        train = stage == "train"
        csv_path = self.paths["train_csv" if train else "val_csv"]
        excluded_path = self.paths["train_excluded_timestamps" if train else "val_excluded_timestamps"]
        if not self.root.is_dir():
            raise self._missing(f"data root {self.root}")
        if not csv_path.is_file():
            raise self._missing(f"annotation file {csv_path}")
        # A default name may be absent (no keyframe is then excluded); a path given must exist.
        explicit = ("train_excluded_timestamps" if train else "val_excluded_timestamps") in self.given_paths
        if not explicit and not excluded_path.is_file():
            log.warning("no excluded-timestamps file %s: no keyframe is excluded", excluded_path)
            excluded_path = None
        excluded = read_excluded_timestamps(excluded_path)
        keyframes = read_ava_csv(
            csv_path, self.action_ids, self.num_actions, excluded, self.keep_unlabelled_boxes,
            empty_classes=self.empty_classes if train else "warn",  # a class may be missing from a small val set
        )
        if train or self.proposals_path is None:
            return keyframes
        proposals = read_proposals_csv(self.proposals_path, self.proposal_score_threshold, excluded)
        no_boxes = np.zeros((0, 4), np.float32)
        merged = []
        for k in keyframes:
            boxes, scores, _ = proposals.pop(
                (k.video_id, k.timestamp), (no_boxes, np.zeros(0, np.float32), 0)
            )
            merged.append(replace(k, proposals=boxes, proposal_scores=scores))
        # Keyframes with detections but no ground truth: their detections are false positives in the metric.
        no_labels = np.zeros((0, self.num_classes), np.float32)
        for (video, ts), (boxes, scores, line) in proposals.items():
            source = str(self.proposals_path)
            merged.append(AVAKeyframe(video, ts, source, line, no_boxes, no_labels, -1, boxes, scores))
        order = {v: i for i, v in reversed(list(enumerate(k.video_id for k in merged)))}
        return sorted(merged, key=lambda k: (order[k.video_id], k.timestamp))

    def _own_keyframes(self) -> tuple[list[AVAKeyframe], list[VideoSource]]:
        """A keyframe every ``predict_keyframe_interval`` seconds of each ``predict_videos`` file, no boxes."""
        sources, keyframes, problems = [], [], []
        no_boxes, no_labels = np.zeros((0, 4), np.float32), np.zeros((0, self.num_classes), np.float32)
        for path, name in zip(self.predict_files, video_names(self.predict_files), strict=True):
            try:
                video = open_video(path, self.decode_threads, self.decoder)
            except VideoDecodeError as err:
                problems.append(Problem(err.kind, f"predict_videos: {path}", err.reason, err.path))
                continue
            last = grid_length(video.num_frames, video.fps, self.frame_rate) - 1
            seconds = range(0, int(video.duration) + 1, self.predict_keyframe_interval)
            times = [t for t in seconds if keyframe_grid_index(t, video.fps, self.frame_rate) <= last]
            keyframes += [AVAKeyframe(name, t, str(path), 0, no_boxes, no_labels, len(sources)) for t in times]
            sources.append(VideoSource(name, str(path), video.num_frames, video.fps))
        self.settle(problems, "predict_videos", ("predict",))
        if not keyframes:
            raise AnnotationError("predict_videos: no readable video")
        return keyframes, sources

    def build_dataset(self, stage: str) -> AVAKeyframeDataset:
        if stage == "predict" and self.predict_videos:
            keyframes, sources = self._own_keyframes()
            return AVAKeyframeDataset(
                keyframes, sources, self.eval_short_side, train=False, timestamp_offset=0.0,
                frame_rate=self.frame_rate, num_frames=self.num_frames, frame_stride=self.frame_stride,
                bad_video=self.bad_video, decode_threads=self.decode_threads, antialias=self.antialias,
                decoder=self.decoder, resize_on=self.resize_on,
            )  # fmt: skip
        keyframes = self.keyframes(stage)
        what = f"{stage} keyframes"
        first_row = {}
        for k in keyframes:
            first_row.setdefault(k.video_id, k.where)
        sources: list[VideoSource] = []
        position: dict[str, int] = {}
        problems = []
        for video_id, where in first_row.items():
            try:
                position[video_id] = len(sources)
                sources.append(self._source(video_id))
            except VideoDecodeError as err:
                del position[video_id]
                problems.append(Problem(err.kind, where, f"video {video_id!r}: {err}", err.path))
        self.settle(problems, what, (stage,))
        checked, problems = [], []
        for k in sorted(keyframes, key=lambda k: (k.file, k.line)):  # problems in file order
            if k.video_id not in position:
                continue
            source = sources[position[k.video_id]]
            seconds = k.timestamp - self.timestamp_offset
            last = grid_length(source.num_frames, source.fps, self.frame_rate) - 1
            if seconds < 0:
                reason = (
                    f"keyframe {k.timestamp} of {k.video_id!r} is before timestamp_offset "
                    f"{self.timestamp_offset:g}, the start of the video"
                )
                problems.append(Problem("before_start", k.where, reason))
            elif keyframe_grid_index(seconds, source.fps, self.frame_rate) > last:
                duration = source.num_frames / source.fps
                reason = (
                    f"keyframe {k.timestamp} of {k.video_id!r} is {seconds:g} s into {source.path}, past its end "
                    f"({source.num_frames} frames, {duration:.2f} s)"
                )
                problems.append(Problem("keyframe_past_end", k.where, reason))
            else:
                checked.append(replace(k, video_index=position[k.video_id]))
        checked.sort(key=lambda k: (k.video_index, k.timestamp))
        self.settle(problems, f"{what} (against their videos)", (stage,))
        if not checked:
            raise AnnotationError(
                f"{self.paths['train_csv' if stage == 'train' else 'val_csv']}: no usable keyframe"
            )
        train = stage == "train"
        return AVAKeyframeDataset(
            checked, sources, self.train_short_side if train else self.eval_short_side, train=train,
            flip=self.flip, timestamp_offset=self.timestamp_offset, frame_rate=self.frame_rate,
            num_frames=self.num_frames, frame_stride=self.frame_stride, frame_pattern=self.frame_pattern,
            first_frame_number=self.first_frame_number, bad_video=self.bad_video,
            decode_threads=self.decode_threads, antialias=self.antialias, decoder=self.decoder,
            resize_on=self.resize_on,
        )  # fmt: skip


__all__ = ["AVADataModule", "AVAKeyframeDataset", "VideoSource"]
