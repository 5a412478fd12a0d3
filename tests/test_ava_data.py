"""AVA data: CSV parsing and checks, clip frame indices, box geometry, padding, and the data module end to end."""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules import synthetic
from datamodules.ava import AVADataModule
from datamodules.ava_annotations import read_ava_csv, read_excluded_timestamps, read_label_map
from datamodules.base import AnnotationError, BadVideoError, batch_buffer
from datamodules.keyframes import (
    FrameFolder,
    clip_frame_indices,
    collate_keyframes,
    flip_boxes,
    keyframe_clip_indices,
    resize_keyframe_batch,
    resized_size,
    transform_keyframe_clip,
)
from datamodules.video_io import VideoDecodeError

LABEL_MAP = (
    'item {\n  name: "e"\n  id: 5\n}\nitem {\n  name: "a"\n  id: 1\n}\nitem {\n  name: "c"\n  id: 3\n}\n'
)
SYNTHETIC = synthetic.SpatiotemporalSet(num_videos=3, val_fraction=1 / 3, size=(64, 80), seconds=4, fps=12, seed=3)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------ parsing


def test_rows_of_one_box_merge_into_one_multi_hot_target(tmp_path):
    rows = (
        "vidA,0902,0.1,0.2,0.5,0.6,1,0\n"
        "vidA,0902,0.1,0.2,0.5,0.6,5,0\n"
        "vidA,0902,0.3,0.3,0.9,0.9,3,1\n"
        "vidA,0902,0.3,0.3,0.9,0.9,2,1\n"  # id 2 is not in the label map: dropped
        "vidB,0905,0.0,0.0,1.0,1.0,1,0\n"  # excluded keyframe
        "\n"
        "vidA,0903,0.2,0.2,0.4,0.4,7,0\n"  # a person with no class of the label map
        "vidB,0902,0.0,0.1,0.2,0.3,3,0\n"
    )
    path = write(tmp_path / "train.csv", rows)
    excluded = read_excluded_timestamps(write(tmp_path / "excluded.csv", "vidB,0905\n"))
    assert excluded == {("vidB", 905)}
    action_ids = sorted(read_label_map(write(tmp_path / "map.pbtxt", LABEL_MAP)))
    assert action_ids == [1, 3, 5]
    keyframes = read_ava_csv(path, action_ids, 80, excluded)
    assert [(k.video_id, k.timestamp, k.line) for k in keyframes] == [
        ("vidA", 902, 1), ("vidA", 903, 7), ("vidB", 902, 8)
    ]  # fmt: skip
    np.testing.assert_allclose(keyframes[0].boxes, [[0.1, 0.2, 0.5, 0.6], [0.3, 0.3, 0.9, 0.9]])
    np.testing.assert_array_equal(keyframes[0].labels, [[1, 0, 1], [0, 1, 0]])  # ids 1+5, then 3
    np.testing.assert_array_equal(keyframes[1].labels, [[0, 0, 0]])
    np.testing.assert_array_equal(keyframes[2].labels, [[0, 1, 0]])
    dropped = read_ava_csv(path, action_ids, 80, excluded, keep_unlabelled_boxes=False)
    assert [(k.video_id, k.timestamp) for k in dropped] == [("vidA", 902), ("vidB", 902)]


def test_label_map_keeps_its_classes_in_id_order(tmp_path):
    text = (
        'item {\n  name: "stand"\n  id: 12\n  label_type: PERSON_MOVEMENT\n}\n'
        'item {\n  name: "bend/bow (at the waist)"\n  label_id: 1\n}\n'
    )
    path = write(tmp_path / "root" / "annotations" / "map.pbtxt", text)
    assert read_label_map(path) == {12: "stand", 1: "bend/bow (at the waist)"}
    dm = AVADataModule(str(tmp_path / "root"), label_map="annotations/map.pbtxt")
    assert dm.action_ids == [1, 12] and dm.class_names == ["bend/bow (at the waist)", "stand"]
    assert dm.num_classes == 2
    with pytest.raises(AnnotationError, match=r"map2\.pbtxt:4: .*listed once"):
        read_label_map(
            write(tmp_path / "map2.pbtxt", 'item { name: "a" id: 1 }\n\n\nitem { name: "b" id: 1 }\n')
        )


