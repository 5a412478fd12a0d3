"""``extract-features``: a recipe's backbone features of videos, one file per video plus an index, for
feature-based detectors (OpenTAD / ActionFormer read ``<feature folder>/<video>.npy`` of shape (T, C)).

    python -m lightning_modules extract-features --config recipes/tad_thumos_videomae_s.yaml \\
        --ckpt_path runs/.../last.ckpt --videos data/thumos14/videos --out features/thumos14_videomae_s

- A temporal detection recipe gives the detector's backbone features over the recipe's evaluation windows
  (sliding windows or the whole video resized), stitched on the video's time axis: row ``k`` is the feature at
  ``k * seconds_per_feature`` seconds (``index.json`` holds that stride), overlapping windows averaged.
- A classification recipe gives the pooled backbone feature of each evaluation view (clips x crops): (views, D).

Without ``--ckpt_path`` the recipe's ``pretrained`` backbone is used (said in one line). Done videos are skipped
(each file is written whole, then renamed), so a killed run continues where it stopped. Started as several
processes (``torchrun --nproc_per_node 8 -m lightning_modules extract-features ...`` or ``srun``), each takes
every ``WORLD_SIZE``-th video on its own GPU; ``index.json`` is rewritten from the per-video records whenever a
process finishes, so the last one leaves it complete. Any other argument is a recipe override
(``--data.init_args.window_size 768``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

PROG = "python -m lightning_modules extract-features"


def distributed_share() -> tuple[int, int, int]:
    """(rank, world size, local rank) of this process from torchrun's or SLURM's variables; (0, 1, 0) alone."""
    env = os.environ
    rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    world = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
    return rank, world, local


def stitch(windows: list[tuple[Tensor, float, Tensor]], step: float) -> np.ndarray:
    """Window features ``(D, L)`` starting at ``start`` seconds, with their valid steps ``(L,)``, on one time axis
    of ``step`` seconds: row ``round(start / step) + k``; rows several windows cover hold their mean."""
    first = [round(start / step) for _, start, _ in windows]
    length = max(f + int(valid.nonzero().max()) + 1 for f, (_, _, valid) in zip(first, windows) if valid.any())
    dim = windows[0][0].shape[0]
    total, count = torch.zeros(length, dim, dtype=torch.float64), torch.zeros(length, dtype=torch.float64)
    for f, (features, _, valid) in zip(first, windows, strict=True):
        rows = f + valid.nonzero()[:, 0]
        total.index_add_(0, rows, features.double().T[valid])
        count.index_add_(0, rows, torch.ones(len(rows), dtype=torch.float64))
    if (count == 0).any():
        raise RuntimeError(f"the windows leave steps {(count == 0).nonzero()[:, 0][:5].tolist()} uncovered")
    return (total / count[:, None]).float().numpy()


def _tad_features(model: Any, dm: Any, indices: list[int], device: torch.device, autocast) -> tuple[np.ndarray, dict]:
    """One video's windows through the detector's backbone, stitched (see ``stitch``)."""
    dataset = dm.dataset("predict")
    windows, step = [], None
    for i in indices:
        sample = dataset[i]
        video = dm.on_after_batch_transfer({"video": sample["video"][None].to(device), "batch_size": 1}, 0)["video"]
        with torch.no_grad(), autocast:
            features = model.detector.backbone(video)[0].float().cpu()  # (D, L)
        length = features.shape[-1]
        valid = model.detector.head_mask(torch.as_tensor(sample["valid"])[None], length)[0]
        step = float(sample["seconds_per_step"]) * sample["video"].shape[1] / length
        windows.append((features, float(sample["window_start"]), valid))
    return stitch(windows, step), {"seconds_per_feature": step}


def _clip_features(model: Any, dm: Any, indices: list[int], device: torch.device, autocast) -> tuple[np.ndarray, dict]:
    """The pooled backbone feature of each evaluation view of the video: (views, D)."""
    (i,) = indices
    sample = dm.dataset("predict")[i]
    views = dm.on_after_batch_transfer({"video": sample["video"][None].to(device), "batch_size": 1}, 0)["video"][0]
    with torch.no_grad(), autocast:
        features = model.backbone(views).float().cpu()
    return features.numpy(), {"views": int(features.shape[0])}


def video_samples(dm: Any, kind: str) -> Iterator[tuple[int, str, str, list[int]]]:
    """(video position, name, path, its sample indices) for each ``predict_videos`` file, in order."""
    from datamodules.base import video_names

    dataset = dm.dataset("predict")
    names = video_names(dm.predict_files)
    if kind == "tad":
        by_video: dict[int, list[int]] = {}
        for i, (video, _) in enumerate(dataset.windows):
            by_video.setdefault(video, []).append(i)
        for v, record in enumerate(dataset.videos):
            yield record.video_index, names[record.video_index], record.path, by_video.get(v, [])
    else:
        for i, record in enumerate(dataset.records):
            yield i, names[i], str(record.path), [i]


def write_index(out: Path) -> Path:
    """``index.json`` from every per-video record in ``out/records`` (written whole, then renamed)."""
    records = {}
    for path in sorted((out / "records").glob("*.json")):
        record = json.loads(path.read_text())
        records[record["video"]] = record
    index = out / "index.json"
    partial = index.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps({"videos": records}, indent=1))
    partial.replace(index)
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, help="recipe YAML (several stack)")
    parser.add_argument("--videos", nargs="+", required=True, help="video files or folders (searched recursively)")
    parser.add_argument("--out", required=True, help="folder for <video>.npy (or .pt) and index.json")
    parser.add_argument("--ckpt_path", default=None, help="a checkpoint of the recipe's task (default: pretrained)")
    parser.add_argument("--format", choices=("npy", "pt"), default="npy", help="file per video (default: npy)")
    parser.add_argument("--precision", choices=("32", "bf16"), default="32", help="bf16: autocast on CUDA")
    parser.add_argument("--device", default=None, help="torch device (default: cuda:<local rank>, else cpu)")
    args, overrides = parser.parse_known_args(argv)
    rank, world, local = distributed_share()
    device = torch.device(args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))
    from lightning_modules.cli import main as cli_main  # torch and Lightning: after the arguments are checked

    cli_args = [a for c in args.config for a in ("--config", c)] + overrides + [
        f"--data.init_args.predict_videos={json.dumps(args.videos)}", "--trainer.logger=false",
        "--data.init_args.num_workers=0",
    ]  # fmt: skip
    cli = cli_main(cli_args, run=False)
    model, dm = cli.model, cli.datamodule
    if hasattr(model, "detector") and hasattr(getattr(model.detector, "backbone", None), "head_length"):
        kind, extract = "tad", _tad_features
    elif hasattr(model, "backbone") and hasattr(dm, "test_num_clips"):
        kind, extract = "clips", _clip_features
    else:
        print(f"error: extract-features takes a temporal detection or classification recipe; {args.config[-1]} "
              f"has {type(model).__name__} with {type(dm).__name__}", file=sys.stderr)  # fmt: skip
        return 2
    if args.ckpt_path:
        if not Path(args.ckpt_path).is_file():
            print(f"error: checkpoint {args.ckpt_path} not found", file=sys.stderr)
            return 2
        state = torch.load(args.ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state))
    elif rank == 0:
        print(f"WARNING: no --ckpt_path: the features come from {type(model).__name__}'s pretrained backbone "
              "as the recipe loads it", file=sys.stderr)  # fmt: skip
    model.to(device).eval()
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if args.precision == "bf16" and device.type == "cuda"
        else nullcontext()
    )
    out = Path(args.out)
    (out / "records").mkdir(parents=True, exist_ok=True)
    mine = [v for k, v in enumerate(video_samples(dm, kind)) if k % world == rank]
    done = skipped = 0
    for position, name, path, indices in tqdm(mine, desc=f"features (rank {rank})", position=rank, disable=None):
        target = out / f"{name}.{args.format}"
        record_path = out / "records" / f"{name.replace('/', '__')}.json"
        if target.is_file() and record_path.is_file():
            skipped += 1
            continue
        features, extra = extract(model, dm, indices, device, autocast)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.stem}.{os.getpid()}.tmp")
        with open(partial, "wb") as f:
            np.save(f, features) if args.format == "npy" else torch.save(torch.from_numpy(features), f)
        partial.replace(target)
        record = {"video": name, "path": path, "file": str(target.relative_to(out)), "shape": list(features.shape),
                  "kind": kind, **extra}  # fmt: skip
        record_path.write_text(json.dumps(record))
        done += 1
    index = write_index(out)
    print(f"rank {rank}/{world}: {done} videos written, {skipped} already done; index {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
