"""EVAD's classification branch: the context refinement decoder (CRD).

The backbone's last tokens (only those keyframe-centric token pruning kept) are projected to the decoder width and
put back on the t x h x w grid, a learned mask token filling the dropped positions, with fixed sinusoid positions
added. Each final-stage person box, extended to take in some surroundings, is pooled from that dense map on every
temporal slice (2D RoIAlign, max over the 7x7 bins, mean over the slices) into one actor token. A stack of
pre-norm transformer layers then lets the actor tokens attend to the kept context tokens and to each other; after
every layer a head scores the actors' actions, so every layer can be supervised.

Which tokens go where (as in the official code):

- the dense map, mask tokens included, is used only for pooling the actor tokens;
- the decoder's context is the kept tokens alone (keyframe included), each with the position of its place on the
  grid; the mask tokens never enter the decoder;
- actor tokens get no position of their own: they are pooled from a map that already carries positions.

The context tokens are in ascending order of their grid position (the official code puts the keyframe tokens
first); attention without relative terms does not depend on the order, so the outputs are the same.

Two sub-pixel conventions of the official (detectron2) box code are not kept: the box size there counts one more
pixel (``x2 - x1 + 1``), and clipping stops at ``W - 1``/``H - 1``. Here boxes are continuous coordinates, as
``torchvision.ops.roi_align(aligned=True)`` reads them: the size is ``x2 - x1`` and the image spans [0, W].

Initialisation follows the official code: Xavier-uniform Linear weights, zero biases, unit LayerNorms, and a
Xavier-uniform mask token (bound sqrt(3 / embed_dim)): the official head draws it truncated normal (std 0.02),
then its ``_reset_parameters`` redraws every parameter of more than one dimension, the (1, 1, C) token included.
The parameter names (``encoder_to_decoder``, ``mask_token``, ``blocks.N.*``) are those of the VideoMAE MAE
decoder, whose width matches (384 for ViT-B, 512 for ViT-L), so its weights can initialise this decoder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.layers import Block, drop_path_rates, resize_grid_positions, sinusoid_table, trunc_normal_init
from models.roi_align import RoIAlignImpl, roi_align_max

Grid = tuple[int, int, int]


def _image_sizes(image_sizes: Tensor | Sequence[int], boxes: Tensor) -> Tensor:
    """(B, 1, 2) heights and widths from a (B, 2) tensor or one (height, width) pair for the whole batch."""
    sizes = torch.as_tensor(image_sizes, dtype=boxes.dtype, device=boxes.device)
    if sizes.shape == (2,):
        sizes = sizes.expand(boxes.shape[0], 2)
    if sizes.shape != (boxes.shape[0], 2):
        raise ValueError(
            f"image_sizes must be one (height, width) pair or one per sample, shape ({boxes.shape[0]}, 2), "
            f"got shape {tuple(sizes.shape)}"
        )
    return sizes[:, None]


def _check_boxes(boxes: Tensor) -> None:
    if boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ValueError(
            f"boxes must be (batch, proposals, 4) as x1, y1, x2, y2 in input pixels, got shape {tuple(boxes.shape)}"
        )


def extend_boxes(
    boxes: Tensor, image_sizes: Tensor | Sequence[int], extend: tuple[float, float] = (0.4, 0.2)
) -> Tensor:
    """Enlarge each box to take in the actor's surroundings, then clip it to its image.

    ``boxes`` (B, P, 4) are x1, y1, x2, y2 in input pixels; ``image_sizes`` is (B, 2) heights and widths of the
    samples before any batch padding, or one (height, width) pair for all. The width grows by ``extend[0]`` and
    the height by ``extend[1]`` of the box size in total, half on each side: EVAD's (0.4, 0.2) adds 20% of the
    width left and right and 10% of the height above and below. (0, 0) only clips (the keep-rate 1.0 setting).
    """
    _check_boxes(boxes)
    sizes = _image_sizes(image_sizes, boxes)
    x1, y1, x2, y2 = boxes.unbind(-1)
    pad_x = extend[0] * (x2 - x1) / 2
    pad_y = extend[1] * (y2 - y1) / 2
    extended = torch.stack([x1 - pad_x, y1 - pad_y, x2 + pad_x, y2 + pad_y], dim=-1)
    upper = sizes.flip(-1).repeat(1, 1, 2)  # (B, 1, 4): W, H, W, H
    return torch.minimum(extended.clamp(min=0), upper)


def pool_actor_tokens(
    feature_map: Tensor,
    boxes: Tensor,
    spatial_scale: float = 1 / 16,
    output_size: int = 7,
    sampling_ratio: int = 2,
    impl: RoIAlignImpl = "auto",
) -> Tensor:
    """EVAD's "3D RoIAlign": one token (B, P, C) per box from a (B, C, t, h, w) map.

    The same box is pooled from every temporal slice with 2D RoIAlign (``output_size`` x ``output_size`` bins,
    ``aligned=True``, ``sampling_ratio`` samples per bin side, as detectron2's ROIAlignV2 in the official code);
    each slice's bins are reduced by their maximum, then the slices by their mean. ``boxes`` (B, P, 4) are
    x1, y1, x2, y2 in input pixels; ``spatial_scale`` maps them onto the map (1 / patch size). ``impl`` as in
    ``models.roi_align.roi_align_max`` (which computes without autograd on the CPU in groups of boxes).
    """
    _check_boxes(boxes)
    slices = rearrange(feature_map, "b c t h w -> b t c h w")
    pooled = roi_align_max(slices, boxes, output_size, spatial_scale, sampling_ratio, True, impl)  # (B, t, P, C)
    return pooled.mean(dim=1)  # temporal mean


class ActionHead(nn.Sequential):
    """One layer's action classifier for the actor tokens: Linear (no bias) -> LayerNorm -> ReLU -> Linear.

    Returns logits; the action labels are multi-label, so the sigmoid belongs to the loss and to inference.
    """

    def __init__(self, dim: int, hidden_dim: int, num_classes: int):
        super().__init__(
            nn.Linear(dim, hidden_dim, bias=False),
            nn.LayerNorm(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, num_classes),
        )


class ContextRefinementDecoder(nn.Module):
    """EVAD's context refinement decoder: from pruned backbone tokens and person boxes to per-layer action logits.

    Defaults are ViT-B's (``encoder_dim`` 768 -> ``embed_dim`` 384, 6 layers, 6 heads); ViT-L's decoder is
    ``encoder_dim`` 1024, ``embed_dim`` 512, ``depth`` 12, ``num_heads`` 8. ``drop_path_rate`` rises linearly
    over the layers to 0.1. ``box_extension`` is (0.4, 0.2) with token pruning and (0, 0) at keep rate 1.0.
    ``patch_size`` is the backbone's spatial stride (boxes in pixels -> map cells); ``roi_size`` and
    ``sampling_ratio`` are the RoIAlign bins and samples per bin side, ``roi_impl`` its implementation
    (``models.roi_align.resolve_impl``: the factorised form for CPU training). ``pretrain_grid`` is the (t, h, w) grid of
    the sinusoid position table, resized to other grids the way the backbone resizes its own.
    ``norm`` is the LayerNorm on the encoder tokens: the final norm of the VideoMAE encoder, which the backbone
    leaves out when its tokens feed this decoder. ``activation_checkpointing`` recomputes each layer in the
    backward pass instead of storing its activations (training only).
    """

    def __init__(
        self,
        num_classes: int = 80,
        encoder_dim: int = 768,
        embed_dim: int = 384,
        depth: int = 6,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        head_hidden_dim: int = 2048,
        box_extension: tuple[float, float] = (0.4, 0.2),
        patch_size: int = 16,
        roi_size: int = 7,
        sampling_ratio: int = 2,
        pretrain_grid: Grid = (8, 14, 14),
        norm_eps: float = 1e-6,
        activation_checkpointing: bool = False,
        roi_impl: RoIAlignImpl = "auto",
    ):
        super().__init__()
        if len(box_extension) != 2 or min(box_extension) < 0:
            raise ValueError(
                f"box_extension must be two non-negative fractions (width, height), got {box_extension}"
            )
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.box_extension = (float(box_extension[0]), float(box_extension[1]))
        self.patch_size = patch_size
        self.roi_size = roi_size
        self.sampling_ratio = sampling_ratio
        self.roi_impl = roi_impl
        self.pretrain_grid = tuple(pretrain_grid)
        self.activation_checkpointing = activation_checkpointing

        self.norm = nn.LayerNorm(encoder_dim, eps=norm_eps)
        self.encoder_to_decoder = nn.Linear(encoder_dim, embed_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer(
            "pos_table", sinusoid_table(math.prod(self.pretrain_grid), embed_dim), persistent=False
        )
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, "qv", rate, norm_eps)
            for rate in drop_path_rates(drop_path_rate, depth)
        )
        self.heads = nn.ModuleList(ActionHead(embed_dim, head_hidden_dim, num_classes) for _ in range(depth))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation (see the module docstring)."""
        self.apply(trunc_normal_init)  # unit LayerNorms and zero biases
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
        nn.init.xavier_uniform_(self.mask_token)

    def position_embedding(self, grid: Grid) -> Tensor:
        """(t*h*w, embed_dim) fixed positions for a token grid, resized from ``pretrain_grid``."""
        return resize_grid_positions(self.pos_table, self.pretrain_grid, tuple(grid))

    def densify(self, tokens: Tensor, grid: Grid, kept: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Project the encoder tokens and put them back on the grid.

        ``tokens`` (B, n, encoder_dim) are the backbone's output tokens, at the original positions ``kept``
        (B, n), ascending, as the pruning hooks record them; ``kept=None`` means no pruning (n = t*h*w).
        Returns the dense map (B, t*h*w, embed_dim), the mask token at dropped positions, and the context
        (B, n, embed_dim), the kept tokens alone; both with positions added.
        """
        b, n, _ = tokens.shape
        num_positions = math.prod(grid)
        if kept is None and n != num_positions:
            raise ValueError(
                f"got {n} encoder tokens but the grid {tuple(grid)} has {num_positions} positions: pass the "
                "pruning hooks' kept positions (B, n) along with pruned tokens"
            )
        if kept is not None and kept.shape != (b, n):
            raise ValueError(
                f"kept must hold the original position of each of the {b}x{n} encoder tokens, got shape "
                f"{tuple(kept.shape)}: pass the kept positions of the last pruning block"
            )
        x = self.encoder_to_decoder(self.norm(tokens))  # (B, n, dim)
        positions = self.position_embedding(grid).to(x.dtype)  # (t*h*w, dim)
        if kept is None:
            dense = x + positions
            return dense, dense
        index = kept[..., None].expand(-1, -1, x.shape[-1])  # (B, n, dim)
        mask = self.mask_token.to(x.dtype).expand(b, num_positions, -1)
        dense = mask.scatter(1, index, x) + positions
        context = x + positions[kept]
        return dense, context

    def _run_block(self, block: Block, x: Tensor) -> Tensor:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward(
        self,
        tokens: Tensor,
        boxes: Tensor,
        image_sizes: Tensor | Sequence[int],
        grid: Grid,
        kept: Tensor | None = None,
    ) -> list[Tensor]:
        """Action logits (B, P, num_classes) of every layer, the last one the prediction.

        ``tokens`` (B, n, encoder_dim) and ``kept`` (B, n) as in ``densify``, ``grid`` the backbone's (t, h, w)
        token grid; ``boxes`` (B, P, 4) the final-stage person boxes, x1, y1, x2, y2 in input pixels, and
        ``image_sizes`` the samples' (height, width) before padding (see ``extend_boxes``). The boxes are
        detached: the action loss does not move the localiser's boxes.
        """
        _check_boxes(boxes)
        if boxes.shape[0] != tokens.shape[0]:
            raise ValueError(f"got boxes for {boxes.shape[0]} samples but tokens for {tokens.shape[0]}")
        t, h, w = grid
        dense, context = self.densify(tokens, grid, kept)
        feature_map = rearrange(dense, "b (t h w) c -> b c t h w", t=t, h=h, w=w)
        rois = extend_boxes(boxes.detach(), image_sizes, self.box_extension)
        actors = pool_actor_tokens(
            feature_map, rois, 1 / self.patch_size, self.roi_size, self.sampling_ratio, self.roi_impl
        )
        num_actors = actors.shape[1]
        x = torch.cat([context, actors.to(context.dtype)], dim=1)  # (B, n + P, dim)
        logits = []
        for block, head in zip(self.blocks, self.heads):
            x = self._run_block(block, x)
            logits.append(head(x[:, x.shape[1] - num_actors :]))
        return logits
