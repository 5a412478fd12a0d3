"""EVAD's query-based localiser against references computed another way: brute-force matching over all
permutations, per-proposal loops, hand-worked boxes and kernels, repeat_interleave instead of interpolation."""

from __future__ import annotations

import math
import os
import socket
from itertools import permutations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torchvision.ops import roi_align

from models.query_localiser import (
    DynamicConv,
    LocaliserOutput,
    QueryLocaliser,
    SimpleFeaturePyramid,
    assign_box_levels,
    decode_box_deltas,
    multilevel_roi_align,
    postprocess,
)
from models.set_criterion import HungarianMatcher, mean_over_ranks, set_losses


def giou_ref(a: list[float], b: list[float]) -> float:
    """Generalised IoU of two xyxy boxes, in plain Python."""
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = area_a + area_b - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def person_prob(logit: list[float]) -> float:
    return math.exp(logit[0]) / (math.exp(logit[0]) + math.exp(logit[1]))


def pair_cost(logit: list[float], box: list[float], gt: list[float], height: float, width: float) -> float:
    scale = [width, height, width, height]
    l1 = sum(abs(p / s - g / s) for p, g, s in zip(box, gt, scale))
    return 2 * -person_prob(logit) + 5 * l1 + 2 * -giou_ref(box, gt)


def brute_force_match(logits, boxes, gts, height, width) -> set[tuple[int, int]]:
    """The (proposal, GT) pairs of the cheapest one-to-one assignment, trying every permutation."""
    p, g = len(boxes), len(gts)
    cost = [[pair_cost(logits[i], boxes[i], gts[j], height, width) for j in range(g)] for i in range(p)]
    if g == 0:
        return set()
    if g <= p:
        candidates = [[(perm[j], j) for j in range(g)] for perm in permutations(range(p), g)]
    else:
        candidates = [[(i, perm[i]) for i in range(p)] for perm in permutations(range(g), p)]
    best = min(candidates, key=lambda pairs: sum(cost[i][j] for i, j in pairs))
    return set(best)


def random_boxes(n: int, height: float, width: float, generator: torch.Generator) -> torch.Tensor:
    x1 = torch.rand(n, generator=generator) * width * 0.6
    y1 = torch.rand(n, generator=generator) * height * 0.6
    w = 2 + torch.rand(n, generator=generator) * width * 0.4
    h = 2 + torch.rand(n, generator=generator) * height * 0.4
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=-1)


@pytest.mark.parametrize("seed", range(4))
def test_matcher_equals_brute_force(seed: int):
    gen = torch.Generator().manual_seed(seed)
    image_sizes = torch.tensor([[60, 80], [90, 50], [70, 70], [40, 100]])
    num_gt = [3, 4, 0, 4]  # fewer, more, none, as many GT as the 4 proposals
    p = 4
    logits = torch.randn(4, p, 2, generator=gen, dtype=torch.float64)
    boxes = torch.stack([random_boxes(p, h, w, gen) for h, w in image_sizes.tolist()]).double()
    gts = [random_boxes(g, h, w, gen).double() for g, (h, w) in zip(num_gt, image_sizes.tolist())]
    matches = HungarianMatcher()(logits, boxes, gts, image_sizes)
    for i, ((src, tgt), (h, w)) in enumerate(zip(matches, image_sizes.tolist())):
        expected = brute_force_match(logits[i].tolist(), boxes[i].tolist(), gts[i].tolist(), h, w)
        assert len(src) == len(tgt) == min(p, num_gt[i])
        assert src.dtype == tgt.dtype == torch.int64
        assert set(zip(src.tolist(), tgt.tolist())) == expected


