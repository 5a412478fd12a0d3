"""Is a video usable? Open it as the data modules do, then decode its first, middle and last frame.

Opening alone reads the container's index; a file cut short or damaged inside its stream can still open and
fail only when a clip reaches the broken part, mid-training. ``check_video`` therefore decodes three frames
spread over the whole video. The reasons are ``video_io.VideoDecodeError``'s kinds ("missing", "unreadable",
"empty", "corrupt", "too_short", "decode_failed"), with one refinement of "corrupt": a file whose container
opens but whose video codec no decoder of this FFmpeg build knows is "unsupported_codec" (re-encoding it, e.g.
to H.264, is the fix, not downloading it again); one with no video stream at all (an audio file) is "empty".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from datamodules.video_io import VideoDecodeError, open_video

#: The kinds ``check_video`` reports, in the order the summaries list them.
BAD_KINDS = ("missing", "unreadable", "empty", "corrupt", "unsupported_codec", "too_short", "decode_failed")


@dataclass(frozen=True)
class VideoFacts:
    """What a video file says: frames and rate (``duration`` follows)."""

    num_frames: int
    fps: float

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps


@dataclass(frozen=True)
class VideoCheck:
    """What checking one video found: ``kind`` None for a usable video; its frame count and rate when known."""

    path: str
    kind: str | None = None
    reason: str = ""
    num_frames: int | None = None
    fps: float | None = None

    @property
    def ok(self) -> bool:
        return self.kind is None

    @property
    def duration(self) -> float | None:
        return self.num_frames / self.fps if self.num_frames is not None and self.fps else None

    def as_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["status"] = "ok" if self.ok else self.kind
        del row["kind"]
        row["duration"] = None if self.duration is None else round(self.duration, 3)
        return row


def check_video(path: str | Path, min_frames: int = 1, **open_options: Any) -> VideoCheck:
    """Open ``path`` (``open_options`` go to ``open_video``), require ``min_frames`` frames and decode the
    first, middle and last; the result says what is wrong, never raises for a bad video."""
    path = str(path)
    try:
        video = open_video(path, **open_options)
    except VideoDecodeError as err:
        if err.kind != "corrupt":
            return VideoCheck(path, err.kind, err.reason)
        kind, reason = refine_corrupt(path, err.reason, open_options.get("decoder"))
        return VideoCheck(path, kind, reason)
    found = {"num_frames": video.num_frames, "fps": video.fps}
    if video.num_frames < min_frames:
        reason = f"{video.num_frames} frames, fewer than the {min_frames} required"
        return VideoCheck(path, "too_short", reason, **found)
    last = video.num_frames - 1
    try:
        video.get_frames([0, last // 2, last])
    except VideoDecodeError as err:
        return VideoCheck(path, err.kind, err.reason, **found)
    return VideoCheck(path, **found)


def refine_corrupt(path: str, reason: str, decoder: str | None = None) -> tuple[str, str]:
    """A file the decoder could not open: a container without a video stream, or with one of a codec that has
    no decoder here (or, with ``decoder: decord``, one only PyAV decodes), is told apart from a damaged file by
    asking PyAV (FFmpeg) what the container holds."""
    import av

    try:
        container = av.open(path)
    except (av.FFmpegError, OSError, UnicodeDecodeError):
        return "corrupt", reason
    with container:
        streams = list(container.streams.video)
        if not streams:
            kinds = sorted({s.type for s in container.streams}) or ["no"]
            return "empty", f"no video stream ({container.format.name} container with {', '.join(kinds)} streams)"
        if all(s.codec_context is None for s in streams):
            return "unsupported_codec", (
                f"its video stream's codec has no decoder in this FFmpeg build ({container.format.name} "
                "container); re-encode it, e.g. to H.264"
            )
        if decoder == "decord":
            try:
                next(container.decode(streams[0]))
            except (av.FFmpegError, StopIteration):
                return "corrupt", reason
            codec = streams[0].codec_context.codec.canonical_name
            return "unsupported_codec", (
                f"decord cannot decode its {codec} stream, PyAV can: use decoder auto or pyav, or re-encode it to "
                f"H.264 ({reason})"
            )
    return "corrupt", reason
