"""The EVAD task through the CLI on tiny synthetic AVA-style and ACT-pickle sets (fit, validate at another keep
rate, test writing the official CSV, which the offline scorer reads back to the logged figure; the UCF101-24 and
JHMDB recipes with video-mAP), its optimiser groups against a hand-made list, and the step schedule against
hand-worked multipliers."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lightning_modules.cli import main
from lightning_modules.metrics.ava import (
    AVAFrameMAP,
    ava_frame_map,
    read_ava_detections,
    read_ava_ground_truth,
)
from lightning_modules.metrics.video_map import FrameVideoMAP
from lightning_modules.tasks.base import OptimizerSettings, warmup_step_decay
from lightning_modules.tasks.detection import SpatioTemporalDetection
from models.context_decoder import ContextRefinementDecoder
from models.evad import EVAD, ActionDetections
from models.query_localiser import QueryLocaliser, SimpleFeaturePyramid
from models.vit import VideoMAEViT

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart" / "evad_synthetic.yaml"
KEEP_RATE = "--model.init_args.detector.init_args.keep_rate"


def tiny(run_root: Path, data_root: Path) -> list[str]:
    """The quickstart recipe on a 4-video 48x64 synthetic set, a 32-wide backbone from scratch, one epoch of two
    batches, CSV logs under ``run_root``."""
    d = "--model.init_args.detector"
    return [
        "--config", str(QUICKSTART), f"--data.init_args.root={data_root}", "--data.init_args.synthetic.num_videos=4",
        "--data.init_args.synthetic.seconds=4", "--data.init_args.synthetic.size=[48, 64]",
        "--data.init_args.synthetic.fps=8", "--data.init_args.num_workers=0", "--data.init_args.batch_size=2",
        "--data.init_args.train_short_side=48", "--data.init_args.eval_short_side=48",
        "--model.init_args.pretrained=null", f"{d}.init_args.backbone.init_args.embed_dim=32",
        f"{d}.init_args.pyramid.init_args.in_channels=32", f"{d}.init_args.decoder.init_args.encoder_dim=32",
        f"--trainer.default_root_dir={run_root}", "--trainer.logger=lightning_modules.runs.RunCSVLogger",
        f"--trainer.logger.init_args.save_dir={run_root}", "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2", "--trainer.check_val_every_n_epoch=1", "--trainer.callbacks=[]",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("evad")
    args = tiny(root / "runs", root / "data")
    cli = main(["fit", *args, "--run_id=fit"])
    return args, cli, root / "runs" / "fit" / "checkpoints" / "last.ckpt"


def last_block_tokens(cli) -> int:
    """Tokens leaving the last pruning block in the detector's latest forward."""
    pruning = cli.model.detector.pruning
    return pruning[max(pruning)].kept.shape[1]


def test_fit_logs_losses_metric_and_cost(fitted):
    _, cli, last = fitted
    metrics = cli.trainer.callback_metrics
    assert {"val/frame_mAP@0.5", "val/frame_mAP@0.5:0.95", "val/gmacs", "train/loss"} <= set(metrics)
    # 3 box stages x (class, l1, giou) + 2 decoder layers, each logged; the loss is their mean, as the official
    # loop divides their sum by their number (projects/evad/train_net.py)
    terms = [f"train/stage{s}_{n}" for s in range(3) for n in ("class", "l1", "giou")]
    terms += ["train/action0", "train/action1"]
    assert set(terms) <= set(metrics)
    mean = sum(float(metrics[t]) for t in terms) / len(terms)
    assert mean == pytest.approx(float(metrics["train/loss"]), rel=1e-5)
    assert {"val/person_AP@0.5", "val/person_AP@0.5:0.95"} <= set(metrics)
    assert 0.0 <= float(metrics["val/person_AP@0.5"]) <= 1.0
    assert last.exists()
    # 48x64 clips padded to 64x64, 8 frames: a 4x4x4 grid; keep 0.7 after blocks 1 and 2: 64 -> 45 -> 32
    assert last_block_tokens(cli) == math.ceil(0.7 * math.ceil(0.7 * 64)) == 32


