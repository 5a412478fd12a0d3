"""TAD mAP: hand-worked cases, a brute-force reference, DDP padding, the file readers and the scorer."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from datamodules.base import AnnotationError
from lightning_modules.metrics.tad import (
    ACTIVITYNET_TIOUS,
    THUMOS_CSV_HEADER,
    TemporalDetectionMAP,
    TemporalSegments,
    average_precision_per_class,
    map_key,
    mean_average_precision,
    read_ground_truth,
    read_predictions,
    segment_iou,
    write_predictions,
)
from lightning_modules.tools.evaluate_tad import main

THUMOS = (0.3, 0.4, 0.5, 0.6, 0.7)


def table(rows, scored=True):
    """Rows (video, start, end, label[, score]) -> TemporalSegments with integer videos and labels."""
    return TemporalSegments(
        video=np.array([r[0] for r in rows], dtype=np.int64),
        segments=np.array([(r[1], r[2]) for r in rows], dtype=np.float64).reshape(-1, 2),
        labels=np.array([r[3] for r in rows], dtype=np.int64),
        scores=np.array([r[4] for r in rows], dtype=np.float64) if scored else None,
    )


def scores_at(rows_det, rows_gt, tious=THUMOS):
    return mean_average_precision(table(rows_det), table(rows_gt, scored=False), tious)


def test_segment_iou():
    got = segment_iou(np.array([0.0, 10.0]), np.array([[5, 15], [10, 20], [0, 10], [2, 4], [-5, 30]]))
    np.testing.assert_allclose(got, [5 / 15, 0.0, 1.0, 0.2, 10 / 35])
    pairwise = segment_iou(np.array([[0.0, 10.0], [3.0, 3.0]]), np.array([[5, 15], [3, 3]]))
    np.testing.assert_allclose(pairwise, [[5 / 15, 0.0], [0.0, 0.0]])  # an empty union has tIoU 0, not NaN


def test_duplicate_detection_is_a_false_positive():
    # GT A=[0,10], B=[20,30]. Ranked: d1=[0,10] (tIoU 1 with A) TP; d2=[1,10] (0.9 with A, but A is taken;
    # 0 with B) FP; d3=[20,28] (0.8 with B) TP. Precision 1, 1/2, 2/3; recall 1/2, 1/2, 1; made monotone:
    # 1, 2/3, 2/3. AP = 1/2 * 1 + 1/2 * 2/3 = 5/6 at every threshold <= 0.8. At 0.85 d3 is an FP too:
    # AP = 1/2 * 1 = 1/2.
    gt = [(0, 0, 10, 0), (0, 20, 30, 0)]
    det = [(0, 0, 10, 0, 0.9), (0, 1, 10, 0, 0.8), (0, 20, 28, 0, 0.7)]
    out = scores_at(det, gt, (0.3, 0.5, 0.7, 0.85))
    assert out["mAP@0.3"] == pytest.approx(5 / 6) and out["mAP@0.7"] == pytest.approx(5 / 6)
    assert out["mAP@0.85"] == pytest.approx(1 / 2)
    assert out["average_mAP"] == pytest.approx((3 * 5 / 6 + 1 / 2) / 4)


def test_equal_scores_keep_input_order():
    # One GT [0,10]; a miss and a hit with the same score 0.5. Miss listed first: precision 0, 1/2 at recall
    # 0, 1 -> AP = 1 * 1/2. Hit listed first: precision 1 at recall 1 -> AP = 1.
    gt = [(0, 0, 10, 0)]
    miss, hit = (0, 50, 60, 0, 0.5), (0, 0, 10, 0, 0.5)
    assert scores_at([miss, hit], gt)["mAP@0.5"] == pytest.approx(0.5)
    assert scores_at([hit, miss], gt)["mAP@0.5"] == pytest.approx(1.0)


def test_match_goes_to_the_highest_tiou_ground_truth():
    # GT1=[0,10], GT2=[5,15]. d1=[4,14]: tIoU 6/14=0.43 with GT1, 9/11=0.82 with GT2 -> takes GT2. d2=[0,9]:
    # tIoU 0.9 with GT1 -> TP. AP 1 at 0.3..0.7. (Had d1 taken GT1, d2 would be an FP: 4/15=0.27 with GT2.)
    gt = [(0, 0, 10, 0), (0, 5, 15, 0)]
    det = [(0, 4, 14, 0, 0.9), (0, 0, 9, 0, 0.8)]
    assert scores_at(det, gt)["average_mAP"] == pytest.approx(1.0)


def test_thresholds_and_the_boundary_tiou():
    # GT [0,10] and [100,110]. d1=[0,5.5]: tIoU 0.55; d2=[100,105]: tIoU exactly 0.5, which counts (>=).
    # Both TP at 0.3, 0.4, 0.5 -> AP 1; both FP at 0.6, 0.7 -> AP 0. average = 3/5.
    gt = [(0, 0, 10, 0), (0, 100, 110, 0)]
    det = [(0, 0, 5.5, 0, 0.9), (0, 100, 105, 0, 0.8)]
    out = scores_at(det, gt)
    assert [out[map_key(t)] for t in THUMOS] == pytest.approx([1, 1, 1, 0, 0])
    assert out["average_mAP"] == pytest.approx(0.6)
    assert list(out) == ["mAP@0.3", "mAP@0.4", "mAP@0.5", "mAP@0.6", "mAP@0.7", "average_mAP"]


def test_classes_without_predictions_count_and_classes_without_ground_truth_do_not():
    # Class 0: one perfect hit (AP 1). Class 1: GT but no detection (AP 0, counted). Class 2: detections only
    # (ignored). Another video's class-0 detection with no GT there is a lower-ranked FP: AP still 1.
    gt = [(0, 0, 10, 0), (1, 0, 10, 1)]
    det = [(0, 0, 10, 0, 0.9), (1, 0, 10, 2, 0.95), (1, 0, 10, 0, 0.1)]
    assert scores_at(det, gt)["average_mAP"] == pytest.approx(0.5)
    classes, ap = average_precision_per_class(table(det), table(gt, scored=False), THUMOS)
    assert classes.tolist() == [0, 1] and ap[:, 1].tolist() == [0.0] * 5


def test_segments_partly_outside_the_video_are_not_clipped():
    # A 10 s video, GT [0,10]; the detection [-2,12] overhangs both ends: tIoU 10/14 = 0.714, so a TP up to
    # 0.7 and an FP at 0.75 (clipped to [0,10] it would have been a perfect hit).
    gt = [(0, 0, 10, 0)]
    out = scores_at([(0, -2, 12, 0, 0.9)], gt, (0.3, 0.7, 0.75))
    assert [out["mAP@0.3"], out["mAP@0.7"], out["mAP@0.75"]] == [1.0, 1.0, 0.0]


def test_map_key():
    assert [map_key(t) for t in (0.3, 0.5, 0.55, 0.6000000000000001, 0.95)] == [
        "mAP@0.3", "mAP@0.5", "mAP@0.55", "mAP@0.6", "mAP@0.95"
    ]  # fmt: skip
    anet = [f"mAP@0.{d}" for d in (5, 55, 6, 65, 7, 75, 8, 85, 9, 95)]
    assert [map_key(t) for t in ACTIVITYNET_TIOUS] == anet


# An independent reference -----------------------------------------------------------------------------------


def reference_ap(det_rows, gt_rows, label, tiou):
    """Greedy matching one threshold at a time in plain Python; AP as the sum over recall levels r of the
    recall increment times the best precision at any score cut-off whose recall is >= r."""
    gts = [g for g in gt_rows if g[3] == label]
    dets = sorted((d for d in det_rows if d[3] == label), key=lambda d: -d[4])  # sorted() is stable
    taken = [False] * len(gts)
    hits = []
    for d in dets:
        best, best_iou = None, -1.0
        for j, g in enumerate(gts):
            if g[0] != d[0] or taken[j]:
                continue
            inter = max(0.0, min(d[2], g[2]) - max(d[1], g[1]))
            iou = inter / (max(d[2], g[2]) - min(d[1], g[1])) if inter > 0 else 0.0
            if iou >= tiou and iou > best_iou:
                best, best_iou = j, iou
        if best is not None:
            taken[best] = True
        hits.append(best is not None)
    points = []  # (recall, precision) at every cut-off
    for k in range(1, len(hits) + 1):
        points.append((sum(hits[:k]) / len(gts), sum(hits[:k]) / k))
    ap, previous = 0.0, 0.0
    for r in sorted({rec for rec, _ in points if rec > 0}):
        ap += (r - previous) * max(p for rec, p in points if rec >= r)
        previous = r
    return ap


def random_problem(rng, videos=4, classes=3):
    gt, det = [], []
    for v in range(videos):
        for _ in range(rng.integers(0, 5)):
            start, length, label = rng.uniform(0, 50), rng.uniform(1, 15), int(rng.integers(classes))
            gt.append((v, start, start + length, label))
            for _ in range(rng.integers(0, 3)):  # jittered copies: near hits and duplicates
                s, e = start + rng.normal(0, 2), start + length + rng.normal(0, 2)
                swapped = label if rng.random() < 0.8 else int(rng.integers(classes))
                det.append((v, min(s, e), max(s, e) + 0.1, swapped))
        for _ in range(rng.integers(0, 4)):  # background detections
            s = rng.uniform(0, 60)
            det.append((v, s, s + rng.uniform(0.5, 10), int(rng.integers(classes))))
    # Scores on a coarse grid, so ties happen; both implementations keep input order among them.
    det = [(*d, float(np.round(rng.random(), 1))) for d in det]
    return det, gt


@pytest.mark.parametrize("seed", range(40))
def test_matches_brute_force_reference(seed):
    rng = np.random.default_rng(seed)
    det, gt = random_problem(rng)
    assert gt
    tious = (0.1, 0.3, 0.5, 0.7, 0.9)
    classes, ap = average_precision_per_class(table(det), table(gt, scored=False), tious)
    expected = [[reference_ap(det, gt, int(c), t) for c in classes] for t in tious]
    np.testing.assert_allclose(ap, expected, atol=1e-12)


# The Metric -------------------------------------------------------------------------------------------------


def as_updates(det, gt, videos):
    """One preds / target entry per video, in the Metric's update format."""
    preds, target = [], []
    for v in videos:
        d = [r for r in det if r[0] == v]
        g = [r for r in gt if r[0] == v]
        preds.append({"segments": torch.tensor([r[1:3] for r in d]).reshape(-1, 2),
                      "scores": torch.tensor([r[4] for r in d], dtype=torch.float64),
                      "labels": torch.tensor([r[3] for r in d], dtype=torch.long)})  # fmt: skip
        target.append({"segments": torch.tensor([r[1:3] for r in g]).reshape(-1, 2),
                       "labels": torch.tensor([r[3] for r in g], dtype=torch.long)})  # fmt: skip
    return preds, target, torch.tensor(list(videos))


