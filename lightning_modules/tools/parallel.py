"""What the data tools share: one job per item over a process pool, with progress on stderr.

On a terminal the progress is a tqdm bar; otherwise (a batch log) one plain line at every tenth of the items
and at least every ``PLAIN_EVERY_S`` seconds, so a log neither floods nor stays silent for hours.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from tqdm import tqdm

from datamodules.prepare.video_check import VideoFacts
from datamodules.video_io import VideoDecodeError, open_video

T = TypeVar("T")
R = TypeVar("R")

PLAIN_EVERY_S = 60.0


def default_workers() -> int:
    """The CPUs this process may use, at most 8 (decoding is also bound by the disk)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def run_parallel(
    job: Callable[[T], R], items: Iterable[T], workers: int, what: str, unit: str = "video"
) -> Iterator[R]:
    """``job(item)`` for every item, in ``workers`` processes (in this one for 1), results in completion order,
    with progress on stderr."""
    items = list(items)
    report = Progress(len(items), what, unit)
    if workers <= 1 or len(items) <= 1:
        results: Iterable[R] = map(job, items)
        pool = None
    else:
        pool = multiprocessing.get_context().Pool(min(workers, len(items)))
        results = pool.imap_unordered(job, items, chunksize=1)
    try:
        for result in results:
            report.step()
            yield result
    finally:
        report.close()
        if pool is not None:
            pool.terminate()
            pool.join()


class Progress:
    """A tqdm bar on a terminal, periodic plain lines elsewhere."""

    def __init__(self, total: int, what: str, unit: str):
        self.total, self.what, self.unit = total, what, unit
        self.done = 0
        self.bar = tqdm(total=total, desc=what, unit=unit, file=sys.stderr) if sys.stderr.isatty() else None
        self.last_line = time.monotonic()
        self.every = max(1, total // 10)

    def step(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update()
            return
        now = time.monotonic()
        if self.done % self.every == 0 or self.done == self.total or now - self.last_line >= PLAIN_EVERY_S:
            print(f"{self.what}: {self.done}/{self.total} {self.unit}s", file=sys.stderr, flush=True)
            self.last_line = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextmanager
def decoder_messages_hidden() -> Iterator[None]:
    """The C++ decoders' own messages (decord prints every failure to the process's stderr) silenced while a
    check runs: each reason is in the report, and they would break the progress bar."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _facts(item: tuple[str, str], options: dict[str, Any]) -> tuple[str, VideoFacts | str]:
    video_id, path = item
    try:
        with decoder_messages_hidden():
            video = open_video(path, **options)
    except VideoDecodeError as err:
        return video_id, f"{err.kind}: {err.reason}"
    return video_id, VideoFacts(video.num_frames, video.fps)


def video_facts(
    paths: dict[str, str], workers: int, decoder: str | None = None
) -> tuple[dict[str, VideoFacts], dict[str, str]]:
    """Frame count and rate of each video (id -> path), opened as the data modules open them; and, for the
    videos that cannot be opened, the reason."""
    options = {"decoder": decoder} if decoder is not None else {}
    facts, failed = {}, {}
    job = functools.partial(_facts, options=options)
    for video_id, found in run_parallel(job, paths.items(), workers, "reading video lengths"):
        if isinstance(found, VideoFacts):
            facts[video_id] = found
        else:
            failed[video_id] = found
    return facts, failed
