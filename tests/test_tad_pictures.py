"""Temporal detection timelines: the bars drawn are the segments given (ground truth, then the top-k detections
by score, coloured by class), and the callback writes one picture per video after validation and predict."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest

from datamodules.synthetic import generate_temporal
from lightning_modules.cli import main
from lightning_modules.pictures.timelines import CLASS_COLOURS, timeline_figure
from tests.quick import tiny_tad

CLASSES = ["jump", "spin", "slide"]


def bars(fig: plt.Figure, gid: str) -> list[tuple[float, float, float, tuple]]:
    """(start, end, row centre, colour) of the bars of one kind, in drawing order."""
    (ax,) = fig.axes
    return [
        (p.get_x(), p.get_x() + p.get_width(), p.get_y() + p.get_height() / 2, p.get_facecolor()[:3])
        for p in ax.patches
        if p.get_gid() == gid
    ]


def test_timeline_draws_the_ground_truth_and_the_top_k_detections(tmp_path):
    truth = np.array([[1.0, 3.0], [5.5, 8.0]])
    detections = np.array([[0.8, 3.2], [5.0, 8.5], [1.5, 2.0], [9.0, 9.5]])
    scores = np.array([0.2, 0.9, 0.5, 0.05])
    labels = np.array([0, 2, 1, 0])
    fig = timeline_figure(truth, [0, 2], detections, scores, labels, CLASSES, duration=10.0, top_k=3)

    drawn = bars(fig, "truth")
    assert [(s, e) for s, e, _, _ in drawn] == [(1.0, 3.0), (5.5, 8.0)]
    assert {row for _, _, row, _ in drawn} == {0.0}
    assert [c for *_, c in drawn] == [CLASS_COLOURS[0], CLASS_COLOURS[2]]
    drawn = bars(fig, "prediction")  # best first, one row each; the 0.05 detection is not among the top 3
    assert [(s, e) for s, e, _, _ in drawn] == [(5.0, 8.5), (1.5, 2.0), (0.8, 3.2)]
    assert [row for _, _, row, _ in drawn] == [1.0, 2.0, 3.0]
    assert [c for *_, c in drawn] == [CLASS_COLOURS[2], CLASS_COLOURS[1], CLASS_COLOURS[0]]
    (ax,) = fig.axes
    texts = [t.get_text().strip() for t in ax.texts]
    assert texts == ["jump", "slide", "slide 0.90", "spin 0.50", "jump 0.20"]
    assert ax.get_xlim() == (0.0, 10.0)
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == sorted(CLASSES)

    fig.savefig(tmp_path / "timeline.png", dpi=100)
    plt.close(fig)
    image = matplotlib.image.imread(tmp_path / "timeline.png")
    assert image.shape[0] > 100 and image.shape[1] == 1000 and image.std() > 0


def test_timeline_without_any_segment():
    fig = timeline_figure(np.zeros((0, 2)), [], np.zeros((0, 2)), [], [], CLASSES, duration=6.0)
    (ax,) = fig.axes
    assert not ax.patches and "no detections" in [t.get_text() for t in ax.texts]
    plt.close(fig)


@pytest.fixture(scope="module")
def temporal_set(tmp_path_factory) -> Path:
    return generate_temporal(
        tmp_path_factory.mktemp("temporal") / "set", num_videos=6, size=32, seconds=6, fps=10
    )


def test_fit_and_predict_write_one_timeline_per_video(tmp_path, temporal_set):
    args = [
        *tiny_tad(tmp_path, temporal_set), "--model.init_args.head.init_args.embed_dim=16",
        "--model.init_args.head.init_args.head_channels=16", "--run_id=t",  # the recipe draws into <run>/timelines
    ]  # fmt: skip
    fit = [
        "--trainer.logger=lightning_modules.runs.RunCSVLogger", f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.check_val_every_n_epoch=1",
    ]  # fmt: skip
    cli = main(["fit", *args, *fit])
    timelines = tmp_path / "t" / "timelines"
    database = json.loads((temporal_set / "annotations.json").read_text())["database"]
    val_videos = sorted(v for v, e in database.items() if e["subset"] == "validation")
    assert val_videos and sorted(p.name for p in timelines.glob("*.png")) == [
        f"{v}_val.png" for v in val_videos
    ]
    (callback,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "TemporalDetectionTimeline"]
    assert len(callback.written) == len(val_videos)  # not drawn in the sanity check
    for path in callback.written:
        assert matplotlib.image.imread(path).ndim == 3

    # Predict from the checkpoint, logging the pictures to an offline W&B run (no run is left open by an earlier
    # test: tests/conftest.py finishes them).
    (ckpt,) = (tmp_path / "t").rglob("last.ckpt")
    main([
        "predict", *args, f"--ckpt_path={ckpt}", "--trainer.logger=lightning_modules.loggers.AutoWandbLogger",
    ])  # fmt: skip
    assert sorted(p.name for p in timelines.glob("*_predict.png")) == [f"{v}_predict.png" for v in val_videos]
    import wandb

    wandb.finish()  # W&B's service writes the media files; flush it before looking (under load it lags)
    logged = list(tmp_path.rglob("wandb/**/media/images/predict/timelines*.png"))
    assert len(logged) == len(val_videos)
