"""From ActionFormer outputs to a video's detections, as OpenTAD post-processes AdaTAD.

1. ``TADPostProcessor.decode``: per window, the sigmoid scores of all valid points of all levels; every
   (point, class) pair above ``pre_nms_thresh``, the ``pre_nms_topk`` best, with its segment in head steps. A
   one-class (class-agnostic) head keeps every point, as OpenTAD's one-class branch, which applies neither.
2. ``TADPostProcessor.merge_windows``: the candidates of all windows of a video converted to seconds
   (``offset + step * seconds_per_step``), concatenated, then one NMS over the video. Windows of a video cut
   into several (sliding windows, THUMOS14) are clipped to ``[0, duration]`` before the NMS, as OpenTAD
   converts each window; a video seen whole (ActivityNet, resized to a fixed length) is NMSed on its unclipped
   segments and clipped after, as OpenTAD's and ActionFormer's single-stage detectors do.
3. ``TADPostProcessor.fuse_video_classes`` (ActivityNet): class-agnostic proposals times the top-k scores of
   an external video-level classifier.

NMS (``TADPostProcessor.nms``) is per class (``multiclass``) or class-agnostic, one of Gaussian soft-NMS (a
detection's score is multiplied by ``exp(-IoU^2 / sigma)`` with every higher-ranked one; scores below
``min_score`` are dropped; each length counts 1e-6 more in the IoU's union, as OpenTAD's kernel), hard NMS
(``torchvision.ops.batched_nms`` on segments as ``[start, 0, end, 1]``
boxes, which drops detections with IoU above ``iou_threshold``) or none; at most ``max_seg_num`` detections
are kept, best first. Class-agnostic NMS can refine each kept segment by score-weighted voting of the segments
overlapping it by ``voting_thresh`` or more.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from models.actionformer import ActionFormerOutputs

NMSMethod = Literal["soft_nms", "nms", "none"]


@dataclass
class Detections:
    """Detections of one window or video: segments (N, 2) in head steps or seconds, scores (N,), labels (N,).

    ``labels`` are class indices; after class-agnostic detection they are all 0.
    """

    segments: Tensor
    scores: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.scores.shape[0]

    def __getitem__(self, index: Tensor | slice) -> Detections:
        return Detections(self.segments[index], self.scores[index], self.labels[index])

    @staticmethod
    def cat(parts: Sequence[Detections]) -> Detections:
        if not parts:
            return Detections(torch.zeros(0, 2), torch.zeros(0), torch.zeros(0, dtype=torch.long))
        return Detections(
            torch.cat([d.segments for d in parts]),
            torch.cat([d.scores for d in parts]),
            torch.cat([d.labels for d in parts]),
        )


def segment_iou(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Temporal IoU of every pair of segments: (N, 2), (M, 2) -> (N, M)."""
    inter = torch.minimum(a[:, None, 1], b[None, :, 1]) - torch.maximum(a[:, None, 0], b[None, :, 0])
    inter = inter.clamp(min=0)
    union = (a[:, 1] - a[:, 0])[:, None] + (b[:, 1] - b[:, 0])[None, :] - inter
    return inter / union.clamp(min=eps)


def soft_nms(
    segments: Tensor,
    scores: Tensor,
    sigma: float = 0.7,
    min_score: float = 0.0,
    max_num: int | None = None,
    length_eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Gaussian soft-NMS of one class: indices of the kept segments, in selection order, and their scores.

    Repeatedly takes the highest remaining score, then multiplies every other remaining score by
    ``exp(-IoU^2 / sigma)`` with the taken segment; scores falling below ``min_score`` leave the pool. Each
    segment's length counts ``length_eps`` more in the union (OpenTAD's ``x2 - x1 + 1e-6``).
    """
    start, end = segments.float().unbind(dim=1)
    length = end - start + length_eps
    # the pool holds -inf for taken or dropped segments, so one argmax per step finds the next one
    pool = torch.where(scores >= min_score, scores.float(), -torch.inf)
    limit = len(pool) if max_num is None else min(max_num, len(pool))
    keep, kept_scores = [], []
    while len(keep) < limit:
        best = int(pool.argmax())
        score = float(pool[best])
        if score == -math.inf:
            break
        keep.append(best)
        kept_scores.append(score)
        inter = (torch.minimum(end, end[best]) - torch.maximum(start, start[best])).clamp_(min=0)
        iou = inter / (length + length[best] - inter).clamp_(min=1e-8)
        # a positive floor keeps -inf * decay from turning into NaN when sigma is tiny
        pool *= iou.square_().div_(-sigma).exp_().clamp_(min=1e-30)
        pool[best] = -torch.inf
        if min_score > 0:
            pool[pool < min_score] = -torch.inf
    device = segments.device
    return torch.tensor(keep, dtype=torch.long, device=device), torch.tensor(kept_scores, device=device)


def score_voting(kept: Tensor, segments: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Each kept segment (K, 2) becomes the score-weighted mean of all segments with IoU >= the threshold."""
    weights = (segment_iou(kept, segments) >= iou_threshold).to(scores.dtype) * scores[None]  # (K, N)
    return weights @ segments / weights.sum(dim=1, keepdim=True).clamp(min=1e-12)


