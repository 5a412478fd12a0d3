"""``python -m lightning_modules``: the Lightning CLI (fit / validate / test / predict) and the offline tools."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from lightning_modules.cli import main

#: Commands beside the Lightning CLI's: name -> (module with ``main(argv)``, one-line description).
TOOLS = {
    "compress": (
        "lightning_modules.compression.command",
        "progressive block drop of a trained task: score candidate drops, remove the chosen block, recover with "
        "LoRA and alignment losses, round by round, resumable; writes a report and the compressed model",
    ),
    "diagnose-tad": (
        "lightning_modules.tools.diagnose_tad",
        "DETAD error analysis of one or more TAD models' predictions against a ground truth: false positives by "
        "error type, false-negative rates by coverage, length and instance count; PNG plots and one JSON object",
    ),
    "evaluate-ava": (
        "lightning_modules.tools.evaluate_ava",
        "score spatio-temporal detections (AVA CSV) against an AVA ground truth by the official frame-mAP@0.5 "
        "protocol (label map, excluded timestamps, 50 detections per keyframe); prints one JSON object",
    ),
    "evaluate-tad": (
        "lightning_modules.tools.evaluate_tad",
        "score temporal detections (ActivityNet results JSON) against a ground truth (ActivityNet JSON or "
        "THUMOS14 CSV) by the ActivityNet protocol; prints one JSON object",
    ),
    "submit": (
        "lightning_modules.tools.submit",
        "submit a recipe to SLURM with the allocation its trainer settings need (nodes, GPUs, tasks per node); "
        "CLI overrides after --",
    ),
    "accuracy-vs-macs": (
        "lightning_modules.pictures.tradeoff",
        "plot runs' last validation accuracy against GMACs (multiply-accumulates) per clip, from their CSV logs",
    ),
}


def tools_help() -> str:
    """One paragraph (the help formatter reflows lines) naming the commands beside fit/validate/test/predict."""
    tools = "; ".join(f"{name}: {text}" for name, (_, text) in TOOLS.items())
    return f"Other commands (python -m lightning_modules COMMAND --help): {tools}."


def run(argv: Sequence[str] | None = None) -> int:
    """The process's exit status: a tool's own (an int), 0 for a tool that returns its results (``compress``:
    the round records, for callers in Python), and 0 after a Lightning command (which raises on failure)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOLS:
        status = importlib.import_module(TOOLS[argv[0]][0]).main(argv[1:])
        return status if isinstance(status, int) else 0
    main(argv, epilog=tools_help())
    return 0


if __name__ == "__main__":
    sys.exit(run())
