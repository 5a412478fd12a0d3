"""The classification task: optimiser groups, view averaging, and that it learns from real decoded clips."""

from __future__ import annotations

import math

import torch

from datamodules.classification import VideoClassificationDataModule
from lightning_modules.base import param_groups, warmup_cosine
from lightning_modules.classification import VideoClassifier
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
        root=str(synthetic_classification), num_frames=8, frame_interval=3, crop_size=64, train_short_side=(64, 64),
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
