"""EVAD's context refinement decoder against hand-worked boxes and pooling, per-element loops and a slow re-run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from models.context_decoder import ContextRefinementDecoder, extend_boxes, pool_actor_tokens
from models.layers import resize_grid_positions, sinusoid_table

GRID = (4, 4, 4)  # t, h, w: a 64x64 input at stride 16
ENCODER_DIM, DIM, CLASSES = 16, 8, 5


def tiny_decoder(**kwargs) -> ContextRefinementDecoder:
    torch.manual_seed(0)
    sizes = {"encoder_dim": ENCODER_DIM, "embed_dim": DIM, "depth": 2, "num_heads": 2, "head_hidden_dim": 12}
    decoder = ContextRefinementDecoder(**{"num_classes": CLASSES, "pretrain_grid": GRID, **sizes, **kwargs})
    for name, p in decoder.named_parameters():  # non-zero biases and norms so every term matters
        if name.endswith(("bias", "norm.weight")) or "norm1" in name or "norm2" in name:
            torch.nn.init.normal_(p, mean=float(name.endswith("weight")), std=0.1)
    return decoder


def pruned_inputs(batch: int = 2, keep: int = 40, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens and, per sample, ``keep`` ascending positions that include the keyframe slice (index 2)."""
    g = torch.Generator().manual_seed(seed)
    t, h, w = GRID
    keyframe = torch.arange(2 * h * w, 3 * h * w)
    others = torch.tensor([i for i in range(t * h * w) if not 2 * h * w <= i < 3 * h * w])
    kept = []
    for _ in range(batch):
        chosen = others[torch.randperm(len(others), generator=g)[: keep - h * w]]
        kept.append(torch.cat([keyframe, chosen]).sort().values)
    return torch.randn(batch, keep, ENCODER_DIM, generator=g), torch.stack(kept)


BOXES = torch.tensor(
    [[[8.0, 4.0, 40.0, 60.0], [20.0, 10.0, 30.0, 30.0]], [[0.0, 0.0, 64.0, 64.0], [30, 5, 60, 50]]]
)


def test_extend_boxes_by_hand():
    boxes = torch.tensor(
        [[[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 50.0, 10.0]], [[5.0, 5.0, 15.0, 15.0], [1, 2, 3, 4]]]
    )
    sizes = torch.tensor([[100, 50], [12, 14]])  # (height, width)
    out = extend_boxes(boxes, sizes, (0.4, 0.2))
    # sample 0: w 20, h 40 -> 4 px on each side; w 50, h 10 -> 10 px and 1 px, clipped to the 50-px width
    # sample 1: w 10, h 10 -> 2 px and 1 px, clipped to 14 x 12; w 2, h 2 -> 0.4 px and 0.2 px
    expected = torch.tensor(
        [[[6.0, 16.0, 34.0, 64.0], [0.0, 0.0, 50.0, 11.0]], [[3.0, 4.0, 14.0, 12.0], [0.6, 1.8, 3.4, 4.2]]]
    )
    torch.testing.assert_close(out, expected)
    # (0, 0) leaves inner boxes alone and only clips
    torch.testing.assert_close(extend_boxes(boxes, (100, 50), (0.0, 0.0)), boxes)
    clipped = extend_boxes(torch.tensor([[[-3.0, 2.0, 70.0, 90.0]]]), (64, 64), (0.0, 0.0))
    torch.testing.assert_close(clipped, torch.tensor([[[0.0, 2.0, 64.0, 64.0]]]))


