"""RoIAlign as two small matrix products per box, for fast training on CPUs.

RoIAlign (He et al., Mask R-CNN) averages bilinear samples taken on a regular grid inside each output bin. Both
the bilinear kernel and the sample grid factorise over the two image axes, so for one box on one feature map
``F`` (C, H, W) the pooled output is exactly ``Wy @ F @ Wx.T`` per channel, where ``Wy`` (out_h, H) holds, for
each output row, the averaged bilinear weights its samples put on each feature row (and ``Wx`` likewise for
columns). The samples outside the map (further than one cell beyond an edge) contribute zero, also a product of
one condition per axis, and the clamping at the edges acts on each coordinate alone. The result equals
``torchvision.ops.roi_align`` to float rounding (tests/test_roi_align.py compares them), for fixed and adaptive
sampling ratios and both ``aligned`` conventions.

Why: torchvision's CPU kernels loop over samples in one thread, and the backward pass scatters one sample at a
time; on the quickstart EVAD the RoIAlign backward was 29% of a training step. The factorised form runs both
passes as batched matrix products. Its cost grows with the map size (every box touches the whole map), so
``resolve_impl`` picks it only for CPU training on small maps; CUDA keeps torchvision's kernel, which reads just
the samples it needs.
Boxes are constants here as in torchvision: no gradient flows to them.

``roi_align_rois`` is torchvision's kernel for the other cases; without autograd on the CPU it splits the boxes
over a few threads, since that kernel uses one core.

``roi_align_max`` keeps only each box's maximum over its bins (EVAD's actor tokens). Without autograd on the CPU
it runs the factorised form a few boxes at a time and reduces each group's bins while they are in cache, never
holding all bins of all boxes: EVAD's decoder (ViT-B, 2 clips, 100 boxes on 8 slices of a 14x14 map with 384
channels) pools in about a quarter of the time of torchvision's kernel split over threads, whose 120 MB of bins
are written out and read back for the maximum; on the 18x24 maps of a 288x384 input with ViT-L's 512 channels,
in half the time. Its memory stays bounded (``MAX_GROUP_ELEMENTS``), so it serves maps of any size.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import torch
from torch import Tensor
from torchvision.ops import roi_align as torchvision_roi_align

RoIAlignImpl = Literal["auto", "torchvision", "separable"]


def axis_weights(start: Tensor, length: Tensor, bins: int, grid: Tensor, size: int) -> Tensor:
    """(K, bins, size): the averaged bilinear weights of each bin's samples on one axis of a ``size`` map.

    ``start`` / ``length`` (K,) are the boxes' first coordinate and extent on this axis in map cells (already
    shifted by the half-pixel offset), ``grid`` (K,) the number of samples per bin on this axis (0 for an empty box: all its weights are 0).
    """
    k = start.shape[0]
    most = max(int(grid.max()), 1) if k else 1
    bin_len = (length / bins)[:, None, None]
    sample = torch.arange(most, device=start.device, dtype=start.dtype)
    per_bin = torch.arange(bins, device=start.device, dtype=start.dtype)
    g = grid.to(start.dtype)[:, None, None]
    g_pos = g.clamp(min=1)  # no samples at all for grid 0: positions kept finite, their weights are zeroed
    pos = (
        start[:, None, None] + per_bin[None, :, None] * bin_len + (sample + 0.5) * bin_len / g_pos
    )  # (K, bins, S)
    used = (sample[None, None, :] < g) & (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0.0)
    low = pos.floor().to(torch.int64)
    top = low >= size - 1  # at (or past) the last cell: both taps on it
    low = torch.where(top, torch.full_like(low, size - 1), low)
    high = torch.where(top, low, low + 1)
    frac = torch.where(top, torch.zeros_like(pos), pos - low.to(pos.dtype))
    keep = used.to(pos.dtype) / g_pos
    weights = pos.new_zeros(k, bins, most, size)
    weights.scatter_add_(-1, low[..., None], ((1.0 - frac) * keep)[..., None])
    weights.scatter_add_(-1, high[..., None], (frac * keep)[..., None])
    return weights.sum(dim=2)


def roi_weights(
    boxes: Tensor,
    map_size: tuple[int, int],
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> tuple[Tensor, Tensor]:
    """The row and column weights ``(K, out_h, H)``, ``(K, out_w, W)`` of ``boxes`` (K, 4) x1, y1, x2, y2."""
    height, width = map_size
    out_h, out_w = output_size
    offset = 0.5 if aligned else 0.0
    scaled = boxes * spatial_scale - offset
    x1, y1, x2, y2 = scaled.unbind(-1)
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:  # the legacy convention forces boxes to at least one cell
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    if sampling_ratio > 0:
        grid_h = torch.full_like(roi_h, sampling_ratio, dtype=torch.int64)
        grid_w = torch.full_like(roi_w, sampling_ratio, dtype=torch.int64)
    else:  # adaptive: about one sample per map cell
        grid_h = torch.ceil(roi_h / out_h).to(torch.int64).clamp(min=0)  # an empty box takes no samples
        grid_w = torch.ceil(roi_w / out_w).to(torch.int64).clamp(min=0)
    return (
        axis_weights(y1, roi_h, out_h, grid_h, height),
        axis_weights(x1, roi_w, out_w, grid_w, width),
    )


#: "auto" takes the factorised form only while its stored intermediate, (boxes x out_h) x (slices x C x W)
#: elements per image, stays this small (16 MiB in float32): beyond that (paper-size maps) its memory and work
#: outgrow torchvision's kernel, which reads just the samples it needs.
AUTO_MAX_ELEMENTS = 1 << 22


def resolve_impl(
    impl: RoIAlignImpl, features: Tensor, num_boxes: int = 0, output_size: int = 7
) -> Literal["torchvision", "separable"]:
    """ "auto" -> the factorised form for CPU training steps on small maps (where torchvision's serial backward
    is the bottleneck: ``features`` (B, S, C, H, W) and ``num_boxes`` per image within ``AUTO_MAX_ELEMENTS``),
    torchvision's kernel otherwise (on CUDA, for CPU inference, and on big maps)."""
    if impl == "auto":
        training = torch.is_grad_enabled() and features.requires_grad
        b, s, c, _, width = features.shape
        small = b * num_boxes * output_size * s * c * width <= AUTO_MAX_ELEMENTS
        return "separable" if training and small and features.device.type == "cpu" else "torchvision"
    if impl not in ("torchvision", "separable"):
        raise ValueError(f"RoIAlign impl must be 'auto', 'torchvision' or 'separable', got {impl!r}")
    return impl


