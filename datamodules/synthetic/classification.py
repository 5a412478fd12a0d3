"""The ``classification`` kind (Kinetics / AR-Net list files): one textured object per clip, labelled by its
motion."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

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

CLASSIFICATION_CLASSES: tuple[str, ...] = (
    "static",
    "left",
    "right",
    "up",
    "down",
    "left_fast",
    "right_fast",
    "rotate",
)

# Nominal motion of the classification classes: (unit dx, unit dy, speed kind).
_CLS_MOTION: dict[str, tuple[float, float, str]] = {
    "static": (0.0, 0.0, "none"),
    "left": (-1.0, 0.0, "slow"),
    "right": (1.0, 0.0, "slow"),
    "up": (0.0, -1.0, "slow"),
    "down": (0.0, 1.0, "slow"),
    "left_fast": (-1.0, 0.0, "fast"),
    "right_fast": (1.0, 0.0, "fast"),
    "rotate": (0.0, 0.0, "rot"),  # direction drawn per video: the class is "rotating", either way
}

_SLOW_SPEED = 1.0  # px / frame
_FAST_SPEED = 2.5  # px / frame, truncated to what fits the frame (see classification_geometry)
_ROT_SPEED = 9.0  # degrees / frame
_SPEED_JITTER = 0.2  # +-20 % per video, so speed alone is a range rather than a single value


def classification_geometry(size: int = 80, num_frames: int = 24) -> dict[str, Any]:
    """Object size, speed ranges and middle-frame centre ranges shared by all classification classes.

    The middle frame is ``num_frames // 2``. The centre range at that frame is set, per axis, by the fastest
    class moving along that axis, so the object centre stays at least half an object side from the border
    during the whole clip for every class (an axis-aligned object is fully visible; a tilted one may lose a
    corner pixel or two). The fast speed range 2.5 px/frame +-20 % is truncated to what fits; at 80 px x 24
    frames it becomes ~[2.0, 2.29] px/frame (slow classes: [0.8, 1.2]).
    """
    obj = max(4, 2 * round(size / 8))  # ~1/4 of the side; even, so a centred sprite is pixel-aligned
    mid = num_frames // 2
    half_span = max(mid, num_frames - 1 - mid)  # frames on the longer side of the middle frame
    min_jitter = size / 32  # keep at least some spread of the middle-frame position
    slow = (_SLOW_SPEED * (1 - _SPEED_JITTER), _SLOW_SPEED * (1 + _SPEED_JITTER))
    fit = (size - obj - 2 * min_jitter) / max(2 * half_span, 1)
    fast_hi = max(min(_FAST_SPEED * (1 + _SPEED_JITTER), fit), 0.0)
    fast = (min(_FAST_SPEED * (1 - _SPEED_JITTER), fast_hi), fast_hi)
    rot = (_ROT_SPEED * (1 - _SPEED_JITTER), _ROT_SPEED * (1 + _SPEED_JITTER))

    def centre_range(vmax: float) -> tuple[float, float]:
        lo, hi = obj / 2 + vmax * half_span, size - obj / 2 - vmax * half_span
        return (lo, hi) if lo <= hi else (size / 2, size / 2)

    vx = max(fast[1] if m[2] == "fast" else slow[1] for m in _CLS_MOTION.values() if m[0] != 0)
    vy = max(fast[1] if m[2] == "fast" else slow[1] for m in _CLS_MOTION.values() if m[1] != 0)
    return {
        "object_size": obj,
        "slow_speed": slow,
        "fast_speed": fast,
        "rotation_deg": rot,
        "centre_x": centre_range(vx),
        "centre_y": centre_range(vy),
        "middle_frame": mid,
    }


def classification_trajectory(
    rng: np.random.Generator, label: str, *, size: int = 80, num_frames: int = 24
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame object centre x, y (pixels) and angle (radians, clockwise) for one clip of ``label``.

    The centre and orientation at the middle frame (``num_frames // 2``) are drawn from the same distribution
    for every class and the trajectory is anchored there, so that frame alone carries no information about
    the label (textures and backgrounds are drawn identically for all classes too).
    """
    if label not in _CLS_MOTION:
        raise ValueError(f"unknown class {label!r}; expected one of {CLASSIFICATION_CLASSES}")
    geo = classification_geometry(size, num_frames)
    # Drawn identically for every class (same calls in the same order) before any class-specific draw.
    cx_mid = rng.uniform(*geo["centre_x"])
    cy_mid = rng.uniform(*geo["centre_y"])
    angle_mid = rng.uniform(0.0, 2 * np.pi)
    speed_u = rng.uniform()
    ux, uy, kind = _CLS_MOTION[label]
    t = np.arange(num_frames, dtype=np.float64) - geo["middle_frame"]
    speed = 0.0
    if kind in ("slow", "fast", "rot"):
        lo, hi = geo[{"slow": "slow_speed", "fast": "fast_speed", "rot": "rotation_deg"}[kind]]
        speed = lo + (hi - lo) * speed_u
    if kind == "rot":
        rot_sign = rng.choice((-1.0, 1.0))  # drawn after the shared draws, so they stay class-independent
        return (
            np.full(num_frames, cx_mid),
            np.full(num_frames, cy_mid),
            angle_mid + rot_sign * np.deg2rad(speed) * t,
        )
    return cx_mid + ux * speed * t, cy_mid + uy * speed * t, np.full(num_frames, angle_mid)