def test_rows_outside_the_label_map_are_counted_per_id_and_a_class_without_rows_stops_training(tmp_path, caplog):
    rows = "vidA,0902,0.1,0.2,0.5,0.6,1,0\nvidA,0902,0.1,0.2,0.5,0.6,2,0\nvidA,0903,0.1,0.2,0.5,0.6,2,0\n"
    rows += "vidA,0903,0.3,0.3,0.9,0.9,7,1\nvidB,0902,0.1,0.2,0.5,0.6,3,0\n"
    path = write(tmp_path / "train.csv", rows)
    with caplog.at_level(logging.WARNING):
        keyframes = read_ava_csv(path, [1, 3], 80)
    assert len(keyframes) == 3
    assert "3 rows of action ids outside the label map dropped (rows per id: 2: 2, 7: 1)" in caplog.text
    # id 5 in the map but in no row (the map says 5 where the CSV says 3, say): an error by default
    missing_class = r"train\.csv: class ids \[5\] of the label map have no row.*empty_classes"
    with pytest.raises(AnnotationError, match=missing_class):
        read_ava_csv(path, [1, 5], 80, empty_classes="error")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert len(read_ava_csv(path, [1, 5], 80, empty_classes="warn")) == 3
    assert "class ids [5] of the label map have no row" in caplog.text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('item {\n name: "a"\n id: 1\n}\nitme {\n name: "b"\n id: 2\n}\n', r':5: "itme \{" is not a label-map block'),
        ('item { name: "a" id: 1 }\nfoo\nitem { name: "b" id: 2 }\n', r":2: unexpected text 'foo'"),
        ('item { name: "a" id: 1 }\nitem { name: "b" id: 2\n', r":2: unexpected text 'item' \(an unclosed"),
    ],
)
def test_a_malformed_label_map_is_an_error_at_its_line(tmp_path, text, message):
    with pytest.raises(AnnotationError, match=r"map\.pbtxt" + message):
        read_label_map(write(tmp_path / "map.pbtxt", text))
    # comments anywhere are fine
    ok = '# AVA\nitem {  # first\n  name: "a"\n  id: 1\n}\n'
    assert read_label_map(write(tmp_path / "ok.pbtxt", ok)) == {1: "a"}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("vidA,0902,0.1,0.2,1.2,0.6,1,0", "outside \\[0, 1\\]"),
        ("vidA,0902,0.5,0.2,0.5,0.6,1,0", "empty or reversed"),
        ("vidA,0902,0.1,0.7,0.5,0.6,1,0", "empty or reversed"),
        ("vidA,0902,0.1,0.2,0.5,0.6,81,0", "action id 81 is not in the label map nor in 1..num_actions=80"),
        ("vidA,0902,0.1,0.2,0.5,1", "got 6 columns"),
        ("vidA,09x2,0.1,0.2,0.5,0.6,1,0", "timestamp must be an integer"),
    ],
)
def test_bad_rows_are_errors_naming_file_and_line(tmp_path, row, message):
    good = "vidA,0902,0.1,0.2,0.5,0.6,1,0\nvidA,0903,0.1,0.2,0.5,0.6,3,0\n"
    path = write(tmp_path / "bad.csv", good + row + "\n")
    with pytest.raises(AnnotationError, match=f"{path}:3: .*{message}"):
        read_ava_csv(path, [1, 3, 5], 80)


# ------------------------------------------------------------------------------------------------ geometry


def test_clip_indices_are_centred_and_clamped_at_both_ends():
    # 16 x 4 centred: centre - 32, centre - 28, ..., centre + 28.
    assert clip_frame_indices(5, 100).tolist() == [0] * 7 + [1, 5, 9, 13, 17, 21, 25, 29, 33]
    assert clip_frame_indices(95, 100).tolist() == [63, 67, 71, 75, 79, 83, 87, 91, 95] + [99] * 7
    assert clip_frame_indices(50, 100).tolist() == list(range(18, 82, 4))
    # A 15 fps video of 40 frames on the 30 fps grid: keyframe 2 s = grid 60 -> native frame 30;
    # grid frames 28, 32, ..., 88 clamp at grid 79 (80 grid frames) and map to native floor(g / 2).
    expected = [14, 16, 18, 20, 22, 24, 26, 28, 30, 32, 34, 36, 38, 39, 39, 39]
    assert keyframe_clip_indices(2.0, 40, 15.0, 30.0).tolist() == expected
    # Native grid: the keyframe is the frame at 2 s (30), stride in native frames.
    assert keyframe_clip_indices(2.0, 40, 15.0, None, length=4, stride=2).tolist() == [26, 28, 30, 32]