#: Fewest boxes per thread worth splitting torchvision's CPU kernel for (smaller calls stay in one call).
MIN_ROIS_PER_THREAD = 32
_POOL: tuple[int, int, ThreadPoolExecutor] | None = None  # (process id, workers, pool)
_POOL_LOCK = threading.Lock()


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """A shared pool of at least ``workers`` threads, made anew in a forked child (threads do not survive
    a fork)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] != os.getpid() or _POOL[1] < workers:
            if _POOL is not None and _POOL[0] == os.getpid():
                _POOL[2].shutdown(wait=False)  # outgrown: its idle threads end
            _POOL = (os.getpid(), workers, ThreadPoolExecutor(workers, thread_name_prefix="roi_align"))
        return _POOL[2]


def roi_align_rois(
    features: Tensor,
    rois: Tensor,
    output_size: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    threads: int | None = None,
) -> Tensor:
    """``torchvision.ops.roi_align`` of ``rois`` (K, 5) (image index, x1, y1, x2, y2) on ``features``
    (N, C, H, W). Its CPU kernel runs on one core: without autograd, on the CPU, the rois are split into
    ``threads`` (default ``torch.get_num_threads()``) contiguous groups pooled concurrently (the kernel
    releases the GIL); the result is the same tensor, row for row."""
    threads = torch.get_num_threads() if threads is None else threads
    needs_grad = torch.is_grad_enabled() and features.requires_grad
    groups = min(threads, rois.shape[0] // MIN_ROIS_PER_THREAD)
    if needs_grad or features.device.type != "cpu" or groups < 2:
        return torchvision_roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
    inference = torch.is_inference_mode_enabled()

    def pool(part: Tensor) -> Tensor:
        # grad and inference modes are per thread: the workers take the caller's
        with torch.inference_mode(inference), torch.no_grad():
            return torchvision_roi_align(features, part, output_size, spatial_scale, sampling_ratio, aligned)

    parts = rois.tensor_split(groups)
    return torch.cat(list(_thread_pool(groups).map(pool, parts)))


def pool_with_weights(features: Tensor, wy: Tensor, wx: Tensor) -> Tensor:
    """``Wy @ F @ Wx.T`` for every box of every image: features (B, S, C, H, W), weights (B, P, out_h, H) and
    (B, P, out_w, W) -> (B, S, P, C, out_h, out_w). ``S`` slices of an image share its boxes."""
    b, s, c, height, width = features.shape
    p, out_h, out_w = wy.shape[1], wy.shape[2], wx.shape[2]
    wy, wx = wy.to(features.dtype), wx.to(features.dtype)
    # rows: one matrix product per image, (P*out_h, H) @ (H, S*C*W)
    by_rows = wy.reshape(b, p * out_h, height) @ features.permute(0, 3, 1, 2, 4).reshape(
        b, height, s * c * width
    )
    # columns: one product per box, (out_h*S*C, W) @ (W, out_w)
    by_rows = by_rows.view(b, p, out_h * s * c, width)
    pooled = by_rows @ wx.transpose(-1, -2)  # (B, P, out_h*S*C, out_w)
    return pooled.view(b, p, out_h, s, c, out_w).permute(0, 3, 1, 4, 2, 5)


def _box_dtype(features: Tensor, boxes: Tensor) -> torch.dtype:
    """The wider of the two dtypes: box coordinates in half precision would move by whole pixels."""
    return torch.promote_types(features.dtype, boxes.dtype)


def _separable(
    pool: Callable[[Tensor, Tensor, Tensor], Tensor],
    features: Tensor,
    boxes: Tensor,
    output_size: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """``pool(features, Wy, Wx)`` (``pool_with_weights`` or ``_grouped_max_with_weights``) with the boxes' weights,
    in the boxes' precision as torchvision's kernel (also under autocast), returned in the features' dtype."""
    b, _, _, height, width = features.shape
    p = boxes.shape[1]
    box_dtype = _box_dtype(features, boxes)
    with torch.no_grad():
        wy, wx = roi_weights(
            boxes.detach().to(box_dtype).reshape(b * p, 4), (height, width), (output_size, output_size),
            spatial_scale, sampling_ratio, aligned,
        )  # fmt: skip
    with torch.autocast(features.device.type, enabled=False):
        pooled = pool(
            features.to(box_dtype), wy.view(b, p, output_size, height), wx.view(b, p, output_size, width)
        )
    return pooled.to(features.dtype)