def test_validate_at_another_keep_rate_without_retraining(fitted):
    args, fit, last = fitted  # fit ran at the recipe's 0.7: 32 tokens left (see above)
    dense = main(["validate", *args, "--run_id=v10", f"--ckpt_path={last}", f"{KEEP_RATE}=1.0"])
    assert dense.model.detector.keep_rate == 1.0
    assert last_block_tokens(dense) == 64  # no token dropped
    # the checkpoint's weights were loaded, not a fresh model's
    fitted_weights = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    for name, value in dense.model.state_dict().items():
        if name in fitted_weights:
            assert torch.equal(value, fitted_weights[name]), name
    g07, g10 = (float(c.trainer.callback_metrics["val/gmacs"]) for c in (fit, dense))
    assert g07 < g10


def test_test_writes_the_official_csv_that_scores_as_logged(fitted):
    args, _, last = fitted
    cli = main(["test", *args, "--run_id=t", f"--ckpt_path={last}"])
    dm = cli.datamodule
    written = Path(cli.trainer.default_root_dir) / "detections_test.csv"
    rows = list(csv.reader(written.open()))
    assert rows and all(len(r) == 8 for r in rows)
    assert {int(r[6]) for r in rows} <= {1, 2, 3, 4}  # the label map's action ids
    assert {r[0] for r in rows} <= set(dm.video_names("test"))
    assert all(0.0 <= float(v) <= 1.0 for r in rows for v in r[2:6])
    label_map = dict(zip(dm.action_ids, dm.class_names))
    truth = read_ava_ground_truth(dm.paths["val_csv"], label_map)
    offline = ava_frame_map(read_ava_detections(written, truth, label_map), truth, label_map)
    logged = cli.trainer.callback_metrics
    for key in ("frame_mAP@0.5", "frame_mAP@0.5:0.95"):
        assert offline[key] == pytest.approx(float(logged[f"test/{key}"]), abs=1e-6)


def test_scores_are_written_under_their_action_ids():
    task = SimpleNamespace(_action_ids=[2, 5, 9])
    scores = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    out = SpatioTemporalDetection._id_columns(task, scores)
    expected = torch.zeros(2, 9)
    expected[0, 1], expected[0, 4], expected[0, 8] = 0.1, 0.2, 0.3
    expected[1, 1], expected[1, 4], expected[1, 8] = 0.4, 0.5, 0.6
    assert torch.equal(out, expected)


def tiny_task(num_classes: int = 3, **kwargs) -> SpatioTemporalDetection:
    backbone = VideoMAEViT(size=None, embed_dim=32, depth=4, num_heads=2, img_size=64, num_frames=8)
    localiser = QueryLocaliser(
        num_proposals=4, hidden_dim=16, num_stages=1, num_heads=2, dim_dynamic=4, dim_feedforward=16
    )
    pyramid = SimpleFeaturePyramid(32, 16)
    decoder = ContextRefinementDecoder(num_classes, 32, 16, 1, 2, head_hidden_dim=16, pretrain_grid=(4, 4, 4))
    evad = EVAD(
        backbone,
        localiser,
        decoder,
        pyramid,
        prune_layers=[1],
        tap_layers=[0, 1, 2, 3],
        num_classes=num_classes,
    )
    return SpatioTemporalDetection(evad, num_classes=num_classes, **kwargs)


