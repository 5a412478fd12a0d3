"""UCF101-24 and JHMDB-21 spatio-temporal action detection from the ACT-detector ground-truth pickles.

The pickles (``UCF101v2-GT.pkl``, ``JHMDB-GT.pkl``, as ACT-detector and MOC-detector distribute them; written by
Python 2, so read with latin-1) hold:

- ``labels``: the class names (24 / 21); class index = position.
- ``gttubes``: ``{video: {class index: [tube, ...]}}``, a tube an array (n, 5) of ``frame, x1, y1, x2, y2`` with
  1-based frame numbers and boxes in pixels of the original frames.
- ``nframes``: ``{video: number of frames}``; ``resolution``: ``{video: (height, width)}``.
- ``train_videos`` / ``test_videos``: one list of videos per split (UCF101-24: 1 split; JHMDB: 3, ``split``).

A pickle can run code while it loads; these files are read by an unpickler that builds only what the format
holds (dicts, lists, tuples, strings, numbers, numpy arrays and scalars) and refuses any other name in the file,
so nothing in it runs.

Frames are read from ``frames_dir/frame_pattern``, by default ``rgb-images/{video}/{index:05d}.jpg`` numbered
from 1 (the layout MOC distributes for UCF101-24; its JHMDB copy is ``Frames/{video}/{index:05d}.png``).

Samples. Training: one per frame of a training video that has at least one ground-truth box, with the clip of
``num_frames`` frames at ``frame_stride`` centred on it (``clip_frame_indices``: the frame is entry
``num_frames // 2``; clamped to the video). Evaluation: every ``eval_frame_step``-th frame of every test video
from frame 1, with or without boxes, so that video-mAP can link each video's detections into tubes.

Transforms: training resizes the short side to a random size in ``train_short_side`` (UCF101-24: 224; JHMDB:
256-320) and flips at random; evaluation resizes to ``eval_short_side`` (UCF101-24: 256). Boxes are clipped to
the frame (boxes that are then empty are dropped and counted), and given in pixels of the resized clip;
clip geometry, padding, normalisation and ``resize_on`` are AVA's, from ``datamodules.keyframes``. The batch is
AVA's with ``frame`` (1-based) instead of ``timestamp`` and, per sample, ``labels`` (n, C) one-hot, ``classes``
(n,) class indices and ``tube_ids`` (n,), the ground-truth tube of each box within its video (what the video-mAP
metric needs).
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.base import (
    AnnotationError,
    BadVideoPolicy,
    Problem,
    SampleKey,
    load_guarded,
    seeded,
    split_key,
    video_names,
)
from datamodules.keyframes import (
    AVA_MEAN,
    AVA_STD,
    FrameFolder,
    KeyframeDetectionDataModule,
    ResizeOn,
    clip_frame_indices,
    transform_keyframe_clip,
)
from datamodules.video_io import Decoder, VideoDecodeError, open_video

log = logging.getLogger(__name__)

PICKLE_KEYS = ("labels", "gttubes", "nframes", "train_videos", "test_videos", "resolution")


@dataclass(frozen=True)
class ActAnnotations:
    """The content of an ACT ground-truth pickle (see the module doc)."""

    path: str
    labels: list[str]
    gttubes: Mapping[str, Mapping[int, Sequence[np.ndarray]]]
    nframes: Mapping[str, int]
    train_videos: list[list[str]]
    test_videos: list[list[str]]
    resolution: Mapping[str, tuple[int, int]]

    @property
    def num_splits(self) -> int:
        return len(self.train_videos)

    def videos(self, subset: str, split: int = 1) -> list[str]:
        """The ``"train"`` or ``"test"`` videos of ``split`` (1-based, as the papers number them)."""
        lists = self.train_videos if subset == "train" else self.test_videos
        if not 1 <= split <= len(lists):
            raise AnnotationError(
                f"{self.path}: split {split} does not exist; it has splits 1..{len(lists)} (UCF101-24 has 1, "
                "JHMDB 3): set data.init_args.split"
            )
        return list(lists[split - 1])


@dataclass(frozen=True, eq=False)
class ActVideo:
    """One video's ground truth: rows ``frame, x1, y1, x2, y2, class, tube id`` sorted by frame."""

    name: str
    video_index: int
    num_frames: int
    resolution: tuple[int, int]  # (height, width) of the frames the boxes are in
    rows: np.ndarray  # (n, 7) float64
    file: str | None = None  # a video file to decode instead of the frame folder (predict_videos)

    def boxes_at(self, frame: int) -> np.ndarray:
        """The rows of ``frame`` (1-based)."""
        lo, hi = np.searchsorted(self.rows[:, 0], [frame, frame + 1])
        return self.rows[lo:hi]

    def annotated_frames(self) -> np.ndarray:
        return np.unique(self.rows[:, 0]).astype(np.int64)


