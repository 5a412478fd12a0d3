"""Keyframe clips for spatio-temporal action detection: the machinery shared by AVA and UCF101-24/JHMDB.

Both datasets give a sample as one annotated frame (the keyframe) with its person boxes; the model sees a clip
of frames around it. This module holds what does not depend on the annotation format:

- Clip geometry. ``clip_frame_indices`` takes ``length`` frames at ``stride`` around a centre frame, the
  centre entry ``length // 2``, clamped to the video (PySlowFast's keyframe sampling). For a keyframe given in
  seconds, ``keyframe_clip_indices`` lays the clip on a grid of ``frame_rate`` frames per second
  (``grid_length``, ``keyframe_grid_index``) and maps each grid frame to the native frame shown at its time;
  ``frame_rate: None`` takes the video's native frames as the grid.
- Transforms (``transform_keyframe_clip``): resize the short side (``resized_size``, the long side rounded half
  up as detectron2), optionally flip; boxes, normalised in the annotations, become pixels of the resized clip
  in continuous coordinates (``scale_boxes``; a flip maps x to ``width - x``, ``flip_boxes``).
- Batches (``collate_keyframes``): every clip padded right and bottom to one size, a multiple of
  ``pad_multiple``; ``image_size`` keeps each clip's real size, and ``KeyframeDetectionDataModule`` sets the
  padding to 0 after normalisation (mean 0.45, std 0.225, ``AVA_MEAN`` / ``AVA_STD``), the mean colour, as
  detectron2 pads.
- Frame folders (``FrameFolder``, ``count_frames``): videos stored as one image per frame.
- Setup checks (``Problem``, ``KeyframeDetectionDataModule.settle``): bad input found before any worker starts
  stops the run with the file, line and fix, or is counted and left out under ``bad_video: skip``.

The formats live in ``datamodules.ava`` (AVA v2.2 CSVs, read by ``datamodules.ava_annotations``) and
``datamodules.act_pickle`` (ACT pickles).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from datamodules.base import VideoDataModule, batch_buffer
from datamodules.transforms import to_tchw
from datamodules.video_io import VideoDecodeError, permission_error

log = logging.getLogger(__name__)

# PySlowFast's AVA statistics; the UCF101-24 / JHMDB module normalises with them too.
AVA_MEAN = (0.45, 0.45, 0.45)
AVA_STD = (0.225, 0.225, 0.225)

#: Per-sample entries collated as lists (their length differs between samples).
LIST_KEYS = ("boxes", "labels", "proposals", "proposal_scores", "classes", "tube_ids")
#: Where keyframe clips are resized and flipped: in the loader workers, or on the training device after the
#: batch moved there (the workers then hand over the frames as decoded).
ResizeOn = Literal["loader", "device"]
#: Per-sample integers collated into (B,) tensors.
INDEX_KEYS = ("index", "video_index", "timestamp", "frame")

# ------------------------------------------------------------------------------------------ clip geometry


def clip_frame_indices(centre: int, num_frames: int, length: int = 16, stride: int = 4) -> np.ndarray:
    """Frames ``centre - length * stride // 2 + k * stride`` (k < length), clamped to [0, num_frames - 1].

    PySlowFast's keyframe sampling: for 16 x 4 the keyframe is entry 8, with 8 frames before it and 7 after.
    """
    start = centre - (length * stride) // 2
    return np.clip(start + stride * np.arange(length, dtype=np.int64), 0, num_frames - 1)


def grid_length(num_frames: int, fps: float, frame_rate: float | None) -> int:
    """Frames of the ``frame_rate`` grid over a video of ``num_frames`` at ``fps`` (None: the video's own)."""
    if frame_rate is None:
        return num_frames
    return max(math.ceil(num_frames * frame_rate / fps - 1e-6), 1)


def keyframe_grid_index(seconds: float, fps: float, frame_rate: float | None) -> int:
    """Grid frame shown ``seconds`` into the video (nearest, halves up)."""
    return math.floor(seconds * (fps if frame_rate is None else frame_rate) + 0.5)


def keyframe_clip_indices(
    seconds: float,
    num_frames: int,
    fps: float,
    frame_rate: float | None = 30.0,
    length: int = 16,
    stride: int = 4,
) -> np.ndarray:
    """Native frame indices of the clip around the keyframe ``seconds`` into a video (see the module doc).

    ``stride`` counts frames of the ``frame_rate`` grid; each grid frame maps to the native frame shown at its
    time (``floor(t * fps)``), and both ends are clamped to the video.
    """
    centre = keyframe_grid_index(seconds, fps, frame_rate)
    grid = clip_frame_indices(centre, grid_length(num_frames, fps, frame_rate), length, stride)
    if frame_rate is None:
        return grid
    native = np.floor(grid * (fps / frame_rate) + 1e-6).astype(np.int64)
    return np.clip(native, 0, num_frames - 1)


def resized_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(height, width) with the short side at ``short_side``, the long one rounded half up (as detectron2)."""
    if height <= width:
        return short_side, max(int(width * short_side / height + 0.5), 1)
    return max(int(height * short_side / width + 0.5), 1), short_side


def flip_boxes(boxes: np.ndarray, width: float) -> np.ndarray:
    """x1, y1, x2, y2 boxes (n, 4) mirrored in an image ``width`` wide (continuous coordinates)."""
    out = np.array(boxes, dtype=np.float32, copy=True).reshape(-1, 4)
    out[:, [0, 2]] = width - out[:, [2, 0]]
    return out


def scale_boxes(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """Normalised boxes (n, 4) -> pixels of a ``width`` x ``height`` image, float32."""
    scale = np.array([width, height, width, height], dtype=np.float32)
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * scale


@functools.cache
def _opencv() -> Any:
    """OpenCV, on one thread per process: each loader worker is a process already."""
    import cv2

    cv2.setNumThreads(1)
    return cv2


def transform_keyframe_clip(
    frames: Tensor,
    boxes: Sequence[np.ndarray],
    short_side: int,
    flip: bool,
    antialias: bool = True,
    resize_on: ResizeOn = "loader",
) -> tuple[Tensor, list[Tensor], tuple[int, int]]:
    """Resize the short side (bilinear; ``antialias: false`` is ``cv2.resize(INTER_LINEAR)``, what the official
    EVAD loader runs), optionally flip; boxes follow.

    ``frames`` (T, H, W, 3) uint8 -> clip (3, T, h, w) uint8, each normalised box set as pixel boxes of the
    resized clip (float32), and (h, w). Under ``resize_on: device`` the frames come back as they are and only
    the boxes and the size are computed: ``resize_keyframe_batch`` resizes and flips the batch on the device.
    """
    height, width = frames.shape[1:3]
    new_h, new_w = resized_size(height, width, short_side)
    out = [scale_boxes(b, new_w, new_h) for b in boxes]
    if flip:
        out = [flip_boxes(b, new_w) for b in out]
    if resize_on == "device":
        return frames, [torch.from_numpy(b) for b in out], (new_h, new_w)
    if not antialias:
        # The official resize itself, frame by frame on (H, W, 3) uint8; the flip is a view, and the one copy
        # is into the (3, T, h, w) layout: about half the time of the same in torch (README, "Loader workers").
        array = frames.numpy()
        if (new_h, new_w) != (height, width):
            cv2 = _opencv()
            array = np.stack([cv2.resize(f, (new_w, new_h), interpolation=cv2.INTER_LINEAR) for f in array])
        if flip:
            array = array[:, :, ::-1]
        clip = torch.from_numpy(np.ascontiguousarray(array.transpose(3, 0, 1, 2)))
        return clip, [torch.from_numpy(b) for b in out], (new_h, new_w)
    clip = to_tchw(frames)
    if (new_h, new_w) != (height, width):
        clip = TF.resize(clip, [new_h, new_w], antialias=True)
    if flip:
        clip = clip.flip(-1)
    return clip.permute(1, 0, 2, 3).contiguous(), [torch.from_numpy(b) for b in out], (new_h, new_w)


def collate_keyframes(samples: Sequence[dict[str, Any]], pad_multiple: int = 32) -> dict[str, Any]:
    """Pad the clips right and bottom to one size, a multiple of ``pad_multiple``; boxes stay as they are.

    ``video`` (B, 3, T, H, W) uint8 (zeros in the padding), ``image_size`` / ``orig_size`` (B, 2) as (h, w),
    the ``LIST_KEYS`` as per-sample lists and the ``INDEX_KEYS`` as (B,) int64; skips as in ``collate_clips``.
    Samples of ``resize_on: device`` (a ``flip`` entry, frames as decoded) stay apart: ``video`` is the list of
    their (T, H, W, 3) uint8 tensors, uncopied, and ``flip`` (B,) bool, for ``resize_keyframe_batch``.
    """
    good = [s for s in samples if "skipped" not in s]
    batch: dict[str, Any] = {}
    if good:
        sizes = torch.tensor([s["image_size"] for s in good], dtype=torch.long)  # (B, 2)
        if "flip" in good[0]:
            video: Tensor | list[Tensor] = [s["video"] for s in good]
            batch["flip"] = torch.tensor([s["flip"] for s in good], dtype=torch.bool)
        else:
            height, width = (int(math.ceil(int(v) / pad_multiple) * pad_multiple) for v in sizes.max(0).values)
            channels, frames = good[0]["video"].shape[:2]
            video = batch_buffer((len(good), channels, frames, height, width), good[0]["video"].dtype).zero_()
            for i, s in enumerate(good):
                h, w = s["video"].shape[-2:]
                video[i, :, :, :h, :w] = s["video"]
        batch["video"], batch["image_size"] = video, sizes
        batch["orig_size"] = torch.tensor([s["orig_size"] for s in good], dtype=torch.long)
        for key in LIST_KEYS:
            if key in good[0]:
                batch[key] = [s[key] for s in good]
        for key in INDEX_KEYS:
            if key in good[0]:
                batch[key] = torch.tensor([s[key] for s in good], dtype=torch.long)
    batch["skipped"] = [s["skipped"] for s in samples if "skipped" in s]
    batch["batch_size"] = len(good)
    return batch


def resize_keyframe_batch(
    frames: Sequence[Tensor], image_size: Tensor, flip: Tensor, pad_multiple: int = 32, antialias: bool = False
) -> Tensor:
    """The resize and flip of ``transform_keyframe_clip`` and the padding of ``collate_keyframes``, done where
    the batch is (the training device, under ``resize_on: device``).

    ``frames``: each sample's (T, H, W, 3) uint8 clip as decoded, resized to its ``image_size`` (bilinear with
    half-pixel centres, rounded to uint8: OpenCV's ``INTER_LINEAR`` to within one grey level; ``antialias``
    filters first, as torchvision) and flipped where ``flip`` says -> (B, 3, T, H', W') uint8, zeros in the
    padding to a multiple of ``pad_multiple``: the batch the loader path gives.
    """
    sizes = image_size.tolist()
    height, width = (int(math.ceil(max(v) / pad_multiple) * pad_multiple) for v in zip(*sizes, strict=True))
    first = frames[0]
    out = first.new_zeros(len(frames), first.shape[-1], first.shape[0], height, width)
    for i, (clip, (h, w), mirror) in enumerate(zip(frames, sizes, flip.tolist(), strict=True)):
        clip = clip.permute(0, 3, 1, 2)  # (T, 3, H, W)
        if (h, w) != tuple(clip.shape[-2:]):
            clip = torch.nn.functional.interpolate(
                clip.float(), size=(h, w), mode="bilinear", align_corners=False, antialias=antialias
            )
            clip = clip.round_().clamp_(0, 255)
        if mirror:
            clip = clip.flip(-1)
        out[i, :, :, :h, :w] = clip.transpose(0, 1)
    return out


# --------------------------------------------------------------------------------------------- frame folders


class FrameFolder:
    """A video stored as one image per frame, read like ``video_io.Video``.

    Frame ``i`` (0-based) is ``root / pattern.format(video=video_id, index=i + first_number)``; PySlowFast's AVA
    frames are ``{video}/{video}_{index:06d}.jpg`` from 1, ACT's UCF101-24 / JHMDB frames
    ``{video}/{index:05d}.jpg`` from 1. A missing or unreadable file raises ``VideoDecodeError`` so the
    data module's bad-input policy applies. ``fps`` is the rate the frames were extracted at, when known.
    """

    def __init__(
        self,
        root: str | Path,
        video_id: str,
        pattern: str,
        num_frames: int,
        first_number: int = 1,
        fps: float | None = None,
    ):
        self.root = Path(root)
        self._root = str(self.root)
        self.video_id = video_id
        self.pattern = pattern
        self.num_frames = num_frames
        self.fps = fps
        self.first_number = first_number

    def path(self, index: int) -> Path:
        return self.root / self.pattern.format(video=self.video_id, index=int(index) + self.first_number)

    def get_frames(self, indices: Sequence[int] | np.ndarray) -> Tensor:
        """Frames at ``indices`` (clamped to the video) as uint8 (T, H, W, 3), each file decoded once.

        JPEG files are decoded by libjpeg-turbo through simplejpeg straight into the clip (the pixels of PIL and
        of OpenCV's ``imread``, which the official loaders use: accurate DCT, smooth chroma upsampling); other
        files, and JPEGs it cannot read (CMYK), through PIL.
        """
        idx = np.clip(np.asarray(indices, dtype=np.int64), 0, self.num_frames - 1)
        out: np.ndarray | None = None
        first: dict[int, int] = {}  # frame -> its first row in ``out``: each file is decoded once
        for row, i in enumerate(idx.tolist()):
            if i in first:
                out[row] = out[first[i]]
                continue
            first[i] = row
            # a str path: pathlib's parsing was a few percent of a clip's time
            path = os.path.join(self._root, self.pattern.format(video=self.video_id, index=i + self.first_number))
            try:
                with open(path, "rb") as file:
                    data = file.read()
            except FileNotFoundError:
                raise VideoDecodeError(path, "missing", "frame file not found") from None
            except PermissionError as err:
                raise permission_error(path, err) from None
            except OSError as err:
                raise VideoDecodeError(path, "corrupt", f"cannot be read ({err})") from err
            frame = None
            shape = _jpeg_shape(data) if path.lower().endswith((".jpg", ".jpeg")) else None
            if shape is None:
                frame = _decode_image(path, data)
                shape = frame.shape
            if out is None:
                out = np.empty((len(idx), *shape), dtype=np.uint8)
            if shape != out.shape[1:]:
                raise VideoDecodeError(path, "decode_failed", f"frames differ in size: {shape} and {out.shape[1:]}")
            if frame is None and not _decode_jpeg_into(data, out[row]):
                frame = _decode_image(path, data)  # what PIL says of a JPEG simplejpeg could not decode
            if frame is not None:
                out[row] = frame
        return torch.from_numpy(out)


def _jpeg_shape(data: bytes) -> tuple[int, int, int] | None:
    """(H, W, 3) of a JPEG simplejpeg can decode to RGB, else None."""
    import simplejpeg

    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:  # simplejpeg's error for what libjpeg-turbo cannot read
        return None
    return (height, width, 3) if colorspace in ("Gray", "YCbCr", "RGB") else None


def _decode_jpeg_into(data: bytes, out: np.ndarray) -> bool:
    """Decode a JPEG into ``out`` (H, W, 3) uint8; False where simplejpeg cannot."""
    import simplejpeg

    try:
        simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False, buffer=out)
    except ValueError:
        return False
    return True


def _decode_image(path: str | Path, data: bytes) -> np.ndarray:
    """An image file's pixels as (H, W, 3) uint8 RGB, through PIL."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            # an RGB image's pixels as they are (convert would copy them once more)
            return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    except Exception as err:
        raise VideoDecodeError(path, "corrupt", f"cannot be read as an image ({err})") from err


def count_frames(root: str | Path, video_id: str, pattern: str, first_number: int = 1) -> int:
    """Frames of a ``FrameFolder``: the files of its first frame's folder with that suffix, checked contiguous."""
    folder = FrameFolder(root, video_id, pattern, 1, first_number)
    first = folder.path(0)
    if not first.parent.is_dir():
        raise VideoDecodeError(first.parent, "missing", "frame folder not found")
    count = sum(1 for p in first.parent.iterdir() if p.suffix == first.suffix)
    if count == 0 or not first.is_file() or not folder.path(count - 1).is_file():
        raise VideoDecodeError(
            first.parent, "corrupt",
            f"{count} frame files, not numbered {first.name} onwards without gaps as frame_pattern says",
        )  # fmt: skip
    return count


# ------------------------------------------------------------------------------------ shared data module


class KeyframeDetectionDataModule(VideoDataModule):
    """Base of the spatio-temporal detection data modules: keyframe collation, padding, setup checks.

    Bad input found at setup goes through the base's ``settle``. Videos that fail while loading follow the base
    policy. ``resize_on``: where the clips are resized and flipped, in the loader workers (``loader``) or on the
    training device once the batch is there (``device``: the workers decode and collate the frames as they are,
    ``resize_keyframe_batch`` gives the loader's batch to within one grey level; a worker then keeps up with
    raw decoding, README "Loader workers per GPU").
    """

    def __init__(self, pad_multiple: int = 32, resize_on: ResizeOn = "loader", **kwargs: Any):
        super().__init__(**kwargs)
        if pad_multiple < 1:
            raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
        if resize_on not in ("loader", "device"):
            raise ValueError(f"resize_on must be loader or device, got {resize_on!r}")
        self.pad_multiple = pad_multiple
        self.resize_on = resize_on

    @property
    def collate_fn(self) -> Callable[[Sequence[dict[str, Any]]], dict[str, Any]]:
        return functools.partial(collate_keyframes, pad_multiple=self.pad_multiple)

    def setup(self, stage: str) -> None:
        """Read and check the annotations and videos before any worker starts."""
        stages = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
        for name in stages.get(stage, ()):
            self.dataset(name)

    #: Whether the clips are resized with an antialiasing filter (``transform_keyframe_clip``'s ``antialias``).
    antialias: bool = True

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        if "flip" in batch:  # resize_on: device
            batch["video"] = resize_keyframe_batch(
                batch["video"], batch["image_size"], batch.pop("flip"), self.pad_multiple, self.antialias
            )
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        video = batch.get("video")
        if video is not None and video.is_floating_point():
            # Padding at the mean colour: 0 after normalisation.
            for i, (h, w) in enumerate(batch["image_size"].tolist()):
                video[i, ..., h:, :] = 0
                video[i, ..., :, w:] = 0
        return batch


__all__ = [
    "AVA_MEAN",
    "AVA_STD",
    "FrameFolder",
    "KeyframeDetectionDataModule",
    "ResizeOn",
    "clip_frame_indices",
    "collate_keyframes",
    "count_frames",
    "flip_boxes",
    "grid_length",
    "keyframe_clip_indices",
    "keyframe_grid_index",
    "resize_keyframe_batch",
    "resized_size",
    "scale_boxes",
    "transform_keyframe_clip",
]
