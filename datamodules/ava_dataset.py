"""The AVA-style keyframe dataset: one sample per (video, timestamp), its clip read from a video file or a frame
folder on the ``frame_rate`` grid around the keyframe, with the keyframe's boxes, multi-hot labels and optional
proposals. The protocol (timestamps -> frames, transforms) is described in ``datamodules.ava``, which builds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.ava_annotations import AVAKeyframe
from datamodules.base import BadVideoPolicy, SampleKey, load_guarded, open_checked, seeded, split_key
from datamodules.keyframes import FrameFolder, ResizeOn, keyframe_clip_indices, transform_keyframe_clip
from datamodules.video_io import Decoder


@dataclass(frozen=True)
class VideoSource:
    """Where a video's frames are: a video file, or a frame folder under ``path``; its frame count and rate."""

    video_id: str
    path: str
    num_frames: int
    fps: float
    frames: bool = False


class AVAKeyframeDataset(Dataset):
    """Keyframe clips of AVA-style annotations.

    Samples: ``video`` uint8 (3, T, h, w), ``boxes`` (n, 4) float32 pixels of the resized clip, ``labels``
    (n, C) float32 multi-hot, ``image_size`` and ``orig_size`` (h, w), ``index``, ``video_index``,
    ``timestamp``, and with proposals ``proposals`` (m, 4) pixels and ``proposal_scores`` (m,).
    """

    def __init__(
        self,
        keyframes: Sequence[AVAKeyframe],
        sources: Sequence[VideoSource],
        short_side: int,
        train: bool = False,
        flip: bool = True,
        timestamp_offset: float = 900.0,
        frame_rate: float | None = 30.0,
        num_frames: int = 16,
        frame_stride: int = 4,
        frame_pattern: str = "{video}/{video}_{index:06d}.jpg",
        first_frame_number: int = 1,
        bad_video: BadVideoPolicy = "error",
        decode_threads: int = 1,
        antialias: bool = False,
        decoder: Decoder = "auto",
        resize_on: ResizeOn = "loader",
    ):
        self.keyframes = list(keyframes)
        self.resize_on = resize_on
        self.antialias = antialias
        self.sources = list(sources)
        self.short_side = short_side
        self.train = train
        self.flip = flip
        self.timestamp_offset = timestamp_offset
        self.frame_rate = frame_rate
        self.num_frames = num_frames
        self.frame_stride = frame_stride
        self.frame_pattern = frame_pattern
        self.first_frame_number = first_frame_number
        self.bad_video = bad_video
        self.decode_threads = decode_threads
        self.decoder = decoder

    def __len__(self) -> int:
        return len(self.keyframes)

    def __getitem__(self, key: int | SampleKey) -> dict[str, Any]:
        index, seed = split_key(key)
        with seeded(seed):
            return load_guarded(lambda: self.load(index), self.bad_video, index)

    def clip_indices(self, index: int) -> np.ndarray:
        """Native frame indices of sample ``index``'s clip."""
        keyframe = self.keyframes[index]
        source = self.sources[keyframe.video_index]
        return keyframe_clip_indices(
            keyframe.timestamp - self.timestamp_offset, source.num_frames, source.fps, self.frame_rate,
            self.num_frames, self.frame_stride,
        )  # fmt: skip

    def load(self, index: int) -> dict[str, Any]:
        keyframe = self.keyframes[index]
        source = self.sources[keyframe.video_index]
        if source.frames:
            reader: Any = FrameFolder(
                source.path, source.video_id, self.frame_pattern, source.num_frames, self.first_frame_number
            )
        else:
            reader = open_checked(source.path, 1, self.decode_threads, self.decoder)
        frames = reader.get_frames(self.clip_indices(index))
        flip = self.train and self.flip and bool(torch.rand(()) < 0.5)
        box_sets = [keyframe.boxes] + ([keyframe.proposals] if keyframe.proposals is not None else [])
        clip, boxes, size = transform_keyframe_clip(
            frames, box_sets, self.short_side, flip, self.antialias, self.resize_on
        )
        sample = {
            "video": clip,
            "boxes": boxes[0],
            "labels": torch.from_numpy(keyframe.labels),
            "image_size": size,
            "orig_size": tuple(frames.shape[1:3]),
            "index": index,
            "video_index": keyframe.video_index,
            "timestamp": keyframe.timestamp,
        }
        if self.resize_on == "device":
            sample["flip"] = flip
        if keyframe.proposals is not None:
            sample["proposals"] = boxes[1]
            sample["proposal_scores"] = torch.from_numpy(keyframe.proposal_scores)
        return sample
