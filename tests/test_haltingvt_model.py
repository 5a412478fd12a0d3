"""HaltingVT's model: Glimpser against DeiT, masked training vs token removal, FLOPs accounting."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models.checkpoint import load_pretrained
from models.haltingvt import HaltingViT


def tiny(**kwargs) -> HaltingViT:
    torch.manual_seed(0)
    model = HaltingViT(
        size=None, embed_dim=64, depth=6, num_heads=4, img_size=64, num_frames=4, **kwargs
    ).eval()
    with torch.no_grad():  # non-trivial biases and norms, and live temporal branches
        for name, p in model.named_parameters():
            if p.ndim == 1 or "temporal_fc" in name:
                p.normal_(std=0.3)
    return model


@pytest.mark.parametrize("tubelet", [1, 2])
def test_glimpser_without_selection_on_one_frame_is_deit(tmp_path, tubelet):
    """One frame (or one 2-frame tubelet of a still image), no selection, halting only at the last block: the
    model is DeiT-S, whatever the weights."""
    deit = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    torch.save(deit.state_dict(), tmp_path / "deit_s.pth")
    model = HaltingViT(
        size="small", num_frames=tubelet, glimpse_ratio=1.0, halt_center=1e4, drop_path_rate=0.0,
        tubelet_size=tubelet,
    ).eval()  # fmt: skip
    report = load_pretrained(model, tmp_path / "deit_s.pth")
    assert sorted(report.missing) == ["blocks.0.temporal_fc.bias", "blocks.0.temporal_fc.weight",
                                      "blocks.1.temporal_fc.bias", "blocks.1.temporal_fc.weight", "time_embed"]  # fmt: skip
    assert torch.equal(model.blocks[1].temporal_attn.qkv.weight, model.blocks[1].attn.qkv.weight)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = deit.forward_features(images)[:, 0]
        clip = images[:, :, None].expand(-1, -1, tubelet, -1, -1)
        masked = model.forward_masked(clip).feature
        compact = model.forward_compact(clip).feature
    assert (masked - expected).abs().max() <= 1e-4
    assert (compact - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("ratio,kept", [(0.3, 472), (0.5, 784), (0.7, 1104)])
def test_glimpser_token_counts_at_8x224(ratio, kept):
    """The paper's joint-stage token counts for 8 frames at 224: 472 / 784 / 1104 patch tokens."""
    model = HaltingViT(
        size=None, embed_dim=24, depth=3, num_heads=2, num_frames=8, glimpse_ratio=ratio
    ).eval()
    with torch.no_grad():
        x = model.glimpse(torch.randn(1, 3, 8, 224, 224))
    assert x.shape[1] == 1 + kept


def test_masked_training_and_token_removal_agree_with_many_halts():
    model = tiny(glimpse_ratio=0.5, halt_scale=10.0, halt_center=-2.0)
    video = torch.randn(4, 3, 4, 64, 64)
    with torch.no_grad():
        masked = model.forward_masked(video)
        compact = model.forward_compact(video)
    n = masked.active[:, 0]
    assert (masked.active[:, -1] < n / 4).all(), "the test needs many halted tokens"
    assert len(set(masked.active[:, 1].tolist())) > 1, "and samples that differ in how many"
    assert torch.equal(masked.active, compact.active)
    assert (masked.feature - compact.feature).abs().max() <= 1e-4
    # Ponder: every token ran at least one joint layer, at most all of them (+ remainder <= 1).
    assert masked.ponder.min() >= 1.0 and masked.ponder.max() <= len(model.joint_blocks) + 1


def test_macs_match_flop_counter_on_actual_inference():
    model = tiny(glimpse_ratio=0.5, halt_scale=10.0, halt_center=-2.0)
    video = torch.randn(3, 3, 4, 64, 64)
    for i in range(3):
        # The math SDPA backend decomposes attention into matmuls the flop counter sees.
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            out = model.forward_compact(video[i : i + 1])
        counted = counter.get_total_flops() / 2  # the counter counts 2 per multiply-add
        ours = model.macs(out.active, model.token_grid(video.shape)).item()
        assert math.isclose(ours, counted, rel_tol=0.02), (ours, counted)


@pytest.mark.parametrize("ratio,gmacs", [(0.3, 17.6), (0.5, 26.5), (0.7, 37.2)])
def test_deit_small_8x224_budget_without_halting(ratio, gmacs):
    """Multiply-adds of HaltingVT-S at 8x224 when no token halts early, against the reference budget."""
    model = HaltingViT(size="small", num_frames=8, glimpse_ratio=ratio)
    tokens = 1 + 8 * math.ceil(ratio * 196)
    macs = model.macs(torch.full((1, len(model.joint_blocks)), tokens), (8, 14, 14)).item()
    assert macs / 1e9 == pytest.approx(gmacs, abs=0.05)


def test_halting_map_matches_removal_counts_and_class_attention_selection():
    """The picture's data: kept patches are the per-frame top-k of the class token's attention in the selecting
    block (read from a hook on that block's attention), and the active patches per layer match what token removal
    actually processed."""
    model = tiny(glimpse_ratio=0.5, halt_scale=10.0, halt_center=-2.0)
    video = torch.randn(3, 3, 4, 64, 64)
    seen = {}

    def grab(module, args, kwargs, output):
        seen["attn"] = output[1]

    handle = model.blocks[1].attn.register_forward_hook(grab, with_kwargs=True)
    with torch.no_grad():
        hmap, out = model.halting_map(video)
    handle.remove()
    t, h, w = hmap.grid
    k = math.ceil(0.5 * h * w)
    cls_attention = seen["attn"][:, :, 0, 1:].mean(1).view(3, t, h * w)
    for b in range(3):
        for f in range(t):
            top = set(cls_attention[b, f].topk(k).indices.tolist())
            assert set(hmap.kept[b, f].tolist()) == top
    assert (hmap.kept.diff(dim=2) > 0).all()  # ascending positions
    with torch.no_grad():
        compact = model.forward_compact(video)
    cls_depth = out.depth[:, 0]
    for layer in range(hmap.layers):
        patches = (hmap.depth > layer).flatten(1).sum(1)
        assert torch.equal(patches + (cls_depth > layer).long(), compact.active[:, layer])
    assert (hmap.depth >= 1).all() and (hmap.depth <= hmap.layers).all()
