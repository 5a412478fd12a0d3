"""``make bench``: speed ratios measured side by side in one run, printed as a table and written as JSON.

- backbone: forward throughput of ``VideoMAEViT`` vs transformers' ``VideoMAEModel`` (same config and weights);
- data: clips/s delivered by the training data loader (2 workers, full training transforms) vs raw decord
  decoding of the same clips in one process;
- halting_g05 / halting_g03: inference speedup of HaltingVT (batch 8, 8x224x224, DeiT-S) with halted tokens
  removed over the dense inflated DeiT-S, as a fraction of the FLOPs ratio of the same inputs (1.0 = every saved
  FLOP turned into saved time). Random weights halt arbitrarily, so ``halt_center`` is first bisected to the
  paper's budgets (24.2 GFLOPs for G05, 9.9 for G03); the halting-without-removal path is timed beside it.

Ratios, not absolute times, are the result: both sides of a ratio run interleaved on the same machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REAL_VIDEO = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")


def interleaved(
    fns: dict[str, Callable[[], None]], repeats: int, stat: Callable[[list[float]], float] = statistics.median
) -> dict[str, float]:
    """Seconds per call of each function (median, or ``stat``, over ``repeats``), calls interleaved so drifts in
    machine load hit all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: stat(v) for k, v in times.items()}


def bench_backbone(size: str, frames: int, image: int, batch: int, repeats: int) -> dict:
    from transformers import VideoMAEConfig, VideoMAEModel

    from models.checkpoint import load_pretrained
    from models.vit import VIT_SIZES, VideoMAEViT

    dim, depth, heads = VIT_SIZES[size]
    cfg = VideoMAEConfig(
        hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=4 * dim,
        num_frames=frames, image_size=image, use_mean_pooling=False, layer_norm_eps=1e-6,
    )  # fmt: skip
    hf = VideoMAEModel(cfg).eval()
    ours = VideoMAEViT(size=size, num_frames=frames, img_size=image, use_mean_pooling=False).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        load_pretrained(ours, tmp)
    video = torch.randn(batch, 3, frames, image, image)
    hf_input = video.transpose(1, 2).contiguous()
    with torch.inference_mode():
        diff = (ours.forward_features(video) - hf(pixel_values=hf_input).last_hidden_state).abs().max().item()
        t = interleaved(
            {"ours": lambda: ours.forward_features(video), "transformers": lambda: hf(pixel_values=hf_input)},
            repeats,
        )
    return {
        "what": f"backbone forward, ViT-{size[0].upper()} {frames}x{image}x{image}, batch {batch}",
        "ours_clips_per_s": batch / t["ours"],
        "reference_clips_per_s": batch / t["transformers"],
        "ratio": t["transformers"] / t["ours"],
        "target": 1.0,
        "max_abs_diff": diff,
    }


def bench_data(clips: int, batch: int, workers: int) -> dict:
    from datamodules.classification import ClipClassificationDataset
    from datamodules.kinetics_list import VideoRecord
    from datamodules.sampling import random_clip
    from datamodules.synthetic import write_video
    from datamodules.transforms import TrainClipTransform
    from datamodules.video_io import open_video

    with tempfile.TemporaryDirectory() as tmp:
        if REAL_VIDEO.exists():
            path, source = REAL_VIDEO, "vtest.avi (768x576, opencv-doc)"
        else:
            rng = np.random.default_rng(0)
            path, source = Path(tmp) / "noise.mp4", "synthetic noise video (320x256)"
            write_video(path, rng.integers(0, 256, (300, 256, 320, 3), dtype=np.uint8), 25)
        # The Mini-Kinetics training pipeline of HaltingVT: 8 frames every 32, short side 256-320, crop 224.
        num_frames, interval = 8, 32
        records = [VideoRecord(str(path), (0,))] * clips
        transform = TrainClipTransform(224, (256, 320), flip=True, randaugment_ops=2, randaugment_magnitude=9)
        dataset = ClipClassificationDataset(records, 1, num_frames, interval, transform, train=True)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch, num_workers=workers, collate_fn=_stack
        )

        def run_loader() -> None:
            for _ in loader:
                pass

        def run_raw() -> None:
            rng = np.random.default_rng(0)
            for _ in range(clips):
                video = open_video(path)
                video.get_frames(random_clip(video.num_frames, num_frames, interval, rng))

        t = interleaved({"loader": run_loader, "raw": run_raw}, repeats=2)
    return {
        "what": f"training clips/s, {workers}-worker loader with transforms vs raw decord in one process; {source}",
        "ours_clips_per_s": clips / t["loader"],
        "reference_clips_per_s": clips / t["raw"],
        "ratio": t["raw"] / t["loader"],
        "target": 0.8,
    }


