"""Accuracy against GMACs (giga multiply-accumulates, the papers' "GFLOPs") across runs, read from the validation
results their CSV loggers wrote::

    python -m lightning_modules accuracy-vs-macs runs/haltingvt_minik_* --out tradeoff.png
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


@dataclass(frozen=True)
class RunResult:
    name: str
    accuracy: float
    gmacs: float


def read_run_result(
    run: str | Path, accuracy_key: str = "val/top1", gmacs_key: str = "val/gmacs"
) -> RunResult:
    """The last row with both keys of a run's CSV log. ``run`` is a ``metrics.csv`` file, a run directory
    (``runs/<recipe>/<run id>``) or a recipe directory holding several runs, of which the newest that has such a
    row is taken (a later ``test`` run, whose log has no validation rows, is passed over). The point is named
    ``<recipe>/<run id>``, the two folders above the CSV file."""
    run = Path(run)
    files = [run] if run.is_file() else sorted(run.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no metrics.csv under {run}: run with a CSVLogger (every recipe has one)")
    for csv_file in reversed(files):
        with csv_file.open() as f:
            rows = [r for r in csv.DictReader(f) if r.get(accuracy_key) and r.get(gmacs_key)]
        if rows:
            name = f"{csv_file.parent.parent.name}/{csv_file.parent.name}"
            return RunResult(name, float(rows[-1][accuracy_key]), float(rows[-1][gmacs_key]))
    raise ValueError(
        f"no metrics.csv under {run} has a row with both {accuracy_key} and {gmacs_key} "
        f"({len(files)} looked at): run validate (or fit) with this run's recipe first"
    )


def plot_accuracy_vs_macs(
    results: Sequence[RunResult],
    out: str | Path,
    title: str = "accuracy vs GMACs",
    accuracy_label: str = "top-1 (%)",
) -> Path:
    """Scatter of accuracy (in %) against GMACs per clip, each point labelled with its run name."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for r in results:
        ax.scatter(r.gmacs, 100 * r.accuracy, s=36)
        ax.annotate(
            r.name, (r.gmacs, 100 * r.accuracy), textcoords="offset points", xytext=(4, 4), fontsize=8
        )
    ax.set_xlabel("GMACs per clip (the papers' GFLOPs)")
    ax.set_ylabel(accuracy_label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    most = max(r.gmacs for r in results)
    ax.set_xlim(0, most * 1.2 if math.isfinite(most) and most > 0 else 1)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_modules accuracy-vs-macs",
        description="plot runs' last validation accuracy against GMACs per clip",
    )
    parser.add_argument("runs", nargs="+", help="run directories (or metrics.csv files)")
    parser.add_argument("--out", default="accuracy_vs_macs.png")
    parser.add_argument("--accuracy-key", default="val/top1", help="e.g. val/mAP for ActivityNet")
    args = parser.parse_args(argv)
    results = [read_run_result(r, args.accuracy_key) for r in args.runs]
    for r in results:
        print(f"{r.name}: {args.accuracy_key} {100 * r.accuracy:.2f}  GMACs {r.gmacs:.4f}")
    print(f"wrote {plot_accuracy_vs_macs(results, args.out, accuracy_label=args.accuracy_key)}")


if __name__ == "__main__":
    main()