def test_flip_and_resize_geometry_by_hand():
    boxes = np.array([[10, 5, 30, 40], [0, 0, 100, 50]], dtype=np.float32)
    np.testing.assert_array_equal(flip_boxes(boxes, 100), [[70, 5, 90, 40], [0, 0, 100, 50]])
    assert resized_size(240, 320, 288) == (288, 384)
    assert resized_size(360, 640, 288) == (288, 512)
    assert resized_size(100, 75, 50) == (67, 50)  # 66.67 rounds up


def test_padding_to_a_multiple_of_32_keeps_boxes_and_zeroes_after_normalising(tmp_path):
    gen = torch.Generator().manual_seed(0)
    sizes = [(40, 50), (33, 64)]
    samples = [
        {
            "video": torch.randint(0, 256, (3, 2, h, w), dtype=torch.uint8, generator=gen),
            "boxes": torch.tensor([[1.0, 2.0, 30.0, 31.0]]) * (i + 1),
            "labels": torch.eye(3)[: i + 1],
            "image_size": (h, w),
            "orig_size": (2 * h, 2 * w),
            "index": i,
            "video_index": 7,
            "timestamp": 902 + i,
        }
        for i, (h, w) in enumerate(sizes)
    ]
    batch = collate_keyframes(samples + [{"skipped": ("x.mp4", "missing", "gone", 9), "index": 9}])
    assert batch["video"].shape == (2, 3, 2, 64, 64) and batch["batch_size"] == 2
    assert batch["skipped"] == [("x.mp4", "missing", "gone", 9)]
    for i, (h, w) in enumerate(sizes):
        assert torch.equal(batch["video"][i, :, :, :h, :w], samples[i]["video"])
        assert batch["video"][i, :, :, h:].eq(0).all() and batch["video"][i, ..., w:].eq(0).all()
        assert torch.equal(batch["boxes"][i], samples[i]["boxes"])
    assert batch["image_size"].tolist() == [[40, 50], [33, 64]]
    assert batch["orig_size"].tolist() == [[80, 100], [66, 128]]
    assert batch["timestamp"].tolist() == [902, 903] and batch["video_index"].tolist() == [7, 7]
    assert collate_keyframes(samples[:1], pad_multiple=16)["video"].shape[-2:] == (48, 64)

    raw = batch["video"].clone()
    out = AVADataModule(str(tmp_path)).on_after_batch_transfer(batch, 0)
    for i, (h, w) in enumerate(sizes):
        expected = (raw[i, :, :, :h, :w].float() / 255 - 0.45) / 0.225
        torch.testing.assert_close(out["video"][i, :, :, :h, :w], expected)
        assert out["video"][i, :, :, h:].eq(0).all() and out["video"][i, ..., w:].eq(0).all()


# ------------------------------------------------------------------------------------ the data module


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ava") / "synthetic"
    AVADataModule(str(root), synthetic=SYNTHETIC).prepare_data()
    return root


def csv_boxes(path: Path) -> dict[tuple[str, int], list[tuple[tuple[float, ...], int]]]:
    """(video, timestamp) -> [(box, action id)] read with the csv module."""
    out = defaultdict(list)
    with path.open() as handle:
        for row in csv.reader(handle):
            out[(row[0], int(row[1]))].append((tuple(float(v) for v in row[2:6]), int(row[6])))
    return out


def synthetic_module(root: Path, **kwargs) -> AVADataModule:
    args = {"train_short_side": 48, "eval_short_side": 40, "batch_size": 2, "num_workers": 0, "synthetic": SYNTHETIC}
    return AVADataModule(str(root), **{**args, **kwargs})


