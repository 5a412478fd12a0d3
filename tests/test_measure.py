"""The benchmarks' timing says when the machine did not let it measure: load from other processes, repeats that
disagree, ratios the MACs do not allow; it measures again and then marks the figure unreliable."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.measure import OtherLoad, interleaved, stability, unstable


def work(calls: int = 40) -> None:
    a = torch.randn(160, 160)
    for _ in range(calls):
        a = torch.tanh(a @ a)


def long_work() -> None:
    """A call long enough that an attempt lasts past MIN_LOAD_SECONDS."""
    start = time.monotonic()
    while time.monotonic() - start < 0.25:
        work(10)


def foreign_burners(n: int, pid_file: Path) -> list[int]:
    """``n`` busy-looping processes that are not this process's children (their shell exits at once), as another
    user's jobs on a shared machine; returns their pids, also written to ``pid_file`` as they start, so that the
    test can kill every one of them whatever fails after."""
    script = (
        f"for i in $(seq {n}); do {sys.executable} -c 'while True: pass' >/dev/null 2>&1 </dev/null & "
        f"echo $! >> {pid_file}; done"
    )
    subprocess.run(["sh", "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True, timeout=30)  # fmt: skip
    return [int(pid) for pid in pid_file.read_text().split()]


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_the_rules_against_hand_made_repeats():
    steady = {"a": [1.0, 1.01, 1.02], "b": [2.0, 2.0, 2.05]}
    assert unstable(steady, other_load=0.0, max_spread=0.1, max_other_load=0.25) == []
    spread = {"a": [1.0, 1.3, 1.4], "b": [2.0, 2.0, 2.05]}
    assert unstable(spread, 0.0, 0.1, 0.25) == ["a: the median call took 30% longer than the fastest"]
    assert unstable(steady, 1.2, 0.1, 0.25) == ["other processes kept 1.20 cores busy (limit 0.25)"]


def test_a_loaded_machine_is_seen_and_the_figure_marked_unreliable(tmp_path):
    """Two foreign busy loops on this 2-core machine while two equal functions are timed: the load is measured,
    the comparison is tried again and then reported as unreliable, not as a result."""
    pid_file = tmp_path / "burners.pid"
    try:
        foreign_burners(2, pid_file)
        time.sleep(0.5)
        with OtherLoad() as load:
            time.sleep(1.0)
        timing = interleaved({"a": long_work, "b": long_work}, repeats=3, attempts=2)
    finally:  # whatever happened, no loop outlives the test
        kill_all([int(pid) for pid in pid_file.read_text().split()] if pid_file.is_file() else [])
    assert load.cores > 0.8, load.cores  # at least most of a core went to the loops
    assert not timing.reliable and timing.attempts == 2
    assert any(r.startswith("other processes kept") for r in timing.reasons), timing.reasons
    fields = stability(timing)
    assert fields["reliable"] is False and fields["attempts"] == [2]


def test_an_impossible_ratio_is_measured_again_then_flagged():
    calls = []

    def impossible_once(times):
        calls.append(times)
        return "too fast for its MACs" if len(calls) == 1 else None

    lenient = {"max_spread": math.inf, "max_other_load": math.inf}
    timing = interleaved({"a": work}, repeats=2, attempts=3, check=impossible_once, **lenient)
    assert timing.reliable and timing.attempts == 2 and len(calls) == 2
    never = interleaved({"a": work}, repeats=2, attempts=2, check=lambda times: "never possible", **lenient)
    assert not never.reliable and never.reasons == ["never possible"] and never.attempts == 2
    assert stability(timing, never)["reliable"] is False
