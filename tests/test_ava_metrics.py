"""AVA frame-mAP: hand-worked cases, a direct-loop reference, the 50-per-keyframe rule, the readers, the Metric
under DDP repeats, and the evaluate-ava scorer."""

from __future__ import annotations

import heapq
import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from datamodules.ava_annotations import read_excluded_timestamps, read_label_map
from datamodules.base import AnnotationError
from lightning_modules.metrics.ava import (
    AVAFrameMAP,
    ava_frame_map,
    read_ava_detections,
    read_ava_ground_truth,
)
from lightning_modules.metrics.frame_ap import (
    IOU_THRESHOLDS,
    FrameBoxes,
    box_iou,
    frame_average_precision,
    keep_top_detections,
    write_ava_detections,
)
from lightning_modules.tools.evaluate_ava import main

A, B = (0.0, 0.0, 0.4, 0.4), (0.6, 0.6, 1.0, 1.0)


def table(rows, scored=True):
    """Rows (frame, x1, y1, x2, y2, label[, score]) -> FrameBoxes."""
    return FrameBoxes(
        frame=np.array([r[0] for r in rows], dtype=np.int64),
        boxes=np.array([r[1:5] for r in rows], dtype=np.float64).reshape(-1, 4),
        labels=np.array([r[5] for r in rows], dtype=np.int64),
        scores=np.array([r[6] for r in rows], dtype=np.float64) if scored else None,
    )


def ap_at(det, gt, classes=(1,), thresholds=(0.5,)):
    return frame_average_precision(table(det), table(gt, scored=False), list(classes), thresholds)


def test_box_iou_has_no_pixel_offset():
    got = box_iou(np.array([[0, 0, 0.5, 0.5], [0.2, 0.2, 0.2, 0.6]]), np.array([[0.25, 0.25, 0.75, 0.75], A]))
    # 0.25^2 = 0.0625 over 0.25 + 0.25 - 0.0625; A inside: 0.4^2 / 0.5^2; an empty box has IoU 0, not NaN.
    np.testing.assert_allclose(got, [[0.0625 / 0.4375, 0.16 / 0.25], [0.0, 0.0]])


def test_duplicate_detection_is_a_false_positive():
    # GT A, B. d1 = A (TP), d2 = A shifted (IoU 0.9 with A, taken: FP), d3 = B (TP). Precision 1, 1/2, 2/3;
    # recall 1/2, 1/2, 1; made monotone 1, 2/3, 2/3 -> AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    gt = [(0, *A, 1), (0, *B, 1)]
    det = [(0, *A, 1, 0.9), (0, 0.0, 0.0, 0.4, 0.36, 1, 0.8), (0, *B, 1, 0.7)]
    assert ap_at(det, gt)[0, 0] == pytest.approx(5 / 6)


def test_a_taken_best_match_is_a_false_positive_even_if_another_box_matches():
    # GT A and A2 = (0.1, 0, 0.5, 0.4) overlap (IoU 0.6). d1 = A takes A. d2 = (0.02, 0, 0.42, 0.4) has IoU 0.905
    # with A (taken) and 0.667 with A2: the VOC rule compares it with A only, so it is a false positive.
    # Precision 1, 1/2; recall 1/2, 1/2 -> AP 1/2 (the best-unmatched rule of the ACT tools would give 1).
    gt = [(0, *A, 1), (0, 0.1, 0.0, 0.5, 0.4, 1)]
    det = [(0, *A, 1, 0.9), (0, 0.02, 0.0, 0.42, 0.4, 1, 0.8)]
    assert ap_at(det, gt)[0, 0] == pytest.approx(0.5)


def test_equal_scores_keep_input_order():
    # One GT box; a false positive (on B) and a true positive of equal score. FP first: precision 0, 1/2 at
    # recall 0, 1 -> AP 1/2. TP first: precision 1 at recall 1 -> AP 1.
    gt = [(0, *A, 1)]
    fp, tp = (0, *B, 1, 0.5), (0, *A, 1, 0.5)
    assert ap_at([fp, tp], gt)[0, 0] == pytest.approx(0.5)
    assert ap_at([tp, fp], gt)[0, 0] == pytest.approx(1.0)


