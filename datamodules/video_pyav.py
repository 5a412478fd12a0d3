"""The PyAV decoding backend: frames by index over FFmpeg's own decoders (AV1 through dav1d, VP9, H.265, H.264...).

``PyAVReader`` gives what ``datamodules.video_io.Video`` needs of a backend: ``num_frames``, ``fps`` and
``read(indices)``. Access is frame-accurate by index:

- a frame's index is its presentation time from the stream's first one, in frames:
  ``round((pts - start) * time_base * rate)``, so a stream that does not start at 0 (MPEG-TS, edit lists, clips
  cut from a longer video) numbers its first frame 0; a frame missing from a variable-rate stream is the one shown
  at that time (the previous frame);
- a read seeks to the keyframe at or before the first wanted frame and decodes forward; the next wanted frame is
  reached by decoding on when it lies within a GOP of the decoder's position (a dense run of indices is one pass),
  by another seek otherwise. Only the wanted frames are converted to RGB;
- the frame count is the stream's (``nb_frames``), or the video packets counted by demuxing the file when the
  container does not store it (Matroska / WebM).

RGB conversion is ``VideoFrame.to_ndarray(format="rgb24")``: swscale, with the colour matrix and range the frame is
tagged with (BT.601, limited range when untagged), as decord's filter graph converts; on H.264 the two give the
same bytes (tests/test_decoders.py).

Errors are FFmpeg's own (``av.error.FFmpegError``) or ``ValueError`` / ``EOFError`` for a stream that cannot give
the frames asked for; ``Video`` turns them into ``VideoDecodeError``.
"""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import numpy as np

#: Decode on through up to this many unwanted frames to the next wanted one, or through up to the largest keyframe
#: distance seen in the stream when that is more; seek beyond. A seek lands on the keyframe at or before the frame,
#: up to a GOP back from it, so decoding on through less than a GOP costs about what seeking does.
WALK_FRAMES = 32


