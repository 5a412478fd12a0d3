"""The ``temporal`` kind (ActivityNet-1.3 / OpenTAD JSON): untrimmed clips with labelled action segments."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.synthetic.drawing import draw_background, render, sprite_texture
from datamodules.synthetic.files import (
    KIND_TAG,
    begin_writing,
    check_seed,
    finish_writing,
    num_val,
    text_lines,
    write_text_atomic,
    write_video,
)

TEMPORAL_ACTIONS: tuple[str, ...] = ("jump", "spin", "slide")


@dataclass(frozen=True)
class TemporalSet:
    """The synthetic temporal set: ``num_videos`` untrimmed videos of ``size`` x ``size`` pixels, ``seconds``
    long at ``fps``, each with 1 to ``max_segments`` actions; the last ``val_fraction`` of them form the
    validation subset. Every video is a pure function of ``seed``."""

    num_videos: int = 8
    val_fraction: float = 0.25
    size: int = 64
    seconds: float = 12.0
    fps: int = 10
    max_segments: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "seed", check_seed(self.seed))
        if self.size % 2:
            raise ValueError(f"size must be even for yuv420p, got {self.size}")


def _sample_segments(
    rng: np.random.Generator, num_frames: int, fps: int, max_segments: int
) -> list[tuple[int, int]]:
    """Non-overlapping [start, end] frame pairs, 1.5-4 s long, with >= 1 s gaps and >= 0.5 s margins."""
    n = int(rng.integers(1, max_segments + 1))
    lengths = [int(round(rng.uniform(1.5, 4.0) * fps)) for _ in range(n)]
    gap, margin = int(round(1.0 * fps)), int(round(0.5 * fps))
    while lengths and sum(lengths) + (len(lengths) - 1) * gap + 2 * margin > num_frames - 1:
        lengths.pop()
    if not lengths:
        raise ValueError("video too short for a 1.5 s segment with margins")
    n = len(lengths)
    slack = num_frames - 1 - sum(lengths) - (n - 1) * gap - 2 * margin
    extra = rng.multinomial(slack, rng.dirichlet(np.ones(n + 1)))
    segments, pos = [], margin + int(extra[0])
    for k, length in enumerate(lengths):
        segments.append((pos, pos + length))
        pos += length + gap + int(extra[k + 1])
    return segments


def generate_temporal(root: str | Path, settings: TemporalSet | None = None, **overrides: Any) -> Path:
    """ActivityNet/THUMOS-style: root/videos/<video_id>.mp4 and root/annotations.json; returns root.
    ``overrides`` replace fields of ``settings`` (default: ``TemporalSet()``).

    Also writes root/category_idx.txt (one label per line, index = label_id). Outside the segments the
    object idles (sub-pixel sway); inside it jumps (up and down), spins, or slides sideways and back.
    Segment boundaries lie on frame times, so ``segment * fps`` are integer frame indices.
    """
    s = replace(settings or TemporalSet(), **overrides)
    num_videos, size, fps, max_segments, seed = s.num_videos, s.size, s.fps, s.max_segments, s.seed
    root = Path(root)
    begin_writing(root)
    num_frames = int(round(s.seconds * fps))
    obj = max(4, 2 * round(size / 8))
    hd = obj / math.sqrt(2)
    jump_amp, slide_amp = 0.22 * size, 0.28 * size
    n_val = num_val(num_videos, s.val_fraction)
    database: dict[str, Any] = {}
    for i in range(num_videos):
        rng = np.random.default_rng([seed, KIND_TAG["temporal"], i])
        video_id = f"vid_{i:04d}"
        background = draw_background(rng, size, size)
        tex = sprite_texture(rng, obj, obj)
        xr = (hd + slide_amp, size - hd - slide_amp)
        yr = (hd + jump_amp, size - hd)
        cx0 = rng.uniform(*xr) if xr[0] <= xr[1] else size / 2
        cy0 = rng.uniform(*yr) if yr[0] <= yr[1] else size / 2
        angle0 = rng.uniform(0, 2 * np.pi)
        f = np.arange(num_frames, dtype=np.float64)
        # Idle sway well below a pixel: the object is alive but clearly not acting.
        sway_amp, sway_period = rng.uniform(0.2, 0.4), fps * rng.uniform(2.0, 3.5)
        sway = sway_amp * np.sin(2 * np.pi * f / sway_period + rng.uniform(0, 6))
        cx, cy, angle = cx0 + sway, np.full(num_frames, cy0), np.full(num_frames, angle0)
        annotations = []
        for start, end in _sample_segments(rng, num_frames, fps, max_segments):
            label_id = int(rng.integers(len(TEMPORAL_ACTIONS)))
            label = TEMPORAL_ACTIONS[label_id]
            span = slice(start, end + 1)
            p = (f[span] - start) / (end - start)
            dur_s = (end - start) / fps
            if label == "jump":
                hops = max(1, int(round(dur_s / rng.uniform(0.8, 1.2))))
                cy[span] = cy0 - jump_amp * rng.uniform(0.8, 1.0) * np.abs(np.sin(np.pi * hops * p))
            elif label == "spin":
                turns = max(1, int(round(dur_s / rng.uniform(1.2, 1.8))))
                angle[span] = angle0 + (1 if rng.uniform() < 0.5 else -1) * 2 * np.pi * turns * p
            else:
                sign = 1 if rng.uniform() < 0.5 else -1
                cx[span] = cx0 + sign * slide_amp * rng.uniform(0.8, 1.0) * np.sin(np.pi * p)
            annotations.append(
                {
                    "label": label,
                    "label_id": label_id,
                    "segment": [round(start / fps, 3), round(end / fps, 3)],
                }
            )
        frames = render(background, num_frames, [(tex, cx, cy, angle)])
        write_video(root / "videos" / f"{video_id}.mp4", frames, fps)
        database[video_id] = {
            "subset": "validation" if i >= num_videos - n_val else "training",
            "duration": round(num_frames / fps, 3),
            "frame": num_frames,
            "fps": fps,
            "resolution": f"{size}x{size}",
            "annotations": annotations,
        }
    write_text_atomic(root / "category_idx.txt", text_lines(list(TEMPORAL_ACTIONS)))
    write_text_atomic(
        root / "annotations.json", json.dumps({"version": "synthetic", "database": database}, indent=2) + "\n"
    )
    finish_writing(root, "temporal", asdict(s))
    return root
