"""HaltingVT's model: Glimpser against DeiT, masked training vs token removal, FLOPs accounting."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models.checkpoint import load_pretrained
from models.haltingvt import HaltingOutput, HaltingViT


def tiny(**kwargs) -> HaltingViT:
    torch.manual_seed(0)
    kwargs.setdefault("glimpser_init", "torch_default")  # the halting spreads below were found with it
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


def test_glimpser_blocks_are_initialised_as_the_joint_blocks():
    """From scratch, every block's Linear weights are truncated normal 0.02 with zero biases (the temporal
    branch's output projection zero), as the official model; ``torch_default`` keeps PyTorch's larger init."""
    torch.manual_seed(0)
    model = HaltingViT(size=None, embed_dim=192, depth=4, num_heads=3, img_size=64, num_frames=4)
    for i, block in enumerate(model.blocks):
        for name, m in block.named_modules():
            if not isinstance(m, torch.nn.Linear):
                continue
            if name == "temporal_fc":
                assert not m.weight.any() and not m.bias.any()
                continue
            assert abs(m.weight.std().item() - 0.02) < 0.002, (i, name, m.weight.std().item())
            assert m.weight.abs().mean().item() < 0.02 and not m.bias.any(), (i, name)
    torch.manual_seed(0)
    default = HaltingViT(
        size=None,
        embed_dim=192,
        depth=4,
        num_heads=3,
        img_size=64,
        num_frames=4,
        glimpser_init="torch_default",
    )
    bound = 1 / math.sqrt(192)  # kaiming-uniform(a=sqrt(5)) bound of a 192-input Linear
    qkv = default.blocks[0].attn.qkv.weight
    assert abs(qkv.abs().max().item() - bound) < 0.01 * bound
    assert abs(default.blocks[2].attn.qkv.weight.std().item() - 0.02) < 0.002  # joint blocks as before
    with pytest.raises(ValueError, match="glimpser_init"):
        HaltingViT(size=None, embed_dim=24, depth=3, num_heads=2, glimpser_init="xavier")


def test_early_exit_stops_a_sample_at_its_class_token_halt():
    """Early exit: the features are those of the full pass, and the tokens computed per layer are those of the
    masked reference up to the layer where the sample's class token halts (and none after)."""
    model = tiny(glimpse_ratio=0.5, halt_scale=10.0, halt_center=1.0)
    with torch.no_grad():  # a class token near its halting threshold, clips of different contrast:
        model.cls_token[..., 0] = 0.5  # class tokens halt early, at different layers
    torch.manual_seed(1)
    video = torch.randn(6, 3, 4, 64, 64) * torch.linspace(0.1, 4, 6)[:, None, None, None, None]
    with torch.no_grad():
        masked = model.forward_masked(video)
        full = model.forward_compact(video)
        early = model.forward_compact(video, early_exit=True)
    layers = len(model.joint_blocks)
    cls_depth = masked.depth[:, 0]
    assert (cls_depth < layers).any() and len(set(cls_depth.tolist())) > 1, "the test needs early class halts"
    # Reference: token j is computed at layer l while it is active (depth > l) and its sample has not exited.
    runs = masked.depth[:, :, None] > torch.arange(layers)  # (B, N, L)
    expected = (runs & (torch.arange(layers) < cls_depth[:, None, None])).sum(1)
    assert torch.equal(early.active, expected)
    assert torch.equal(early.exit_depth, cls_depth) and torch.equal(full.exit_depth, cls_depth)
    assert torch.equal(full.early_exit_active(), expected)
    assert (early.active.sum() < full.active.sum()).item(), "early exit must skip tokens here"
    assert (early.feature - full.feature).abs().max() <= 1e-5
    grid = model.token_grid(video.shape)
    assert (model.macs(early.active, grid) < model.macs(full.active, grid)).any()
    with pytest.raises(ValueError, match="early_exit"):
        model.forward_compact(video, losses=True, early_exit=True)


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