def test_classes_without_detections_count_and_classes_without_ground_truth_do_not():
    # Class 1 perfect (AP 1), class 2 has GT and no detection (AP 0), class 3 has no GT (NaN, left out of the
    # mean), and a detection on a frame without GT is a false positive of its class.
    gt = [(0, *A, 1), (0, *B, 2)]
    det = [(0, *A, 1, 0.9), (0, *B, 3, 0.8), (1, *A, 3, 0.7)]
    ap = ap_at(det, gt, classes=(1, 2, 3))[0]
    np.testing.assert_allclose(ap, [1.0, 0.0, np.nan])
    label_map = {1: "stand", 2: "sit", 3: "walk"}
    scores = ava_frame_map(table(det), table(gt, scored=False), label_map)
    assert scores["frame_mAP@0.5"] == pytest.approx(0.5)
    assert math.isnan(scores["per_class"]["walk"]) and scores["per_class"]["sit"] == 0.0


def test_iou_thresholds_from_half_to_095():
    # GT (0, 0, 0.5, 1) and a detection (0, 0, 0.36, 1): IoU 0.36 / 0.5 = 0.72, a hit at 0.5 ... 0.7 (5 of 10
    # thresholds) -> frame_mAP@0.5:0.95 = 0.5.
    scores = ava_frame_map(
        table([(0, 0.0, 0.0, 0.36, 1.0, 1, 0.9)]), table([(0, 0.0, 0.0, 0.5, 1.0, 1)], scored=False), {1: "x"}
    )
    assert scores["frame_mAP@0.5"] == 1.0 and scores["frame_mAP@0.5:0.95"] == pytest.approx(0.5)


def reference_ap(det, gt, classes, threshold):
    """The protocol as a direct loop: per class, detections by score (stable), each compared with the GT of its
    frame and class of highest IoU (first on ties), VOC AP with the precision envelope made by a loop."""

    def iou(a, b):
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
        return w * h / union if union > 0 else 0.0

    out = []
    for c in classes:
        positives = sum(g[5] == c for g in gt)
        if not positives:
            out.append(math.nan)
            continue
        used, hits = set(), []
        for d in sorted((d for d in det if d[5] == c), key=lambda d: -d[6]):
            best, best_iou = None, -1.0
            for k, g in enumerate(gt):
                if g[5] == c and g[0] == d[0] and iou(d[1:5], g[1:5]) > best_iou:
                    best, best_iou = k, iou(d[1:5], g[1:5])
            hits.append(best is not None and best_iou >= threshold and best not in used)
            used |= {best} if hits[-1] else set()
        tp = np.cumsum(hits)
        recall = [0.0, *(tp / positives), 1.0]
        precision = [0.0, *(tp / np.arange(1, len(hits) + 1)), 0.0]
        for i in range(len(precision) - 2, -1, -1):
            precision[i] = max(precision[i], precision[i + 1])
        out.append(sum((recall[i] - recall[i - 1]) * precision[i] for i in range(1, len(recall))))
    return out


def random_problem(rng, frames=6, classes=3):
    gt, det = [], []
    for f in range(frames):
        people = [
            tuple(np.round(np.sort(rng.uniform(0, 1, (2, 2)), 0).T.ravel()[[0, 2, 1, 3]], 2)) for _ in "ab"
        ]
        for box in people:
            gt += [(f, *box, int(c)) for c in rng.choice(np.arange(1, classes + 1), 2, replace=False)]
            for _ in range(rng.integers(0, 4)):
                jitter = np.clip(np.array(box) + rng.normal(0, 0.05, 4), 0, 1)
                det.append((f, *jitter, int(rng.integers(1, classes + 2)), round(float(rng.random()), 1)))
    return det, gt


@pytest.mark.parametrize("seed", range(4))
def test_matches_the_direct_loop_reference(seed):
    det, gt = random_problem(np.random.default_rng(seed))
    got = ap_at(det, gt, classes=(1, 2, 3, 4), thresholds=IOU_THRESHOLDS)  # scores rounded: many ties
    for t, threshold in enumerate(IOU_THRESHOLDS):
        np.testing.assert_allclose(got[t], reference_ap(det, gt, (1, 2, 3, 4), threshold), atol=1e-12)


