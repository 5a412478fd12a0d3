"""The ActionFormer TAD head and its post-processing against references computed another way.

Label assignment, soft-NMS and hard NMS are checked against slow loops that apply the rules literally; DIoU
against hand values; window merging on hand-built windows; and the whole head by overfitting one synthetic
window.
"""

from __future__ import annotations

import math

import pytest
import torch

from models.actionformer import ActionFormerHead, ActionFormerOutputs, ConvAttention, diou_loss_1d
from models.tad_postprocess import Detections, TADPostProcessor, soft_nms

C_IN, NUM_CLASSES, T = 16, 5, 64


@pytest.fixture(autouse=True)
def one_thread():
    """The shapes here are tiny: a second intra-op thread costs more than it brings."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_head(max_seq_len: int = T, **kwargs) -> ActionFormerHead:
    torch.manual_seed(0)
    kwargs = dict(embed_dim=32, num_heads=4, head_channels=32, max_seq_len=max_seq_len) | kwargs
    return ActionFormerHead(C_IN, NUM_CLASSES, **kwargs)


@pytest.mark.parametrize(
    "length, valid, padded_to", [(64, 64, 64), (64, 41, 64), (50, 37, 64), (100, 100, 128)]
)
def test_forward_shapes_and_masks(length, valid, padded_to):
    """Six levels, strides 1..32, over the padded length; level masks sample the input mask every stride."""
    head = tiny_head().eval()
    mask = torch.ones(2, length, dtype=torch.bool)
    mask[1, valid:] = False
    with torch.no_grad():
        out = head(torch.randn(2, C_IN, length), mask)
    full = torch.zeros(2, padded_to, dtype=torch.bool)
    full[:, :length] = mask
    assert out.strides == (1, 2, 4, 8, 16, 32)
    for level, stride in enumerate(out.strides):
        t = padded_to // stride
        assert out.cls_logits[level].shape == (2, t, NUM_CLASSES)
        assert out.reg_offsets[level].shape == (2, t, 2)
        assert (out.reg_offsets[level] >= 0).all()
        assert torch.equal(out.masks[level], full[:, ::stride])
        assert torch.equal(out.points[level], torch.arange(t, dtype=torch.float32) * stride)
    assert out.segments().shape == (2, sum(padded_to // s for s in out.strides), 2)


def test_padded_steps_do_not_leak():
    """Whatever sits on padded steps, the outputs on valid steps are the same."""
    head = tiny_head().eval()
    x = torch.randn(1, C_IN, T)
    mask = torch.arange(T)[None] < 45
    noisy = torch.where(mask[:, None], x, 100 * torch.randn_like(x))
    with torch.no_grad():
        a, b = head(x, mask), head(noisy, mask)
    for level in range(6):
        keep = a.masks[level]
        assert torch.allclose(a.cls_logits[level][keep], b.cls_logits[level][keep], atol=1e-5)
        assert torch.allclose(a.reg_offsets[level][keep], b.reg_offsets[level][keep], atol=1e-5)


def test_local_attention_window():
    """A query sees keys within window // 2 steps (plus the depthwise conv's one); a global query sees all."""
    torch.manual_seed(0)
    local, full = ConvAttention(32, 4, window_size=9), ConvAttention(32, 4, window_size=-1)
    full.load_state_dict(local.state_dict())
    x, mask = torch.randn(1, 32, 40), torch.ones(1, 40, dtype=torch.bool)
    moved = x.clone()
    moved[..., 30] += 5.0
    with torch.no_grad():
        changed_local = (local(moved, mask)[0] - local(x, mask)[0]).abs().amax(dim=1)[0]
        changed_full = (full(moved, mask)[0] - full(x, mask)[0]).abs().amax(dim=1)[0]
    near = (torch.arange(40) - 30).abs() <= 9 // 2 + 1
    assert (changed_local[~near] == 0).all() and (changed_local[near] > 0).all()
    assert (changed_full > 0).all()
    wide = ConvAttention(32, 4, window_size=81)
    wide.load_state_dict(local.state_dict())
    with torch.no_grad():
        assert torch.allclose(wide(x, mask)[0], full(x, mask)[0], atol=1e-6)


