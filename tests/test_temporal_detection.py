"""The temporal detection task through the CLI: trains on windows, scores videos, writes predictions that the
offline scorer reads back to the same figures; ActivityNet class fusion; the paper recipes' wiring."""

from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from datamodules.synthetic import generate_temporal
from lightning_modules.__main__ import run as run_command
from lightning_modules.cli import main
from lightning_modules.metrics.tad import mean_average_precision, read_ground_truth, read_predictions
from lightning_modules.tasks.temporal_detection import read_class_scores
from models.temporal_backbone import ChunkedVideoBackbone
from models.vit import VideoMAEViT
from tests.quick import quick_overrides, tiny_tad

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def temporal_set(tmp_path_factory) -> Path:
    return generate_temporal(
        tmp_path_factory.mktemp("temporal") / "set", num_videos=6, size=32, seconds=6, fps=10
    )


def tiny(run_root: Path, data: Path, *extra: str) -> list[str]:
    """The shrunk quickstart detector with a CSV log, fitting one epoch of two batches and validating."""
    return [
        *tiny_tad(run_root, data), "--trainer.logger=lightning_modules.runs.RunCSVLogger",
        f"--trainer.logger.init_args.save_dir={run_root}", "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2", "--trainer.check_val_every_n_epoch=1", *extra,
    ]  # fmt: skip


def test_fit_scores_videos_and_the_offline_scorer_agrees(tmp_path, temporal_set, capsys):
    cli = main(["fit", *tiny(tmp_path, temporal_set, "--run_id=t")])
    metrics = cli.trainer.callback_metrics
    keys = {f"val/mAP@{t}" for t in ("0.3", "0.4", "0.5", "0.6", "0.7")} | {"val/average_mAP"}
    assert keys <= set(metrics)
    predictions = tmp_path / "t" / "predictions_val.json"
    results = json.loads(predictions.read_text())["results"]
    truth = json.loads((temporal_set / "annotations.json").read_text())["database"]
    val_videos = {v for v, e in truth.items() if e["subset"] == "validation"}
    assert set(results) <= val_videos and results  # detections named by video id, in seconds
    for dets in results.values():
        for d in dets:
            assert 0 <= d["segment"][0] <= d["segment"][1] <= truth[next(iter(results))]["duration"] + 1e-6
            assert d["label"] in {"jump", "spin", "slide"}
    capsys.readouterr()
    assert run_command(["evaluate-tad", "--ground-truth", str(temporal_set / "annotations.json"),
                        "--predictions", str(predictions)]) == 0  # fmt: skip
    offline = json.loads(capsys.readouterr().out)
    for key in keys:
        assert offline[key.removeprefix("val/")] == pytest.approx(float(metrics[key]), abs=1e-6)


def test_help_lists_the_offline_scorer(capsys):
    assert run_command(["--help"]) == 0
    assert "evaluate-tad" in capsys.readouterr().out


def test_class_agnostic_detector_without_class_scores_is_an_error(tmp_path, temporal_set):
    with pytest.raises(ValueError, match="external_class_scores"):
        main(["fit", *tiny(tmp_path, temporal_set, "--data.init_args.class_agnostic=true")])


def test_class_scores_missing_for_scored_videos_are_an_error_or_an_empty_video(tmp_path, temporal_set):
    """A scored video without external class scores stops the evaluation naming the file and the videos (its
    class-agnostic detections cannot be named); under missing_class_scores: empty it is scored without any."""
    truth = json.loads((temporal_set / "annotations.json").read_text())["database"]
    val = sorted(v for v, e in truth.items() if e["subset"] == "validation")
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({val[0]: {"jump": 0.6, "spin": 0.3, "slide": 0.1}}))
    agnostic = ["--data.init_args.class_agnostic=true", f"--model.init_args.external_class_scores={partial}"]
    with pytest.raises(ValueError, match=rf"partial.json has no scores for {len(val) - 1} of the {len(val)} val"):
        main(["fit", *tiny(tmp_path / "a", temporal_set, *agnostic)])
    cli = main(["fit", *tiny(tmp_path / "b", temporal_set, *agnostic, "--model.init_args.missing_class_scores=empty",
                              "--run_id=e")])  # fmt: skip
    results = json.loads((tmp_path / "b" / "e" / "predictions_val.json").read_text())["results"]
    assert all(not results.get(v) for v in val[1:]) and "val/average_mAP" in cli.trainer.callback_metrics