# The 50-per-keyframe rule -----------------------------------------------------------------------------------


def heap_rule(scores, labels, boxes, capacity):
    """The official reader's rule, run directly on every row: a min-heap filled in order, replaced on a strictly
    higher score."""
    heap = []
    for i, (s, c, (x1, y1, x2, y2)) in enumerate(zip(scores, labels, boxes)):
        entry = (s, c, y1, x1, y2, x2, i)
        if len(heap) < capacity:
            heapq.heappush(heap, entry)
        elif s > heap[0][0]:
            heapq.heapreplace(heap, entry)
    return sorted(e[-1] for e in heap)


def test_keep_top_detections_by_hand():
    boxes = np.tile([0.0, 0.0, 1.0, 1.0], (5, 1))
    assert keep_top_detections(np.array([0.1, 0.9, 0.5, 0.5, 0.3]), np.ones(5), boxes, 3).tolist() == [
        1,
        2,
        3,
    ]
    # A tie across the cut: a later equal score never enters a full heap ...
    assert keep_top_detections(
        np.array([0.9, 0.5, 0.5, 0.5]), np.array([1, 2, 1, 3]), boxes[:4], 2
    ).tolist() == [
        0,
        1,
    ]
    # ... and a higher score evicts the smallest (score, label, ...) entry: the label-1 row, listed second.
    assert keep_top_detections(np.array([0.5, 0.5, 0.9]), np.array([2, 1, 5]), boxes[:3], 2).tolist() == [
        0,
        2,
    ]
    assert keep_top_detections(np.array([0.5, 0.1]), np.ones(2), boxes[:2], None).tolist() == [0, 1]


@pytest.mark.parametrize("seed", range(3))
def test_keep_top_detections_equals_the_heap_on_every_row(seed):
    rng = np.random.default_rng(seed)
    for _ in range(30):
        n, capacity = int(rng.integers(1, 90)), int(rng.integers(1, 60))
        scores = np.round(rng.random(n), int(rng.integers(0, 3)))  # coarse scores tie across the cut
        labels, boxes = rng.integers(1, 4, n), np.round(rng.random((n, 4)), 1)
        expected = heap_rule(scores.tolist(), labels.tolist(), boxes.tolist(), capacity)
        assert keep_top_detections(scores, labels, boxes, capacity).tolist() == expected


# Files ------------------------------------------------------------------------------------------------------

LABEL_MAP = 'item {\n  name: "stand"\n  id: 1\n}\nitem {\n  name: "sit"\n  id: 2\n}\nitem {\n  name: "walk"\n  label_id: 3\n}\n'


def write(path, text):
    path.write_text(text)
    return path


def csv_text(rows):
    return "".join(",".join(str(v) for v in row) + "\n" for row in rows)


def files(tmp_path, gt_rows, det_rows, excluded_timestamps=()):
    return (
        write(tmp_path / "label_map.pbtxt", LABEL_MAP),
        write(tmp_path / "gt.csv", csv_text(gt_rows)),
        write(tmp_path / "det.csv", csv_text(det_rows)),
        write(tmp_path / "excluded.csv", csv_text(excluded_timestamps)),
    )


def test_read_label_map(tmp_path):
    assert read_label_map(write(tmp_path / "l.pbtxt", LABEL_MAP)) == {1: "stand", 2: "sit", 3: "walk"}
    with pytest.raises(AnnotationError, match=r"l2.pbtxt:4: .*name.*id"):
        read_label_map(write(tmp_path / "l2.pbtxt", 'item {\n name: "a"\n id: 1 }\nitem {\n name: "b"\n}\n'))
    with pytest.raises(AnnotationError, match="listed once"):
        read_label_map(write(tmp_path / "l3.pbtxt", 'item { name: "a" id: 1 }\nitem { name: "b" id: 1 }\n'))


