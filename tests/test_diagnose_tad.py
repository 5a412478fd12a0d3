"""DETAD error analysis: each false-positive type on a hand-made detection, the top-kG rank groups, the mAP
gain from removing a type against the mAP of the hand-filtered detections, the false-negative rule and bins,
the durations reader and the ``diagnose-tad`` command on tiny files."""

from __future__ import annotations

import json

import matplotlib.image
import numpy as np
import pytest

from datamodules.base import AnnotationError
from lightning_modules.metrics.tad import (
    TemporalSegments,
    average_precision_per_class,
    interpolated_average_precision,
    mean_average_precision,
    read_ground_truth,
)
from lightning_modules.metrics.tad_diagnosis import (
    ACTIVITYNET_BINS,
    BACKGROUND,
    CONFUSION,
    DOUBLE_DETECTION,
    ERROR_TYPES,
    LOCALISATION,
    TRUE_POSITIVE,
    WRONG_LABEL,
    bin_index,
    classify_detections,
    detected_instances,
    false_negative_analysis,
    false_positive_analysis,
    match_detections,
    rank_groups,
    read_durations,
    select,
)
from lightning_modules.tools.diagnose_tad import main


def table(rows, scored=True):
    """Rows (video, start, end, label[, score]) -> TemporalSegments with integer videos and labels."""
    return TemporalSegments(
        video=np.array([r[0] for r in rows], dtype=np.int64),
        segments=np.array([(r[1], r[2]) for r in rows], dtype=np.float64).reshape(-1, 2),
        labels=np.array([r[3] for r in rows], dtype=np.int64),
        scores=np.array([r[4] for r in rows], dtype=np.float64) if scored else None,
    )


# Video 0: A0 [0,10] and A1 [40,50] of class 0, B0 [20,30] and B1 [45,55] of class 1. Video 1 has no truth.
TRUTH = [(0, 0, 10, 0), (0, 20, 30, 1), (0, 40, 50, 0), (0, 45, 55, 1)]
# (detection, its type at tIoU 0.5, why)
CASES = [
    ((0, 0, 10, 0, 0.95), TRUE_POSITIVE, "tIoU 1 with A0"),
    ((0, 1, 10, 0, 0.90), DOUBLE_DETECTION, "tIoU 0.9 with A0, already taken"),
    ((0, 20, 29, 0, 0.85), WRONG_LABEL, "tIoU 0.9 with B0 of class 1"),
    ((0, 45, 54, 0, 0.80), WRONG_LABEL, "0.9 with B1 (class 1) beats 5/14 = 0.36 with its own class's A1"),
    ((0, 20, 24, 1, 0.75), LOCALISATION, "tIoU 0.4 with B0, its class"),
    ((0, 0, 3, 1, 0.70), CONFUSION, "tIoU 0.3 with A0 of class 0"),
    ((0, 0, 1, 0, 0.65), LOCALISATION, "tIoU exactly 0.1 with A0: the floor counts"),
    ((0, 9.5, 19.5, 0, 0.60), BACKGROUND, "tIoU 0.5/19.5 = 0.026 with A0, under the 0.1 floor"),
    ((0, 60, 70, 0, 0.55), BACKGROUND, "overlaps nothing"),
    ((1, 0, 10, 0, 0.50), BACKGROUND, "a video without ground truth"),
    ((0, 45, 55, 1, 0.45), TRUE_POSITIVE, "tIoU 1 with B1"),
]


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_false_positive_type(shuffle):
    order = np.random.default_rng(0).permutation(len(CASES)) if shuffle else np.arange(len(CASES))
    detections = table([CASES[i][0] for i in order])
    types = classify_detections(detections, table(TRUTH, scored=False), 0.5)
    expected = [CASES[i][1] for i in order]
    assert [ERROR_TYPES[t] for t in types] == [ERROR_TYPES[t] for t in expected]


def test_the_type_depends_on_the_threshold():
    # [0,6] against [0,10]: tIoU 0.6, a true positive at 0.5 and a localisation error at 0.7.
    truth, det = table([(0, 0, 10, 0)], scored=False), table([(0, 0, 6, 0, 0.9)])
    assert classify_detections(det, truth, 0.5).tolist() == [TRUE_POSITIVE]
    assert classify_detections(det, truth, 0.7).tolist() == [LOCALISATION]