def test_inference_residual_stream_keeps_its_dtype_under_bf16_autocast():
    """The in-place residual adds of inference (no grad) and the out-of-place ones (grad enabled) give the same
    fp32 stream under bf16 autocast, so halting decided at inference is the halting of the same numbers."""
    model = tiny(glimpse_ratio=0.5, halt_scale=10.0, halt_center=-2.0)
    video = torch.randn(3, 3, 4, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            inplace = model.forward_compact(video)
            x = model.glimpse(video)
            block_inplace = model.blocks[-1](x)
        with torch.enable_grad():
            reference = model.forward_compact(video)
            block_reference = model.blocks[-1](x)
    assert block_inplace.dtype == block_reference.dtype == torch.float32
    assert torch.equal(block_inplace, block_reference)
    assert torch.equal(inplace.active, reference.active)
    assert torch.equal(inplace.feature, reference.feature.detach())


def test_prior_halting_scores_follow_avit():
    """A-ViT's per-layer score for the prior: the sigmoid score of every token after each joint layer, the last
    one too (before its forced h = 1), averaged over all tokens. With no token halting early it is the dense
    forward's mean score, computed here directly."""
    model = tiny(glimpse_ratio=0.5, halt_scale=1.0, halt_center=12.0)
    video = torch.randn(2, 3, 4, 64, 64)
    with torch.no_grad():
        out = model.forward_masked(video)
        x = model.glimpse(video)
        expected = []
        for block in model.joint_blocks:
            x = block(x)
            expected.append(torch.sigmoid(1.0 * x[..., 0] - 12.0).mean())
    assert (out.active == out.active[:, :1]).all(), "the reference needs every token to reach the last layer"
    assert torch.allclose(out.halting, torch.stack(expected), rtol=1e-5, atol=1e-7)


def test_prior_scores_when_every_token_halts_at_the_first_layer():
    model = tiny(glimpse_ratio=0.5, halt_scale=1.0, halt_center=-1e4)
    with torch.no_grad():
        out = model.forward_masked(torch.randn(2, 3, 4, 64, 64))
    assert (out.active[:, 1:] == 0).all()
    assert torch.equal(out.halting, torch.tensor([1.0] + [0.0] * (len(model.joint_blocks) - 1)))


def test_compacted_training_step_has_the_masked_steps_loss_and_gradients():
    """Training with halted tokens removed (packed, with autograd) against the masked reference: same loss
    (classification + ponder + prior terms) and the same gradient on every parameter, with stochastic depth on,
    many halts and per-sample token counts that differ."""
    model = tiny(glimpse_ratio=0.5, halt_scale=10.0, halt_center=-2.0).train()
    head = torch.nn.Linear(model.embed_dim, 5)
    video, label = torch.randn(4, 3, 4, 64, 64), torch.tensor([0, 3, 1, 4])
    prior = torch.softmax(torch.randn(len(model.joint_blocks)), 0)

    def step(path: str) -> tuple[Tensor, dict[str, Tensor], HaltingOutput]:
        model.zero_grad(), head.zero_grad()
        torch.manual_seed(7)  # the same stochastic-depth draws on both paths
        out = model.forward_masked(video) if path == "masked" else model.forward_compact(video, losses=True)
        q = out.halting / out.halting.sum()
        loss = (
            F.cross_entropy(head(out.feature), label)
            + 0.05 * out.ponder.mean()
            + 0.1 * F.kl_div(q.clamp(0.01, 0.99).log(), prior, reduction="sum")
        )
        loss.backward()
        # A block that every token halted before gets no gradient on the compacted path (None) and zeros on the
        # masked one: the same thing.
        grads = {
            n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for n, p in [*model.named_parameters(), *head.named_parameters()]
        }
        return loss.detach(), grads, out

    loss_m, grads_m, masked = step("masked")
    loss_c, grads_c, compact = step("compact")
    assert (masked.active[:, -1] < masked.active[:, 0] / 4).all(), "the test needs many halted tokens"
    assert len(set(masked.active[:, 1].tolist())) > 1, "and samples that differ in how many"
    assert torch.equal(masked.active, compact.active) and torch.equal(masked.depth, compact.depth)
    assert (masked.ponder - compact.ponder).abs().max() <= 1e-5
    assert (loss_m - loss_c).abs() <= 1e-5
    assert grads_m.keys() == grads_c.keys()
    worst = max((grads_m[n] - grads_c[n]).abs().max().item() for n in grads_m)
    print(
        f"compacted vs masked: loss diff {(loss_m - loss_c).abs().item():.2e}, worst gradient diff {worst:.2e}"
    )
    assert worst <= 1e-5, worst
    # Gradients reach the embedding, the Glimpser and the first joint block (later ones may see none: their
    # tokens' outputs reach the loss only while the class token runs).
    early = [
        n for n in grads_m if n.startswith(("patch_embed", "blocks.0.", "blocks.1.", "blocks.2.", "head."))
    ]
    zero = [n for n in early if not grads_m[n].abs().sum() and "temporal_fc" not in n]
    assert len(early) > 30 and not zero, zero