def reference_assignment(points, strides, ranges, gt_segments, gt_labels, num_classes, radius=1.5):
    """The assignment rules applied point by point, ground truth by ground truth."""
    cls = torch.zeros(len(points), num_classes)
    segs = torch.zeros(len(points), 2)
    for i, (p, s, (lo, hi)) in enumerate(zip(points.tolist(), strides.tolist(), ranges.tolist())):
        candidates = []
        for j, (a, b) in enumerate(gt_segments.tolist()):
            centre = (a + b) / 2
            inside = max(a, centre - radius * s) < p < min(b, centre + radius * s)
            if inside and lo <= max(p - a, b - p) <= hi:
                candidates.append(j)
        if not candidates:
            continue
        length = {j: gt_segments[j, 1].item() - gt_segments[j, 0].item() for j in candidates}
        shortest = min(length.values())
        for j in candidates:
            if length[j] <= shortest + 1e-3:
                cls[i, gt_labels[j]] = 1
        segs[i] = gt_segments[next(j for j in candidates if length[j] == shortest)]
    return cls, segs


@pytest.mark.parametrize("seed", range(6))
def test_assignment_matches_brute_force(seed):
    head = tiny_head(max_seq_len=128).eval()
    with torch.no_grad():
        out = head(torch.randn(1, C_IN, 128), torch.ones(1, 128, dtype=torch.bool))
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 9, (1,), generator=g))
    starts = torch.randint(0, 200, (n,), generator=g) / 2  # half steps: exact in float32
    lengths = torch.randint(1, 140, (n,), generator=g) / 2
    segments = torch.stack((starts, starts + lengths), dim=1)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    # ties: a copy of the first segment with another class, and another segment of equal length
    segments = torch.cat([segments, segments[:1], segments[1:2] + 7])
    labels = torch.cat([labels, (labels[:1] + 1) % NUM_CLASSES, labels[1:2]])
    cls, segs = head.targets(out, [segments], [labels])
    points, strides = out.flat_points()
    ranges = torch.cat([r.expand(len(p), 2) for r, p in zip(head.regression_ranges, out.points)])
    ref_cls, ref_segs = reference_assignment(points, strides, ranges, segments, labels, NUM_CLASSES)
    assert ref_cls.sum() > 0
    assert torch.equal(cls[0], ref_cls)
    positive = ref_cls.sum(dim=1) > 0
    assert torch.equal(segs[0][positive], ref_segs[positive])


def test_diou_hand_values():
    pred = torch.tensor([[2.0, 6.0], [0.0, 2.0], [0.0, 1.0], [0.0, 4.0]])
    target = torch.tensor([[2.0, 6.0], [0.0, 4.0], [2.0, 3.0], [1.0, 3.0]])
    # identical; IoU 1/2 with centres 1 apart in an enclosing 4; disjoint (1 + 2^2 / 3^2); nested, same centre
    expected = torch.tensor([0.0, 0.5 + 1 / 16, 1 + 4 / 9, 0.5])
    assert torch.allclose(diou_loss_1d(pred, target), expected)
    assert diou_loss_1d(torch.tensor([[0.0, 1.0]]), torch.tensor([[5.0, 6.0]])).item() > 1


def test_loss_finite_backprops_and_tracks_positives():
    head = tiny_head().train()
    x, mask = torch.randn(2, C_IN, T), torch.ones(2, T, dtype=torch.bool)
    mask[1, 50:] = False
    out = head(x, mask)
    gts = [torch.tensor([[10.0, 30.0], [12.0, 14.0], [40.0, 63.0]]), torch.zeros(0, 2)]
    labels = [torch.tensor([1, 4, 0]), torch.zeros(0, dtype=torch.long)]
    num_pos = int(((head.targets(out, gts, labels)[0].sum(-1) > 0) & torch.cat(out.masks, 1)).sum())
    seen = []

    def reduce(count):
        seen.append(count.item())
        return count * 2  # as if another rank had twice as many

    losses = head.loss(out, gts, labels, num_pos_reduce=reduce)
    assert set(losses) == {"cls_loss", "reg_loss", "loss"}
    assert all(torch.isfinite(v) for v in losses.values()) and losses["reg_loss"] > 0
    assert seen == [num_pos]
    assert head.loss_normalizer.item() == pytest.approx(0.9 * 100 + 0.1 * 2 * num_pos)
    losses["loss"].backward()
    for p in (head.cls_head.weight, head.reg_head.weight, head.embed[0].conv.weight, head.reg_scales):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_loss_on_windows_without_ground_truth():
    head = tiny_head().train()
    out = head(torch.randn(2, C_IN, T), torch.ones(2, T, dtype=torch.bool))
    empty = [torch.zeros(0, 2)] * 2, [torch.zeros(0, dtype=torch.long)] * 2
    losses = head.loss(out, *empty)
    assert losses["reg_loss"].item() == 0 and torch.isfinite(losses["cls_loss"])
    assert head.loss_normalizer.item() == pytest.approx(0.9 * 100 + 0.1)  # max(num_pos, 1)
    losses["loss"].backward()
    assert torch.isfinite(head.reg_head.weight.grad).all() and head.cls_head.weight.grad.abs().sum() > 0


