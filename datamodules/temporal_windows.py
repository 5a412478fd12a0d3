"""Temporal detection windows: the dataset the TAD data module builds (``TemporalWindowDataset``), its train and
eval transforms, OpenTAD's random truncation, cropping segments to a window, and the collation of windows.

Segments are in steps of the window (see ``datamodules.temporal``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import RandomResizedCrop

from datamodules.base import (
    BadVideoPolicy,
    SampleKey,
    load_guarded,
    open_checked,
    seeded,
    split_key,
    stack_clips,
)
from datamodules.transforms import EvalClipTransform, to_tchw
from datamodules.video_io import Decoder, Video

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Sampled frames decoded and transformed at a time, so a 768-frame window is never held at full resolution
#: (a 768 x 4-frame THUMOS window at 320x180: about 0.3 GB peak with 32, 0.5 GB with 96).
DECODE_CHUNK = 32
#: OpenTAD's number of random crops tried before settling for one without a complete enough action.
MAX_TRUNCATION_TRIALS = 200


@dataclass(frozen=True, eq=False)
class TemporalVideo:
    """One video of a subset: its file, duration and action segments (seconds) with class indices."""

    video_id: str
    video_index: int  # position in the JSON database (``TemporalDetectionDataModule.video_ids``)
    path: str
    duration: float
    segments: np.ndarray  # (n, 2) float64 seconds
    labels: np.ndarray  # (n,) int64
    num_frames: int | None = None  # set once the video has been opened


def crop_segments(segments: np.ndarray, start: float, length: float) -> tuple[np.ndarray, np.ndarray]:
    """Segments (n, 2) clipped to ``[start, start + length]`` and shifted to it; the fraction of each kept."""
    left = np.maximum(segments[:, 0], start)
    right = np.minimum(segments[:, 1], start + length)
    kept = np.clip(right - left, 0.0, None) / np.maximum(segments[:, 1] - segments[:, 0], 1e-6)
    return np.stack([left, right], axis=1) - start, kept


def random_truncation(
    num_steps: int,
    window_size: int,
    segments: np.ndarray,
    trunc_thresh: float,
    crop_ratio: tuple[float, float] | None,
    rng: np.random.Generator,
) -> tuple[int, int, np.ndarray, np.ndarray]:
    """OpenTAD's training crop of ``num_steps`` sampled frames: ``(start, length, segments, keep)``.

    A sequence longer than the window is cropped to ``window_size`` at a random start, redrawn (up to 200
    times) until at least one segment keeps ``trunc_thresh`` of its length; one of at most a window is cropped
    to a random ``crop_ratio`` of its length (not at all without ``crop_ratio``). Segments keeping at least
    ``trunc_thresh`` are kept (all overlapping ones when nothing is cropped), clipped to the crop and shifted
    to its start; ``keep`` marks them among the input segments.
    """
    length = min(num_steps, window_size)
    if num_steps <= window_size and crop_ratio is not None:
        lo = max(round(crop_ratio[0] * num_steps), 1)
        length = int(rng.integers(lo, max(min(round(crop_ratio[1] * num_steps), num_steps), lo) + 1))
    if length == num_steps:
        cropped, kept = crop_segments(segments, 0, length)
        keep = kept > 0
        return 0, length, cropped[keep], keep
    for _ in range(MAX_TRUNCATION_TRIALS):
        start = int(rng.integers(0, num_steps - length + 1))
        cropped, kept = crop_segments(segments, start, length)
        keep = kept >= trunc_thresh
        if keep.any():
            break
    return start, length, cropped[keep], keep


class TemporalTrainTransform:
    """AdaTAD's training augmentation, identical for every frame of a window, applied chunk by chunk.

    Short side to ``short_side``, a random resized crop (area and aspect ranges of mmaction's
    RandomResizedCrop) scaled to ``crop_size`` squared, horizontal flip, RandAugment (``randaugment_ops`` ops
    at magnitude ``randaugment_magnitude`` of 10, as mmaction's ImgAug "default") and colour jitter
    (brightness, contrast, saturation, hue). ``plan`` draws one window's parameters; the crop is mapped back
    to the decoded frame, so each frame is interpolated once.

    ``photometric_on="device"`` leaves the rest to the training device: the loader worker only decodes and
    crops (``crop``; ``TemporalWindowDataset``), the sample carries the window's flip and photometric seed, and
    once the batch is on the device ``geometry`` resizes and flips and ``photometric`` applies the same ops from
    that seed (the data module's ``on_after_batch_transfer``); the ops' random draws come from the CPU generator
    either way, so the result is the same window (on a GPU, the resize to one grey level;
    tests/test_temporal_data.py).
    """

    def __init__(
        self,
        crop_size: int = 160,
        short_side: int = 182,
        area_range: tuple[float, float] = (0.08, 1.0),
        aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        randaugment_ops: int = 2,
        randaugment_magnitude: int = 9,
        color_jitter: tuple[float, float, float, float] | None = (0.5, 0.5, 0.5, 0.1),
        photometric_on: Literal["loader", "device"] = "loader",
    ):
        if photometric_on not in ("loader", "device"):
            raise ValueError(f"photometric_on must be 'loader' or 'device', got {photometric_on!r}")
        self.photometric_on = photometric_on
        self.crop_size = crop_size
        self.short_side = short_side
        self.area_range = list(area_range)
        self.aspect_ratio_range = list(aspect_ratio_range)
        self.flip = flip
        self.randaugment = (
            T.RandAugment(randaugment_ops, randaugment_magnitude, num_magnitude_bins=11)
            if randaugment_ops > 0
            else None
        )
        self.color_jitter = T.ColorJitter(*color_jitter) if color_jitter else None

    def plan(self, height: int, width: int) -> tuple[int, int, int, int, bool, int]:
        """(top, left, height, width) of the crop in the decoded frame, flip, and the photometric seed."""
        scale = self.short_side / min(height, width)
        resized = torch.empty(1, round(height * scale), round(width * scale))
        top, left, h, w = RandomResizedCrop.get_params(resized, self.area_range, self.aspect_ratio_range)
        top, left = min(int(top / scale), height - 1), min(int(left / scale), width - 1)
        h, w = min(max(round(h / scale), 1), height - top), min(max(round(w / scale), 1), width - left)
        flip = self.flip and bool(torch.rand(()) < 0.5)
        return top, left, h, w, flip, int(torch.randint(0, 2**62, ()))

    def __call__(self, frames: Tensor, plan: tuple[int, int, int, int, bool, int]) -> Tensor:
        """(T, H, W, 3) uint8 -> (3, T, crop, crop) uint8, laid out in memory as the resize leaves it (channels
        last: the window is copied once, as it lies, by ``TemporalWindowDataset.decode``)."""
        clip = self.geometry(to_tchw(self.crop(frames, plan)), plan[4])
        if self.photometric_on == "loader":
            clip = self.photometric(clip, plan[5])
        return clip.permute(1, 0, 2, 3)

    @staticmethod
    def crop(frames: Tensor, plan: tuple[int, int, int, int, bool, int]) -> Tensor:
        """The plan's crop of ``frames`` (T, H, W, 3): a view."""
        top, left, h, w = plan[:4]
        return frames[:, top : top + h, left : left + w]

    def geometry(self, clip: Tensor, flip: bool) -> Tensor:
        """A crop (T, 3, h, w) uint8, on any device, resized to ``crop_size`` squared (antialiased bilinear, as
        torchvision's RandomResizedCrop: ``crop`` then ``geometry`` is its ``resized_crop``) and flipped. On the
        CPU torchvision's uint8 kernel; elsewhere it resizes in float and rounds (one grey level apart at most)."""
        clip = TF.resize(clip, [self.crop_size] * 2, antialias=True)
        return clip.flip(-1) if flip else clip

    def photometric(self, clip: Tensor, seed: int) -> Tensor:
        """RandAugment then the colour jitter on ``clip`` (T, 3, H, W) uint8, on any device, with the ops drawn
        from ``seed`` (the same for every chunk of a window, and wherever it runs)."""
        if self.randaugment is None and self.color_jitter is None:
            return clip
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            if self.randaugment is not None:
                clip = self.randaugment(clip)
            if self.color_jitter is not None:
                clip = self.color_jitter(clip)
        return clip


class TemporalEvalTransform:
    """Short side to ``short_side``, centre crop ``crop_size`` squared: (T, H, W, 3) -> (3, T, crop, crop)."""

    def __init__(self, crop_size: int = 160, short_side: int = 160):
        self.clip_transform = EvalClipTransform(crop_size, short_side, num_crops=1)

    def plan(self, height: int, width: int) -> None:
        return None

    def __call__(self, frames: Tensor, plan: None = None) -> Tensor:
        return self.clip_transform(frames)[0]


class TemporalWindowDataset(Dataset):
    """Windows of annotated videos: a random crop per video in training, the planned ``windows`` otherwise.

    ``windows`` are ``(video position, first step)`` pairs (the step is ignored in training and resize mode).
    Samples: ``video`` uint8 (3, window_size, crop, crop), ``segments`` float32 (n, 2) in window steps,
    ``labels`` int64 (n,), ``valid`` bool (window_size,) true on real frames, ``index`` (the window),
    ``video_index``, ``window_start`` and ``duration`` (seconds), ``seconds_per_step``.
    """

    def __init__(
        self,
        videos: Sequence[TemporalVideo],
        windows: Sequence[tuple[int, int]],
        transform: TemporalTrainTransform | TemporalEvalTransform,
        mode: Literal["sliding_window", "resize"] = "sliding_window",
        window_size: int = 768,
        frame_stride: int = 4,
        train: bool = False,
        trunc_thresh: float = 0.75,
        crop_ratio: tuple[float, float] | None = (0.9, 1.0),
        window_ioa_thresh: float = 0.75,
        class_agnostic: bool = False,
        bad_video: BadVideoPolicy = "error",
        decode_threads: int = 1,
        decoder: Decoder = "auto",
    ):
        self.videos = list(videos)
        self.windows = list(windows)
        self.transform = transform
        self.mode = mode
        self.window_size = window_size
        self.frame_stride = frame_stride
        self.train = train
        self.trunc_thresh = trunc_thresh
        self.crop_ratio = crop_ratio
        self.window_ioa_thresh = window_ioa_thresh
        self.class_agnostic = class_agnostic
        self.bad_video = bad_video
        self.decode_threads = decode_threads
        self.decoder = decoder

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, key: int | SampleKey) -> dict[str, Any]:
        index, seed = split_key(key)
        with seeded(seed):
            return load_guarded(lambda: self.load(index), self.bad_video, index)

    def load(self, index: int) -> dict[str, Any]:
        position, first_step = self.windows[index]
        record = self.videos[position]
        video = open_checked(record.path, 1, self.decode_threads, self.decoder)
        if self.mode == "resize":
            steps = self.window_size
            seconds_per_step = record.duration / steps
            # The frame shown in the middle of each step of the decoded video.
            frames = video.frame_indices_at((np.arange(steps) + 0.5) * video.duration / steps)
            segments, keep = crop_segments(record.segments / seconds_per_step, 0, steps)
            keep = keep > 0
            segments, window_start = segments[keep], 0.0
        else:
            num_steps = math.ceil(video.num_frames / self.frame_stride)
            seconds_per_step = self.frame_stride / video.fps
            in_steps = record.segments / seconds_per_step
            if self.train:
                rng = np.random.default_rng(int(torch.randint(0, 2**62, ())))
                first_step, steps, segments, keep = random_truncation(
                    num_steps, self.window_size, in_steps, self.trunc_thresh, self.crop_ratio, rng
                )
            else:
                steps = max(min(self.window_size, num_steps - first_step), 1)
                segments, kept = crop_segments(in_steps, first_step, steps)
                keep = kept > self.window_ioa_thresh
                segments = segments[keep]
            frames = (first_step + np.arange(steps)) * self.frame_stride
            window_start = first_step * seconds_per_step
        labels = np.zeros(int(keep.sum())) if self.class_agnostic else record.labels[keep]
        clip, plan = self.decode(video, frames)
        sample = {
            "video": clip,
            "segments": torch.as_tensor(segments, dtype=torch.float32).reshape(-1, 2),
            "labels": torch.as_tensor(labels, dtype=torch.long),
            "valid": torch.arange(self.window_size) < len(frames),
            "index": index,
            "video_index": record.video_index,
            "window_start": float(window_start),
            "seconds_per_step": float(seconds_per_step),
            "duration": float(record.duration),
        }
        if self.geometry_on_device:  # TemporalTrainTransform.geometry and .photometric, on the device
            sample["flip"], sample["photometric_seed"] = plan[4], plan[5]
        return sample

    @property
    def geometry_on_device(self) -> bool:
        """Whether the worker leaves the training windows' resize, flip and photometric ops to the device
        (``augment_on: device``): it then decodes and crops only."""
        return getattr(self.transform, "photometric_on", "loader") == "device"

    def decode(self, video: Video, frames: np.ndarray) -> tuple[Tensor, Any]:
        """The frames, transformed, padded with the last one to ``window_size``: (3, T, crop, crop), and the
        transform's plan of the window. Each chunk is written once into the window, which is laid out
        channels-last in memory (the decoder's and the resize's layout; the batch stays so until the device,
        ``stack_clips``)."""
        plan, clip = None, None
        crop_only = self.geometry_on_device
        for i in range(0, len(frames), DECODE_CHUNK):
            decoded = video.get_frames(frames[i : i + DECODE_CHUNK])
            if plan is None:
                plan = self.transform.plan(*decoded.shape[1:3])
            if crop_only:  # augment_on: device: the crop as decoded, (3, n, h, w)
                chunk = to_tchw(self.transform.crop(decoded, plan)).transpose(0, 1)
            else:
                chunk = self.transform(decoded, plan)  # (3, n, crop, crop)
            if clip is None:
                channels, _, height, width = chunk.shape
                clip = torch.empty(self.window_size, height, width, channels, dtype=chunk.dtype).permute(3, 0, 1, 2)
            clip[:, i : i + chunk.shape[1]] = chunk
        clip[:, len(frames) :] = clip[:, len(frames) - 1 : len(frames)]
        return clip, plan


def collate_windows(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack videos and masks, keep segments and labels as per-sample lists; skips as in ``collate_clips``."""
    good = [s for s in samples if "skipped" not in s]
    batch: dict[str, Any] = {}
    if good:
        if "flip" in good[0]:  # crops of any size, resized on the device: kept apart, uncopied
            batch["video"] = [s["video"] for s in good]
            batch["flip"] = torch.tensor([s["flip"] for s in good], dtype=torch.bool)
        else:
            batch["video"] = stack_clips([s["video"] for s in good])
        batch["valid"] = torch.stack([s["valid"] for s in good])
        batch["segments"] = [s["segments"] for s in good]
        batch["labels"] = [s["labels"] for s in good]
        for key in ("index", "video_index"):
            batch[key] = torch.tensor([s[key] for s in good], dtype=torch.long)
        for key in ("window_start", "seconds_per_step", "duration"):
            batch[key] = torch.tensor([s[key] for s in good], dtype=torch.float64)
        if "photometric_seed" in good[0]:
            batch["photometric_seed"] = [s["photometric_seed"] for s in good]
    batch["skipped"] = [s["skipped"] for s in samples if "skipped" in s]
    batch["batch_size"] = len(good)
    return batch


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TemporalEvalTransform",
    "TemporalTrainTransform",
    "TemporalVideo",
    "TemporalWindowDataset",
    "collate_windows",
    "crop_segments",
    "random_truncation",
]
