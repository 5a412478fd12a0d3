"""``make bench``: speed ratios measured side by side in one run, printed as a table and written as JSON.

- backbone: forward throughput of ``VideoMAEViT`` vs transformers' ``VideoMAEModel`` (same config and weights);
- data: clips/s delivered by the training data loader (2 workers, full training transforms) vs raw decord
  decoding of the same clips in one process;
- pipeline: clips/s of one loader worker through each source's whole training pipeline (Kinetics-style mp4,
  AVA keyframe clips from mp4 and from JPEG frames, a 768-frame THUMOS window) against raw decoding of the same
  frames, and the workers per GPU each paper recipe needs (``benchmarks/pipeline.py`` states the GPU assumed);
- halting_g05 / halting_g03: inference speedup of HaltingVT (batch 8, 8x224x224, DeiT-S) with halted tokens
  removed over the dense inflated DeiT-S, as a fraction of the FLOPs ratio of the same inputs (1.0 = every saved
  FLOP turned into saved time). Random weights halt arbitrarily, so ``halt_center`` is first bisected to a
  budget; the halting-without-removal path is timed beside it. The budgets are the paper's two Mini-Kinetics
  points, 75.0% at 24.2 GFLOPs and 67.2% at 9.9, which the paper does not assign to a Glimpser ratio; its
  "GFLOPs" are multiply-accumulates (G03's embedding and Glimpser alone cost 7.54 GMACs, more than 9.9 / 2).
  Assumed here, not stated by the paper: 24.2 is a G05 model's budget and 9.9 a G03 model's;
- halting_train: a HaltingVT G05 training step (forward, backward and Adam; batch 8, 8x224x224, DeiT-S, at the
  G05 budget) with halted tokens removed against the masked step, as a fraction of the MACs ratio of the two;
  the dense DeiT-S step is timed beside them;
- tad_macs / tad_latency / tad_memory: the THUMOS VideoMAE-S detector of the recipe
  ``recipes/tad_thumos_videomae_s.yaml`` (ViT-S in 16-frame chunks at 160x160, ActionFormer head of 512
  channels, 20 classes, random weights): its multiply-accumulates at 768 and 192 frames against the block-drop
  paper's 286.3 G, its CPU forward latency at the input the paper counted, and the peak memory of a LoRA
  training step with and without activation checkpointing, each variant in a fresh process.
- blockdrop: MACs and CPU latency of that detector with the paper's first 1-3 THUMOS drops, latency ratios
  against MACs ratios;
- evad_flops / evad_throughput / evad_memory: EVAD (ViT-B, 16x224x224) multiply-accumulates per keep rate
  beside the paper's Table 2a, inference throughput at keep rate 0.7 vs 1.0 (same weights, batch 2) and the
  activation memory of a training step at 0.7 vs 1.0 (each in a fresh process).

Ratios, not absolute times, are the result: both sides of a ratio run interleaved on the same machine. Each timed
comparison watches the machine (other processes' load, the spread of the repeats, ratios the MACs do not allow),
measures again when it was unsteady and, if it stays so, prints ``[UNRELIABLE: why]`` instead of a verdict.
One benchmark alone: ``python -m benchmarks.run --only tad_macs`` (its result is merged into ``--out``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.backbone import bench_backbone, bench_data
from benchmarks.evad import bench_evad_flops, bench_evad_memory, bench_evad_throughput
from benchmarks.haltingvt import bench_haltingvt, bench_haltingvt_train
from benchmarks.pipeline import bench_pipeline
from benchmarks.tad import PAPER_FRAMES, bench_blockdrop, bench_tad_latency, bench_tad_macs, bench_tad_memory

BENCHMARKS = (
    "backbone",
    "data",
    "pipeline",
    "halting_g05",
    "halting_g03",
    "halting_train",
    "tad_macs",
    "tad_latency",
    "tad_memory",
    "blockdrop",
    "evad_flops",
    "evad_throughput",
    "evad_memory",
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/bench.json")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run these benchmarks only")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument(
        "--halting-gmacs", type=float, nargs=2, default=[24.2, 9.9], help="HaltingVT budgets for G05 and G03"
    )
    parser.add_argument(
        "--train-repeats", type=int, default=3, help="timed HaltingVT training steps per path"
    )
    parser.add_argument("--tad-repeats", type=int, default=3, help="timed forwards of the TAD detector")
    parser.add_argument(
        "--blockdrop-repeats",
        type=int,
        default=7,
        help="timed forwards of each block-drop detector (min taken)",
    )
    parser.add_argument("--evad-size", default="base", choices=["small", "base", "large"], help="EVAD's ViT")
    parser.add_argument("--evad-batch", type=int, default=2, help="clips per EVAD forward / training step")
    parser.add_argument(
        "--tad-memory-frames", type=int, default=768, help="window of the TAD training-step memory benchmark"
    )
    args = parser.parse_args(argv)
    # The paper's two Mini-Kinetics points, 24.2 and 9.9 GFLOPs (MACs); their Glimpser ratios are assumed (G05, G03).
    benchmarks = {
        "backbone": lambda: bench_backbone("small", 16, 224, 2, args.repeats),
        "data": lambda: bench_data(args.clips, 8, 2),
        "pipeline": lambda: bench_pipeline(),
        "halting_g05": lambda: bench_haltingvt(8, 8, 224, 0.5, args.halting_gmacs[0], args.repeats),
        "halting_g03": lambda: bench_haltingvt(8, 8, 224, 0.3, args.halting_gmacs[1], args.repeats),
        "halting_train": lambda: bench_haltingvt_train(
            8, 8, 224, 0.5, args.halting_gmacs[0], args.train_repeats
        ),
        "tad_macs": bench_tad_macs,
        "tad_latency": lambda: bench_tad_latency(PAPER_FRAMES, args.tad_repeats),
        "tad_memory": lambda: bench_tad_memory(args.tad_memory_frames),
        "blockdrop": lambda: bench_blockdrop(PAPER_FRAMES, args.blockdrop_repeats),
        "evad_flops": bench_evad_flops,
        "evad_throughput": lambda: bench_evad_throughput(args.evad_size, args.evad_batch, args.repeats),
        "evad_memory": lambda: bench_evad_memory(args.evad_size, args.evad_batch),
    }
    results = {name: benchmarks[name]() for name in args.only or BENCHMARKS}
    print(f"{'benchmark':<12} {'ours':>9} {'ref':>9} {'unit':<8} {'ratio':>7} {'target':>7}  what")
    for name, r in results.items():
        ours = r.get("ours", r.get("ours_clips_per_s"))
        ref = r.get("reference", r.get("reference_clips_per_s"))
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        target = "-" if r["target"] is None else f"{r['target']:.2f}x"
        ok = r.get("ok", r["target"] is None or r["ratio"] >= r["target"])
        flag = "" if r["target"] is None else " [ok]" if ok else " [MISSED]"
        if not r.get("reliable", True):
            # The machine was too busy for the comparison to mean anything: not a result, whatever it shows.
            flag = f" [UNRELIABLE: {'; '.join(r['unreliable_because'])}]"
            ratio = f"({ratio})"
        print(
            f"{name:<12} {ours:>9.2f} {ref:>9.2f} {r.get('unit', 'clips/s'):<8} {ratio:>7} {target:>7}  "
            f"{r['what']}{flag}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.only and out.is_file():  # one benchmark re-run: keep the others' last results
        results = {**json.loads(out.read_text()), **results}
    out.write_text(json.dumps(results, indent=2))
    print(f"written to {out}")
    return results


if __name__ == "__main__":
    main()