def test_label_smoothing_targets():
    """Targets become ``y * (1 - eps) + eps / (num_classes + 1)``; evaluation divides by the positives."""
    from torchvision.ops import sigmoid_focal_loss

    head = tiny_head(label_smoothing=0.1).eval()
    with torch.no_grad():
        out = head(torch.randn(1, C_IN, T), torch.ones(1, T, dtype=torch.bool))
        gts, labels = [torch.tensor([[8.0, 24.0]])], [torch.tensor([2])]
        cls, _ = head.targets(out, gts, labels)
        num_pos = int((cls.sum(-1) > 0).sum())
        smoothed = cls[0] * 0.9 + 0.1 / (NUM_CLASSES + 1)
        logits = torch.cat(out.cls_logits, 1)[0]
        expected = sigmoid_focal_loss(logits, smoothed, reduction="sum") / num_pos
        assert head.loss(out, gts, labels)["cls_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert head.loss_normalizer.item() == 100  # evaluation leaves the running average alone


def test_overfits_one_window():
    """A segment marked by a feature pattern is recovered (tIoU > 0.7, right class) after 120 Adam steps."""
    torch.manual_seed(0)
    start, end, label = 20, 36, 3
    x = torch.randn(1, C_IN, T)
    pattern = torch.randn(C_IN, 1)
    x[0, :, start:end] += 3 * pattern / pattern.norm()
    mask = torch.ones(1, T, dtype=torch.bool)
    gts, labels = [torch.tensor([[float(start), float(end)]])], [torch.tensor([label])]
    head = tiny_head(drop_path=0.0).train()
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-3, fused=True)
    for _ in range(120):
        optimiser.zero_grad()
        head.loss(head(x, mask), gts, labels)["loss"].backward()
        optimiser.step()
    head.eval()
    with torch.no_grad():
        window = TADPostProcessor().decode(head(x, mask))[0]
    video = TADPostProcessor().nms(window)
    s, e = video.segments[0].tolist()
    tiou = max(0.0, min(e, end) - max(s, start)) / (max(e, end) - min(s, start))
    assert video.labels[0].item() == label and tiou > 0.7, (s, e, video.scores[0].item())


def manual_outputs() -> ActionFormerOutputs:
    """Two levels (strides 1 and 2) of one window whose last stride-1 step is padding."""
    prob = torch.tensor([[0.9, 0.0005], [0.2, 0.6], [0.0, 0.3], [0.99, 0.99]])  # (4 points, 2 classes)
    logits1 = torch.logit(prob.clamp(1e-6, 1 - 1e-6))[None]
    logits2 = torch.logit(torch.tensor([[0.05, 0.7], [0.0005, 0.0]]).clamp(1e-6, 1 - 1e-6))[None]
    offsets1 = torch.tensor([[[1.0, 2.0], [0.5, 0.5], [1.0, 1.0], [3.0, 3.0]]])
    offsets2 = torch.tensor([[[1.0, 1.5], [2.0, 2.0]]])
    masks = [torch.tensor([[True, True, True, False]]), torch.tensor([[True, True]])]
    points = [torch.arange(4.0), torch.arange(2.0) * 2]
    return ActionFormerOutputs([logits1, logits2], [offsets1, offsets2], masks, points, (1, 2))


def test_decode_filters_ranks_and_decodes():
    post = TADPostProcessor(pre_nms_topk=4)
    (dets,) = post.decode(manual_outputs())
    # above 0.001 on valid points: 0.9 (p0 c0), 0.7 (level-2 p0 c1), 0.6 (p1 c1), 0.3, 0.2, 0.05 -> top 4
    assert torch.allclose(dets.scores, torch.tensor([0.9, 0.7, 0.6, 0.3]), atol=1e-5)
    assert dets.labels.tolist() == [0, 1, 1, 1]
    expected = torch.tensor([[-1.0, 2.0], [-2.0, 3.0], [0.5, 1.5], [1.0, 3.0]])
    assert torch.allclose(dets.segments, expected)
    assert len(TADPostProcessor(pre_nms_thresh=0.5).decode(manual_outputs())[0]) == 3


