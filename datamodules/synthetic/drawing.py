"""Drawing the synthetic videos: textured backgrounds and sprites, compositing, rotation extents."""

from __future__ import annotations

import math

import numpy as np


def upsample(grid: np.ndarray, h: int, w: int) -> np.ndarray:
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


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
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


def stripes(rng: np.random.Generator, h: int, w: int, period: tuple[float, float]) -> np.ndarray:
    theta = rng.uniform(0, np.pi)
    lam = rng.uniform(*period)
    phase = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    return np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / lam + phase).astype(np.float32)


def draw_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Static textured background (h, w, 3) float: smooth coloured noise at two scales + tinted stripes."""
    cells = int(rng.integers(3, 7))
    img = upsample(rng.uniform(60.0, 190.0, size=(cells, cells, 3)), h, w)
    fine = int(rng.integers(8, 14))
    img += upsample(rng.normal(0.0, 10.0, size=(fine, fine, 3)), h, w)
    tint = rng.uniform(0.4, 1.0, size=3).astype(np.float32)
    img += rng.uniform(6.0, 16.0) * stripes(rng, h, w, (7.0, 18.0))[..., None] * tint
    return np.clip(img, 0, 255)


def sprite_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Random asymmetric texture (h, w, 3) float: four distinct-hue quadrants (split off-centre), stripes,
    a dark border and one corner marker, so any rotation changes the image."""
    hues = (rng.uniform() + np.array([0.0, 0.25, 0.5, 0.75]) + rng.uniform(-0.06, 0.06, 4)) % 1.0
    cols = hsv_to_rgb(rng.permutation(hues), rng.uniform(0.6, 1.0, 4), rng.uniform(0.6, 1.0, 4))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    split_y = h * rng.uniform(0.35, 0.65)
    split_x = w * rng.uniform(0.35, 0.65)
    tex = cols[(yy >= split_y).astype(np.int64) * 2 + (xx >= split_x)]
    tex *= (0.8 + 0.2 * stripes(rng, h, w, (3.0, 7.0)))[..., None]
    mh, mw = max(1, round(h * 0.3)), max(1, round(w * 0.3))
    corner = int(rng.integers(4))
    ys = slice(0, mh) if corner < 2 else slice(h - mh, h)
    xs = slice(0, mw) if corner % 2 == 0 else slice(w - mw, w)
    tex[ys, xs] = 245.0 if rng.uniform() < 0.5 else 15.0
    border = rng.uniform(0.0, 50.0)
    tex[0, :], tex[-1, :], tex[:, 0], tex[:, -1] = border, border, border, border
    return tex.astype(np.float32)


def sample_bilinear(tex: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
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


def composite(frames: np.ndarray, tex: np.ndarray, cx: np.ndarray, cy: np.ndarray, angle: np.ndarray) -> None:
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
        col = sample_bilinear(tex, u + tw / 2 - 0.5, v + th / 2 - 0.5)
        region = frames[t, y0:y1, x0:x1]
        region += alpha[..., None] * (col - region)


def render(
    background: np.ndarray,
    num_frames: int,
    sprites: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
) -> np.ndarray:
    frames = np.repeat(background[None].astype(np.float32), num_frames, axis=0)
    for tex, cx, cy, angle in sprites:
        composite(frames, tex, cx, cy, angle)
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def rotated_extent(w: float, h: float, angle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.abs(np.cos(angle)), np.abs(np.sin(angle))
    return (w * c + h * s) / 2, (w * s + h * c) / 2
