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
    leaves RandAugment to ``photometric`` on the training device: ``with_seed`` then returns the clip without it
    and the seed that gives the same ops there (the draws come from the CPU generator wherever it runs).
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
        """(T, H, W, 3) uint8 -> (3, T, crop, crop) uint8 (RandAugment included only on the loader)."""
        return self.with_seed(frames)[0]

    def with_seed(self, frames: Tensor) -> tuple[Tensor, int | None]:
        """The transformed clip (3, T, crop, crop) and, under ``photometric_on="device"``, the seed of the
        RandAugment ops still to apply (``photometric``); None when nothing is left to do."""
        clip = to_tchw(frames)
        lo, hi = self.short_side_range
        clip = resize_short_side(clip, int(torch.randint(lo, hi + 1, ()).item()))
        h, w = clip.shape[-2:]
        y = int(torch.randint(0, h - self.crop_size + 1, ()).item())
        x = int(torch.randint(0, w - self.crop_size + 1, ()).item())
        clip = clip[..., y : y + self.crop_size, x : x + self.crop_size]
        if self.flip and torch.rand(()) < 0.5:
            clip = clip.flip(-1)
        seed = draw_seed() if self.randaugment is not None else None
        if seed is not None and self.photometric_on == "loader":
            clip, seed = self.photometric(clip, seed), None
        # (3, T, crop, crop) as the resize laid it out (channels last): the batch is stacked as it lies
        # (base.stack_clips) and made contiguous on the device
        return clip.permute(1, 0, 2, 3), seed

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
