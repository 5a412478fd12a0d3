"""Clip transforms on uint8 tensors, applied to a whole clip at once (every frame gets the same parameters).

Clips stay uint8 through the data loader (a quarter of the bytes of float32 to pin and copy); conversion to float
and normalisation run on the device, batched, in ``VideoDataModule.on_after_batch_transfer`` via ``normalize``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from torch import Tensor


def to_tchw(frames: Tensor) -> Tensor:
    """Decoder layout (T, H, W, 3) -> (T, 3, H, W)."""
    return frames.permute(0, 3, 1, 2)


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after ``resize_short_side(clip, size)``: torchvision's rule (the long side truncated)."""
    if min(height, width) == size:
        return height, width
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def resize_short_side(clip: Tensor, size: int) -> Tensor:
    """(T, C, H, W) resized so that min(H, W) == size, keeping the aspect ratio."""
    if min(clip.shape[-2:]) == size:
        return clip
    return TF.resize(clip, size, antialias=True)


def centre_crop(clip: Tensor, size: int) -> Tensor:
    return TF.center_crop(clip, [size, size])


def three_crops(clip: Tensor, size: int) -> list[Tensor]:
    """Left/centre/right (or top/centre/bottom) crops along the long side, as in multi-view video testing."""
    h, w = clip.shape[-2:]
    if w >= h:
        offsets = [((h - size) // 2, x) for x in (0, (w - size) // 2, w - size)]
    else:
        offsets = [(y, (w - size) // 2) for y in (0, (h - size) // 2, h - size)]
    return [clip[..., y : y + size, x : x + size] for y, x in offsets]


def draw_seed() -> int:
    """A seed for one clip's photometric ops, from the sample's own random stream."""
    return int(torch.randint(0, 2**62, ()))


class TrainClipTransform:
    """Random short-side resize, random square crop, optional flip and RandAugment; uint8 in, uint8 out.

    ``flip`` must stay off when labels depend on direction (left vs right); RandAugment draws one set of ops per
    clip (from a seed drawn for the clip), so the frames of a clip stay consistent. ``photometric_on="device"``
    leaves the whole transform to the training device: ``with_seed`` then returns the frames as decoded and the
    clip's draws (``plan``), and ``on_device`` applies the same resize, crop, flip and RandAugment there (the
    draws come from the CPU generator wherever it runs).
    """

    def __init__(
        self,
        crop_size: int,
        short_side_range: Sequence[int],
        flip: bool = True,
        randaugment_ops: int = 2,
        randaugment_magnitude: int = 9,
        photometric_on: Literal["loader", "device"] = "loader",
    ):
        lo, hi = (short_side_range[0], short_side_range[-1])
        if lo < crop_size:
            raise ValueError(f"short side {lo} is smaller than the crop {crop_size}")
        if photometric_on not in ("loader", "device"):
            raise ValueError(f"photometric_on must be 'loader' or 'device', got {photometric_on!r}")
        self.photometric_on = photometric_on
        self.crop_size = crop_size
        self.short_side_range = (lo, hi)
        self.flip = flip
        self.randaugment = (
            T.RandAugment(num_ops=randaugment_ops, magnitude=randaugment_magnitude)
            if randaugment_ops > 0
            else None
        )

    def __call__(self, frames: Tensor) -> Tensor:
        """(T, H, W, 3) uint8 -> (3, T, crop, crop) uint8 (the loader's transform)."""
        return self.with_seed(frames)[0]

    def plan(self, height: int, width: int) -> tuple[int, int, int, int, int]:
        """One clip's draws, in this order: short side, crop corner (y, x) in the resized frame, flip (0/1) and
        the RandAugment seed (-1: none)."""
        lo, hi = self.short_side_range
        short = int(torch.randint(lo, hi + 1, ()).item())
        h, w = short_side_size(height, width, short)
        y = int(torch.randint(0, h - self.crop_size + 1, ()).item())
        x = int(torch.randint(0, w - self.crop_size + 1, ()).item())
        flip = bool(self.flip and torch.rand(()) < 0.5)
        return short, y, x, int(flip), draw_seed() if self.randaugment is not None else -1

    def with_seed(self, frames: Tensor) -> tuple[Tensor, Tensor | None]:
        """The transformed clip (3, T, crop, crop) and None; under ``photometric_on="device"`` the frames as
        decoded, (3, T, H, W), and the clip's plan (``plan``, int64) for ``on_device``."""
        plan = self.plan(*frames.shape[1:3])
        if self.photometric_on == "device":
            return frames.permute(3, 0, 1, 2), torch.tensor(plan)
        # (3, T, crop, crop) as the resize laid it out (channels last): the batch is stacked as it lies
        # (base.stack_clips) and made contiguous on the device
        return self.on_device(frames.permute(3, 0, 1, 2), plan), None

    def on_device(self, clip: Tensor, plan: Sequence[int]) -> Tensor:
        """``clip`` (3, T, H, W) uint8 as decoded, on any device -> (3, T, crop, crop): the ``plan``'s resize,
        crop, flip and RandAugment. On the CPU bit for bit the loader's clip; on a GPU torchvision resizes in
        float and rounds (one grey level apart at most)."""
        short, y, x, flip, seed = (int(v) for v in plan)
        clip = resize_short_side(clip.transpose(0, 1), short)
        clip = clip[..., y : y + self.crop_size, x : x + self.crop_size]
        if flip:
            clip = clip.flip(-1)
        if seed >= 0:
            clip = self.photometric(clip, seed)
        return clip.transpose(0, 1)

    def photometric(self, clip: Tensor, seed: int) -> Tensor:
        """RandAugment on ``clip`` (T, 3, H, W) uint8, on any device, its ops drawn from ``seed``."""
        if self.randaugment is None:
            return clip
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            return self.randaugment(clip)


class EvalClipTransform:
    """Short-side resize then one centre crop or three crops; returns the views stacked.

    ``(T, H, W, 3)`` uint8 -> ``(crops, 3, T, crop, crop)`` uint8.
    """

    def __init__(self, crop_size: int, short_side: int, num_crops: int = 1):
        if num_crops not in (1, 3):
            raise ValueError(f"num_crops must be 1 (centre) or 3 (three crops), got {num_crops}")
        if short_side < crop_size:
            raise ValueError(f"short side {short_side} is smaller than the crop {crop_size}")
        self.crop_size = crop_size
        self.short_side = short_side
        self.num_crops = num_crops

    def __call__(self, frames: Tensor) -> Tensor:
        clip = resize_short_side(to_tchw(frames), self.short_side)
        crops = (
            [centre_crop(clip, self.crop_size)] if self.num_crops == 1 else three_crops(clip, self.crop_size)
        )
        return torch.stack([c.permute(1, 0, 2, 3) for c in crops]).contiguous()


def normalize(
    video: Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32
) -> Tensor:
    """uint8 video with channels at dim -4 (..., 3, T, H, W) -> float, ``(x/255 - mean) / std`` per channel."""
    shape = (3, 1, 1, 1)
    m = torch.as_tensor(mean, dtype=dtype, device=video.device).view(shape) * 255.0
    s = torch.as_tensor(std, dtype=dtype, device=video.device).view(shape) * 255.0
    return (video.to(dtype) - m) / s
