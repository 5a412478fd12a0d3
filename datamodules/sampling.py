"""Clip samplers: which frame indices make a clip.

A clip is ``num_frames`` frames taken every ``frame_stride`` frames (its span is ``num_frames * frame_stride``).
Indices past the end of a short video are clamped by the decoder (the last frame repeats).
"""

from __future__ import annotations

import numpy as np


def clip_span(num_frames: int, frame_stride: int) -> int:
    return num_frames * frame_stride


def clip_indices(start: int, num_frames: int, frame_stride: int) -> np.ndarray:
    return start + np.arange(num_frames) * frame_stride


def random_clip(
    video_frames: int, num_frames: int, frame_stride: int, rng: np.random.Generator
) -> np.ndarray:
    """One clip at a uniformly random start (training)."""
    slack = max(video_frames - clip_span(num_frames, frame_stride), 0)
    return clip_indices(int(rng.integers(0, slack + 1)), num_frames, frame_stride)


def centre_clip(video_frames: int, num_frames: int, frame_stride: int) -> np.ndarray:
    """The clip centred in the video (single-view evaluation)."""
    return clip_indices(
        max(video_frames - clip_span(num_frames, frame_stride), 0) // 2, num_frames, frame_stride
    )


def uniform_clips(video_frames: int, num_frames: int, frame_stride: int, num_clips: int) -> np.ndarray:
    """``num_clips`` clips with starts spread evenly over the video (multi-view testing), shape (clips, frames).

    With one clip this is ``centre_clip``.
    """
    if num_clips == 1:
        return centre_clip(video_frames, num_frames, frame_stride)[None]
    slack = max(video_frames - clip_span(num_frames, frame_stride), 0)
    starts = np.round(np.linspace(0, slack, num_clips)).astype(np.int64)
    return np.stack([clip_indices(int(s), num_frames, frame_stride) for s in starts])


def sliding_window_starts(num_steps: int, window_size: int, overlap: float) -> list[int]:
    """First step of each window covering ``num_steps`` sampled frames.

    Windows are ``int(window_size * (1 - overlap))`` steps apart (OpenTAD's window stride) and the last one
    ends at the last frame; a video of at most one window gives the single window 0. No window is repeated.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"window_overlap must be in [0, 1), got {overlap}")
    stride = max(int(window_size * (1.0 - overlap)), 1)
    last = max(num_steps - window_size, 0)
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return starts
