"""The factorised RoIAlign against torchvision's kernel: values, gradients and the dispatch rule."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_align as torchvision_roi_align

from models import roi_align
from models.context_decoder import pool_actor_tokens
from models.query_localiser import multilevel_roi_align
from models.roi_align import resolve_impl, roi_align_boxes, roi_align_max, roi_align_rois, roi_weights


def random_boxes(gen: torch.Generator, b: int, p: int, height: float, width: float) -> torch.Tensor:
    """Boxes of all kinds: inside, crossing every edge, past the map, tiny, and degenerate (x2 == x1)."""
    xy = torch.rand(b, p, 2, generator=gen) * torch.tensor([width * 1.2, height * 1.2]) - torch.tensor(
        [width * 0.1, height * 0.1]
    )
    wh = torch.rand(b, p, 2, generator=gen) * torch.tensor([width * 0.6, height * 0.6])
    wh[:, 0] = 0.0  # one degenerate box per image
    wh[:, 1] = 0.3  # one box smaller than a cell
    return torch.cat([xy, xy + wh], dim=-1)


def reference(features: torch.Tensor, boxes: torch.Tensor, out: int, scale: float, ratio: int, aligned: bool):
    """torchvision's kernel called the usual way: one (K, 5) roi list over all (image, slice) maps."""
    b, s, c, h, w = features.shape
    p = boxes.shape[1]
    rows = []
    for i in range(b):
        for j in range(s):
            for k in range(p):
                rows.append(torch.cat([torch.tensor([float(i * s + j)]), boxes[i, k]]))
    pooled = torchvision_roi_align(
        features.reshape(b * s, c, h, w), torch.stack(rows), out, scale, ratio, aligned
    )
    return pooled.view(b, s, p, c, out, out)


@pytest.mark.parametrize("ratio", [1, 2, 0, -1])
@pytest.mark.parametrize("aligned", [True, False])
def test_separable_equals_torchvision_values_and_gradients(ratio: int, aligned: bool):
    gen = torch.Generator().manual_seed(ratio + 10 * aligned)
    b, s, c, h, w, scale = 2, 3, 5, 9, 13, 0.25
    features = torch.randn(b, s, c, h, w, generator=gen, dtype=torch.float64, requires_grad=True)
    boxes = random_boxes(gen, b, 6, h / scale, w / scale).double()
    ours = roi_align_boxes(features, boxes, 4, scale, ratio, aligned, impl="separable")
    theirs = reference(features, boxes, 4, scale, ratio, aligned)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    upstream = torch.randn(ours.shape, generator=gen, dtype=torch.float64)
    (grad_ours,) = torch.autograd.grad(ours, features, upstream)
    (grad_theirs,) = torch.autograd.grad(theirs, features, upstream)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("ratio", [2, -1])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("boxes_per_group", [1, 4, 100])
def test_grouped_bin_maximum_equals_torchvision_then_max(ratio, aligned, boxes_per_group, monkeypatch):
    """Without autograd on the CPU the bins' maximum comes from groups of boxes (uneven last group too)."""
    gen = torch.Generator().manual_seed(ratio + 10 * aligned)
    b, s, c, h, w, scale = 2, 3, 5, 9, 13, 0.25
    monkeypatch.setattr(roi_align, "MAX_GROUP_ELEMENTS", boxes_per_group * 4 * w * s * c)
    features = torch.randn(b, s, c, h, w, generator=gen, dtype=torch.float64)
    boxes = random_boxes(gen, b, 7, h / scale, w / scale).double()
    expected = reference(features, boxes, 4, scale, ratio, aligned).flatten(-2).amax(-1)  # (B, S, P, C)
    for impl in ("auto", "separable"):
        with torch.inference_mode():
            torch.testing.assert_close(
                roi_align_max(features, boxes, 4, scale, ratio, aligned, impl), expected, rtol=0, atol=1e-12
            )
    # with autograd: the same values and a gradient
    leaf = features.clone().requires_grad_()
    got = roi_align_max(leaf, boxes, 4, scale, ratio, aligned)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert got.grad_fn is not None
    with torch.no_grad():  # and in bfloat16, pooled in float32
        half = roi_align_max(features.float().bfloat16(), boxes.float(), 4, scale, ratio, aligned)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), expected, rtol=2e-2, atol=3e-2)