def test_synthetic_batches_have_pixel_boxes_of_the_resized_clip(synthetic_root):
    assert synthetic.is_complete(synthetic_root, "spatiotemporal")
    dm = synthetic_module(synthetic_root)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_classes == 4 and dm.class_names == list(synthetic.SPATIOTEMPORAL_ACTIONS)
    for stage, loader, (h, w) in (
        ("val", dm.val_dataloader(), (40, 50)),
        ("train", dm.train_dataloader(), (48, 60)),
    ):
        truth = csv_boxes(synthetic_root / "annotations" / f"{stage}.csv")
        names = dm.video_names(stage)
        seen = 0
        for batch in loader:
            batch = dm.on_after_batch_transfer(batch, 0)
            b = batch["batch_size"]
            assert batch["video"].shape == (b, 3, 16, 64, 64) and batch["video"].dtype == torch.float32
            assert (
                batch["image_size"].tolist() == [[h, w]] * b and batch["orig_size"].tolist() == [[64, 80]] * b
            )
            for i in range(b):
                rows = truth[(names[batch["video_index"][i]], int(batch["timestamp"][i]))]
                expected = np.array([box for box, _ in rows]) * [w, h, w, h]
                mirrored = flip_boxes(expected, w)
                got = batch["boxes"][i].numpy()
                assert np.allclose(got, expected, atol=1e-4) or (
                    stage == "train" and np.allclose(got, mirrored, atol=1e-4)
                )
                hot = np.zeros((len(rows), 4))
                hot[np.arange(len(rows)), [a - 1 for _, a in rows]] = 1
                np.testing.assert_array_equal(batch["labels"][i].numpy(), hot)
                seen += 1
        expected_count = len(truth) - (len(truth) % 2 if stage == "train" else 0)  # train drops the last
        assert seen == expected_count


def ramp_root(tmp_path: Path, make_video, rows: str, **kwargs) -> AVADataModule:
    """A real-layout AVA root: one 3 s, 10 fps clip whose frame i has grey level 8 i; ``rows`` as the val CSV."""
    root = tmp_path / "ava"
    make_video("ava/videos_15min/clip.mp4", 30, fps=10, height=48, width=64)
    write(root / "annotations" / "ava_val_v2.2.csv", rows)
    write(root / "annotations" / "ava_action_list_v2.2_for_activitynet_2019.pbtxt", LABEL_MAP)
    args = {"eval_short_side": 48, "batch_size": 4, "num_workers": 0}
    return AVADataModule(str(root), **{**args, **kwargs})


def test_timestamps_map_to_the_frames_of_the_trimmed_video(tmp_path, make_video):
    dm = ramp_root(tmp_path, make_video, "clip,0901,0.1,0.2,0.5,0.6,1,0\n")
    dm.setup("validate")
    dataset = dm.dataset("val")
    # Second 901 is 1 s into the clip: grid frame 30 of the 30 fps grid; grid frames -2, 2, ..., 58 (clamped at
    # 0) shown at native frames floor(g / 3).
    expected = [0, 0, 2, 3, 4, 6, 7, 8, 10, 11, 12, 14, 15, 16, 18, 19]
    assert dataset.clip_indices(0).tolist() == expected
    clip = dataset[0]["video"]  # (3, 16, 48, 64)
    np.testing.assert_allclose(clip.float().mean(dim=(0, 2, 3)).numpy(), np.array(expected) * 8, atol=3)
    # The synthetic convention (offset 0): second 1 of a file is the same frame.
    zero = ramp_root(tmp_path, make_video, "clip,0001,0.1,0.2,0.5,0.6,1,0\n", timestamp_offset=0)
    zero.setup("validate")
    assert zero.dataset("val").clip_indices(0).tolist() == expected