#: The globals an ACT ground-truth pickle names (numpy arrays and scalars, Python 2's byte strings, sets), as
#: (module, name) before and after Python 2's names are mapped; the unpickler refuses every other one.
_ACT_GLOBALS = {
    (module, name)
    for prefix in ("numpy.core", "numpy._core")
    for module, name in ((f"{prefix}.multiarray", "_reconstruct"), (f"{prefix}.multiarray", "scalar"))
} | {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("collections", "OrderedDict"),
    ("__builtin__", "set"), ("builtins", "set"), ("__builtin__", "frozenset"), ("builtins", "frozenset"),
}  # fmt: skip


class _DataOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ACT_GLOBALS:
            raise pickle.UnpicklingError(
                f"it names {module}.{name}, which an ACT ground-truth pickle never holds (not loaded: a pickle "
                "naming other objects can run code); use the file ACT-detector / MOC-detector distribute"
            )
        return super().find_class(module, name)


def read_act_pickle(path: str | Path) -> ActAnnotations:
    """Load and check the layout of an ACT ground-truth pickle; errors name the file, the entry and the fix."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(
            f"ground-truth pickle {path} not found; UCF101-24 and JHMDB need ACT-detector's UCF101v2-GT.pkl / "
            "JHMDB-GT.pkl (distributed with MOC-detector's data): set data.init_args.root / annotation_file"
        )
    try:
        with path.open("rb") as handle:
            data = _DataOnlyUnpickler(handle, encoding="latin1").load()  # written by Python 2
    except Exception as err:  # noqa: BLE001 - unpickling raises many types
        raise AnnotationError(f"{path}: not a readable pickle ({err})") from None
    missing = [k for k in PICKLE_KEYS if not isinstance(data, dict) or k not in data]
    if missing:
        raise AnnotationError(
            f"{path}: no {', '.join(map(repr, missing))} entry; an ACT ground-truth pickle is a dict with "
            f"{', '.join(PICKLE_KEYS)}"
        )
    splits = {}
    for key in ("train_videos", "test_videos"):
        value = data[key]
        if (
            not isinstance(value, (list, tuple))
            or not value
            or not all(isinstance(s, (list, tuple)) for s in value)
        ):
            raise AnnotationError(f"{path}: {key!r} must be a list of video lists, one per split")
        splits[key] = [list(s) for s in value]
    if len(splits["train_videos"]) != len(splits["test_videos"]):
        raise AnnotationError(f"{path}: 'train_videos' and 'test_videos' have different numbers of splits")
    return ActAnnotations(
        str(path), list(data["labels"]), data["gttubes"], data["nframes"], splits["train_videos"],
        splits["test_videos"], data["resolution"],
    )  # fmt: skip


def act_video(annotations: ActAnnotations, name: str, video_index: int) -> tuple[ActVideo, int]:
    """A video's checked ground truth, and the number of boxes dropped because they are empty in the frame.

    Frame numbers outside 1..nframes, a frame twice in one tube, an unknown class index or a malformed tube
    are errors naming the file, video and tube. Boxes are clipped to the frame.
    """
    where = f"{annotations.path}: video {name!r}"
    for key in ("nframes", "resolution"):
        if name not in getattr(annotations, key):
            raise AnnotationError(f"{where} has no {key!r} entry; every listed video needs one")
    num_frames = int(annotations.nframes[name])
    height, width = (int(v) for v in annotations.resolution[name])
    rows, dropped, tube_id = [], 0, 0
    tubes = annotations.gttubes.get(name, {})
    for label in sorted(tubes):
        if not 0 <= int(label) < len(annotations.labels):
            raise AnnotationError(
                f"{where}: class index {label} is not one of the {len(annotations.labels)} labels"
            )
        for k, tube in enumerate(tubes[label]):
            tube = np.asarray(tube, dtype=np.float64)
            here = f"{where}, class {label}, tube {k}"
            if tube.ndim != 2 or tube.shape[1] != 5:
                raise AnnotationError(
                    f"{here}: a tube is an array (n, 5) of frame, x1, y1, x2, y2, got {tube.shape}"
                )
            frames = tube[:, 0]
            if np.any(frames != np.round(frames)) or np.any(frames < 1) or np.any(frames > num_frames):
                raise AnnotationError(f"{here}: frame numbers must be whole, within 1..nframes={num_frames}")
            if len(np.unique(frames)) != len(frames):
                raise AnnotationError(f"{here}: a frame has two boxes in one tube")
            boxes = np.clip(tube[:, 1:], 0.0, [width, height, width, height])
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            dropped += int((~keep).sum())
            n = int(keep.sum())
            rows.append(
                np.column_stack([frames[keep], boxes[keep], np.full(n, int(label)), np.full(n, tube_id)])
            )
            tube_id += 1
    table = np.concatenate(rows) if rows else np.zeros((0, 7))
    table = table[np.argsort(table[:, 0], kind="stable")]
    return ActVideo(name, video_index, num_frames, (height, width), table), dropped


class ActFrameDataset(Dataset):
    """Clips around frames of ACT-annotated videos; ``samples`` are (video position, frame number) pairs.

    Samples: ``video`` uint8 (3, T, h, w), ``boxes`` (n, 4) float32 pixels of the resized clip, ``labels`` (n, C)
    one-hot float32, ``classes`` and ``tube_ids`` (n,) int64, ``image_size`` / ``orig_size`` (h, w), ``index``,
    ``video_index`` and ``frame`` (1-based).
    """

    def __init__(
        self,
        videos: Sequence[ActVideo],
        samples: Sequence[tuple[int, int]],
        num_classes: int,
        frames_root: str | Path,
        frame_pattern: str = "{video}/{index:05d}.jpg",
        first_frame_number: int = 1,
        num_frames: int = 16,
        frame_stride: int = 1,
        short_side: tuple[int, int] = (224, 224),
        train: bool = False,
        flip: bool = True,
        bad_video: BadVideoPolicy = "error",
        decoder: Decoder = "auto",
        resize_on: ResizeOn = "loader",
    ):
        self.videos = list(videos)
        self.resize_on = resize_on
        self.decoder = decoder
        self.samples = list(samples)
        self.num_classes = num_classes
        self.frames_root = Path(frames_root)
        self.frame_pattern = frame_pattern
        self.first_frame_number = first_frame_number
        self.num_frames = num_frames
        self.frame_stride = frame_stride
        self.short_side = short_side
        self.train = train
        self.flip = flip
        self.bad_video = bad_video

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | SampleKey) -> dict[str, Any]:
        index, seed = split_key(key)
        with seeded(seed):
            return load_guarded(lambda: self.load(index), self.bad_video, index)

    def clip_indices(self, index: int) -> np.ndarray:
        """0-based frame indices of sample ``index``'s clip."""
        position, frame = self.samples[index]
        return clip_frame_indices(
            frame - 1, self.videos[position].num_frames, self.num_frames, self.frame_stride
        )

    def load(self, index: int) -> dict[str, Any]:
        position, frame = self.samples[index]
        video = self.videos[position]
        source = (
            open_video(video.file, decoder=self.decoder)
            if video.file is not None
            else FrameFolder(
                self.frames_root, video.name, self.frame_pattern, video.num_frames, self.first_frame_number
            )
        )
        frames = source.get_frames(self.clip_indices(index))
        rows = video.boxes_at(frame)
        height, width = video.resolution
        lo, hi = self.short_side
        short_side = lo if lo == hi else int(torch.randint(lo, hi + 1, ()))
        flip = self.train and self.flip and bool(torch.rand(()) < 0.5)
        normalised = rows[:, 1:5] / np.array([width, height, width, height], dtype=np.float64)
        clip, (boxes,), size = transform_keyframe_clip(frames, [normalised], short_side, flip, resize_on=self.resize_on)
        classes = torch.as_tensor(rows[:, 5], dtype=torch.long)
        labels = torch.zeros(len(rows), self.num_classes)
        labels[torch.arange(len(rows)), classes] = 1.0
        sample = {
            "video": clip,
            "boxes": boxes,
            "labels": labels,
            "classes": classes,
            "tube_ids": torch.as_tensor(rows[:, 6], dtype=torch.long),
            "image_size": size,
            "orig_size": tuple(frames.shape[1:3]),
            "index": index,
            "video_index": video.video_index,
            "frame": frame,
        }
        if self.resize_on == "device":
            sample["flip"] = flip
        return sample