class PyAVReader:
    """One video stream of a file opened with PyAV (``num_threads``: decoder threads, 0 lets FFmpeg choose)."""

    def __init__(self, path: str, num_threads: int = 1):
        self.path = path
        self.num_threads = num_threads
        self._container: Any = None
        self._open()
        stream = self._stream
        if stream.codec_context is None or not stream.codec_context.is_decoder:
            raise ValueError("FFmpeg has no decoder for its video stream")
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        self._rate = Fraction(rate) if rate else Fraction(30)
        self.fps = float(self._rate)
        self._time_base = stream.time_base or Fraction(1, 90000)
        self._start = stream.start_time
        self._gop = 0  # largest distance between keyframes seen so far
        self.num_frames = int(stream.frames) or self._count_packets()

    # ------------------------------------------------------------------------------------------ stream state

    def _open(self) -> None:
        import av

        if self._container is not None:
            self._container.close()
        self._container = av.open(self.path, "r")
        streams = self._container.streams.video
        if not streams:
            raise ValueError("no video stream")
        self._stream = streams[0]
        ctx = self._stream.codec_context
        if ctx is not None:
            ctx.thread_count = self.num_threads
            ctx.thread_type = "AUTO" if self.num_threads != 1 else "SLICE"
        self._decoded: Iterator[Any] | None = None  # the decoder's frames from where it stands
        self._next: int | None = 0  # index of the frame it delivers next (None: after a seek, not known yet)
        self._last: tuple[int, Any] | None = None  # the last frame it delivered, with its index
        self._last_key: int | None = None  # the last keyframe it delivered

    def _count_packets(self) -> int:
        """Frames of a stream whose container does not store their number: its packets, by demuxing the file."""
        count = 0
        for packet in self._container.demux(self._stream):
            if packet.size:
                count += 1
        self._open()
        return count

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None

    def _index(self, pts: int) -> int:
        if self._start is None:
            self._start = pts  # no start time in the container: the first frame decoded from the start
        return round((pts - self._start) * self._time_base * self._rate)

    def _seek(self, index: int) -> None:
        """Position the decoder at the keyframe at or before frame ``index`` (the stream's start for 0 or less)."""
        if index <= 0:
            self._open()  # from the very start: no seek (some files cannot seek), every frame numbered from 0
            return
        start = self._start or 0
        target = start + int(Fraction(index) / (self._rate * self._time_base))
        self._container.seek(target, backward=True, any_frame=False, stream=self._stream)
        self._decoded, self._next, self._last = None, None, None
        self._last_key = None  # keyframe distances are measured within one run of decoding

    def _frames(self) -> Iterator[tuple[int, Any]]:
        """(index, frame) from the decoder's position on, remembering the last one and the keyframe spacing.

        After a seek, frames before the first keyframe are dropped: a demuxer that seeks by timestamp alone
        (MPEG-TS) may land between keyframes, where a decoder's frames miss their references."""
        if self._decoded is None:
            self._decoded = iter(self._container.decode(self._stream))
        for frame in self._decoded:
            if self._next is None and not frame.key_frame:
                continue
            if frame.pts is not None:
                index = self._index(frame.pts)
            elif self._last is not None:
                index = self._last[0] + 1
            elif self._next is not None:
                index = self._next
            else:
                raise ValueError("frames without timestamps cannot be found by seeking")
            if frame.key_frame:
                if self._last_key is not None and index > self._last_key:
                    self._gop = max(self._gop, index - self._last_key)
                self._last_key = index
            self._last, self._next = (index, frame), index + 1
            yield index, frame

    # ----------------------------------------------------------------------------------------------- reading

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Frames at ``indices`` (within [0, num_frames)) as uint8 (N, H, W, 3) RGB."""
        wanted = sorted({int(i) for i in indices})
        got: dict[int, np.ndarray] = {}
        done = 0
        while done < len(wanted):
            target = wanted[done]
            walk = max(self._gop, WALK_FRAMES)
            if self._last is not None and self._last[0] == target:
                got[target] = _rgb(self._last[1])
                done += 1
            elif self._next is not None and self._next <= target <= self._next + walk:
                done = self._decode_forward(wanted, done, got, walk)
            else:
                done = self._seek_and_decode(wanted, done, got, walk)
        return np.stack([got[int(i)] for i in indices])

    def _seek_and_decode(self, wanted: list[int], done: int, got: dict[int, np.ndarray], walk: int) -> int:
        """Seek to the keyframe before ``wanted[done]`` and decode on; further back each time the seek lands past
        the frame (an imprecise index, or between keyframes), from the start at last."""
        back = 0
        while True:
            self._seek(wanted[done] - back)
            try:
                return self._decode_forward(wanted, done, got, walk)
            except _Overshot:
                back = max(2 * back, walk)

    def _decode_forward(self, wanted: list[int], done: int, got: dict[int, np.ndarray], walk: int) -> int:
        """Decode from the decoder's position, filling ``got`` from ``wanted[done]`` on, until every wanted frame is
        there or the next is more than ``walk`` frames ahead; returns how many of ``wanted`` are done."""
        after_seek = self._next is None
        from_start = self._next == 0 and self._last is None
        previous, first = self._last, wanted[done]
        for index, frame in self._frames():
            if after_seek and index > first:
                raise _Overshot
            after_seek = False
            while done < len(wanted) and wanted[done] < index:
                # A frame with no timestamp of its own (a variable-rate stream's gap, or before the first frame
                # from the start): the one shown at its time.
                shown = previous[1] if previous is not None else frame if from_start else None
                if shown is None:
                    raise ValueError(f"frame {wanted[done]} is not in the stream")
                got[wanted[done]] = _rgb(shown)
                done += 1
            if done < len(wanted) and wanted[done] == index:
                got[index] = _rgb(frame)
                done += 1
            if done == len(wanted) or (index >= first and wanted[done] > index + 1 + walk):
                return done
            previous = self._last
        if after_seek:
            raise _Overshot  # nothing decodable after the seek point
        last = self._last[0] if self._last is not None else -1
        raise EOFError(f"the stream ends at frame {last}, before frame {wanted[done]}")


class _Overshot(Exception):
    """A seek landed past the frame wanted."""


def _rgb(frame: Any) -> np.ndarray:
    return frame.to_ndarray(format="rgb24")
