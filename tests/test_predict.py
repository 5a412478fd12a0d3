"""``predict`` on one's own videos, through the CLI, for every task: the files it writes hold what the model's own
forward gives on the same clips, computed here without the trainer."""

from __future__ import annotations

import copy
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.base import find_videos, video_names
from lightning_modules.cli import main
from tests.quick import quick_overrides

REPO = Path(__file__).resolve().parents[1]
HALTINGVT = REPO / "recipes" / "quickstart" / "synthetic_haltingvt.yaml"
TAD_RECIPE = REPO / "recipes" / "quickstart" / "tad_synthetic.yaml"


def test_find_videos_takes_files_and_folders_in_order(tmp_path, monkeypatch):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for name in ("a/z.mp4", "a/deep/b.MKV", "a/notes.txt", "c.avi", "root_only.mp4"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "v.webm").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    found = find_videos(["c.avi", "a", str(tmp_path / "c.avi"), "v.webm"], root=tmp_path / "data")
    assert found == [Path("c.avi"), Path("a/deep/b.MKV"), Path("a/z.mp4"), tmp_path / "c.avi",
                     tmp_path / "data" / "v.webm"]  # fmt: skip
    with pytest.raises(FileNotFoundError, match="nothing.mp4 not found"):
        find_videos(["nothing.mp4"], root=tmp_path / "data")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no video file"):
        find_videos("empty")
    assert video_names([Path("x/clip.mp4"), Path("y/clip.mp4"), Path("y/other.avi")]) == ["x/clip", "y/clip", "other"]


@pytest.fixture(scope="module")
def haltingvt_checkpoint(tmp_path_factory, synthetic_classification) -> tuple[Path, list[str]]:
    """A HaltingVT quickstart model trained for a few steps, and the arguments it was trained with."""
    run = tmp_path_factory.mktemp("haltingvt")
    args = ["--config", str(HALTINGVT), *quick_overrides(run, synthetic_classification, batch_size=4),
            "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
            "--trainer.check_val_every_n_epoch=1"]  # fmt: skip
    main(["fit", *args])
    (ckpt,) = run.rglob("last.ckpt")
    return ckpt, args


def test_classifier_predicts_a_folder_of_own_videos_into_json_and_csv(
    tmp_path, synthetic_classification, haltingvt_checkpoint, capfd
):
    ckpt, _ = haltingvt_checkpoint
    own = tmp_path / "my videos"
    (own / "day2").mkdir(parents=True)
    for src, dst in (("left_0001.mp4", "first.mp4"), ("rotate_0000.mp4", "day2/second.mp4")):
        shutil.copy(synthetic_classification / "videos" / src, own / dst)
    empty_root = tmp_path / "never_written"  # the recipe's synthetic set must not be generated for this
    run = tmp_path / "run"
    cli = main([
        "predict", "--config", str(HALTINGVT), f"--ckpt_path={ckpt}", f"--data.init_args.root={empty_root}",
        "--data.init_args.num_workers=0", f"--trainer.default_root_dir={run}", "--trainer.logger=false",
        f"--data.init_args.predict_videos={own}", "--model.init_args.predict_top_k=3",
    ])  # fmt: skip
    assert not empty_root.exists()
    out = Path(cli.trainer.default_root_dir)
    results = json.loads((out / "predictions_predict.json").read_text())["results"]
    rows = list(csv.DictReader((out / "predictions_predict.csv").open()))
    assert set(results) == {"first", "second"} and len(rows) == 6

    # The reference: the checkpoint's model on the evaluation clips of the same files, outside the trainer.
    model = copy.deepcopy(cli.model).eval()
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])
    dm = cli.datamodule
    classes = dm.class_names
    for path, name in ((own / "first.mp4", "first"), (own / "day2" / "second.mp4", "second")):
        (i,) = [k for k, r in enumerate(dm.dataset("predict").records) if Path(r.path) == path]
        sample = dm.dataset("predict")[i]
        clip = dm.on_after_batch_transfer({"video": sample["video"][None], "batch_size": 1}, 0)["video"]
        with torch.no_grad():
            scores = model.video_scores(clip)[0]
        best = scores.topk(3)
        assert [r["label"] for r in results[name]] == [classes[c] for c in best.indices]
        assert [r["score"] for r in results[name]] == pytest.approx(best.values.tolist(), abs=1e-5)
        mine = [r for r in rows if r["video"] == name]
        assert [int(r["rank"]) for r in mine] == [1, 2, 3] and mine[0]["path"] == str(path)
        assert [int(r["class_index"]) for r in mine] == best.indices.tolist()
    assert "without --ckpt_path" not in capfd.readouterr().err