def roi_align_boxes(
    features: Tensor,
    boxes: Tensor,
    output_size: int,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = True,
    impl: RoIAlignImpl = "auto",
) -> Tensor:
    """RoIAlign of each image's boxes on each of its slices: features (B, S, C, H, W), boxes (B, P, 4)
    x1, y1, x2, y2 in input pixels (``spatial_scale`` maps them onto the features) -> (B, S, P, C, out, out).

    ``impl``: "separable" (the factorised form), "torchvision" (``torchvision.ops.roi_align``) or "auto" (see
    ``resolve_impl``). Both give the same values.
    """
    b, s, c, height, width = features.shape
    p = boxes.shape[1]
    impl = resolve_impl(impl, features, p, output_size)
    if impl == "separable":
        return _separable(pool_with_weights, features, boxes, output_size, spatial_scale, sampling_ratio, aligned)
    box_dtype = _box_dtype(features, boxes)
    boxes = boxes.detach().to(box_dtype)
    flat = features.reshape(b * s, c, height, width)
    index = torch.arange(b * s, device=boxes.device, dtype=box_dtype).repeat_interleave(p)
    per_slice = boxes[:, None].expand(b, s, p, 4).reshape(b * s * p, 4)
    rois = torch.cat([index[:, None], per_slice], dim=1)
    pooled = roi_align_rois(flat.to(box_dtype), rois, output_size, spatial_scale, sampling_ratio, aligned)
    return pooled.to(features.dtype).view(b, s, p, c, output_size, output_size)


