"""How the benchmarks measure: interleaved timing (ratios, not absolute times) and peak memory in a fresh process."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REAL_VIDEO = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")


REPO = Path(__file__).resolve().parents[1]


def interleaved(
    fns: dict[str, Callable[[], None]], repeats: int, stat: Callable[[list[float]], Any] = statistics.median
) -> dict[str, Any]:
    """Seconds per call of each function (median, or ``stat``, e.g. ``list`` for every time, over
    ``repeats``), calls interleaved so drifts in machine load hit all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: stat(v) for k, v in times.items()}


def in_fresh_process(module: str, call: str, what: str) -> dict:
    """The JSON result of ``benchmarks.<module>.<call>`` run in a fresh Python process, glibc mapping every
    allocation of 64 KiB or more on its own (``MALLOC_MMAP_THRESHOLD_``), so a freed tensor leaves the RSS at once
    and a peak RSS is that of live memory. ``what`` names the run in the error if the process fails."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    code = f"import json; from benchmarks.{module} import *; print(json.dumps({call}))"
    run = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=REPO, env=env, capture_output=True, text=True
    )
    if run.returncode:
        raise RuntimeError(f"{what} exited with {run.returncode}:\n{run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def rss_bytes() -> int:
    """This process's resident memory now."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@contextmanager
def peak_rss() -> Iterator[dict[str, int]]:
    """The one way the benchmarks measure memory: ``with peak_rss() as mem: step()`` leaves ``mem["before"]``,
    the RSS when the ``with`` began, and ``mem["peak"]``, the highest RSS inside it (the kernel's high-water mark,
    reset to the current RSS on entry). Meant for a fresh process (``in_fresh_process``)."""
    mem = {"before": rss_bytes()}
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current RSS
    yield mem
    with open("/proc/self/status") as f:
        mem["peak"] = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