class ActPickleDataModule(KeyframeDetectionDataModule):
    """UCF101-24 / JHMDB frame-level detection data from an ACT ground-truth pickle (see the module doc).

    ``root/annotation_file`` is the pickle (``UCF101v2-GT.pkl`` or ``JHMDB-GT.pkl``), the frames
    ``root/frames_dir/frame_pattern``. Training reads the ``train_videos`` of ``split`` (1-based), validation /
    test / predict its ``test_videos``. Defaults are UCF101-24's (split 1, train short side 224, test 256); for
    JHMDB set ``annotation_file: JHMDB-GT.pkl``, ``split`` 1-3 and ``train_short_side: [256, 320]``.

    Checks at setup: the pickle's layout, frame numbers and classes (errors naming the file and video); the
    first and last frame file of every video of the stage: a missing one stops the run with the fix under
    ``bad_video: error`` and is counted and left out under ``skip``.

    ``predict_videos`` (files or folders) are decoded directly, a clip around every ``eval_frame_step``-th frame,
    without annotations (the pickle is read for the class names only).
    """

    def __init__(
        self,
        root: str,
        annotation_file: str = "UCF101v2-GT.pkl",
        frames_dir: str = "rgb-images",
        frame_pattern: str = "{video}/{index:05d}.jpg",
        first_frame_number: int = 1,
        split: int = 1,
        num_frames: int = 16,
        frame_stride: int = 1,
        eval_frame_step: int = 1,
        train_short_side: tuple[int, int] = (224, 224),
        eval_short_side: int = 256,
        flip: bool = True,
        pad_multiple: int = 32,
        download_hint: str | None = None,
        batch_size: int = 8,
        mean: tuple[float, float, float] = AVA_MEAN,
        std: tuple[float, float, float] = AVA_STD,
        **kwargs: Any,
    ):
        super().__init__(pad_multiple=pad_multiple, batch_size=batch_size, mean=mean, std=std, **kwargs)
        if num_frames < 1 or frame_stride < 1 or eval_frame_step < 1:
            raise ValueError(
                f"num_frames, frame_stride and eval_frame_step must be >= 1, got {num_frames}, {frame_stride}, "
                f"{eval_frame_step}"
            )
        lo, hi = train_short_side
        if not 0 < lo <= hi:
            raise ValueError(
                f"train_short_side must be (min, max) with 0 < min <= max, got {train_short_side}"
            )
        self.root = Path(root)
        self.annotation_path = self.root / annotation_file
        self.frames_root = self.root / frames_dir
        self.frame_pattern = frame_pattern
        self.first_frame_number = first_frame_number
        self.split = split
        self.num_frames = num_frames
        self.frame_stride = frame_stride
        self.eval_frame_step = eval_frame_step
        self.train_short_side = (int(lo), int(hi))
        self.eval_short_side = eval_short_side
        self.flip = flip
        self.download_hint = download_hint
        self._annotations: ActAnnotations | None = None

    @property
    def annotations(self) -> ActAnnotations:
        if self._annotations is None:
            try:
                self._annotations = read_act_pickle(self.annotation_path)
            except AnnotationError as err:
                if self.download_hint and not self.annotation_path.is_file():
                    raise AnnotationError(f"{err}\n{self.download_hint}") from None
                raise
        return self._annotations

    @property
    def class_names(self) -> list[str]:
        return list(self.annotations.labels)

    @property
    def num_classes(self) -> int:
        return len(self.annotations.labels)

    @property
    def multilabel(self) -> bool:
        return False

    def video_names(self, stage: str = "val") -> list[str]:
        """Video name of each ``video_index`` of ``stage``."""
        return [v.name for v in self.dataset(stage).videos]

    def _own_videos(self) -> list[ActVideo]:
        videos, problems = [], []
        for path, name in zip(self.predict_files, video_names(self.predict_files), strict=True):
            try:
                file = open_video(path, decoder=self.decoder)
                height, width = file.get_frames([0]).shape[1:3]
            except VideoDecodeError as err:
                problems.append(Problem(err.kind, f"predict_videos: {path}", err.reason, err.path))
                continue
            videos.append(ActVideo(name, len(videos), file.num_frames, (height, width), np.zeros((0, 7)), str(path)))
        self.settle(problems, "predict_videos", ("predict",))
        if not videos:
            raise AnnotationError("predict_videos: no readable video")
        return videos

    def build_dataset(self, stage: str) -> ActFrameDataset:
        train = stage == "train"
        if stage == "predict" and self.predict_videos:
            videos = self._own_videos()
            samples = [(i, f) for i, v in enumerate(videos) for f in range(1, v.num_frames + 1, self.eval_frame_step)]
            return ActFrameDataset(
                videos, samples, self.num_classes, self.frames_root, self.frame_pattern, self.first_frame_number,
                self.num_frames, self.frame_stride, (self.eval_short_side, self.eval_short_side), train=False,
                flip=False, bad_video=self.bad_video, decoder=self.decoder, resize_on=self.resize_on,
            )  # fmt: skip
        annotations = self.annotations
        names = annotations.videos("train" if train else "test", self.split)
        videos, problems, dropped = [], [], 0
        for name in names:
            video, empty = act_video(annotations, name, len(videos))
            dropped += empty
            folder = FrameFolder(
                self.frames_root, name, self.frame_pattern, video.num_frames, self.first_frame_number
            )
            absent = [p for p in (folder.path(0), folder.path(video.num_frames - 1)) if not p.is_file()]
            if absent:
                reason = f"frame file {absent[0]} not found (the video has {video.num_frames} frames)"
                problems.append(
                    Problem("missing", f"{annotations.path}: video {name!r}", reason, str(absent[0].parent))
                )
                continue
            videos.append(video)
        if dropped:
            log.warning(
                "%s: %d boxes empty once clipped to their frame were dropped", annotations.path, dropped
            )
        self.settle(problems, f"{stage} videos of split {self.split}", (stage,))
        if train:
            samples = [(i, int(f)) for i, v in enumerate(videos) for f in v.annotated_frames()]
        else:
            samples = [
                (i, f) for i, v in enumerate(videos) for f in range(1, v.num_frames + 1, self.eval_frame_step)
            ]
        if not samples:
            raise AnnotationError(f"{annotations.path}: split {self.split} has no {stage} frame to read")
        return ActFrameDataset(
            videos, samples, self.num_classes, self.frames_root, self.frame_pattern, self.first_frame_number,
            self.num_frames, self.frame_stride,
            self.train_short_side if train else (self.eval_short_side, self.eval_short_side), train=train,
            flip=self.flip, bad_video=self.bad_video, resize_on=self.resize_on,
        )  # fmt: skip


__all__ = [
    "ActAnnotations",
    "ActFrameDataset",
    "ActPickleDataModule",
    "ActVideo",
    "act_video",
    "read_act_pickle",
]