def test_extracted_frames_layout(tmp_path):
    from PIL import Image

    root = tmp_path / "ava"
    for i in range(40):  # 40 frames at 30 fps; file number i + 1 has grey level 6 i
        path = root / "frames" / "clip" / f"clip_{i + 1:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((24, 32, 3), 6 * i, np.uint8)).save(path, quality=95)
    write(root / "annotations" / "ava_val_v2.2.csv", "clip,0901,0.1,0.2,0.5,0.6,3,0\n")
    write(root / "annotations" / "ava_action_list_v2.2_for_activitynet_2019.pbtxt", LABEL_MAP)
    dm = AVADataModule(str(root), frames_dir="frames", eval_short_side=24, num_workers=0)
    dm.setup("validate")
    sample = dm.dataset("val")[0]
    # Keyframe (901 - 900) * 30 = entry 30 (file clip_000031.jpg); 16 x 4 around it, clamped to entry 39.
    expected = [0, 2, 6, 10, 14, 18, 22, 26, 30, 34, 38] + [39] * 5
    np.testing.assert_allclose(
        sample["video"].float().mean(dim=(0, 2, 3)).numpy(), np.array(expected) * 6, atol=2
    )
    np.testing.assert_allclose(sample["boxes"].numpy(), [[3.2, 4.8, 16.0, 14.4]], rtol=1e-5)
    assert sample["labels"].tolist() == [[0.0, 1.0, 0.0]]


def test_bad_videos_and_keyframes_are_reported_with_line_or_skipped(tmp_path, make_video):
    rows = (
        "clip,0901,0.1,0.2,0.5,0.6,1,0\n"
        "clip,0904,0.1,0.2,0.5,0.6,1,0\n"  # 4 s into a 3 s clip
        "gone,0901,0.1,0.2,0.5,0.6,1,0\n"
        "clip,0899,0.1,0.2,0.5,0.6,1,0\n"
    )
    csv_path = tmp_path / "ava" / "annotations" / "ava_val_v2.2.csv"
    with pytest.raises(
        BadVideoError, match=f"{csv_path}:3: video 'gone'.*video file not found.*bad_video: skip"
    ):
        ramp_root(tmp_path, make_video, rows).setup("validate")
    no_gone = rows.replace("gone,0901,0.1,0.2,0.5,0.6,1,0\n", "")
    with pytest.raises(AnnotationError, match=f"{csv_path}:2: keyframe 904 .* past its end.*1 more problems"):
        ramp_root(tmp_path, make_video, no_gone).setup("validate")
    with pytest.raises(AnnotationError, match=f"{csv_path}:1: keyframe 899 .* before timestamp_offset 900"):
        ramp_root(tmp_path, make_video, "clip,0899,0.1,0.2,0.5,0.6,1,0\n").setup("validate")

    dm = ramp_root(tmp_path, make_video, rows, bad_video="skip")
    dm.setup("validate")
    dataset = dm.dataset("val")
    assert [(k.video_id, k.timestamp) for k in dataset.keyframes] == [("clip", 901)]
    assert dm.skip_counts == {"missing": 1, "keyframe_past_end": 1, "before_start": 1}
    assert dm.setup_skips("val") == dm.skip_counts and not dm.setup_skips("train")
    assert any(f.endswith("gone.mp4") for f in dm.skipped_files)


def test_detector_proposals_travel_in_pixels(tmp_path, make_video):
    root = tmp_path / "ava"
    proposals = (
        "clip,0901,0.2,0.2,0.6,0.8,,0.95\n"
        "clip,0901,0.2,0.2,0.6,0.8,3,0.97\n"  # the same box for another action: kept once, best score
        "clip,0901,0.0,0.0,0.5,0.5,,0.50\n"  # below the 0.8 threshold
        "clip,0902,0.5,0.5,1.0,1.0,,0.90\n"  # a keyframe without ground truth
    )
    write(root / "annotations" / "boxes.csv", proposals)
    dm = ramp_root(
        tmp_path, make_video, "clip,0901,0.1,0.2,0.5,0.6,1,0\n", proposals_csv="annotations/boxes.csv"
    )
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["timestamp"].tolist() == [901, 902]
    w, h = 64, 48
    np.testing.assert_allclose(
        batch["proposals"][0].numpy(), [[0.2 * w, 0.2 * h, 0.6 * w, 0.8 * h]], rtol=1e-5
    )
    np.testing.assert_allclose(batch["proposal_scores"][0].numpy(), [0.97], rtol=1e-6)
    np.testing.assert_allclose(batch["proposals"][1].numpy(), [[0.5 * w, 0.5 * h, w, h]], rtol=1e-5)
    assert batch["boxes"][1].shape == (0, 4) and batch["labels"][1].shape == (0, 3)
    np.testing.assert_allclose(batch["boxes"][0].numpy(), [[0.1 * w, 0.2 * h, 0.5 * w, 0.6 * h]], rtol=1e-5)


