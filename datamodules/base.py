"""``VideoDataModule``: streaming clips with workers, the bad-input policy, and on-device normalisation.

Bad input policy (``bad_video``):

- ``"error"``: the first missing, empty, corrupt or too-short video stops the run with an error naming the file,
  the reason and how to skip such files instead.
- ``"skip"``: the sample is dropped from its batch, and the skip is logged once per file and counted by reason;
  ``skip_summary()`` gives the counts (a callback reports them at the end of every epoch). Evaluation metrics are
  then computed over the remaining samples, and the number left out is reported beside them.

Skips found while reading (``record_skips``) are kept per stage ("train", "val", "test", "predict", "sanity")
and per epoch, keyed by sample index, so a DDP rank's padding repeats count once; ``skip_counts`` holds what a
data module dropped once at setup (e.g. listed videos that do not exist).

Training order and augmentation are a pure function of (seed, epoch, sample index): ``SeededSampler`` hands
each training sample a ``SampleKey`` and ``seeded`` draws the sample's randomness from it, so a run resumed
from a checkpoint sees the batches the uninterrupted run would have seen, whatever the number of workers.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from datamodules.transforms import normalize
from datamodules.video_io import Decoder, Video, VideoDecodeError, open_video

log = logging.getLogger(__name__)

BadVideoPolicy = Literal["error", "skip"]

#: File endings taken as videos when ``predict_videos`` names a folder.
VIDEO_FILE_EXTENSIONS = (
    ".mp4", ".m4v", ".mkv", ".webm", ".avi", ".mov", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp", ".ogv",
)  # fmt: skip


def find_videos(items: str | Sequence[str], root: str | os.PathLike | None = None) -> list[Path]:
    """The video files ``items`` name, in the order given: each a file or a folder (searched recursively for
    ``VIDEO_FILE_EXTENSIONS``, sorted by path), absolute, relative to the working directory or, failing that,
    to ``root``. A name that is neither raises ``FileNotFoundError`` naming where it was looked for."""
    found: list[Path] = []
    for item in [items] if isinstance(items, (str, os.PathLike)) else items:
        candidates = [Path(item)] if Path(item).is_absolute() or root is None else [Path(item), Path(root) / item]
        path = next((c for c in candidates if c.exists()), None)
        if path is None:
            raise FileNotFoundError(
                f"predict_videos: {item} not found (looked at {' and '.join(str(c) for c in candidates)}); give "
                "video files or folders, absolute or relative to the working directory"
            )
        if path.is_dir():
            inside = sorted(f for f in path.rglob("*") if f.suffix.lower() in VIDEO_FILE_EXTENSIONS and f.is_file())
            if not inside:
                raise FileNotFoundError(
                    f"predict_videos: folder {path} holds no video file ({', '.join(VIDEO_FILE_EXTENSIONS)})"
                )
            found += inside
        else:
            found.append(path)
    return list(dict.fromkeys(found))


def video_names(paths: Sequence[Path]) -> list[str]:
    """A name per video for result files: the file stem, or, where stems repeat, the path below the files'
    common folder without its ending (``a/clip``, ``b/clip``)."""
    stems = Counter(p.stem for p in paths)
    if all(n == 1 for n in stems.values()):
        return [p.stem for p in paths]
    base = Path(os.path.commonpath([str(p.resolve().parent) for p in paths]))
    return [p.stem if stems[p.stem] == 1 else str(p.resolve().with_suffix("").relative_to(base)) for p in paths]


class BadVideoError(RuntimeError):
    """Raised under the ``error`` policy, with the file and the fix in the message."""


class AnnotationError(ValueError):
    """A malformed or inconsistent annotation file, with the file, the line and what was expected."""


#: Fix proposed for every skippable problem.
SKIP_FIX = "or set data.init_args.bad_video: skip to leave them out (they are counted and reported)"


@dataclass(frozen=True)
class Problem:
    """A bad input found at set-up: ``kind`` (what skips are counted by), ``where`` (``file:line``, or ``file: video
    'id'``), ``reason``, and ``file``, the file left out with it (None when only part of it is, e.g. a segment)."""

    kind: str
    where: str
    reason: str
    file: str | None = None


def open_checked(path: str, min_frames: int, num_threads: int = 1, decoder: Decoder = "auto") -> Video:
    """Open ``path`` with the ``decoder`` backend and require at least ``min_frames`` frames."""
    video = open_video(path, num_threads, decoder)
    if video.num_frames < min_frames:
        raise VideoDecodeError(
            path, "too_short", f"video has {video.num_frames} frames, fewer than the {min_frames} needed"
        )
    return video


class SampleKey(NamedTuple):
    """What ``SeededSampler`` yields for a training sample: its index and the epoch's seed."""

    index: int
    epoch: int
    seed: int