def test_matching_agrees_with_the_map_protocol():
    # The matches give the same per-class AP as metrics.tad's own matcher, ties and all (coarse random times).
    rng = np.random.default_rng(3)
    for _ in range(5):
        truth = [(int(rng.integers(3)), s, s + int(rng.integers(1, 6)), int(rng.integers(2))) for s in
                 rng.integers(0, 20, 12).tolist()]  # fmt: skip
        dets = [(int(rng.integers(4)), s, s + int(rng.integers(1, 6)), int(rng.integers(2)),
                 float(rng.integers(1, 5)) / 4) for s in rng.integers(0, 20, 30).tolist()]  # fmt: skip
        det, gt = table(dets), table(truth, scored=False)
        for tiou in (0.3, 0.5, 0.7):
            matched = match_detections(det, gt, tiou)
            assert len(set(matched[matched >= 0].tolist())) == int((matched >= 0).sum())  # one match per GT
            assert (gt.labels[matched[matched >= 0]] == det.labels[matched >= 0]).all()
            classes, ap = average_precision_per_class(det, gt, [tiou])
            for c, label in enumerate(classes):
                rows = np.flatnonzero(det.labels == label)
                rows = rows[np.argsort(-det.scores[rows], kind="stable")]
                tp = np.cumsum(matched[rows] >= 0)
                mine = interpolated_average_precision(
                    tp / np.arange(1, len(rows) + 1), tp / (gt.labels == label).sum()
                )
                assert mine == pytest.approx(ap[0, c])