#: Elements of one group's bins in ``roi_align_max`` without autograd on the CPU (4 MiB of float32, cache-sized).
MAX_GROUP_ELEMENTS = 1 << 20


def _grouped_max_with_weights(features: Tensor, wy: Tensor, wx: Tensor) -> Tensor:
    """``max over bins of Wy @ F @ Wx.T`` for every box of every image, a few boxes at a time: features
    (B, S, C, H, W), weights (B, P, out_h, H) and (B, P, out_w, W) -> (B, S, P, C)."""
    b, s, c, height, width = features.shape
    p, out_h, out_w = wy.shape[1], wy.shape[2], wx.shape[2]
    columns = features.permute(0, 3, 4, 1, 2).reshape(b, height, width * s * c)  # (B, H, W*S*C)
    out = features.new_empty(b, p, s, c)
    step = max(1, MAX_GROUP_ELEMENTS // (out_h * width * s * c))
    for i in range(b):
        for start in range(0, p, step):
            stop = min(start + step, p)
            k = stop - start
            rows = (wy[i, start:stop].reshape(k * out_h, height) @ columns[i]).view(k, out_h, width, s * c)
            pooled = wx[i, start:stop, None] @ rows  # (k, 1, out_w, W) @ (k, out_h, W, S*C)
            out[i, start:stop] = pooled.view(k, out_h * out_w, s, c).amax(dim=1)
    return out.transpose(1, 2)


def roi_align_max(
    features: Tensor,
    boxes: Tensor,
    output_size: int,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = True,
    impl: RoIAlignImpl = "auto",
) -> Tensor:
    """The maximum over each box's ``output_size`` x ``output_size`` RoIAlign bins on each slice: features
    (B, S, C, H, W), boxes (B, P, 4) x1, y1, x2, y2 in input pixels -> (B, S, P, C).

    Without autograd on the CPU ("auto" or "separable") the factorised form runs a few boxes at a time, each
    group's bins reduced at once (see the module docstring); otherwise ``roi_align_boxes`` with ``impl`` and a
    maximum over the flattened bins, which keeps only the argmax indices for the backward pass (a maximum over
    two dims would keep the whole pooled tensor).
    """
    needs_grad = torch.is_grad_enabled() and features.requires_grad
    if needs_grad or features.device.type != "cpu" or impl == "torchvision":
        return roi_align_boxes(
            features, boxes, output_size, spatial_scale, sampling_ratio, aligned, impl
        ).flatten(-2).max(dim=-1).values
    resolve_impl(impl, features)  # an unknown impl is refused here too
    return _separable(
        _grouped_max_with_weights, features, boxes, output_size, spatial_scale, sampling_ratio, aligned
    )


__all__ = [
    "roi_align_max",
    "RoIAlignImpl",
    "axis_weights",
    "pool_with_weights",
    "resolve_impl",
    "roi_align_boxes",
    "roi_weights",
]
