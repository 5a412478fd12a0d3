from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# The tests' models and clips are tiny: a second intra-op thread brings nothing, and on a shared 2-core machine each
# small op then waits for a core the other thread cannot get (an op of microseconds takes milliseconds). One thread
# here and, through the environment, in the commands the tests start (CLI subprocesses and their DDP ranks); an
# explicit setting wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def master_port(monkeypatch) -> None:
    """Each test's DDP runs (and the commands it starts) meet at a port of its own (see ``reserved_port``)."""
    from tests.helpers import reserved_port

    monkeypatch.setenv("MASTER_PORT", str(reserved_port()))


@pytest.fixture(autouse=True)
def no_open_wandb_run():
    """A W&B run a test leaves open would be reused by the next test's logger in this process (W&B's rule): its
    pictures and metrics would land in the earlier run's folder. Finish it after each test."""
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


@pytest.fixture(autouse=True)
def ordinary_scheduling():
    """No test may leave this process under real-time scheduling (run as root, the AV1 encoder SVT-AV1 switches the
    thread that opens it to FIFO): every later child would inherit it, and a busy one would hold a CPU for good."""
    yield
    if hasattr(os, "sched_getscheduler") and os.sched_getscheduler(0) != os.SCHED_OTHER:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        pytest.fail("the test left this process under real-time scheduling (restored)")


@pytest.fixture(autouse=True, scope="session")
def one_intra_op_thread():
    """Torch may have been imported (and sized its thread pool) before the environment above was read."""
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "forkserver_preload(*modules): the test's loader workers start from this process's fork server, which "
        "should import these modules once (started in the background at collection; see below)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """If a selected test starts loader workers here, start the fork server now with the modules they need
    preloaded: it imports torch and Lightning (seconds) on a core the earlier, single-threaded tests leave free,
    and each worker is then a fork of it instead of a fresh import."""
    modules = sorted({m for item in items for mark in item.iter_markers("forkserver_preload") for m in mark.args})
    if modules:
        import multiprocessing
        from multiprocessing import forkserver

        multiprocessing.set_forkserver_preload(modules)
        forkserver.ensure_running()


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
