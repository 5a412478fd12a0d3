"""Decoding, sampling, transforms and the bad-input policy of the clip pipeline."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from datamodules.base import AnnotationError, BadVideoError, collate_clips, stack_clips
from datamodules.classification import ClipClassificationDataset, VideoClassificationDataModule
from datamodules.kinetics_list import VideoRecord, read_video_list
from datamodules.sampling import centre_clip, random_clip, uniform_clips
from datamodules.transforms import (
    EvalClipTransform,
    TrainClipTransform,
    normalize,
    resize_short_side,
    short_side_size,
    three_crops,
)
from datamodules.video_io import VideoDecodeError, open_video

OPENCV_VIDEO = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")


def frame_ids(frames: torch.Tensor) -> list[int]:
    """Recover the frame index a ramp video encoded in its grey level."""
    return [int(round(f.float().mean().item() / 8)) for f in frames]


def test_decode_by_index_and_time(make_video):
    video = open_video(make_video("ramp.mp4", 30, fps=10))
    assert video.num_frames == 30 and video.fps == pytest.approx(10)
    frames = video.get_frames([0, 5, 29, 40])  # past the end: clamped to the last frame
    assert frames.shape == (4, 48, 64, 3) and frames.dtype == torch.uint8
    assert frame_ids(frames) == [0, 5, 29, 29]
    assert frame_ids(video.get_frames([3, 6, 9, 12, 12])) == [
        3,
        6,
        9,
        12,
        12,
    ]  # short range: one sequential read
    assert frame_ids(video.get_frames([2, 6, 10, 14, 18])) == [2, 6, 10, 14, 18]  # every 4th: decord skips between
    assert frame_ids(video.get_frames_at([0.0, 1.25, 2.9])) == [0, 12, 29]


@pytest.mark.skipif(not OPENCV_VIDEO.exists(), reason="Debian package opencv-doc not installed (vtest.avi)")
def test_real_video_matches_pyav():
    import av

    video = open_video(OPENCV_VIDEO)
    assert video.num_frames == 795 and (video.get_frames([0]).shape[1:3]) == (576, 768)
    idx = [0, 100, 400, 794]
    ours = video.get_frames(idx).numpy().astype(np.int16)
    with av.open(str(OPENCV_VIDEO)) as container:
        ref = [f.to_ndarray(format="rgb24") for i, f in enumerate(container.decode(video=0)) if i in idx]
    diff = np.abs(ours - np.stack(ref).astype(np.int16))
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 3


def test_samplers():
    rng = np.random.default_rng(0)
    starts = {int(random_clip(100, 8, 4, rng)[0]) for _ in range(200)}
    assert min(starts) == 0 and max(starts) == 100 - 32 and len(starts) > 30
    assert centre_clip(100, 8, 4).tolist() == list(range(34, 66, 4))
    assert centre_clip(10, 8, 4)[0] == 0  # shorter than the span: starts at 0, the decoder clamps
    clips = uniform_clips(100, 8, 4, 3)
    assert clips.shape == (3, 8) and clips[0, 0] == 0 and clips[-1, -1] == 100 - 4


def test_train_transform_consistent_over_frames():
    torch.manual_seed(0)
    base = torch.randint(0, 256, (1, 90, 120, 3), dtype=torch.uint8)
    frames = base.repeat(6, 1, 1, 1)  # identical frames: every op must treat them identically
    out = TrainClipTransform(64, (64, 80), flip=True, randaugment_ops=2, randaugment_magnitude=9)(frames)
    assert out.shape == (3, 6, 64, 64) and out.dtype == torch.uint8
    assert torch.equal(out[:, 0], out[:, 5])


def test_eval_transform_against_torchvision():
    frames = torch.randint(0, 256, (4, 90, 160, 3), dtype=torch.uint8)
    views = EvalClipTransform(64, 72, num_crops=3)(frames)
    assert views.shape == (3, 3, 4, 64, 64)
    resized = TF.resize(frames.permute(0, 3, 1, 2), [72, 128], antialias=True)
    assert torch.equal(views[1].permute(1, 0, 2, 3), TF.center_crop(resized, [64, 64]))
    assert torch.equal(views[0].permute(1, 0, 2, 3), resized[..., 4:68, :64])
    assert torch.equal(views[2].permute(1, 0, 2, 3), resized[..., 4:68, -64:])
    assert [c.shape[-1] for c in three_crops(resized.transpose(-1, -2), 64)] == [64, 64, 64]


def test_normalize_per_channel_on_batched_clips():
    video = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1, 1).expand(2, 3, 4, 2, 2)
    out = normalize(video, mean=(0.0, 0.2, 0.5), std=(1.0, 0.5, 0.25))
    # (x / 255 - mean) / std by hand: channel 0: 0; channel 1: (0.2 - 0.2) / 0.5; channel 2: (1 - 0.5) / 0.25
    expected = torch.tensor([0.0, 0.0, 2.0]).view(1, 3, 1, 1, 1).expand(2, 3, 4, 2, 2)
    assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=1e-6)


@pytest.fixture
def bad_videos(tmp_path, make_video):
    good = make_video("good.mp4", 30)
    from datamodules.synthetic import write_video

    noise = np.random.default_rng(0).integers(
        0, 256, (40, 96, 128, 3), dtype=np.uint8
    )  # large, so not "empty"
    write_video(tmp_path / "whole.mp4", noise, 10)
    data = (tmp_path / "whole.mp4").read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])
    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("this is not a video\n" * 100)
    make_video("short.mp4", 3)
    return {
        "good": good, "truncated": truncated, "zero": tmp_path / "zero.mp4", "text": tmp_path / "text.mp4",
        "short": tmp_path / "short.mp4", "missing": tmp_path / "missing.mp4",
    }  # fmt: skip


def dataset(paths, policy, train=False):
    transform = (
        TrainClipTransform(32, (48, 48), flip=False, randaugment_ops=0)
        if train
        else EvalClipTransform(32, 48)
    )
    records = [VideoRecord(str(p), (0,)) for p in paths]
    return ClipClassificationDataset(
        records, 2, 8, 2, transform, train=train, min_video_frames=8, bad_video=policy
    )


@pytest.mark.parametrize(
    "name,kind",
    [
        ("truncated", "corrupt"),
        ("zero", "empty"),
        ("text", "corrupt"),
        ("short", "too_short"),
        ("missing", "missing"),
    ],
)
def test_bad_video_error_policy_names_file_and_fix(bad_videos, name, kind):
    ds = dataset([bad_videos[name]], "error")
    with pytest.raises(BadVideoError) as info:
        ds[0]
    assert str(bad_videos[name]) in str(info.value) and "bad_video=skip" in str(info.value)
    assert isinstance(info.value.__cause__, VideoDecodeError) and info.value.__cause__.kind == kind


def test_bad_video_skip_policy_counts_and_keeps_good_samples(bad_videos):
    names = ["good", "zero", "text", "short", "missing", "truncated", "good"]
    ds = dataset([bad_videos[n] for n in names], "skip", train=True)
    batch = collate_clips([ds[i] for i in range(len(ds))])
    assert batch["batch_size"] == 2 and batch["video"].shape == (2, 3, 8, 32, 32)
    assert batch["index"].tolist() == [0, 6]
    assert sorted(kind for _, kind, _, _ in batch["skipped"]) == [
        "corrupt",
        "corrupt",
        "empty",
        "missing",
        "too_short",
    ]
    dm = VideoClassificationDataModule(root=".", num_classes=2, bad_video="skip")
    out = dm.on_after_batch_transfer(batch, 0)
    assert out["video"].dtype == torch.float32
    skips = dm.epoch_skips("train")  # no trainer: recorded as training skips
    assert sorted(skips) == [1, 2, 3, 4, 5]
    assert Counter(kind for _, kind in skips.values()) == {"corrupt": 2, "empty": 1, "missing": 1, "too_short": 1}
    assert "5 samples skipped (5 distinct files)" in dm.skip_summary(skips)
    # The same samples again (a DDP padding repeat, or a later batch of the epoch) are not counted twice.
    dm.on_after_batch_transfer(collate_clips([ds[i] for i in range(len(ds))]), 0)
    assert len(dm.epoch_skips("train")) == 5 and dm.epoch_samples("train") == 4
    dm.start_epoch("train")
    assert dm.epoch_skips("train") == {} and dm.epoch_samples("train") == 0


def test_all_bad_batch_is_empty_not_a_crash(bad_videos):
    ds = dataset([bad_videos["zero"], bad_videos["text"]], "skip")
    batch = collate_clips([ds[0], ds[1]])
    assert batch["batch_size"] == 0 and "video" not in batch and len(batch["skipped"]) == 2


def test_video_list_errors(tmp_path):
    (tmp_path / "list.txt").write_text("a.mp4 120 3\nb.mp4 1,2\n\n# comment\n")
    records = read_video_list(tmp_path / "list.txt", tmp_path, num_classes=4)
    assert records == [
        VideoRecord(str(tmp_path / "a.mp4"), (3,)),
        VideoRecord(str(tmp_path / "b.mp4"), (1, 2)),
    ]
    with pytest.raises(AnnotationError, match=r"list.txt:1: label 3 is outside \[0, 3\)"):
        read_video_list(tmp_path / "list.txt", tmp_path, num_classes=3)
    (tmp_path / "bad.txt").write_text("a.mp4 120 3\nonly_a_path.mp4\n")
    with pytest.raises(AnnotationError, match=r"bad.txt:2: expected"):
        read_video_list(tmp_path / "bad.txt", tmp_path)
    with pytest.raises(AnnotationError, match="not found.*one video per line"):
        read_video_list(tmp_path / "absent.txt", tmp_path)


# The workers start from a fork server (the default) that imported the data module's code once, instead of every
# worker of both loaders importing torch and Lightning anew (seconds each).
@pytest.mark.forkserver_preload("datamodules.classification")
def test_datamodule_streams_synthetic_set_with_workers(synthetic_classification):
    dm = VideoClassificationDataModule(
        root=str(synthetic_classification), num_frames=8, frame_stride=2, crop_size=64, train_short_side=(64, 72),
        eval_short_side=64, flip=False, randaugment_ops=0, batch_size=4, num_workers=2, test_num_clips=2,
    )  # fmt: skip
    assert dm.num_classes == 8
    batch = next(iter(dm.train_dataloader()))
    assert batch["video"].shape == (4, 3, 8, 64, 64) and batch["video"].dtype == torch.uint8
    val = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert val["video"].shape == (4, 2, 3, 8, 64, 64) and val["video"].min() >= -1 and val["video"].max() <= 1
    assert len(dm.dataset("val")) == 8 and len(dm.dataset("train")) == 16


def test_an_unreadable_video_is_named_as_such_not_as_corrupt(tmp_path, monkeypatch, make_video):
    """A file this user may not read (simulated: the tests run as root, whom permissions do not stop; both Python's
    open and decord's fail on it, as they do for a user without the right) is reported as permission denied, kind
    ``unreadable``, not as a video decord cannot open; a folder is no video either."""
    import builtins

    import decord

    from datamodules.video_io import Video

    path = make_video("ramp.mp4", 10, fps=10)
    real_open, real_reader = builtins.open, decord.VideoReader

    def denied(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    def reader(file, *args, **kwargs):
        if str(file) == str(path):
            raise RuntimeError(f"ERROR opening: {file}, Permission denied")
        return real_reader(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denied)
    monkeypatch.setattr(decord, "VideoReader", reader)
    with pytest.raises(VideoDecodeError, match="permission denied") as info:
        open_video(path)
    assert info.value.kind == "unreadable"
    monkeypatch.setattr(builtins, "open", real_open)
    monkeypatch.setattr(decord, "VideoReader", real_reader)
    assert Video(path).num_frames == 10  # readable again (``open_video`` remembers a bad file until it changes)
    (tmp_path / "folder.mp4").mkdir()
    with pytest.raises(VideoDecodeError, match="a folder, not a video file"):
        open_video(tmp_path / "folder.mp4")


def test_randaugment_on_the_device_gives_the_loaders_clips(synthetic_classification):
    """augment_on: device -- the worker decodes only, each clip (and its static twin) carries the frames as
    decoded and its draws (short side, crop, flip, RandAugment seed), and the data module applies the transform
    after the transfer: the same normalised batch as the loader path, clip for clip (the same sample keys)."""
    from datamodules.base import SampleKey

    batches = {}
    for where in ("loader", "device"):
        dm = VideoClassificationDataModule(
            root=str(synthetic_classification), num_frames=8, frame_stride=2, crop_size=64,
            train_short_side=(64, 72), flip=True, randaugment_ops=2, static_clips=True, batch_size=4,
            num_workers=0, augment_on=where,
        )  # fmt: skip
        dataset = dm.dataset("train")
        batch = collate_clips([dataset[SampleKey(i, 0, 3)] for i in range(6)])
        assert ("video_plan" in batch) == ("static_plan" in batch) == (where == "device")
        batch = dm.on_before_batch_transfer(batch, 0)  # the plans become ints before the transfer
        assert all(isinstance(v, int) for plan in batch.get("video_plan", []) for v in plan)
        if where == "device":  # the frames as decoded, uncopied
            clip = batch["video"][0]  # (3, T, H, W) over (T, H, W, 3) memory, the set's 80 x 80 frames
            assert isinstance(batch["video"], list) and clip.shape[-2:] == (80, 80)
            assert clip.permute(1, 2, 3, 0).is_contiguous()
        else:  # stacked channels-last, as the resize left the clips
            assert batch["video"].permute(0, 2, 3, 4, 1).is_contiguous()
        batches[where] = dm.on_after_batch_transfer(batch, 0)
        assert batches[where]["video"].is_contiguous() and batches[where]["static"].is_contiguous()
    for key in ("video", "static"):
        assert torch.equal(batches["loader"][key], batches["device"][key])
    # RandAugment did act: the clips differ from the same pipeline without it
    plain = VideoClassificationDataModule(
        root=str(synthetic_classification), num_frames=8, frame_stride=2, crop_size=64, train_short_side=(64, 72),
        flip=True, randaugment_ops=0, static_clips=True, batch_size=4, num_workers=0,
    )  # fmt: skip
    unaugmented = plain.on_after_batch_transfer(
        collate_clips([plain.dataset("train")[SampleKey(i, 0, 3)] for i in range(6)]), 0
    )
    assert unaugmented["video"].shape == batches["loader"]["video"].shape
    assert not torch.equal(unaugmented["video"], batches["loader"]["video"])


def test_clips_are_stacked_as_they_lie_and_made_contiguous_on_the_device(synthetic_classification):
    """``stack_clips`` equals ``torch.stack`` whatever the clips' layout, keeps a channels-last one (no transpose
    in the worker), and the transfer hook hands the model the contiguous normalised batch."""
    gen = torch.Generator().manual_seed(0)
    frames = [torch.randint(0, 256, (4, 6, 5, 3), dtype=torch.uint8, generator=gen) for _ in range(2)]
    lying = [f.permute(3, 0, 1, 2) for f in frames]  # (3, T, H, W) views of (T, H, W, 3)
    planar = [c.contiguous() for c in lying]
    for clips in (lying, planar, [c[:, :, 1:4] for c in lying], [c.flip(-1) for c in planar]):
        assert torch.equal(stack_clips(clips), torch.stack(clips))
    assert stack_clips(lying).permute(0, 2, 3, 4, 1).is_contiguous() and stack_clips(planar).is_contiguous()
    assert torch.equal(stack_clips(lying[:1]), torch.stack(lying[:1]))
    assert stack_clips(lying[:1]).data_ptr() == lying[0].data_ptr()  # a whole clip alone: not copied
    crop = lying[0][:, :, 1:4]  # a view of part of its storage: copied, so that only the crop travels
    assert torch.equal(stack_clips([crop]), crop[None]) and stack_clips([crop]).data_ptr() != crop.data_ptr()
    dm = VideoClassificationDataModule(root=str(synthetic_classification), num_workers=0)
    out = dm.on_after_batch_transfer({"video": stack_clips(lying), "batch_size": 2}, 0)["video"]
    assert out.is_contiguous()
    torch.testing.assert_close(out, normalize(torch.stack(planar), dm.mean, dm.std), rtol=0, atol=0)


@pytest.mark.parametrize("size", [(240, 320, 256), (320, 240, 288), (180, 320, 182), (257, 256, 256), (99, 77, 99)])
def test_a_plans_resized_size_is_the_one_torchvision_gives(size):
    """The worker draws a crop corner in a frame it does not resize (augment_on: device): the size it assumes is
    the one the resize then gives."""
    height, width, short = size
    out = resize_short_side(torch.zeros(1, 3, height, width, dtype=torch.uint8), short)
    assert tuple(out.shape[-2:]) == short_side_size(height, width, short)