def test_dynamic_conv_shapes_and_per_proposal_loop():
    torch.manual_seed(0)
    conv = DynamicConv(hidden_dim=32, dim_dynamic=8, resolution=7)
    assert conv(torch.randn(10, 32), torch.randn(10, 49, 32)).shape == (10, 32)

    c, d, s = 4, 3, 4  # non-square kernels and 2x2 cells, so any transposed view or flatten order shows
    conv = DynamicConv(hidden_dim=c, dim_dynamic=d, resolution=2)
    for norm in (conv.norm1, conv.norm2, conv.norm3):
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    proposals, rois = torch.randn(5, c), torch.randn(5, s, c)

    def layer_norm(v: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
        mean = sum(v.tolist()) / len(v)
        var = sum((x - mean) ** 2 for x in v.tolist()) / len(v)
        return (v - mean) / math.sqrt(var + norm.eps) * norm.weight + norm.bias

    expected = []
    for r in range(5):
        params = conv.dynamic_layer.weight @ proposals[r] + conv.dynamic_layer.bias
        k1 = torch.tensor([[params[ci * d + di].item() for di in range(d)] for ci in range(c)])
        k2 = torch.tensor([[params[c * d + di * c + ci].item() for ci in range(c)] for di in range(d)])
        cells = []
        for cell in range(s):
            h = torch.relu(layer_norm(rois[r, cell] @ k1, conv.norm1))
            cells.append(torch.relu(layer_norm(h @ k2, conv.norm2)))
        flat = torch.cat(cells)  # cell-major: all channels of cell 0, then cell 1, ...
        expected.append(
            torch.relu(layer_norm(conv.out_layer.weight @ flat + conv.out_layer.bias, conv.norm3))
        )
    with torch.no_grad():
        torch.testing.assert_close(conv(proposals, rois), torch.stack(expected), atol=1e-5, rtol=1e-4)


def test_dynamic_conv_hand_worked_kernels():
    """Proposal A gets K1 = K2 = I; B gets K1 = [[0, 1], [0, 0]]; C gets K2 = [[0, 1], [0, 0]].

    With every RoI cell (3, 1): A -> LN -> [1, -1] -> ReLU [1, 0] -> ... -> [1, 0].
    B: (3, 1) @ K1 = (0, 3) -> [-1, 1] -> [0, 1] -> (I) -> [0, 1]; the transposed kernel would give [1, 0].
    C: [1, 0] after K1 = I, then (1, 0) @ K2 = (0, 1) -> [0, 1]; the transposed kernel would give 0.
    """
    conv = DynamicConv(hidden_dim=2, dim_dynamic=2, resolution=1)
    identity, upper = [1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]
    delta = [u - i for u, i in zip(upper, identity)]
    with torch.no_grad():
        conv.dynamic_layer.bias.copy_(torch.tensor(identity + identity))
        conv.dynamic_layer.weight.copy_(torch.tensor([delta + [0.0] * 4, [0.0] * 4 + delta]).T)
        conv.out_layer.weight.copy_(torch.eye(2))
        conv.out_layer.bias.zero_()
        out = conv(
            torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), torch.tensor([[[3.0, 1.0]]]).expand(3, 1, 2)
        )
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), atol=1e-3, rtol=0)


def test_box_delta_decoding_hand_worked():
    # box (10, 20, 50, 100): centre (30, 60), size 40 x 80; deltas / (2, 2, 1, 1) = (0.25, -0.25, log 2, 0)
    box = torch.tensor([[10.0, 20.0, 50.0, 100.0]])
    deltas = torch.tensor([[0.5, -0.5, math.log(2.0), 0.0]])
    # centre (30 + 0.25 * 40, 60 - 0.25 * 80) = (40, 40), size 80 x 80
    torch.testing.assert_close(decode_box_deltas(deltas, box), torch.tensor([[0.0, 0.0, 80.0, 80.0]]))
    # the log-scale is clamped at log(100000 / 16): width 40 * 6250 = 250000 around the centre 30
    huge = decode_box_deltas(torch.tensor([[0.0, 0.0, 50.0, 0.0]]), box)
    torch.testing.assert_close(huge, torch.tensor([[30.0 - 125000.0, 20.0, 30.0 + 125000.0, 100.0]]))
    # each delta has its own weight: (1, 2, 4 log 2, 8 log 0.5) / (1, 2, 4, 8) -> centre (70, 140), size 80 x 40
    uneven = torch.tensor([[1.0, 2.0, 4 * math.log(2.0), 8 * math.log(0.5)]])
    torch.testing.assert_close(
        decode_box_deltas(uneven, box, weights=(1.0, 2.0, 4.0, 8.0)),
        torch.tensor([[30.0, 120.0, 110.0, 160.0]]),
    )
    # batched leading dims decode element-wise
    batched = decode_box_deltas(deltas.expand(2, 3, 4), box.expand(2, 3, 4))
    torch.testing.assert_close(batched, torch.tensor([0.0, 0.0, 80.0, 80.0]).expand(2, 3, 4))