def test_excluded_timestamps_remove_ground_truth_and_detections(tmp_path):
    # Keyframe 0903 holds a GT box no detection finds and a false positive. Counted: d(0902) TP, d(0903, on B)
    # FP -> precision 1, 1/2 at recall 1/2, 1/2 -> AP 1/2. Excluded: both vanish and the detector is perfect.
    gt_rows = [("v1", "0902", *A, 1, 0), ("v1", "0903", *A, 1, 0)]
    det_rows = [
        ("v1", "0902", *A, 1, 0.9),
        ("v1", "903", *B, 1, 0.8),
    ]  # "903" and "0903" are the same keyframe
    label_map, gt_path, det_path, ex_path = files(tmp_path, gt_rows, det_rows, [("v1", "0903")])
    lm = read_label_map(label_map)
    for excluded_timestamps, expected in ((frozenset(), 0.5), (read_excluded_timestamps(ex_path), 1.0)):
        gt = read_ava_ground_truth(gt_path, lm, excluded_timestamps)
        det = read_ava_detections(det_path, gt, lm, excluded_timestamps)
        assert ava_frame_map(det, gt, lm)["per_class"]["stand"] == pytest.approx(expected)
    assert read_excluded_timestamps(ex_path) == {("v1", 903)}


def test_fifty_detections_per_keyframe_across_evaluated_classes(tmp_path):
    # 50 "walk" detections (score 0.9) fill the keyframe, so the true "stand" detection (0.1) is cut: AP 0 for
    # stand. Rows of a class outside the label map (id 7) are dropped before the cap, so 50 such rows cut nothing.
    gt_rows = [("v1", "0902", *A, 1, 0)]
    walk = [("v1", "0902", *B, 3, 0.9)] * 50
    label_map, gt_path, det_path, _ = files(tmp_path, gt_rows, [*walk, ("v1", "0902", *A, 1, 0.1)])
    lm = read_label_map(label_map)
    gt = read_ava_ground_truth(gt_path, lm)
    assert ava_frame_map(read_ava_detections(det_path, gt, lm), gt, lm)["per_class"]["stand"] == 0.0
    uncapped = read_ava_detections(det_path, gt, lm, max_detections_per_keyframe=None)
    assert len(uncapped.scores) == 51 and ava_frame_map(uncapped, gt, lm)["per_class"]["stand"] == 1.0
    other = [("v1", "0902", *B, 7, 0.9)] * 50
    write(det_path, csv_text([*other, ("v1", "0902", *A, 1, 0.1)]))
    with pytest.warns(UserWarning, match=r"50 detections of 1 action ids outside the label map"):
        det = read_ava_detections(det_path, gt, lm)
    assert ava_frame_map(det, gt, lm)["per_class"]["stand"] == 1.0


