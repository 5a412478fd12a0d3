"""ActivityNet-1.3 classification: JSON reading, multi-label batches, missing-video policy, mAP / hit@k, recipe."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from datamodules.activitynet import class_names_of, read_activitynet
from datamodules.base import AnnotationError
from datamodules.classification import VideoClassificationDataModule
from datamodules.synthetic import TEMPORAL_ACTIONS, generate_temporal
from lightning_modules.cli import main
from lightning_modules.metrics.classification import VideoClassificationScores
from tests.quick import quick_overrides

RECIPE = Path(__file__).parents[1] / "recipes" / "haltingvt_anet.yaml"


def write_json(path: Path, database: dict) -> Path:
    path.write_text(json.dumps({"version": "1.3", "database": database}))
    return path


def entry(subset: str, *labels: str) -> dict:
    return {
        "subset": subset,
        "duration": 10.0,
        "annotations": [{"segment": [0, 1], "label": x} for x in labels],
    }


def test_reader_labels_files_and_errors(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("a.mp4", "v_b.mkv", "c.webm", "notes.txt"):
        (videos / name).write_bytes(b"x")
    database = {
        "a": entry("training", "Zumba", "Archery", "Zumba"),
        "b": entry("training", "Bathing dog"),
        "c": entry("validation", "Archery"),
        "d": entry("training", "Archery"),  # no file
        "e": {"subset": "testing", "annotations": []},
    }
    json_file = write_json(tmp_path / "anet.json", database)
    assert class_names_of(json.loads(json_file.read_text())["database"]) == [
        "Archery",
        "Bathing dog",
        "Zumba",
    ]

    train = read_activitynet(json_file, videos, "training")
    assert [(Path(r.path).name, r.labels) for r in train.records] == [("a.mp4", (0, 2)), ("v_b.mkv", (1,))]
    assert train.missing == ["d"]
    val = read_activitynet(json_file, videos, "validation", class_names=["Zumba", "Archery", "Bathing dog"])
    assert [r.labels for r in val.records] == [(1,)]

    with pytest.raises(AnnotationError, match="withheld"):
        read_activitynet(json_file, videos, "testing")
    with pytest.raises(AnnotationError, match="'Zumba', which is not in the class list"):
        read_activitynet(json_file, videos, "training", class_names=["Archery", "Bathing dog"])
    broken = write_json(
        tmp_path / "broken.json", {"a": {"subset": "training", "annotations": [{"segment": [0, 1]}]}}
    )
    with pytest.raises(
        AnnotationError, match=r"broken.json: video 'a': every annotation needs a string 'label'"
    ):
        read_activitynet(broken, videos, "training")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(AnnotationError, match="bad.json: not valid JSON"):
        read_activitynet(tmp_path / "bad.json", videos, "training")
    with pytest.raises(AnnotationError, match="activity_net.v1-3.min.json"):
        read_activitynet(tmp_path / "absent.json", videos, "training")


@pytest.fixture(scope="module")
def temporal_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("anet") / "temporal"
    return generate_temporal(root, num_videos=6, val_fraction=1 / 3, size=64, seconds=8.0, fps=5, seed=3)


def anet_module(root: Path, **kwargs) -> VideoClassificationDataModule:
    args = dict(
        root=str(root), train_list="annotations.json", val_list="annotations.json", classes_file=None,
        multilabel=True, num_frames=4, frame_stride=4, crop_size=32, train_short_side=(40, 48),
        eval_short_side=40, randaugment_ops=0, batch_size=2, num_workers=0,
    )  # fmt: skip
    return VideoClassificationDataModule(**{**args, **kwargs})


def test_datamodule_gives_multi_hot_targets_from_the_json(temporal_set):
    dm = anet_module(temporal_set)
    database = json.loads((temporal_set / "annotations.json").read_text())["database"]
    present = sorted({a["label"] for e in database.values() for a in e["annotations"]})
    assert dm.num_classes == len(present) and dm.class_names == present
    assert set(present) <= set(TEMPORAL_ACTIONS)
    train = dm.dataset("train")
    expected = {
        f"{vid}.mp4": {present.index(a["label"]) for a in e["annotations"]}
        for vid, e in database.items()
        if e["subset"] == "training"
    }
    assert len(train) == len(expected) == 4
    for record in train.records:
        target = train.target(record)
        assert set(target.nonzero().flatten().tolist()) == expected[Path(record.path).name]
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch["video"].shape == (2, 3, 4, 32, 32) and batch["label"].shape == (2, dm.num_classes)
    val = next(iter(dm.val_dataloader()))
    assert val["video"].shape == (2, 1, 3, 4, 32, 32) and len(dm.dataset("val")) == 2


def test_missing_videos_error_or_counted_skip(temporal_set, tmp_path):
    root = tmp_path / "partial"
    shutil.copytree(temporal_set, root)
    (root / "videos" / "vid_0000.mp4").unlink()
    with pytest.raises(
        AnnotationError,
        match=r"subset 'training': video vid_0000 does not exist \(1 of 4 listed videos missing\).*bad_video: skip",
    ):
        anet_module(root).dataset("train")
    dm = anet_module(root, bad_video="skip")
    assert len(dm.dataset("train")) == 3
    assert dm.skip_counts["missing"] == 1 and "1 x missing" in dm.skip_summary()
    # val and test read the same subset: a missing validation video is counted once.
    database = json.loads((root / "annotations.json").read_text())["database"]
    val_id = next(k for k, e in database.items() if e["subset"] == "validation")
    (root / "videos" / f"{val_id}.mp4").unlink()
    assert len(dm.dataset("val")) == len(dm.dataset("test")) == 1
    assert dm.skip_counts["missing"] == 2


def average_precision(scores: list[float], positives: list[bool]) -> float:
    """AP by its definition: mean over positives of the precision at that positive's rank (no ties here)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    hits, precisions = 0, []
    for rank, i in enumerate(order, start=1):
        if positives[i]:
            hits += 1
            precisions.append(hits / rank)
    return sum(precisions) / len(precisions)