def textbook_soft_nms(segments, scores, sigma, min_score):
    """Bodla et al.'s Gaussian soft-NMS loop over Python lists, each length 1e-6 longer in the union as OpenTAD's
    kernel computes it (opentad/models/utils/post_processing/nms/nms_cpu.cpp: areas = x2 - x1 + 1e-6)."""
    pool = [(i, s) for i, s in enumerate(scores.tolist()) if s >= min_score]
    segs = segments.tolist()
    kept = []
    while pool:
        best = max(range(len(pool)), key=lambda k: pool[k][1])
        i, score = pool.pop(best)
        kept.append((i, score))
        decayed = []
        for j, s in pool:
            inter = max(0.0, min(segs[i][1], segs[j][1]) - max(segs[i][0], segs[j][0]))
            union = (segs[i][1] - segs[i][0] + 1e-6) + (segs[j][1] - segs[j][0] + 1e-6) - inter
            s *= math.exp(-((inter / union) ** 2) / sigma)
            if s >= min_score:
                decayed.append((j, s))
        pool = decayed
    return kept


@pytest.mark.parametrize("sigma, min_score", [(0.7, 0.0), (0.5, 0.001), (0.3, 0.2)])
def test_soft_nms_matches_textbook(sigma, min_score):
    g = torch.Generator().manual_seed(int(sigma * 10))
    starts = torch.rand(150, generator=g) * 50
    segments = torch.stack((starts, starts + 0.5 + torch.rand(150, generator=g) * 10), dim=1)
    scores = torch.rand(150, generator=g)
    keep, kept_scores = soft_nms(segments, scores, sigma, min_score)
    reference = textbook_soft_nms(segments, scores, sigma, min_score)
    assert keep.tolist() == [i for i, _ in reference]
    assert torch.allclose(kept_scores, torch.tensor([s for _, s in reference]), atol=1e-6)
    assert (kept_scores[:-1] >= kept_scores[1:]).all()


def test_hard_nms_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    starts = torch.rand(300, generator=g) * 100
    segments = torch.stack((starts, starts + 1 + torch.rand(300, generator=g) * 15), dim=1)
    scores, labels = torch.rand(300, generator=g), torch.randint(0, 4, (300,), generator=g)
    post = TADPostProcessor(nms_method="nms", iou_threshold=0.4, max_seg_num=1000)
    got = post.nms(Detections(segments, scores, labels))
    expected = []
    for c in range(4):
        kept = []
        for i in sorted((i for i in range(300) if labels[i] == c), key=lambda i: -scores[i].item()):
            a = segments[i].tolist()
            ious = []
            for j in kept:
                b = segments[j].tolist()
                inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
                ious.append(inter / ((a[1] - a[0]) + (b[1] - b[0]) - inter))
            if all(iou <= 0.4 for iou in ious):
                kept.append(i)
        expected += kept
    expected.sort(key=lambda i: -scores[i].item())
    assert torch.equal(got.scores, scores[expected]) and torch.equal(got.labels, labels[expected])
    top5 = TADPostProcessor(nms_method="nms", iou_threshold=0.4, max_seg_num=5)
    capped = top5.nms(Detections(segments, scores, labels))
    assert torch.equal(capped.scores, got.scores[:5])


def two_windows() -> list[Detections]:
    """Windows of 40 steps (0.5 s each) at 0 s and 10 s of a 30 s video; one action is seen by both."""
    labels = torch.tensor([1, 0])
    first = Detections(torch.tensor([[24.0, 34.0], [0.0, 4.0]]), torch.tensor([0.9, 0.3]), labels)
    second = Detections(torch.tensor([[4.0, 14.0], [30.0, 50.0]]), torch.tensor([0.8, 0.5]), labels)
    return [first, second]


def test_merge_windows_hard_nms():
    post = TADPostProcessor(nms_method="nms", iou_threshold=0.5)
    video = post.merge_windows(two_windows(), window_offsets=[0.0, 10.0], seconds_per_step=0.5, duration=30.0)
    assert video.segments.tolist() == [[12.0, 17.0], [25.0, 30.0], [0.0, 2.0]]  # the last one clipped at 30 s
    assert torch.allclose(video.scores, torch.tensor([0.9, 0.5, 0.3]))
    assert video.labels.tolist() == [1, 0, 0]


def test_merge_windows_soft_nms():
    """Soft-NMS keeps the duplicate but decays it by exp(-1 / sigma); other classes are untouched."""
    post = TADPostProcessor()
    video = post.merge_windows(two_windows(), [0.0, 10.0], [0.5, 0.5], duration=30.0)
    assert torch.allclose(video.scores, torch.tensor([0.9, 0.5, 0.3, 0.8 * math.exp(-1 / 0.7)]))
    assert video.segments[3].tolist() == [12.0, 17.0] and video.labels.tolist() == [1, 0, 0, 1]
    with pytest.raises(ValueError, match="one offset"):
        post.merge_windows(two_windows(), [0.0], 0.5, duration=30.0)