def test_backbone_weight_decay_is_one_group_as_opentads_custom_groups():
    """OpenTAD's custom groups (lora / norm / patch_embed) decay every backbone tensor at 0.05, biases and norms
    too; without backbone_weight_decay the usual rule (no decay on 1-D tensors) holds."""
    from lightning_modules.tasks.temporal_detection import TemporalActionDetection
    from models.actionformer import ActionFormerHead
    from models.temporal_backbone import ChunkedVideoBackbone
    from models.vit import VideoMAEViT

    def task(**kwargs):
        vit = VideoMAEViT(embed_dim=32, depth=1, num_heads=2, img_size=32, num_frames=8)
        backbone = ChunkedVideoBackbone(vit, chunk_frames=8, head_length=32, finetune="lora", lora_rank=4)

        def head(dim, classes):
            return ActionFormerHead(dim, classes, embed_dim=16, head_channels=16, max_seq_len=32)

        return TemporalActionDetection(backbone, head, num_classes=3, **kwargs)

    def decays(t):
        out = {}
        for group in t.optimizer_groups():
            for p in group["params"]:
                out[id(p)] = (group["weight_decay"], group["lr"])
        return {n: out[id(p)] for n, p in t.named_parameters() if p.requires_grad}

    official = decays(task(backbone_weight_decay=0.05, backbone_lr=5e-5))
    backbone = {n: v for n, v in official.items() if n.startswith("detector.backbone.")}
    assert any("norm" in n for n in backbone) and any("lora_A" in n for n in backbone)
    assert set(backbone.values()) == {(0.05, 5e-5)}
    assert official["detector.head.cls_head.bias"][0] == 0.0  # the head keeps its no-decay group
    usual = decays(task(backbone_lr=5e-5))
    assert usual["detector.backbone.vit.blocks.0.norm1.weight"][0] == 0.0


def test_external_class_scores_formats(tmp_path):
    names, ids = ["jump", "slide", "spin"], ["a", "b", "c"]
    (tmp_path / "list.json").write_text(json.dumps({"results": {"v_a": [0.1, 0.2, 0.7]}}))
    (tmp_path / "named.json").write_text(json.dumps({"b": {"spin": 0.9, "jump": 0.1}}))
    (tmp_path / "cuhk.json").write_text(
        json.dumps({"class": ["spin", "jump", "slide"], "results": {"c": [0.5, 0.3, 0.2]}})
    )
    assert torch.equal(
        read_class_scores(tmp_path / "list.json", ids, names)[0], torch.tensor([0.1, 0.2, 0.7])
    )
    assert torch.equal(
        read_class_scores(tmp_path / "named.json", ids, names)[1], torch.tensor([0.1, 0.0, 0.9])
    )
    assert torch.equal(
        read_class_scores(tmp_path / "cuhk.json", ids, names)[2], torch.tensor([0.3, 0.2, 0.5])
    )


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("tad_*.yaml")), ids=lambda p: p.stem)
def test_missing_dataset_says_what_to_download(tmp_path, recipe):
    # The recipes name local VideoMAE checkpoints this machine lacks.
    no_weights = tmp_path / "no_weights.yaml"
    no_weights.write_text("model:\n  init_args:\n    pretrained: null\n")
    with pytest.raises(Exception, match=r"(?s)not found.*(THUMOS14|ActivityNet-1.3)"):
        main(["fit", "--config", str(recipe), "--config", str(no_weights), f"--data.init_args.root={tmp_path}",
              "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
              "--trainer.precision=32-true", "--trainer.logger=false", "--trainer.callbacks=[]",
              "--data.init_args.num_workers=0"])  # fmt: skip


