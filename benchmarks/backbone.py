"""The shared core's benchmarks: VideoMAE forward throughput against transformers', and the training data loader
against raw decoding."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.measure import REAL_VIDEO, interleaved, stability


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
        **stability(t),
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
        **stability(t),
    }


def _stack(samples):
    return torch.stack([s["video"] for s in samples])
