"""Building blocks shared by every backbone: tubelet embedding, attention, transformer block, positions.

The names of parameters follow the VideoMAE / timm convention (``patch_embed.proj``, ``blocks.N.attn.qkv``,
``q_bias``/``v_bias``, ``mlp.fc1``) so that official checkpoints load with little or no remapping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath, Mlp
from torch import Tensor, nn

QKVBias = Literal["qv", "qkv", "none"]


class BlockHook(Protocol):
    """Something a method runs inside a block, after the attention residual and before the MLP.

    The hook returns the (possibly pruned or re-ordered) token sequence that the MLP and all later blocks see.
    What it receives as ``attn`` depends on what it asks for:

    - ``needs_attention = True``: the post-softmax attention map ``(B, heads, N, N)``, from an explicit softmax.
    - a ``query_weights`` method (see ``KeyImportanceHook``): the per-key importance ``(B, N)``, while the
      block output still comes from fused ``scaled_dot_product_attention``. Token pruning needs only this, and
      it costs far less memory and time than the map.
    - neither: ``None``; the block uses fused attention.
    """

    needs_attention: bool

    def __call__(self, x: Tensor, attn: Tensor | None) -> Tensor: ...


class KeyImportanceHook(BlockHook, Protocol):
    """A hook that asks for how much attention each key receives instead of the whole map.

    ``query_weights(x)`` is called with the block input ``x`` (B, N, C) and returns per-query weights ``w``
    (B, N), or ``None`` to ask for nothing this time (the hook then gets ``attn=None``). The hook then receives
    ``importance[b, j] = mean over heads h and all N queries i of w[b, i] * softmax_j(q_i . k_j * scale)`` (no
    renormalisation by the weights), computed by ``key_importance`` over chunks of ``importance_chunk`` queries
    (None: sized to a memory budget), without gradient. ``needs_attention`` must be False.
    """

    importance_chunk: int | None

    def query_weights(self, x: Tensor) -> Tensor | None: ...


def importance_chunk_elements(device: torch.device) -> int:
    """How many logits (B x heads x queries x keys) ``key_importance`` holds at once when not told. On the CPU,
    8 MiB of float32, so that the softmax and the weighted sum read a chunk back from cache: ViT-B's first
    pruning block (2 clips, 1568 tokens) scores 2.3x faster in 55-query chunks than in 256-query ones
    (38 MiB). Elsewhere (CUDA) 64 MiB, where fewer, larger kernels win."""
    return 1 << 21 if torch.device(device).type == "cpu" else 1 << 24


def key_importance(
    q: Tensor,
    k: Tensor,
    scale: float,
    query_weights: Tensor,
    attn_mask: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-key attention importance without the (B, heads, N, N) map: (B, N_keys).

    ``q`` (B, H, N, d), ``k`` (B, H, M, d), ``query_weights`` (B, N) or (N,), ``attn_mask`` boolean, broadcastable
    to (B, H, N, M), True where attention is allowed. Returns ``sum_h sum_i w_i softmax(q_i k^T scale)_j / (H N)``,
    the softmax taken over ``chunk_size`` query rows at a time, in float32 (ties in a top-k are then rare) and
    without gradient: the score only chooses tokens, it is not trained through. ``chunk_size=None`` takes as
    many rows as keep one chunk's logits within ``importance_chunk_elements(q.device)``.
    """
    b, h, n, _ = q.shape
    if chunk_size is None:
        chunk_size = max(1, importance_chunk_elements(q.device) // (b * h * k.shape[-2]))
    if chunk_size < 1:
        raise ValueError(
            f"the key importance chunk size must be a positive number of queries, got {chunk_size}"
        )
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        q = q.float() * scale
        # k is a strided view of the fused qkv projection: one contiguous copy, not one per chunk of queries
        keys_t = k.float().contiguous().transpose(-2, -1)  # (B, H, d, M)
        weights = query_weights.float().expand(b, n)
        total = q.new_zeros(b, 1, k.shape[-2])
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            logits = q[:, :, start:stop] @ keys_t  # (B, H, c, M)
            if attn_mask is not None:
                per_query = attn_mask.dim() >= 2 and attn_mask.shape[-2] > 1
                rows = attn_mask[..., start:stop, :] if per_query else attn_mask
                logits = logits.masked_fill(~rows, float("-inf"))
            # (B, 1, c) @ (B, c, M): the weighted sum over this chunk's queries, heads summed first
            total += weights[:, None, start:stop] @ logits.softmax(dim=-1).sum(dim=1)
        return total[:, 0] / (h * n)


class TubeletEmbed(nn.Module):
    """Non-overlapping ``tubelet_size x patch_size x patch_size`` patches -> tokens.

    ``tubelet_size=1`` is the 2D-patch-per-frame embedding of an inflated image ViT.
    """

    def __init__(self, patch_size: int = 16, tubelet_size: int = 2, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.tubelet_size = tubelet_size
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel)

    def grid(self, video_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """Token grid (t, h, w) for a video of shape (..., T, H, W)."""
        t, h, w = video_shape[-3:]
        if t % self.tubelet_size or h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"input of {t} frames at {h}x{w} is not divisible into {self.tubelet_size}x{self.patch_size}"
                f"x{self.patch_size} tubelets; change num_frames or the crop size"
            )
        return t // self.tubelet_size, h // self.patch_size, w // self.patch_size

    def forward(self, video: Tensor) -> Tensor:
        # (B, C, T, H, W) -> (B, t*h*w, D), time-major like VideoMAE
        return rearrange(self.proj(video), "b d t h w -> b (t h w) d")


class Attention(nn.Module):
    """Multi-head self-attention with fused SDPA, or an explicit softmax when the attention map is needed.

    ``qkv_bias``: ``"qv"`` is VideoMAE's learnable q and v biases with a zero k bias, ``"qkv"`` a plain biased
    Linear (DeiT / timm), ``"none"`` no bias. With ``query_weights`` the output still comes from fused SDPA and
    the second value returned is the per-key importance of ``key_importance`` instead of the map.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: QKVBias = "qv", attn_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias == "qkv")
        if qkv_bias == "qv":
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)

    def _qkv_bias(self) -> Tensor | None:
        if self.q_bias is None:
            return self.qkv.bias
        return torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])

    def project_qkv(self, x: Tensor) -> Tensor:
        """``x`` (..., N, C) -> the fused q, k, v projection (..., N, 3C). Always through the ``qkv`` module, never
        its weight, so that a wrapper on it (peft LoRA) takes part; VideoMAE's separate q/v biases are added
        afterwards."""
        qkv = self.qkv(x)
        return qkv + self._qkv_bias() if self.q_bias is not None else qkv

    def split_heads(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, N, 3C) -> q, k, v, each (B, heads, N, C / heads)."""
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        return q, k, v

    def project_out(self, out: Tensor) -> Tensor:
        """Per-head outputs (B, heads, N, d) -> (B, N, C) through the ``proj`` module."""
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        need_weights: bool = False,
        query_weights: Tensor | None = None,
        importance_chunk: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``x`` (B, N, C); ``attn_mask`` boolean, broadcastable to (B, heads, N, N), True where attention is allowed.

        Returns the output (B, N, C) and the attention map (B, heads, N, N) if ``need_weights``, the per-key
        importance (B, N) if ``query_weights`` (B, N) is given (``importance_chunk`` queries at a time), else None.
        """
        if need_weights and query_weights is not None:
            raise ValueError("ask Attention for either the attention map or the key importance, not both")
        q, k, v = self.split_heads(self.project_qkv(x))
        drop = self.attn_drop if self.training else 0.0
        if not need_weights:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)
            attn = None
            if query_weights is not None:
                attn = key_importance(q, k, self.scale, query_weights, attn_mask, importance_chunk)
        else:
            logits = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
            if attn_mask is not None:
                logits = logits.masked_fill(~attn_mask, float("-inf"))
            attn = logits.softmax(dim=-1)
            out = F.dropout(attn, drop) @ v
        return self.project_out(out), attn

    def forward_packed(self, x: Tensor, packed: Packed) -> Tensor:
        """Attention within each sample of packed tokens ``x`` (M, C) (see ``Packed``) -> (M, C). The projections
        see all M tokens at once."""
        qkv = self.project_qkv(x)
        drop = self.attn_drop if self.training else 0.0
        outs = []
        for part in qkv.split(packed.sizes):
            if part.shape[0] == 0:
                continue
            q, k, v = self.split_heads(part[None])
            outs.append(F.scaled_dot_product_attention(q, k, v, dropout_p=drop))
        return self.proj(torch.cat([rearrange(o, "1 h n d -> n (h d)") for o in outs]))


@dataclass
class Packed:
    """Variable-length token sets of several samples in one (M, C) tensor, sample after sample.

    ``lengths`` (B,) tokens per sample; ``owner`` (M,) each token's sample. Token-wise layers run on all M tokens
    at once, attention within each sample (``Attention.forward_packed``), stochastic depth per sample.
    """

    lengths: Tensor
    owner: Tensor

    @property
    def sizes(self) -> list[int]:
        return self.lengths.tolist()

    @property
    def samples(self) -> int:
        return len(self.lengths)


class Block(nn.Module):
    """Pre-norm transformer block with an optional hook between attention and MLP."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: QKVBias = "qv",
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        hook: BlockHook | None = None,
        packed: Packed | None = None,
    ) -> Tensor:
        """``x`` (B, N, C) -> (B, N', C) (N' < N when the hook prunes); with ``packed``, ``x`` is the (M, C)
        packed tokens of several samples (no hook, no mask)."""
        if packed is not None:
            if hook is not None or attn_mask is not None:
                raise ValueError("a block on packed tokens takes no hook and no attention mask")
            x = x + self._drop_packed(self.attn.forward_packed(self.norm1(x), packed), packed)
            return x + self._drop_packed(self.mlp(self.norm2(x)), packed)
        need = hook is not None and hook.needs_attention
        query_weights = getattr(hook, "query_weights", None)
        weights = query_weights(x) if query_weights is not None and not need else None
        if weights is None:
            y, attn = self.attn(self.norm1(x), attn_mask, need_weights=need)
        else:  # a KeyImportanceHook: fused attention plus the per-key importance
            y, attn = self.attn(
                self.norm1(x), attn_mask, query_weights=weights, importance_chunk=hook.importance_chunk
            )
        # Inference adds each residual in place, sparing a (B, N, C) allocation. The residual stream keeps its
        # dtype: under autocast the branches return bf16/fp16 while the stream stays fp32, so the first sum is
        # then a new stream tensor (never written into: the input may be held elsewhere) and the second goes into
        # it unless a hook may hold it.
        train = torch.is_grad_enabled() or self.training
        x = x + self.drop_path(y) if train or y.dtype != x.dtype else y.add_(x)
        if hook is not None:
            x = hook(x, attn)
        y = self.mlp(self.norm2(x))
        if train:
            return x + self.drop_path(y)
        if y.dtype == x.dtype:
            return y.add_(x)
        return x + y if hook is not None else x.add_(y)

    def _drop_packed(self, y: Tensor, packed: Packed) -> Tensor:
        """timm's per-sample ``DropPath`` on packed rows: one draw per sample, spread over its tokens, drawing the
        random numbers as ``DropPath`` does on the unpacked batch (so both forms drop the same samples)."""
        drop = self.drop_path
        if not (isinstance(drop, DropPath) and drop.training and drop.drop_prob > 0):
            return y
        keep = 1.0 - drop.drop_prob
        mask = y.new_empty(packed.samples, 1, 1).bernoulli_(keep)
        if keep > 0 and drop.scale_by_keep:
            mask.div_(keep)
        return y * mask.view(packed.samples, 1)[packed.owner]