def test_demo_tad_prints_figures_against_the_target(tmp_path, temporal_set, capsys):
    from lightning_modules.demos.tad import main as demo

    overrides = tiny(tmp_path, temporal_set, "--run_id=demo")[2:]  # the demo names the recipe itself
    summary = demo(["--out", str(tmp_path / "demo"), "--pretrained", "none", "--", *overrides])
    out = capsys.readouterr().out
    assert "target (>= 70% within 10 min)" in out and ("NOT met" in out) != summary["met"]
    assert "trained from scratch" in out and summary["backbone"] is None
    for key, value in summary["offline"].items():
        assert value == pytest.approx(summary["logged"][key], abs=1e-6)
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["run_dir"] == str(tmp_path / "demo")


def test_demo_tad_starts_the_detector_from_the_backbone_it_trained(
    tmp_path, temporal_set, synthetic_classification
):
    """Stage 1 fits the dense quickstart ViT (tiny here) as run tad_backbone; stage 2 loads exactly its weights
    into the detector's ViT; a second demo reuses the finished stage 1 instead of training it again."""
    from lightning_modules.demos.tad import main as demo

    vit = [
        "--model.init_args.backbone.init_args.img_size=32",
        "--model.init_args.backbone.init_args.embed_dim=32",
        "--model.init_args.backbone.init_args.depth=1",
    ]  # the shape tiny() gives the detector's ViT
    stage1 = [
        *quick_overrides(tmp_path / "backbone", synthetic_classification),
        *vit,
        "--data.init_args.crop_size=32",
        "--data.init_args.train_short_side=[40,40]",
        "--data.init_args.eval_short_side=40",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.check_val_every_n_epoch=1",
        "--trainer.callbacks=[]",
    ]
    args = ["--out", str(tmp_path / "demo"), "--backbone-args", shlex.join(stage1), "--"]
    detector = lambda run: [
        a for a in tiny(tmp_path, temporal_set, f"--run_id={run}")[2:] if "pretrained" not in a
    ]
    first = demo([*args, *detector("first")])
    ckpt = Path(first["backbone"]["checkpoint"])
    assert ckpt == tmp_path / "backbone" / "tad_backbone" / "checkpoints" / "last.ckpt"
    assert not first["backbone"]["reused"] and 0 <= first["backbone"]["val_top1"] <= 1
    config = yaml.safe_load((tmp_path / "first" / "config.yaml").read_text())
    assert config["model"]["init_args"]["pretrained"] == str(ckpt)

    # The detector's ViT as the run built it holds the classifier's backbone tensors, read from the file.
    built = ChunkedVideoBackbone(
        VideoMAEViT(size=None, embed_dim=32, depth=1, num_heads=4, img_size=32, num_frames=8), chunk_frames=8,
        head_length=64, finetune="full",
    )
    built.load_pretrained(str(ckpt))
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    own = built.vit.state_dict()
    shared = [k for k in saved if k.startswith("backbone.") and k.removeprefix("backbone.") in own]
    assert len(shared) == len(own)  # every tensor of the ViT comes from the checkpoint
    for key in shared:
        assert torch.equal(own[key.removeprefix("backbone.")], saved[key]), key

    stamp = ckpt.stat().st_mtime_ns
    second = demo([*args, *detector("second")])
    assert second["backbone"]["reused"] and second["backbone"]["checkpoint"] == str(ckpt)
    assert ckpt.stat().st_mtime_ns == stamp
    # A record of another version of the backbone recipe is not trusted: the run is fitted again (here a no-op
    # resume of the finished run), and the record names this recipe.
    record = json.loads((tmp_path / "demo" / "backbone.json").read_text())
    (tmp_path / "demo" / "backbone.json").write_text(json.dumps({**record, "recipe_sha256": "an older recipe"}))
    changed = demo([*args, *detector("changed")])
    assert not changed["backbone"]["reused"] and changed["backbone"]["checkpoint"] == str(ckpt)
    assert json.loads((tmp_path / "demo" / "backbone.json").read_text())["recipe_sha256"] == record["recipe_sha256"]
    # Without the demo's record, the finished run resumes as a no-op fit and still names its checkpoint.
    (tmp_path / "demo" / "backbone.json").unlink()
    third = demo([*args, *detector("third")])
    assert third["backbone"]["checkpoint"] == str(ckpt) and not third["backbone"]["reused"]