def fixed_problem():
    """Seven videos, with ties in score across videos."""
    return random_problem(np.random.default_rng(123), videos=7)


def test_metric_equals_the_function_and_ignores_repeated_videos():
    det, gt = fixed_problem()
    expected = mean_average_precision(table(det), table(gt, scored=False), THUMOS)
    metric = TemporalDetectionMAP(THUMOS)
    metric.update(*as_updates(det, gt, [0, 1, 2, 3]))
    metric.update(*as_updates(det, gt, [4, 5, 6]))
    once = {k: v.item() for k, v in metric.compute().items()}
    metric.update(*as_updates(det, gt, [0, 1]))  # the padding the distributed sampler adds
    twice = {k: v.item() for k, v in metric.compute().items()}
    assert once == twice
    assert once == pytest.approx(expected, abs=1e-6)


def test_metric_does_not_depend_on_the_order_of_videos():
    det, gt = fixed_problem()
    results = []
    for order in ([0, 1, 2, 3, 4, 5, 6], [6, 4, 2, 0, 5, 3, 1]):
        metric = TemporalDetectionMAP(THUMOS)
        for v in order:
            metric.update(*as_updates(det, gt, [v]))
        results.append({k: v.item() for k, v in metric.compute().items()})
    assert results[0] == results[1]


