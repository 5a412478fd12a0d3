"""Deterministic synthetic video datasets written as real H.264 mp4 files with public-dataset annotations.

Three kinds, each in the on-disk format of a public benchmark so that the real data-loading code paths are
exercised end to end:

* ``classification`` (Kinetics / AR-Net list files): one textured object per clip; the label is its motion.
* ``spatiotemporal`` (AVA v2.2 CSVs + label map): textured "actors" with per-keyframe boxes and actions.
* ``temporal`` (ActivityNet-1.3 / OpenTAD JSON): untrimmed clips with labelled action segments.

Everything is a pure function of ``seed`` (and the size arguments): each video draws from its own
``np.random.default_rng([seed, kind, ...])`` stream, so annotation files are byte-identical, rendered frames
are identical (the encoded files nearly always too: libx264 was seen to differ about once in a hundred runs),
and changing one video's parameters never
shifts another's.

Run as ``python -m datamodules.synthetic --out DIR [--kind classification|spatiotemporal|temporal|all]``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

__all__ = [
    "CLASSIFICATION_CLASSES",
    "DECORD_UNSAFE_WIDTHS",
    "SPATIOTEMPORAL_ACTIONS",
    "TEMPORAL_ACTIONS",
    "KINDS",
    "classification_geometry",
    "classification_trajectory",
    "generate",
    "generate_classification",
    "generate_spatiotemporal",
    "generate_temporal",
    "is_complete",
    "write_video",
]

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
SPATIOTEMPORAL_ACTIONS: tuple[str, ...] = ("move_left", "move_right", "rotate", "stand_still")
TEMPORAL_ACTIONS: tuple[str, ...] = ("jump", "spin", "slide")
KINDS: tuple[str, ...] = ("classification", "spatiotemporal", "temporal")

# decord 0.6.0 raises "Check failed: from_size == to_size" on these frame widths (measured for even widths
# 8..198); write_video warns so a bad size is caught at generation time rather than in a data loader.
DECORD_UNSAFE_WIDTHS: frozenset[int] = frozenset({8, 12, 16, 24, 48, 72})

MARKER_NAME = ".complete"
#: Present while the generator writes a folder (so an interrupted write may be resumed over).
WRITING_NAME = ".writing"
# Bumped whenever the rendered content changes, so stale datasets are regenerated rather than reused.
FORMAT_VERSION = 2

# Per-kind tags mixed into the RNG seed so the three kinds never share random streams for the same seed.
_KIND_TAG = {"classification": 101, "spatiotemporal": 202, "temporal": 303}

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


# --------------------------------------------------------------------------------------------- file I/O


def write_video(
    path: str | Path,
    frames: np.ndarray,
    fps: int,
    *,
    crf: int = 20,
    preset: str = "veryfast",
    gop: int | None = None,
) -> None:
    """Encode ``frames`` (T, H, W, 3) uint8 RGB as an H.264 (yuv420p) mp4 at ``fps``.

    The file is written under a ``.part`` name and renamed at the end, so a crash never leaves a truncated
    ``.mp4`` behind. B-frames are disabled and one encoder thread is used, so every decoder reports exactly T
    frames and reruns are byte-identical in all but rare cases. Widths in
    ``DECORD_UNSAFE_WIDTHS`` encode fine but trigger a warning because decord cannot read them.
    """
    import av  # deferred: importing this module must stay cheap and side-effect free

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    t, h, w, _ = frames.shape
    if t < 1:
        raise ValueError("frames must contain at least one frame")
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs even width and height, got {w}x{h}")
    if w in DECORD_UNSAFE_WIDTHS:
        warnings.warn(f"decord 0.6.0 cannot decode {w} px wide videos; pick another width", stacklevel=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    try:
        with av.open(str(tmp), "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=int(fps))
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            ctx = stream.codec_context
            ctx.gop_size = int(gop if gop is not None else max(1, int(fps)))
            ctx.max_b_frames = 0
            ctx.thread_count = 1
            stream.options = {"crf": str(crf), "preset": preset}
            for i in range(t):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
                frame.pts = i
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_text_atomic(path: Path, text: str) -> None:
    # Temp file in the same directory so os.replace is an atomic rename on the same filesystem; a plain open
    # (not mkstemp) keeps the usual umask-derived permissions instead of 0600.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _lines(rows: list[str]) -> str:
    return "".join(r + "\n" for r in rows)


def _begin(root: Path) -> None:
    """Claim ``root`` for writing: refused when it holds anything this generator did not write."""
    root.mkdir(parents=True, exist_ok=True)
    ours = (root / MARKER_NAME).exists() or (root / WRITING_NAME).exists()
    if not ours and any(root.iterdir()):
        raise FileExistsError(
            f"{root} holds files the synthetic data generator did not write; refusing to write synthetic videos "
            "over them. Point data.init_args.root at an empty folder (or one written by the generator), or set "
            "data.init_args.synthetic: false to use the data that is there"
        )
    (root / WRITING_NAME).touch()
    # Removing the marker first means an interrupted regeneration is reported as incomplete.
    (root / MARKER_NAME).unlink(missing_ok=True)


def _finish(root: Path, kind: str, params: dict[str, Any]) -> None:
    record = {"kind": kind, "format_version": FORMAT_VERSION, **params}
    _write_text_atomic(root / MARKER_NAME, json.dumps(record, indent=2, sort_keys=True) + "\n")
    (root / WRITING_NAME).unlink(missing_ok=True)


def is_complete(root: str | Path, kind: str | None = "classification", **expected: Any) -> bool:
    """True when ``root`` holds a fully written dataset of ``kind`` (None: any kind).

    ``expected`` parameters (e.g. ``seed=0, videos_per_class=40``) must also match the ones recorded in the
    marker, so a data module can regenerate when it asks for a different configuration.
    """
    marker = Path(root) / MARKER_NAME
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION:
        return False
    if kind is not None and record.get("kind") != kind:
        return False
    for key, value in expected.items():
        recorded = record.get(key)
        if isinstance(value, tuple):
            value = list(value)  # JSON has no tuples
        if recorded != value:
            return False
    return True


def _num_val(n: int, fraction: float) -> int:
    if n <= 0 or fraction <= 0:
        return 0
    if fraction >= 1:
        return n
    k = int(math.floor(n * fraction + 0.5))
    # Keep both sides non-empty whenever possible: a split with an empty val set is useless for tests.
    return min(max(k, 1), n - 1) if n >= 2 else 0


def _check_seed(seed: int) -> int:
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return seed


# ------------------------------------------------------------------------------------------- drawing


def _upsample(grid: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear (align-corners) resize of a (gh, gw, C) grid to (h, w, C)."""
    gh, gw = grid.shape[:2]

    def axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
        pos = np.linspace(0.0, n_in - 1.0, n_out)
        i0 = np.clip(np.floor(pos).astype(np.int64), 0, max(n_in - 2, 0))
        return i0, (pos - i0)

    y0, fy = axis(h, gh)
    x0, fx = axis(w, gw)
    y1, x1 = np.minimum(y0 + 1, gh - 1), np.minimum(x0 + 1, gw - 1)
    fy, fx = fy[:, None, None], fx[None, :, None]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x1] * fx
    bot = grid[y1][:, x0] * (1 - fx) + grid[y1][:, x1] * fx
    return (top * (1 - fy) + bot * fy).astype(np.float32)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV (all in [0, 1]) to RGB in [0, 255], shape (..., 3)."""
    h6 = (np.asarray(h, dtype=np.float64) % 1.0) * 6.0
    s, v = np.asarray(s, dtype=np.float64), np.asarray(v, dtype=np.float64)
    c = v * s
    x = c * (1 - np.abs(h6 % 2 - 1))
    z = np.zeros_like(c)
    sector = np.floor(h6).astype(np.int64) % 6
    table = [(c, x, z), (x, c, z), (z, c, x), (z, x, c), (x, z, c), (c, z, x)]
    rgb = np.zeros(np.shape(c) + (3,))
    for k, (r, g, b) in enumerate(table):
        m = sector == k
        rgb[m] = np.stack([r[m], g[m], b[m]], axis=-1)
    return (rgb + (v - c)[..., None]) * 255.0


def _stripes(rng: np.random.Generator, h: int, w: int, period: tuple[float, float]) -> np.ndarray:
    theta = rng.uniform(0, np.pi)
    lam = rng.uniform(*period)
    phase = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    return np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / lam + phase).astype(np.float32)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Static textured background (h, w, 3) float: smooth coloured noise at two scales + tinted stripes."""
    cells = int(rng.integers(3, 7))
    img = _upsample(rng.uniform(60.0, 190.0, size=(cells, cells, 3)), h, w)
    fine = int(rng.integers(8, 14))
    img += _upsample(rng.normal(0.0, 10.0, size=(fine, fine, 3)), h, w)
    tint = rng.uniform(0.4, 1.0, size=3).astype(np.float32)
    img += rng.uniform(6.0, 16.0) * _stripes(rng, h, w, (7.0, 18.0))[..., None] * tint
    return np.clip(img, 0, 255)