def test_feature_pyramid_shapes_and_nearest_paths():
    torch.manual_seed(0)
    fpn = SimpleFeaturePyramid(in_channels=8, out_channels=16)
    maps = [torch.randn(2, 8, 4, 6) for _ in range(4)]  # a 64 x 96 image at stride 16
    with torch.no_grad():
        out = fpn(maps)
        assert fpn.strides == (4, 8, 16, 32)
        assert [tuple(o.shape) for o in out] == [(2, 16, 64 // s, 96 // s) for s in fpn.strides]

        def up(x: torch.Tensor, k: int) -> torch.Tensor:
            return x.repeat_interleave(k, -2).repeat_interleave(k, -1)

        inputs = [up(maps[0], 4), up(maps[1], 2), maps[2], maps[3][..., ::2, ::2]]  # the 0.5 keeps even cells
        top_down = fpn.lateral_convs[3](inputs[3])
        expected = [fpn.output_convs[3](top_down)]
        for level in (2, 1, 0):
            top_down = fpn.lateral_convs[level](inputs[level]) + up(top_down, 2)
            expected.insert(0, fpn.output_convs[level](top_down))
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want)


def test_level_assignment_and_multilevel_roi_align():
    sides = [224.0, 112.0, 448.0, 10.0, 1000.0, 223.0, 0.0]
    boxes = torch.tensor([[0.0, 0.0, s, s] for s in sides])
    # levels 4, 3, 5, 2 (clamped), 5 (clamped), 3 (just below 224), 2 (empty box) minus the finest level 2
    expected_levels = [2, 1, 3, 0, 3, 1, 0]
    assert assign_box_levels(boxes).tolist() == expected_levels
    # detectron2's 1e-8 inside the log keeps a box a hair under 224 pixels on level 4
    assert (
        assign_box_levels(torch.tensor([[0.0, 0.0, 224 - 1e-7, 224 - 1e-7]], dtype=torch.float64)).item() == 2
    )

    strides = (4, 8, 16, 32)
    size = 512
    # level l of image b is filled with 10 * b + l + 1, so a pooled value names the map it came from
    maps = [
        torch.stack([torch.full((2, size // s, size // s), 10.0 * b + level + 1) for b in range(2)])
        for level, s in enumerate(strides)
    ]
    inside = torch.tensor([[8.0, 8.0, 8 + s, 8 + s] for s in [224.0, 112.0, 448.0, 10.0, 50.0]])
    batch = torch.stack([inside, inside.flip(0)])  # (2, 5, 4)
    pooled = multilevel_roi_align(maps, batch, strides)
    assert pooled.shape == (10, 2, 7, 7)
    levels = [[2, 1, 3, 0, 0], [0, 0, 3, 1, 2]]
    want = torch.tensor([10.0 * b + lv + 1 for b in range(2) for lv in levels[b]])
    torch.testing.assert_close(pooled, want[:, None, None, None].expand(10, 2, 7, 7))

    # non-constant maps: each row equals a single-box aligned RoIAlign on its level
    gen = torch.Generator().manual_seed(1)
    maps = [torch.randn(2, 3, size // s, size // s, generator=gen) for s in strides]
    pooled = multilevel_roi_align(maps, batch, strides, output_size=5, sampling_ratio=2)
    for b in range(2):
        for p in range(5):
            lv = levels[b][p]
            ref = roi_align(maps[lv][b : b + 1], [batch[b, p : p + 1]], 5, 1 / strides[lv], 2, aligned=True)
            torch.testing.assert_close(pooled[b * 5 + p], ref[0])


def _loss_case():
    gen = torch.Generator().manual_seed(3)
    image_sizes = torch.tensor([[60, 80], [90, 50], [70, 70]])
    num_gt, p, stages = [3, 1, 0], 5, 2
    logits = [torch.randn(3, p, 2, generator=gen, dtype=torch.float64) for _ in range(stages)]
    boxes = [
        torch.stack([random_boxes(p, h, w, gen) for h, w in image_sizes.tolist()]).double()
        for _ in range(stages)
    ]
    gts = [random_boxes(g, h, w, gen).double() for g, (h, w) in zip(num_gt, image_sizes.tolist())]
    return LocaliserOutput(boxes, logits, torch.zeros(3, p, 4)), gts, image_sizes


def reference_stage_losses(logits, boxes, gts, image_sizes, num_boxes: float) -> tuple[dict, list]:
    """Unweighted CE, L1, GIoU of one stage from brute-force matches, by explicit loops."""
    pairs = []
    ce_sum = weight_sum = l1 = giou = 0.0
    for i, (h, w) in enumerate(image_sizes.tolist()):
        matched = brute_force_match(logits[i].tolist(), boxes[i].tolist(), gts[i].tolist(), h, w)
        pairs.append(matched)
        person = {src for src, _ in matched}
        for q in range(len(boxes[i])):
            prob = person_prob(logits[i][q].tolist())
            label_prob, weight = (prob, 1.0) if q in person else (1 - prob, 0.1)
            ce_sum += -weight * math.log(label_prob)
            weight_sum += weight
        for src, tgt in matched:
            box, gt = boxes[i][src].tolist(), gts[i][tgt].tolist()
            l1 += sum(abs(a / s - b / s) for a, b, s in zip(box, gt, [w, h, w, h]))
            giou += 1 - giou_ref(box, gt)
    return {"class": ce_sum / weight_sum, "l1": l1 / num_boxes, "giou": giou / num_boxes}, pairs


def test_set_losses_equal_direct_recomputation():
    output, gts, image_sizes = _loss_case()
    weights = {"class": 2.0, "l1": 5.0, "giou": 2.0}
    losses, matches = set_losses(output, gts, image_sizes, HungarianMatcher())
    assert set(losses) == {f"stage{s}_{k}" for s in range(2) for k in weights}
    for s in range(2):
        ref, pairs = reference_stage_losses(
            output.logits[s], output.boxes[s], gts, image_sizes, num_boxes=4.0
        )
        for k, wt in weights.items():
            assert losses[f"stage{s}_{k}"].item() == pytest.approx(wt * ref[k], rel=1e-6)
    # the returned matches are the last stage's
    assert [set(zip(src.tolist(), tgt.tolist())) for src, tgt in matches] == pairs

    # a rank-averaged count replaces the local one in the box terms only; no deep supervision keeps stage 1
    halved, _ = set_losses(
        output,
        gts,
        image_sizes,
        HungarianMatcher(),
        deep_supervision=False,
        reduce_num_boxes=lambda n: n * 0 + 8,
    )
    assert set(halved) == {"stage1_class", "stage1_l1", "stage1_giou"}
    assert halved["stage1_l1"].item() == pytest.approx(losses["stage1_l1"].item() / 2)
    assert halved["stage1_giou"].item() == pytest.approx(losses["stage1_giou"].item() / 2)
    assert halved["stage1_class"].item() == pytest.approx(losses["stage1_class"].item())


def _box_losses_on_rank(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    output, gts, image_sizes = _loss_case()
    rows = [[0, 1], [2]][rank]  # 4 ground-truth boxes on rank 0, none on rank 1
    part = LocaliserOutput(
        [b[rows] for b in output.boxes], [lg[rows] for lg in output.logits], output.features
    )
    losses, _ = set_losses(
        part, [gts[i] for i in rows], image_sizes[rows], HungarianMatcher(), reduce_num_boxes=mean_over_ranks
    )
    results[rank] = {k: v.item() for k, v in losses.items()} | {
        "count": mean_over_ranks(torch.tensor(float(4 - 4 * rank))).item()
    }
    dist.destroy_process_group()


def test_rank_averaged_count_makes_ddp_box_losses_equal_one_process():
    """DDP averages the ranks' losses (their gradients): with the ground-truth count averaged over the ranks,
    that average equals the box losses of the whole batch in one process, however unevenly the boxes fall."""
    assert mean_over_ranks(torch.tensor(3.0)).item() == 3.0  # no process group: the value itself
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.start_processes(_box_losses_on_rank, args=(port, results), nprocs=2, join=True, start_method="fork")
    output, gts, image_sizes = _loss_case()
    whole, _ = set_losses(output, gts, image_sizes, HungarianMatcher())
    assert results[0]["count"] == results[1]["count"] == 2.0
    for s in range(2):
        for term in ("l1", "giou"):
            key = f"stage{s}_{term}"
            assert (results[0][key] + results[1][key]) / 2 == pytest.approx(whole[key].item(), rel=1e-9)


def test_set_losses_without_any_ground_truth():
    output, _, image_sizes = _loss_case()
    empty = [torch.zeros(0, 4, dtype=torch.float64) for _ in range(3)]
    losses, matches = set_losses(output, empty, image_sizes, HungarianMatcher())
    assert all(len(src) == len(tgt) == 0 for src, tgt in matches)
    for s in range(2):
        assert losses[f"stage{s}_l1"].item() == 0.0 and losses[f"stage{s}_giou"].item() == 0.0
        no_object = -F.log_softmax(output.logits[s], -1)[..., 1].mean()  # one weight everywhere cancels
        assert losses[f"stage{s}_class"].item() == pytest.approx(2.0 * no_object.item())


def tiny_localiser(num_stages: int = 2) -> tuple[SimpleFeaturePyramid, QueryLocaliser]:
    torch.manual_seed(0)
    fpn = SimpleFeaturePyramid(in_channels=16, out_channels=32)
    localiser = QueryLocaliser(
        num_proposals=10, hidden_dim=32, num_stages=num_stages, num_heads=4, dim_dynamic=8, dim_feedforward=64
    )
    return fpn, localiser


def test_initial_boxes_cover_each_image():
    _, localiser = tiny_localiser()
    image_sizes = torch.tensor([[256, 200], [240, 256]])
    want = torch.tensor([[0.0, 0.0, 200.0, 256.0], [0.0, 0.0, 256.0, 240.0]])
    torch.testing.assert_close(localiser.initial_boxes(image_sizes), want[:, None].expand(2, 10, 4))


def test_forward_backward_gradients_reach_every_parameter():
    fpn, localiser = tiny_localiser()
    with torch.no_grad():  # proposal sizes 0.1, 0.5, 1, 2 of a 256 image pool from all four levels
        sizes = torch.tensor([0.1, 0.5, 1.0, 2.0]).repeat(3)[:10]
        localiser.proposal_boxes[:, 2:] = sizes[:, None]
    image_sizes = torch.tensor([[256, 256], [240, 200]])
    maps = [torch.randn(2, 16, 16, 16) for _ in range(4)]  # a 16 x 16 token keyframe, 256 x 256 padded input
    output = localiser(fpn(maps), image_sizes)
    assert len(output.boxes) == len(output.logits) == 2
    assert output.boxes[0].shape == (2, 10, 4) and output.logits[1].shape == (2, 10, 2)
    assert output.features.shape == (2, 10, 32)
    gts = [torch.tensor([[10.0, 20.0, 100.0, 200.0], [120.0, 30.0, 250.0, 250.0]]), torch.zeros(0, 4)]
    losses, _ = set_losses(output, gts, image_sizes, HungarianMatcher())
    sum(losses.values()).backward()
    for name, param in [*fpn.named_parameters(), *localiser.named_parameters()]:
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_boxes_are_detached_between_stages():
    fpn, localiser = tiny_localiser()
    output = localiser(fpn([torch.randn(1, 16, 8, 8) for _ in range(4)]), torch.tensor([[128, 128]]))
    output.boxes[1].sum().backward()
    first, second = localiser.stages
    # stage 0's box head and the initial boxes only act on the later stage through the detached boxes
    assert first.box_deltas.weight.grad is None and localiser.proposal_boxes.grad is None
    assert second.box_deltas.weight.grad is not None and first.dynamic_conv.out_layer.weight.grad is not None


def test_postprocess_threshold_and_fallback():
    def logits_for(probs: list[float]) -> torch.Tensor:
        p = torch.tensor(probs)
        return torch.stack([p.log(), (1 - p).log()], dim=-1)

    logits = torch.stack([logits_for([0.9, 0.5, 0.75, 0.65, 0.2]), logits_for([0.6, 0.1, 0.69, 0.3, 0.5])])
    boxes = torch.tensor([[-5.0, -3.0, 300.0, 50.0], [10.0, 20.0, 30.0, 40.0]]).repeat(2, 3, 1)[:, :5]
    image_sizes = torch.tensor([[100, 200], [100, 200]])
    first, second = postprocess(logits, boxes, image_sizes)
    assert first.index.tolist() == [0, 2]
    torch.testing.assert_close(first.scores, torch.tensor([0.9, 0.75]))
    torch.testing.assert_close(first.boxes, torch.tensor([[0.0, 0.0, 200.0, 50.0], [0.0, 0.0, 200.0, 50.0]]))
    assert second.index.tolist() == [0, 1, 2, 3, 4]  # none reaches 0.7: every proposal is kept
    torch.testing.assert_close(second.scores, torch.tensor([0.6, 0.1, 0.69, 0.3, 0.5]))
    torch.testing.assert_close(second.boxes[1], torch.tensor([10.0, 20.0, 30.0, 40.0]))


def test_dynamic_conv_recompute_gives_the_same_values_and_gradients_and_stores_less():
    torch.manual_seed(0)
    conv = DynamicConv(hidden_dim=16, dim_dynamic=4, resolution=3).train()
    proposals = torch.randn(6, 16, requires_grad=True)
    rois = torch.randn(6, 9, 16, requires_grad=True)
    results, stored = [], []
    for recompute in (False, True):
        conv.recompute = recompute
        sizes: list[int] = []

        def pack(t: torch.Tensor, sizes=sizes) -> torch.Tensor:
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = conv(proposals, rois)
        grads = torch.autograd.grad(out.square().sum(), [proposals, rois, *conv.parameters()])
        results.append((out.detach(), grads))
        stored.append(sum(sizes))
    torch.testing.assert_close(results[1][0], results[0][0])
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b)
    # recomputing keeps only the inputs (and the weights), not the (R, 2*C*d) kernels or the (R, S, .) maps
    assert stored[1] < stored[0] / 2, stored
