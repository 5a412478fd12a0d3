"""``make demo``: HaltingVT against its dense baseline on the embedded synthetic set, both trained here.

Trains the dense quickstart ViT and the HaltingVT quickstart (each from its recipe, through the same CLI a user
runs), prints validation top-1 and GFLOPs per clip side by side with the target (top-1 within 2 points of the
dense model at no more than 60% of its GFLOPs), plots accuracy against GFLOPs and draws HaltingVT's halting maps
for a few validation videos. Results go to ``runs/demo/`` (``summary.json``, ``accuracy_vs_macs.png``,
``halting_maps/``).

    python -m lightning_modules.demos.haltingvt [--max-epochs N] [--out runs/demo] [-- <CLI overrides for every run>]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from lightning_modules.cli import main as cli_main
from lightning_modules.pictures.tradeoff import RunResult, plot_accuracy_vs_macs

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "quickstart"
BASELINE = RECIPES / "synthetic_dense_vit.yaml"
HALTING = RECIPES / "synthetic_haltingvt.yaml"
MAX_TOP1_DROP = 0.02  # top-1 may be at most 2 points below the dense model ...
MAX_GFLOPS_FRACTION = 0.60  # ... at no more than 60% of its GFLOPs


def fit(recipe: Path, name: str, extra: Sequence[str]) -> tuple[RunResult, str, Path, dict[str, float]]:
    """Fit one recipe; returns its final validation result, the last checkpoint, the data root and the final
    validation figures."""
    cli = cli_main(["fit", "--config", str(recipe), *extra])
    metrics = cli.trainer.callback_metrics
    if "val/top1" not in metrics or "val/gmacs" not in metrics:
        raise RuntimeError(
            f"{recipe.name}: fit ended without validation figures; check max_epochs / val settings"
        )
    last = next((c.last_model_path for c in cli.trainer.checkpoint_callbacks if c.last_model_path), "")
    result = RunResult(name, float(metrics["val/top1"]), float(metrics["val/gmacs"]))
    figures = {k: float(v) for k, v in metrics.items() if k.startswith("val/")}
    return result, last, Path(cli.datamodule.root), figures


def one_video_per_class(data_root: Path, count: int, list_file: str = "val.txt") -> list[str]:
    """The first ``list_file`` video of ``count`` classes spread over the label range (for the pictures)."""
    first: dict[int, str] = {}
    for line in (data_root / list_file).read_text().splitlines():
        parts = line.split()
        if parts:
            first.setdefault(int(parts[-1].split(",")[0]), parts[0])
    labels = sorted(first)
    step = max(1, len(labels) // max(count, 1))
    return [first[label] for label in labels[::step][:count]]


def verdict(dense: RunResult, halting: RunResult) -> dict[str, float | bool]:
    fraction = halting.gmacs / dense.gmacs
    drop = dense.accuracy - halting.accuracy
    return {
        "top1_drop_points": 100 * drop,
        "gmacs_fraction": fraction,
        "met": drop <= MAX_TOP1_DROP + 1e-9 and fraction <= MAX_GFLOPS_FRACTION,
    }


def report(dense: RunResult, halting: RunResult, early_exit_gmacs: float | None = None) -> str:
    v = verdict(dense, halting)
    lines = [
        f"{'model':<28} {'val top-1':>10} {'GFLOPs/clip':>12}",
        f"{'dense ViT (baseline)':<28} {100 * dense.accuracy:>9.2f}% {dense.gmacs:>12.4f}",
        f"{'HaltingVT':<28} {100 * halting.accuracy:>9.2f}% {halting.gmacs:>12.4f}",
        f"HaltingVT: top-1 {abs(v['top1_drop_points']):.2f} points {'below' if v['top1_drop_points'] > 0 else 'above'}"
        f" the dense model's at {100 * v['gmacs_fraction']:.1f}% of its GFLOPs; "
        f"target (<= {100 * MAX_TOP1_DROP:.0f} points below at <= {100 * MAX_GFLOPS_FRACTION:.0f}%): "
        + ("met" if v["met"] else "NOT met"),
    ]
    if early_exit_gmacs is not None:
        lines.append(
            f"HaltingVT with per-sample early exit (a clip stops when its class token halts; same predictions): "
            f"{early_exit_gmacs:.4f} GFLOPs/clip executed, {100 * early_exit_gmacs / halting.gmacs:.1f}% of the "
            f"paper's count above"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_modules.demos.haltingvt", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", default="runs/demo", help="where the summary, plot and halting maps go")
    parser.add_argument("--max-epochs", type=int, default=None, help="override both recipes' epochs")
    parser.add_argument(
        "--maps", type=int, default=4, help="validation videos (one per class) to draw maps for"
    )
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="after --: CLI overrides for every run")
    args = parser.parse_args(argv)
    out = Path(args.out)
    overrides = [a for a in args.overrides if a != "--"]
    extra = ([f"--trainer.max_epochs={args.max_epochs}"] if args.max_epochs else []) + overrides

    halting, halting_ckpt, data_root, figures = fit(HALTING, "HaltingVT", extra)
    dense, _, _, _ = fit(BASELINE, "dense ViT", extra)
    early_exit = figures.get("val/gmacs_early_exit")

    plot = plot_accuracy_vs_macs(
        [dense, halting], out / "accuracy_vs_macs.png", "synthetic set: top-1 vs cost"
    )
    videos = one_video_per_class(data_root, args.maps)
    cli_main([
        "predict", "--config", str(HALTING), *overrides, f"--ckpt_path={halting_ckpt}",
        f"--data.init_args.predict_videos={json.dumps(videos)}",
        "--trainer.callbacks+=lightning_modules.pictures.halting.HaltingMapWriter",
        f"--trainer.callbacks.out_dir={out / 'halting_maps'}",
    ])  # fmt: skip

    summary = {
        "dense": vars(dense),
        "haltingvt": vars(halting),
        **verdict(dense, halting),
        "haltingvt_early_exit_gmacs": early_exit,
        "plot": str(plot),
        "halting_maps": str(out / "halting_maps"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n" + report(dense, halting, early_exit))
    print(f"plot: {plot}; halting maps: {out / 'halting_maps'}; summary: {out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