def test_ddp_fit_validates_like_a_single_process(tmp_path_factory, tmp_path):
    """A 2-rank DDP fit (gloo) of the quickstart detector validates at its end; one process validating the
    checkpoint it wrote gets the same figures and detections. 32-frame windows, 3 per 6 s video, over 3
    validation videos make 9 windows, so the sampler pads one; the detections are gathered over the ranks and
    merged per video."""
    root = tmp_path_factory.mktemp("temporal_ddp") / "set"
    temporal_set = generate_temporal(root, num_videos=8, val_fraction=0.375, size=32, seconds=6, fps=10)
    window = ["--data.init_args.window_size=32"]
    # Ranks forked from this process: the same DDP (gloo, distributed sampler, gathered detections) without
    # two fresh interpreters importing torch and Lightning, most of the cost of a subprocess launch.
    main([
        "fit", *tiny(tmp_path / "two", temporal_set, "--run_id=v", *window), "--trainer.strategy=ddp_fork",
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.num_sanity_val_steps=0",
        "--trainer.max_epochs=6", "--trainer.check_val_every_n_epoch=6",
    ])  # fmt: skip
    ckpt = tmp_path / "two" / "v" / "checkpoints" / "last.ckpt"
    single = main(
        ["validate", *tiny(tmp_path / "one", temporal_set, "--run_id=v", *window), f"--ckpt_path={ckpt}"]
    )
    reference = {k: float(v) for k, v in single.trainer.callback_metrics.items() if "mAP" in k}
    two = json.loads((tmp_path / "two" / "v" / "predictions_val.json").read_text())["results"]
    one = json.loads((tmp_path / "one" / "v" / "predictions_val.json").read_text())["results"]
    assert one and sum(map(len, one.values())) > 0
    assert len(single.datamodule.dataset("val")) % 2 == 1  # an odd number of windows: the sampler pads one
    assert sorted(one) == sorted(two)
    # Detections are listed by score, and an untrained model's near-equal scores may swap places: compare the
    # lists in (label, segment) order.
    order = lambda dets: sorted(dets, key=lambda d: (d["label"], *d["segment"], -d["score"]))
    for video, dets in one.items():
        assert len(dets) == len(two[video]), video
        for a, b in zip(order(dets), order(two[video])):
            assert a["label"] == b["label"]
            # float32 sums over other batch compositions: the last bits differ, and soft-NMS's decays compound
            # them (seen: 1.8e-4 relative on a 0.007 score)
            assert a["score"] == pytest.approx(b["score"], rel=1e-3, abs=1e-6)
            assert a["segment"] == pytest.approx(b["segment"], abs=1e-4)
    # Rank 0's logged figures (its CSV log) are those of the detections written, and equal the single process's
    # up to the order of near-equal scores of a barely trained model.
    rows = list(csv.DictReader((tmp_path / "two" / "v" / "metrics.csv").open()))
    logged = {k: float(v) for row in rows for k, v in row.items() if "mAP" in k and v}
    assert set(logged) == set(reference) and reference["val/mAP@0.3"] > 0
    truth = read_ground_truth(temporal_set / "annotations.json", "validation")
    offline = mean_average_precision(
        read_predictions(tmp_path / "two" / "v" / "predictions_val.json", truth), truth, single.model.tious
    )
    for key, value in reference.items():
        assert logged[key] == pytest.approx(offline[key.removeprefix("val/")], abs=1e-6), key
        assert logged[key] == pytest.approx(value, abs=1e-3), key
