"""UCF101-24 / JHMDB data from ACT ground-truth pickles: splits, frame-level samples, whole-video evaluation."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.act_pickle import ActPickleDataModule, read_act_pickle
from datamodules.base import AnnotationError, BadVideoError

HEIGHT, WIDTH = 24, 32
NFRAMES = {"a/v1": 6, "b/v2": 5, "a/v3": 4}


def tube(frames, box) -> np.ndarray:
    return np.array([[f, *box] for f in frames], dtype=np.float32)


def ground_truth() -> dict:
    return {
        "labels": ["jump", "run"],
        "gttubes": {
            # Frame 5's box reaches past the 32 px width: clipped to it.
            "a/v1": {0: [np.concatenate([tube([2, 3, 4], (2, 3, 20, 18)), tube([5], (4, 5, 40, 20))])]},
            # Tube 1's box on frame 4 lies outside the frame: dropped, so v2 has boxes on frames 1-3.
            "b/v2": {
                1: [
                    tube([1, 2, 3], (1, 1, 10, 12)),
                    np.concatenate([tube([3], (12, 2, 30, 22)), tube([4], (33, 2, 40, 9))]),
                ]
            },
            "a/v3": {0: [tube([1, 2, 3, 4], (0, 0, 16, 12))]},
        },
        "nframes": dict(NFRAMES),
        "train_videos": [["a/v1", "b/v2"], ["a/v1"], ["b/v2", "a/v3"]],
        "test_videos": [["a/v3"], ["b/v2", "a/v3"], ["a/v1"]],
        "resolution": {v: (HEIGHT, WIDTH) for v in NFRAMES},
    }


def write_pickle(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        pickle.dump(data, handle, protocol=2)  # the protocol Python 2 wrote the real files with
    return path


@pytest.fixture
def act_root(tmp_path) -> Path:
    """The pickle and every frame as rgb-images/<video>/<%05d>.jpg; frame f has grey level 10 f."""
    from PIL import Image

    root = tmp_path / "ucf"
    write_pickle(root / "GT.pkl", ground_truth())
    for video, n in NFRAMES.items():
        for f in range(1, n + 1):
            path = root / "rgb-images" / video / f"{f:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((HEIGHT, WIDTH, 3), 10 * f, np.uint8)).save(path, quality=95)
    return root


def module(root: Path, **kwargs) -> ActPickleDataModule:
    args = {
        "annotation_file": "GT.pkl", "num_frames": 4, "frame_stride": 2, "train_short_side": (24, 24),
        "eval_short_side": 48, "flip": False, "batch_size": 2, "num_workers": 0,
    }  # fmt: skip
    return ActPickleDataModule(str(root), **{**args, **kwargs})


def test_splits_give_the_frames_with_boxes_for_training_and_every_frame_for_evaluation(act_root):
    annotations = read_act_pickle(act_root / "GT.pkl")
    assert annotations.num_splits == 3 and annotations.labels == ["jump", "run"]
    # Training samples by hand: split 1 = v1 frames 2-5 and v2 frames 1-3; split 2 = v1; split 3 = v2 and v3.
    expected_train = {
        1: [(0, 2), (0, 3), (0, 4), (0, 5), (1, 1), (1, 2), (1, 3)],
        2: [(0, 2), (0, 3), (0, 4), (0, 5)],
        3: [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3), (1, 4)],
    }
    expected_eval = {
        1: [(0, f) for f in range(1, 5)],
        2: [(0, f) for f in range(1, 6)] + [(1, f) for f in range(1, 5)],
    }
    for split, samples in expected_train.items():
        dm = module(act_root, split=split)
        dm.setup("fit")
        assert dm.dataset("train").samples == samples
        if split in expected_eval:
            assert dm.dataset("val").samples == expected_eval[split]
    dm = module(act_root, split=2)
    assert dm.video_names("train") == ["a/v1"] and dm.video_names("val") == ["b/v2", "a/v3"]
    assert module(act_root, split=2, eval_frame_step=3).dataset("val").samples == [
        (0, 1),
        (0, 4),
        (1, 1),
        (1, 4),
    ]


def test_samples_carry_tubes_classes_and_the_clip_around_the_frame(act_root):
    dm = module(act_root)
    dm.setup("fit")
    train = dm.dataset("train")
    sample = train[train.samples.index((1, 3))]  # v2, frame 3: both tubes of class 1
    # 4 frames at stride 2 around frame 3 (0-based 2): 0-based -2, 0, 2, 4 -> clamped -> frames 1, 1, 3, 5.
    np.testing.assert_allclose(sample["video"].float().mean(dim=(0, 2, 3)).numpy(), [10, 10, 30, 50], atol=2)
    assert sample["video"].shape == (3, 4, 24, 32) and sample["image_size"] == (24, 32)
    np.testing.assert_allclose(sample["boxes"].numpy(), [[1, 1, 10, 12], [12, 2, 30, 22]])
    assert sample["classes"].tolist() == [1, 1] and sample["tube_ids"].tolist() == [0, 1]
    assert sample["labels"].tolist() == [[0.0, 1.0], [0.0, 1.0]] and sample["frame"] == 3
    clipped = train[train.samples.index((0, 5))]
    np.testing.assert_allclose(clipped["boxes"].numpy(), [[4, 5, 32, 20]])  # x2 40 clipped to the width

    batch = next(iter(dm.val_dataloader()))  # v3 frames 1 and 2 at eval short side 48: boxes x2
    assert batch["video"].shape == (2, 3, 4, 64, 64) and batch["image_size"].tolist() == [[48, 64]] * 2
    assert batch["orig_size"].tolist() == [[24, 32]] * 2 and batch["frame"].tolist() == [1, 2]
    for boxes in batch["boxes"]:
        np.testing.assert_allclose(boxes.numpy(), [[0, 0, 32, 24]])
    assert [t.tolist() for t in batch["tube_ids"]] == [[0], [0]] and batch["video_index"].tolist() == [0, 0]


def test_random_short_side_scales_boxes_with_the_frame(act_root):
    dm = module(act_root, train_short_side=(26, 40), flip=True)
    dm.setup("fit")
    train = dm.dataset("train")
    sizes = set()
    for i in range(len(train)):
        with torch.random.fork_rng():
            torch.manual_seed(i)
            sample = train[i]
        h, w = sample["image_size"]
        assert 26 <= h <= 40 and w == int(WIDTH * h / HEIGHT + 0.5) and sample["video"].shape[-2:] == (h, w)
        position, frame = train.samples[i]
        rows = dm.dataset("train").videos[position].boxes_at(frame)[:, 1:5]
        expected = rows * [w / WIDTH, h / HEIGHT, w / WIDTH, h / HEIGHT]
        mirrored = expected.copy()
        mirrored[:, [0, 2]] = w - expected[:, [2, 0]]
        got = sample["boxes"].numpy()
        assert np.allclose(got, expected, atol=1e-4) or np.allclose(got, mirrored, atol=1e-4)
        sizes.add(h)
    assert len(sizes) > 1


def test_bad_pickles_name_the_file_and_entry(act_root, tmp_path):
    data = ground_truth()
    del data["resolution"]
    with pytest.raises(AnnotationError, match=r"bad1\.pkl: no 'resolution' entry"):
        read_act_pickle(write_pickle(tmp_path / "bad1.pkl", data))
    data = ground_truth()
    data["gttubes"]["a/v1"][0][0][0, 0] = 7  # frame 7 of a 6-frame video
    write_pickle(act_root / "GT.pkl", data)
    with pytest.raises(
        AnnotationError, match=r"GT\.pkl: video 'a/v1', class 0, tube 0: frame numbers .* 1\.\.nframes=6"
    ):
        module(act_root).setup("fit")
    write_pickle(act_root / "GT.pkl", ground_truth())
    with pytest.raises(AnnotationError, match="split 4 does not exist; it has splits 1..3"):
        module(act_root, split=4).setup("fit")
    with pytest.raises(AnnotationError, match="ground-truth pickle .*nothere.pkl not found"):
        module(act_root, annotation_file="nothere.pkl").setup("fit")


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_pickle_naming_anything_but_data_is_refused_and_never_run(tmp_path, protocol):
    """A ground-truth pickle with one more entry, whose unpickling calls a function: refused with the name, and
    the call never happens; the same data without it (dicts, lists, numpy arrays and scalars, sets) loads."""
    from tests.helpers import Payload

    marker = tmp_path / "ran"
    data = ground_truth()
    data["extra"] = Payload(str(marker))
    path = tmp_path / "hostile.pkl"
    with path.open("wb") as handle:
        pickle.dump(data, handle, protocol=protocol)
    with pytest.raises(AnnotationError, match=r"hostile\.pkl: .*tests\.helpers\.touch.*never holds"):
        read_act_pickle(path)
    assert not marker.exists()
    data = ground_truth()
    data["extra"] = {"seen": {np.int64(3), "b"}, "scale": np.float32(0.5)}
    with path.open("wb") as handle:
        pickle.dump(data, handle, protocol=protocol)
    assert read_act_pickle(path).labels == ground_truth()["labels"]


def test_missing_frames_stop_the_run_or_are_skipped_and_counted(act_root):
    shutil.rmtree(act_root / "rgb-images" / "a" / "v3")
    with pytest.raises(
        BadVideoError, match=r"GT\.pkl: video 'a/v3': frame file .*00001\.jpg not found.*bad_video: skip"
    ):
        module(act_root, split=2).setup("validate")
    dm = module(act_root, split=2, bad_video="skip")
    dm.setup("validate")
    assert dm.dataset("val").samples == [(0, f) for f in range(1, 6)] and dm.video_names("val") == ["b/v2"]
    assert dm.skip_counts == {"missing": 1} and dm.setup_skips("val") == {"missing": 1}
    (act_root / "rgb-images" / "b" / "v2" / "00005.jpg").unlink()  # disappears after setup: skipped when read
    batch = next(iter(dm.val_dataloader()))
    assert batch["batch_size"] == 2 and batch["frame"].tolist() == [1, 2]
    sample = dm.dataset("val")[2]  # frame 3's clip is frames 1, 1, 3, 5
    assert sample["skipped"][1] == "missing" and sample["skipped"][0].endswith("00005.jpg")


def test_resizing_on_the_device_gives_the_loaders_batches(act_root):
    """Random short sides (each sample its own size) and flips: the frames as decoded, resized on the device, give
    the loader path's batches to one grey level, with the same boxes and sizes."""
    batches = {}
    for where in ("loader", "device"):
        dm = module(act_root, train_short_side=(26, 40), flip=True, resize_on=where)
        dm.setup("fit")
        batches[where] = [dm.on_after_batch_transfer(b, 0) for b in dm.train_dataloader()]
    assert len(batches["device"]) == len(batches["loader"]) > 0
    sizes = set()
    for a, b in zip(batches["loader"], batches["device"], strict=True):
        torch.testing.assert_close(b["video"], a["video"], atol=1 / 255 / 0.225 + 1e-5, rtol=0)
        assert torch.equal(a["image_size"], b["image_size"])
        assert all(torch.equal(x, y) for x, y in zip(a["boxes"], b["boxes"], strict=True))
        sizes.update(map(tuple, b["image_size"].tolist()))
    assert len(sizes) > 1