def test_metric_export_round_trip(tmp_path):
    det, gt = fixed_problem()
    metric = TemporalDetectionMAP(THUMOS, class_names=["jump", "run", "throw"])
    metric.update(*as_updates(det, gt, range(7)))
    metric.update(*as_updates(det, gt, [3]))
    names = [f"video_{v}" for v in range(7)]
    path = metric.write_results(tmp_path / "results.json", names)
    content = json.loads(path.read_text())
    assert list(content["results"]) == names and set(content) == {"version", "results", "external_data"}
    assert sum(len(d) for d in content["results"].values()) == len(det)
    ground_truth = replace(table(gt, scored=False), video_names=tuple(names), class_names=metric.class_names)
    detections = read_predictions(path, ground_truth)
    offline = mean_average_precision(detections, ground_truth, THUMOS)
    assert offline == pytest.approx({k: v.item() for k, v in metric.compute().items()}, abs=1e-6)


def test_metric_without_ground_truth_is_nan():
    metric = TemporalDetectionMAP((0.5,))
    metric.update(*as_updates([(0, 0, 1, 0, 0.5)], [], [0]))
    with pytest.warns(UserWarning, match="no ground-truth"):
        assert torch.isnan(metric.compute()["average_mAP"])


def test_exact_under_ddp_padding():
    # Two ranks in one process: torchmetrics' own state sync runs, with its all-gather answered from both
    # metrics' states (spawning real ranks would cost two more torch imports). The sampler pads 7 videos to 8,
    # so video 0 is evaluated on both ranks; the ranks hold different numbers of detections.
    det, gt = fixed_problem()
    world: list[TemporalDetectionMAP] = []

    def in_process_gather(rank):
        def gather(tensor, group=None):
            name = next(names[rank])
            assert torch.equal(tensor, torch.cat(world[rank].metric_state[name])), name  # the state asked for
            return [torch.cat(metric.metric_state[name]) for metric in world]

        return gather

    names = []
    for rank in range(2):
        metric = TemporalDetectionMAP(
            THUMOS, dist_sync_fn=in_process_gather(rank), distributed_available_fn=lambda: True
        )
        for v in DistributedSampler(range(7), num_replicas=2, rank=rank, shuffle=False):
            metric.update(*as_updates(det, gt, [v]))
        world.append(metric)
        names.append(itertools.cycle(list(metric.metric_state)))  # the order torchmetrics gathers states in
    expected = mean_average_precision(table(det), table(gt, scored=False), THUMOS)
    for metric in world:
        assert {k: v.item() for k, v in metric.compute().items()} == pytest.approx(expected, abs=1e-6)
        assert len(metric.predictions().video) == len(det)
        assert isinstance(metric.entry_video, list) and len(metric.entry_video) == 4  # local states restored