def sinusoid_table(num_positions: int, dim: int) -> Tensor:
    """The 1D sinusoid table of "Attention is all you need" over a flattened token index, as VideoMAE uses it.

    Channel ``2i`` holds ``sin(p / 10000^(2i/dim))`` and channel ``2i+1`` the matching cosine.
    """
    position = torch.arange(num_positions, dtype=torch.float64)[:, None]
    exponent = 2 * (torch.arange(dim) // 2).to(torch.float64) / dim
    angles = position / torch.pow(10000.0, exponent)  # (N, dim)
    table = torch.empty_like(angles)
    table[:, 0::2] = torch.sin(angles[:, 0::2])
    table[:, 1::2] = torch.cos(angles[:, 1::2])
    return table.float()


def resize_grid_positions(
    table: Tensor, src_grid: tuple[int, int, int], dst_grid: tuple[int, int, int]
) -> Tensor:
    """Resize a (t*h*w, C) position table laid out on ``src_grid`` to ``dst_grid``.

    Space is resized per temporal slice with bicubic interpolation; time, if it differs, linearly.
    """
    if src_grid == dst_grid:
        return table
    t, h, w = src_grid
    grid = rearrange(table, "(t h w) c -> t c h w", t=t, h=h, w=w)
    if (h, w) != dst_grid[1:]:
        grid = F.interpolate(grid, size=dst_grid[1:], mode="bicubic", align_corners=False)
    if t != dst_grid[0]:
        grid = rearrange(grid, "t c h w -> (h w) c t")
        grid = F.interpolate(grid, size=dst_grid[0], mode="linear", align_corners=False)
        grid = rearrange(grid, "(h w) c t -> t c h w", h=dst_grid[1])
    return rearrange(grid, "t c h w -> (t h w) c")


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Stochastic depth rising linearly from 0 to ``rate`` over the blocks."""
    return [rate * i / max(depth - 1, 1) for i in range(depth)]


def trunc_normal_init(module: nn.Module) -> None:
    """ViT initialisation: truncated-normal Linear weights (std .02), unit LayerNorms, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv3d):
        fan_in = math.prod(module.weight.shape[1:])
        nn.init.trunc_normal_(module.weight, std=math.sqrt(1.0 / fan_in))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