class SeededSampler(DistributedSampler):
    """Shuffled training order, split over DDP ranks, fixed by (seed, epoch); yields ``SampleKey``s.

    Lightning calls ``set_epoch`` every epoch and leaves a ``DistributedSampler`` in place under DDP. ``skip_next``
    leaves out the samples this rank already trained on when a run resumes mid-epoch (see
    ``VideoDataModule.resume_epoch_at``).
    """

    def __init__(self, dataset: Dataset, seed: int):
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(
            dataset,
            num_replicas=dist.get_world_size() if distributed else 1,
            rank=dist.get_rank() if distributed else 0,
            shuffle=True,
            seed=seed,
        )
        self._skip = 0

    def skip_next(self, samples: int) -> None:
        """Leave out the first ``samples`` of the next pass (once)."""
        self._skip = samples

    def __iter__(self) -> Iterator[SampleKey]:  # type: ignore[override]
        skip, self._skip = self._skip, 0
        for position, index in enumerate(super().__iter__()):
            if position >= skip:
                yield SampleKey(int(index), self.epoch, self.seed)


def split_key(key: int | SampleKey) -> tuple[int, int | None]:
    """A dataset key -> (sample index, seed of this sample in this epoch, or None for unseeded keys)."""
    if isinstance(key, tuple):
        index, epoch, seed = key
        state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint32)
        return int(index), (int(state[0]) << 31) ^ int(state[1])
    return int(key), None


@contextmanager
def seeded(seed: int | None):
    """Seed torch's generator for one sample (its numpy draws derive from torch), restoring the caller's state
    afterwards so a loader without workers does not disturb the training process's own random stream."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        # the CPU generator only: torch.manual_seed would also queue the seeding of every accelerator (and
        # format a stack trace for each, about 2 ms a sample) although none is used here
        torch.default_generator.manual_seed(seed)
        yield


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
        return {"skipped": (err.path, err.kind, err.reason, index), "index": index}


#: The clip entries of a sample, stacked by ``stack_clips`` (in the layout the worker left them in); a clip
#: whose transform is left to the device travels with its plan under ``<key>_plan`` and stays apart, uncopied.
CLIP_KEYS = ("video", "static")


def batch_buffer(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor for a batch; in a loader worker, in shared memory, as ``default_collate``
    allocates, so that handing the batch to the training process does not copy it once more."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(*shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(*shape)


def stack_clips(clips: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack`` that keeps the samples' memory order: a (3, T, H, W) clip laid out as (T, H, W, 3), as the
    resize leaves frames decoded channels-last, is copied as it lies (not transposed on the CPU) and the batch
    is a (B, 3, T, H, W) view of (B, T, H, W, 3) memory; the data module makes it contiguous once on the
    device. In a worker the batch is in shared memory (``batch_buffer``); a batch of one is not copied."""
    first = clips[0]
    if len(clips) == 1 and first.untyped_storage().nbytes() == first.numel() * first.element_size():
        return first[None]  # a batch of one that fills its storage (a THUMOS window) is the clip itself
    order = sorted(range(first.dim()), key=lambda d: -first.stride(d))  # outermost dimension first
    out = batch_buffer((len(clips), *(first.shape[d] for d in order)), first.dtype)
    for i, clip in enumerate(clips):
        out[i] = clip.permute(order)
    return out.permute(0, *(order.index(d) + 1 for d in range(first.dim())))


def collate_clips(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Default collation of the good samples, the clips by ``stack_clips``; skipped ones travel as a list of
    (path, kind, reason, index)."""
    good = [s for s in samples if "skipped" not in s]
    batch: dict[str, Any] = {}
    if good:
        batch = default_collate([{k: v for k, v in s.items() if k not in CLIP_KEYS} for s in good])
        for key in CLIP_KEYS:
            if key in good[0]:
                clips = [s[key] for s in good]
                batch[key] = clips if f"{key}_plan" in good[0] else stack_clips(clips)
    batch["skipped"] = [s["skipped"] for s in samples if "skipped" in s]
    batch["batch_size"] = len(good)
    return batch


def keep_freed_memory(trim_threshold: int = 256 << 20) -> bool:
    """glibc's malloc in a loader worker: every allocation from the heap (none mapped apart, however large: a
    decoded clip is about 11 MB, a THUMOS window 59 MB) and up to ``trim_threshold`` freed bytes kept there for the
    next clip, instead of fresh pages from the kernel for every clip (whose page faults took about a sixth of a
    worker's time on AVA's JPEG frames, README "Loader workers per GPU"). True where set (glibc); elsewhere
    nothing changes."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, trim_threshold))


