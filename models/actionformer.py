"""The ActionFormer temporal detection head, in the form AdaTAD trains it (OpenTAD's THUMOS14 configuration).

A snippet feature sequence ``(B, C, T)`` goes through

- a projection: ``arch[0]`` masked conv layers (conv - LayerNorm - ReLU), ``arch[1]`` transformer layers
  at stride 1 and ``arch[2]`` transformer layers that each halve the length, giving ``1 + arch[2]`` pyramid
  levels with strides ``1, 2, 4, ...``. The attention is ActionFormer's: depthwise convs (strided on the
  downsampling layers) before the q/k/v projections, key masking, optional local windows, a max-pooled skip;
- a LayerNorm per level (OpenTAD's ``FPNIdentity`` neck);
- shared classification and regression conv towers; per level a learned ``Scale`` then ReLU gives non-negative
  distances to the start and end, in units of the level stride.

Every point ``t * stride`` of level ``l`` is a candidate: ``ActionFormerHead.loss`` assigns it to a
ground-truth segment (``assign_targets``) and sums a sigmoid focal loss over valid points and a 1D DIoU loss
over positive points, both divided by a running average of the number of positives. Post-processing lives in
``models.tad_postprocess``.

All times here are head time steps: index ``t`` of the input sequence is time ``t``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Mlp, drop_path
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from models.layers import sinusoid_table

#: THUMOS14 regression range (in head steps) of each pyramid level; the last is open-ended.
THUMOS_REGRESSION_RANGES: tuple[tuple[float, float], ...] = (
    (0, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, 10000),
)  # fmt: skip


def _channels_last(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Apply a channels-last layer (LayerNorm, Linear, Mlp) to a (B, C, T) tensor."""
    return fn(x.transpose(1, 2)).transpose(1, 2)


class MaskedConvNorm(nn.Module):
    """Conv1d, zeroed on padded steps, LayerNorm over channels, ReLU, zeroed again (the conv has no bias)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = nn.LayerNorm(out_channels, eps=1e-6)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        keep = mask[:, None].to(x.dtype)
        x = _channels_last(self.norm, self.conv(x) * keep)
        return F.relu(x) * keep


class ConvAttention(nn.Module):
    """ActionFormer's masked multi-head conv attention (``MaskedMHCA`` / ``LocalMaskedMHCA``).

    Queries, keys and values each pass a depthwise conv (kernel 3, or ``stride + 1`` with the stride when
    downsampling) and a LayerNorm before their linear projection; padded keys are never attended to. With
    ``window_size > 1`` a query at step ``i`` sees only keys ``|i - j| <= window_size // 2`` (the banded
    pattern of the local variant, here as an attention mask); ``window_size <= 1`` is global attention.
    """

    def __init__(
        self, dim: int, num_heads: int, stride: int = 1, window_size: int = -1, proj_drop: float = 0.0
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.stride = stride
        self.window_size = window_size
        kernel = stride + 1 if stride > 1 else 3
        for name in ("query", "key", "value"):
            conv = nn.Conv1d(dim, dim, kernel, stride=stride, padding=kernel // 2, groups=dim, bias=False)
            setattr(self, f"{name}_conv", conv)
            setattr(self, f"{name}_norm", nn.LayerNorm(dim))
            setattr(self, name, nn.Linear(dim, dim))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _embed(self, name: str, x: Tensor, keep: Tensor) -> Tensor:
        y = getattr(self, f"{name}_conv")(x) * keep[:, None]  # (B, C, T')
        y = getattr(self, f"{name}_norm")(y.transpose(1, 2))
        return rearrange(getattr(self, name)(y), "b t (h d) -> b h t d", h=self.num_heads)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, T), (B, T) -> (B, C, T / stride), (B, T / stride)."""
        mask = mask[:, :: self.stride]  # the strided conv's output step i is centred on input step i * stride
        keep = mask.to(x.dtype)
        q, k, v = (self._embed(name, x, keep) for name in ("query", "key", "value"))
        allowed = mask[:, None, None, :]  # (B, 1, 1, T')
        if self.window_size > 1:
            steps = torch.arange(mask.shape[1], device=x.device)
            band = (steps[:, None] - steps[None, :]).abs() <= self.window_size // 2
            allowed = allowed & band
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        out = self.proj_drop(self.proj(rearrange(out, "b h t d -> b t (h d)")))
        return out.transpose(1, 2) * keep[:, None], mask


