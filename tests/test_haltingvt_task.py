"""HaltingVT task: static-clip pairing, the loss terms, GFLOPs logging, and training through the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from datamodules.classification import VideoClassificationDataModule
from lightning_modules.cli import main
from lightning_modules.pictures.tradeoff import plot_accuracy_vs_macs, read_run_result
from lightning_modules.tasks.haltingvt import HaltingVTClassifier, depth_prior, prior_kl
from models.haltingvt import HaltingViT
from tests.quick import quick_overrides

REPO = Path(__file__).resolve().parents[1]


def tiny_task(**kwargs) -> HaltingVTClassifier:
    torch.manual_seed(0)
    backbone = HaltingViT(
        size=None,
        embed_dim=32,
        depth=4,
        num_heads=2,
        img_size=64,
        num_frames=4,
        glimpse_ratio=0.5,
        glimpser_init="torch_default",  # the halting these tests need was found with it
    )
    return HaltingVTClassifier(backbone, 8, **kwargs)


def test_depth_prior_is_a_normalised_gaussian():
    prior = depth_prior(10, mean=6.0, std=1.0)
    assert torch.isclose(prior.sum(), torch.tensor(1.0)) and prior.argmax() == 6
    assert torch.isclose(prior[5], prior[7]) and prior[5] / prior[6] == torch.exp(torch.tensor(-0.5))


def test_static_clips_repeat_one_frame(synthetic_classification):
    dm = VideoClassificationDataModule(
        root=str(synthetic_classification), num_frames=4, frame_stride=4, crop_size=64, train_short_side=(80, 80),
        flip=False, randaugment_ops=0, batch_size=4, num_workers=0, static_clips=True,
    )  # fmt: skip
    batch = next(iter(dm.train_dataloader()))
    static, video = batch["static"], batch["video"]
    assert static.shape == video.shape == (4, 3, 4, 64, 64)
    assert (static == static[:, :, :1]).all()  # no motion: every frame equals the first
    assert not (video == video[:, :, :1]).all()  # the real clip moves (or rotates)


def paired_batch(video: torch.Tensor) -> dict:
    """Two clips, each paired with a static clip of its first frame."""
    return {
        "video": video,
        "static": video[:, :, :1].expand_as(video),
        "label": torch.tensor([1, 2]),
        "batch_size": 2,
    }


def capture_logs(task: HaltingVTClassifier) -> dict[str, float]:
    """What the task logs, as floats, without a trainer."""
    logged: dict[str, float] = {}
    task.log = lambda name, value, **kw: logged.__setitem__(name, float(value))  # type: ignore[method-assign]
    task.log_dict = lambda d, **kw: logged.update({k: float(v) for k, v in d.items()})  # type: ignore[method-assign]
    return logged


def test_training_loss_has_all_terms_and_gradients():
    task = tiny_task(prior_weight=1e-3, motion_weight=1.0)
    batch = paired_batch(torch.randn(2, 3, 4, 64, 64))
    logged = capture_logs(task)
    task.train()
    loss = task.training_step(batch, 0)
    loss.backward()
    assert {"train/loss_cls", "train/ponder", "train/prior_kl", "train/loss_motion"} <= set(logged)
    expected = logged["train/loss_cls"] + 5e-4 * logged["train/ponder"] + 1e-3 * logged["train/prior_kl"]
    assert abs(loss.item() - expected - logged["train/loss_motion"]) < 1e-5
    assert (
        task.motion_head.weight.grad is not None
        and task.backbone.blocks[0].temporal_fc.weight.grad is not None
    )


def test_static_label_weight_weighs_the_static_clips_classification():
    task = tiny_task(motion_weight=1.0, static_label_weight=0.25).eval()  # eval: no drop-path noise
    video = torch.randn(2, 3, 4, 64, 64)
    static = video[:, :, :1].expand_as(video)
    label = torch.tensor([3, 5])
    logged = {}
    task.log = lambda name, value, **kw: None  # type: ignore[method-assign]
    task.log_dict = lambda d, **kw: logged.update({k: float(v) for k, v in d.items()})  # type: ignore[method-assign]
    with torch.no_grad():
        task.training_step({"video": video, "static": static, "label": label, "batch_size": 2}, 0)
        logits = task.head(task.backbone.forward_masked(torch.cat([video, static])).feature)
        real = torch.nn.functional.cross_entropy(logits[:2], label)
        still = torch.nn.functional.cross_entropy(logits[2:], label)
    assert abs(logged["train/loss_cls"] - (real + 0.25 * still).item() / 1.25) < 1e-5


def test_fit_and_validate_through_cli_logs_gmacs(tmp_path, synthetic_classification):
    recipe = REPO / "recipes" / "quickstart" / "synthetic_haltingvt.yaml"
    args = [
        "--config", str(recipe), *quick_overrides(tmp_path, synthetic_classification),
        "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2", "--trainer.max_epochs=1", "--trainer.check_val_every_n_epoch=1",
    ]  # fmt: skip
    motion = [
        "--model.init_args.motion_weight=1.0", "--model.init_args.static_label_weight=0",
        "--data.init_args.static_clips=true", "--trainer.log_every_n_steps=1",
    ]  # fmt: skip
    cli = main(["fit", *args, *motion])
    metrics = cli.trainer.callback_metrics
    assert {"val/top1", "val/gmacs", "train/ponder", "train/loss_motion"} <= set(metrics)
    backbone = cli.model.backbone
    t, h, w = backbone.token_grid((8, 64, 64))
    kept = 1 + t * math.ceil(backbone.glimpse_ratio * h * w)
    tokens = torch.full((1, len(backbone.joint_blocks)), kept)  # nothing halted before the last layer
    dense = (backbone.macs(tokens, (t, h, w)).item() + backbone.embed_dim * cli.model.num_classes) / 1e9
    assert 0 < metrics["val/gmacs"] <= dense * (1 + 1e-6)  # halting never costs more than no halting
    assert 0 < metrics["val/gmacs_early_exit"] <= metrics["val/gmacs"]

    # Validating with early exit: the same scores; what ran is the figure the full pass derived for it.
    (ckpt,) = tmp_path.rglob("last.ckpt")
    validate_args = [a for a in args if not any(k in a for k in ("limit_train", "max_epochs"))]
    early = main(["validate", *validate_args, f"--ckpt_path={ckpt}", "--model.init_args.early_exit=true"])
    exited = early.trainer.callback_metrics
    assert "val/gmacs" not in exited  # the paper's count needs the tokens early exit skips
    assert float(exited["val/top1"]) == float(metrics["val/top1"])
    assert abs(float(exited["val/loss"]) - float(metrics["val/loss"])) < 1e-5
    assert abs(float(exited["val/gmacs_early_exit"]) - float(metrics["val/gmacs_early_exit"])) < 1e-9

    # The validation results as the trade-off plot reads them back from the CSV log.
    result = read_run_result(tmp_path)
    assert (
        result.accuracy == float(metrics["val/top1"])
        and abs(result.gmacs - float(metrics["val/gmacs"])) < 1e-6
    )
    png = plot_accuracy_vs_macs([result], tmp_path / "tradeoff.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Halting maps of two given (unlabelled) videos through predict.
    videos = ["videos/left_0001.mp4", "videos/rotate_0000.mp4"]
    predict_args = [a for a in args if not any(k in a for k in ("limit_", "max_epochs", "logger"))]
    main([
        "predict", *predict_args, f"--ckpt_path={ckpt}", f"--data.init_args.predict_videos={videos}",
        "--trainer.logger=lightning_modules.loggers.AutoWandbLogger",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'wandb'}",
        "--trainer.callbacks+=lightning_modules.pictures.halting.HaltingMapWriter",
        f"--trainer.callbacks.out_dir={tmp_path / 'maps'}",
    ])  # fmt: skip
    pictures = sorted(p.name for p in (tmp_path / "maps").glob("*.png"))
    assert pictures == ["left_0001_halting.png", "rotate_0000_halting.png"]
    logged = list(tmp_path.rglob("wandb/**/media/images/predict/halting_map*.png"))
    assert len(logged) == 2  # the same pictures, in the (offline) W&B run


def test_two_process_ddp_fit_without_the_motion_loss(tmp_path, synthetic_classification):
    """DDP needs every parameter in the loss: with the motion loss off there is no motion head to leave unused;
    evaluation counts each video once and sums GFLOPs over both ranks."""
    recipe = REPO / "recipes" / "quickstart" / "synthetic_haltingvt.yaml"
    args = [
        "--config", str(recipe), *quick_overrides(tmp_path, synthetic_classification, batch_size=2),
        "--trainer.limit_train_batches=2",
        "--trainer.max_epochs=1", "--trainer.check_val_every_n_epoch=1", "--trainer.accelerator=cpu",
        "--trainer.devices=2", "--trainer.strategy=ddp_fork",
    ]  # fmt: skip
    # The ranks are forks of this process: spawned ones would each import torch and Lightning afresh.
    cli = main(["fit", *args])
    metrics = cli.trainer.callback_metrics
    assert cli.model.motion_head is None
    assert metrics["val/num_samples"] == 8  # the 8 validation videos, each once, though split over 2 ranks
    assert float(metrics["val/gmacs"]) > 0


def test_prior_kl_is_avits_and_finite_when_every_score_is_zero():
    prior = depth_prior(4, mean=2.0, std=1.0)
    scores = torch.tensor([0.3, 0.05, 0.0, 0.6])
    q = (scores / scores.sum()).clamp(0.01, 0.99)
    avit = torch.nn.KLDivLoss(reduction="batchmean")(q.log(), prior)  # A-ViT's call on the (L,) vector
    assert prior_kl(scores, prior).item() == pytest.approx(avit.item(), rel=1e-6)
    zeros = torch.zeros(4, requires_grad=True)
    loss = prior_kl(zeros, prior)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zeros.grad).all()


def test_training_paths_give_the_same_step():
    """``training_path`` compact (halted tokens removed) and masked: the same loss terms and gradients on a
    batch with static clips, the motion loss and the prior."""
    batch = paired_batch(torch.randn(2, 3, 4, 64, 64))
    results = {}
    for path in ("masked", "compact"):
        task = tiny_task(prior_weight=1e-3, motion_weight=1.0, ponder_weight=0.05, training_path=path).train()
        logged = capture_logs(task)
        torch.manual_seed(3)
        task.training_step(batch, 0).backward()
        results[path] = logged, {n: p.grad for n, p in task.named_parameters() if p.grad is not None}
    (logged_m, grads_m), (logged_c, grads_c) = results["masked"], results["compact"]
    assert logged_m.keys() == logged_c.keys()
    for key in logged_m:
        assert logged_c[key] == pytest.approx(logged_m[key], abs=1e-5), key
    assert grads_m.keys() == grads_c.keys()
    assert max((grads_m[n] - grads_c[n]).abs().max().item() for n in grads_m) <= 1e-5
