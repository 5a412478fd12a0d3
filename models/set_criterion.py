"""Set-prediction training of EVAD's query localiser (Sparse R-CNN / DETR style).

- ``HungarianMatcher``: one-to-one matching of proposals to ground-truth actors per image (scipy's Hungarian
  solver) on a cost of person probability, L1 of image-normalised boxes and GIoU.
- ``set_losses``: the set losses of each stage on its own matching (weighted CE with a down-weighted no-object
  class, L1 on image-normalised boxes, GIoU), on every stage (deep supervision); the last stage's matches feed
  the action loss (``Matches``).
- ``mean_over_ranks``: the ground-truth count averaged over DDP ranks, the official box-loss normaliser.
- ``action_targets`` / ``action_losses``: the action BCE of the context refinement decoder's layers on the
  proposals the last box stage matched.

The localiser itself (pyramid, stages, ``LocaliserOutput``) lives in ``models.query_localiser``. Boxes are
(x1, y1, x2, y2) pixels of the un-padded input image; image sizes are (height, width) rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import generalized_box_iou

from models.query_localiser import LocaliserOutput

Matches = list[tuple[Tensor, Tensor]]


class HungarianMatcher:
    """One-to-one assignment of proposals to ground-truth actors, per image (scipy's Hungarian solver).

    Cost = ``class_cost * (-p_person) + l1_cost * L1(xyxy / image size) + giou_cost * (-GIoU)``. An image without
    ground truth matches nothing. Returns per image (proposal indices, GT indices), int64, proposal-sorted.
    """

    def __init__(self, class_cost: float = 2.0, l1_cost: float = 5.0, giou_cost: float = 2.0):
        self.class_cost, self.l1_cost, self.giou_cost = class_cost, l1_cost, giou_cost

    def cost_matrix(self, logits: Tensor, boxes: Tensor, gt_boxes: Tensor, image_size: Tensor) -> Tensor:
        """(P, G) matching cost of one image: ``logits`` (P, 2), ``boxes`` (P, 4), ``gt_boxes`` (G, 4)."""
        whwh = image_size.flip(-1).repeat(2).to(boxes.dtype)
        person = logits.softmax(-1)[:, 0]
        l1 = torch.cdist(boxes / whwh, gt_boxes.to(boxes.dtype) / whwh, p=1)
        giou = generalized_box_iou(boxes, gt_boxes.to(boxes.dtype))
        return self.class_cost * -person[:, None] + self.l1_cost * l1 - self.giou_cost * giou

    @torch.no_grad()
    def __call__(
        self, logits: Tensor, boxes: Tensor, gt_boxes: Sequence[Tensor], image_sizes: Tensor
    ) -> Matches:
        matches = []
        for i, gt in enumerate(gt_boxes):
            if len(gt) == 0:
                empty = torch.zeros(0, dtype=torch.int64, device=logits.device)
                matches.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(logits[i].float(), boxes[i].float(), gt, image_sizes[i])
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            matches.append(
                (torch.as_tensor(rows, device=logits.device), torch.as_tensor(cols, device=logits.device))
            )
        return matches


def mean_over_ranks(value: Tensor) -> Tensor:
    """The mean of ``value`` over the ranks of the default process group (identity without one).

    Pass as ``set_losses(reduce_num_boxes=...)`` under DDP: the official code divides the box losses by the
    ground-truth count averaged over ranks.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        value = value.clone()
        torch.distributed.all_reduce(value)
        value = value / torch.distributed.get_world_size()
    return value


def set_losses(
    output: LocaliserOutput,
    gt_boxes: Sequence[Tensor],
    image_sizes: Tensor,
    matcher: HungarianMatcher,
    class_weight: float = 2.0,
    l1_weight: float = 5.0,
    giou_weight: float = 2.0,
    no_object_weight: float = 0.1,
    deep_supervision: bool = True,
    reduce_num_boxes: Callable[[Tensor], Tensor] | None = None,
) -> tuple[dict[str, Tensor], Matches]:
    """Weighted set losses of every stage (only the last without ``deep_supervision``) and the last matches.

    Each stage is matched on its own predictions. Per stage ``s`` the dict holds (already weighted; the
    localisation loss is the sum of the values):

    - ``stage{s}_class``: 2-way cross-entropy over all proposals, unmatched ones labelled no-object, averaged
      with the class weights (1 person, ``no_object_weight`` no-object) as ``F.cross_entropy(weight=...)`` does;
    - ``stage{s}_l1``: L1 of matched xyxy boxes divided by the image's (w, h, w, h), summed, / num_boxes;
    - ``stage{s}_giou``: sum of (1 - GIoU) of matched pairs / num_boxes.

    num_boxes = the batch's ground-truth count, passed through ``reduce_num_boxes`` (e.g. ``mean_over_ranks``),
    clamped to at least 1. ``gt_boxes`` holds (G_i, 4) xyxy pixel boxes per image. Also returns the last stage's
    matches (proposal indices, GT indices) per image, for the action loss.
    """
    device = output.logits[-1].device
    num_boxes = torch.tensor(float(sum(len(g) for g in gt_boxes)), device=device)
    if reduce_num_boxes is not None:
        num_boxes = reduce_num_boxes(num_boxes)
    num_boxes = num_boxes.clamp(min=1.0)
    class_weights = torch.tensor([1.0, no_object_weight], device=device)
    whwh = image_sizes.flip(-1).repeat(1, 2)  # (B, 4)
    stages = range(len(output.boxes)) if deep_supervision else [len(output.boxes) - 1]
    losses: dict[str, Tensor] = {}
    matches: Matches = []
    for s in stages:
        logits, boxes = output.logits[s], output.boxes[s]
        matches = matcher(logits, boxes, gt_boxes, image_sizes)
        image_index = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(matches)])
        proposal_index = torch.cat([src for src, _ in matches])
        labels = torch.ones(logits.shape[:2], dtype=torch.int64, device=device)  # 1 = no-object
        labels[image_index, proposal_index] = 0
        ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), weight=class_weights)
        scale = whwh[image_index].to(boxes.dtype)
        matched = boxes[image_index, proposal_index]
        target = torch.cat([g[tgt].to(boxes.dtype) for g, (_, tgt) in zip(gt_boxes, matches)])
        l1 = (matched / scale - target / scale).abs().sum() / num_boxes
        giou = (1 - torch.diag(generalized_box_iou(matched, target))).sum() / num_boxes
        losses[f"stage{s}_class"] = class_weight * ce
        losses[f"stage{s}_l1"] = l1_weight * l1
        losses[f"stage{s}_giou"] = giou_weight * giou
    return losses, matches