def test_rank_groups_cut_at_ten_times_the_instances():
    # Class 0 has 2 instances: its 25 detections fall in groups 1,1,2,2,...,10,10 by score, the last 5 out (0).
    # Class 1 has none: all out. Scores are shuffled in the input.
    truth = table([(0, 0, 10, 0), (1, 0, 10, 0)], scored=False)
    scores = np.random.default_rng(1).permutation(np.linspace(1.0, 0.04, 25))
    det = table([(0, 50, 60, 0, s) for s in scores] + [(0, 0, 10, 1, 0.99)])
    groups = rank_groups(det, truth)
    rank = np.argsort(np.argsort(-scores))  # 0 = best
    expected = [r // 2 + 1 if r < 20 else 0 for r in rank] + [0]
    assert groups.tolist() == expected
    assert rank_groups(det, truth, limit_factor=3).tolist() == [r // 2 + 1 if r < 6 else 0 for r in rank] + [
        0
    ]


def test_false_positive_profile_per_rank_group():
    # Class 0, G = 2 (videos 0 and 1). Ranked: TP, background | TP (video 1), double | localisation,
    # background | then background to the 10G cut (rank 20); ranks 21..25 are left out.
    truth = table([(0, 0, 10, 0), (1, 0, 10, 0)], scored=False)
    head = [(0, 0, 10, 0), (0, 50, 60, 0), (1, 0, 10, 0), (1, 0, 9, 0), (1, 0, 4, 0)]
    rows = [(*r, 1.0 - i / 100) for i, r in enumerate(head)]
    rows += [(0, 100 + 20 * i, 110 + 20 * i, 0, 0.9 - i / 100) for i in range(20)]
    analysis = false_positive_analysis(table(rows), truth, [0.5])
    assert analysis.group_sizes.tolist() == [2] * 10
    shares = {k: dict(zip(ERROR_TYPES, row)) for k, row in enumerate(analysis.profile, start=1)}
    assert shares[1]["true_positive"] == 0.5 and shares[1]["background"] == 0.5
    assert shares[2]["true_positive"] == 0.5 and shares[2]["double_detection"] == 0.5
    assert shares[3]["localisation"] == 0.5 and shares[3]["background"] == 0.5
    assert all(shares[k]["background"] == 1.0 for k in range(4, 11))
    assert (analysis.error_type[0, 20:] == -1).all()
    # TPs at ranks 1 and 3: AP = 1/2 * 1 + 1/2 * 2/3.
    assert analysis.average_mAP == pytest.approx(5 / 6)
    reported = analysis.to_dict()
    assert reported["profile"]["2G"]["double_detection"] == 0.5 and reported["group_sizes"]["10G"] == 2


def test_the_map_of_the_analysis_is_that_of_the_top_10g():
    # Class 1 (G = 1): ten background detections, then a TP at rank 11, beyond the cut: AP 0 on the cut, but
    # 1/11 over all detections.
    truth = table([(0, 0, 10, 1)], scored=False)
    det = table([(0, 100 + 20 * i, 110 + 20 * i, 1, 1 - i / 100) for i in range(10)] + [(0, 0, 10, 1, 0.5)])
    assert false_positive_analysis(det, truth).average_mAP == 0.0
    assert mean_average_precision(det, truth, [0.5])["average_mAP"] == pytest.approx(1 / 11)


def test_removing_an_error_type_is_rescoring_without_it():
    # Hand-worked: GT [0,10], [20,30]; ranked TP, double, TP: AP 5/6; without the double AP 1 -> gain 1/6.
    truth = table([(0, 0, 10, 0), (0, 20, 30, 0)], scored=False)
    analysis = false_positive_analysis(
        table([(0, 0, 10, 0, 0.9), (0, 1, 10, 0, 0.8), (0, 20, 28, 0, 0.7)]), truth
    )
    assert analysis.mAP_gain["double_detection"] == pytest.approx(1 / 6)
    assert analysis.mAP_gain["background"] == 0.0

    # Every type of CASES, against the mAP of the detections with that type struck out by hand.
    detections, truth = table([c[0] for c in CASES]), table(TRUTH, scored=False)
    analysis = false_positive_analysis(detections, truth, [0.5])
    struck = {"double_detection": [1], "wrong_label": [2, 3], "localisation": [4, 6], "confusion": [5],
              "background": [7, 8, 9]}  # fmt: skip
    for name, rows in struck.items():
        kept = select(detections, np.setdiff1d(np.arange(len(CASES)), rows))
        expected = mean_average_precision(kept, truth, [0.5])["mAP@0.5"]
        assert analysis.average_mAP + analysis.mAP_gain[name] == pytest.approx(expected)
    assert analysis.mAP_gain["localisation"] > 0  # the localisation errors rank above B1's true positive


def test_removing_an_error_type_over_several_thresholds():
    # At 0.3 the CASES' types differ (the 0.4 localisation becomes a TP): each threshold strikes its own.
    detections, truth = table([c[0] for c in CASES]), table(TRUTH, scored=False)
    analysis = false_positive_analysis(detections, truth, [0.3, 0.5])
    assert classify_detections(detections, truth, 0.3)[4] == TRUE_POSITIVE
    for code, name in enumerate(ERROR_TYPES[1:], start=1):
        per_tiou = [
            mean_average_precision(
                select(detections, classify_detections(detections, truth, t) != code), truth, [t]
            )
            for t in (0.3, 0.5)
        ]
        expected = np.mean([per_tiou[0]["mAP@0.3"], per_tiou[1]["mAP@0.5"]])
        assert analysis.average_mAP + analysis.mAP_gain[name] == pytest.approx(expected)


def test_bin_edges_are_right_closed_with_the_lowest_included():
    edges, _ = ACTIVITYNET_BINS["coverage"]
    got = bin_index(np.array([0.0, 0.2, 0.2000001, 0.5, 1.0, 1.01, np.nan, -0.1]), edges)
    assert got.tolist() == [0, 0, 1, 2, 4, -1, -1, -1]
    edges, _ = ACTIVITYNET_BINS["length"]
    assert bin_index(np.array([0.5, 30.0, 30.5, 180.0, 1000.0]), edges).tolist() == [0, 0, 1, 3, 4]
    edges, _ = ACTIVITYNET_BINS["num_instances"]
    assert bin_index(np.array([1.0, 2.0, 4.0, 5.0, 9.0]), edges).tolist() == [0, 1, 1, 2, 3]


def test_false_negative_rates_per_bin():
    # Video 0 (100 s): class 0 [0,10] found, [20,50] and [50,95] missed; class 1 [0,100] found.
    # Video 1 (400 s): class 0 [0,200] missed.
    # coverage 0.1 XS found, 0.3 S missed, 0.45 M missed, 1.0 XL found, 0.5 M missed.
    # length 10 XS found, 30 XS missed, 45 S missed, 100 M found, 200 XL missed.
    # instances of the class in the video: 3, 3, 3 (S), 1 (XS), 1 (XS).
    truth = table(
        [(0, 0, 10, 0), (0, 20, 50, 0), (0, 50, 95, 0), (0, 0, 100, 1), (1, 0, 200, 0)], scored=False
    )
    det = table([(0, 0, 10, 0, 0.9), (0, 0, 100, 1, 0.8)])
    analysis = false_negative_analysis(det, truth, durations=[100.0, 400.0])
    assert analysis.missed.tolist() == [[False, True, True, False, True]]
    assert analysis.rate == pytest.approx(3 / 5)
    assert analysis.rates["coverage"] == pytest.approx(
        {"XS": 0.0, "S": 1.0, "M": 1.0, "L": np.nan, "XL": 0.0}, nan_ok=True
    )
    assert analysis.instances["coverage"] == {"XS": 1, "S": 1, "M": 2, "L": 0, "XL": 1}
    assert analysis.rates["length"] == pytest.approx(
        {"XS": 0.5, "S": 1.0, "M": 0.0, "L": np.nan, "XL": 1.0}, nan_ok=True
    )
    assert analysis.rates["num_instances"] == pytest.approx(
        {"XS": 0.5, "S": 2 / 3, "M": np.nan, "L": np.nan}, nan_ok=True
    )
    reported = analysis.to_dict()
    assert reported["length"]["L"] == {"instances": 0, "rate": None} and reported["rate"] == pytest.approx(
        0.6
    )


def test_coverage_is_skipped_without_durations():
    truth, det = table([(0, 0, 10, 0)], scored=False), table([(0, 0, 10, 0, 0.9)])
    with pytest.warns(UserWarning, match="coverage skipped"):
        analysis = false_negative_analysis(det, truth)
    assert "coverage" not in analysis.rates and analysis.rates["length"]["XS"] == 0.0
    assert analysis.to_dict(["coverage", "length"])["coverage"] is None
    two = table([(0, 0, 10, 0), (1, 0, 10, 0)], scored=False)
    with pytest.warns(UserWarning, match="1 instances in videos without a duration"):
        analysis = false_negative_analysis(det, two, durations=[50.0, np.nan])
    assert analysis.instances["coverage"]["XS"] == 1 and analysis.rates["coverage"]["XS"] == 0.0


def test_a_match_at_too_low_a_normalised_precision_is_a_miss():
    # One instance, found only after n background detections: normalised precision 1 / (1 + n) with one class
    # of one instance. 18 -> 1/19 > 5%: found; 19 -> exactly 5%: missed (at most 5% does not count).
    truth = table([(0, 0, 10, 0)], scored=False)

    def found(n, truth=truth, min_precision=0.05):
        rows = [(0, 100 + 20 * i, 110 + 20 * i, 0, 1 - i / 100) for i in range(n)] + [(0, 0, 10, 0, 0.01)]
        return detected_instances(table(rows), truth, 0.5, min_precision).tolist()

    assert found(18) == [True] and found(19) == [False] and found(20) == [False]
    assert found(20, min_precision=0.0) == [True]
    # Normalised by the mean instances per class (4 instances / 2 classes = 2): 2 / (2 + 19) > 5%: found.
    four = table([(0, 0, 10, 0), (1, 0, 10, 1), (2, 0, 10, 1), (3, 0, 10, 1)], scored=False)
    assert found(19, truth=four) == [True, False, False, False]


def write(path, content):
    path.write_text(json.dumps(content))
    return path


def annotation(segment, label):
    return {"segment": segment, "label": label}


def detection(segment, label, score):
    return {"segment": segment, "label": label, "score": score}


def ground_truth_file(tmp_path, durations=True):
    database = {
        "v1": {"subset": "validation", "duration": 100.0, "annotations": [
            annotation([10, 30], "jump"), annotation([50, 60], "spin")]},
        "v2": {"subset": "validation", "duration": 50.0, "annotations": [annotation([0, 25], "jump")]},
        "v3": {"subset": "training", "duration": 10.0, "annotations": [annotation([0, 5], "spin")]},
    }  # fmt: skip
    if not durations:
        for entry in database.values():
            del entry["duration"]
    return write(tmp_path / ("gt.json" if durations else "gt_bare.json"), {"database": database})


def test_read_durations(tmp_path):
    gt_path = ground_truth_file(tmp_path)
    truth = read_ground_truth(gt_path, "validation")
    assert read_durations(gt_path, truth).tolist() == [100.0, 50.0]
    bare = ground_truth_file(tmp_path, durations=False)
    assert read_durations(bare, truth) is None
    extra = write(tmp_path / "durations.json", {"v2": 40, "v9": 1})
    filled = read_durations(bare, truth, extra)
    assert np.isnan(filled[0]) and filled[1] == 40.0
    assert read_durations(gt_path, truth, extra).tolist() == [100.0, 50.0]  # the ground truth's come first
    for bad in ({"v1": "long"}, {"v1": -3}, [1, 2]):
        with pytest.raises(AnnotationError, match="bad.json"):
            read_durations(bare, truth, write(tmp_path / "bad.json", bad))


def test_diagnose_command(tmp_path, capsys):
    gt = ground_truth_file(tmp_path)
    # dense: jump ranked TP, double, TP (AP 5/6), spin TP (AP 1): mAP 11/12, 12/12 without the double.
    dense = write(tmp_path / "dense.json", {"results": {
        "v1": [detection([10, 30], "jump", 0.9), detection([11, 30], "jump", 0.8), detection([50, 60], "spin", 0.7)],
        "v2": [detection([0, 25], "jump", 0.6)],
    }})  # fmt: skip
    # dropped: spin on the jump (wrong label), jump [10,28] (tIoU 0.9, TP); spin [50,60] and v2 missed.
    dropped = write(tmp_path / "dropped.json", {"results": {
        "v1": [detection([10, 30], "spin", 0.9), detection([10, 28], "jump", 0.5)], "v2": [],
    }})  # fmt: skip
    out = tmp_path / "out"
    args = [
        "--ground-truth",
        str(gt),
        "--predictions",
        str(dense),
        str(dropped),
        "--names",
        "dense",
        "dropped",
    ]
    assert main([*args, "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out / "diagnosis.json").read_text())
    for picture in ("false_positives.png", "fp_removed_error_map.png", "false_negatives.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(out / picture).ndim == 3

    assert printed["tious"] == [0.5] and printed["bins"] == "activitynet"
    fp = printed["models"]["dense"]["false_positives"]
    assert fp["average_mAP"] == pytest.approx(11 / 12)
    assert fp["mAP_gain"]["double_detection"] == pytest.approx(1 / 12)
    assert fp["group_sizes"]["1G"] == 3 and fp["group_sizes"]["2G"] == 1  # jump: G = 2, spin: G = 1
    assert fp["profile"]["1G"]["true_positive"] == pytest.approx(2 / 3)
    assert fp["profile"]["1G"]["double_detection"] == pytest.approx(1 / 3)
    assert fp["profile"]["2G"]["true_positive"] == 1.0 and fp["profile"]["3G"]["true_positive"] is None
    fp = printed["models"]["dropped"]["false_positives"]
    assert fp["average_mAP"] == pytest.approx(0.25) and fp["mAP_gain"]["wrong_label"] == 0.0
    assert fp["profile"]["1G"]["wrong_label"] == 0.5 and fp["profile"]["1G"]["true_positive"] == 0.5
    assert printed["models"]["dropped"]["mAP"]["mAP@0.5"] == pytest.approx(0.25)

    fn = printed["models"]["dense"]["false_negatives"]
    assert fn["rate"] == 0.0 and fn["coverage"]["XS"] == {"instances": 2, "rate": 0.0}
    fn = printed["models"]["dropped"]["false_negatives"]
    # coverage: jump v1 0.2 (XS, found), spin 0.1 (XS, missed), jump v2 0.5 (M, missed); lengths all XS.
    assert fn["rate"] == pytest.approx(2 / 3)
    assert fn["coverage"]["XS"] == {"instances": 2, "rate": 0.5} and fn["coverage"]["M"]["rate"] == 1.0
    assert fn["length"]["XS"]["rate"] == pytest.approx(2 / 3) and fn["num_instances"]["XS"]["instances"] == 3


def test_diagnose_command_errors(tmp_path, capsys):
    gt = ground_truth_file(tmp_path)
    good = write(tmp_path / "good.json", {"results": {"v1": [detection([10, 30], "jump", 0.9)]}})
    bad = write(
        tmp_path / "broken.json", {"results": {"v1": [{"segment": [1], "label": "jump", "score": 1}]}}
    )
    out = str(tmp_path / "out")
    assert main(["--ground-truth", str(gt), "--predictions", str(good), str(bad), "--out", out]) == 2
    assert "broken.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["--ground-truth", str(gt), "--predictions", str(good), "--names", "a", "b", "--out", out])
    assert exit_.value.code == 2
    assert "--names gives 2 names for 1" in capsys.readouterr().err

    bare = ground_truth_file(tmp_path, durations=False)
    assert main(["--ground-truth", str(bare), "--predictions", str(good), "--out", out]) == 0
    captured = capsys.readouterr()
    assert "warning: coverage skipped" in captured.err
    model = json.loads(captured.out)["models"]["good"]["false_negatives"]
    assert model["coverage"] is None and model["length"]["XS"]["instances"] == 3