def test_detection_reader_drops_empty_boxes_and_flags_unknown_keyframes(tmp_path):
    gt_rows = [("v1", "0902", *A, 1, 0)]
    det_rows = [
        ("v1", "0902", 0.2, 0.2, 0.2, 0.5, 1, 0.95),
        ("v1", "0902", *A, 1, 0.9),
        ("v2", "0902", *A, 1, 0.8),
    ]
    label_map, gt_path, det_path, _ = files(tmp_path, gt_rows, det_rows)
    lm = read_label_map(label_map)
    gt = read_ava_ground_truth(gt_path, lm)
    with pytest.warns(UserWarning) as caught:
        det = read_ava_detections(det_path, gt, lm)
    messages = " ".join(str(w.message) for w in caught)
    assert "1 detections with an empty box" in messages and "on 1 keyframes the ground truth" in messages
    assert det.frames == (("v1", 902), ("v2", 902)) and det.scores.tolist() == [0.9, 0.8]
    # The empty box is neither TP nor FP; the v2 row is an FP: precision 1, 1/2 -> AP 1.
    assert ava_frame_map(det, gt, lm)["per_class"]["stand"] == 1.0


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (("v1", "0902", 0.1, 0.1, 0.5, 0.5, 1), r"det.csv:2: expected 8 columns"),
        (("v1", "0902", 0.5, 0.1, 0.4, 0.5, 1, 0.3), r"det.csv:2: .*reversed"),
        (("v1", "0902", 0.1, 0.1, 1.5, 0.5, 1, 0.3), r"det.csv:2: .*outside \[0, 1\].*normalised"),
        (("v1", "t902", 0.1, 0.1, 0.5, 0.5, 1, 0.3), r"det.csv:2: timestamp must be an integer"),
        (("v1", "0902", 0.1, 0.1, 0.5, 0.5, 1, "nan"), r"det.csv:2: score must be a finite number"),
    ],
)
def test_malformed_detection_rows_name_file_line_and_fix(tmp_path, row, message):
    label_map, gt_path, det_path, _ = files(
        tmp_path, [("v1", "0902", *A, 1, 0)], [("v1", "0902", *A, 1, 0.5), row]
    )
    lm = read_label_map(label_map)
    with pytest.raises(AnnotationError, match=message):
        read_ava_detections(det_path, read_ava_ground_truth(gt_path, lm), lm)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (("v1", "0902", 0.1, 0.1, 0.5), r"gt.csv:1: expected 7 or 8 columns"),
        (("v1", "0902", 0.3, 0.1, 0.3, 0.5, 1, 0), r"gt.csv:1: .*empty or reversed"),
        (("v1", "0902", -0.1, 0.1, 0.3, 0.5, 1, 0), r"gt.csv:1: .*outside \[0, 1\]"),
        (("v1", "0902", 0.1, 0.1, 0.3, 0.5, "stand", 0), r"gt.csv:1: action_id must be an integer"),
    ],
)
def test_malformed_ground_truth_rows_name_file_line_and_fix(tmp_path, row, message):
    label_map, gt_path, _, _ = files(tmp_path, [row], [])
    with pytest.raises(AnnotationError, match=message):
        read_ava_ground_truth(gt_path, read_label_map(label_map))


def test_write_and_read_back(tmp_path):
    rows = [("v1", 902, 0.1, 0.2, 0.30000001192092896, 0.4, 1, 1 / 3), ("v1", 1798, *B, 2, 0.25)]
    path = write_ava_detections(tmp_path / "out" / "det.csv", rows)
    assert path.read_text().splitlines()[1] == "v1,1798,0.6,0.6,1.0,1.0,2,0.25"
    gt = read_ava_ground_truth(
        write(tmp_path / "gt.csv", csv_text([("v1", "0902", *A, 1, 0)])), {1: "a", 2: "b"}
    )
    with pytest.warns(UserWarning, match="1 keyframes the ground truth does not list"):
        det = read_ava_detections(path, gt, {1: "a", 2: "b"})
    np.testing.assert_array_equal(det.boxes, [r[2:6] for r in rows])
    assert det.scores.tolist() == [1 / 3, 0.25] and det.frames == (("v1", 902), ("v1", 1798))


# Metric -----------------------------------------------------------------------------------------------------


def keyframe(det, gt, num_classes=4):
    """det [(box, {column: score})], gt [(box, [columns])] -> the preds and target dicts of one keyframe."""
    scores = torch.zeros(len(det), num_classes)
    for i, (_, by_class) in enumerate(det):
        for c, s in by_class.items():
            scores[i, c] = s
    labels = torch.zeros(len(gt), num_classes)
    for i, (_, columns) in enumerate(gt):
        labels[i, columns] = 1
    pred = {"boxes": torch.tensor([b for b, _ in det]).reshape(-1, 4), "scores": scores}
    return pred, {"boxes": torch.tensor([b for b, _ in gt]).reshape(-1, 4), "labels": labels}


def test_metric_hand_case():
    # Column 0 = action 1: keyframe (0, 902) as in test_duplicate_detection_is_a_false_positive -> AP 5/6.
    # Column 1 = action 2: GT on keyframe (1, 903) and no detection -> AP 0. mAP = 5/12.
    metric = AVAFrameMAP(num_classes=4, label_map={1: "stand", 2: "sit"})
    k1 = keyframe([(A, {0: 0.9}), ((0.0, 0.0, 0.4, 0.36), {0: 0.8}), (B, {0: 0.7})], [(A, [0]), (B, [0])])
    k2 = keyframe([], [(A, [1])])
    metric.update([k1[0], k2[0]], [k1[1], k2[1]], torch.tensor([0, 1]), torch.tensor([902, 903]))
    once = {k: v.item() for k, v in metric.compute().items()}
    assert once["frame_mAP@0.5"] == pytest.approx(5 / 12) and once["AP@0.5/stand"] == pytest.approx(5 / 6)
    assert once["AP@0.5/sit"] == 0.0 and set(once) == {"frame_mAP@0.5", "frame_mAP@0.5:0.95", "AP@0.5/stand",
                                                       "AP@0.5/sit"}  # fmt: skip