# Files and the offline scorer -------------------------------------------------------------------------------


def anet_json(path, database):
    path.write_text(json.dumps({"version": "VERSION 1.3", "database": database}))
    return path


def results_json(path, results):
    path.write_text(json.dumps({"results": results}))
    return path


DATABASE = {
    "v1": {"subset": "validation", "duration": 40.0, "annotations": [
        {"label": "Jump", "segment": [0.0, 10.0]}, {"label": "Jump", "segment": [20.0, 30.0]}]},
    "v2": {"subset": "validation", "duration": 20.0, "annotations": [
        {"label": "Run", "segment": [2.0, 8.0]}]},
    "v3": {"subset": "training", "duration": 20.0, "annotations": [{"label": "Swim", "segment": [1.0, 5.0]}]},
}  # fmt: skip
RESULTS = {
    "v1": [{"label": "Jump", "segment": [0.0, 10.0], "score": 0.9}, {"label": "Jump", "segment": [1.0, 10.0],
           "score": 0.8}, {"label": "Jump", "segment": [20.0, 28.0], "score": 0.7}],
    "v2": [{"label": "Run", "segment": [2.0, 5.0], "score": 0.6}],
}  # fmt: skip


def test_ground_truth_json_subset_and_prediction_round_trip(tmp_path):
    truth = read_ground_truth(anet_json(tmp_path / "gt.json", DATABASE), "validation")
    assert truth.video_names == ("v1", "v2") and truth.class_names == ("Jump", "Run")
    assert truth.segments.tolist() == [[0, 10], [20, 30], [2, 8]] and truth.labels.tolist() == [0, 0, 1]
    detections = read_predictions(results_json(tmp_path / "pred.json", RESULTS), truth)
    again = read_predictions(write_predictions(tmp_path / "again.json", detections), truth)
    for field in ("video", "segments", "labels", "scores"):
        np.testing.assert_array_equal(getattr(again, field), getattr(detections, field))
    # Jump is the duplicate case above (5/6 up to tIoU 0.8); Run's [2,5] has tIoU 0.5 with [2,8].
    out = mean_average_precision(detections, truth, (0.5, 0.7))
    expected = {"mAP@0.5": (5 / 6 + 1) / 2, "mAP@0.7": 5 / 12, "average_mAP": (11 / 12 + 5 / 12) / 2}
    assert out == pytest.approx(expected)