def _sprite_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Random asymmetric texture (h, w, 3) float: four distinct-hue quadrants (split off-centre), stripes,
    a dark border and one corner marker, so any rotation changes the image."""
    hues = (rng.uniform() + np.array([0.0, 0.25, 0.5, 0.75]) + rng.uniform(-0.06, 0.06, 4)) % 1.0
    cols = _hsv_to_rgb(rng.permutation(hues), rng.uniform(0.6, 1.0, 4), rng.uniform(0.6, 1.0, 4))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    split_y = h * rng.uniform(0.35, 0.65)
    split_x = w * rng.uniform(0.35, 0.65)
    tex = cols[(yy >= split_y).astype(np.int64) * 2 + (xx >= split_x)]
    tex *= (0.8 + 0.2 * _stripes(rng, h, w, (3.0, 7.0)))[..., None]
    mh, mw = max(1, round(h * 0.3)), max(1, round(w * 0.3))
    corner = int(rng.integers(4))
    ys = slice(0, mh) if corner < 2 else slice(h - mh, h)
    xs = slice(0, mw) if corner % 2 == 0 else slice(w - mw, w)
    tex[ys, xs] = 245.0 if rng.uniform() < 0.5 else 15.0
    border = rng.uniform(0.0, 50.0)
    tex[0, :], tex[-1, :], tex[:, 0], tex[:, -1] = border, border, border, border
    return tex.astype(np.float32)


def _sample_bilinear(tex: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    th, tw = tex.shape[:2]
    u = np.clip(u, 0.0, tw - 1.0)
    v = np.clip(v, 0.0, th - 1.0)
    u0 = np.minimum(np.floor(u).astype(np.int64), tw - 2) if tw > 1 else np.zeros(u.shape, np.int64)
    v0 = np.minimum(np.floor(v).astype(np.int64), th - 2) if th > 1 else np.zeros(v.shape, np.int64)
    fu, fv = (u - u0)[..., None], (v - v0)[..., None]
    u1, v1 = np.minimum(u0 + 1, tw - 1), np.minimum(v0 + 1, th - 1)
    top = tex[v0, u0] * (1 - fu) + tex[v0, u1] * fu
    bot = tex[v1, u0] * (1 - fu) + tex[v1, u1] * fu
    return top * (1 - fv) + bot * fv


def _composite(
    frames: np.ndarray, tex: np.ndarray, cx: np.ndarray, cy: np.ndarray, angle: np.ndarray
) -> None:
    """Paint a rotated rectangular sprite into ``frames`` (T, H, W, 3) float, in place.

    Pixel (i, j) covers [j, j+1) x [i, i+1); the sprite's centre is (cx, cy) and a positive ``angle``
    (radians) turns it clockwise on screen (image y points down). Coverage is anti-aliased and the texture
    sampled bilinearly, so sub-pixel motion is rendered smoothly instead of jumping whole pixels.
    """
    _, h, w, _ = frames.shape
    th, tw = tex.shape[:2]
    pad = math.hypot(th, tw) / 2 + 2
    for t in range(frames.shape[0]):
        # Only the sprite's neighbourhood is touched: the rest of the frame is unchanged.
        x0, x1 = max(0, int(cx[t] - pad)), min(w, int(math.ceil(cx[t] + pad)))
        y0, y1 = max(0, int(cy[t] - pad)), min(h, int(math.ceil(cy[t] + pad)))
        if x0 >= x1 or y0 >= y1:
            continue
        dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx[t])[None, :]
        dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy[t])[:, None]
        c, s = math.cos(angle[t]), math.sin(angle[t])
        u = dx * c + dy * s
        v = -dx * s + dy * c
        alpha = np.clip(tw / 2 - np.abs(u) + 0.5, 0, 1) * np.clip(th / 2 - np.abs(v) + 0.5, 0, 1)
        col = _sample_bilinear(tex, u + tw / 2 - 0.5, v + th / 2 - 0.5)
        region = frames[t, y0:y1, x0:x1]
        region += alpha[..., None] * (col - region)


def _render(
    background: np.ndarray,
    num_frames: int,
    sprites: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
) -> np.ndarray:
    frames = np.repeat(background[None].astype(np.float32), num_frames, axis=0)
    for tex, cx, cy, angle in sprites:
        _composite(frames, tex, cx, cy, angle)
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def _rotated_extent(w: float, h: float, angle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.abs(np.cos(angle)), np.abs(np.sin(angle))
    return (w * c + h * s) / 2, (w * s + h * c) / 2


# ------------------------------------------------------------------------------------ classification


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
    background = _background(rng, size, size)
    tex = _sprite_texture(rng, obj, obj)
    cx, cy, angle = classification_trajectory(rng, label, size=size, num_frames=num_frames)
    return _render(background, num_frames, [(tex, cx, cy, angle)])


def generate_classification(
    root: str | Path,
    *,
    videos_per_class: int = 40,
    val_fraction: float = 0.25,
    size: int = 80,
    num_frames: int = 24,
    fps: int = 12,
    seed: int = 0,
) -> Path:
    """Writes root/videos/*.mp4, root/train.txt, root/val.txt, root/classes.txt; returns root.

    List lines are ``videos/<class>_<i:04d>.mp4 <num_frames> <label_index>``; classes.txt has one class per
    line (index = line number, order of CLASSIFICATION_CLASSES). The split is stratified: the last
    ``round(videos_per_class * val_fraction)`` clips of each class (at least one, if there are two) are val.
    """
    seed = _check_seed(seed)
    if size % 2:
        raise ValueError(f"size must be even for yuv420p, got {size}")
    if num_frames < 2:
        raise ValueError("num_frames must be >= 2: the classes are defined by motion")
    root = Path(root)
    _begin(root)
    n_val = _num_val(videos_per_class, val_fraction)
    train, val = [], []
    jobs = [
        (ci, label, i) for ci, label in enumerate(CLASSIFICATION_CLASSES) for i in range(videos_per_class)
    ]
    for ci, label, i in tqdm(jobs, desc=f"synthetic classification -> {root}", unit="video", leave=False):
        rng = np.random.default_rng([seed, _KIND_TAG["classification"], ci, i])
        name = f"{label}_{i:04d}.mp4"
        write_video(root / "videos" / name, _classification_video(rng, label, size, num_frames), fps)
        line = f"videos/{name} {num_frames} {ci}"
        (val if i >= videos_per_class - n_val else train).append(line)
    _write_text_atomic(root / "classes.txt", _lines(list(CLASSIFICATION_CLASSES)))
    _write_text_atomic(root / "train.txt", _lines(train))
    _write_text_atomic(root / "val.txt", _lines(val))
    _finish(
        root,
        "classification",
        {
            "seed": seed,
            "videos_per_class": videos_per_class,
            "val_fraction": val_fraction,
            "size": size,
            "num_frames": num_frames,
            "fps": fps,
        },
    )
    return root


# ------------------------------------------------------------------------------------ spatiotemporal


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
    root: str | Path,
    *,
    num_videos: int = 8,
    val_fraction: float = 0.25,
    size: tuple[int, int] = (96, 128),
    seconds: int = 8,
    fps: int = 12,
    max_actors: int = 2,
    actor_size: tuple[float, float] = (0.13, 0.36),
    seed: int = 0,
) -> Path:
    """AVA-style: root/videos/<video_id>.mp4, root/annotations/{train,val}.csv,
    root/annotations/label_map.pbtxt, root/annotations/{train,val}_excluded_timestamps.csv; returns root.

    CSV rows: ``video_id,timestamp,x1,y1,x2,y2,action_id,person_id`` (no header) with the timestamp written
    as in AVA (4-digit zero-padded integer second, keyframes 1..seconds-1 at frame round(t*fps)), boxes
    normalised to [0, 1] with 3 decimals, 1-based action ids and 0-based per-video person ids. Each actor is an
    upright rectangle of ``actor_size`` (fractions of the frame's width and height) before it rotates.
    """
    seed = _check_seed(seed)
    height, width = int(size[0]), int(size[1])
    if height % 2 or width % 2:
        raise ValueError(f"size must be even for yuv420p, got {size}")
    if seconds < 2:
        raise ValueError("seconds must be >= 2 to have at least one keyframe")
    root = Path(root)
    _begin(root)
    num_frames = int(seconds * fps)
    if not (0 < actor_size[0] <= 1 and 0 < actor_size[1] <= 1):
        raise ValueError(f"actor_size must be two fractions in (0, 1] of (width, height), got {actor_size}")
    aw, ah = max(4, round(actor_size[0] * width)), max(6, round(actor_size[1] * height))
    if math.hypot(aw, ah) > min(height, width):
        raise ValueError(f"frame {size} too small for {aw}x{ah} actors")
    n_val = _num_val(num_videos, val_fraction)
    rows: dict[str, list[str]] = {"train": [], "val": []}
    for i in range(num_videos):
        rng = np.random.default_rng([seed, _KIND_TAG["spatiotemporal"], i])
        video_id = f"vid_{i:04d}"
        background = _background(rng, height, width)
        sprites, tracks = [], []
        for _ in range(int(rng.integers(1, max_actors + 1))):
            tex = _sprite_texture(rng, ah, aw)
            cx, cy, angle, actions = _actor_track(rng, num_frames, fps, seconds, width, height, aw, ah)
            sprites.append((tex, cx, cy, angle))
            tracks.append((cx, cy, angle, actions))
        write_video(root / "videos" / f"{video_id}.mp4", _render(background, num_frames, sprites), fps)
        split = "val" if i >= num_videos - n_val else "train"
        for t in range(1, seconds):
            f = min(int(round(t * fps)), num_frames - 1)
            for pid, (cx, cy, angle, actions) in enumerate(tracks):
                ex, ey = _rotated_extent(aw, ah, angle[f])
                x1, x2 = max(cx[f] - ex, 0.0) / width, min(cx[f] + ex, width) / width
                y1, y2 = max(cy[f] - ey, 0.0) / height, min(cy[f] + ey, height) / height
                rows[split].append(
                    f"{video_id},{t:04d},{x1:.3f},{y1:.3f},{x2:.3f},{y2:.3f},{actions[f] + 1},{pid}"
                )
    ann = root / "annotations"
    label_map = "".join(
        f'item {{\n  name: "{name}"\n  id: {k + 1}\n}}\n' for k, name in enumerate(SPATIOTEMPORAL_ACTIONS)
    )
    _write_text_atomic(ann / "label_map.pbtxt", label_map)
    for split in ("train", "val"):
        _write_text_atomic(ann / f"{split}_excluded_timestamps.csv", "")
        _write_text_atomic(ann / f"{split}.csv", _lines(rows[split]))
    _finish(
        root,
        "spatiotemporal",
        {
            "seed": seed,
            "num_videos": num_videos,
            "val_fraction": val_fraction,
            "size": [height, width],
            "seconds": seconds,
            "fps": fps,
            "max_actors": max_actors,
            "actor_size": [float(actor_size[0]), float(actor_size[1])],
        },
    )
    return root


# ------------------------------------------------------------------------------------------ temporal


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


def generate_temporal(
    root: str | Path,
    *,
    num_videos: int = 8,
    val_fraction: float = 0.25,
    size: int = 64,
    seconds: float = 12.0,
    fps: int = 10,
    max_segments: int = 3,
    seed: int = 0,
) -> Path:
    """ActivityNet/THUMOS-style: root/videos/<video_id>.mp4 and root/annotations.json; returns root.

    Also writes root/category_idx.txt (one label per line, index = label_id). Outside the segments the
    object idles (sub-pixel sway); inside it jumps (up and down), spins, or slides sideways and back.
    Segment boundaries lie on frame times, so ``segment * fps`` are integer frame indices.
    """
    seed = _check_seed(seed)
    if size % 2:
        raise ValueError(f"size must be even for yuv420p, got {size}")
    root = Path(root)
    _begin(root)
    num_frames = int(round(seconds * fps))
    obj = max(4, 2 * round(size / 8))
    hd = obj / math.sqrt(2)
    jump_amp, slide_amp = 0.22 * size, 0.28 * size
    n_val = _num_val(num_videos, val_fraction)
    database: dict[str, Any] = {}
    for i in range(num_videos):
        rng = np.random.default_rng([seed, _KIND_TAG["temporal"], i])
        video_id = f"vid_{i:04d}"
        background = _background(rng, size, size)
        tex = _sprite_texture(rng, obj, obj)
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
        frames = _render(background, num_frames, [(tex, cx, cy, angle)])
        write_video(root / "videos" / f"{video_id}.mp4", frames, fps)
        database[video_id] = {
            "subset": "validation" if i >= num_videos - n_val else "training",
            "duration": round(num_frames / fps, 3),
            "frame": num_frames,
            "fps": fps,
            "resolution": f"{size}x{size}",
            "annotations": annotations,
        }
    _write_text_atomic(root / "category_idx.txt", _lines(list(TEMPORAL_ACTIONS)))
    _write_text_atomic(
        root / "annotations.json", json.dumps({"version": "synthetic", "database": database}, indent=2) + "\n"
    )
    _finish(
        root,
        "temporal",
        {
            "seed": seed,
            "num_videos": num_videos,
            "val_fraction": val_fraction,
            "size": size,
            "seconds": seconds,
            "fps": fps,
            "max_segments": max_segments,
        },
    )
    return root


# ---------------------------------------------------------------------------------------------- entry


_GENERATORS: dict[str, Callable[..., Path]] = {
    "classification": generate_classification,
    "spatiotemporal": generate_spatiotemporal,
    "temporal": generate_temporal,
}


def generate(root: str | Path, kind: str = "all", seed: int = 0, **kwargs: Any) -> dict[str, Path]:
    """Dispatch: writes root/classification, root/spatiotemporal, root/temporal as asked.

    Each keyword goes to every selected generator that accepts it; ``<kind>_<name>=...`` (e.g.
    ``temporal_size=64``) targets one kind only, which matters for ``size`` whose type differs per kind.
    """
    kinds = KINDS if kind == "all" else (kind,)
    if any(k not in _GENERATORS for k in kinds):
        raise ValueError(f"kind must be 'all' or one of {KINDS}, got {kind!r}")
    per_kind: dict[str, dict[str, Any]] = {k: {} for k in kinds}
    for key, value in kwargs.items():
        prefix = next((k for k in KINDS if key.startswith(k + "_")), None)
        if prefix is not None and prefix not in kinds:
            continue  # aimed at a kind that was not selected
        targets = [prefix] if prefix is not None else list(kinds)
        name = key[len(prefix) + 1 :] if prefix is not None else key
        accepted = [k for k in targets if name in inspect.signature(_GENERATORS[k]).parameters]
        if not accepted:
            raise TypeError(f"no selected generator ({', '.join(kinds)}) accepts {key!r}")
        for k in accepted:
            per_kind[k][name] = value
    root = Path(root)
    return {k: _GENERATORS[k](root / k, seed=seed, **per_kind[k]) for k in kinds}


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m datamodules.synthetic", description="Write deterministic synthetic video datasets."
    )
    parser.add_argument("--out", required=True, type=Path, help="output root; one sub-folder per kind")
    parser.add_argument("--kind", default="all", choices=("all",) + KINDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--videos-per-class", type=int, default=None, help="classification only")
    parser.add_argument("--num-videos", type=int, default=None, help="spatiotemporal and temporal")
    args = parser.parse_args(argv)
    kwargs: dict[str, Any] = {}
    if args.videos_per_class is not None:
        kwargs["classification_videos_per_class"] = args.videos_per_class
    if args.num_videos is not None:
        for k in ("spatiotemporal", "temporal"):
            kwargs[f"{k}_num_videos"] = args.num_videos
    start = time.perf_counter()
    out = generate(args.out, kind=args.kind, seed=args.seed, **kwargs)
    for k, path in out.items():
        print(f"{k}: {path}")
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
