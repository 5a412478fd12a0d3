"""UCF101-24 / JHMDB metrics: tube IoU, tube NMS and linking on hand sequences, video-mAP of hand cases, and the
frame/video Metric (a perfect detector, a repeated frame)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_modules.metrics.video_map import (
    FrameVideoMAP,
    Tube,
    TubeLinking,
    tube_iou,
    tube_nms,
    video_map,
)

X = (0.0, 0.0, 0.4, 0.4)
P, Q = (0.1, 0.1, 0.3, 0.5), (0.6, 0.1, 0.8, 0.5)


def tube(frames, box=X, score=1.0):
    frames = np.asarray(list(frames), dtype=np.int64)
    boxes = (
        np.tile(np.asarray(box, dtype=np.float64), (len(frames), 1)) if np.ndim(box) == 1 else np.asarray(box)
    )
    return Tube(frames, boxes, score)


def link(rows, **options):
    """rows (frame, box, score) -> tubes, by TubeLinking(min_length=1, tube_nms_iou=None, **options)."""
    options = {"min_length": 1, "tube_nms_iou": None, **options}
    frames = np.array([r[0] for r in rows])
    return TubeLinking(**options).link(frames, np.array([r[1] for r in rows]), np.array([r[2] for r in rows]))


def test_tube_iou_by_hand():
    a = tube(range(1, 5))
    # Frames 3..6 against 1..4: overlap 2 frames of 6 -> 1/3, spatial IoU 1 on both.
    assert tube_iou(a, tube(range(3, 7))) == pytest.approx(1 / 3)
    assert tube_iou(tube(range(3, 7)), a) == pytest.approx(1 / 3)
    # Half-height boxes on the overlap: spatial IoU 0.08 / 0.16 = 1/2 -> 1/6.
    assert tube_iou(a, tube(range(3, 7), (0.0, 0.0, 0.4, 0.2))) == pytest.approx(1 / 6)
    assert tube_iou(a, tube(range(5, 7))) == 0.0
    # A tube without a box on frame 3: temporal IoU 4/4, spatial (1 + 1 + 0 + 1) / 4.
    assert tube_iou(a, tube([1, 2, 4])) == pytest.approx(0.75)


def test_tube_nms():
    first, same, later = (
        tube(range(1, 5), score=0.9),
        tube(range(1, 5), score=0.8),
        tube(range(3, 7), score=0.95),
    )
    # later (IoU 1/3 with first) is kept first; first is dropped at 0.3 (1/3 > 0.3), kept at 0.4; same goes.
    assert tube_nms([first, same, later], 0.3) == [2]
    assert tube_nms([first, same, later], 0.4) == [2, 0]


def test_linking_two_people_and_a_duplicate_box():
    # Every frame: P (0.9), Q (0.6) far away, and P' = P trimmed (IoU 0.95 with P, 0.8). NMS at 0.6 removes P',
    # so two tubes over frames 1..5 with scores 0.9 and 0.6; without NMS P' makes a third tube (0.8).
    rows = [r for f in range(1, 6) for r in ((f, P, 0.9), (f, Q, 0.6), (f, (0.1, 0.1, 0.3, 0.48), 0.8))]
    tubes = link(rows)
    assert [t.score for t in tubes] == pytest.approx([0.9, 0.6])
    assert all(t.frames.tolist() == [1, 2, 3, 4, 5] for t in tubes)
    np.testing.assert_allclose(tubes[0].boxes, np.tile(P, (5, 1)))
    np.testing.assert_allclose(tubes[1].boxes, np.tile(Q, (5, 1)))
    assert [t.score for t in link(rows, nms_iou=None)] == pytest.approx([0.9, 0.8, 0.6])


@pytest.mark.parametrize(("u_score", "v_score"), [(0.9, 0.5), (0.5, 0.9)])
def test_the_tube_of_higher_mean_score_links_first(u_score, v_score):
    # Frame 1: U and V (IoU 0.54, both survive NMS at 0.6). Frames 2, 3: one box M with IoU 0.74 with both.
    # The better tube takes M on frame 2 and goes on; the other (max_gap 0) ends after frame 1.
    u, v, m = (0.0, 0.0, 0.4, 0.4), (0.12, 0.0, 0.52, 0.4), (0.06, 0.0, 0.46, 0.4)
    tubes = link([(1, u, u_score), (1, v, v_score), (2, m, 0.7), (3, m, 0.7)])
    best, other = (u, v) if u_score > v_score else (v, u)
    assert len(tubes) == 2
    long, short = sorted(tubes, key=lambda t: -len(t.frames))
    assert long.frames.tolist() == [1, 2, 3] and short.frames.tolist() == [1]
    np.testing.assert_allclose(long.boxes[0], best)
    np.testing.assert_allclose(short.boxes[0], other)
    assert long.score == pytest.approx((max(u_score, v_score) + 1.4) / 3)


def test_gap_tolerance_interpolates_the_missing_frame():
    # No detection on frame 3. max_gap 0: two tubes, frames 1-2 (mean 0.65) and 4-5 (0.95). max_gap 1: one tube
    # 1..5 whose frame-3 box is the mean of the frame-2 and frame-4 boxes; score (0.6 + 0.7 + 0.9 + 1.0) / 4.
    shifted = tuple(v + 0.04 for v in P)
    rows = [(1, P, 0.6), (2, P, 0.7), (4, shifted, 0.9), (5, P, 1.0)]
    split = link(rows)
    assert [t.frames.tolist() for t in split] == [[1, 2], [4, 5]]
    assert [t.score for t in split] == pytest.approx([0.65, 0.95])
    (whole,) = link(rows, max_gap=1)
    assert whole.frames.tolist() == [1, 2, 3, 4, 5] and whole.score == pytest.approx(0.8)
    np.testing.assert_allclose(whole.boxes[2], [v + 0.02 for v in P])
    assert link(rows, max_gap=1, min_length=6) == [] and len(link(rows, min_length=2, min_score=0.9)) == 1


def test_top_k_candidates_per_frame():
    # Three disjoint boxes on one frame; top_k 2 keeps the two best scores.
    rows = [(1, P, 0.3), (1, Q, 0.9), (1, (0.1, 0.6, 0.3, 0.9), 0.5)]
    assert sorted(t.score for t in link(rows, top_k=2)) == pytest.approx([0.5, 0.9])


def test_video_map_of_a_hand_case():
    # Class 0: GT tubes in videos 0 and 1. d1 (0.9) = the video-0 tube (IoU 1); d2 (0.8) overlaps the video-1
    # tube over 2 of 6 frames (IoU 1/3); d3 (0.7) is in video 2, which has no GT. At 0.2: TP, TP, FP ->
    # precision 1, 1, 2/3 at recall 1/2, 1, 1 -> AP 1. At 0.5 and above: TP, FP, FP -> AP 1/2.
    # Class 1: a GT tube, no detection -> AP 0. Class 2: no GT -> left out.
    gt = [(0, 0, tube(range(1, 5))), (1, 0, tube(range(1, 5))), (1, 1, tube(range(1, 5)))]
    det = [
        (0, 0, tube(range(1, 5), score=0.9)),
        (1, 0, tube(range(3, 7), score=0.8)),
        (2, 0, tube([1], score=0.7)),
    ]
    det.append((0, 2, tube(range(1, 5), score=0.6)))
    expected = {
        "video_mAP@0.2": 0.5,
        "video_mAP@0.5": 0.25,
        "video_mAP@0.75": 0.25,
        "video_mAP@0.5:0.95": 0.25,
    }
    assert video_map(det, gt, classes=[0, 1, 2]) == pytest.approx(expected)
    perfect = [(v, c, Tube(t.frames, t.boxes, 0.5)) for v, c, t in gt]
    assert video_map(perfect, gt, classes=[0, 1, 2]) == pytest.approx(dict.fromkeys(expected, 1.0))


def frame_entry(gt_rows, num_classes=2, wrong=0.01):
    """A detector that finds every GT box: its class scores 0.9, the others ``wrong``."""
    scores = torch.full((len(gt_rows), num_classes), wrong)
    for i, (_, label, _) in enumerate(gt_rows):
        scores[i, label] = 0.9
    boxes = torch.tensor([box for box, _, _ in gt_rows]).reshape(-1, 4)
    target = {
        "boxes": boxes.clone(),
        "labels": torch.tensor([label for _, label, _ in gt_rows]),
        "tube_ids": torch.tensor([tube_id for _, _, tube_id in gt_rows]),
    }
    return {"boxes": boxes, "scores": scores}, target


def test_perfect_detector_scores_one():
    # Video 0: class 0 person P on frames 1..6. Video 1: class 1 person Q on frames 1..6 and class 0 person P on
    # frames 3..6 (two tubes). Wrong-class scores (0.01) link into low tubes that rank below every true one.
    metric = FrameVideoMAP(num_classes=2, linking=TubeLinking(min_length=3))
    for video, frame in [(v, f) for v in (0, 1) for f in range(1, 7)]:
        rows = [(P, 0, 0)] if video == 0 else [(Q, 1, 0)] + ([(P, 0, 1)] if frame >= 3 else [])
        pred, target = frame_entry(rows)
        metric.update([pred], [target], [video], [frame])
    got = {k: v.item() for k, v in metric.compute().items()}
    keys = ("frame_mAP@0.5", "video_mAP@0.2", "video_mAP@0.5", "video_mAP@0.75", "video_mAP@0.5:0.95")
    assert got == pytest.approx(dict.fromkeys(keys, 1.0))


def test_a_repeated_frame_counts_once():
    # Frame 17: GT P found (0.9). Frame 18: GT P missed, a false positive on Q (0.9 for class 0, scored after
    # frame 17's by input order). TP, FP at recall 1/2 -> AP 1/2; frame 17 counted twice: TP, TP, FP -> 2/3.
    metric = FrameVideoMAP(num_classes=2, video_map=False)
    hit = frame_entry([(P, 0, 0)])
    miss = ({"boxes": torch.tensor([Q]), "scores": torch.tensor([[0.9, 0.0]])}, frame_entry([(P, 0, 0)])[1])
    metric.update([hit[0], miss[0]], [hit[1], miss[1]], [4, 4], [17, 18])
    metric.update([hit[0]], [hit[1]], torch.tensor([4]), torch.tensor([17]))
    assert {k: v.item() for k, v in metric.compute().items()} == {"frame_mAP@0.5": pytest.approx(0.5)}


def test_frame_map_of_a_hand_case():
    # Frame 1: GT P (class 0); detections P (0.9 for class 0) and Q (0.8 for class 0, an FP). Frame 2: GT Q
    # (class 0), detected as Q with 0.7. Class 0: TP, FP, TP -> precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 ->
    # AP 1/2 + 1/2 * 2/3 = 5/6. Class 1 (all scores 0) has no GT and is left out.
    metric = FrameVideoMAP(num_classes=2, video_map=False)
    frame1 = {"boxes": torch.tensor([P, Q]), "scores": torch.tensor([[0.9, 0.0], [0.8, 0.0]])}
    frame2 = {"boxes": torch.tensor([Q]), "scores": torch.tensor([[0.7, 0.0]])}
    targets = [{"boxes": torch.tensor([box]), "labels": torch.tensor([0])} for box in (P, Q)]
    metric.update([frame1, frame2], targets, [0, 0], [1, 2])
    assert metric.compute()["frame_mAP@0.5"].item() == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="tube_ids"):
        FrameVideoMAP(num_classes=2).update([frame1], targets[:1], [0], [1])
