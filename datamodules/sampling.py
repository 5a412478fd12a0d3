"""Clip samplers: which frame indices make a clip.

A clip is ``num_frames`` frames taken every ``frame_interval`` frames (its span is ``num_frames * frame_interval``).
Indices past the end of a short video are clamped by the decoder (the last frame repeats).
"""

from __future__ import annotations

import numpy as np


def clip_span(num_frames: int, frame_interval: int) -> int:
    return num_frames * frame_interval


def clip_indices(start: int, num_frames: int, frame_interval: int) -> np.ndarray:
    return start + np.arange(num_frames) * frame_interval


def random_clip(
    video_frames: int, num_frames: int, frame_interval: int, rng: np.random.Generator
) -> np.ndarray:
    """One clip at a uniformly random start (training)."""
    slack = max(video_frames - clip_span(num_frames, frame_interval), 0)
    return clip_indices(int(rng.integers(0, slack + 1)), num_frames, frame_interval)


def centre_clip(video_frames: int, num_frames: int, frame_interval: int) -> np.ndarray:
    """The clip centred in the video (single-view evaluation)."""
    return clip_indices(
        max(video_frames - clip_span(num_frames, frame_interval), 0) // 2, num_frames, frame_interval
    )


def uniform_clips(video_frames: int, num_frames: int, frame_interval: int, num_clips: int) -> np.ndarray:
    """``num_clips`` clips with starts spread evenly over the video (multi-view testing), shape (clips, frames).

    With one clip this is ``centre_clip``.
    """
    if num_clips == 1:
        return centre_clip(video_frames, num_frames, frame_interval)[None]
    slack = max(video_frames - clip_span(num_frames, frame_interval), 0)
    starts = np.round(np.linspace(0, slack, num_clips)).astype(np.int64)
    return np.stack([clip_indices(int(s), num_frames, frame_interval) for s in starts])


def dense_windows(video_frames: int, window: int, stride: int, overlap: float = 0.5) -> np.ndarray:
    """Sliding windows over an untrimmed video, each ``window`` sampled frames at ``stride``, shape (windows, window).

    Consecutive windows overlap by ``overlap`` of their span; the last window is aligned to the end of the video so
    every frame is covered.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    span = window * stride
    step = max(int(round(span * (1.0 - overlap))), 1)
    last = max(video_frames - span, 0)
    starts = list(range(0, last + 1, step))
    if starts[-1] != last:
        starts.append(last)
    return np.stack([clip_indices(s, window, stride) for s in starts])
