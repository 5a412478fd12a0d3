"""``predict`` on one's own videos, through the CLI, for every task: the files it writes hold what the model's own
forward gives on the same clips, computed here without the trainer."""

from __future__ import annotations

import copy
import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from datamodules.base import find_videos, video_names
from lightning_modules.cli import main
from tests.quick import quick_overrides

REPO = Path(__file__).resolve().parents[1]
HALTINGVT = REPO / "recipes" / "quickstart" / "synthetic_haltingvt.yaml"


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