def test_predict_without_a_checkpoint_says_so_in_one_line(tmp_path, synthetic_classification, capfd):
    main([
        "predict", "--config", str(HALTINGVT), f"--data.init_args.root={synthetic_classification}",
        "--data.init_args.num_workers=0", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
        f"--data.init_args.predict_videos=[{synthetic_classification / 'videos' / 'left_0001.mp4'}]",
    ])  # fmt: skip
    lines = [line for line in capfd.readouterr().err.splitlines() if "without --ckpt_path" in line]
    assert lines == [
        "WARNING: predict without --ckpt_path: the model has its initial, untrained weights; pass --ckpt_path "
        "<the trained checkpoint>"
    ]


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    """(start, end, text) of each SubRip entry, read with the standard library only."""
    def seconds(stamp: str) -> float:
        hms, ms = stamp.split(",")
        h, m, s = (int(x) for x in hms.split(":"))
        return h * 3600 + m * 60 + s + int(ms) / 1000

    entries = []
    for block in filter(None, text.strip().split("\n\n")):
        _, times, caption = block.split("\n")
        start, end = times.split(" --> ")
        entries.append((seconds(start), seconds(end), caption))
    return entries


def test_temporal_detector_predicts_own_videos_into_results_subtitles_and_timelines(tmp_path):
    from datamodules.synthetic import generate_temporal
    from tests.quick import tiny_tad

    data = generate_temporal(tmp_path / "set", num_videos=4, size=32, seconds=6, fps=10, seed=5)
    args = [*tiny_tad(tmp_path / "fit", data), "--model.init_args.head.init_args.embed_dim=16",
            "--model.init_args.head.init_args.head_channels=16"]  # fmt: skip
    main(["fit", *args, "--trainer.logger=lightning_modules.runs.RunCSVLogger", "--trainer.max_epochs=1",
          "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=0"])  # fmt: skip
    (ckpt,) = (tmp_path / "fit").rglob("last.ckpt")
    own = tmp_path / "mine"
    own.mkdir()
    sources = sorted((data / "videos").glob("*.mp4"))[:2]
    for i, src in enumerate(sources):
        shutil.copy(src, own / f"match_{i}.mp4")
    never = tmp_path / "no_dataset_here"
    cli = main([
        "predict", *args, f"--ckpt_path={ckpt}", f"--data.init_args.root={never}", "--data.init_args.synthetic=true",
        f"--data.init_args.predict_videos={own}", "--trainer.logger=false", "--run_id=p",
        f"--trainer.default_root_dir={tmp_path / 'predict'}",
    ])  # fmt: skip
    assert not never.exists()  # neither annotations nor the synthetic set were needed
    run = tmp_path / "predict" / "p"
    results = json.loads((run / "predictions_predict.json").read_text())["results"]
    assert set(results) == {"match_0", "match_1"}
    assert sorted(p.name for p in (run / "timelines").glob("*.png")) == ["match_0_predict.png", "match_1_predict.png"]

    # The reference: every window of each file through the checkpoint's model, merged per video, outside the
    # trainer (the data module's own windows of the same files).
    model = copy.deepcopy(cli.model).eval()
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])
    dm, classes = cli.datamodule, cli.datamodule.class_names
    dataset = dm.dataset("predict")
    for v, video in enumerate(dataset.videos):
        name = video.video_id
        parts, offsets, steps = [], [], []
        for i in range(len(dataset)):
            sample = dataset[i]
            if int(sample["video_index"]) != video.video_index:
                continue
            batch = dm.on_after_batch_transfer(
                {"video": sample["video"][None], "batch_size": 1}, 0
            )  # normalised as the trainer's batches
            with torch.no_grad():
                outputs = model(batch["video"], torch.as_tensor(sample["valid"])[None])
            parts += model.postprocess.decode(outputs)
            offsets.append(float(sample["window_start"]))
            steps.append(float(sample["seconds_per_step"]) * sample["video"].shape[1] / outputs.masks[0].shape[1])
        merged = model.postprocess.merge_windows(parts, offsets, steps, video.duration, False)
        written = results[name]
        assert len(written) == len(merged.scores) > 0
        want = [
            (float(s), float(a), float(b), classes[int(c)])
            for s, (a, b), c in zip(merged.scores, merged.segments, merged.labels, strict=True)
        ]
        for d in written:  # each written detection is one of the reference's, used once
            match = next(
                (k for k, w in enumerate(want)
                 if w[3] == d["label"] and abs(w[0] - d["score"]) < 1e-4
                 and abs(w[1] - d["segment"][0]) < 1e-4 and abs(w[2] - d["segment"][1]) < 1e-4),
                None,
            )  # fmt: skip
            assert match is not None, f"{name}: {d} is not among the model's own detections"
            want.pop(match)
        # The subtitles: the best 20, by start, each shown over its segment with class and score.
        entries = parse_srt((run / "subtitles" / f"{name}.srt").read_text())
        best = sorted(written, key=lambda d: -d["score"])[:20]
        want_entries = sorted((d["segment"][0], d["segment"][1], f"{d['label']} ({d['score']:.2f})") for d in best)
        assert len(entries) == len(want_entries)
        for (start, end, text), (w_start, w_end, w_text) in zip(sorted(entries), want_entries, strict=True):
            assert (start, end) == pytest.approx((w_start, w_end), abs=5e-4) and text == w_text
        assert [e[0] for e in entries] == sorted(e[0] for e in entries)


