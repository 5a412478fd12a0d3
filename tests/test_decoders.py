"""The decoding backends (``decoder: auto | decord | pyav``): the same frames from both, frame-accurate access by
index against a plain sequential decode, the codecs decord cannot read, and the corrupt-file verdict.

Tolerance between the backends: 1 grey level. Both convert with swscale, honouring the stream's colour tags, and
give the same bytes on these files; decord ships FFmpeg 4.1 and PyAV a current FFmpeg, whose SIMD conversion
kernels may round one level apart on another CPU. A wrong matrix or range is 20 levels or more off (asserted).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from datamodules.synthetic import write_video
from datamodules.video_io import VideoDecodeError, open_video
from tests.conftest import ramp_video

#: Grey levels the two backends may differ by (see the module doc).
TOLERANCE = 1


def noise_video(num_frames: int, height: int = 32, width: int = 64, seed: int = 0) -> np.ndarray:
    """Frames of independent noise over a gradient: any frame mistaken for another is far off."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 127 // (width + height)], -1)
    noise = rng.integers(0, 96, (num_frames, height, width, 3))
    return (base[None] * 0.6 + noise).clip(0, 255).astype(np.uint8)


def write_av(path: Path, frames: np.ndarray, fps: int = 25, fmt: str | None = None, gop: int = 6,
             b_frames: int = 0, first_pts: int = 0, colorspace: str | None = None) -> Path:
    """An H.264 file written with PyAV directly: B-frames, a first timestamp other than 0, BT.709 tags."""
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        ctx = stream.codec_context
        ctx.gop_size, ctx.max_b_frames, ctx.thread_count = gop, b_frames, 1
        if colorspace == "bt709":
            ctx.colorspace, ctx.color_range = 1, 1  # AVCOL_SPC_BT709, AVCOL_RANGE_MPEG (limited), as YouTube's
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if colorspace == "bt709":
                frame = frame.reformat(format="yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG")
            frame.pts = first_pts + i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def sequential_decode(path: Path, **reformat) -> np.ndarray:
    """Every frame in decoding order, by PyAV with no seeking: the reference of frame ``i``."""
    with av.open(str(path)) as container:
        return np.stack([
            f.reformat(format="rgb24", **reformat).to_ndarray() for f in container.decode(video=0)
        ])  # fmt: skip


def max_diff(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


@pytest.mark.parametrize("tagged", ["untagged", "bt709"])
def test_both_backends_give_the_same_h264_frames(tmp_path, tagged):
    """decord and PyAV: the same RGB frames of an H.264 file, untagged (BT.601, limited range by default) or tagged
    BT.709 limited range, as YouTube's videos are; decoding with the other matrix is far off."""
    frames = noise_video(20, 48, 80)
    if tagged == "bt709":
        path = write_av(tmp_path / "bt709.mp4", frames, colorspace="bt709")
    else:
        path = tmp_path / "plain.mp4"
        write_video(path, frames, 25)
    idx = np.arange(20)
    decord_frames = open_video(path, decoder="decord").get_frames(idx)
    pyav = open_video(path, decoder="pyav")
    assert pyav.backend == "pyav" and pyav.num_frames == 20 and pyav.fps == pytest.approx(25)
    assert max_diff(pyav.get_frames(idx), decord_frames) <= TOLERANCE
    wrong = "ITU601" if tagged == "bt709" else "ITU709"
    assert max_diff(sequential_decode(path, src_colorspace=wrong), decord_frames) >= 20


# name: (suffix, writer keywords, backends that read it frame-accurately)
ACCESS_FILES = {
    "h264_gop6": (".mp4", {"gop": 6}, ("pyav", "decord")),
    "h264_bframes_first_pts_37": (".mkv", {"fmt": "matroska", "b_frames": 2, "first_pts": 37}, ("pyav", "decord")),
    # MPEG-TS starts at 1.4 s; decord reads the wrong frames of it by index, PyAV the right ones
    "h264_mpegts": (".ts", {"fmt": "mpegts", "b_frames": 2}, ("pyav",)),
    "vp9_webm_no_frame_count": (".webm", {"codec": "vp9"}, ("pyav", "decord")),
}
ACCESS_CASES = [(name, backend) for name, (_, _, backends) in ACCESS_FILES.items() for backend in backends]


@pytest.mark.parametrize(("name", "backend"), ACCESS_CASES)
def test_access_by_index_is_the_sequential_decode(tmp_path, name, backend):
    """Random, sparse, dense, repeated and out-of-order indices read the frames a sequential decode numbers so, in
    containers whose first timestamp is not 0 and without a frame count (WebM: counted by demuxing)."""
    suffix, kwargs, _ = ACCESS_FILES[name]
    frames = noise_video(75)
    path = tmp_path / f"{name}{suffix}"
    if "codec" in kwargs:
        write_video(path, frames, 25, gop=6, **kwargs)
    else:
        write_av(path, frames, **kwargs)
    reference = sequential_decode(path)
    assert len(reference) == 75
    video = open_video(path, decoder=backend)
    assert video.backend == backend and video.num_frames == 75
    rng = np.random.default_rng(1)
    requests = [
        [74], [0], [5, 5, 5], list(range(30, 46)), list(range(3, 75, 9)), [70, 2, 40, 41, 2, 13],
        list(range(74, 60, -3)), sorted(rng.integers(0, 75, 8).tolist()),
    ] + [rng.integers(0, 75, int(rng.integers(1, 12))).tolist() for _ in range(8)]  # fmt: skip
    tolerance = 0 if backend == "pyav" else TOLERANCE
    for idx in requests:  # one reader throughout: each request starts where the previous left the decoder
        assert max_diff(video.get_frames(idx), reference[idx]) <= tolerance, idx
    assert max_diff(video.get_frames([80, -3]), reference[[74, 0]]) <= tolerance  # clamped to the video
    times = [0.0, 0.5, 1.01, 2.95]  # at 25 fps: frames 0, 12, 25, 73
    assert max_diff(video.get_frames_at(times), reference[[0, 12, 25, 73]]) <= tolerance


@pytest.mark.parametrize("codec", ["av1", "vp9", "h265"])
def test_other_codecs_decode_under_auto_and_pyav(tmp_path, codec):
    """AV1, VP9 and H.265 files of the synthetic writer open under ``auto`` and ``pyav`` (not corrupt): every frame
    where a sequential decode has it, and recognisably the frame written. decord cannot open AV1, which ``auto``
    then reads with PyAV."""
    path = tmp_path / f"ramp_{codec}.mp4"
    scheduling = os.sched_getscheduler(0), os.sched_getparam(0)
    write_video(path, ramp_video(30, 48, 64), 10, codec=codec)
    # Run as root, SVT-AV1 switches the thread that opens it to real-time FIFO scheduling: the writer undoes it
    # (else a busy child of this process, e.g. a data loader worker, holds a CPU nothing else gets back).
    assert (os.sched_getscheduler(0), os.sched_getparam(0)) == scheduling
    reference = sequential_decode(path)
    idx = [29, 0, 7, 8, 9, 20, 3]
    for decoder in ("auto", "pyav"):
        video = open_video(path, decoder=decoder)
        assert video.num_frames == 30 and video.fps == pytest.approx(10)
        frames = video.get_frames(idx)
        assert max_diff(frames, reference[idx]) <= TOLERANCE
        assert [round(f.float().mean().item() / 8) for f in frames] == idx  # the ramp's grey level is i * 8
    if codec == "av1":
        assert open_video(path, decoder="auto").backend == "pyav"
        with pytest.raises(VideoDecodeError, match="decoder: auto") as info:
            open_video(path, decoder="decord")
        assert info.value.kind == "corrupt"
    else:
        assert open_video(path, decoder="auto").backend == "decord"


@pytest.mark.parametrize("damage", ["zeros", "truncated"])
def test_a_corrupt_file_is_corrupt_with_both_reasons(tmp_path, make_video, damage):
    path = tmp_path / f"{damage}.mp4"
    if damage == "zeros":
        path.write_bytes(b"\0" * 4096)
    else:  # the first half of a file whose index (moov) is at its end
        data = make_video("whole.mp4", 30).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoDecodeError) as info:
        open_video(path)
    err = info.value
    assert err.kind == "corrupt" and err.reason.startswith("cannot be opened as a video")
    assert "decord: " in err.reason and "PyAV: " in err.reason
    with pytest.raises(VideoDecodeError) as info:
        open_video(path, decoder="pyav")
    assert info.value.kind == "corrupt" and "decord" not in info.value.reason