def test_param_groups_as_the_official_optimizer():
    """EVAD's slowfast/models/optimizer.py scales the lr of names under ``det_head.`` (its box stages,
    encoder_to_decoder, mask_token and the decoder with its action heads) by SOLVER.LR_SCALE 8; its FPN
    (fpn_lateral*/fpn_output*), init_proposal_boxes/features and the encoder's final norm are top-level or
    backbone modules at 1x. No decay on 1-D tensors, biases, mask_token, pos_embed."""
    task = tiny_task(optimizer=OptimizerSettings(lr=1e-3, weight_decay=0.05))
    where = {}
    for group in task.optimizer_groups():
        for p in group["params"]:
            assert id(p) not in where, "a parameter in two groups"
            where[id(p)] = (group["lr"], group["weight_decay"])
    params = dict(task.named_parameters())
    assert {id(p) for p in params.values() if p.requires_grad} == set(where)
    expected = {  # name: (lr, weight decay), by hand
        "detector.backbone.patch_embed.proj.weight": (1e-3, 0.05),
        "detector.backbone.blocks.0.attn.qkv.weight": (1e-3, 0.05),
        "detector.backbone.blocks.0.attn.q_bias": (1e-3, 0.0),
        "detector.backbone.blocks.0.attn.v_bias": (1e-3, 0.0),
        "detector.backbone.blocks.3.norm1.weight": (1e-3, 0.0),
        "detector.backbone.blocks.3.mlp.fc1.bias": (1e-3, 0.0),
        "detector.localiser.proposal_features": (1e-3, 0.05),  # an embedding table, decayed as in detectron2
        "detector.localiser.proposal_boxes": (1e-3, 0.05),
        "detector.pyramid.lateral_convs.0.weight": (1e-3, 0.05),
        "detector.pyramid.output_convs.0.bias": (1e-3, 0.0),
        "detector.localiser.stages.0.box_deltas.weight": (8e-3, 0.05),
        "detector.localiser.stages.0.box_deltas.bias": (8e-3, 0.0),
        "detector.decoder.encoder_to_decoder.weight": (8e-3, 0.05),
        "detector.decoder.mask_token": (8e-3, 0.0),
        "detector.decoder.norm.weight": (1e-3, 0.0),  # the encoder's final norm
        "detector.decoder.blocks.0.attn.qkv.weight": (8e-3, 0.05),
        "detector.decoder.heads.0.3.weight": (8e-3, 0.05),
    }
    for name, (lr, wd) in expected.items():
        assert name in params, f"{name} not in {sorted(params)[:40]}"
        assert where[id(params[name])] == pytest.approx((lr, wd)), name
    assert task.detector.decoder.mask_token.ndim > 1  # no decay by name, not by shape


@pytest.mark.parametrize(
    ("epoch", "factor"),
    [(0, 0.1), (1, 0.55), (2, 1.0), (4.9, 1.0), (5, 0.1), (7.9, 0.1), (8, 0.01), (11.9, 0.01)],
)
def test_step_decay_multiplier_by_hand(epoch, factor):
    assert warmup_step_decay(epoch, 2.0, (5.0, 8.0), 0.1, 0.1) == pytest.approx(factor)


def test_official_schedule_through_the_optimiser():
    # The schedule's defaults: warmup 2 epochs from 0.1, x0.1 at 5 and x0.01 at 8, per step.
    task = tiny_task(optimizer=OptimizerSettings(lr=1e-3, weight_decay=1e-4))
    task._trainer = SimpleNamespace(max_epochs=12, estimated_stepping_batches=120)  # 10 steps per epoch
    config = task.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = {}
    for step in range(120):
        lrs[step] = sorted({g["lr"] for g in opt.param_groups})
        opt.step()
        sched.step()
    by_hand = {0: 0.1, 10: 0.55, 20: 1.0, 49: 1.0, 50: 0.1, 79: 0.1, 80: 0.01, 119: 0.01}
    for step, factor in by_hand.items():
        assert lrs[step] == pytest.approx([1e-3 * factor, 8e-3 * factor]), step


def test_refusals():
    with pytest.raises(ValueError, match="num_classes to 5"):
        SpatioTemporalDetection(tiny_task().detector, num_classes=5)
    with pytest.raises(ValueError, match="proposals_csv"):
        tiny_task(use_proposals=True).given_boxes({"video": torch.zeros(1)})


