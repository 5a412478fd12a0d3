"""``make demo-blockdrop``: progressive block drop of the quickstart temporal detector, against its target.

1. The detector: the quickstart TAD model ``make demo-tad`` trains (its run, named in ``runs/demo_tad/summary.json``,
   is reused when it is there; otherwise that demo runs first). ``--checkpoint PATH`` takes another checkpoint
   of ``recipes/quickstart/tad_synthetic.yaml``.
2. The compression: ``python -m lightning_modules compress`` with ``recipes/quickstart/blockdrop_synthetic.yaml``
   (2 blocks of 4 in 2 rounds, mAP-scored drops, LoRA recovery with the alignment losses), through the command a
   user runs; an interrupted compression resumes.

Prints the per-round report table and the verdict against the target (2 blocks dropped within 15 minutes on
2 CPU cores, average mAP within 2 points of the uncompressed detector's). Results: ``runs/blockdrop_synthetic``
(``report.md``, ``report.png``, ``rounds.json``, ``compressed.ckpt``) and ``runs/demo_blockdrop/summary.json``.

    python -m lightning_modules.demos.blockdrop [--checkpoint PATH] [--out runs/demo_blockdrop]
        [-- <compress overrides>]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from lightning_modules.compression.checks import checkpoint_digest, recorded_source
from lightning_modules.compression.command import build_parser
from lightning_modules.compression.command import main as compress
from lightning_modules.compression.settings import resolve_out_dir
from lightning_modules.demos import tad as demo_tad

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "quickstart"
DETECTOR_RECIPE = RECIPES / "tad_synthetic.yaml"
RECIPE = RECIPES / "blockdrop_synthetic.yaml"
TARGET_BLOCKS = 2
MAX_MAP_DROP = 0.02  # average mAP at most 2 points below the uncompressed detector's ...
TARGET_MINUTES = 15.0  # ... after compressing for at most this long


def detector_checkpoint(tad_summary: Path) -> tuple[Path, bool]:
    """The quickstart detector's last checkpoint: from a finished ``make demo-tad`` or by running it."""
    if tad_summary.is_file():
        last = Path(json.loads(tad_summary.read_text())["run_dir"]) / "checkpoints" / "last.ckpt"
        if last.is_file():
            return last, True
    summary = demo_tad.main(["--out", str(tad_summary.parent)])
    return Path(summary["run_dir"]) / "checkpoints" / "last.ckpt", False


def clear_other_detector(out: Path, checkpoint: Path) -> None:
    """The demo owns its compression folder: rounds of another detector (an earlier ``make demo-tad``'s, or of a
    folder older than the checkpoint record) are removed, so the demo compresses the detector it names."""
    if not (out / "rounds.json").is_file():
        return
    recorded = recorded_source(out)
    if recorded is not None and recorded.get("sha256") == checkpoint_digest(checkpoint):
        return  # the same detector: resume or reuse its rounds
    print(f"{out} holds the compression of another detector: removed, to compress {checkpoint}")
    shutil.rmtree(out)


def verdict(records: list[dict], minutes: float) -> dict:
    kept = [r for r in records if not r.get("rejected")][-1]
    drop = records[0]["score"] - kept["score"]
    blocks = len(kept["dropped"])
    return {
        "blocks_dropped": blocks,
        "average_mAP_before": records[0]["score"],
        "average_mAP_after": kept["score"],
        "map_drop_points": 100 * drop,
        "macs_ratio": kept["gmacs"] / records[0]["gmacs"],
        "minutes": minutes,
        "met": blocks >= TARGET_BLOCKS and drop <= MAX_MAP_DROP + 1e-9 and minutes <= TARGET_MINUTES,
    }


def report(v: dict) -> str:
    return (
        f"quickstart block drop: {v['blocks_dropped']} blocks dropped in {v['minutes']:.1f} min, average mAP "
        f"{100 * v['average_mAP_before']:.2f}% -> {100 * v['average_mAP_after']:.2f}% "
        f"({-v['map_drop_points']:+.2f} points) at {100 * v['macs_ratio']:.1f}% of the MACs; target "
        f"({TARGET_BLOCKS} blocks within {TARGET_MINUTES:.0f} min, <= {100 * MAX_MAP_DROP:.0f} points below): "
        + ("met" if v["met"] else "NOT met")
    )


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_modules.demos.blockdrop", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--checkpoint", default=None, help="the detector to compress (default: make demo-tad's)"
    )
    parser.add_argument("--out", default="runs/demo_blockdrop", help="where the summary goes")
    parser.add_argument("--tad-summary", default="runs/demo_tad/summary.json", help="make demo-tad's summary")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="after --: overrides for compress")
    args = parser.parse_args(argv)
    overrides = [a for a in args.overrides if a != "--"]
    if args.checkpoint:
        checkpoint, reused = Path(args.checkpoint), True
    else:
        checkpoint, reused = detector_checkpoint(Path(args.tad_summary))
    command = [
        "--config", str(DETECTOR_RECIPE), "--config", str(RECIPE), f"--compress.checkpoint={checkpoint}",
        *overrides,
    ]  # fmt: skip
    out_dir = resolve_out_dir(build_parser().parse_args(command).compress.out_dir)  # as compress reads it
    clear_other_detector(Path(out_dir), checkpoint)
    start = time.perf_counter()
    records = compress(command)
    minutes = (time.perf_counter() - start) / 60
    v = verdict(records, minutes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {**v, "checkpoint": str(checkpoint), "detector_reused": reused, "rounds": records}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(report(v))
    print(f"summary: {out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