class ScaledDropPath(nn.Module):
    """Stochastic depth after a learnable per-channel scale from 1e-4 (ActionFormer's AffineDropPath)."""

    def __init__(self, dim: int, drop_prob: float, init_scale: float = 1e-4):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale = nn.Parameter(torch.full((dim, 1), init_scale))

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(self.scale * x, self.drop_prob, self.training)


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer on (B, C, T); ``stride`` 2 halves the length (max-pooled skip path)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        stride: int = 1,
        window_size: int = -1,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ConvAttention(dim, num_heads, stride, window_size, proj_drop)
        self.pool_skip = nn.MaxPool1d(stride + 1, stride, (stride + 1) // 2) if stride > 1 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim, act_layer=nn.GELU, drop=proj_drop)
        # ActionFormer attaches the per-channel scale only when stochastic depth is on
        self.drop_path_attn = ScaledDropPath(dim, drop_path) if drop_path > 0 else nn.Identity()
        self.drop_path_mlp = ScaledDropPath(dim, drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        y, mask = self.attn(_channels_last(self.norm1, x), mask)
        keep = mask[:, None].to(x.dtype)
        x = self.pool_skip(x) * keep + self.drop_path_attn(y)
        return x + self.drop_path_mlp(_channels_last(lambda t: self.mlp(self.norm2(t)), x) * keep), mask


@dataclass
class ActionFormerOutputs:
    """Per pyramid level: logits, distances, validity and the point grid of the padded sequence."""

    cls_logits: list[Tensor]  # (B, T_l, num_classes)
    reg_offsets: list[Tensor]  # (B, T_l, 2) distances to start and end, in units of the level stride, >= 0
    masks: list[Tensor]  # (B, T_l) bool, True on valid steps
    points: list[Tensor]  # (T_l,) point positions t * stride, in head steps
    strides: tuple[int, ...]

    def flat_points(self) -> tuple[Tensor, Tensor]:
        """Positions and strides of all points, levels concatenated: (P,), (P,)."""
        strides = [torch.full_like(p, s) for p, s in zip(self.points, self.strides)]
        return torch.cat(self.points), torch.cat(strides)

    def segments(self) -> Tensor:
        """Decoded segments ``(point - start * stride, point + end * stride)`` of all points: (B, P, 2)."""
        points, strides = self.flat_points()
        offsets = torch.cat(self.reg_offsets, dim=1) * strides[:, None]
        return torch.stack((points - offsets[..., 0], points + offsets[..., 1]), dim=-1)


@torch.no_grad()
def assign_targets(
    points: Tensor,
    strides: Tensor,
    regression_ranges: Tensor,
    gt_segments: Tensor,
    gt_labels: Tensor,
    num_classes: int,
    center_sample_radius: float = 1.5,
) -> tuple[Tensor, Tensor]:
    """ActionFormer's label assignment for one window.

    Point ``p`` (stride ``s``, range ``[lo, hi]``) is a candidate for a segment ``[a, b]`` when it lies
    strictly inside ``[max(a, c - r * s), min(b, c + r * s)]`` (``c`` the centre, ``r`` the radius) and its
    larger distance to the boundaries, ``max(p - a, b - p)``, is within ``[lo, hi]``. Among candidates the
    shortest segment wins; segments within 1e-3 of that length all set their class (ties on THUMOS), the first
    shortest is regressed.

    Returns class targets (P, num_classes) in {0, 1} and the assigned segment of each point (P, 2); the
    segment is meaningless on points without a class.
    """
    num_points = points.shape[0]
    if gt_segments.shape[0] == 0:
        return points.new_zeros(num_points, num_classes), points.new_zeros(num_points, 2)
    start, end = gt_segments[:, 0][None], gt_segments[:, 1][None]  # (1, N)
    p = points[:, None]  # (P, 1)
    centre, radius = (start + end) / 2, strides[:, None] * center_sample_radius
    left = p - torch.maximum(start, centre - radius)  # distances to the centre region, (P, N)
    right = torch.minimum(end, centre + radius) - p
    inside = torch.minimum(left, right) > 0
    reach = torch.maximum(p - start, end - p)  # (P, N)
    in_range = (reach >= regression_ranges[:, :1]) & (reach <= regression_ranges[:, 1:])
    lengths = (end - start).expand(num_points, -1).masked_fill(~(inside & in_range), math.inf)
    shortest, best = lengths.min(dim=1)
    chosen = (lengths <= shortest[:, None] + 1e-3) & lengths.isfinite()
    one_hot = F.one_hot(gt_labels.long(), num_classes).to(points.dtype)
    cls_targets = (chosen.to(points.dtype) @ one_hot).clamp_(max=1.0)
    return cls_targets, gt_segments[best]


def diou_loss_1d(pred: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """Distance-IoU loss of segments (N, 2) -> (N,): ``1 - IoU + (centre distance / enclosing length)^2``."""
    inter = (torch.minimum(pred[:, 1], target[:, 1]) - torch.maximum(pred[:, 0], target[:, 0])).clamp(min=0)
    union = (pred[:, 1] - pred[:, 0]) + (target[:, 1] - target[:, 0]) - inter
    enclosing = torch.maximum(pred[:, 1], target[:, 1]) - torch.minimum(pred[:, 0], target[:, 0])
    centre_gap = (pred.sum(dim=1) - target.sum(dim=1)) / 2
    return 1 - inter / union.clamp(min=eps) + centre_gap.square() / enclosing.clamp(min=eps).square()


class ActionFormerHead(nn.Module):
    """Projection, pyramid and ActionFormer head with its training losses (THUMOS14 defaults of AdaTAD).

    ``forward(features (B, in_channels, T), mask (B, T))`` pads the sequence to ``max_seq_len`` (or, if
    longer, to a multiple of the coarsest stride) and returns ``ActionFormerOutputs``.
    ``loss(outputs, gt_segments, gt_labels)`` takes per-window ground truth in head steps; a window may have
    none.

    ``mha_win_size <= 1`` is global attention (AdaTAD); ActionFormer on pre-extracted features uses 19.
    ``use_abs_pe`` adds a fixed sinusoid table scaled by ``1/sqrt(embed_dim)`` (AdaTAD on ActivityNet).
    ``mask_padded_input``: the features of padded steps (past a video's end) are zeroed before the projection,
    so the valid steps next to them see zeros through the first convolution; OpenTAD's ActionFormer never
    passes its mask to the backbone, and the padded steps' features (of repeated last frames) reach that
    convolution (``false``; both mask every layer's output).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        embed_dim: int = 512,
        num_heads: int = 4,
        max_seq_len: int = 768,
        arch: tuple[int, int, int] = (2, 2, 5),
        mha_win_size: int = -1,
        conv_kernel_size: int = 3,
        input_dropout: float = 0.0,
        proj_dropout: float = 0.0,
        drop_path: float = 0.1,
        use_abs_pe: bool = False,
        head_channels: int = 512,
        head_num_convs: int = 2,
        regression_ranges: Sequence[Sequence[float]] = THUMOS_REGRESSION_RANGES,
        center_sample_radius: float = 1.5,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        reg_loss_weight: float = 1.0,
        label_smoothing: float = 0.0,
        cls_prior_prob: float = 0.01,
        loss_normalizer: float = 100.0,
        loss_normalizer_momentum: float = 0.9,
        mask_padded_input: bool = True,
    ):
        super().__init__()
        self.mask_padded_input = mask_padded_input
        num_levels = 1 + arch[2]
        if len(regression_ranges) != num_levels:
            raise ValueError(
                f"arch {tuple(arch)} gives {num_levels} pyramid levels but regression_ranges has "
                f"{len(regression_ranges)} entries; give one (lo, hi) range per level"
            )
        self.strides = tuple(2**level for level in range(num_levels))
        if max_seq_len % self.strides[-1]:
            raise ValueError(
                f"max_seq_len {max_seq_len} must be a multiple of the coarsest stride {self.strides[-1]}"
            )
        self.num_classes = num_classes
        self.max_seq_len = max_seq_len
        self.use_abs_pe = use_abs_pe
        self.center_sample_radius = center_sample_radius
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.reg_loss_weight = reg_loss_weight
        self.label_smoothing = label_smoothing
        self.loss_normalizer_momentum = loss_normalizer_momentum
        self.register_buffer("regression_ranges", torch.tensor(regression_ranges, dtype=torch.float32), False)
        self.register_buffer("loss_normalizer", torch.tensor(float(loss_normalizer)))
        if use_abs_pe:
            pos = sinusoid_table(max_seq_len, embed_dim).T[None] / math.sqrt(embed_dim)  # (1, C, T)
            self.register_buffer("pos_embed", pos, persistent=False)

        self.input_dropout = nn.Dropout1d(input_dropout) if input_dropout > 0 else nn.Identity()
        self.embed = nn.ModuleList(
            MaskedConvNorm(in_channels if i == 0 else embed_dim, embed_dim, conv_kernel_size)
            for i in range(arch[0])
        )
        layer = dict(
            num_heads=num_heads, window_size=mha_win_size, proj_drop=proj_dropout, drop_path=drop_path
        )
        self.stem = nn.ModuleList(TransformerLayer(embed_dim, stride=1, **layer) for _ in range(arch[1]))
        self.branch = nn.ModuleList(TransformerLayer(embed_dim, stride=2, **layer) for _ in range(arch[2]))
        self.neck_norms = nn.ModuleList(nn.LayerNorm(embed_dim, eps=1e-6) for _ in range(num_levels))
        # ActionFormer starts the projection's biases at zero; the head's layers keep PyTorch's initialisation
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d)) and module.bias is not None:
                nn.init.zeros_(module.bias)

        tower = [embed_dim] + [head_channels] * head_num_convs
        self.cls_convs = nn.ModuleList(MaskedConvNorm(c_in, c_out) for c_in, c_out in zip(tower, tower[1:]))
        self.reg_convs = nn.ModuleList(MaskedConvNorm(c_in, c_out) for c_in, c_out in zip(tower, tower[1:]))
        self.cls_head = nn.Conv1d(head_channels, num_classes, 3, padding=1)
        self.reg_head = nn.Conv1d(head_channels, 2, 3, padding=1)
        self.reg_scales = nn.Parameter(torch.ones(num_levels))
        # every point starts at foreground probability cls_prior_prob, so the focal loss starts small
        nn.init.constant_(self.cls_head.bias, -math.log((1 - cls_prior_prob) / cls_prior_prob))

    def pad(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Zero-pad to ``max_seq_len``, or a longer sequence to the next multiple of the coarsest stride."""
        length, coarsest = features.shape[-1], self.strides[-1]
        target = self.max_seq_len if length <= self.max_seq_len else math.ceil(length / coarsest) * coarsest
        if target == length:
            return features, mask
        return F.pad(features, (0, target - length)), F.pad(mask, (0, target - length), value=False)

    def forward(self, features: Tensor, mask: Tensor) -> ActionFormerOutputs:
        """``features`` (B, in_channels, T), ``mask`` (B, T) bool with True on valid steps."""
        x, mask = self.pad(features, mask.bool())
        x = self.input_dropout(x * mask[:, None].to(x.dtype) if self.mask_padded_input else x)
        for conv in self.embed:
            x = conv(x, mask)
        if self.use_abs_pe:
            if self.training and x.shape[-1] > self.max_seq_len:
                raise ValueError(
                    f"training sequence of {x.shape[-1]} steps exceeds max_seq_len {self.max_seq_len}"
                )
            pos = self.pos_embed
            if x.shape[-1] > self.max_seq_len:
                pos = F.interpolate(pos, x.shape[-1], mode="linear", align_corners=False)
            x = x + pos[..., : x.shape[-1]] * mask[:, None].to(x.dtype)
        for layer in self.stem:
            x, mask = layer(x, mask)
        feats, masks = [x], [mask]
        for layer in self.branch:
            x, mask = layer(x, mask)
            feats.append(x)
            masks.append(mask)

        cls_logits, reg_offsets, points = [], [], []
        for level, (feat, mask) in enumerate(zip(feats, masks)):
            cls_feat = reg_feat = _channels_last(self.neck_norms[level], feat)
            for cls_conv, reg_conv in zip(self.cls_convs, self.reg_convs):
                cls_feat, reg_feat = cls_conv(cls_feat, mask), reg_conv(reg_feat, mask)
            cls_logits.append(self.cls_head(cls_feat).transpose(1, 2))
            reg_offsets.append(F.relu(self.reg_scales[level] * self.reg_head(reg_feat)).transpose(1, 2))
            steps = torch.arange(feat.shape[-1], device=feat.device, dtype=torch.float32)
            points.append(steps * self.strides[level])
        return ActionFormerOutputs(cls_logits, reg_offsets, masks, points, self.strides)

    def targets(
        self, outputs: ActionFormerOutputs, gt_segments: Sequence[Tensor], gt_labels: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Class targets (B, P, num_classes) and assigned segments (B, P, 2) of all points of a batch."""
        points, strides = outputs.flat_points()
        ranges = torch.cat([r.expand(len(p), 2) for r, p in zip(self.regression_ranges, outputs.points)])
        assigned = [
            assign_targets(
                points, strides, ranges, segs.to(points), labels.to(points.device), self.num_classes,
                self.center_sample_radius,
            )
            for segs, labels in zip(gt_segments, gt_labels)
        ]  # fmt: skip
        return torch.stack([a[0] for a in assigned]), torch.stack([a[1] for a in assigned])

    def loss(
        self,
        outputs: ActionFormerOutputs,
        gt_segments: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
        num_pos_reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Focal + DIoU losses; ``gt_segments[i]`` (n_i, 2) in head steps, ``gt_labels[i]`` (n_i,) classes.

        The divisor is a running average (updated in training mode only) of the positive count of each batch;
        pass ``num_pos_reduce`` (e.g. a mean over data-parallel ranks) to average that count across processes.
        ``reg_loss`` is already multiplied by ``reg_loss_weight``; ``loss`` is their sum.
        """
        cls_targets, seg_targets = self.targets(outputs, gt_segments, gt_labels)
        valid = torch.cat(outputs.masks, dim=1)  # (B, P)
        positive = (cls_targets.sum(dim=-1) > 0) & valid
        num_pos = positive.sum().float()
        if num_pos_reduce is not None:
            num_pos = num_pos_reduce(num_pos)
        num_pos = max(float(num_pos), 1.0)
        if self.training:
            momentum = self.loss_normalizer_momentum
            self.loss_normalizer.mul_(momentum).add_((1 - momentum) * num_pos)
            normalizer = float(self.loss_normalizer)
        else:
            normalizer = num_pos

        logits = torch.cat(outputs.cls_logits, dim=1)[valid].float()
        smoothing = self.label_smoothing
        target = cls_targets[valid] * (1 - smoothing) + smoothing / (self.num_classes + 1)
        cls_loss = sigmoid_focal_loss(logits, target, self.focal_alpha, self.focal_gamma, reduction="sum")
        # an empty selection still sums to a zero that keeps the regression branch in the graph
        pred = outputs.segments()[positive].float()
        reg_loss = diou_loss_1d(pred, seg_targets[positive]).sum() * (self.reg_loss_weight / normalizer)
        cls_loss = cls_loss / normalizer
        return {"cls_loss": cls_loss, "reg_loss": reg_loss, "loss": cls_loss + reg_loss}
