"""AVA's movies as the annotations expect them: the 15-minute cut, and its frames at 30 fps.

AVA v2.2 annotates seconds 902-1798 of each movie. PySlowFast's preparation (followed by EVAD and mmaction2)
cuts every movie with ``ffmpeg -ss 900 -t 901``: the frames shown from second 900 on, for 901 seconds (one
more than the 15 minutes, so the clips around the last keyframes stay inside), re-encoded; then it extracts
frames with ``ffmpeg -r 30 -q:v 1`` into ``frames/<id>/<id>_%06d.jpg``, numbered from 1. ``AVADataModule``
reads either: the cut videos from ``videos_15min`` (second ``s`` of the annotations is ``s - 900`` into the
file), or the frames through ``frames_dir`` with its default ``frame_pattern`` and ``first_frame_number`` at
``frame_rate: 30``.

Here both are done with PyAV (FFmpeg's libraries; no ffmpeg program is needed):

- ``cut_movie``: decodes from ``start`` and encodes the frames shown in ``[start, start + duration)`` as H.264
  (yuv420p, CRF ``crf``), keeping their timestamps (shifted to start at 0), so the cut has the source's frame
  rate and a frame-accurate start, as ffmpeg's re-encoding cut. Audio is left out (nothing reads it).
- ``extract_frames``: frame ``k`` (file number ``k + 1``) is the frame shown at ``k / fps`` seconds, as the
  data module maps its 30 fps grid onto a decoded video (``keyframes.keyframe_clip_indices``), so the frame
  folder and the video give the same clips; there are ``keyframes.grid_length`` of them.

Both write under a temporary name and rename at the end: an output that exists is complete, and an interrupted
run leaves only a ``.part`` that the next run starts over.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

#: PySlowFast's cut: ``ffmpeg -ss 900 -t 901``.
AVA_START_S = 900.0
AVA_DURATION_S = 901.0
AVA_FRAME_RATE = 30.0
#: ``AVADataModule``'s default ``frame_pattern`` and ``first_frame_number``.
FRAME_PATTERN = "{video}/{video}_{index:06d}.jpg"
FIRST_FRAME_NUMBER = 1


class MovieError(RuntimeError):
    """A movie that cannot be cut or read, with the file and the reason."""


@dataclass(frozen=True)
class CutMovie:
    path: str
    num_frames: int
    fps: float
    duration: float


def _open_video_stream(av, path: Path):
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as err:
        raise MovieError(f"{path}: cannot be opened as a video ({err})") from None
    if not container.streams.video or container.streams.video[0].codec_context is None:
        container.close()
        raise MovieError(f"{path}: no decodable video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return container, stream


def _seconds(frame, stream, origin: float) -> float:
    return float(frame.pts * stream.time_base) - origin


def cut_movie(
    source: str | Path,
    output: str | Path,
    start: float = AVA_START_S,
    duration: float = AVA_DURATION_S,
    crf: int = 18,
    preset: str = "veryfast",
) -> CutMovie:
    """Encode the frames ``source`` shows in ``[start, start + duration)`` seconds into ``output`` (mp4, H.264).

    Seconds count from the first frame of the movie. Raises ``MovieError`` for a movie that cannot be read or
    ends before ``start``. A movie ending before ``start + duration`` gives a shorter cut (see ``duration``).
    """
    import av

    source, output = Path(source), Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".part")
    end = start + duration
    container, stream = _open_video_stream(av, source)
    written, last = 0, -1
    try:
        rate = stream.average_rate or stream.guessed_rate or Fraction(30)
        origin_pts = stream.start_time if stream.start_time is not None else 0
        origin = float(origin_pts * stream.time_base)
        if start > 0:
            try:
                container.seek(origin_pts + int(start / stream.time_base), stream=stream, backward=True)
            except av.FFmpegError:  # a file without a seek index: decode from the start instead
                container.seek(0)
        with av.open(str(tmp), "w", format="mp4") as out:
            encoder = out.add_stream("libx264", rate=rate)
            width = stream.codec_context.width // 2 * 2  # yuv420p needs even sides
            height = stream.codec_context.height // 2 * 2
            encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuv420p"
            encoder.time_base = stream.time_base
            encoder.codec_context.time_base = stream.time_base
            encoder.options = {"crf": str(crf), "preset": preset}
            first_pts = None
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = _seconds(frame, stream, origin)
                if t < start - 1e-6:
                    continue
                if t >= end - 1e-6:
                    break
                first_pts = frame.pts if first_pts is None else first_pts
                pts = frame.pts - first_pts
                if pts <= last:  # a repeated timestamp: the muxer needs them increasing
                    continue
                picture = frame.reformat(width=width, height=height, format="yuv420p")
                picture.pts, picture.time_base = pts, stream.time_base
                out.mux(encoder.encode(picture))
                written, last = written + 1, pts
            out.mux(encoder.encode(None))
    except av.FFmpegError as err:
        tmp.unlink(missing_ok=True)
        raise MovieError(f"{source}: decoding or encoding failed ({err})") from None
    finally:
        container.close()
    if written == 0:
        tmp.unlink(missing_ok=True)
        raise MovieError(f"{source}: no frame at or after {start:g} s (the movie ends before --start)")
    tmp.replace(output)
    fps = float(rate)
    return CutMovie(str(output), written, fps, written / fps)


def extract_frames(
    video: str | Path,
    frames_root: str | Path,
    video_id: str,
    frame_rate: float = AVA_FRAME_RATE,
    quality: int = 95,
) -> int:
    """Write the frame shown at ``k / frame_rate`` seconds of ``video`` as ``frames_root /
    FRAME_PATTERN.format(video=video_id, index=k + 1)`` (JPEG at ``quality``) for every ``k`` of the grid;
    returns the number of frames. The folder appears complete or not at all."""
    import av

    frames_root = Path(frames_root)
    folder = frames_root / video_id
    tmp_root = frames_root / f".{video_id}.part"
    shutil.rmtree(tmp_root, ignore_errors=True)
    container, stream = _open_video_stream(av, Path(video))
    count = 0
    try:
        origin: float | None = None
        previous = None  # (image, its time)

        def emit(image, until: float) -> None:
            """Grid frames shown before ``until`` seconds are ``image``."""
            nonlocal count
            while count / frame_rate < until - 1e-6:
                path = tmp_root / FRAME_PATTERN.format(video=video_id, index=count + FIRST_FRAME_NUMBER)
                if count == 0:
                    path.parent.mkdir(parents=True)
                image.save(path, quality=quality)
                count += 1

        step = 1.0 / float(stream.average_rate or stream.guessed_rate or Fraction(30))
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            t = float(frame.pts * stream.time_base)
            origin = t if origin is None else origin
            t -= origin
            if previous is not None:
                emit(previous[0], t)
            previous = (frame.to_image(), t)
        if previous is None:
            raise MovieError(f"{video}: no frame decoded")
        emit(previous[0], previous[1] + step)
    except av.FFmpegError as err:
        shutil.rmtree(tmp_root, ignore_errors=True)
        raise MovieError(f"{video}: decoding failed ({err})") from None
    finally:
        container.close()
    shutil.rmtree(folder, ignore_errors=True)
    (tmp_root / video_id).replace(folder)
    tmp_root.rmdir()
    return count
