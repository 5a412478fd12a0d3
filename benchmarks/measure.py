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


#: A timed comparison is unreliable when another process used more than this many cores on average while it ran,
MAX_OTHER_LOAD = 0.25
#: or when a function's median call took this much longer than its fastest (the repeats disagree),
MAX_SPREAD = 0.10
#: and is measured again up to this many times in all before it is reported as unreliable.
ATTEMPTS = 3


#: Attempts shorter than this are not judged by load: at 100 clock ticks a second one stray tick is a lot.
MIN_LOAD_SECONDS = 1.0


def _busy_ticks() -> int:
    """Clock ticks the CPUs this process may run on spent on anything but idling, since boot (``/proc/stat``):
    the other CPUs of a shared node are not this benchmark's concern."""
    allowed = {f"cpu{i}" for i in os.sched_getaffinity(0)}
    total = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if name not in allowed:
                continue
            fields = [int(v) for v in values]
            idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
            total += sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal; guest is in user
    return total


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (loader workers, fork servers and theirs), children of any thread."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except OSError:
                continue
            found += children
            queue += children
    return found


def _own_ticks() -> int:
    """Clock ticks this process and every process below it have run (the ones it waited for included)."""
    ticks = 0
    for pid in [os.getpid(), *_descendants(os.getpid())]:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # a child that ended meanwhile
        ticks += int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if pid == os.getpid() else 0)
    return ticks


class OtherLoad:
    """``with OtherLoad() as load: ...`` leaves ``load.cores``: how many of this process's CPUs other processes
    kept busy on average meanwhile (niced ones included), their busy time less this process tree's, and
    ``load.seconds``, how long it watched."""

    def __enter__(self) -> OtherLoad:  # noqa: PYI034
        self._wall, self._busy, self._own = time.monotonic(), _busy_ticks(), _own_ticks()
        self.cores = self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        hz = os.sysconf("SC_CLK_TCK")
        self.seconds = max(time.monotonic() - self._wall, 1e-9)
        others = (_busy_ticks() - self._busy) - (_own_ticks() - self._own)
        self.cores = max(others, 0) / hz / self.seconds


class Timing(dict):
    """Seconds per call of each function (a dict, as before), and whether the machine let them be measured:
    ``reliable``, the ``reasons`` it was not, the ``attempts`` it took, each function's ``spread`` (median over
    fastest, minus 1) and the ``other_load`` (cores) of the accepted attempt."""

    reliable: bool = True
    reasons: list[str]
    attempts: int = 1
    spread: dict[str, float]
    other_load: float = 0.0



def stability(*timings: Timing) -> dict[str, Any]:
    """What a benchmark's result says about the timings behind it: ``reliable`` only when every one was."""
    return {
        "reliable": all(t.reliable for t in timings),
        "unreliable_because": [r for t in timings for r in t.reasons],
        "attempts": [t.attempts for t in timings],
        "spread": [t.spread for t in timings],
        "other_load_cores": [round(t.other_load, 3) for t in timings],
    }


def unstable(times: dict[str, list[float]], other_load: float, max_spread: float, max_other_load: float) -> list[str]:
    """Why a set of interleaved repeats cannot be trusted (empty: it can)."""
    reasons = []
    if other_load > max_other_load:
        reasons.append(f"other processes kept {other_load:.2f} cores busy (limit {max_other_load:g})")
    for name, seconds in times.items():
        spread = statistics.median(seconds) / min(seconds) - 1
        if len(seconds) > 2 and spread > max_spread:
            reasons.append(f"{name}: the median call took {100 * spread:.0f}% longer than the fastest")
    return reasons


def interleaved(
    fns: dict[str, Callable[[], None]],
    repeats: int,
    stat: Callable[[list[float]], Any] = statistics.median,
    check: Callable[[dict[str, list[float]]], str | None] | None = None,
    attempts: int = ATTEMPTS,
    max_spread: float = MAX_SPREAD,
    max_other_load: float = MAX_OTHER_LOAD,
) -> Timing:
    """Seconds per call of each function (median, or ``stat``, e.g. ``list`` for every time, over ``repeats``),
    calls interleaved so drifts in machine load hit all alike.

    Interleaving does not help when the machine is busy for part of a run (the baseline's calls alone may land in
    the busiest part), so each attempt is checked: the load other processes put on the machine meanwhile, the
    spread of each function's repeats, and ``check`` (every time per function -> a reason the figures are
    impossible, e.g. a time ratio beyond what the MACs allow, or None). A failed attempt is measured again, up to
    ``attempts`` in all; the last one is returned with ``reliable`` False and the reasons."""
    for fn in fns.values():
        fn()  # warm-up
    for attempt in range(1, attempts + 1):
        times: dict[str, list[float]] = {k: [] for k in fns}
        with OtherLoad() as load:
            for _ in range(repeats):
                for name, fn in fns.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
        judged_load = load.cores if load.seconds >= MIN_LOAD_SECONDS else 0.0
        reasons = unstable(times, judged_load, max_spread, max_other_load)
        impossible = check(times) if check is not None else None
        if impossible:
            reasons.append(impossible)
        if not reasons or attempt == attempts:
            break
        print(f"unsteady timing (attempt {attempt} of {attempts}): {'; '.join(reasons)}; measuring again", flush=True)
    result = Timing({k: stat(v) for k, v in times.items()})
    result.reliable, result.reasons, result.attempts = not reasons, reasons, attempt
    result.spread = {k: round(statistics.median(v) / min(v) - 1, 4) for k, v in times.items()}
    result.other_load = load.cores
    return result


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