def action_targets(matches: Matches, labels: Sequence[Tensor], num_proposals: int) -> tuple[Tensor, Tensor]:
    """Action targets (B, P, C) and the matched mask (B, P) from the last box stage's matches.

    A matched proposal gets its ground-truth actor's multi-hot labels, every other proposal zeros; only the
    matched ones enter the action loss (as in the official code). ``labels`` holds (G_i, C) per image.
    """
    num_classes = labels[0].shape[-1]
    device = labels[0].device
    targets = torch.zeros(len(labels), num_proposals, num_classes, device=device)
    matched = torch.zeros(len(labels), num_proposals, dtype=torch.bool, device=device)
    for i, ((proposal, gt), image_labels) in enumerate(zip(matches, labels)):
        targets[i, proposal.to(device)] = image_labels[gt.to(device)].float()
        matched[i, proposal.to(device)] = True
    return targets, matched


def action_losses(
    logits: Sequence[Tensor], targets: Tensor, matched: Tensor, weight: float
) -> dict[str, Tensor]:
    """``weight`` x sigmoid BCE of each decoder layer's logits on the matched proposals, ``action{l}``.

    The BCE is the mean over matched proposals and classes (the default reduction of
    ``F.binary_cross_entropy_with_logits``, as the official code computes it). A batch without any match
    contributes a zero that keeps the graph whole.
    """
    losses = {}
    any_match = bool(matched.any())
    for layer, x in enumerate(logits):
        if any_match:
            bce = F.binary_cross_entropy_with_logits(x[matched].float(), targets.to(x.device)[matched])
        else:
            bce = x.float().sum() * 0.0
        losses[f"action{layer}"] = weight * bce
    return losses
