"""The ``spatiotemporal`` kind (AVA v2.2 CSVs + label map): textured actors with per-keyframe boxes and actions."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.synthetic.drawing import draw_background, render, rotated_extent, sprite_texture
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

SPATIOTEMPORAL_ACTIONS: tuple[str, ...] = ("move_left", "move_right", "rotate", "stand_still")


@dataclass(frozen=True)
class SpatiotemporalSet:
    """The synthetic AVA-style set: ``num_videos`` videos of ``size`` (height, width) pixels, ``seconds`` long
    at ``fps`` (keyframes at every whole second but the first and last), with 1 to ``max_actors`` actors of
    ``actor_size`` (fractions of the frame's width and height); the last ``val_fraction`` of the videos form
    the validation split. Every video is a pure function of ``seed``."""

    num_videos: int = 8
    val_fraction: float = 0.25
    size: tuple[int, int] = (96, 128)
    seconds: int = 8
    fps: int = 12
    max_actors: int = 2
    actor_size: tuple[float, float] = (0.13, 0.36)
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "seed", check_seed(self.seed))
        height, width = int(self.size[0]), int(self.size[1])
        object.__setattr__(self, "size", (height, width))
        object.__setattr__(self, "actor_size", tuple(float(v) for v in self.actor_size))
        if height % 2 or width % 2:
            raise ValueError(f"size must be even for yuv420p, got {self.size}")
        if self.seconds < 2:
            raise ValueError("seconds must be >= 2 to have at least one keyframe")
        if not (0 < self.actor_size[0] <= 1 and 0 < self.actor_size[1] <= 1):
            raise ValueError(
                f"actor_size must be two fractions in (0, 1] of (width, height), got {self.actor_size}"
            )
        aw, ah = self.actor_pixels
        if math.hypot(aw, ah) > min(height, width):
            raise ValueError(f"frame {self.size} too small for {aw}x{ah} actors")

    @property
    def actor_pixels(self) -> tuple[int, int]:
        """An actor's (width, height) in pixels before it rotates."""
        height, width = self.size
        return max(4, round(self.actor_size[0] * width)), max(6, round(self.actor_size[1] * height))


def _actor_track(
    rng: np.random.Generator,
    num_frames: int,
    fps: int,
    seconds: int,
    width: int,
    height: int,
    aw: int,
    ah: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """One actor: per-frame centre/angle and per-frame action index (one action, or one switch)."""
    hd = math.hypot(aw, ah) / 2  # half diagonal: any orientation stays inside the frame
    xlo, xhi = hd, width - hd
    cy0 = rng.uniform(hd, height - hd)
    x = rng.uniform(xlo, xhi)
    angle = 0.0 if rng.uniform() < 0.7 else rng.uniform(-0.3, 0.3)
    n_actions = len(SPATIOTEMPORAL_ACTIONS)
    first = int(rng.integers(n_actions))
    if seconds >= 4 and rng.uniform() < 0.5:
        # Switch half-way between two keyframes so no keyframe sits on an ambiguous transition.
        switch = int(round((int(rng.integers(1, seconds - 2)) + 0.5) * fps))
        second = int((first + rng.integers(1, n_actions)) % n_actions)
        plan = [(first, 0, switch), (second, switch, num_frames)]
    else:
        plan = [(first, 0, num_frames)]
    xs, angles, actions = np.empty(num_frames), np.empty(num_frames), [0] * num_frames
    xs[0], angles[0] = x, angle
    min_speed = 0.3
    for action, start, end in plan:
        steps = max(end - max(start, 1), 1)
        name = SPATIOTEMPORAL_ACTIONS[action]
        speed = rng.uniform(0.5, 1.0)  # px / frame
        omega = np.deg2rad(rng.uniform(4.0, 8.0)) * (1 if rng.uniform() < 0.5 else -1)
        if name in ("move_left", "move_right"):
            room = {"move_left": x - xlo, "move_right": xhi - x}
            if room[name] / steps < min_speed:
                other = "move_right" if name == "move_left" else "move_left"
                name = other if room[other] / steps >= min_speed else "stand_still"
            if name != "stand_still":
                speed = min(speed, room[name] / steps)
        action = SPATIOTEMPORAL_ACTIONS.index(name)
        for f in range(start, end):
            actions[f] = action
            if f == 0:
                continue
            if name == "move_left":
                x -= speed
            elif name == "move_right":
                x += speed
            elif name == "rotate":
                angle += omega
            xs[f], angles[f] = x, angle
    return np.clip(xs, xlo, xhi), np.full(num_frames, cy0), angles, actions


def generate_spatiotemporal(
    root: str | Path, settings: SpatiotemporalSet | None = None, **overrides: Any
) -> Path:
    """AVA-style: root/videos/<video_id>.mp4, root/annotations/{train,val}.csv,
    root/annotations/label_map.pbtxt, root/annotations/{train,val}_excluded_timestamps.csv; returns root.

    CSV rows: ``video_id,timestamp,x1,y1,x2,y2,action_id,person_id`` (no header) with the timestamp written
    as in AVA (4-digit zero-padded integer second, keyframes 1..seconds-1 at frame round(t*fps)), boxes
    normalised to [0, 1] with 3 decimals, 1-based action ids and 0-based per-video person ids. Each actor is an
    upright rectangle of ``actor_size`` (fractions of the frame's width and height) before it rotates.
    ``overrides`` replace fields of ``settings`` (default: ``SpatiotemporalSet()``).
    """
    s = replace(settings or SpatiotemporalSet(), **overrides)
    (height, width), (aw, ah) = s.size, s.actor_pixels
    num_videos, seconds, fps, max_actors, seed = s.num_videos, s.seconds, s.fps, s.max_actors, s.seed
    root = Path(root)
    begin_writing(root)
    num_frames = int(seconds * fps)
    n_val = num_val(num_videos, s.val_fraction)
    rows: dict[str, list[str]] = {"train": [], "val": []}
    for i in range(num_videos):
        rng = np.random.default_rng([seed, KIND_TAG["spatiotemporal"], i])
        video_id = f"vid_{i:04d}"
        background = draw_background(rng, height, width)
        sprites, tracks = [], []
        for _ in range(int(rng.integers(1, max_actors + 1))):
            tex = sprite_texture(rng, ah, aw)
            cx, cy, angle, actions = _actor_track(rng, num_frames, fps, seconds, width, height, aw, ah)
            sprites.append((tex, cx, cy, angle))
            tracks.append((cx, cy, angle, actions))
        write_video(root / "videos" / f"{video_id}.mp4", render(background, num_frames, sprites), fps)
        split = "val" if i >= num_videos - n_val else "train"
        for t in range(1, seconds):
            f = min(int(round(t * fps)), num_frames - 1)
            for pid, (cx, cy, angle, actions) in enumerate(tracks):
                ex, ey = rotated_extent(aw, ah, angle[f])
                x1, x2 = max(cx[f] - ex, 0.0) / width, min(cx[f] + ex, width) / width
                y1, y2 = max(cy[f] - ey, 0.0) / height, min(cy[f] + ey, height) / height
                rows[split].append(
                    f"{video_id},{t:04d},{x1:.3f},{y1:.3f},{x2:.3f},{y2:.3f},{actions[f] + 1},{pid}"
                )
    ann = root / "annotations"
    label_map = "".join(
        f'item {{\n  name: "{name}"\n  id: {k + 1}\n}}\n' for k, name in enumerate(SPATIOTEMPORAL_ACTIONS)
    )
    write_text_atomic(ann / "label_map.pbtxt", label_map)
    for split in ("train", "val"):
        write_text_atomic(ann / f"{split}_excluded_timestamps.csv", "")
        write_text_atomic(ann / f"{split}.csv", text_lines(rows[split]))
    finish_writing(root, "spatiotemporal", asdict(s))
    return root