def test_metric_counts_a_repeated_keyframe_once():
    # Keyframe (0, 902): GT A found (0.9). Keyframe (0, 903): GT A missed, a false positive on B (0.8). TP, FP at
    # recall 1/2 -> AP 1/2. Were the repeated (0, 902) counted again: TP, TP, FP with 3 GT -> AP 2/3.
    metric = AVAFrameMAP(num_classes=1)
    hit, miss = keyframe([(A, {0: 0.9})], [(A, [0])], 1), keyframe([(B, {0: 0.8})], [(A, [0])], 1)
    metric.update([hit[0], miss[0]], [hit[1], miss[1]], [0, 0], [902, 903])
    metric.update([hit[0]], [hit[1]], torch.tensor([0]), torch.tensor([902]))  # as a distributed sampler pads
    assert metric.compute()["frame_mAP@0.5"].item() == pytest.approx(0.5)


def test_metric_keeps_fifty_pairs_per_keyframe_of_evaluated_columns():
    # One box scored for 80 actions; the label map evaluates 60 of them (ids 1..60): the 50 best of those stay.
    scores = torch.linspace(0.01, 0.8, 80)
    metric = AVAFrameMAP(num_classes=80, label_map={i: f"a{i}" for i in range(1, 61)}, per_class=False)
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, 80)}
    metric.update([{"boxes": torch.tensor([A]), "scores": scores[None]}], [target], [3], [902])
    rows = metric.detection_rows(["vid0", "vid1", "vid2", "vid3"])
    assert [r[6] for r in rows] == list(range(11, 61)) and rows[0][:2] == ("vid3", 902)
    assert rows[0][7] == pytest.approx(scores[10].item())


def test_metric_equals_the_scorer_on_its_exported_csv(tmp_path, capsys):
    rng = np.random.default_rng(0)
    det, gt = random_problem(rng, frames=5, classes=3)
    metric = AVAFrameMAP(num_classes=4, label_map={1: "a", 2: "b", 3: "c"})
    for f in range(5):
        dets = [(d[1:5], {d[5] - 1: d[6]}) for d in det if d[0] == f]
        truths = [(g[1:5], [g[5] - 1]) for g in gt if g[0] == f]
        pred, target = keyframe(dets, truths)
        metric.update([pred], [target], [f % 2], [900 + f])
    metric.write_detections(tmp_path / "det.csv", ["va", "vb"])
    gt_rows = [(("va", "vb")[g[0] % 2], 900 + g[0], *g[1:5], g[5], 0) for g in gt]
    write(tmp_path / "gt.csv", csv_text(gt_rows))
    write(
        tmp_path / "l.pbtxt", 'item { name: "a" id: 1 }\nitem { name: "b" id: 2 }\nitem { name: "c" id: 3 }\n'
    )
    code = main(["--label-map", str(tmp_path / "l.pbtxt"), "--ground-truth", str(tmp_path / "gt.csv"),
                 "--detections", str(tmp_path / "det.csv")])  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    computed = {k: v.item() for k, v in metric.compute().items()}
    assert code == 0 and printed["frame_mAP@0.5"] == pytest.approx(computed["frame_mAP@0.5"], abs=1e-6)
    assert printed["frame_mAP@0.5:0.95"] == pytest.approx(computed["frame_mAP@0.5:0.95"], abs=1e-6)
    for name in "abc":
        assert printed["per_class"][name] == pytest.approx(computed[f"AP@0.5/{name}"], abs=1e-6)