class TADPostProcessor:
    """Decoding, window merging, NMS and class fusion with the defaults of AdaTAD's THUMOS14 configuration.

    ActivityNet (AdaTAD): ``multiclass=False, max_seg_num=100, min_score=0.001, voting_thresh=0.9`` with a
    one-class head, then ``fuse_video_classes`` with ``external_cls_topk=2``.
    """

    def __init__(
        self,
        pre_nms_thresh: float = 0.001,
        pre_nms_topk: int = 2000,
        nms_method: NMSMethod = "soft_nms",
        sigma: float = 0.7,
        iou_threshold: float = 0.1,
        min_score: float = 0.0,
        max_seg_num: int = 2000,
        multiclass: bool = True,
        voting_thresh: float = 0.0,
        external_cls_topk: int = 2,
    ):
        if nms_method not in ("soft_nms", "nms", "none"):
            raise ValueError(f"nms_method {nms_method!r} is not one of 'soft_nms', 'nms', 'none'")
        self.pre_nms_thresh = pre_nms_thresh
        self.pre_nms_topk = pre_nms_topk
        self.nms_method = nms_method
        self.sigma = sigma
        self.iou_threshold = iou_threshold
        self.min_score = min_score
        self.max_seg_num = max_seg_num
        self.multiclass = multiclass
        self.voting_thresh = voting_thresh
        self.external_cls_topk = external_cls_topk

    @torch.no_grad()
    def decode(self, outputs: ActionFormerOutputs) -> list[Detections]:
        """Candidate detections of each window of a batch, segments in head steps, before NMS."""
        segments = outputs.segments().float()  # (B, P, 2)
        probs = torch.cat(outputs.cls_logits, dim=1).float().sigmoid()  # (B, P, C)
        valid = torch.cat(outputs.masks, dim=1)
        num_classes = probs.shape[-1]
        windows = []
        for segs, prob, mask in zip(segments, probs, valid):
            flat = prob[mask].flatten()  # point-major: index = point * C + class
            if num_classes == 1:  # OpenTAD's one-class branch: every point, neither threshold nor top-k
                top, order = flat.sort(descending=True)
                windows.append(Detections(segs[mask][order], top, torch.zeros_like(order)))
                continue
            candidates = (flat > self.pre_nms_thresh).nonzero().squeeze(1)
            top, order = flat[candidates].topk(min(self.pre_nms_topk, candidates.numel()))
            candidates = candidates[order]
            windows.append(Detections(segs[mask][candidates // num_classes], top, candidates % num_classes))
        return windows

    @torch.no_grad()
    def nms(self, dets: Detections) -> Detections:
        """NMS of one video's detections, sorted by score and cut to ``max_seg_num``."""
        if len(dets) == 0:
            return dets
        groups = dets.labels if self.multiclass else torch.zeros_like(dets.labels)
        if self.nms_method == "nms":
            start, end = dets.segments.float().unbind(dim=1)
            boxes = torch.stack((start, torch.zeros_like(start), end, torch.ones_like(end)), dim=1)
            kept = dets[batched_nms(boxes, dets.scores.float(), groups, self.iou_threshold)]
        elif self.nms_method == "soft_nms":
            parts = []
            for group in groups.unique():
                index = (groups == group).nonzero().squeeze(1)
                keep, scores = soft_nms(
                    dets.segments[index], dets.scores[index], self.sigma, self.min_score, self.max_seg_num
                )
                parts.append(Detections(dets.segments[index[keep]], scores, dets.labels[index[keep]]))
            kept = Detections.cat(parts)
        else:
            kept = dets
        if self.voting_thresh > 0 and not self.multiclass and len(kept):
            # OpenTAD votes only after class-agnostic NMS; per class there are too few neighbours
            voted = score_voting(kept.segments, dets.segments, dets.scores, self.voting_thresh)
            kept = Detections(voted, kept.scores, kept.labels)
        order = kept.scores.argsort(descending=True)[: self.max_seg_num]
        return kept[order]

    @torch.no_grad()
    def merge_windows(
        self,
        windows: Sequence[Detections],
        window_offsets: Sequence[float],
        seconds_per_step: float | Sequence[float],
        duration: float,
        whole_video: bool | None = None,
    ) -> Detections:
        """A video's detections in seconds from its windows' candidates (``decode``), one NMS over the video.

        ``window_offsets[i]`` is the time in seconds of step 0 of window ``i``; ``seconds_per_step`` the
        duration of a head step (one value or one per window). ``whole_video`` (None: one window) says the video
        was seen whole: its segments are clipped to ``[0, duration]`` after the NMS instead of before.
        """
        if isinstance(seconds_per_step, (int, float)):
            seconds_per_step = [float(seconds_per_step)] * len(windows)
        if not len(windows) == len(window_offsets) == len(seconds_per_step):
            raise ValueError(
                f"{len(windows)} windows but {len(window_offsets)} offsets and {len(seconds_per_step)} step "
                "durations; give one offset (and step duration) per window"
            )
        whole = len(windows) == 1 if whole_video is None else whole_video
        parts = [
            Detections(d.segments * step + offset, d.scores, d.labels)
            for d, offset, step in zip(windows, window_offsets, seconds_per_step)
        ]
        if not whole:
            parts = [Detections(d.segments.clamp(0.0, duration), d.scores, d.labels) for d in parts]
        kept = self.nms(Detections.cat(parts))
        return Detections(kept.segments.clamp(0.0, duration), kept.scores, kept.labels) if whole else kept

    def fuse_video_classes(self, proposals: Detections, class_scores: Tensor) -> Detections:
        """Class-agnostic proposals x the ``external_cls_topk`` best classes of a video-level classifier.

        ``class_scores`` (num_classes,); each proposal is repeated for each of the top classes with score
        ``proposal score * class score`` and that class as label.
        """
        top_scores, top_classes = class_scores.topk(min(self.external_cls_topk, class_scores.numel()))
        return Detections(
            proposals.segments.repeat(len(top_scores), 1),
            (top_scores[:, None].to(proposals.scores) * proposals.scores[None]).flatten(),
            top_classes[:, None].expand(-1, len(proposals)).flatten(),
        )