def test_synthetic_actor_size_sets_the_boxes_and_regenerates(tmp_path):
    root = tmp_path / "synthetic"
    sides = {}
    for actor_size in ((0.13, 0.36), (0.25, 0.5)):
        settings = replace(SYNTHETIC, num_videos=6, val_fraction=0.5, actor_size=actor_size)
        AVADataModule(str(root), synthetic=settings).prepare_data()
        assert synthetic.is_complete(root, "spatiotemporal", actor_size=list(actor_size))
        boxes = np.array(
            [box for rows in csv_boxes(root / "annotations" / "train.csv").values() for box, _ in rows]
        )
        # a (a x b) rectangle turned by any angle has the box W = a|cos| + b|sin|, H = a|sin| + b|cos|, so
        # ((W + H) / (a + b))**2 + ((W - H) / (a - b))**2 = 2 for every row (actors keep clear of the edges)
        w, h = (boxes[:, 2] - boxes[:, 0]) * 80, (boxes[:, 3] - boxes[:, 1]) * 64
        a, b = max(4, round(actor_size[0] * 80)), max(6, round(actor_size[1] * 64))
        identity = ((w + h) / (a + b)) ** 2 + ((w - h) / (a - b)) ** 2
        np.testing.assert_allclose(identity, 2.0, atol=0.03, err_msg=str(actor_size))
        sides[actor_size] = (a, b)
    assert sides[(0.25, 0.5)] == (20, 32)
    with pytest.raises(ValueError, match="actor_size must be two fractions"):
        synthetic.generate_spatiotemporal(tmp_path / "bad", actor_size=(0.0, 0.5))


def test_training_classes_from_their_own_map_and_evaluation_on_the_other(synthetic_root, tmp_path):
    """The official split: 80 classes trained (ava_action_list_v2.2.pbtxt), the 60 of the ActivityNet map
    evaluated. Here: the synthetic set's 4 trained, 2 of them evaluated; the task's metric scores those 2."""
    from types import SimpleNamespace

    from tests.test_detection_task import tiny_task

    annotations = synthetic_root / "annotations"
    evaluated = write(
        tmp_path / "evaluated.pbtxt",
        'item {\n  name: "move_left"\n  id: 1\n}\nitem {\n  name: "rotate"\n  id: 3\n}\n',
    )
    dm = synthetic_module(
        synthetic_root, label_map=str(evaluated), train_label_map=str(annotations / "label_map.pbtxt")
    )
    assert dm.num_classes == 4 and dm.action_ids == [1, 2, 3, 4]
    assert dm.evaluated_label_map == {1: "move_left", 3: "rotate"}
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["labels"][0].shape[1] == 4  # targets over the trained classes
    task = tiny_task(num_classes=4, max_detections_per_keyframe=7)
    task._trainer = SimpleNamespace(datamodule=dm)
    task.setup("validate")
    metric = task.metrics["val"]
    assert metric.label_map == {1: "move_left", 3: "rotate"} and metric.max_detections_per_keyframe == 7
    assert tiny_task(num_classes=4).max_detections_per_keyframe is None  # the official helper keeps every row

    untrained = write(tmp_path / "more.pbtxt", 'item {\n  name: "jump"\n  id: 9\n}\n')
    dm = synthetic_module(
        synthetic_root, label_map=str(untrained), train_label_map=str(annotations / "label_map.pbtxt")
    )
    with pytest.raises(AnnotationError, match=r"action ids \[9\] are evaluated but not trained"):
        dm.evaluated_label_map


