"""The TAD detector's backbone: VideoMAE run on 16-frame chunks of a long window, pooled to a 1D sequence.

AdaTAD (Liu et al., CVPR 2024) feeds a whole window (768 frames on THUMOS) to VideoMAE as consecutive
16-frame chunks, averages each chunk's tokens over space, concatenates the chunks in time (one feature per
tubelet: 384) and linearly interpolates the sequence to the head's length. No final norm is applied:
VideoMAE's mean-pooling variant has an identity ``norm``, and ``fc_norm`` belongs to clip classification.

How the ViT is fine-tuned (``finetune``):

- ``"adapter"`` (AdaTAD): the ViT is frozen, norms included; a temporal-informative adapter (TIA) after each
  block's MLP is the only trainable part.
- ``"lora"`` (the block-drop baseline): LoRA on every block's ``attn.qkv`` and ``attn.proj``, plus the
  LayerNorms and the patch embedding.
- ``"full"``: every ViT weight; ``"frozen"``: none.

Each adapter is a child of its block (``vit.blocks[i].adapter``, AdaTAD's checkpoint layout), so
``vit.blocks`` stays the one list of blocks: deleting ``vit.blocks[i]`` deletes its adapter with it. The ViT's
own ``forward`` does not run adapters; this module runs them through the ViT's block runner (``forward_blocks``
with ``after``), which also gives the micro-batches and activation checkpointing.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import Tensor, nn

from models.checkpoint import LoadReport, load_pretrained
from models.lora import LoraInit, add_lora
from models.vit import VideoMAEViT

FineTune = Literal["frozen", "full", "lora", "adapter"]


class TemporalInformativeAdapter(nn.Module):
    """AdaTAD's TIA: a bottleneck whose hidden features also mix over time with a depthwise convolution.

    down-projection -> GELU -> (+ pointwise(depthwise temporal conv)) -> up-projection, scaled by ``gamma``
    and added to the block output. The up-projection starts at zero, so a new adapter is the identity. The
    temporal convolution runs along the whole window, across chunk borders, at each spatial position.
    """

    def __init__(self, dim: int, ratio: float = 0.25, kernel_size: int = 3):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"adapter_kernel must be odd to keep the sequence length, got {kernel_size}")
        hidden = int(dim * ratio)
        self.down_proj = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.dwconv = nn.Conv1d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden)
        self.conv = nn.Conv1d(hidden, hidden, 1)
        self.up_proj = nn.Linear(hidden, dim)
        self.gamma = nn.Parameter(torch.ones(1))
        nn.init.trunc_normal_(self.down_proj.weight, std=0.02)
        nn.init.zeros_(self.down_proj.bias)
        nn.init.normal_(self.dwconv.weight, std=math.sqrt(2.0 / kernel_size))
        nn.init.zeros_(self.dwconv.bias)
        nn.init.normal_(self.conv.weight, std=math.sqrt(2.0 / hidden))
        nn.init.zeros_(self.conv.bias)
        nn.init.zeros_(self.up_proj.weight)
        nn.init.zeros_(self.up_proj.bias)

    def forward(self, x: Tensor, num_chunks: int, grid: tuple[int, int, int]) -> Tensor:
        """``x`` (B*num_chunks, t*h*w, D): the chunks of each video consecutive, in time order."""
        t, h, w = grid
        y = self.act(self.down_proj(x))
        z = rearrange(y, "(b n) (t h w) c -> (b h w) c (n t)", n=num_chunks, t=t, h=h, w=w)
        z = self.conv(self.dwconv(z))
        z = rearrange(z, "(b h w) c (n t) -> (b n) (t h w) c", n=num_chunks, h=h, w=w)
        return x + self.gamma * self.up_proj(y + z)


class ChunkedVideoBackbone(nn.Module):
    """VideoMAE over a long window in ``chunk_frames``-frame chunks -> (B, D, head_length) features.

    ``head_length``: the length the features are linearly interpolated to (AdaTAD: the window's frame count),
    or None to keep one feature per tubelet. ``lora_rank`` defaults to embed dim / 4 and ``lora_alpha`` to the
    rank; ``lora_init`` draws A as the block-drop code (``official``) or as peft (``models.lora``).
    ``adapter_blocks``: the blocks that get an adapter (None: all, as AdaTAD on THUMOS).
    ``chunk_batch`` runs each block on that many chunks at a time (adapters, which mix chunks, still see the
    whole window), bounding the transient memory of attention and MLP. ``activation_checkpointing``
    recomputes each block and adapter in the backward pass instead of storing its activations.
    ``load_pretrained`` fills ``vit`` from a checkpoint, the LoRA factors and adapters keeping their initial
    values (a block-drop-compressed ``vit``, built with ``drop_blocks``, takes its kept blocks from it).
    """

    def __init__(
        self,
        vit: VideoMAEViT,
        chunk_frames: int = 16,
        head_length: int | None = 768,
        finetune: FineTune = "adapter",
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        lora_init: LoraInit = "official",
        adapter_ratio: float = 0.25,
        adapter_kernel: int = 3,
        adapter_blocks: list[int] | None = None,
        activation_checkpointing: bool = False,
        chunk_batch: int | None = None,
    ):
        super().__init__()
        if finetune not in ("frozen", "full", "lora", "adapter"):
            raise ValueError(f"finetune must be 'frozen', 'full', 'lora' or 'adapter', got {finetune!r}")
        tubelet = vit.patch_embed.tubelet_size
        if chunk_frames % tubelet:
            raise ValueError(f"chunk_frames={chunk_frames} is not a multiple of the tubelet size {tubelet}")
        if chunk_batch is not None and chunk_batch < 1:
            raise ValueError(f"chunk_batch must be a positive number of chunks or None, got {chunk_batch}")
        self.vit = vit
        self.embed_dim = vit.embed_dim
        self.chunk_frames = chunk_frames
        self.head_length = head_length
        self.finetune = finetune
        vit.activation_checkpointing = activation_checkpointing
        vit.micro_batch = chunk_batch

        vit.requires_grad_(finetune == "full")
        if vit.fc_norm is not None:
            vit.fc_norm.requires_grad_(False)  # clip-level pooling, not on this path
        if finetune == "lora":
            add_lora(vit, rank=lora_rank or vit.embed_dim // 4, alpha=lora_alpha, init=lora_init)
            vit.patch_embed.requires_grad_(True)
            for module in [*vit.blocks.modules(), vit.norm]:
                if isinstance(module, nn.LayerNorm):
                    module.requires_grad_(True)
        elif finetune == "adapter":
            for i in range(len(vit.blocks)) if adapter_blocks is None else adapter_blocks:
                adapter = TemporalInformativeAdapter(vit.embed_dim, adapter_ratio, adapter_kernel)
                vit.blocks[i].add_module("adapter", adapter)

    def load_pretrained(self, path: str, **options: Any) -> LoadReport:
        """Load a checkpoint of the ViT (``models.checkpoint.load_pretrained``, ``options`` passed on) into
        ``vit``; the LoRA factors and adapters, which no checkpoint of it holds, keep their values."""
        adapters = [k for k in self.vit.state_dict() if ".adapter." in k]
        return load_pretrained(self.vit, path, added=adapters, **options)

    @property
    def adapters(self) -> dict[int, TemporalInformativeAdapter]:
        """The adapters by the position of their block in ``vit.blocks``."""
        return {i: b.adapter for i, b in enumerate(self.vit.blocks) if hasattr(b, "adapter")}

    @property
    def activation_checkpointing(self) -> bool:
        return self.vit.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, value: bool) -> None:
        self.vit.activation_checkpointing = value

    @property
    def chunk_batch(self) -> int | None:
        return self.vit.micro_batch

    @chunk_batch.setter
    def chunk_batch(self, value: int | None) -> None:
        self.vit.micro_batch = value

    def forward_tokens(self, video: Tensor) -> tuple[Tensor, int, tuple[int, int, int]]:
        """(B, 3, T, H, W) -> tokens (B*n, t*h*w, D) after all blocks, the n = T / chunk_frames chunks of
        each video consecutive, and the per-chunk token grid (t, h, w)."""
        frames = video.shape[2]
        if frames % self.chunk_frames:
            raise ValueError(
                f"a window of {frames} frames does not split into {self.chunk_frames}-frame chunks; make "
                f"the window length a multiple of chunk_frames"
            )
        n = frames // self.chunk_frames
        chunks = rearrange(video, "b c (n t) h w -> (b n) c t h w", n=n)
        grid = self.vit.token_grid(chunks.shape)
        micro = self.chunk_batch
        x = (
            torch.cat([self.vit.embed(part) for part in chunks.split(micro)])
            if micro
            else self.vit.embed(chunks)
        )
        ids = self.vit.block_ids
        after = {ids[i]: partial(adapter, num_chunks=n, grid=grid) for i, adapter in self.adapters.items()}
        x, _ = self.vit.forward_blocks(x, after=after)  # adapters on all chunks at once: they mix them
        return self.vit.norm(x), n, grid

    def forward(self, video: Tensor) -> Tensor:
        """(B, 3, T, H, W) normalised frames -> (B, D, head_length), or (B, D, T / tubelet) without one."""
        tokens, n, (t, h, w) = self.forward_tokens(video)
        features = reduce(tokens, "(b n) (t h w) d -> b d (n t)", "mean", n=n, t=t, h=h, w=w)
        if self.head_length is not None and features.shape[-1] != self.head_length:
            features = F.interpolate(features, size=self.head_length, mode="linear", align_corners=False)
        return features.float()  # the head runs in float32 under mixed precision too
