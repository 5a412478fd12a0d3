"""The one video-decoding interface of the project, over decord.

Every dataset opens videos through ``open_video`` and reads frames by index or by timestamp. A video that cannot
be used raises ``VideoDecodeError`` naming the file and the reason; the datasets turn that into an error or a
counted skip according to their ``bad_video`` policy.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

#: Files smaller than this cannot hold a decodable video stream (mmaction2 and VideoMAE use the same bound).
MIN_VIDEO_BYTES = 1024
#: Read the whole range [min, max] of the requested frames when it is at most this many times their number;
#: sparser requests go to decord's ``get_batch`` of the indices, which skips the frames between without
#: converting them. Measured with a fresh reader per clip (benchmarks/pipeline.py's sources): 8 frames every 3
#: read densely in 9.4 ms against 10.9; 16 every 4 at 320x320 in 21 ms against 14.5 sparse; a 768-frame window
#: every 4th frame at 180 pixels in 383 ms (and 4x the memory) against 306 sparse.
DENSE_READ_FACTOR = 3


class VideoDecodeError(RuntimeError):
    """A video that is missing, empty, corrupt or too short for what was asked.

    ``kind`` is one of "missing", "unreadable", "empty", "corrupt", "too_short", "decode_failed" (what skips are
    counted by).
    """

    def __init__(self, path: str | Path, kind: str, reason: str):
        self.path = str(path)
        self.kind = kind
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class Video:
    """An opened video: frame count, rate, and frames as uint8 tensors ``(T, H, W, 3)``."""

    def __init__(self, path: str | Path, num_threads: int = 1):
        import decord

        decord.logging.set_level(
            decord.logging.QUIET
        )  # reasons are reported once per file by the data module
        self.path = Path(path)
        try:
            info = self.path.stat()
        except FileNotFoundError:
            raise VideoDecodeError(path, "missing", "file not found") from None
        except PermissionError as err:
            raise _denied(path, err) from None
        if stat.S_ISDIR(info.st_mode):
            raise VideoDecodeError(path, "missing", "a folder, not a video file")
        if info.st_size < MIN_VIDEO_BYTES:
            raise VideoDecodeError(path, "empty", f"file has {info.st_size} bytes, too small to hold a video")
        try:
            self._reader = decord.VideoReader(str(self.path), num_threads=num_threads)
        except Exception as err:  # noqa: BLE001 - decord raises its own DECORDError and RuntimeErrors
            try:  # decord reports a file it may not read as one it cannot decode
                with open(self.path, "rb"):
                    pass
            except PermissionError as denied:
                raise _denied(path, denied) from None
            raise VideoDecodeError(
                path, "corrupt", f"cannot be opened as a video ({_first_line(err)})"
            ) from err
        self.num_frames = len(self._reader)
        if self.num_frames == 0:
            raise VideoDecodeError(path, "empty", "video has no frames")
        self.fps = float(self._reader.get_avg_fps()) or 30.0

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps

    def get_frames(self, indices: Sequence[int] | np.ndarray) -> Tensor:
        """Frames at ``indices`` (clamped to the video) as a uint8 tensor (T, H, W, 3)."""
        idx = np.clip(np.asarray(indices, dtype=np.int64), 0, self.num_frames - 1)
        lo, hi = int(idx.min()), int(idx.max())
        try:
            if hi - lo + 1 <= DENSE_READ_FACTOR * len(idx):
                # one sequential read of a short range is cheaper than skipping (see DENSE_READ_FACTOR)
                frames = self._reader.get_batch(list(range(lo, hi + 1))).asnumpy()[idx - lo]
            else:
                frames = self._reader.get_batch(idx.tolist()).asnumpy()
        except Exception as err:  # noqa: BLE001
            raise VideoDecodeError(
                self.path,
                "decode_failed",
                f"decoding frames {idx.min()}-{idx.max()} failed ({_first_line(err)})",
            ) from err
        if frames.shape[0] != len(idx):
            raise VideoDecodeError(
                self.path, "decode_failed", f"decoder returned {frames.shape[0]} of {len(idx)} frames"
            )
        return torch.from_numpy(frames)

    def frame_indices_at(self, times: Sequence[float] | np.ndarray) -> np.ndarray:
        """Index of the frame shown at each time (seconds), clamped to the video."""
        idx = np.floor(np.asarray(times, dtype=np.float64) * self.fps + 1e-6).astype(np.int64)
        return np.clip(idx, 0, self.num_frames - 1)

    def get_frames_at(self, times: Sequence[float] | np.ndarray) -> Tensor:
        """Frames shown at ``times`` (seconds) as uint8 (T, H, W, 3)."""
        return self.get_frames(self.frame_indices_at(times))


#: Files this process already found unusable, by (path, size, mtime): not reopened (the decoder's own
#: complaint would be printed again on every access), the same error is raised at once.
_KNOWN_BAD: dict[tuple[str, int, int], VideoDecodeError] = {}


def open_video(path: str | Path, num_threads: int = 1) -> Video:
    try:
        st = os.stat(path)
    except OSError:
        return Video(path, num_threads)  # raises "missing"
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_mode)  # a chmod makes it worth another try
    if key in _KNOWN_BAD:
        raise _KNOWN_BAD[key]
    try:
        return Video(path, num_threads)
    except VideoDecodeError as err:
        _KNOWN_BAD[key] = err
        raise


def _denied(path: str | Path, err: PermissionError) -> VideoDecodeError:
    return VideoDecodeError(path, "unreadable", f"permission denied ({err.strerror}): make it readable by this user")


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__
