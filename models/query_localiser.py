"""EVAD's actor localiser: a Sparse R-CNN head on a simple feature pyramid built from the keyframe tokens.

- ``SimpleFeaturePyramid``: four keyframe maps at stride 16 (tapped after blocks 2, 5, 8, 11 of ViT-B) are
  resized by nearest interpolation x4, x2, x1, x0.5 to strides 4/8/16/32 and fused by an FPN (lateral 1x1,
  output 3x3, top-down nearest x2 + sum). The official code also shrinks by nearest interpolation, not pooling.
- ``QueryLocaliser``: learned proposal boxes (whole image at start) and proposal features go through iterative
  stages of multi-level RoIAlign -> self-attention over proposals -> dynamic instance interaction -> FFN ->
  class logits (person / no-object softmax) and box deltas. Each stage's boxes are detached before the next.
- ``postprocess``: person score >= 0.7, or every proposal if none passes; no NMS.

Training (matching and set losses, on every stage) is in ``models.set_criterion``. Boxes are (x1, y1, x2, y2)
pixels of the un-padded input image; image sizes are (height, width) rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.roi_align import RoIAlignImpl, resolve_impl, roi_align_boxes, roi_align_rois

#: Upper bound of the predicted log-scale change of a box side (detectron2's default), so exp() cannot overflow.
DEFAULT_SCALE_CLAMP = math.log(100000.0 / 16)


class SimpleFeaturePyramid(nn.Module):
    """FPN over single-scale ViT maps: resize each tap to its own stride, then fuse top-down.

    ``forward(maps)`` takes ``len(scale_factors)`` maps (B, in_channels, h, w) at ``input_stride`` (the
    keyframe tokens of one tap each, ``(B, h*w, D) -> (B, D, h, w)``) and returns as many (B, out_channels, ., .)
    maps, finest first, at ``strides``. Convolutions are initialised as detectron2's FPN (Kaiming-uniform with
    a=1, zero bias).
    """

    def __init__(
        self,
        in_channels: int = 768,
        out_channels: int = 256,
        scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        input_stride: int = 16,
    ):
        super().__init__()
        self.scale_factors = tuple(float(s) for s in scale_factors)
        self.strides = tuple(round(input_stride / s) for s in self.scale_factors)
        if list(self.strides) != sorted(self.strides):
            raise ValueError(
                f"SimpleFeaturePyramid: scale_factors {self.scale_factors} must decrease (finest level first)"
            )
        self.lateral_convs = nn.ModuleList(nn.Conv2d(in_channels, out_channels, 1) for _ in scale_factors)
        self.output_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in scale_factors
        )
        for conv in [*self.lateral_convs, *self.output_convs]:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def forward(self, maps: Sequence[Tensor]) -> list[Tensor]:
        if len(maps) != len(self.scale_factors):
            raise ValueError(
                f"SimpleFeaturePyramid.forward: got {len(maps)} maps, expected one per scale factor "
                f"{self.scale_factors}; tap as many backbone blocks as there are pyramid levels"
            )
        resized = [
            x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="nearest")
            for x, s in zip(maps, self.scale_factors)
        ]
        top_down = self.lateral_convs[-1](resized[-1])
        outputs = [self.output_convs[-1](top_down)]
        for level in range(len(resized) - 2, -1, -1):
            lateral = self.lateral_convs[level](resized[level])
            # x2 nearest whenever the sizes are exact multiples (inputs padded to 32); also safe for odd sizes
            top_down = lateral + F.interpolate(top_down, size=lateral.shape[-2:], mode="nearest")
            outputs.insert(0, self.output_convs[level](top_down))
        return outputs


def decode_box_deltas(
    deltas: Tensor,
    boxes: Tensor,
    weights: Sequence[float] = (2.0, 2.0, 1.0, 1.0),
    scale_clamp: float = DEFAULT_SCALE_CLAMP,
) -> Tensor:
    """Apply (dx, dy, dw, dh) deltas (..., 4) to xyxy ``boxes`` (..., 4), detectron2's parametrisation.

    The deltas are divided by ``weights`` first; the centre moves by (dx * width, dy * height) and the sides are
    scaled by exp(dw), exp(dh), with dw, dh clamped at ``scale_clamp``.
    """
    boxes = boxes.to(deltas.dtype)
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    ctr_x = boxes[..., 0] + 0.5 * widths
    ctr_y = boxes[..., 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
    dw = (deltas[..., 2] / ww).clamp(max=scale_clamp)
    dh = (deltas[..., 3] / wh).clamp(max=scale_clamp)
    new_x, new_y = ctr_x + dx * widths, ctr_y + dy * heights
    half_w, half_h = 0.5 * widths * dw.exp(), 0.5 * heights * dh.exp()
    return torch.stack([new_x - half_w, new_y - half_h, new_x + half_w, new_y + half_h], dim=-1)


def assign_box_levels(
    boxes: Tensor,
    min_level: int = 2,
    max_level: int = 5,
    canonical_size: float = 224.0,
    canonical_level: int = 4,
) -> Tensor:
    """Pyramid level index (R,) (``level - min_level``) for xyxy ``boxes`` (R, 4), the FPN paper's rule.

    ``floor(canonical_level + log2(sqrt(area) / canonical_size + 1e-8))`` clamped to the levels, as detectron2's
    pooler computes it: a 224-pixel box pools from stride 16, a 112-pixel box from stride 8. Degenerate boxes
    (negative sides) count as area 0 and go to the finest level.
    """
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    levels = torch.floor(canonical_level + torch.log2(area.sqrt() / canonical_size + 1e-8))
    return levels.clamp(min=min_level, max=max_level).to(torch.int64) - min_level


def multilevel_roi_align(
    maps: Sequence[Tensor],
    boxes: Tensor,
    strides: Sequence[int],
    output_size: int = 7,
    sampling_ratio: int = 2,
    impl: RoIAlignImpl = "auto",
) -> Tensor:
    """RoIAlign (aligned, half-pixel) of each box on its own pyramid level: (B*P, C, out, out).

    ``maps`` finest first at ``strides`` (powers of two); ``boxes`` (B, P, 4) xyxy pixels. Rows follow the
    (image, proposal) order. Boxes are treated as constants: RoIAlign does not differentiate through them.
    ``impl`` as in ``models.roi_align.roi_align_boxes``.
    """
    b, p, _ = boxes.shape
    boxes = boxes.detach().to(maps[0].dtype)
    min_level = int(math.log2(strides[0]))
    levels = assign_box_levels(boxes.reshape(b * p, 4), min_level, min_level + len(strides) - 1).view(b, p)
    pooled = maps[0].new_zeros(b, p, maps[0].shape[1], output_size, output_size)
    for level, (feature, stride) in enumerate(zip(maps, strides)):
        on_level = levels == level
        if resolve_impl(impl, feature[:, None], p, output_size) == "torchvision":
            rows = torch.nonzero(on_level.flatten()).squeeze(1)
            if rows.numel():
                image_index = rows.div(p, rounding_mode="floor").to(boxes.dtype)
                rois = torch.cat([image_index[:, None], boxes.reshape(b * p, 4)[rows]], dim=1)
                out = roi_align_rois(feature, rois, output_size, 1.0 / stride, sampling_ratio, True)
                pooled = pooled.flatten(0, 1).index_put((rows,), out).view_as(pooled)
        elif bool(on_level.any()):  # every box on this map, the others' outputs masked to zero
            out = roi_align_boxes(
                feature[:, None], boxes, output_size, 1.0 / stride, sampling_ratio, True, impl
            )
            pooled = pooled + out[:, 0] * on_level[..., None, None, None].to(out.dtype)
    return pooled.flatten(0, 1)


class DynamicConv(nn.Module):
    """Sparse R-CNN's instance interaction: each proposal's feature generates two 1x1 kernels for its RoI.

    ``forward(proposals (R, C), rois (R, S, C))`` with S = resolution**2 RoI cells: the proposal feature is mapped
    to a (C, dim_dynamic) and a (dim_dynamic, C) matrix (row-major in the generator's output); the RoI features
    go through ``rois @ K1 -> LN -> ReLU -> @ K2 -> LN -> ReLU``, are flattened cell-major to (R, S*C) and
    projected to (R, C) -> LN -> ReLU.

    ``recompute`` (training only) stores just the inputs and recomputes the kernels and the interaction in the
    backward pass: the generated kernels, (R, 2*C*dim_dynamic), and the (R, S, C) intermediates are most of a
    stage's activations (about 50 of its 70 MB at ViT-B batch 2, 300 MB over 6 stages) for a few per cent of a
    training step's work.
    """

    def __init__(
        self, hidden_dim: int = 256, dim_dynamic: int = 64, resolution: int = 7, recompute: bool = False
    ):
        super().__init__()
        self.hidden_dim, self.dim_dynamic, self.recompute = hidden_dim, dim_dynamic, recompute
        self.dynamic_layer = nn.Linear(hidden_dim, 2 * hidden_dim * dim_dynamic)
        self.norm1 = nn.LayerNorm(dim_dynamic)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.out_layer = nn.Linear(hidden_dim * resolution**2, hidden_dim)
        self.norm3 = nn.LayerNorm(hidden_dim)

    def forward(self, proposals: Tensor, rois: Tensor) -> Tensor:
        if self.recompute and self.training and torch.is_grad_enabled():
            return checkpoint(self.interact, proposals, rois, use_reentrant=False)
        return self.interact(proposals, rois)

    def interact(self, proposals: Tensor, rois: Tensor) -> Tensor:
        c, d = self.hidden_dim, self.dim_dynamic
        params = self.dynamic_layer(proposals)  # (R, 2*C*d)
        kernel1 = params[:, : c * d].reshape(-1, c, d)
        kernel2 = params[:, c * d :].reshape(-1, d, c)
        x = F.relu(self.norm1(torch.bmm(rois, kernel1)))  # (R, S, d)
        x = F.relu(self.norm2(torch.bmm(x, kernel2)))  # (R, S, C)
        return F.relu(self.norm3(self.out_layer(x.flatten(1))))


def _linear_norm_relu(dim: int, num_layers: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_layers):
        layers += [nn.Linear(dim, dim, bias=False), nn.LayerNorm(dim), nn.ReLU()]
    return nn.Sequential(*layers)


class LocaliserStage(nn.Module):
    """One iterative stage: boxes (B, P, 4) + proposal features (B, P, C) -> logits, refined boxes, features.

    Post-norm residual blocks: self-attention over the image's proposals, dynamic interaction with the RoI
    features, FFN; then a class tower (Linear-LN-ReLU x ``num_class_layers``) -> 2 logits (person, no-object)
    and a box tower (x ``num_box_layers``) -> 4 deltas decoded against the stage's input boxes.
    """

    def __init__(
        self,
        hidden_dim: int,
        num_heads: int,
        dim_dynamic: int,
        dim_feedforward: int,
        pooler_resolution: int,
        sampling_ratio: int,
        strides: Sequence[int],
        num_class_layers: int,
        num_box_layers: int,
        box_weights: Sequence[float],
        roi_impl: RoIAlignImpl = "auto",
        recompute_dynamic: bool = True,
    ):
        super().__init__()
        self.strides, self.pooler_resolution, self.sampling_ratio = (
            tuple(strides),
            pooler_resolution,
            sampling_ratio,
        )
        self.roi_impl = roi_impl
        self.box_weights = tuple(box_weights)
        self.self_attn = nn.MultiheadAttention(hidden_dim, num_heads, batch_first=True)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.dynamic_conv = DynamicConv(hidden_dim, dim_dynamic, pooler_resolution, recompute_dynamic)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.linear1 = nn.Linear(hidden_dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, hidden_dim)
        self.norm3 = nn.LayerNorm(hidden_dim)
        self.class_tower = _linear_norm_relu(hidden_dim, num_class_layers)
        self.class_logits = nn.Linear(hidden_dim, 2)
        self.box_tower = _linear_norm_relu(hidden_dim, num_box_layers)
        self.box_deltas = nn.Linear(hidden_dim, 4)

    def forward(
        self, maps: Sequence[Tensor], boxes: Tensor, features: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        b, p, c = features.shape
        rois = multilevel_roi_align(
            maps, boxes, self.strides, self.pooler_resolution, self.sampling_ratio, self.roi_impl
        )
        rois = rearrange(rois, "r c h w -> r (h w) c")
        x = self.norm1(features + self.self_attn(features, features, features, need_weights=False)[0])
        x = x.reshape(b * p, c)
        x = self.norm2(x + self.dynamic_conv(x, rois))
        x = self.norm3(x + self.linear2(F.relu(self.linear1(x))))
        logits = self.class_logits(self.class_tower(x))
        deltas = self.box_deltas(self.box_tower(x))
        new_boxes = decode_box_deltas(deltas, boxes.reshape(b * p, 4), self.box_weights)
        return logits.reshape(b, p, 2), new_boxes.reshape(b, p, 4), x.reshape(b, p, c)


@dataclass
class LocaliserOutput:
    """Per-stage predictions, first stage first: ``boxes[s]`` (B, P, 4) xyxy pixels, ``logits[s]`` (B, P, 2)
    (person, no-object); ``features`` (B, P, C) are the last stage's proposal features."""

    boxes: list[Tensor]
    logits: list[Tensor]
    features: Tensor


class QueryLocaliser(nn.Module):
    """Sparse R-CNN head: ``num_proposals`` learned boxes and features refined by ``num_stages`` stages.

    ``forward(maps, image_sizes)`` takes the pyramid's maps (B, hidden_dim, ., .) at ``strides``, finest first,
    and ``image_sizes`` (B, 2) = (height, width) of each un-padded image in pixels. Proposal boxes are stored as
    image-normalised (cx, cy, w, h), initialised to the whole image; proposal features ~ N(0, 1). Every matrix of
    the stages is Xavier-uniform initialised, as the official head does. ``roi_impl`` chooses the RoIAlign
    implementation (``models.roi_align.resolve_impl``: the factorised form for CPU training).
    ``recompute_dynamic`` recomputes each stage's dynamic interaction in the backward pass (``DynamicConv``:
    its generated kernels are the largest fixed share of EVAD's activations, whatever the keep rate);
    ``activation_checkpointing`` recomputes whole stages (training only).
    """

    def __init__(
        self,
        num_proposals: int = 100,
        hidden_dim: int = 256,
        num_stages: int = 6,
        num_heads: int = 8,
        dim_dynamic: int = 64,
        dim_feedforward: int = 2048,
        pooler_resolution: int = 7,
        sampling_ratio: int = 2,
        strides: Sequence[int] = (4, 8, 16, 32),
        num_class_layers: int = 1,
        num_box_layers: int = 3,
        box_weights: Sequence[float] = (2.0, 2.0, 1.0, 1.0),
        roi_impl: RoIAlignImpl = "auto",
        recompute_dynamic: bool = True,
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        self.activation_checkpointing = activation_checkpointing
        first = strides[0]
        if first & (first - 1) or list(strides) != [first * 2**i for i in range(len(strides))]:
            raise ValueError(
                f"QueryLocaliser: strides {tuple(strides)} must be consecutive powers of two, e.g. (4, 8, 16, 32)"
            )
        self.hidden_dim, self.strides = hidden_dim, tuple(strides)
        self.proposal_boxes = nn.Parameter(torch.tensor([[0.5, 0.5, 1.0, 1.0]]).repeat(num_proposals, 1))
        self.proposal_features = nn.Parameter(torch.randn(num_proposals, hidden_dim))
        self.stages = nn.ModuleList(
            LocaliserStage(
                hidden_dim,
                num_heads,
                dim_dynamic,
                dim_feedforward,
                pooler_resolution,
                sampling_ratio,
                strides,
                num_class_layers,
                num_box_layers,
                box_weights,
                roi_impl,
                recompute_dynamic,
            )
            for _ in range(num_stages)
        )
        for param in self.stages.parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)

    def initial_boxes(self, image_sizes: Tensor) -> Tensor:
        """The learned proposals as xyxy pixels of each image: (B, P, 4)."""
        cx, cy, w, h = self.proposal_boxes.unbind(-1)
        unit = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)  # (P, 4)
        whwh = image_sizes.flip(-1).repeat(1, 2).to(unit.dtype)  # (B, 4) = (w, h, w, h)
        return unit[None] * whwh[:, None]

    def forward(self, maps: Sequence[Tensor], image_sizes: Tensor) -> LocaliserOutput:
        if len(maps) != len(self.strides) or any(m.shape[1] != self.hidden_dim for m in maps):
            raise ValueError(
                f"QueryLocaliser.forward: expected {len(self.strides)} maps with {self.hidden_dim} channels at "
                f"strides {self.strides}, got shapes {[tuple(m.shape) for m in maps]}; pass the "
                "SimpleFeaturePyramid outputs and set its out_channels to the localiser's hidden_dim"
            )
        batch = maps[0].shape[0]
        boxes = self.initial_boxes(image_sizes)
        features = self.proposal_features[None].expand(batch, -1, -1)
        all_boxes, all_logits = [], []
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for stage in self.stages:
            if recompute:
                logits, boxes, features = checkpoint(stage, maps, boxes, features, use_reentrant=False)
            else:
                logits, boxes, features = stage(maps, boxes, features)
            all_boxes.append(boxes)
            all_logits.append(logits)
            boxes = boxes.detach()
        return LocaliserOutput(all_boxes, all_logits, features)


