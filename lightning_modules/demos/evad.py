"""``make demo-evad``: the quickstart EVAD, from its pretrained backbone to its target, and its keep-rate trade.

EVAD fine-tunes a Kinetics-pretrained VideoMAE; the quickstart does the same at toy scale, in stages run through
the CLI a user runs:

1. backbone: the dense quickstart ViT trained to classify the synthetic motion clips (the stand-in for
   Kinetics), exactly as ``make demo-tad`` trains it (run ``runs/quickstart_dense/tad_backbone``, reused once
   finished; ``--pretrained PATH`` takes another checkpoint of that ViT, ``--pretrained none`` trains from scratch).
2. detector: ``recipes/quickstart/evad_synthetic.yaml`` fine-tunes it as EVAD at keep rate 0.7 on the synthetic
   AVA-style set (written on first use).
3. the same weights evaluated again without retraining: ``validate`` at keep rate 1.0 (the checkpoint plus
   ``--model.init_args.detector.init_args.keep_rate=1.0``), and ``test`` at 0.7, which writes the detections as
   the official AVA CSV; they are scored again here from the file, as the official tool would.

Prints the validation frame-mAP@0.5 at both keep rates with the GFLOPs of one clip at each, against the target
(frame-mAP@0.5 >= 0.60 at keep rate 0.7 within 15 minutes of detector training on 2 CPU cores). Results go to
``runs/demo_evad/summary.json``.

    python -m lightning_modules.demos.evad [--out runs/demo_evad] [--pretrained PATH|none] [-- <CLI overrides>]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

from lightning_modules.cli import main as cli_main
from lightning_modules.demos.tad import train_backbone
from lightning_modules.metrics.ava import ava_frame_map, read_ava_detections, read_ava_ground_truth

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "quickstart" / "evad_synthetic.yaml"
KEEP_RATE_ARG = "--model.init_args.detector.init_args.keep_rate"
TARGET_MAP = 0.60
TARGET_MINUTES = 15.0
#: The backbone stage is ``make demo-tad``'s: its record lives with that demo's summary.
BACKBONE_RECORDS = Path("runs/demo_tad")


def figures(cli, stage: str) -> dict[str, float]:
    """The frame-mAPs and GFLOPs a CLI run logged for ``stage``."""
    return {
        k.removeprefix(f"{stage}/"): float(v)
        for k, v in cli.trainer.callback_metrics.items()
        if k.startswith(f"{stage}/frame_mAP") or k == f"{stage}/gmacs"
    }


def report(sparse: dict[str, float], dense: dict[str, float], minutes: float, backbone: dict | None) -> str:
    met = sparse["frame_mAP@0.5"] >= TARGET_MAP and minutes <= TARGET_MINUTES
    lines = [
        f"{'keep rate':>10} {'frame-mAP@0.5':>14} {'@0.5:0.95':>10} {'GFLOPs/clip':>12}",
        *(
            f"{rate:>10} {100 * f['frame_mAP@0.5']:>13.2f}% {100 * f['frame_mAP@0.5:0.95']:>9.2f}% "
            f"{f['gmacs']:>12.4f}"
            for rate, f in (("0.7", sparse), ("1.0", dense))
        ),
        (
            f"keep rate 0.7 costs {100 * sparse['gmacs'] / dense['gmacs']:.1f}% of the GFLOPs of 1.0 "
            "(same weights, rate changed at evaluation)"
        ),
    ]
    if backbone is None:
        lines.append("backbone: trained from scratch with the detector (no pretraining)")
    else:
        top1 = "" if backbone.get("val_top1") is None else f", val top-1 {100 * backbone['val_top1']:.2f}%"
        when = "finished earlier, reused" if backbone.get("reused") else "this run"
        lines.append(f"backbone: {backbone['checkpoint']} ({when}{top1})")
    lines.append(
        f"quickstart EVAD: frame-mAP@0.5 {100 * sparse['frame_mAP@0.5']:.2f}% at keep rate 0.7 after "
        f"{minutes:.1f} min of detector training; target (>= {100 * TARGET_MAP:.0f}% within "
        f"{TARGET_MINUTES:.0f} min): " + ("met" if met else "NOT met")
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_modules.demos.evad", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", default="runs/demo_evad", help="where the summary goes")
    parser.add_argument(
        "--pretrained",
        default=None,
        help="a checkpoint of the quickstart ViT to start from instead of stage 1, or 'none' for from scratch",
    )
    parser.add_argument(
        "overrides", nargs=argparse.REMAINDER, help="after --: CLI overrides for the detector"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    overrides = [a for a in args.overrides if a != "--"]
    if args.pretrained is None:
        backbone: dict | None = train_backbone(BACKBONE_RECORDS, [])
    elif args.pretrained.lower() == "none":
        backbone = None
    else:
        backbone = {"checkpoint": args.pretrained, "val_top1": None, "reused": True}
    pretrained = "null" if backbone is None else backbone["checkpoint"]
    common = ["--config", str(RECIPE), f"--model.init_args.pretrained={pretrained}", *overrides]

    start = time.perf_counter()
    fit = cli_main(["fit", *common])
    minutes = (time.perf_counter() - start) / 60
    run_dir = Path(fit.trainer.default_root_dir)
    sparse = figures(fit, "val")
    if "frame_mAP@0.5" not in sparse:
        raise RuntimeError(
            f"{RECIPE.name}: fit ended without validation mAP; check max_epochs / val settings"
        )
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    # The same weights at keep rate 1.0 (the command-line keep rate wins over the checkpoint's), then the
    # test pass at 0.7 that writes the detections CSV, both in the fit's run directory.
    run_id = f"--run_id={fit.config.fit.run_id}"
    dense = figures(cli_main(["validate", *common, run_id, f"--ckpt_path={checkpoint}", f"{KEEP_RATE_ARG}=1.0"]),
                    "val")  # fmt: skip
    test = cli_main(["test", *common, run_id, f"--ckpt_path={checkpoint}"])
    dm = test.datamodule
    label_map = dict(zip(dm.action_ids, dm.class_names))
    truth = read_ava_ground_truth(dm.paths["val_csv"], label_map)
    offline = ava_frame_map(
        read_ava_detections(run_dir / "detections_test.csv", truth, label_map), truth, label_map
    )
    offline.pop("per_class")

    met = sparse["frame_mAP@0.5"] >= TARGET_MAP and minutes <= TARGET_MINUTES
    summary = {"keep_rate_0.7": sparse, "keep_rate_1.0": dense, "test_keep_rate_0.7": figures(test, "test"),
               "offline_from_csv": offline, "minutes": minutes, "run_dir": str(run_dir), "backbone": backbone,
               "target_frame_mAP@0.5": TARGET_MAP, "target_minutes": TARGET_MINUTES, "met": met}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n" + report(sparse, dense, minutes, backbone))
    print(f"run: {run_dir}; summary: {out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