def test_weights_of_a_hand_worked_box():
    """aligned=True, one bin, one sample: box [1, 1] -> [3, 3] on a unit grid samples the centre (1.5, 1.5)
    of a half-pixel-shifted map, i.e. cells 1 and 2 at 1/2 each along both axes."""
    wy, wx = roi_weights(torch.tensor([[1.0, 1.0, 3.0, 3.0]]), (4, 4), (1, 1), 1.0, 1, aligned=True)
    expected = torch.tensor([[[0.0, 0.5, 0.5, 0.0]]])
    torch.testing.assert_close(wy, expected)
    torch.testing.assert_close(wx, expected)
    # past the far edge by less than one cell: clamped onto the last cell; by more: no contribution
    wy, _ = roi_weights(
        torch.tensor([[0.0, 4.2, 1.0, 4.4], [0.0, 5.6, 1.0, 5.8]]), (4, 4), (1, 1), 1.0, 1, True
    )
    torch.testing.assert_close(wy, torch.tensor([[[0.0, 0.0, 0.0, 1.0]], [[0.0, 0.0, 0.0, 0.0]]]))


def test_dispatch_rule_and_bad_name():
    x = torch.zeros(2, 4, 8, 6, 6, requires_grad=True)
    assert resolve_impl("auto", x, 10) == "separable"
    with torch.no_grad():
        assert resolve_impl("auto", x, 10) == "torchvision"
    assert resolve_impl("auto", x.detach(), 10) == "torchvision"
    assert resolve_impl("torchvision", x, 10) == "torchvision"
    # paper-size maps (ViT-B's decoder: 8 slices of 768 x 14 x 14, 100 boxes) stay on torchvision's kernel
    big = torch.zeros(2, 8, 768, 14, 14).requires_grad_()
    assert resolve_impl("auto", big, 100) == "torchvision"
    assert resolve_impl("separable", big, 100) == "separable"
    with pytest.raises(ValueError, match="'auto', 'torchvision' or 'separable'"):
        resolve_impl("fast", x)  # type: ignore[arg-type]


def test_localiser_and_decoder_pooling_agree_across_implementations():
    gen = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, 4, 32 // s, 48 // s, generator=gen, requires_grad=True) for s in (1, 2, 4, 8)]
    boxes = random_boxes(gen, 2, 7, 128, 192).clamp(min=0)
    by_impl = {
        i: multilevel_roi_align(maps, boxes, (4, 8, 16, 32), 7, 2, i) for i in ("torchvision", "separable")
    }
    torch.testing.assert_close(by_impl["separable"], by_impl["torchvision"], rtol=1e-5, atol=1e-5)
    grads = {
        i: torch.autograd.grad(v.square().sum(), maps, allow_unused=True, materialize_grads=True)
        for i, v in by_impl.items()
    }
    for a, b in zip(grads["separable"], grads["torchvision"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    feature_map = torch.randn(2, 6, 4, 8, 12, generator=gen)
    tokens = {i: pool_actor_tokens(feature_map, boxes, 1 / 16, 7, 2, i) for i in ("torchvision", "separable")}
    torch.testing.assert_close(tokens["separable"], tokens["torchvision"], rtol=1e-5, atol=1e-5)


def test_bfloat16_features_are_pooled_in_float32():
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(1, 2, 3, 8, 8, generator=gen)
    boxes = random_boxes(gen, 1, 4, 32, 32).clamp(min=0)
    exact = reference(features, boxes, 3, 0.25, 2, True)
    ours = roi_align_boxes(features.bfloat16(), boxes, 3, 0.25, 2, True, impl="separable")
    assert ours.dtype == torch.bfloat16
    # only the features' own rounding remains (bf16 keeps 8 bits): no extra error from bf16 weights
    torch.testing.assert_close(ours.float(), exact, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("mode", ["inference", "no_grad"])
def test_threaded_torchvision_kernel_equals_one_call(mode: str):
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(6, 5, 9, 11, generator=gen)
    boxes = random_boxes(gen, 1, 200, 9 * 16, 11 * 16)[0]
    rois = torch.cat([torch.randint(0, 6, (200, 1), generator=gen).float(), boxes], dim=1)
    expected = torchvision_roi_align(features, rois, 7, 1 / 16, 2, True)
    context = torch.inference_mode() if mode == "inference" else torch.no_grad()
    with context:
        for threads in (2, 3, 7):  # uneven splits too
            out = roi_align_rois(features, rois, 7, 1 / 16, 2, True, threads=threads)
            assert out.is_inference() == (mode == "inference")
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # with autograd the single differentiable call is kept
    leaf = features.clone().requires_grad_()
    out = roi_align_rois(leaf, rois, 7, 1 / 16, 2, True, threads=4)
    assert out.grad_fn is not None


def test_threaded_pool_works_in_a_forked_child():
    features = torch.randn(2, 3, 8, 8)
    rois = torch.cat([torch.zeros(128, 1), torch.tensor([[0.0, 0.0, 60.0, 60.0]]).expand(128, 4)], dim=1)
    with torch.no_grad():
        expected = roi_align_rois(features, rois, 3, 1 / 8, 2, True, threads=2)  # the parent's pool exists
    context = torch.multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        out = pool.apply_async(_threaded_in_child, (features, rois)).get(timeout=60)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def _threaded_in_child(features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return roi_align_rois(features, rois, 3, 1 / 8, 2, True, threads=2)