def _classification_video(rng: np.random.Generator, label: str, size: int, num_frames: int) -> np.ndarray:
    obj = classification_geometry(size, num_frames)["object_size"]
    background = draw_background(rng, size, size)
    tex = sprite_texture(rng, obj, obj)
    cx, cy, angle = classification_trajectory(rng, label, size=size, num_frames=num_frames)
    return render(background, num_frames, [(tex, cx, cy, angle)])


@dataclass(frozen=True)
class ClassificationSet:
    """The synthetic classification set: ``videos_per_class`` clips of each class in CLASSIFICATION_CLASSES,
    ``size`` x ``size`` pixels, ``num_frames`` long at ``fps``; the last ``val_fraction`` of each class form the
    validation list. Every clip is a pure function of ``seed``."""

    videos_per_class: int = 40
    val_fraction: float = 0.25
    size: int = 80
    num_frames: int = 24
    fps: int = 12
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "seed", check_seed(self.seed))
        if self.size % 2:
            raise ValueError(f"size must be even for yuv420p, got {self.size}")
        if self.num_frames < 2:
            raise ValueError("num_frames must be >= 2: the classes are defined by motion")


def generate_classification(
    root: str | Path, settings: ClassificationSet | None = None, **overrides: Any
) -> Path:
    """Writes root/videos/*.mp4, root/train.txt, root/val.txt, root/classes.txt; returns root.

    List lines are ``videos/<class>_<i:04d>.mp4 <num_frames> <label_index>``; classes.txt has one class per
    line (index = line number, order of CLASSIFICATION_CLASSES). The split is stratified: the last
    ``round(videos_per_class * val_fraction)`` clips of each class (at least one, if there are two) are val.
    ``overrides`` replace fields of ``settings`` (default: ``ClassificationSet()``).
    """
    s = replace(settings or ClassificationSet(), **overrides)
    videos_per_class, size, num_frames, fps, seed = s.videos_per_class, s.size, s.num_frames, s.fps, s.seed
    root = Path(root)
    begin_writing(root)
    n_val = num_val(videos_per_class, s.val_fraction)
    train, val = [], []
    jobs = [
        (ci, label, i) for ci, label in enumerate(CLASSIFICATION_CLASSES) for i in range(videos_per_class)
    ]
    for ci, label, i in tqdm(jobs, desc=f"synthetic classification -> {root}", unit="video", leave=False):
        rng = np.random.default_rng([seed, KIND_TAG["classification"], ci, i])
        name = f"{label}_{i:04d}.mp4"
        write_video(root / "videos" / name, _classification_video(rng, label, size, num_frames), fps)
        line = f"videos/{name} {num_frames} {ci}"
        (val if i >= videos_per_class - n_val else train).append(line)
    write_text_atomic(root / "classes.txt", text_lines(list(CLASSIFICATION_CLASSES)))
    write_text_atomic(root / "train.txt", text_lines(train))
    write_text_atomic(root / "val.txt", text_lines(val))
    finish_writing(root, "classification", asdict(s))
    return root