def test_multilabel_map_and_hit_at_k_against_direct_computation():
    g = torch.Generator().manual_seed(0)
    n, c = 40, 6
    scores = torch.rand(n, c, generator=g)
    targets = (torch.rand(n, c, generator=g) < 0.25).float()
    targets[torch.arange(c), torch.arange(c)] = 1.0  # every class has a positive ...
    targets[c:, 0] = torch.where(targets[c:].sum(1) == 0, 1.0, targets[c:, 0])  # every video has a label
    targets[:, c - 1] = 0.0  # ... but the last, which is left out of the mean
    metric = VideoClassificationScores(c, (1, 3), multilabel=True)
    metric.update(scores[:25], targets[:25], torch.arange(25))
    metric.update(scores[20:], targets[20:], torch.arange(20, n))  # 20..24 seen twice: counted once
    out = metric.compute()
    present = range(c - 1)
    expected_map = sum(
        average_precision(scores[:, k].tolist(), targets[:, k].bool().tolist()) for k in present
    ) / len(present)
    assert out["num_samples"] == n
    assert out["mAP"].item() == pytest.approx(expected_map, abs=1e-6)
    for k in (1, 3):
        hits = [any(targets[i, j] > 0 for j in scores[i].argsort(descending=True)[:k]) for i in range(n)]
        assert out[f"top{k}"].item() == pytest.approx(sum(hits) / n)


TINY_BACKBONE = """
model:
  init_args:
    pretrained: null
    backbone:
      class_path: models.haltingvt.HaltingViT
      init_args: {size: null, embed_dim: 32, depth: 3, num_heads: 2, img_size: 32, num_frames: 4}
"""


def test_anet_recipe_links_multilabel_and_fits_on_synthetic_json(tmp_path, temporal_set):
    (tmp_path / "tiny.yaml").write_text(TINY_BACKBONE)
    args = [
        "--config", str(RECIPE), "--config", str(tmp_path / "tiny.yaml"),
        *quick_overrides(tmp_path, temporal_set, batch_size=2), "--data.init_args.train_list=annotations.json",
        "--data.init_args.val_list=annotations.json", "--data.init_args.num_frames=4",
        "--data.init_args.frame_stride=4",
        "--data.init_args.crop_size=32", "--data.init_args.train_short_side=[32,40]",
        "--data.init_args.eval_short_side=32", "--data.init_args.randaugment_ops=0",
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32-true",
        "--trainer.max_epochs=1",
    ]  # fmt: skip
    cli = main(["fit", *args])
    assert cli.model.multilabel and cli.model.num_classes == cli.datamodule.num_classes
    metrics = cli.trainer.callback_metrics
    assert metrics["val/num_samples"] == 2 and 0.0 <= float(metrics["val/mAP"]) <= 1.0
    assert "val/gmacs" in metrics and "val/top1" in metrics
