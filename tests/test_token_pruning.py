"""Keyframe-centric token pruning against slow explicit references: full softmax maps, per-sample loops, indexing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.layers import Attention, Block, key_importance
from models.token_pruning import (
    KeyframeTokenPruning,
    default_prune_layers,
    keyframe_pruning_hooks,
    keyframe_tokens,
)
from models.vit import VideoMAEViT


def tiny_vit(depth: int = 4, img_size: int = 64, embed_dim: int = 32, num_heads: int = 2) -> VideoMAEViT:
    torch.manual_seed(0)
    vit = VideoMAEViT(
        size=None, embed_dim=embed_dim, depth=depth, num_heads=num_heads, img_size=img_size, num_frames=8
    )
    for name, p in vit.named_parameters():  # non-zero biases so that every term of the block matters
        if name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.1)
    return vit.eval()


def explicit_qkv(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v per head, (H, N, d) each, for one sample ``x`` (N, C), from the weights directly."""
    bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
    qkv = x @ attn.qkv.weight.T + bias  # (N, 3C)
    n, c = x.shape
    q, k, v = qkv.view(n, 3, attn.num_heads, c // attn.num_heads).permute(1, 2, 0, 3)
    return q, k, v


def explicit_importance(maps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The EVAD definition from full maps (H, N, N): weighted rows, mean over all N queries, then over heads."""
    per_head = [(weights[:, None] * maps[h]).mean(dim=0) for h in range(maps.shape[0])]
    return torch.stack(per_head).mean(dim=0)


@pytest.mark.parametrize("chunk", [1, 7, 16, 37, 1000, None])
def test_chunked_importance_equals_full_softmax_definition(chunk, monkeypatch):
    if chunk is None:  # sized by the memory budget: 2 samples x 3 heads x 37 keys x 5 queries per chunk
        monkeypatch.setattr("models.layers.importance_chunk_elements", lambda device: 2 * 3 * 37 * 5 + 1)
    torch.manual_seed(1)
    attn = Attention(24, 3, "qv").eval()
    torch.nn.init.normal_(attn.q_bias)
    torch.nn.init.normal_(attn.v_bias)
    x = torch.randn(2, 37, 24)
    weights = torch.ones(2, 37)
    weights[0, 10:19] = 4.0  # keyframe rows, at a different place in each sample
    weights[1, 20:29] = 2.5
    with torch.no_grad():
        out, importance = attn(x, query_weights=weights, importance_chunk=chunk)
        fused, _ = attn(x)
        for b in range(2):
            q, k, _ = explicit_qkv(attn, x[b])
            maps = torch.stack([(q[h] @ k[h].T * attn.scale).softmax(-1) for h in range(3)])
            expected = explicit_importance(maps, weights[b])
            assert torch.allclose(importance[b], expected, atol=1e-6, rtol=0)
    assert torch.equal(out, fused)  # the block output is still the fused one
    assert importance.shape == (2, 37) and not importance.requires_grad


def test_chunked_importance_with_a_key_mask():
    torch.manual_seed(2)
    q, k = torch.randn(2, 2, 11, 8), torch.randn(2, 2, 11, 8)
    mask = torch.ones(2, 1, 1, 11, dtype=torch.bool)
    mask[1, ..., 6:] = False
    weights = torch.rand(2, 11) + 0.5
    got = key_importance(q, k, 0.3, weights, mask, chunk_size=4)
    for b in range(2):
        logits = q[b] @ k[b].transpose(-2, -1) * 0.3
        logits[..., ~mask[b, 0, 0]] = float("-inf")
        assert torch.allclose(got[b], explicit_importance(logits.softmax(-1), weights[b]), atol=1e-6, rtol=0)
    assert got[1, 6:].abs().max() == 0


def reference_forward(
    vit: VideoMAEViT, video: torch.Tensor, layers: set[int], rate: float, weight: float
) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """One sample at a time, explicit attention maps and explicit indexing: features (B, n, C), kept per layer."""
    t, h, w = vit.token_grid(video.shape)
    s = h * w
    start = (t // 2) * s
    tokens = vit.embed(video)
    outs, kept = [], []
    for b in range(video.shape[0]):
        x, positions, kept_b = tokens[b], torch.arange(t * h * w), []
        for i, block in enumerate(vit.blocks):
            q, k, v = explicit_qkv(block.attn, block.norm1(x))
            maps = torch.stack([(q[j] @ k[j].T * block.attn.scale).softmax(-1) for j in range(len(q))])
            y = torch.cat([maps[j] @ v[j] for j in range(len(q))], dim=-1)  # heads side by side
            x = x + block.attn.proj(y)
            if i in layers:
                keyframe = (positions >= start) & (positions < start + s)
                query_weights = torch.where(keyframe, weight, 1.0)
                importance = explicit_importance(maps.detach(), query_weights)
                others = (~keyframe).nonzero()[:, 0]
                count = math.ceil(rate * len(positions)) - s
                best = others[importance[others].topk(count).indices]
                local = torch.cat([keyframe.nonzero()[:, 0], best]).sort().values
                x, positions = x[local], positions[local]
                kept_b.append(positions)
            x = x + block.mlp(block.norm2(x))
        outs.append(x)
        kept.append(kept_b)
    return torch.stack(outs), kept


@pytest.mark.parametrize("weight", [1.0, 4.0])
def test_kept_tokens_and_features_match_the_explicit_reference(weight):
    vit = tiny_vit()
    torch.manual_seed(3)
    video = torch.randn(3, 3, 8, 64, 64)  # grid (4, 4, 4): 64 tokens, keyframe slice 2 = positions 32..47
    grid = vit.token_grid(video.shape)
    hooks = keyframe_pruning_hooks(vit, grid, prune_layers=[1, 2], keep_rate=0.7, keyframe_weight=weight)
    with torch.no_grad():
        out = vit.forward_features(video, hooks)
        expected, kept = reference_forward(vit, video, {1, 2}, 0.7, weight)
    assert out.shape == (3, 32, 32)  # 64 -> ceil(44.8) = 45 -> ceil(31.5) = 32
    for b in range(3):
        assert torch.equal(hooks[1].kept[b], kept[b][0]) and torch.equal(hooks[2].kept[b], kept[b][1])
    assert torch.equal(hooks.kept, hooks[2].kept) and torch.equal(hooks.kept_after(0)[0], torch.arange(64))
    assert torch.allclose(out, expected, atol=1e-5)
    # the keyframe tokens are always kept and can be read back out of the pruned sequence
    for b in range(3):
        assert set(range(32, 48)) <= set(hooks.kept[b].tolist())
        at = [hooks.kept[b].tolist().index(p) for p in range(32, 48)]
        assert torch.equal(keyframe_tokens(out, hooks.kept, grid)[b], out[b, at])


def test_pruned_training_step_has_the_reference_gradients():
    vit = tiny_vit().train()  # no drop path: training is deterministic
    torch.manual_seed(4)
    video = torch.randn(2, 3, 8, 64, 64)
    hooks = keyframe_pruning_hooks(
        vit, vit.token_grid(video.shape), [1, 2], keep_rate=0.6, keyframe_weight=2.0
    )
    vit.pool(vit.forward_features(video, hooks)).square().sum().backward()
    grads = {name: p.grad.clone() for name, p in vit.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    vit.zero_grad()
    features, kept = reference_forward(vit, video, {1, 2}, 0.6, 2.0)
    assert all(torch.equal(hooks.kept[b], kept[b][1]) for b in range(2))
    vit.pool(features).square().sum().backward()
    for name, p in vit.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-5, rtol=1e-4), name


def test_token_counts_of_evad_at_224():
    # 16 x 224 x 224 at tubelet 2 x 16 x 16: 8 x 14 x 14 = 1568 tokens, S = 196 keyframe tokens
    vit = tiny_vit(depth=10, img_size=224, embed_dim=8, num_heads=1)
    video = torch.randn(1, 3, 16, 224, 224)
    hooks = keyframe_pruning_hooks(vit, vit.token_grid(video.shape), [3, 6, 9], keep_rate=0.7)
    with torch.no_grad():
        out = vit.forward_features(video, hooks)
    assert [hooks[i].kept.shape[1] for i in (3, 6, 9)] == [1098, 769, 539] and out.shape[1] == 539
    kept = hooks.kept[0]
    assert torch.all(kept[1:] > kept[:-1]) and set(range(4 * 196, 5 * 196)) <= set(kept.tolist())


def test_default_layers_are_evads():
    base_depth = VideoMAEViT(size=None, embed_dim=8, depth=12, num_heads=1)
    assert list(keyframe_pruning_hooks(base_depth, (8, 2, 2))) == [3, 6, 9]
    assert default_prune_layers(24) == (6, 12, 18)
    hook = KeyframeTokenPruning(0.7, grid=(8, 14, 14))
    assert hook.keyframe_span == (4 * 196, 5 * 196) and hook.num_kept(200) == 196  # never below the keyframe


def direct_block(block: Block, x: torch.Tensor, explicit: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The block written out by hand, fused or explicit softmax, as it computed before key importance existed."""
    attn = block.attn
    heads = attn.num_heads
    qkv = attn.qkv(block.norm1(x)) + torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
    b, n, _ = qkv.shape
    q, k, v = qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    maps = None
    if explicit:
        maps = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        y = maps @ v
    else:
        y = F.scaled_dot_product_attention(q, k, v)
    x = x + attn.proj(y.transpose(1, 2).reshape(b, n, -1))
    return x + block.mlp(block.norm2(x)), maps


@pytest.mark.parametrize("grad", [False, True])
def test_blocks_without_importance_requests_are_unchanged(grad):
    class Record:
        needs_attention = True

        def __call__(self, x, attn):
            self.attn = attn
            return x

    torch.manual_seed(5)
    block = Block(32, 4).eval()
    torch.nn.init.normal_(block.attn.q_bias)
    torch.nn.init.normal_(block.attn.v_bias)
    x = torch.randn(2, 20, 32)
    hook = Record()
    with torch.set_grad_enabled(grad):
        plain, map_hooked = block(x), block(x, hook=hook)
        expected_plain, _ = direct_block(block, x, explicit=False)
        expected_hooked, maps = direct_block(block, x, explicit=True)
    assert torch.equal(plain, expected_plain) and torch.equal(map_hooked, expected_hooked)
    assert torch.equal(hook.attn, maps)


def test_keep_rate_one_is_the_unpruned_model_and_changes_at_eval_time():
    vit = tiny_vit()
    video = torch.randn(2, 3, 8, 64, 64)
    hooks = keyframe_pruning_hooks(vit, vit.token_grid(video.shape), [1, 2], keep_rate=1.0)
    with torch.no_grad():
        dense = vit.forward_features(video)
        assert torch.equal(vit.forward_features(video, hooks), dense)
        assert torch.equal(hooks.kept, torch.arange(64).expand(2, -1))
        assert hooks[1].query_weights(dense) is None  # nothing asked of the attention
        hooks.keep_rate = 0.5
        assert vit.forward_features(video, hooks).shape[1] == 16  # 64 -> 32 -> max(16, 16)
        hooks.keep_rate = 1.0
        assert torch.equal(vit.forward_features(video, hooks), dense)


def test_mismatched_grid_is_named():
    vit = tiny_vit()
    hooks = keyframe_pruning_hooks(vit, (4, 2, 2), [1])
    with pytest.raises(ValueError, match="model.token_grid"):
        vit.forward_features(torch.randn(1, 3, 8, 64, 64), hooks)