@pytest.mark.parametrize("size", [(270, 480), (135, 200)])
def test_resize_without_antialiasing_samples_as_opencv_inter_linear(size):
    """The official loader resizes with cv2.resize(INTER_LINEAR): the default AVA transform equals it exactly, with
    and without the flip, while an antialiased resize of a fine pattern does not."""
    import cv2

    rng = np.random.default_rng(0)
    frames = torch.from_numpy(rng.integers(0, 256, (2, *size, 3), dtype=np.uint8))
    clip, _, (h, w) = transform_keyframe_clip(frames, [np.zeros((0, 4))], 96, flip=False, antialias=False)
    flipped, _, _ = transform_keyframe_clip(frames, [np.zeros((0, 4))], 96, flip=True, antialias=False)
    assert clip.shape == (3, 2, h, w) and clip.is_contiguous() and flipped.is_contiguous()
    for t in range(2):
        reference = cv2.resize(frames[t].numpy(), (w, h), interpolation=cv2.INTER_LINEAR)
        assert np.array_equal(clip[:, t].permute(1, 2, 0).numpy(), reference)
        assert np.array_equal(flipped[:, t].permute(1, 2, 0).numpy(), reference[:, ::-1])
    filtered, _, _ = transform_keyframe_clip(frames, [np.zeros((0, 4))], 96, flip=False, antialias=True)
    assert np.abs(filtered.numpy().astype(int) - clip.numpy().astype(int)).mean() > 5


# ------------------------------------------------------------------------------ resize_on: device


@pytest.mark.parametrize("antialias", [False, True])
def test_resizing_on_the_device_gives_the_loaders_batch_to_one_grey_level(antialias):
    """Clips of three sizes, two flipped: the frames as decoded, collated apart and resized by
    ``resize_keyframe_batch`` equal the loader path's padded batch (OpenCV's INTER_LINEAR without antialiasing)
    to one grey level, with the same boxes and sizes; OpenCV's own resize is within one level as well."""
    import cv2

    rng = np.random.default_rng(1)
    loader, device = [], []
    for i, size in enumerate([(72, 128), (45, 67), (96, 96)]):
        frames = torch.from_numpy(rng.integers(0, 256, (3, *size, 3), dtype=np.uint8))
        boxes = [np.array([[0.1, 0.2, 0.5, 0.9]])]
        for out, where in ((loader, "loader"), (device, "device")):
            clip, (b,), hw = transform_keyframe_clip(frames, boxes, 40, i != 1, antialias, where)
            sample = {"video": clip, "boxes": b, "image_size": hw, "orig_size": size, "index": i}
            out.append(sample | ({"flip": i != 1} if where == "device" else {}))
    assert device[0]["video"].shape == (3, 72, 128, 3)  # as decoded
    expected, batch = collate_keyframes(loader), collate_keyframes(device)
    assert isinstance(batch["video"], list) and batch["flip"].tolist() == [True, False, True]
    assert all(a.data_ptr() == s["video"].data_ptr() for a, s in zip(batch["video"], device, strict=True))
    video = resize_keyframe_batch(batch["video"], batch["image_size"], batch["flip"], 32, antialias)
    assert video.shape == expected["video"].shape == (3, 3, 3, 64, 96) and video.dtype == torch.uint8
    difference = (video.int() - expected["video"].int()).abs()
    assert difference.max() <= 1 and difference.float().mean() < 0.2
    for key in ("image_size", "orig_size"):
        assert torch.equal(batch[key], expected[key])
    for a, b in zip(batch["boxes"], expected["boxes"], strict=True):
        assert torch.equal(a, b)
    if not antialias:
        (h, w), frame = expected["image_size"][1].tolist(), device[1]["video"][0].numpy()
        reference = cv2.resize(frame, (w, h), interpolation=cv2.INTER_LINEAR)
        got = video[1, :, 0, :h, :w].permute(1, 2, 0).numpy().astype(int)
        assert np.abs(got - reference).max() <= 1