class _ExitWithTrainer:
    """Loader worker start-up: end the worker as soon as the training process is gone, even when it was SIGKILLed
    (workers are children of the fork server, which does not stop them); keep freed clip memory for reuse
    (``keep_freed_memory``)."""

    def __init__(self, trainer_pid: int):
        self.trainer_pid = trainer_pid

    def __call__(self, worker_id: int) -> None:
        keep_freed_memory()
        threading.Thread(target=self._watch, daemon=True, name="trainer-watch").start()

    def _watch(self) -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(self.trainer_pid, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:
                pass


class VideoDataModule(L.LightningDataModule):
    """Base of every video data module: loaders, workers, the bad-input ledger, normalisation on the device.

    Subclasses implement ``build_dataset(stage)`` returning the dataset of "train", "val", "test" or "predict".
    Clips leave the workers as uint8 ``(..., 3, T, H, W)`` under the key ``video``. Bad input found at set-up
    goes through ``settle`` (one report for every data module). ``predict_videos`` (files or folders, see
    ``find_videos``) are what ``predict`` runs on, with the evaluation transform and no annotation.
    ``decoder``: the video decoding backend, ``auto`` (decord, and PyAV for the files decord cannot read, e.g.
    AV1), ``decord`` or ``pyav`` (``datamodules.video_io``); frame folders do not use it.
    """

    #: Problem kinds that are annotation errors, with their fix (``{skip}`` is filled in); other kinds are bad
    #: videos. A data module whose checks find annotation problems names their kinds here.
    annotation_fixes: ClassVar[Mapping[str, str]] = {}

    def __init__(
        self,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        prefetch_factor: int = 2,
        decode_threads: int = 1,
        decoder: Decoder = "auto",
        worker_start: Literal["forkserver", "spawn", "fork"] = "forkserver",
        bad_video: BadVideoPolicy = "error",
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        predict_videos: str | list[str] | None = None,
    ):
        super().__init__()
        self.predict_videos = predict_videos
        self._predict_files: list[Path] | None = None
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.prefetch_factor = prefetch_factor
        self.decode_threads = decode_threads
        self.decoder = decoder
        self.worker_start = worker_start
        self.bad_video = bad_video
        self.mean = mean
        self.std = std
        self.skip_counts: Counter[str] = Counter()
        self.skipped_files: set[str] = set()
        self._epoch_skips: dict[str, dict[int, tuple[str, str]]] = defaultdict(dict)
        self._setup_skips: dict[str, dict[str, Counter[str]]] = defaultdict(dict)
        self._resume_at: tuple[int, int] | None = None
        self._epoch_samples: Counter[str] = Counter()
        self._datasets: dict[str, Dataset] = {}

    def build_dataset(self, stage: str) -> Dataset:
        raise NotImplementedError

    @property
    def predict_files(self) -> list[Path]:
        """The files of ``predict_videos`` (folders expanded; relative names against the working directory,
        then the data module's ``root``): ``predict`` reads these instead of annotated videos."""
        if self._predict_files is None:
            self._predict_files = find_videos(self.predict_videos or [], getattr(self, "root", None))
        return self._predict_files

    def predicting_own_videos(self) -> bool:
        """A ``predict`` run over ``predict_videos``: nothing else (annotations, a synthetic set) is needed."""
        trainer = self.trainer
        return bool(self.predict_videos) and trainer is not None and trainer.state.fn == "predict"

    def dataset(self, stage: str) -> Dataset:
        if stage not in self._datasets:
            self._datasets[stage] = self.build_dataset(stage)
        return self._datasets[stage]

    def _loader(self, stage: str, shuffle: bool) -> DataLoader:
        workers = self.num_workers
        dataset = self.dataset(stage)
        sampler = SeededSampler(dataset, int(os.environ.get("PL_GLOBAL_SEED", 0))) if shuffle else None
        if sampler is not None and self._resume_at is not None:
            epoch, batches = self._resume_at
            sampler.set_epoch(epoch)
            sampler.skip_next(batches * self.batch_size)
            self._resume_at = None
        return DataLoader(
            dataset,
            batch_size=self.batch_size if stage == "train" else self.eval_batch_size,
            sampler=sampler,
            drop_last=stage == "train",
            worker_init_fn=_ExitWithTrainer(os.getpid()) if workers > 0 else None,
            num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
            collate_fn=self.collate_fn,
            # The loader's own generator for its worker seeds: a resumed run's new iterator then draws nothing
            # from the global generator, whose state (restored from the checkpoint) drives dropout and the like.
            generator=torch.Generator(),
            # Workers forked from a trainer that already ran threaded kernels (OpenMP, decoder threads, CUDA)
            # can deadlock; a fork server starts them from a clean process instead.
            multiprocessing_context=self.worker_start if workers > 0 else None,
        )

    @property
    def collate_fn(self) -> Callable[[Sequence[dict[str, Any]]], dict[str, Any]]:
        return collate_clips

    def resume_epoch_at(self, epoch: int, batches: int) -> None:
        """A run resumes in ``epoch`` after ``batches`` training batches of it (a mid-epoch checkpoint): the next
        training loader starts its sampler there, so the rest of the epoch is what the uninterrupted run trained on
        (Lightning would start the epoch's loader again from its first batch). Set before the loader is built, as
        its workers fetch batches from the moment it is iterated."""
        self._resume_at = (epoch, batches)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False)

    def current_stage(self) -> str:
        """ "train", "val", "test", "predict" or "sanity" (Lightning's validation sanity check)."""
        trainer = self.trainer
        if trainer is None or trainer.state.stage is None:
            return "train"
        if trainer.sanity_checking:
            return "sanity"
        return {"validate": "val"}.get(trainer.state.stage.value, trainer.state.stage.value)

    def record_skips(self, skipped: Sequence[tuple[str, str, str, int]], stage: str = "train") -> None:
        for path, kind, reason, index in skipped:
            self._epoch_skips[stage][int(index)] = (path, kind)
            if path not in self.skipped_files:
                self.skipped_files.add(path)
                log.warning("skipped bad video %s: %s", path, reason)

    def start_epoch(self, stage: str) -> None:
        """Forget the skips and sample count of the previous epoch of ``stage``."""
        self._epoch_skips.pop(stage, None)
        self._epoch_samples.pop(stage, None)

    def epoch_skips(self, stage: str) -> dict[int, tuple[str, str]]:
        """This rank's skipped samples of the current epoch of ``stage``: index -> (path, kind)."""
        return dict(self._epoch_skips.get(stage, {}))

    def epoch_samples(self, stage: str) -> int:
        """Good samples this rank has delivered in the current epoch of ``stage``."""
        return self._epoch_samples[stage]

    def settle(self, problems: Sequence[Problem], what: str, stages: Iterable[str] = ()) -> None:
        """The set-up report: under ``bad_video: error`` raise on the first problem (``AnnotationError`` for the
        kinds in ``annotation_fixes``, else ``BadVideoError``) with its place, reason and fix; under ``skip`` log
        them once and count them by kind (on rank 0: the reports sum over ranks), and for each of the ``stages``
        that read ``what`` (its ``<stage>/skipped_videos`` counts them every epoch: they are left out of each)."""
        for stage in stages:
            self._setup_skips[stage][what] = Counter(p.kind for p in problems)
        if not problems:
            return
        first = problems[0]
        if self.bad_video == "error":
            more = f" ({len(problems) - 1} more problems in {what})" if len(problems) > 1 else ""
            fixes = self.annotation_fixes
            fix = fixes.get(first.kind, "fix or re-download the file, {skip}").format(skip=SKIP_FIX)
            error = AnnotationError if first.kind in fixes else BadVideoError
            raise error(f"{first.where}: {first.reason}{more}. To go on: {fix}")
        counts = Counter(p.kind for p in problems)
        summary = "; ".join(f"{n} x {kind}" for kind, n in counts.most_common())
        log.warning(
            "%s: left out under bad_video: skip: %s (first: %s: %s)", what, summary, first.where, first.reason
        )
        if self.trainer is None or self.trainer.global_rank == 0:
            self.skip_counts.update(counts)
            self.skipped_files.update(p.file for p in problems if p.file is not None)

    def setup_skips(self, stage: str) -> Counter[str]:
        """What set-up left out of ``stage`` under ``bad_video: skip``, by kind (the same on every DDP rank)."""
        return sum(self._setup_skips.get(stage, {}).values(), Counter())

    def skip_summary(self, skips: dict[int, tuple[str, str]] | None = None) -> str:
        """Counts by reason: of ``skips`` (index -> (path, kind)), else of everything recorded so far."""
        if skips is None:
            counts = self.skip_counts + Counter(
                kind for st in self._epoch_skips.values() for _, kind in st.values()
            )
            files = len(self.skipped_files)
        else:
            counts, files = Counter(kind for _, kind in skips.values()), len({p for p, _ in skips.values()})
        if not counts:
            return "no video skipped"
        reasons = "; ".join(f"{n} x {r}" for r, n in counts.most_common())
        return f"{sum(counts.values())} samples skipped ({files} distinct files): {reasons}"

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        stage = self.current_stage()
        self.record_skips(batch.get("skipped", []), stage)
        self._epoch_samples[stage] += int(batch.get("batch_size", 0))
        for key in CLIP_KEYS:
            if key in batch and batch[key].dtype == torch.uint8:
                # one contiguous copy here, on the device, of a batch stacked channels-last (stack_clips)
                batch[key] = normalize(batch[key].contiguous(), self.mean, self.std)
        return batch