def test_a_video_seen_whole_is_clipped_after_nms_and_windows_before():
    """OpenTAD: a resized video (ActivityNet) is NMSed on its head's unclipped segments and converted to seconds
    and clipped after (single_stage.py, post_processing/utils.py convert_to_seconds); sliding windows are
    converted and clipped per window, then NMSed together (test_engine.py)."""
    post = TADPostProcessor(nms_method="nms", iou_threshold=0.7, multiclass=False)
    window = Detections(torch.tensor([[-5.0, 10.0], [0.0, 10.0]]), torch.tensor([0.9, 0.8]), torch.zeros(2).long())
    whole = post.merge_windows([window], [0.0], 1.0, duration=20.0)  # one window: the video seen whole
    assert whole.segments.tolist() == [[0.0, 10.0], [0.0, 10.0]]  # IoU 10/15 < 0.7 before clipping: both kept
    cut = post.merge_windows([window], [0.0], 1.0, duration=20.0, whole_video=False)
    assert cut.segments.tolist() == [[0.0, 10.0]] and cut.scores.tolist() == [pytest.approx(0.9)]


def test_one_class_decode_keeps_every_point():
    """OpenTAD's one-class branch applies no pre-NMS threshold or top-k: every valid point, best first."""
    outputs = manual_outputs()
    outputs = ActionFormerOutputs(
        [lg[..., :1] for lg in outputs.cls_logits], outputs.reg_offsets, outputs.masks, outputs.points, outputs.strides
    )
    (dets,) = TADPostProcessor(pre_nms_thresh=0.5, pre_nms_topk=2).decode(outputs)
    # valid points: 3 of level 1 (0.9, 0.2, 0.0) and 2 of level 2 (0.05, 0.0005)
    assert torch.allclose(dets.scores, torch.tensor([0.9, 0.2, 0.05, 0.0005, 0.0]), atol=1e-5)
    assert dets.labels.tolist() == [0] * 5


def test_class_agnostic_voting_and_video_class_fusion():
    """ActivityNet: class-agnostic soft-NMS with voting, then proposals x the top-2 video classes."""
    post = TADPostProcessor(multiclass=False, voting_thresh=0.5, max_seg_num=100, min_score=0.001)
    segments = torch.tensor([[0.0, 10.0], [2.0, 12.0]])
    proposals = Detections(segments, torch.tensor([0.9, 0.1]), torch.zeros(2, dtype=torch.long))
    video = post.merge_windows([proposals], [0.0], 1.0, duration=20.0)
    # IoU 8/12 >= 0.5: both become (0.9 * [0, 10] + 0.1 * [2, 12]) / 1.0
    assert torch.allclose(video.segments, torch.tensor([[0.2, 10.2], [0.2, 10.2]]))
    assert torch.allclose(video.scores, torch.tensor([0.9, 0.1 * math.exp(-((8 / 12) ** 2) / 0.7)]))
    fused = post.fuse_video_classes(video, torch.tensor([0.1, 0.7, 0.05, 0.2]))
    assert fused.labels.tolist() == [1, 1, 3, 3]
    assert torch.allclose(fused.scores, torch.cat([video.scores * 0.7, video.scores * 0.2]))
    assert torch.equal(fused.segments, video.segments.repeat(2, 1))


def test_padded_input_masked_or_passed_on_as_opentad():
    """mask_padded_input zeroes the features of padded steps before the projection (the outputs then do not
    depend on them); false passes them on, as OpenTAD's ActionFormer (no mask reaches its backbone), so the valid
    steps next to the padding change with them."""
    x = torch.randn(1, C_IN, T, generator=torch.Generator().manual_seed(4))
    mask = torch.ones(1, T, dtype=torch.bool)
    mask[:, T // 2 :] = False
    other = x.clone()
    other[..., T // 2 :] = torch.randn(C_IN, T - T // 2)
    for masked in (True, False):
        head = tiny_head(mask_padded_input=masked).eval()
        with torch.no_grad():
            a, b = head(x, mask), head(other, mask)
        valid = a.masks[0][0]
        changed = (a.cls_logits[0][0][valid] - b.cls_logits[0][0][valid]).abs().max()
        assert (changed == 0) if masked else (changed > 1e-4)