@pytest.mark.parametrize("stage", ["train", "val"])
def test_a_data_module_resizing_on_the_device_gives_the_same_batches(synthetic_root, stage):
    """The synthetic AVA set through both paths (training flips at random, from the same seeds): after the
    transfer hook the batches agree to one grey level, boxes and sizes exactly."""
    batches, flips = {}, []
    for where in ("loader", "device"):
        dm = synthetic_module(synthetic_root, resize_on=where)
        dm.setup("fit")
        loader = dm.train_dataloader() if stage == "train" else dm.val_dataloader()
        batches[where] = []
        for batch in loader:
            flips += batch["flip"].tolist() if where == "device" else []
            batches[where].append(dm.on_after_batch_transfer(batch, 0))
    assert len(batches["loader"]) == len(batches["device"]) > 0
    assert any(flips) == (stage == "train") and not all(flips)
    for a, b in zip(batches["loader"], batches["device"], strict=True):
        assert a["video"].shape == b["video"].shape and "flip" not in b
        torch.testing.assert_close(b["video"], a["video"], atol=1 / 255 / 0.225 + 1e-5, rtol=0)
        for x, y in zip(a["boxes"], b["boxes"], strict=True):
            assert torch.equal(x, y)
        assert torch.equal(a["image_size"], b["image_size"]) and torch.equal(a["index"], b["index"])


def test_a_batch_collated_in_a_loader_worker_is_in_shared_memory():
    """In a worker the padded batch is allocated in shared memory (nothing is copied again to hand it over);
    in the training process it is ordinary memory."""
    assert not batch_buffer((2, 3), torch.uint8).is_shared()
    samples = [{"video": torch.zeros(3, 2, 8, 8, dtype=torch.uint8), "image_size": (8, 8), "orig_size": (8, 8)}]
    loader = torch.utils.data.DataLoader(samples, batch_size=1, num_workers=1, collate_fn=_collate_and_report)
    assert next(iter(loader)) == {"shared": True, "shape": (1, 3, 2, 32, 32)}


def _collate_and_report(samples):
    video = collate_keyframes(samples)["video"]
    return {"shared": video.is_shared(), "shape": tuple(video.shape)}


def test_frame_files_decode_as_pil_does_whatever_their_kind(tmp_path):
    """JPEG frames (colour, grey, CMYK) and PNG frames give PIL's RGB pixels; a truncated JPEG is a corrupt
    frame naming the file."""
    from PIL import Image

    rng = np.random.default_rng(2)
    colour = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    kinds = {
        "rgb": (Image.fromarray(colour), "jpg"), "grey": (Image.fromarray(colour[..., 0]), "jpg"),
        "cmyk": (Image.fromarray(colour).convert("CMYK"), "jpg"), "png": (Image.fromarray(colour), "png"),
    }  # fmt: skip
    for name, (image, ext) in kinds.items():
        for i in range(3):
            path = tmp_path / name / f"{i + 1:05d}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.rotate(90 * i).save(path, quality=90)
        folder = FrameFolder(tmp_path, name, "{video}/{index:05d}." + ext, 3)
        clip = folder.get_frames([2, 0, 2, 1]).numpy()
        for row, i in enumerate([2, 0, 2, 1]):
            with Image.open(folder.path(i)) as image:
                np.testing.assert_array_equal(clip[row], np.asarray(image.convert("RGB")), err_msg=name)
    broken = tmp_path / "rgb" / "00002.jpg"
    broken.write_bytes(broken.read_bytes()[:200])
    with pytest.raises(VideoDecodeError, match="00002.jpg") as err:
        FrameFolder(tmp_path, "rgb", "{video}/{index:05d}.jpg", 3).get_frames([0, 1])
    assert err.value.kind == "corrupt"


def test_the_pipeline_benchmark_replays_exactly_the_frames_the_loader_read(synthetic_root):
    """``make bench``'s raw decode: the reads a pass of the loader made (wrapping around a short epoch), frame for
    frame the clips of the keys the sampler gave, and a replay that decodes them."""
    from benchmarks.pipeline import batches_of, replay

    dm = synthetic_module(synthetic_root, resize_on="device")
    dm.setup("fit")
    per_epoch = len(dm.train_dataloader())
    run, clips, reads = batches_of(dm, per_epoch + 1)
    assert clips == 2 * (per_epoch + 1) and len(reads) == clips  # one read per keyframe clip
    dataset, keys = dm.dataset("train"), list(dm.train_dataloader().sampler)
    expected = [dataset.clip_indices(keys[i % (2 * per_epoch)].index) for i in range(clips)]  # drop_last
    for (video, idx), want in zip(reads, expected, strict=True):
        np.testing.assert_array_equal(idx, want)
        assert video.num_frames > int(want.max())
    replay(reads)()
    assert run() == clips