@dataclass
class Detections:
    """Kept proposals of one image: ``boxes`` (K, 4) xyxy pixels clipped to the image, ``scores`` (K,) person
    probabilities, ``index`` (K,) their proposal indices (to gather the matching action scores)."""

    boxes: Tensor
    scores: Tensor
    index: Tensor


def postprocess(
    logits: Tensor, boxes: Tensor, image_sizes: Tensor, score_threshold: float = 0.7
) -> list[Detections]:
    """EVAD's inference rule on the last stage: keep proposals with person probability >= ``score_threshold``,
    all of them if none passes; no NMS. ``logits`` (B, P, 2), ``boxes`` (B, P, 4), ``image_sizes`` (B, 2).

    Boxes are clipped to [0, width] x [0, height] (the official code clips to width - 1, height - 1).
    """
    scores = logits.softmax(-1)[..., 0]
    detections = []
    for score, box, (height, width) in zip(scores, boxes, image_sizes.tolist()):
        keep = score >= score_threshold
        if not keep.any():
            keep = torch.ones_like(keep)
        index = torch.nonzero(keep).squeeze(1)
        clipped = torch.stack(
            [
                box[index, 0].clamp(0, width),
                box[index, 1].clamp(0, height),
                box[index, 2].clamp(0, width),
                box[index, 3].clamp(0, height),
            ],
            dim=-1,
        )
        detections.append(Detections(clipped, score[index], index))
    return detections
