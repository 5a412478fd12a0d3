"""Writing the synthetic datasets: video files (H.264, or AV1 / VP9 / H.265), atomic text files, the completeness
marker, seeds and splits."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

# decord 0.6.0 raises "Check failed: from_size == to_size" on these frame widths (measured for even widths
# 8..198); write_video warns so a bad size is caught at generation time rather than in a data loader.
DECORD_UNSAFE_WIDTHS: frozenset[int] = frozenset({8, 12, 16, 24, 48, 72})

#: The codecs ``write_video`` writes: the encoder the PyAV wheel's FFmpeg has for each (it has no libaom-av1 or
#: librav1e encoder; AV1 is SVT-AV1), and its options (fast presets, one thread, no B-frames, quiet; ``crf`` is on
#: each encoder's own scale). AV1 is what yt-dlp fetches by default from YouTube, VP9 its WebM alternative; decord
#: reads VP9 and H.265 but not AV1.
VIDEO_CODECS: dict[str, tuple[str, dict[str, str]]] = {
    "h264": ("libx264", {"preset": "veryfast"}),
    "h265": ("libx265", {"preset": "veryfast", "x265-params": "log-level=error:bframes=0"}),
    "vp9": ("libvpx-vp9", {"deadline": "realtime", "cpu-used": "8", "b": "0"}),
    "av1": ("libsvtav1", {"preset": "10", "svtav1-params": "lp=1"}),
}
#: Container of each file suffix (any other: mp4).
CONTAINERS = {".webm": "webm", ".mkv": "matroska"}

MARKER_NAME = ".complete"
#: Present while the generator writes a folder (so an interrupted write may be resumed over).
WRITING_NAME = ".writing"
# Bumped whenever the rendered content changes, so stale datasets are regenerated rather than reused.
FORMAT_VERSION = 2

# Per-kind tags mixed into the RNG seed so the three kinds never share random streams for the same seed.
KIND_TAG = {"classification": 101, "spatiotemporal": 202, "temporal": 303}


@contextmanager
def same_scheduling() -> Iterator[None]:
    """Restore the calling thread's scheduling policy on exit. Run as root, SVT-AV1 (the AV1 encoder) switches the
    thread that opens it to real-time FIFO scheduling, which its children inherit: a busy child then holds a CPU
    that no normal process gets back."""
    if not hasattr(os, "sched_getscheduler"):  # not on Linux
        yield
        return
    policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    try:
        yield
    finally:
        if os.sched_getscheduler(0) != policy or os.sched_getparam(0) != param:
            os.sched_setscheduler(0, policy, param)


def write_video(
    path: str | Path,
    frames: np.ndarray,
    fps: int,
    *,
    crf: int = 20,
    preset: str | None = None,
    gop: int | None = None,
    codec: str = "h264",
) -> None:
    """Encode ``frames`` (T, H, W, 3) uint8 RGB as an H.264 (yuv420p) mp4 at ``fps``, or in another of
    ``VIDEO_CODECS`` (``codec``); ``.webm`` / ``.mkv`` files are WebM / Matroska (no frame count in the header).

    The file is written under a ``.part`` name and renamed at the end, so a crash never leaves a truncated
    ``.mp4`` behind. B-frames are disabled and one encoder thread is used, so every decoder reports exactly T
    frames and reruns are byte-identical in all but rare cases. Widths in
    ``DECORD_UNSAFE_WIDTHS`` encode fine but trigger a warning because decord cannot read them.
    """
    import av  # deferred: importing this module must stay cheap and side-effect free

    if codec not in VIDEO_CODECS:
        raise ValueError(f"codec must be one of {', '.join(VIDEO_CODECS)}, got {codec!r}")
    encoder, options = VIDEO_CODECS[codec]
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    t, h, w, _ = frames.shape
    if t < 1:
        raise ValueError("frames must contain at least one frame")
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs even width and height, got {w}x{h}")
    if w in DECORD_UNSAFE_WIDTHS and codec == "h264":
        warnings.warn(f"decord 0.6.0 cannot decode {w} px wide videos; pick another width", stacklevel=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    try:
        container_format = CONTAINERS.get(path.suffix, "mp4")
        # Matroska's segment id is random unless bit-exact output is asked for
        bitexact = {"fflags": "+bitexact"} if container_format != "mp4" else {}
        with same_scheduling(), av.open(str(tmp), "w", format=container_format, options=bitexact) as container:
            stream = container.add_stream(encoder, rate=int(fps))
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            ctx = stream.codec_context
            ctx.gop_size = int(gop if gop is not None else max(1, int(fps)))
            ctx.max_b_frames = 0
            ctx.thread_count = 1
            stream.options = {**options, "crf": str(crf), **({"preset": preset} if preset else {})}
            for i in range(t):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
                frame.pts = i
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    # Temp file in the same directory so os.replace is an atomic rename on the same filesystem; a plain open
    # (not mkstemp) keeps the usual umask-derived permissions instead of 0600.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def text_lines(rows: list[str]) -> str:
    return "".join(r + "\n" for r in rows)


def begin_writing(root: Path) -> None:
    """Claim ``root`` for writing: refused when it holds anything this generator did not write."""
    root.mkdir(parents=True, exist_ok=True)
    ours = (root / MARKER_NAME).exists() or (root / WRITING_NAME).exists()
    if not ours and any(root.iterdir()):
        raise FileExistsError(
            f"{root} holds files the synthetic data generator did not write; refusing to write synthetic videos "
            "over them. Point data.init_args.root at an empty folder (or one written by the generator), or set "
            "data.init_args.synthetic: false to use the data that is there"
        )
    (root / WRITING_NAME).touch()
    # Removing the marker first means an interrupted regeneration is reported as incomplete.
    (root / MARKER_NAME).unlink(missing_ok=True)


def finish_writing(root: Path, kind: str, params: dict[str, Any]) -> None:
    record = {"kind": kind, "format_version": FORMAT_VERSION, **params}
    write_text_atomic(root / MARKER_NAME, json.dumps(record, indent=2, sort_keys=True) + "\n")
    (root / WRITING_NAME).unlink(missing_ok=True)


def is_complete(root: str | Path, kind: str | None = "classification", **expected: Any) -> bool:
    """True when ``root`` holds a fully written dataset of ``kind`` (None: any kind).

    ``expected`` parameters (e.g. ``seed=0, videos_per_class=40``) must also match the ones recorded in the
    marker, so a data module can regenerate when it asks for a different configuration.
    """
    marker = Path(root) / MARKER_NAME
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION:
        return False
    if kind is not None and record.get("kind") != kind:
        return False
    for key, value in expected.items():
        recorded = record.get(key)
        if isinstance(value, tuple):
            value = list(value)  # JSON has no tuples
        if recorded != value:
            return False
    return True


def num_val(n: int, fraction: float) -> int:
    if n <= 0 or fraction <= 0:
        return 0
    if fraction >= 1:
        return n
    k = int(math.floor(n * fraction + 0.5))
    # Keep both sides non-empty whenever possible: a split with an empty val set is useless for tests.
    return min(max(k, 1), n - 1) if n >= 2 else 0


def check_seed(seed: int) -> int:
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return seed