def calibrate_halting(model, video: torch.Tensor, target_gmacs: float, steps: int = 12) -> float:
    """Bisect ``halt_center`` so that the mean cost of ``video`` is ``target_gmacs``: random weights halt
    arbitrarily, this gives them the token-count spread of a trained model at that budget."""
    lo, hi = -20.0, 20.0
    grid = model.token_grid(video.shape)
    for _ in range(steps):
        model.halt_center = (lo + hi) / 2
        gmacs = model.macs(model.forward_compact(video).active, grid).mean().item() / 1e9
        lo, hi = (model.halt_center, hi) if gmacs < target_gmacs else (lo, model.halt_center)
    return gmacs


def bench_haltingvt(
    batch: int, frames: int, image: int, glimpse_ratio: float, target_gmacs: float, repeats: int
) -> dict:
    from models.flops import count_macs
    from models.haltingvt import HaltingViT
    from models.vit import InflatedViT

    torch.manual_seed(0)
    dense = InflatedViT(size="small", num_frames=frames, img_size=image).eval()
    halting = HaltingViT(size="small", num_frames=frames, img_size=image, glimpse_ratio=glimpse_ratio).eval()
    video = torch.randn(batch, 3, frames, image, image)
    with torch.inference_mode():
        gmacs = calibrate_halting(halting, video, target_gmacs)
        out = halting.forward_compact(video)
        per_sample = halting.macs(out.active, halting.token_grid(video.shape)) / 1e9
        dense_gmacs = count_macs(dense, video[:1]) / 1e9
        t = interleaved(
            {
                "dense": lambda: dense(video),
                "removal": lambda: halting.forward_compact(video),
                # Halted tokens kept in the tensor, as the official code does (its Glimpser does drop tokens).
                "masked": lambda: halting.forward_masked(video),
            },
            repeats,
            stat=min,  # seconds-long compute-bound calls: the fastest run is the least disturbed one
        )
    flops_ratio = dense_gmacs / gmacs
    speedup = t["dense"] / t["removal"]
    return {
        "what": (
            f"HaltingVT G{round(10 * glimpse_ratio):02d} at {gmacs:.1f} GMACs vs dense DeiT-S, {frames}x{image}x{image},"
            f" batch {batch}: speedup "
            f"{speedup:.2f}x for a FLOPs ratio of {flops_ratio:.2f}x (ratio = speedup / FLOPs ratio)"
        ),
        "ours_clips_per_s": batch / t["removal"],
        "reference_clips_per_s": batch / t["dense"],
        "ratio": speedup / flops_ratio,
        "target": 0.8,
        "speedup": speedup,
        "flops_ratio": flops_ratio,
        "dense_gmacs": dense_gmacs,
        "halting_gmacs": gmacs,
        "halting_gmacs_min_max": [per_sample.min().item(), per_sample.max().item()],
        "tokens_per_joint_layer": out.active.float().mean(0).tolist(),
        "masked_no_removal_speedup": t["dense"] / t["masked"],
    }


def _stack(samples):
    return torch.stack([s["video"] for s in samples])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/bench.json")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument(
        "--halting-gmacs", type=float, nargs=2, default=[24.2, 9.9], help="HaltingVT budgets for G05 and G03"
    )
    args = parser.parse_args(argv)
    results = {
        "backbone": bench_backbone("small", 16, 224, 2, args.repeats),
        "data": bench_data(args.clips, 8, 2),
    }
    # The paper's two ends of Mini-Kinetics: G05/Beta10 at 24.2 GFLOPs and its 9.9-GFLOPs model (G03).
    for ratio, gmacs in ((0.5, args.halting_gmacs[0]), (0.3, args.halting_gmacs[1])):
        name = f"halting_g{round(10 * ratio):02d}"
        results[name] = bench_haltingvt(8, 8, 224, ratio, gmacs, args.repeats)
    print(f"{'benchmark':<12} {'ours/s':>9} {'ref/s':>9} {'ratio':>7} {'target':>7}  what")
    for name, r in results.items():
        ok = "ok" if r["ratio"] >= r["target"] else "MISSED"
        print(
            f"{name:<12} {r['ours_clips_per_s']:>9.2f} {r['reference_clips_per_s']:>9.2f} {r['ratio']:>6.2f}x "
            f"{r['target']:>6.2f}x  {r['what']} [{ok}]"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"written to {args.out}")
    return results


if __name__ == "__main__":
    main()
