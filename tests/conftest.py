from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def ramp_video(num_frames: int, height: int = 48, width: int = 64) -> np.ndarray:
    """Frames whose mean grey level encodes the frame index (index * 8), so decoded frames can be identified."""
    frames = np.zeros((num_frames, height, width, 3), dtype=np.uint8)
    for i in range(num_frames):
        frames[i] = min(i * 8, 255)
    return frames


@pytest.fixture
def make_video(tmp_path: Path):
    from datamodules.synthetic import write_video

    def make(name: str, num_frames: int, fps: int = 10, height: int = 48, width: int = 64) -> Path:
        path = tmp_path / name
        write_video(path, ramp_video(num_frames, height, width), fps)
        return path

    return make


@pytest.fixture(scope="session")
def synthetic_classification(tmp_path_factory) -> Path:
    """A small synthetic classification set shared by the tests (3 videos per class)."""
    from datamodules.synthetic import generate_classification

    root = tmp_path_factory.mktemp("synthetic") / "classification"
    return generate_classification(root, videos_per_class=3, val_fraction=1 / 3, seed=1)