def test_a_width_decord_cannot_convert_is_read_by_pyav_under_auto(tmp_path):
    """decord opens 48 px wide videos but fails to convert their frames: ``decord`` reports decode_failed,
    ``auto`` reads them with PyAV."""
    frames = noise_video(12, 32, 48)
    path = tmp_path / "narrow.mp4"
    with pytest.warns(UserWarning, match="48 px wide"):
        write_video(path, frames, 10)
    with pytest.raises(VideoDecodeError) as info:
        open_video(path, decoder="decord").get_frames([1, 5])
    assert info.value.kind == "decode_failed"
    video = open_video(path, decoder="auto")
    assert max_diff(video.get_frames([1, 5]), sequential_decode(path)[[1, 5]]) == 0
    assert video.backend == "pyav"


def test_without_decord_auto_is_pyav(monkeypatch, make_video):
    """Where decord is not installed (aarch64), ``auto`` and ``pyav`` read with PyAV; ``decord`` says what to do."""
    path = make_video("ramp.mp4", 20)
    monkeypatch.setitem(sys.modules, "decord", None)  # import decord now raises ImportError
    video = open_video(path)
    assert video.backend == "pyav" and video.num_frames == 20
    assert [round(f.float().mean().item() / 8) for f in video.get_frames([0, 19, 7])] == [0, 19, 7]
    with pytest.raises(ModuleNotFoundError, match="decoder: pyav"):
        open_video(path, decoder="decord")


def test_unknown_decoder_is_refused(make_video):
    with pytest.raises(ValueError, match="auto, decord, pyav"):
        open_video(make_video("ramp.mp4", 10), decoder="opencv")  # type: ignore[arg-type]


def test_a_data_module_with_pyav_loads_decords_batches(synthetic_classification):
    """The classification data module with ``decoder: pyav``: the training batch (the same seeded samples) and the
    evaluation batch decord's gives, within the tolerance."""
    from datamodules.classification import VideoClassificationDataModule

    batches = {}
    for decoder in ("decord", "pyav"):
        dm = VideoClassificationDataModule(
            root=str(synthetic_classification), num_frames=8, frame_stride=2, crop_size=64,
            train_short_side=(64, 72), eval_short_side=64, randaugment_ops=0, batch_size=4, num_workers=0,
            test_num_clips=2, decoder=decoder,
        )  # fmt: skip
        assert dm.dataset("val").decoder == decoder
        batches[decoder] = (next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader())))
    for decord_batch, pyav_batch in zip(*batches.values(), strict=True):
        assert pyav_batch["video"].shape == decord_batch["video"].shape and pyav_batch["batch_size"] == 4
        assert torch.equal(pyav_batch["label"], decord_batch["label"])
        assert max_diff(pyav_batch["video"], decord_batch["video"]) <= TOLERANCE