def test_densify_places_kept_tokens_and_mask_token():
    decoder = tiny_decoder().eval()
    tokens, kept = pruned_inputs()
    with torch.no_grad():
        dense, context = decoder.densify(tokens, GRID, kept)
    positions = sinusoid_table(64, DIM)
    norm = decoder.norm
    projected = (
        F.layer_norm(tokens, (ENCODER_DIM,), norm.weight, norm.bias, norm.eps)
        @ decoder.encoder_to_decoder.weight.T
    )
    for b in range(2):
        held = {int(p): i for i, p in enumerate(kept[b])}
        for j in range(64):
            if j in held:
                want = projected[b, held[j]] + positions[j]
            else:
                want = decoder.mask_token[0, 0] + positions[j]
            torch.testing.assert_close(dense[b, j], want, rtol=1e-5, atol=1e-5)
        for i, j in enumerate(kept[b].tolist()):  # the context: kept tokens only, with their own positions
            torch.testing.assert_close(context[b, i], projected[b, i] + positions[j], rtol=1e-5, atol=1e-5)
    assert context.shape == (2, 40, DIM)


def test_positions_resized_from_pretraining_grid():
    decoder = tiny_decoder(pretrain_grid=(8, 14, 14)).eval()
    tokens = torch.randn(1, 64, ENCODER_DIM)
    with torch.no_grad():
        dense, _ = decoder.densify(tokens, GRID)
        dense_zero, _ = decoder.densify(torch.zeros_like(tokens), GRID)
    table = resize_grid_positions(sinusoid_table(8 * 14 * 14, DIM), (8, 14, 14), GRID)
    # a zero token normalises to the LayerNorm bias; the rest of the map is the resized table
    offset = decoder.encoder_to_decoder(decoder.norm.bias)
    torch.testing.assert_close(dense_zero[0], table + offset, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(dense, dense_zero)


def test_pooling_by_hand_on_a_linear_map():
    """f_sc(x, y) = a x + b y + c on the cell grid: RoIAlign bins average to f at their centres (exact for a
    linear map inside the grid), so each slice's max sits at a corner bin."""
    g = torch.Generator().manual_seed(3)
    t, h, w, channels = 3, 4, 4, 4
    a, b, c = (torch.randn(t, channels, generator=g) for _ in range(3))
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    fmap = a[..., None, None] * xs + b[..., None, None] * ys + c[..., None, None]  # (t, C, h, w)
    fmap = fmap.permute(1, 0, 2, 3)[None]  # (1, C, t, h, w)
    # pixels 24..40 x 24..56 at stride 16 with the half-cell shift: cells x in [1, 2], y in [1, 3]
    box = torch.tensor([[[24.0, 24.0, 40.0, 56.0]]])
    got = pool_actor_tokens(fmap, box, 1 / 16, 7, 2)
    centres_x = [1 + (k + 0.5) / 7 for k in range(7)]
    centres_y = [1 + (k + 0.5) * 2 / 7 for k in range(7)]
    expected = torch.zeros(channels)
    for ch in range(channels):
        per_slice = [
            max(
                float(a[s, ch]) * x + float(b[s, ch]) * y + float(c[s, ch])
                for x in centres_x
                for y in centres_y
            )
            for s in range(t)
        ]
        expected[ch] = sum(per_slice) / t
    torch.testing.assert_close(got[0, 0], expected, rtol=1e-5, atol=1e-5)


def test_pooling_equals_a_loop_over_slices():
    g = torch.Generator().manual_seed(4)
    fmap = torch.randn(2, 6, 4, 4, 4, generator=g)  # (B, C, t, h, w)
    boxes = extend_boxes(BOXES, (64, 64))
    got = pool_actor_tokens(fmap, boxes)
    for b in range(2):
        per_slice = [
            roi_align(fmap[b : b + 1, :, s], [boxes[b]], 7, 1 / 16, 2, aligned=True).amax(dim=(-2, -1))
            for s in range(4)
        ]
        torch.testing.assert_close(got[b], torch.stack(per_slice).mean(dim=0))


def slow_forward(decoder: ContextRefinementDecoder, tokens, boxes, sizes, kept) -> list[torch.Tensor]:
    """The decoder rebuilt from its parts with per-element loops: map, pooling, layers, heads."""
    b, n, _ = tokens.shape
    positions = decoder.position_embedding(GRID)
    projected = decoder.encoder_to_decoder(decoder.norm(tokens))
    dense = decoder.mask_token[0].repeat(b, 64, 1) + positions
    context = torch.zeros(b, n, DIM)
    for i in range(b):
        for k in range(n):
            dense[i, kept[i, k]] = projected[i, k] + positions[kept[i, k]]
            context[i, k] = projected[i, k] + positions[kept[i, k]]
    fmap = dense.view(b, 4, 4, 4, DIM).permute(0, 4, 1, 2, 3)
    ext = extend_boxes(boxes, sizes, decoder.box_extension)
    actors = torch.stack(
        [
            torch.stack(
                [
                    roi_align(fmap[i : i + 1, :, s], [ext[i]], 7, 1 / 16, 2, aligned=True).amax(dim=(-2, -1))
                    for s in range(4)
                ]
            ).mean(dim=0)
            for i in range(b)
        ]
    )
    x = torch.cat([context, actors], dim=1)
    out = []
    for block, head in zip(decoder.blocks, decoder.heads):
        x = block(x)
        out.append(head(x[:, n:]))
    return out


def test_forward_equals_slow_reference_and_shapes():
    decoder = tiny_decoder().eval()
    tokens, kept = pruned_inputs()
    sizes = torch.tensor([[64, 64], [48, 56]])
    with torch.no_grad():
        logits = decoder(tokens, BOXES, sizes, GRID, kept)
        expected = slow_forward(decoder, tokens, BOXES, sizes, kept)
    assert len(logits) == 2
    for got, want in zip(logits, expected):
        assert got.shape == (2, 2, CLASSES)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_keep_all_equals_kept_all_positions():
    decoder = tiny_decoder().eval()
    tokens = torch.randn(2, 64, ENCODER_DIM)
    every = torch.arange(64).expand(2, 64)
    with torch.no_grad():
        plain = decoder(tokens, BOXES, (64, 64), GRID)
        indexed = decoder(tokens, BOXES, (64, 64), GRID, every)
        dense, context = decoder.densify(tokens, GRID)
        dense_i, context_i = decoder.densify(tokens, GRID, every)
    torch.testing.assert_close(dense, dense_i)
    torch.testing.assert_close(context, context_i)
    for a, b in zip(plain, indexed):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_backward_reaches_every_parameter(checkpointing):
    decoder = tiny_decoder(activation_checkpointing=checkpointing).train()
    tokens, kept = pruned_inputs()
    tokens.requires_grad_(True)
    boxes = BOXES.clone().requires_grad_(True)
    logits = decoder(tokens, boxes, (64, 64), GRID, kept)
    sum(out.square().mean() for out in logits).backward()
    for name, p in decoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name  # the mask token too: 24 positions per sample were dropped
    assert torch.isfinite(tokens.grad).all() and tokens.grad.abs().sum() > 0
    assert boxes.grad is None  # the boxes are detached


def test_activation_checkpointing_changes_nothing():
    tokens, kept = pruned_inputs()
    grads = []
    for checkpointing in (False, True):
        decoder = tiny_decoder(activation_checkpointing=checkpointing, drop_path_rate=0.0).train()
        logits = decoder(tokens, BOXES, (64, 64), GRID, kept)
        logits[-1].sum().backward()
        grads.append((logits[-1].detach(), [p.grad for p in decoder.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)


def test_bad_inputs_are_refused():
    decoder = tiny_decoder()
    tokens, kept = pruned_inputs()
    with pytest.raises(ValueError, match="kept positions"):
        decoder(tokens, BOXES, (64, 64), GRID)
    with pytest.raises(ValueError, match="kept must hold"):
        decoder(tokens, BOXES, (64, 64), GRID, kept[:, :10])
    with pytest.raises(ValueError, match="image_sizes"):
        decoder(tokens, BOXES, torch.tensor([[64, 64, 1]]), GRID, kept)
