"""The shared video-ViT core: a joint space-time ViT in two flavours.

- ``VideoMAEViT``: VideoMAE's form (tubelet 2x16x16, fixed sinusoid positions resized to the input grid, q/v
  biases, mean pooling). EVAD and the block-drop TAD detector use it.
- ``InflatedViT``: an image ViT (DeiT) inflated to video: 2D patches per frame, a class token, DeiT's learned
  spatial positions added per frame plus a learnable time embedding. HaltingVT uses it.

Both run the same ``Block``s through one runner (``run_block`` / ``forward_blocks``): hooks by original block
index (a method acts inside a block through a ``BlockHook``, see ``models.layers``), taps, activation
checkpointing, micro-batches, packed variable-length tokens and recording for block drop's alignment. Every
stack takes ``drop_blocks`` / ``mlp_activation``: the layout of a block-drop-compressed model.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal

import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models import blockdrop
from models.blockdrop import MLPActivation
from models.layers import (
    Block,
    BlockHook,
    QKVBias,
    TubeletEmbed,
    drop_path_rates,
    resize_grid_positions,
    sinusoid_table,
    trunc_normal_init,
)

Size = Literal["tiny", "small", "base", "large"]

#: embed_dim, depth, num_heads of the standard sizes.
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


class _JointViT(nn.Module):
    """What both flavours share: tubelet embedding, a stack of joint space-time blocks, a final norm."""

    def __init__(
        self,
        size: Size | None,
        embed_dim: int | None,
        depth: int | None,
        num_heads: int | None,
        img_size: int,
        num_frames: int,
        patch_size: int,
        tubelet_size: int,
        in_chans: int,
        mlp_ratio: float,
        qkv_bias: QKVBias,
        drop_path_rate: float,
        norm_eps: float,
    ):
        super().__init__()
        default = VIT_SIZES[size or "base"]
        self.embed_dim = embed_dim = embed_dim or default[0]
        self.depth = depth = depth or default[1]
        self.num_heads = num_heads = num_heads or default[2]
        self.img_size = img_size
        self.num_frames = num_frames
        self.patch_embed = TubeletEmbed(patch_size, tubelet_size, in_chans, embed_dim)
        self.pretrain_grid = self.patch_embed.grid((num_frames, img_size, img_size))
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr, norm_eps)
            for dpr in drop_path_rates(drop_path_rate, depth)
        )
        #: The original index of each block of ``blocks``: 0..depth-1 until block drop removes some.
        self.block_ids = list(range(depth))
        #: The depth the stack was built with (its pretrained checkpoints'), whatever block drop removes later.
        self.original_depth = depth
        #: How ``run_block`` runs blocks (set by the model that owns the stack).
        self.activation_checkpointing = False
        self.micro_batch: int | None = None
        self._recording: dict[int, Tensor] | None = None

    def embed(self, video: Tensor) -> Tensor:
        """(B, C, T, H, W) -> (B, N, D) tokens with positions; N includes any class token."""
        raise NotImplementedError

    def compress(self, drop_blocks: Sequence[int] | None, mlp_activation: MLPActivation) -> None:
        """The layout of a block-drop-compressed stack: the blocks ``drop_blocks`` (original indices) removed, so
        that the remaining ones number 0..depth-k-1 as in its checkpoints, and ``mlp_activation`` in every MLP."""
        if drop_blocks:
            blockdrop.drop_blocks(self, drop_blocks)
        if mlp_activation != "gelu":
            blockdrop.set_mlp_activation(self, mlp_activation)

    @property
    def recomputing(self) -> bool:
        """Whether blocks run now are recomputed in the backward pass (activation checkpointing, training)."""
        return self.activation_checkpointing and self.training and torch.is_grad_enabled()

    def run_block(self, position: int, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        """Run ``blocks[position]`` on ``x`` (further arguments go to the block) the way this stack runs blocks.

        - ``activation_checkpointing``: recomputed in the backward pass instead of storing its activations
          (training with gradients only; a hook runs again on the same tokens and decides the same);
        - ``micro_batch``: on that many samples at a time, when nothing but ``x`` is given (a hook, a mask or
          packed tokens tie the samples together);
        - inside ``recording()``: its output (the first, if it returns several) is kept by original index.
        """
        block = self.blocks[position]

        def call(tokens: Tensor) -> Any:
            return block(tokens, *args, **kwargs)

        if self.recomputing:
            call = partial(checkpoint, call, use_reentrant=False)
        given = args or any(v is not None for v in kwargs.values())
        if self.micro_batch and not given and x.shape[0] > self.micro_batch:
            out = torch.cat([call(part) for part in x.split(self.micro_batch)])
        else:
            out = call(x)
        if self._recording is not None:
            self._recording[self.block_ids[position]] = out[0] if isinstance(out, tuple) else out
        return out

    def forward_blocks(
        self,
        x: Tensor,
        hooks: Mapping[int, BlockHook] | None = None,
        attn_mask: Tensor | None = None,
        taps: Collection[int] | Mapping[int, Callable[[Tensor], Any]] = (),
        after: Mapping[int, Callable[[Tensor], Tensor]] | None = None,
    ) -> tuple[Tensor, dict[int, Any]]:
        """Run every block through ``run_block``; ``hooks``, ``taps`` and ``after`` are keyed by original block
        index. ``hooks[i]`` acts inside block ``i``; ``after[i]`` runs on the whole batch after it (an adapter
        that mixes samples: not split into micro-batches, recomputed under activation checkpointing); the
        outputs of the ``taps`` blocks (after their ``after``) are returned ``{index: (B, N, D)}``, or, where
        ``taps`` maps an index to a function, what it makes of that output right after the block."""
        if len(self.block_ids) != len(self.blocks):
            raise RuntimeError(
                f"{type(self).__name__} has {len(self.blocks)} blocks but {len(self.block_ids)} block ids: remove "
                "blocks with models.blockdrop.drop_blocks, which keeps both"
            )
        out = {}
        for position, i in enumerate(self.block_ids):
            hook = hooks.get(i) if hooks else None
            x = self.run_block(position, x, attn_mask=attn_mask, hook=hook)
            if after and i in after:
                fn = after[i]
                if self.recomputing:
                    fn = partial(checkpoint, fn, use_reentrant=False)
                x = fn(x)
                if self._recording is not None:
                    self._recording[i] = x
            if i in taps:
                out[i] = taps[i](x) if isinstance(taps, Mapping) else x
        return x, out

    @contextmanager
    def recording(self) -> Iterator[dict[int, Tensor]]:
        """``with stack.recording() as outputs: model(x)`` leaves ``{original block index: its output}`` of the
        last forward inside the ``with`` (the block's output after anything ``forward_blocks`` runs after it; packed
        (M, D) rows on a packed path)."""
        previous, self._recording = self._recording, {}
        try:
            yield self._recording
        finally:
            self._recording = previous

    def forward_features(self, video: Tensor, hooks: Mapping[int, BlockHook] | None = None) -> Tensor:
        """Token features after the last block and the final norm, (B, N, D)."""
        x, _ = self.forward_blocks(self.embed(video), hooks)
        return self.norm(x)

    def token_grid(self, video_shape: tuple[int, ...]) -> tuple[int, int, int]:
        return self.patch_embed.grid(video_shape)


class VideoMAEViT(_JointViT):
    """VideoMAE ViT: joint space-time attention over tubelet tokens, no class token.

    ``use_mean_pooling`` (the fine-tuning default) skips the token-wise final norm and normalises the mean token
    with ``fc_norm``; otherwise ``norm`` applies to every token and the pooled feature is their mean.
    ``drop_blocks`` (original indices) and ``mlp_activation``: see ``compress``.
    """

    def __init__(
        self,
        size: Size | None = "base",
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        img_size: int = 224,
        num_frames: int = 16,
        patch_size: int = 16,
        tubelet_size: int = 2,
        in_chans: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: QKVBias = "qv",
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        use_mean_pooling: bool = True,
        drop_blocks: list[int] | None = None,
        mlp_activation: MLPActivation = "gelu",
    ):
        super().__init__(
            size, embed_dim, depth, num_heads, img_size, num_frames, patch_size, tubelet_size, in_chans,
            mlp_ratio, qkv_bias, drop_path_rate, norm_eps,
        )  # fmt: skip
        self.use_mean_pooling = use_mean_pooling
        self.norm = nn.Identity() if use_mean_pooling else nn.LayerNorm(self.embed_dim, eps=norm_eps)
        self.fc_norm = nn.LayerNorm(self.embed_dim, eps=norm_eps) if use_mean_pooling else None
        n = self.pretrain_grid[0] * self.pretrain_grid[1] * self.pretrain_grid[2]
        self.register_buffer("pos_table", sinusoid_table(n, self.embed_dim), persistent=False)
        self.apply(trunc_normal_init)
        self.compress(drop_blocks, mlp_activation)

    def position_embedding(self, grid: tuple[int, int, int]) -> Tensor:
        """(t*h*w, D) positions for a token grid, resized from the pre-training grid."""
        return resize_grid_positions(self.pos_table, self.pretrain_grid, grid)

    def embed(self, video: Tensor) -> Tensor:
        grid = self.token_grid(video.shape)
        x = self.patch_embed(video)
        return x + self.position_embedding(grid).to(x.dtype)

    def pool(self, tokens: Tensor) -> Tensor:
        """(B, N, D) -> (B, D) clip feature."""
        pooled = tokens.mean(dim=1)
        return self.fc_norm(pooled) if self.fc_norm is not None else pooled

    def forward(self, video: Tensor) -> Tensor:
        """(B, C, T, H, W) -> (B, D) pooled clip feature."""
        return self.pool(self.forward_features(video))


class InflatedViT(_JointViT):
    """DeiT inflated to video: per-frame 2D patches, class token, spatial positions + learnable time embedding.

    ``img_size`` and ``num_frames`` fix the sizes of the learned tables; other inputs resample them.
    ``tubelet_size`` > 1 embeds that many frames per token (DeiT's kernel is spread over them on load) and the
    time embedding then runs over tubelets. ``pos_init`` chooses the initial position/time tables when training
    from scratch: DeiT's small random positions and zero time, or fixed-frequency sinusoids (still learned).
    ``drop_blocks`` (original indices) and ``mlp_activation``: see ``compress``.
    """

    def __init__(
        self,
        size: Size | None = "small",
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        img_size: int = 224,
        num_frames: int = 8,
        patch_size: int = 16,
        in_chans: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: QKVBias = "qkv",
        drop_path_rate: float = 0.1,
        norm_eps: float = 1e-6,
        tubelet_size: int = 1,
        pos_init: Literal["trunc_normal", "sinusoid"] = "trunc_normal",
        drop_blocks: list[int] | None = None,
        mlp_activation: MLPActivation = "gelu",
    ):
        super().__init__(
            size, embed_dim, depth, num_heads, img_size, num_frames, patch_size, tubelet_size, in_chans,
            mlp_ratio, qkv_bias, drop_path_rate, norm_eps,
        )  # fmt: skip
        t, h, w = self.pretrain_grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + h * w, self.embed_dim))  # DeiT's, incl. class token
        self.time_embed = nn.Parameter(torch.zeros(1, t, self.embed_dim))
        self.norm = nn.LayerNorm(self.embed_dim, eps=norm_eps)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if pos_init == "sinusoid":
            # Spatial index in the first half of the channels, time in the second: order is visible from the
            # first step (the DeiT initialisation leaves time at zero, fine for fine-tuning, slow from scratch).
            half = self.embed_dim // 2
            with torch.no_grad():
                self.pos_embed[0, 1:, :half] = sinusoid_table(h * w, half)
                self.time_embed[0, :, half:] = sinusoid_table(t, self.embed_dim - half)
        elif pos_init == "trunc_normal":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            raise ValueError(f"pos_init must be 'trunc_normal' or 'sinusoid', got {pos_init!r}")
        self.apply(trunc_normal_init)
        self.compress(drop_blocks, mlp_activation)

    def position_embedding(self, grid: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
        """Class-token position (1, 1, D) and patch positions (1, t*h*w, D) for a token grid."""
        t, h, w = grid
        pos = self.pos_embed
        if (h, w) != self.pretrain_grid[1:]:
            pos = resample_abs_pos_embed(pos, (h, w), self.pretrain_grid[1:], num_prefix_tokens=1)
        time = self.time_embed
        if t != time.shape[1]:
            time = nn.functional.interpolate(time.transpose(1, 2), size=t, mode="linear").transpose(1, 2)
        patches = pos[:, None, 1:, :] + time[:, :, None, :]  # (1, t, h*w, D)
        return pos[:, :1], patches.flatten(1, 2)

    def embed(self, video: Tensor) -> Tensor:
        grid = self.token_grid(video.shape)
        x = self.patch_embed(video)  # (B, t*h*w, D)
        cls_pos, patch_pos = self.position_embedding(grid)
        cls = (self.cls_token + cls_pos).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x + patch_pos], dim=1)

    def pool(self, tokens: Tensor) -> Tensor:
        """(B, 1 + N, D) -> (B, D): the class token."""
        return tokens[:, 0]

    def forward(self, video: Tensor) -> Tensor:
        """(B, C, T, H, W) -> (B, D) class-token feature."""
        return self.pool(self.forward_features(video))