@pytest.mark.parametrize("protocol", ["ava", "frames"])
def test_detections_reach_the_metric_under_the_right_class(protocol):
    """One ground-truth actor of the second class; a matching box scored 0.9 for it and a far box scored 0.95:
    ranked FP then TP, so AP = precision at full recall = 1/2 (by hand), the other classes have no ground truth."""
    task = tiny_task()
    task._protocol = protocol
    if protocol == "ava":  # non-contiguous action ids: the second class is action 7
        task._action_ids = [3, 7, 11]
        task.metrics = torch.nn.ModuleDict({"val": AVAFrameMAP(11, {3: "a", 7: "b", 11: "c"})})
    else:
        task.metrics = torch.nn.ModuleDict({"val": FrameVideoMAP(3, video_map=False)})
    batch = {
        "image_size": torch.tensor([[40, 80]]), "boxes": [torch.tensor([[8.0, 4.0, 40.0, 36.0]])],
        "labels": [torch.tensor([[0.0, 1.0, 0.0]])], "video_index": torch.tensor([0]),
        "timestamp": torch.tensor([902]), "frame": torch.tensor([5]), "classes": [torch.tensor([1])],
        "tube_ids": [torch.tensor([0])],
    }  # fmt: skip
    found = ActionDetections(
        boxes=torch.tensor([[8.0, 4.0, 40.0, 36.0], [44.0, 2.0, 80.0, 38.0]]), person_scores=torch.ones(2),
        action_scores=torch.tensor([[0.1, 0.9, 0.2], [0.3, 0.95, 0.1]]), index=torch.arange(2),
    )  # fmt: skip
    task._update(batch, "val", [found])
    assert float(task.metrics["val"].compute()["frame_mAP@0.5"]) == pytest.approx(0.5)


