"""``VideoDataModule``: streaming clips with workers, the bad-input policy, and on-device normalisation.

Bad input policy (``bad_video``):

- ``"error"``: the first missing, empty, corrupt or too-short video stops the run with an error naming the file,
  the reason and how to skip such files instead.
- ``"skip"``: the sample is dropped from its batch, and the skip is logged once per file and counted by reason;
  ``skip_summary()`` gives the counts (a callback reports them at the end of every epoch). Evaluation metrics are
  then computed over the remaining samples, and the number left out is reported beside them.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from datamodules.transforms import normalize
from datamodules.video_io import Video, VideoDecodeError, open_video

log = logging.getLogger(__name__)

BadVideoPolicy = Literal["error", "skip"]


class BadVideoError(RuntimeError):
    """Raised under the ``error`` policy, with the file and the fix in the message."""


def open_checked(path: str, min_frames: int, num_threads: int = 1) -> Video:
    """Open ``path`` and require at least ``min_frames`` frames."""
    video = open_video(path, num_threads)
    if video.num_frames < min_frames:
        raise VideoDecodeError(
            path, "too_short", f"video has {video.num_frames} frames, fewer than the {min_frames} needed"
        )
    return video


def load_guarded(load: Callable[[], dict[str, Any]], policy: BadVideoPolicy, index: int) -> dict[str, Any]:
    """Run a sample's ``load`` under the bad-input policy: raise with the fix, or return a skip marker."""
    try:
        return load()
    except VideoDecodeError as err:
        if policy == "error":
            raise BadVideoError(
                f"{err}. Fix or remove the file from the annotation list, or set data.init_args.bad_video=skip "
                "to skip such videos (they are counted and reported)."
            ) from err
        return {"skipped": (err.path, err.kind, err.reason), "index": index}


def collate_clips(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Default collation of the good samples; skipped ones travel as a list of (path, kind, reason)."""
    good = [s for s in samples if "skipped" not in s]
    batch: dict[str, Any] = default_collate(good) if good else {}
    batch["skipped"] = [s["skipped"] for s in samples if "skipped" in s]
    batch["batch_size"] = len(good)
    return batch


class VideoDataModule(L.LightningDataModule):
    """Base of every video data module: loaders, workers, the bad-input ledger, normalisation on the device.

    Subclasses implement ``build_dataset(stage)`` returning the dataset of "train", "val", "test" or "predict".
    Clips leave the workers as uint8 ``(..., 3, T, H, W)`` under the key ``video``.
    """

    def __init__(
        self,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        prefetch_factor: int = 2,
        decode_threads: int = 1,
        worker_start: Literal["forkserver", "spawn", "fork"] = "forkserver",
        bad_video: BadVideoPolicy = "error",
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
    ):
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.prefetch_factor = prefetch_factor
        self.decode_threads = decode_threads
        self.worker_start = worker_start
        self.bad_video = bad_video
        self.mean = mean
        self.std = std
        self.skip_counts: Counter[str] = Counter()
        self.skipped_files: set[str] = set()
        self._datasets: dict[str, Dataset] = {}

    def build_dataset(self, stage: str) -> Dataset:
        raise NotImplementedError

    def dataset(self, stage: str) -> Dataset:
        if stage not in self._datasets:
            self._datasets[stage] = self.build_dataset(stage)
        return self._datasets[stage]

    def _loader(self, stage: str, shuffle: bool) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            self.dataset(stage),
            batch_size=self.batch_size if stage == "train" else self.eval_batch_size,
            shuffle=shuffle,
            drop_last=stage == "train",
            num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
            collate_fn=self.collate_fn,
            # Workers forked from a trainer that already ran threaded kernels (OpenMP, decoder threads, CUDA)
            # can deadlock; a fork server starts them from a clean process instead.
            multiprocessing_context=self.worker_start if workers > 0 else None,
        )

    @property
    def collate_fn(self) -> Callable[[Sequence[dict[str, Any]]], dict[str, Any]]:
        return collate_clips

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False)

    def record_skips(self, skipped: Sequence[tuple[str, str, str]]) -> None:
        for path, kind, reason in skipped:
            self.skip_counts[kind] += 1
            if path not in self.skipped_files:
                self.skipped_files.add(path)
                log.warning("skipped bad video %s: %s", path, reason)

    def skip_summary(self) -> str:
        if not self.skip_counts:
            return "no video skipped"
        total = sum(self.skip_counts.values())
        reasons = "; ".join(f"{n} x {r}" for r, n in self.skip_counts.most_common())
        return f"{total} samples skipped ({len(self.skipped_files)} distinct files): {reasons}"

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        self.record_skips(batch.get("skipped", []))
        for key in ("video", "static"):
            if key in batch and batch[key].dtype == torch.uint8:
                batch[key] = normalize(batch[key], self.mean, self.std)
        return batch
