"""The localiser's person AP against a direct computation of COCO's AP (101 recall points, greedy matching by
score, the best-IoU unmatched ground truth) written here from the COCO definition, and its DDP de-duplication."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_modules.metrics.frame_ap import box_iou
from lightning_modules.metrics.person_ap import PersonAP


def coco_ap(
    frames: list[tuple[np.ndarray, np.ndarray, np.ndarray]], iou: float, max_dets: int = 100
) -> float:
    """COCO AP of one class at one IoU: per frame, the ``max_dets`` best detections in score order each take
    the unmatched ground truth of highest IoU >= ``iou``; precision made monotone and read at recall 0:0.01:1."""
    scored = []  # (score, true positive)
    total = 0
    for boxes, scores, truth in frames:
        total += len(truth)
        order = np.argsort(-scores, kind="stable")[:max_dets]
        used = np.zeros(len(truth), bool)
        overlaps = box_iou(boxes[order], truth) if len(truth) else np.zeros((len(order), 0))
        for row, d in enumerate(order):
            best, best_iou = -1, iou
            for g in range(len(truth)):
                if not used[g] and overlaps[row, g] >= best_iou:
                    best, best_iou = g, overlaps[row, g]
            if best >= 0:
                used[best] = True
            scored.append((scores[d], best >= 0))
    scored.sort(key=lambda s: -s[0])
    tp = np.cumsum([s[1] for s in scored])
    fp = np.cumsum([not s[1] for s in scored])
    recall = tp / total
    precision = tp / np.maximum(tp + fp, np.finfo(float).eps)
    for i in range(len(precision) - 2, -1, -1):
        precision[i] = max(precision[i], precision[i + 1])
    points = []
    for r in np.linspace(0, 1, 101):
        above = np.searchsorted(recall, r, side="left")
        points.append(precision[above] if above < len(precision) else 0.0)
    return float(np.mean(points))


def random_frames(seed: int, count: int = 12) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(count):
        truth = rng.uniform(0, 0.5, (rng.integers(1, 4), 2))
        truth = np.concatenate([truth, truth + rng.uniform(0.1, 0.5, truth.shape)], 1)
        near = truth[rng.integers(0, len(truth), 15)] + rng.normal(0, 0.04, (15, 4))
        near = np.concatenate([np.minimum(near[:, :2], near[:, 2:]), np.maximum(near[:, :2], near[:, 2:])], 1)
        far = rng.uniform(0, 0.5, (10, 2))
        boxes = np.concatenate([near, np.concatenate([far, far + 0.2], 1)])
        frames.append((boxes, rng.uniform(0, 1, len(boxes)), truth))
    return frames


def fed(metric: PersonAP, frames, keys) -> PersonAP:
    metric.update(
        [torch.tensor(f[0]) for f in frames], [torch.tensor(f[1]) for f in frames],
        [torch.tensor(f[2]) for f in frames], [k[0] for k in keys], [k[1] for k in keys],
    )  # fmt: skip
    return metric


@pytest.mark.parametrize("seed", [0, 1])
def test_person_ap_equals_a_direct_coco_computation(seed):
    frames = random_frames(seed)
    out = fed(PersonAP(), frames, [(i // 4, 900 + i) for i in range(len(frames))]).compute()
    assert out["person_AP@0.5"].item() == pytest.approx(coco_ap(frames, 0.5), abs=1e-6)
    strict = np.mean([coco_ap(frames, t) for t in np.linspace(0.5, 0.95, 10)])
    assert out["person_AP@0.5:0.95"].item() == pytest.approx(strict, abs=1e-6)
    assert 0.05 < out["person_AP@0.5"].item() < 0.95  # neither trivial nor empty


def test_a_repeated_keyframe_counts_once_and_frames_without_persons_are_left_out():
    frames = random_frames(2, 6)
    keys = [(0, 902 + i) for i in range(6)]
    once = fed(PersonAP(), frames, keys).compute()["person_AP@0.5"].item()
    # the sampler's padding repeats a keyframe; a frame without a person (all its boxes would be false
    # positives) is not scored, as the official meter drops it
    empty = (frames[0][0], np.ones(len(frames[0][0])), np.zeros((0, 4)))
    again = fed(PersonAP(), [*frames, frames[1], empty], [*keys, keys[1], (1, 902)]).compute()
    assert again["person_AP@0.5"].item() == pytest.approx(once, abs=1e-9)
    assert once == pytest.approx(coco_ap(frames, 0.5), abs=1e-6)


def test_no_ground_truth_gives_nan():
    frames = [(np.array([[0.1, 0.1, 0.4, 0.4]]), np.array([0.9]), np.zeros((0, 4)))]
    assert torch.isnan(fed(PersonAP(), frames, [(0, 1)]).compute()["person_AP@0.5"])