def test_evad_predicts_keyframes_of_own_videos_into_the_ava_csv_and_pictures(tmp_path):
    from tests.test_detection_task import tiny

    args = tiny(tmp_path / "runs", tmp_path / "data")
    main(["fit", *args, "--run_id=fit", "--trainer.limit_val_batches=0"])
    ckpt = tmp_path / "runs" / "fit" / "checkpoints" / "last.ckpt"
    own = tmp_path / "mine"
    own.mkdir()
    source = sorted((tmp_path / "data" / "videos").glob("*.mp4"))[0]
    shutil.copy(source, own / "street.mp4")
    cli = main([
        "predict", *args, f"--ckpt_path={ckpt}", "--run_id=p", f"--data.init_args.predict_videos=[{own}]",
        "--data.init_args.root=/nonexistent/evad",
        "--trainer.callbacks+=lightning_modules.pictures.detection.EVADPictures",
    ])  # fmt: skip
    assert not Path("/nonexistent/evad").exists()
    run = tmp_path / "runs" / "p"
    rows = list(csv.reader((run / "detections_predict.csv").open()))
    dm = cli.datamodule
    dataset = dm.dataset("predict")
    from datamodules.video_io import open_video

    duration = open_video(own / "street.mp4").duration
    seconds = [t for t in range(int(duration) + 1) if t < duration]  # one keyframe per second of the file
    assert [k.timestamp for k in dataset.keyframes] == seconds and len(seconds) >= 3
    assert {int(r[1]) for r in rows} == set(seconds) and {r[0] for r in rows} == {"street"}
    pictures = sorted(
        (run / "pictures").glob("street_t*_predict_boxes.png"), key=lambda p: int(p.name.split("_t")[1].split("_")[0])
    )
    assert len(pictures) == min(8, len(seconds))
    # The strip: the keyframe pictures in time order, four to a row.
    import matplotlib.image

    strip = matplotlib.image.imread(run / "pictures" / "street_predict_strip.png")
    first, second = (matplotlib.image.imread(p) for p in pictures[:2])
    h, w = first.shape[:2]
    assert strip.shape[1] == 4 * w and strip.shape[0] == -(-len(pictures) // 4) * h
    np.testing.assert_allclose(strip[:h, :w, :3], first[..., :3], atol=1 / 255)
    np.testing.assert_allclose(strip[:h, w : 2 * w, :3], second[..., :3], atol=1 / 255)

    # The reference: the checkpoint's detector on each keyframe clip, outside the trainer; the best-scoring row
    # the CSV holds for a keyframe is the detector's best (box, action, score).
    model = copy.deepcopy(cli.model).eval()
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])
    action_ids = dm.action_ids
    for i, keyframe in enumerate(dataset.keyframes):
        batch = dm.on_after_batch_transfer(dm.collate_fn([dataset[i]]), 0)
        with torch.no_grad():
            (det,) = model.detector.predict(model(batch["video"], batch["image_size"], model.given_boxes(batch)))
        height, width = (float(v) for v in batch["image_size"][0])
        scores = det.action_scores.float()
        best = int(scores.flatten().argmax())
        box, cls = det.boxes[best // scores.shape[1]], best % scores.shape[1]
        mine = [r for r in rows if int(r[1]) == keyframe.timestamp]
        top = max(mine, key=lambda r: float(r[7]))
        assert int(top[6]) == action_ids[cls] and float(top[7]) == pytest.approx(float(scores.max()), abs=1e-4)
        want = [float(box[0]) / width, float(box[1]) / height, float(box[2]) / width, float(box[3]) / height]
        assert [float(v) for v in top[2:6]] == pytest.approx(want, abs=2e-3)


def test_extract_features_equal_the_backbone_on_the_same_windows_and_resume(tmp_path, capsys):
    from datamodules.synthetic import generate_temporal
    from lightning_modules.__main__ import run as run_command
    from tests.quick import tiny_tad

    data = generate_temporal(tmp_path / "set", num_videos=3, size=32, seconds=6, fps=10, seed=7)
    videos = sorted((data / "videos").glob("*.mp4"))[:2]
    # Windows of 32 frames every 16: each 60-frame video gets overlapping windows, so the stitching averages.
    args = [a for a in tiny_tad(tmp_path / "unused", data) if a != "--config"][1:]
    overrides = [a for a in args if not a.startswith("--trainer.")] + [
        "--data.init_args.window_size=32", "--model.init_args.backbone.init_args.head_length=32",
        "--model.init_args.head.init_args.max_seq_len=32", "--data.init_args.window_overlap=0.5",
    ]  # fmt: skip
    out = tmp_path / "features"
    command = ["extract-features", "--config", str(TAD_RECIPE), "--videos", *map(str, videos), "--out", str(out),
               *overrides]  # fmt: skip
    assert run_command(command) == 0
    index = json.loads((out / "index.json").read_text())["videos"]
    assert sorted(index) == [v.stem for v in videos]

    # The reference: the same model (same seed, no checkpoint) on each window, placed by hand on the time axis.
    torch.manual_seed(0)
    cli = main(["--config", str(TAD_RECIPE), *overrides, f"--data.init_args.predict_videos={[str(v) for v in videos]}",
                "--trainer.logger=false"], run=False)  # fmt: skip
    model, dm = cli.model.eval(), cli.datamodule
    dataset = dm.dataset("predict")
    for v, video in enumerate(dataset.videos):
        features = np.load(out / f"{video.video_id}.npy")
        rows: dict[int, list[np.ndarray]] = {}
        for i, (position, _) in enumerate(dataset.windows):
            if position != v:
                continue
            sample = dataset[i]
            clip = dm.on_after_batch_transfer({"video": sample["video"][None], "batch_size": 1}, 0)["video"]
            with torch.no_grad():
                window = model.detector.backbone(clip)[0].T.numpy()  # (L, D)
            step = float(sample["seconds_per_step"]) * sample["video"].shape[1] / len(window)
            first = round(float(sample["window_start"]) / step)
            for k in range(int(np.asarray(sample["valid"]).sum())):
                rows.setdefault(first + k, []).append(window[k])
        assert index[video.video_id]["seconds_per_feature"] == pytest.approx(step)
        assert features.shape == (len(rows), model.detector.backbone.embed_dim)
        assert sorted(rows) == list(range(len(rows)))
        assert any(len(r) > 1 for r in rows.values())  # overlapping windows were averaged
        np.testing.assert_allclose(features, np.stack([np.mean(rows[k], 0) for k in range(len(rows))]), atol=1e-5)

    # Resumable: a second run rewrites nothing; a removed file is extracted again.
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")}
    removed = out / f"{videos[1].stem}.npy"
    removed.unlink()
    capsys.readouterr()
    assert run_command(command) == 0
    assert "1 videos written, 1 already done" in capsys.readouterr().out
    assert (out / f"{videos[0].stem}.npy").stat().st_mtime_ns == stamps[f"{videos[0].stem}.npy"]
    assert removed.is_file()


def test_extract_features_of_a_classification_recipe_are_one_row_per_view(tmp_path, synthetic_classification):
    from lightning_modules.__main__ import run as run_command

    recipe = REPO / "recipes" / "quickstart" / "synthetic_dense_vit.yaml"
    videos = sorted((synthetic_classification / "videos").glob("*.mp4"))[:2]
    overrides = [f"--data.init_args.root={synthetic_classification}", "--data.init_args.synthetic=false",
                 "--data.init_args.test_num_clips=2"]  # fmt: skip
    out = tmp_path / "features"
    assert run_command(["extract-features", "--config", str(recipe), "--videos", *map(str, videos), "--out",
                        str(out), "--format", "pt", *overrides]) == 0  # fmt: skip
    cli = main(["--config", str(recipe), *overrides, f"--data.init_args.predict_videos={[str(v) for v in videos]}",
                "--trainer.logger=false"], run=False)  # fmt: skip
    model, dm = cli.model.eval(), cli.datamodule
    index = json.loads((out / "index.json").read_text())["videos"]
    for i, video in enumerate(videos):
        views = dm.on_after_batch_transfer({"video": dm.dataset("predict")[i]["video"][None], "batch_size": 1}, 0)
        with torch.no_grad():
            want = model.backbone(views["video"][0])
        got = torch.load(out / f"{video.stem}.pt")
        assert got.shape == (2, model.backbone.embed_dim) and index[video.stem]["views"] == 2
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
