"""The one video-decoding interface of the project, over decord or PyAV.

Every dataset opens videos through ``open_video`` and reads frames by index or by timestamp. A video that cannot
be used raises ``VideoDecodeError`` naming the file and the reason; the datasets turn that into an error or a
counted skip according to their ``bad_video`` policy.

``decoder`` picks the backend: ``decord``, ``pyav`` (``datamodules.video_pyav``), or ``auto``: decord, and PyAV
for a file decord cannot open or decode (AV1, which yt-dlp fetches by default, or any codec decord's FFmpeg 4.1
lacks), logged once per file; a file neither opens is "corrupt" with both reasons. Without decord installed (no
aarch64 wheel) ``auto`` is PyAV. Both convert to RGB with the colour matrix and range the stream is tagged with.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

#: The decoding backends (a data module's ``decoder``).
Decoder = Literal["auto", "decord", "pyav"]
DECODERS: tuple[str, ...] = ("auto", "decord", "pyav")

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
    """An opened video: frame count, rate, and frames as uint8 tensors ``(T, H, W, 3)``.

    ``decoder`` is the backend asked for; ``backend`` the one reading the file ("decord" or "pyav").
    """

    def __init__(self, path: str | Path, num_threads: int = 1, decoder: Decoder = "auto"):
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
        self.path = Path(path)
        self.num_threads = num_threads
        self.decoder = decoder
        try:
            info = self.path.stat()
        except FileNotFoundError:
            raise VideoDecodeError(path, "missing", "file not found") from None
        except PermissionError as err:
            raise permission_error(path, err) from None
        if stat.S_ISDIR(info.st_mode):
            raise VideoDecodeError(path, "missing", "a folder, not a video file")
        if info.st_size < MIN_VIDEO_BYTES:
            raise VideoDecodeError(path, "empty", f"file has {info.st_size} bytes, too small to hold a video")
        decord = _decord() if decoder != "pyav" else None
        if decord is None and decoder == "auto":
            _log_once("decord", "decord is not installed: videos are decoded with PyAV")
        if decord is None and decoder == "decord":
            raise ModuleNotFoundError(
                "decoder: decord needs the decord package (pip install decord; it has no aarch64 wheel): install "
                "it, or set data.init_args.decoder: pyav (or auto)"
            )
        self._decord_failure: str | None = None
        if decord is None:
            self._open_pyav()
        else:
            try:
                self._reader: Any = _DecordReader(decord, str(self.path), num_threads)
                self.backend = "decord"
            except Exception as err:  # decord raises its own DECORDError and RuntimeErrors
                self._check_readable()  # decord reports a file it may not read as one it cannot decode
                if decoder == "decord":
                    raise VideoDecodeError(
                        path, "corrupt", f"cannot be opened as a video ({_first_line(err)}); decoder: auto reads "
                        "the codecs decord lacks (AV1) with PyAV",
                    ) from err
                self._decord_failure = f"decord: {_first_line(err)}"
                self._open_pyav()
        self.num_frames = self._reader.num_frames
        if self.num_frames == 0:
            raise VideoDecodeError(path, "empty", "video has no frames")
        self.fps = float(self._reader.fps) or 30.0

    def _open_pyav(self) -> None:
        from datamodules.video_pyav import PyAVReader

        try:
            self._reader = PyAVReader(str(self.path), self.num_threads)
        except Exception as err:  # FFmpeg's errors, and a file with no decodable video stream
            self._check_readable()
            reasons = "; ".join(r for r in (self._decord_failure, f"PyAV: {_first_line(err)}") if r)
            raise VideoDecodeError(self.path, "corrupt", f"cannot be opened as a video ({reasons})") from err
        self.backend = "pyav"
        if self._decord_failure is not None:
            _log_once(self.path, "%s: decoded with PyAV (%s)", self.path, self._decord_failure)

    def _check_readable(self) -> None:
        try:
            with open(self.path, "rb"):
                pass
        except PermissionError as denied:
            raise permission_error(self.path, denied) from None

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps

    def get_frames(self, indices: Sequence[int] | np.ndarray) -> Tensor:
        """Frames at ``indices`` (clamped to the video) as a uint8 tensor (T, H, W, 3)."""
        idx = np.clip(np.asarray(indices, dtype=np.int64), 0, self.num_frames - 1)
        try:
            frames = self._reader.read(idx)
        except Exception as err:
            failure = f"{self.backend}: {_first_line(err)}"
            if self.decoder != "auto" or self.backend != "decord":
                reasons = "; ".join(r for r in (self._decord_failure, failure) if r)
                raise VideoDecodeError(
                    self.path, "decode_failed", f"decoding frames {idx.min()}-{idx.max()} failed ({reasons})"
                ) from err
            # decord opened what it cannot decode (e.g. frame widths its converter rejects): PyAV instead.
            self._decord_failure = failure
            self._open_pyav()
            return self.get_frames(indices)
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


class _DecordReader:
    """decord's ``VideoReader`` as a backend of ``Video``: ``num_frames``, ``fps`` and ``read``."""

    def __init__(self, decord: Any, path: str, num_threads: int):
        self._reader = decord.VideoReader(path, num_threads=num_threads)
        self.num_frames = len(self._reader)
        self.fps = float(self._reader.get_avg_fps())

    def read(self, idx: np.ndarray) -> np.ndarray:
        lo, hi = int(idx.min()), int(idx.max())
        if hi - lo + 1 <= DENSE_READ_FACTOR * len(idx):
            # one sequential read of a short range is cheaper than skipping (see DENSE_READ_FACTOR)
            return self._reader.get_batch(list(range(lo, hi + 1))).asnumpy()[idx - lo]
        return self._reader.get_batch(idx.tolist()).asnumpy()


def _decord() -> Any:
    """decord, quiet (reasons are reported once per file by the data module), or None where it is not installed."""
    try:
        import decord
    except ImportError:
        return None
    decord.logging.set_level(decord.logging.QUIET)
    return decord


_LOGGED: set[str] = set()


def _log_once(key: str | Path, message: str, *args: Any) -> None:
    if str(key) not in _LOGGED:
        _LOGGED.add(str(key))
        log.info(message, *args)


#: Files this process already found unusable, by (path, size, mtime): not reopened (the decoder's own
#: complaint would be printed again on every access), the same error is raised at once.
_KNOWN_BAD: dict[tuple[Any, ...], VideoDecodeError] = {}


def open_video(path: str | Path, num_threads: int = 1, decoder: Decoder = "auto") -> Video:
    try:
        st = os.stat(path)
    except OSError:
        return Video(path, num_threads, decoder)  # raises "missing"
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_mode, decoder)  # a chmod makes it worth another try
    if key in _KNOWN_BAD:
        raise _KNOWN_BAD[key]
    try:
        return Video(path, num_threads, decoder)
    except VideoDecodeError as err:
        _KNOWN_BAD[key] = err
        raise


def permission_error(path: str | Path, err: PermissionError) -> VideoDecodeError:
    return VideoDecodeError(path, "unreadable", f"permission denied ({err.strerror}): make it readable by this user")


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__
