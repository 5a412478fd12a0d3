"""The data preparation commands, through the CLI: check-videos, prepare-ava, kinetics-lists, convert-thumos and
convert-activitynet, on tiny files written here in the real formats, their outputs read back by the data
modules and compared with values worked out here from what was written."""

from __future__ import annotations

import csv
import inspect
import json
import math
from pathlib import Path

import av
import numpy as np
import pytest

from datamodules.ava import AVADataModule
from datamodules.classification import VideoClassificationDataModule
from datamodules.keyframes import FrameFolder, count_frames, grid_length
from datamodules.synthetic.files import write_video
from datamodules.temporal import TemporalDetectionDataModule
from datamodules.video_io import open_video
from lightning_modules.__main__ import run


def noise_video(path: Path, num_frames: int, fps: int = 10, seed: int = 0) -> Path:
    """A small H.264 mp4 of random frames (random, so even a few frames take more than a kilobyte)."""
    frames = np.random.default_rng(seed).integers(0, 256, (num_frames, 48, 64, 3), dtype=np.uint8)
    write_video(path, frames, fps)
    return path


def command(capsys, *argv: str) -> dict:
    """Run a command through the CLI; its one JSON line."""
    assert run(list(argv)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- check-videos


def plant_bad_videos(root: Path) -> dict[str, str | None]:
    """Good and bad files under ``root``: name -> the kind check-videos must report (None: good)."""
    expected: dict[str, str | None] = {}
    for i in range(3):
        noise_video(root / f"good_{i}.mp4", 12 + i, seed=i)
        expected[f"good_{i}.mp4"] = None
    noise_video(root / "short.mp4", 3, seed=5)  # below --min-frames 8
    expected["short.mp4"] = "too_short"
    (root / "empty.mp4").write_bytes(b"")
    expected["empty.mp4"] = "empty"
    (root / "junk.mp4").write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    expected["junk.mp4"] = "corrupt"
    whole = noise_video(root / "whole.tmp", 12, seed=7).read_bytes()
    (root / "truncated.mp4").write_bytes(whole[: len(whole) // 2])  # its index (at the end) is gone
    expected["truncated.mp4"] = "corrupt"
    # The index intact but the last part of the stream zeroed: it opens, and only decoding the end fails.
    data = bytearray(whole)
    stream_end = data.find(b"moov") - 4
    tail = stream_end - (stream_end - data.find(b"mdat")) // 5
    data[tail:stream_end] = bytes(stream_end - tail)
    (root / "damaged_tail.mp4").write_bytes(bytes(data))
    expected["damaged_tail.mp4"] = "decode_failed"
    (root / "whole.tmp").unlink()
    # A Matroska file whose codec id no decoder knows (same length, so the container stays valid).
    with av.open(str(root / "h264.tmp"), "w", format="matroska") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i, image in enumerate(np.random.default_rng(3).integers(0, 256, (10, 48, 64, 3), dtype=np.uint8)):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    mkv = (root / "h264.tmp").read_bytes()
    assert mkv.count(b"V_MPEG4/ISO/AVC") == 1
    (root / "odd_codec.mkv").write_bytes(mkv.replace(b"V_MPEG4/ISO/AVC", b"V_QWERTY/ISO/AV"))
    (root / "h264.tmp").unlink()
    expected["odd_codec.mkv"] = "unsupported_codec"
    with av.open(str(root / "sound_only.mp4"), "w", format="mp4") as out:  # a container without video
        stream = out.add_stream("aac", rate=16000)
        for i in range(60):
            frame = av.AudioFrame.from_ndarray(
                np.random.default_rng(i).uniform(-1, 1, (1, 1024)).astype(np.float32), format="fltp", layout="mono"
            )
            frame.sample_rate, frame.pts = 16000, i * 1024
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    expected["sound_only.mp4"] = "empty"
    (root / "a_folder.mp4").mkdir()
    expected["a_folder.mp4"] = "missing"
    return expected


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, dict[str, str | None]]:
    root = tmp_path_factory.mktemp("check") / "videos"
    root.mkdir()
    return root, plant_bad_videos(root)


def test_check_videos_reports_every_bad_entry_of_a_list_and_writes_the_good_ones_back(planted, capsys):
    root, expected = planted
    expected = {**expected, "not_downloaded.mp4": "missing"}
    names = sorted(expected)
    lines = ["# label per video", ""] + [f"{name} {i % 3}" for i, name in enumerate(names)]
    listed = root.parent / "train.txt"
    listed.write_text("\n".join(lines) + "\n")
    # The list's paths are relative to the data root, as the data module reads them.
    report = root.parent / "report.json"
    summary = command(
        capsys, "check-videos", str(listed), "--root", str(root), "--min-frames", "8", "--workers", "2",
        "--report", str(report),
    )  # fmt: skip

    rows = json.loads(report.read_text())["videos"]
    assert {Path(r["path"]).name: r["status"] for r in rows} == {n: k or "ok" for n, k in expected.items()}
    assert all(r["reason"] for r in rows if r["status"] != "ok")
    good = [n for n in names if expected[n] is None]
    for row in rows:
        if row["status"] == "ok":
            video = open_video(row["path"])
            assert (row["num_frames"], row["fps"]) == (video.num_frames, video.fps)
    bad_kinds = [k for k in expected.values() if k is not None]
    assert summary["format"] == "kinetics" and summary["ok"] == len(good) and summary["bad"] == len(bad_kinds)
    assert {k: summary[k] for k in set(bad_kinds)} == {k: bad_kinds.count(k) for k in set(bad_kinds)}

    clean = Path(summary["output"])
    assert clean == root.parent / "train.clean.txt"
    assert clean.read_text() == "\n".join(
        line for line in lines if not line.split() or line.startswith("#") or expected[line.split()[0]] is None
    ) + "\n"  # fmt: skip
    dm = VideoClassificationDataModule(
        root=str(root), train_list="../train.clean.txt", val_list="../train.clean.txt", classes_file=None,
        num_classes=3, num_frames=4, frame_stride=2, crop_size=32, eval_short_side=40, batch_size=2, num_workers=0,
    )  # fmt: skip
    val = dm.dataset("val")
    assert [Path(r.path).name for r in val.records] == good
    assert [r.labels[0] for r in val.records] == [names.index(n) % 3 for n in good]
    assert all(tuple(val[i]["video"].shape) == (1, 3, 4, 32, 32) for i in range(len(good)))


def test_check_videos_searches_a_folder_and_writes_csv(planted, capsys):
    root, expected = planted
    summary = command(capsys, "check-videos", str(root), "--min-frames", "8", "--workers", "1")
    assert summary["format"] == "folder" and summary["videos"] == len(expected)
    assert Path(summary["output"]).read_text().split() == sorted(n for n, k in expected.items() if k is None)
    with open(summary["report"], newline="") as f:
        statuses = {Path(r["path"]).name: r["status"] for r in csv.DictReader(f)}
    assert statuses == {n: k or "ok" for n, k in expected.items()}


def test_check_videos_drops_bad_videos_from_an_annotation_json_and_an_ava_csv(tmp_path, capsys):
    videos = tmp_path / "videos"
    noise_video(videos / "v_aa.mp4", 10)
    (videos / "bb.mp4").write_bytes(b"\0" * 2048)
    content = {"version": "VERSION 1.3", "database": {
        vid: {"subset": "training", "duration": 1.0, "annotations": [{"label": "Zumba", "segment": [0.1, 0.9]}]}
        for vid in ("aa", "bb", "cc")
    }}  # fmt: skip
    (tmp_path / "anet.json").write_text(json.dumps(content))
    summary = command(capsys, "check-videos", str(tmp_path / "anet.json"), "--video-dir", str(videos))
    assert (summary["ok"], summary["corrupt"], summary["missing"]) == (1, 1, 1)
    clean = json.loads((tmp_path / "anet.clean.json").read_text())
    assert clean == {**content, "database": {"aa": content["database"]["aa"]}}

    rows = ["v_aa,0902,0.1,0.2,0.5,0.9,12,0", "bb,0902,0.1,0.1,0.4,0.8,80,1", "v_aa,0903,0.1,0.2,0.5,0.9,12,0",
            "gone,0905,0.0,0.0,1.0,1.0,5,0"]  # fmt: skip
    (tmp_path / "ava_val.csv").write_text("\n".join(rows) + "\n")
    summary = command(capsys, "check-videos", str(tmp_path / "ava_val.csv"), "--video-dir", str(videos))
    assert (summary["format"], summary["ok"], summary["corrupt"], summary["missing"]) == ("ava_csv", 1, 1, 1)
    assert summary["entries_kept"] == 2
    assert (tmp_path / "ava_val.clean.csv").read_text() == f"{rows[0]}\n{rows[2]}\n"


def test_check_videos_judges_with_the_decoder_asked_for(tmp_path, capsys):
    # AV1 (what yt-dlp fetches by default): decord cannot decode it, PyAV can.
    # Through the project's writer, which undoes SVT-AV1's switch of the calling thread to real-time scheduling.
    frames = np.random.default_rng(0).integers(0, 256, (10, 48, 64, 3), dtype=np.uint8)
    write_video(tmp_path / "av1.mp4", frames, 10, codec="av1")
    (tmp_path / "list.txt").write_text("av1.mp4\n")
    decord = command(capsys, "check-videos", str(tmp_path / "list.txt"), "--decoder", "decord")
    assert (decord["format"], decord["unsupported_codec"]) == ("paths", 1)
    assert (tmp_path / "list.clean.txt").read_text() == ""
    either = command(capsys, "check-videos", str(tmp_path / "list.txt"), "--decoder", "auto")
    assert either["ok"] == 1 and (tmp_path / "list.clean.txt").read_text() == "av1.mp4\n"


# ------------------------------------------------------------------------------------------------- AVA movies


def test_prepare_ava_cuts_the_segment_and_extracts_frames_our_reader_reads(tmp_path, capsys):
    fps, seconds, start, duration = 10, 8, 2.0, 3.0
    rng = np.random.default_rng(0)
    texture = rng.integers(-12, 13, (48, 64, 1))
    levels = 20 + 3 * np.arange(fps * seconds)  # frame i is recognised by its mean grey level
    frames = np.clip(levels[:, None, None, None] + texture, 0, 255).astype(np.uint8).repeat(3, axis=-1)
    write_video(tmp_path / "movies" / "movieA.mp4", frames, fps, gop=25)  # the cut starts between keyframes
    means = frames.reshape(len(frames), -1).mean(1)

    def source_frame(image: np.ndarray) -> int:
        return int(np.abs(means - image.mean()).argmin())

    argv = ["prepare-ava", "--movies", str(tmp_path / "movies"), "--output", str(tmp_path / "videos_15min"),
            "--frames", str(tmp_path / "frames"), "--start", str(start), "--duration", str(duration),
            "--workers", "1"]  # fmt: skip
    summary = command(capsys, *argv)
    assert (summary["cut_written"], summary["frames_written"], summary["failed"]) == (1, 1, {})

    cut = open_video(tmp_path / "videos_15min" / "movieA.mp4")
    assert (cut.num_frames, cut.fps) == (duration * fps, fps)
    assert cut.duration == pytest.approx(duration)
    decoded = cut.get_frames(range(cut.num_frames)).numpy()
    first = int(start * fps)
    assert [source_frame(f) for f in decoded] == list(range(first, first + int(duration * fps)))

    # The frame folder, read as AVADataModule reads frames_dir with its default pattern and numbering.
    defaults = inspect.signature(AVADataModule).parameters
    pattern, number = defaults["frame_pattern"].default, defaults["first_frame_number"].default
    assert (tmp_path / "frames" / "movieA" / "movieA_000001.jpg").is_file()
    count = count_frames(tmp_path / "frames", "movieA", pattern, number)
    assert count == grid_length(cut.num_frames, cut.fps, 30.0) == duration * 30
    images = FrameFolder(tmp_path / "frames", "movieA", pattern, count, number, 30.0).get_frames(range(count))
    assert [source_frame(f) for f in images.numpy()] == [first + math.floor(k * fps / 30) for k in range(count)]

    # Resumable: finished outputs are kept, an interrupted one is redone.
    stamp = (tmp_path / "videos_15min" / "movieA.mp4").stat().st_mtime_ns
    write_video(tmp_path / "movies" / "movieB.mp4", frames[:40], fps)  # ends 2 s into the cut
    (tmp_path / "videos_15min" / "movieB.mp4.part").write_bytes(b"interrupted")
    again = command(capsys, *argv)
    assert (again["cut_written"], again["cut_skipped"], again["frames_written"]) == (1, 1, 1)
    assert again["shorter_than_asked"] == ["movieB"] and again["failed"] == {}
    assert (tmp_path / "videos_15min" / "movieA.mp4").stat().st_mtime_ns == stamp
    assert open_video(tmp_path / "videos_15min" / "movieB.mp4").num_frames == 20
    assert not list((tmp_path / "videos_15min").glob("*.part"))


# ------------------------------------------------------------------------------------------ Kinetics lists


def test_kinetics_lists_load_in_the_classification_data_module(tmp_path, capsys):
    root = tmp_path / "kinetics400"
    tree = {
        "train": {"abseiling": ["AAAAAAAAAAA", "BBBBBBBBBBB"], "air drumming": ["CCCCCCCCCCC"],
                  "zumba": ["DDDDDDDDDDD"]},
        "val": {"abseiling": ["EEEEEEEEEEE"], "air drumming": ["FFFFFFFFFFF"], "zumba": ["GGGGGGGGGGG"]},
    }  # fmt: skip
    for split, classes in tree.items():
        for name, ids in classes.items():
            for i, yt in enumerate(ids):
                noise_video(root / split / name.replace(" ", "_") / f"{yt}_{i:06d}_{i + 10:06d}.mp4", 8, seed=i)
    (root / "test").mkdir()
    noise_video(root / "test" / "unlabelled.mp4", 8)  # no class folders: not a split
    summary = command(capsys, "kinetics-lists", "--root", str(root))
    assert summary["videos"] == {"train": 4, "val": 3} and summary["classes"] == 3
    names = ["abseiling", "air_drumming", "zumba"]
    assert (root / "classes.txt").read_text().split() == names

    dm = VideoClassificationDataModule(
        root=str(root), num_frames=4, frame_stride=2, crop_size=32, train_short_side=(40, 48), eval_short_side=40,
        randaugment_ops=0, batch_size=2, num_workers=0,
    )  # fmt: skip
    assert dm.num_classes == 3
    for split, stage in (("train", "train"), ("val", "val")):
        expected = sorted(
            (f"{split}/{name.replace(' ', '_')}/{yt}_{i:06d}_{i + 10:06d}.mp4", names.index(name.replace(" ", "_")))
            for name, ids in tree[split].items() for i, yt in enumerate(ids)
        )  # fmt: skip
        records = dm.dataset(stage).records
        assert sorted((Path(r.path).relative_to(root).as_posix(), r.labels[0]) for r in records) == expected
    assert tuple(dm.dataset("val")[0]["video"].shape) == (1, 3, 4, 32, 32)

    # Mini-Kinetics: a class list (its order is the label order, spelt as the class names) and YouTube ids.
    (tmp_path / "mini_classes.txt").write_text("Air drumming\nabseiling\n")
    (tmp_path / "mini_ids.txt").write_text("BBBBBBBBBBB\nCCCCCCCCCCC\nFFFFFFFFFFF\nZZZZZZZZZZZ\n")
    mini = command(
        capsys, "kinetics-lists", "--root", str(root), "--prefix", "mini_kinetics_", "--splits", "train", "val",
        "--classes", str(tmp_path / "mini_classes.txt"), "--video-ids", str(tmp_path / "mini_ids.txt"),
    )  # fmt: skip
    assert mini["listed_videos_not_found"] == 1 and mini["first_not_found"] == ["ZZZZZZZZZZZ"]
    assert (root / "mini_kinetics_train.txt").read_text().splitlines() == [
        "train/air_drumming/CCCCCCCCCCC_000000_000010.mp4 0", "train/abseiling/BBBBBBBBBBB_000001_000011.mp4 1",
    ]  # fmt: skip
    assert (root / "mini_kinetics_val.txt").read_text().splitlines() == [
        "val/air_drumming/FFFFFFFFFFF_000000_000010.mp4 0"
    ]
    mini_dm = VideoClassificationDataModule(
        root=str(root), train_list="mini_kinetics_train.txt", val_list="mini_kinetics_val.txt",
        classes_file="mini_kinetics_classes.txt", num_frames=4, frame_stride=2, crop_size=32, eval_short_side=40,
        batch_size=2, num_workers=0,
    )  # fmt: skip
    assert mini_dm.class_names == ["Air drumming", "abseiling"] and len(mini_dm.dataset("train")) == 2


# -------------------------------------------------------------------------------------- THUMOS14 / ActivityNet


def test_convert_thumos_matches_the_official_files(tmp_path, capsys):
    val, test, videos = tmp_path / "val_ann", tmp_path / "test_ann", tmp_path / "video"
    val.mkdir(), test.mkdir()
    (val / "BaseballPitch_val.txt").write_text(
        "video_validation_0000051 67.5 75.9\nvideo_validation_0000051  1.2  3.4 \n\nvideo_validation_0000052 0.5 2.0\n"
    )
    (val / "Billiards_val.txt").write_text("video_validation_0000052 1.0 2.5\n")
    (val / "Ambiguous_val.txt").write_text("video_validation_0000051 5.0 6.0\nvideo_validation_0000099 1 2\n")
    (val / "detclasslist.txt").write_text("7 BaseballPitch\n")  # other files of the release are not read
    (test / "BaseballPitch_test.txt").write_text("video_test_0000004 0.3 1.5\nvideo_test_0000007 2.0 4.0\n")
    (test / "Ambiguous_test.txt").write_text("video_test_0000004 2.0 2.5\n")
    written = {"video_validation_0000051": (40, 5), "video_validation_0000052": (30, 10),
               "video_test_0000004": (12, 4), "video_validation_0000099": (8, 4)}  # fmt: skip
    for i, (vid, (n, fps)) in enumerate(written.items()):
        noise_video(videos / f"{vid}.mp4", n, fps, seed=i)
    output = tmp_path / "annotations" / "thumos_14_anno.json"
    summary = command(
        capsys, "convert-thumos", "--annotations", str(val), str(test), "--video-dir", str(videos),
        "--output", str(output), "--workers", "2",
    )  # fmt: skip

    def seg(label, start, end):
        return {"label": label, "segment": [start, end]}

    def facts(vid):
        n, fps = written[vid]
        return {"duration": n / fps, "fps": float(fps), "frame": n}

    expected = {
        "video_test_0000004": {"subset": "validation", **facts("video_test_0000004"),
                               "annotations": [seg("BaseballPitch", 0.3, 1.5), seg("Ambiguous", 2.0, 2.5)]},
        "video_test_0000007": {"subset": "validation", "annotations": [seg("BaseballPitch", 2.0, 4.0)]},
        "video_validation_0000051": {"subset": "training", **facts("video_validation_0000051"), "annotations": [
            seg("BaseballPitch", 1.2, 3.4), seg("Ambiguous", 5.0, 6.0), seg("BaseballPitch", 67.5, 75.9)]},
        "video_validation_0000052": {"subset": "training", **facts("video_validation_0000052"), "annotations": [
            seg("BaseballPitch", 0.5, 2.0), seg("Billiards", 1.0, 2.5)]},
    }  # fmt: skip
    database = json.loads(output.read_text())["database"]
    assert database.keys() == expected.keys()
    for vid, entry in expected.items():
        assert database[vid].keys() == entry.keys(), vid
        for key, value in entry.items():
            assert database[vid][key] == (pytest.approx(value) if key == "duration" else value), (vid, key)
    assert (output.parent / "category_idx.txt").read_text().split() == ["BaseballPitch", "Billiards"]
    assert summary["videos"] == {"training": 2, "validation": 2}
    assert summary["segments"] == {"training": 4, "validation": 2}
    assert summary["videos_without_file"] == ["video_test_0000007"]

    # The temporal detection data module reads it (Ambiguous ignored, the class list as written).
    dm = TemporalDetectionDataModule(
        root=str(tmp_path), annotation_file="annotations/thumos_14_anno.json",
        classes_file="annotations/category_idx.txt", video_dir="video", end_tolerance=100.0,
    )  # fmt: skip
    assert dm.class_names == ["BaseballPitch", "Billiards"]
    training = {v.video_id: v for v in dm.subset_videos("training")}
    assert training["video_validation_0000052"].segments.tolist() == [[0.5, 2.0], [1.0, 2.5]]
    assert training["video_validation_0000052"].labels.tolist() == [0, 1]
    assert training["video_validation_0000051"].duration == pytest.approx(8.0)


def test_convert_activitynet_fills_what_the_release_lacks(tmp_path, capsys):
    videos = tmp_path / "videos"
    noise_video(videos / "aa01.mp4", 20, 5)
    noise_video(videos / "v_bb02.mp4", 30, 10)
    noise_video(videos / "v_dd04.mp4", 12, 4, seed=2)
    database = {
        "aa01": {"subset": "training", "duration": 4.0, "resolution": "64x48", "url": "https://youtu.be/aa01",
                 "annotations": [{"label": "Long jump", "segment": [0.5, 3.0]}]},
        "bb02": {"subset": "validation", "duration": 9.5, "resolution": "64x48", "url": "https://youtu.be/bb02",
                 "annotations": [{"label": "Archery", "segment": [1.0, 2.0]}]},
        "cc03": {"subset": "training", "duration": 7.0, "resolution": "64x48", "url": "https://youtu.be/cc03",
                 "annotations": [{"label": "Zumba", "segment": [1.0, 6.0]}]},
        "dd04": {"subset": "testing", "duration": 3.0, "resolution": "64x48", "url": "https://youtu.be/dd04",
                 "annotations": []},
    }  # fmt: skip
    official = {"version": "VERSION 1.3", "taxonomy": [{"nodeName": "Archery", "nodeId": 1}], "database": database}
    source = tmp_path / "activity_net.v1-3.min.json"
    source.write_text(json.dumps(official))
    output = tmp_path / "out" / "anet.json"
    summary = command(
        capsys, "convert-activitynet", "--annotations", str(source), "--video-dir", str(videos),
        "--output", str(output),
    )  # fmt: skip
    written = json.loads(output.read_text())
    assert {k: v for k, v in written.items() if k != "database"} == {"version": "VERSION 1.3",
                                                                      "taxonomy": official["taxonomy"]}  # fmt: skip
    files = {"aa01": (20, 5), "bb02": (30, 10), "dd04": (12, 4)}
    assert written["database"].keys() == database.keys()
    for vid, entry in database.items():
        filled = written["database"][vid]
        added = {"fps": float(files[vid][1]), "frame": files[vid][0]} if vid in files else {}
        assert filled == {**entry, **added}, vid
    assert summary["videos_without_file"] == 1 and summary["first_without_file"] == ["cc03"]
    assert summary["first_duration_mismatch"] == ["bb02"]  # 9.5 s in the JSON, 3 s on disk
    assert (output.parent / "category_idx.txt").read_text().splitlines() == ["Archery", "Long jump", "Zumba"]

    dropped = command(
        capsys, "convert-activitynet", "--annotations", str(source), "--video-dir", str(videos),
        "--output", str(output), "--drop-missing",
    )  # fmt: skip
    assert dropped["dropped"] == 1 and "cc03" not in json.loads(output.read_text())["database"]