def test_thumos_csv_reader(tmp_path):
    path = tmp_path / "test_Annotation.csv"
    path.write_text(
        "video,type,type_idx,start,end,startFrame,endFrame\n"
        "video_test_0000004,CricketBowling,5,0.2,1.1,6,33\n"
        "video_test_0000004,CricketShot,6,0.2,1.1,6,33\n"
        "video_test_0000004,Ambiguous,0,3.0,4.0,90,120\n"
        "video_test_0000007,BaseballPitch,1,12.5,15.25,375,457\n"
    )
    with pytest.warns(UserWarning, match="1 'Ambiguous'"):
        truth = read_ground_truth(path)
    assert truth.video_names == ("video_test_0000004", "video_test_0000007")
    assert truth.class_names == ("BaseballPitch", "CricketBowling", "CricketShot")
    assert truth.labels.tolist() == [1, 2, 0]
    assert truth.segments.tolist() == [[0.2, 1.1], [0.2, 1.1], [12.5, 15.25]]


@pytest.mark.parametrize(
    "database, message",
    [
        ({"v1": {"subset": "validation"}}, "'v1'.*'annotations' list"),
        ({"v1": {"subset": "validation", "annotations": [{"segment": [0, 1]}]}}, "'v1'.*'label'"),
        ({"v1": {"subset": "validation", "annotations": [{"label": "a", "segment": [5, 5]}]}}, "'v1'.*after"),
        ({"v1": {"subset": "validation", "annotations": [{"label": "a", "segment": ["x", 5]}]}}, "'v1'.*num"),
        ({"v1": {"subset": "training", "annotations": []}}, "no video of subset 'validation'.*--subset"),
        ({"v1": {"annotations": []}}, "'v1'.*'subset'"),
    ],
)
def test_malformed_ground_truth_names_file_video_and_fix(tmp_path, database, message):
    with pytest.raises(AnnotationError, match=message) as err:
        read_ground_truth(anet_json(tmp_path / "gt.json", database))
    assert "gt.json" in str(err.value)


def test_malformed_files_and_layouts(tmp_path):
    truth = read_ground_truth(anet_json(tmp_path / "gt.json", DATABASE))
    (tmp_path / "gt.txt").write_text("v1 0 10 Jump\n")
    with pytest.raises(AnnotationError, match="gt.txt: unknown ground-truth layout"):
        read_ground_truth(tmp_path / "gt.txt")
    (tmp_path / "bad.csv").write_text("name,label,t0,t1\nv1,Jump,0,1\n")
    with pytest.raises(AnnotationError, match="bad.csv: not a THUMOS14.*header video,type"):
        read_ground_truth(tmp_path / "bad.csv")
    with pytest.raises(AnnotationError, match="gt.json.*'results' mapping"):
        read_predictions(tmp_path / "gt.json", truth)
    bad = {"v1": [{"label": "Jump", "segment": [0, 1], "score": "high"}]}
    with pytest.raises(AnnotationError, match="pred.json: video 'v1'.*'score'"):
        read_predictions(results_json(tmp_path / "pred.json", bad), truth)
    with pytest.raises(AnnotationError, match="not found"):
        read_predictions(tmp_path / "missing.json", truth)