def test_exact_under_ddp_padding():
    # Two ranks in one process: torchmetrics' state sync runs with its all-gather answered from both metrics'
    # states. The sampler pads 5 keyframes to 6, so keyframe 0 is evaluated on both ranks.
    rng = np.random.default_rng(1)
    det, gt = random_problem(rng, frames=5, classes=3)
    updates = []
    for f in range(5):
        dets = [(d[1:5], {d[5] - 1: d[6]}) for d in det if d[0] == f]
        updates.append(keyframe(dets, [(g[1:5], [g[5] - 1]) for g in gt if g[0] == f]))
    single = AVAFrameMAP(num_classes=4, label_map={1: "a", 2: "b", 3: "c"})
    for f, (p, t) in enumerate(updates):
        single.update([p], [t], [f], [902])
    expected = {k: v.item() for k, v in single.compute().items()}
    world: list[AVAFrameMAP] = []
    names = []

    def in_process_gather(rank):
        def gather(tensor, group=None):
            name = next(names[rank])
            return [torch.cat(metric.metric_state[name]) for metric in world]

        return gather

    for rank in range(2):
        metric = AVAFrameMAP(
            num_classes=4, label_map={1: "a", 2: "b", 3: "c"}, dist_sync_fn=in_process_gather(rank),
            distributed_available_fn=lambda: True,
        )  # fmt: skip
        for f in DistributedSampler(range(5), num_replicas=2, rank=rank, shuffle=False):
            metric.update([updates[f][0]], [updates[f][1]], [f], [902])
        world.append(metric)
        names.append(itertools.cycle(list(metric.metric_state)))
    for metric in world:
        assert {k: v.item() for k, v in metric.compute().items()} == pytest.approx(expected, nan_ok=True)


# The scorer -------------------------------------------------------------------------------------------------


def test_scorer_prints_one_json_object(tmp_path, capsys):
    # stand: keyframe 0902 as in test_duplicate_detection_is_a_false_positive -> 5/6 at every IoU (exact boxes).
    # sit: its only GT box is on the excluded 0904, so the GT left is 0903's, never detected -> 0.
    # walk: no GT -> null, left out. An id outside the label map (9) is a warning. mAP = (5/6 + 0) / 2 = 5/12.
    gt_rows = [
        ("v1", "0902", *A, 1, 0),
        ("v1", "0902", *B, 1, 1),
        ("v1", "0903", *A, 2, 0),
        ("v1", "0904", *B, 2, 0),
    ]
    det_rows = [
        ("v1", "0902", *A, 1, 0.9), ("v1", "0902", 0.0, 0.0, 0.4, 0.36, 1, 0.8), ("v1", "0902", *B, 1, 0.7),
        ("v1", "0904", *B, 2, 0.95), ("v1", "0902", *A, 3, 0.5), ("v1", "0902", *A, 9, 0.5),
    ]  # fmt: skip
    label_map, gt_path, det_path, ex_path = files(tmp_path, gt_rows, det_rows, [("v1", "0904")])
    code = main(["--label-map", str(label_map), "--ground-truth", str(gt_path), "--detections", str(det_path),
                 "--excluded-timestamps", str(ex_path)])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0 and len(out.strip().splitlines()) == 1
    printed = json.loads(out)
    assert printed.pop("per_class") == pytest.approx({"stand": 5 / 6, "sit": 0.0, "walk": None})
    assert printed == pytest.approx({"frame_mAP@0.5": 5 / 12, "frame_mAP@0.5:0.95": 5 / 12})
    assert "1 detections of 1 action ids outside the label map" in err


def test_scorer_exits_2_naming_the_malformed_file(tmp_path, capsys):
    label_map, gt_path, det_path, _ = files(tmp_path, [("v1", "0902", *A, 1, 0)], [("v1", "0902", *A, 1)])
    assert (
        main(["--label-map", str(label_map), "--ground-truth", str(gt_path), "--detections", str(det_path)])
        == 2
    )
    assert f"{det_path}:1: expected 8 columns" in capsys.readouterr().err
    assert main(["--label-map", str(tmp_path / "no.pbtxt"), "--ground-truth", str(gt_path), "--detections",
                 str(det_path)]) == 2  # fmt: skip
    assert "no.pbtxt not found" in capsys.readouterr().err