def test_ddp_fit_and_validation_equal_a_single_process(tmp_path):
    """A 2-rank DDP fit (gloo, forked ranks), then its checkpoint validated on 2 ranks and in one process: the
    same frame-mAPs. The 3 validation keyframes make the distributed sampler pad one, which the metric must count
    once. Validation classifies the ground-truth boxes (the given-boxes path), so a barely trained model still
    scores above zero and every keyframe's detections count."""
    data = tmp_path / "data"
    args = [*tiny(tmp_path / "runs", data), "--data.init_args.synthetic.val_fraction=0.25"]
    # Plain DDP, as the README runs every quickstart: no parameter may go without a gradient in a step (the
    # pyramid level no box is pooled from takes part with weight zero).
    ddp = ["--trainer.strategy=ddp_fork", "--trainer.accelerator=cpu"]
    ddp += ["--trainer.devices=2", "--trainer.num_sanity_val_steps=0"]
    main(["fit", *args, *ddp, "--run_id=fit", "--trainer.max_epochs=2", "--trainer.limit_val_batches=0"])
    with (data / "annotations" / "val.csv").open() as f, (data / "annotations" / "gt.csv").open("w") as out:
        for row in csv.reader(f):
            out.write(",".join([*row[:6], "1.0"]) + "\n")
    given = ["--model.init_args.use_proposals=true", "--data.init_args.proposals_csv=annotations/gt.csv"]
    ckpt = f"--ckpt_path={tmp_path / 'runs' / 'fit' / 'checkpoints' / 'last.ckpt'}"
    two = main(["validate", *args, *given, *ddp, "--run_id=two", ckpt])
    one = main(["validate", *args, *given, "--run_id=one", ckpt])
    assert len(one.datamodule.dataset("val")) == 3
    reference = {k: float(v) for k, v in one.trainer.callback_metrics.items() if "frame_mAP" in k}
    logged = {k: float(v) for k, v in two.trainer.callback_metrics.items() if "frame_mAP" in k}
    assert set(logged) == set(reference) and reference["val/frame_mAP@0.5"] > 0
    for key, value in reference.items():
        assert logged[key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.parametrize(
    "recipe, pickle_name, frame_file",
    [("evad_ucf24.yaml", "UCF101v2-GT.pkl", "rgb-images/{video}/{index:05d}.jpg"),
     ("evad_jhmdb.yaml", "JHMDB-GT.pkl", "Frames/{video}/{index:05d}.png")],
)  # fmt: skip
def test_act_recipes_fit_and_test_with_video_map_on_act_pickle_frames(
    tmp_path, recipe, pickle_name, frame_file, make_video
):
    """The UCF101-24 and JHMDB recipes end to end on a tiny ACT-pickle set in each one's layout: fit, then test
    with video-mAP. Every frame of the split's test videos is evaluated once, and every metric is a fraction. Then
    predict on a video file of one's own: a clip around each frame, detections under the file's name."""
    from tests.paper_files import act_pickle
    from tests.test_act_data import NFRAMES, ground_truth

    root = act_pickle(tmp_path / "data", pickle_name, frame_file, num_classes=2)
    truth = ground_truth()
    d = "--model.init_args.detector"
    tiny_parts = {
        "num_classes": 2,
        "backbone": {"class_path": "models.vit.VideoMAEViT", "init_args": {
            "size": None, "embed_dim": 32, "depth": 4, "num_heads": 2, "num_frames": 4, "img_size": 48}},
        "localiser": {"class_path": "models.query_localiser.QueryLocaliser", "init_args": {
            "num_proposals": 8, "hidden_dim": 32, "num_stages": 1, "num_heads": 2, "dim_dynamic": 8,
            "dim_feedforward": 64}},
        "decoder": {"class_path": "models.context_decoder.ContextRefinementDecoder", "init_args": {
            "num_classes": 2, "encoder_dim": 32, "embed_dim": 32, "depth": 1, "num_heads": 2,
            "head_hidden_dim": 32, "pretrain_grid": [2, 3, 3]}},
        "pyramid": {"class_path": "models.query_localiser.SimpleFeaturePyramid", "init_args": {
            "in_channels": 32, "out_channels": 32}},
    }  # fmt: skip
    args = [
        "--config", str(REPO / "recipes" / recipe), f"--data.init_args.root={root}",
        "--data.init_args.num_workers=0", "--data.init_args.num_frames=4", "--data.init_args.train_short_side=[48, 48]",
        "--data.init_args.eval_short_side=48", "--trainer.accelerator=cpu", "--trainer.devices=1",
        "--trainer.strategy=auto", "--trainer.max_epochs=1", "--trainer.check_val_every_n_epoch=1",
        f"--trainer.default_root_dir={tmp_path / 'runs'}", "--trainer.logger=lightning_modules.runs.RunCSVLogger",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", "--trainer.callbacks=[]",
        f"{d}.init_args.activation_checkpointing=false", f"{d}={json.dumps({'init_args': tiny_parts})}",
        "--model.init_args.pretrained=null",
    ]  # fmt: skip
    main(["fit", *args, "--run_id=fit"])
    ckpt = tmp_path / "runs" / "fit" / "checkpoints" / "last.ckpt"
    tested = main(["test", *args, "--run_id=fit", f"--ckpt_path={ckpt}"])
    # below the person threshold every proposal is kept, so each evaluated frame has detections in the CSV
    with (tmp_path / "runs" / "fit" / "detections_test.csv").open() as f:
        frames = {(row[0], int(row[1])) for row in csv.reader(f)}
    test_videos = truth["test_videos"][0]  # split 1
    assert {video for video, _ in frames} == set(test_videos)
    assert len(frames) == sum(NFRAMES[v] for v in test_videos)
    logged = {k: float(v) for k, v in tested.trainer.callback_metrics.items() if k.startswith("test/")}
    assert {"test/frame_mAP@0.5", "test/video_mAP@0.5", "test/video_mAP@0.5:0.95"} <= set(logged)
    assert all(0.0 <= v <= 1.0 for k, v in logged.items() if "mAP" in k), logged

    own = make_video("my_clip.mp4", num_frames=12, fps=10)
    main(["predict", *args, "--run_id=own", f"--ckpt_path={ckpt}", f"--data.init_args.predict_videos=[{own}]"])
    with (tmp_path / "runs" / "own" / "detections_predict.csv").open() as f:
        frames = {(row[0], int(row[1])) for row in csv.reader(f)}
    assert frames == {("my_clip", k) for k in range(1, 13)}