def test_unknown_labels_are_ignored_and_unknown_videos_are_false_positives(tmp_path):
    truth = read_ground_truth(anet_json(tmp_path / "gt.json", DATABASE))
    results = {**RESULTS, "v9": [{"label": "Jump", "segment": [0, 10], "score": 0.95}],
               "v2": RESULTS["v2"] + [{"label": "Fly", "segment": [2, 8], "score": 0.99}]}  # fmt: skip
    with pytest.warns(UserWarning) as record:
        detections = read_predictions(results_json(tmp_path / "pred.json", results), truth)
    messages = " ".join(str(w.message) for w in record)
    assert "1 detections of 1 labels absent" in messages and "1 detections in videos" in messages
    assert "Fly" not in [detections.class_names[c] for c in detections.labels]
    assert detections.video_names[-1] == "v9"
    # v9's Jump ranks first and is an FP: Jump precision 0, 1/2, 1/3, 1/2 at recall 0, 1/2, 1/2, 1
    # -> AP 1/2 * 1/2 + 1/2 * 1/2 = 1/2 at tIoU 0.5; Run is 1.
    assert mean_average_precision(detections, truth, (0.5,))["mAP@0.5"] == pytest.approx((0.5 + 1) / 2)


def test_scorer_prints_one_json_object(tmp_path, capsys):
    gt = anet_json(tmp_path / "gt.json", DATABASE)
    pred = results_json(tmp_path / "pred.json", RESULTS)
    assert main(["--ground-truth", str(gt), "--predictions", str(pred)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["mAP@0.3", "mAP@0.4", "mAP@0.5", "mAP@0.6", "mAP@0.7", "average_mAP"]
    assert out["mAP@0.5"] == pytest.approx((5 / 6 + 1) / 2) and out["mAP@0.6"] == pytest.approx(5 / 12)
    assert main(["--ground-truth", str(gt), "--predictions", str(pred), "--tiou", "0.5", "0.55"]) == 0
    assert list(json.loads(capsys.readouterr().out)) == ["mAP@0.5", "mAP@0.55", "average_mAP"]
    fly = {"label": "Fly", "segment": [0, 1], "score": 1}
    extra = results_json(tmp_path / "extra.json", {**RESULTS, "v9": [fly]})
    assert main(["--ground-truth", str(gt), "--predictions", str(extra)]) == 0
    captured = capsys.readouterr()  # stdout stays one JSON object; the warning goes to stderr
    assert json.loads(captured.out) == out and captured.err.startswith("warning: ") and "Fly" in captured.err


def test_scorer_on_thumos_csv(tmp_path, capsys):
    gt = tmp_path / "gt.csv"
    gt.write_text(f"{THUMOS_CSV_HEADER}\nv1,Jump,1,0,10,0,300\nv2,Run,2,2,8,60,240\n")
    pred = results_json(tmp_path / "pred.json", RESULTS)
    assert main(["--ground-truth", str(gt), "--predictions", str(pred), "--subset", "ignored-for-csv"]) == 0
    # Jump: one GT, d1 TP, d2 FP, d3 FP -> AP 1. Run: [2,5] vs [2,8] = 0.5.
    out = json.loads(capsys.readouterr().out)
    assert out["mAP@0.5"] == pytest.approx(1.0) and out["mAP@0.6"] == pytest.approx(0.5)


def test_scorer_bad_file_exits_2_naming_it(tmp_path, capsys):
    gt = anet_json(tmp_path / "gt.json", {"v1": {"subset": "validation", "annotations": [{"label": "a"}]}})
    pred = results_json(tmp_path / "pred.json", RESULTS)
    assert main(["--ground-truth", str(gt), "--predictions", str(pred)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "gt.json: video 'v1'" in captured.err and "segment" in captured.err
