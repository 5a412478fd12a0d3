"""Pictures of spatio-temporal detection: the kept-token panels and the keyframe boxes, checked against masks
and boxes built by hand."""

from __future__ import annotations

import numpy as np
import torch

from lightning_modules.pictures.detection import (
    DROPPED,
    KEPT,
    kept_tokens_figure,
    keyframe_figure,
    token_masks,
)


def test_token_masks_mark_the_kept_positions_of_each_pruning_block():
    grid = (2, 2, 3)  # time-major positions: slice 0 is 0..5, slice 1 is 6..11
    kept = {6: torch.tensor([1, 7]), 3: torch.tensor([0, 1, 5, 7, 9])}
    masks = token_masks(kept, grid)
    expected = np.full((3, 12), DROPPED, dtype=np.float32)
    expected[0] = KEPT
    expected[1, [0, 1, 5, 7, 9]] = KEPT  # block 3 first: rows follow the block order
    expected[2, [1, 7]] = KEPT
    assert np.array_equal(masks, expected.reshape(3, 2, 2, 3))


def test_kept_tokens_panels_darken_exactly_the_dropped_patches():
    rng = np.random.default_rng(0)
    grid = (2, 2, 2)
    frames = rng.uniform(0.2, 1.0, (2, 32, 32, 3)).astype(np.float32)  # 16x16 pixels a patch
    kept = {1: torch.tensor([0, 3, 5, 6])}
    fig = kept_tokens_figure(frames, kept, grid)
    panel = fig.axes[2 + 1].images[0].get_array()  # row "after block 1", slice 1
    expected = frames[1].copy()
    for position in range(4, 8):  # slice 1's patches; 5 and 6 kept
        r, c = divmod(position - 4, 2)
        if position not in (5, 6):
            expected[16 * r : 16 * (r + 1), 16 * c : 16 * (c + 1)] *= DROPPED
    np.testing.assert_allclose(np.asarray(panel), expected, rtol=1e-6)
    assert [t.get_text() for t in fig.axes[3].texts] == ["2"]  # kept count of that slice


def test_keyframe_figure_draws_the_ground_truth_and_the_best_detections():
    frame = np.zeros((60, 80, 3), dtype=np.float32)
    gt_boxes = np.array([[10.0, 5.0, 30.0, 50.0]])
    gt_labels = np.array([[0, 1, 0]])
    boxes = np.array([[12.0, 6.0, 31.0, 49.0], [50.0, 10.0, 70.0, 40.0], [0.0, 0.0, 5.0, 5.0]])
    scores = np.array([[0.1, 0.9, 0.4], [0.05, 0.1, 0.2], [0.6, 0.0, 0.0]])
    fig = keyframe_figure(frame, gt_boxes, gt_labels, boxes, scores, ["a", "b", "c"], max_boxes=2)
    rects = [(p.get_x(), p.get_y(), p.get_width(), p.get_height()) for p in fig.axes[0].patches]
    # the ground truth, then the two detections of highest top score (0.9, then 0.6)
    assert rects == [(10.0, 5.0, 20.0, 45.0), (12.0, 6.0, 19.0, 43.0), (0.0, 0.0, 5.0, 5.0)]
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["b", "b 0.90, c 0.40", "a 0.60"]


def test_predict_with_the_callback_writes_both_pictures_per_keyframe(tmp_path):
    """Through the CLI: the untrained tiny EVAD predicts on the synthetic set and the callback draws the first two
    keyframes, named by video id and timestamp."""
    from lightning_modules.cli import main
    from lightning_modules.pictures.detection import EVADPictures
    from tests.test_detection_task import tiny

    cli = main([
        "predict", *tiny(tmp_path / "runs", tmp_path / "data"),
        "--trainer.callbacks+=lightning_modules.pictures.detection.EVADPictures",
        "--trainer.callbacks.max_keyframes=2",
    ])  # fmt: skip
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, EVADPictures)]
    names = cli.datamodule.video_names("predict")
    strips = [p for p in callback.written if p.stem.endswith("_predict_strip")]
    pictures = [p for p in callback.written if p not in strips]
    assert len(pictures) == 4
    drawn = {p.stem.rsplit("_", 3)[0] for p in pictures}
    assert sorted(p.stem.removesuffix("_predict_strip") for p in strips) == sorted(drawn)  # one per video
    for path in callback.written:
        assert path.read_bytes()[:4] == b"\x89PNG"
    for path in pictures:
        video, stamp, stage, kind = path.stem.rsplit("_", 3)
        assert video in names and stamp.startswith("t") and stage == "predict" and kind in ("boxes", "tokens")
