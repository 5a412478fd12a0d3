"""The classification task: optimiser groups, view averaging, and that it learns from real decoded clips."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from datamodules.classification import VideoClassificationDataModule
from lightning_modules.tasks.base import OptimizerSettings, ScheduleSettings, param_groups, warmup_cosine
from lightning_modules.tasks.classification import VideoClassifier
from models.vit import InflatedViT, VideoMAEViT


def tiny_classifier(num_classes: int = 8, **kwargs) -> VideoClassifier:
    backbone = VideoMAEViT(size=None, embed_dim=64, depth=2, num_heads=4, img_size=64, num_frames=8)
    return VideoClassifier(backbone, num_classes, **kwargs)


def test_no_weight_decay_on_norms_biases_and_positions():
    model = VideoClassifier(
        InflatedViT(size=None, embed_dim=32, depth=1, num_heads=2, img_size=32, num_frames=2), 3
    )
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {
        "backbone.pos_embed",
        "backbone.cls_token",
        "backbone.time_embed",
        "head.1.bias",
    } <= no_decay_names
    assert all(names[id(p)].endswith("weight") and p.ndim > 1 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_warmup_cosine_endpoints():
    assert warmup_cosine(0, 10, 100, 0.1, 0.01) == 0.1
    assert warmup_cosine(10, 10, 100, 0.1, 0.01) == 1.0
    assert math.isclose(warmup_cosine(55, 10, 100, 0.1, 0.0), 0.5)
    assert math.isclose(warmup_cosine(100, 10, 100, 0.1, 0.01), 0.01)


def test_view_averaging_equals_mean_of_per_view_softmax():
    torch.manual_seed(0)
    model = tiny_classifier().eval()
    video = torch.randn(2, 3, 3, 8, 64, 64)  # 2 videos x 3 views
    with torch.no_grad():
        got = model.video_scores(video)
        expected = torch.stack([model(video[:, v]).softmax(-1) for v in range(3)]).mean(0)
    assert torch.allclose(got, expected, atol=1e-6)


def test_learns_a_batch_of_decoded_synthetic_clips(synthetic_classification):
    """Gradient flow end to end: real decoded, transformed, normalised clips are fitted within a few steps."""
    torch.manual_seed(0)
    dm = VideoClassificationDataModule(
        root=str(synthetic_classification), num_frames=8, frame_stride=3, crop_size=64, train_short_side=(64, 64),
        flip=False, randaugment_ops=0, batch_size=8, num_workers=0,
    )  # fmt: skip
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    model = tiny_classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(60):
        loss = model.loss(model(batch["video"]), batch["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 1.5 and losses[-1] < 0.1
    assert (model(batch["video"]).argmax(-1) == batch["label"]).all()


def test_all_skipped_batch_gives_zero_loss_touching_every_parameter():
    model = tiny_classifier()
    loss = model.training_step({"batch_size": 0, "skipped": [("a.mp4", "corrupt", "x")]}, 0)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and p.grad.abs().max() == 0 for p in model.parameters())


def test_softmax_ce_multilabel_loss_and_scores():
    """``softmax_ce``: cross-entropy of the softmax against the multi-hot target normalised to sum 1, scored with
    softmax; ``bce``: per-class sigmoid BCE, scored with sigmoids."""
    torch.manual_seed(0)
    logits = torch.randn(3, 5)
    target = torch.tensor([[1, 0, 0, 1, 0], [0, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.float32)
    soft = tiny_classifier(5, multilabel=True, multilabel_loss="softmax_ce")
    by_hand = (
        sum(
            -sum(
                math.log(math.exp(logits[i, c]) / sum(math.exp(v) for v in logits[i]))
                for c in range(5)
                if target[i, c]
            )
            / target[i].sum().item()
            for i in range(3)
        )
        / 3
    )
    assert soft.loss(logits, target).item() == pytest.approx(by_hand, rel=1e-5)
    bce = tiny_classifier(5, multilabel=True)
    assert bce.loss(logits, target).item() == pytest.approx(
        torch.nn.BCEWithLogitsLoss()(logits, target).item(), rel=1e-6
    )
    video = torch.randn(2, 1, 3, 8, 64, 64)
    with torch.no_grad():
        assert torch.allclose(soft.video_scores(video).sum(-1), torch.ones(2), atol=1e-5)
        logits = bce(video[:, 0])
        assert torch.allclose(bce.video_scores(video), logits.sigmoid(), atol=1e-6)
    with pytest.raises(ValueError, match="multilabel_loss"):
        tiny_classifier(5, multilabel=True, multilabel_loss="softmax")


def test_per_epoch_schedule_is_haltingvt_official():
    """``schedule.interval: epoch`` with warmup 5 from 0.1 and a cosine ending at epoch 25 over 20 epochs gives the
    official schedule, which mmengine builds as LinearLR(0.1, 5 epochs) then CosineAnnealingLR(T_max=20,
    begin=5); PyTorch's own LinearLR + CosineAnnealingLR are the reference. The last epoch runs at 0.21x."""
    task = tiny_classifier(
        optimizer=OptimizerSettings(name="adam", lr=1e-5),
        schedule=ScheduleSettings(warmup_epochs=5, warmup_start_factor=0.1, min_lr_ratio=0.0, epochs=25, interval="epoch"),
    )
    task._trainer = SimpleNamespace(max_epochs=20, estimated_stepping_batches=20 * 7)
    config = task.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "epoch"
    ref_opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-5)
    ref = torch.optim.lr_scheduler.SequentialLR(
        ref_opt,
        [torch.optim.lr_scheduler.LinearLR(ref_opt, 0.1, 1.0, total_iters=5),
         torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=20, eta_min=0.0)],
        milestones=[5],
    )  # fmt: skip
    ours, theirs = [], []
    for _ in range(20):
        ours.append(opt.param_groups[0]["lr"])
        theirs.append(ref_opt.param_groups[0]["lr"])
        opt.step(), sched.step(), ref_opt.step(), ref.step()
    assert ours == pytest.approx(theirs, rel=1e-6)
    assert ours[-1] / 1e-5 == pytest.approx(0.206, abs=1e-3)
