"""HaltingVT: an inflated DeiT whose first two blocks are the Glimpser and whose joint blocks halt tokens.

- Glimpser (blocks 0-1): TimeSformer-style divided space-time blocks; block 1 keeps, per frame, the
  ``ceil(glimpse_ratio * h * w)`` patch tokens the class token attends to most. The class token keeps its residual
  path through the selecting block.
- Joint blocks (2..): A-ViT token halting. Each token's halting score is ``sigmoid(halt_scale * e0 - halt_center)``
  with ``e0`` channel 0 of its block output; a token stops once its cumulative score reaches ``1 - halt_eps``
  (always at the last block). The class feature is the halting-weighted sum of the class token's outputs.

"Frame" means token time step: with ``tubelet_size`` 2 (the from-scratch quickstart) it is a 2-frame tubelet.

Two forward paths compute the same function:

- ``forward_masked``: all tokens stay in the tensor; halted tokens are neither updated nor attended to. The
  reference for training.
- ``forward_compact``: halted tokens are physically removed. Token-wise layers run on the active tokens of the
  whole batch packed together and attention runs per sample, so the cost follows the active token counts
  whatever their spread over the batch. Used at inference, and in training (``losses=True``, with autograd):
  a halted token has no further effect on the output, so its loss and gradients are the masked path's. At
  inference ``early_exit=True`` also stops a whole sample once its class token has halted (its feature is final
  then): the same output for fewer operations than the paper's accounting counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from einops import rearrange
from timm.layers import DropPath, Mlp
from torch import Tensor, nn

from models.blockdrop import MLPActivation
from models.layers import Attention, Block, Packed, QKVBias, trunc_normal_init
from models.vit import InflatedViT, Size


class DividedBlock(nn.Module):
    """Divided space-time block: temporal attention per spatial location, then spatial attention per frame.

    ``keep_ratio < 1`` makes it the selecting Glimpser block: after spatial attention each frame keeps its
    ``ceil(keep_ratio * patches)`` patch tokens with the highest class-token attention (mean over heads), in their
    original order, and only those go through the MLP and on to later blocks.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: QKVBias = "qkv",
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        keep_ratio: float = 1.0,
    ):
        super().__init__()
        self.keep_ratio = keep_ratio
        self.temporal_norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.temporal_attn = Attention(dim, num_heads, qkv_bias)
        self.temporal_fc = nn.Linear(dim, dim)
        nn.init.zeros_(self.temporal_fc.weight)  # starts as the image model: temporal branch adds nothing
        nn.init.zeros_(self.temporal_fc.bias)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def kept_per_frame(self, patches: int) -> int:
        return patches if self.keep_ratio >= 1.0 else math.ceil(self.keep_ratio * patches)

    def forward(
        self, x: Tensor, frames: int, return_kept: bool = False
    ) -> Tensor | tuple[Tensor, Tensor | None]:
        """(B, 1 + T*P, C) time-major tokens -> (B, 1 + T*P', C) with P' the kept patches per frame.

        ``return_kept`` also returns the kept patch indices (B, T, P'), ascending, or None when nothing is dropped.
        """
        cls, patches = x[:, :1], rearrange(x[:, 1:], "b (t p) c -> (b p) t c", t=frames)
        y, _ = self.temporal_attn(self.temporal_norm1(patches))
        patches = patches + self.drop_path(self.temporal_fc(y))
        b = x.shape[0]
        patches = rearrange(patches, "(b p) t c -> (b t) p c", b=b)
        per_frame = torch.cat([cls.repeat_interleave(frames, dim=0), patches], dim=1)  # (B*T, 1+P, C)
        select = self.keep_ratio < 1.0
        keep = None
        y, attn = self.attn(self.norm1(per_frame), need_weights=select)
        cls = cls + self.drop_path(rearrange(y[:, 0], "(b t) c -> b t c", t=frames).mean(1, keepdim=True))
        patches = patches + self.drop_path(y[:, 1:])
        if select:
            k = self.kept_per_frame(patches.shape[1])
            score = attn[:, :, 0, 1:].mean(1)  # (B*T, P): class-token attention, mean over heads
            keep = score.topk(k, dim=1).indices.sort(dim=1).values
            patches = patches.gather(1, keep[..., None].expand(-1, -1, patches.shape[-1]))
        x = torch.cat([cls, rearrange(patches, "(b t) p c -> b (t p) c", b=b)], dim=1)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        if return_kept:
            return x, None if keep is None else keep.view(b, frames, -1)
        return x


@dataclass
class HaltingOutput:
    """What a halting forward returns.

    ``feature`` (B, C) normalised class feature; ``ponder`` (B, N) per-token ponder cost rho (layers run +
    remainder); ``active`` (B, L) number of tokens each joint layer processed per sample; ``halting`` (L,) the
    distribution prior's per-layer halting score as A-ViT defines it: the score before the last layer's forced
    h = 1, averaged over all of the batch's tokens, a token that halted earlier counting 0 (A-ViT zeroes halted
    tokens, whose score is then about sigmoid(-halt_center));
    ``depth`` (B, N) how many joint layers each token ran through (token order: class token, then time-major
    kept patches); ``exit_depth`` (B,) how many joint layers the class token ran through: the sample's output
    is final after them. ``forward_compact`` without ``losses`` (inference) leaves ``ponder``, ``halting`` and
    ``depth`` empty: they only feed losses and pictures. With early exit, ``active`` counts the tokens that
    were computed (none after ``exit_depth``).
    """

    feature: Tensor
    ponder: Tensor
    active: Tensor
    halting: Tensor
    depth: Tensor
    exit_depth: Tensor

    def early_exit_active(self) -> Tensor:
        """(B, L) the tokens per joint layer that early exit computes: ``active`` up to each sample's exit."""
        layers = torch.arange(self.active.shape[1], device=self.active.device)
        return self.active * (layers < self.exit_depth[:, None])


@dataclass
class HaltingMap:
    """Which tokens of each frame survive where: ``kept`` (B, T, P') patch indices (row-major in the h x w grid)
    the Glimpser kept, ``depth`` (B, T, P') joint layers each kept patch ran through, ``grid`` (T, h, w),
    ``layers`` the number of joint layers. A patch is active at joint layer l while ``depth > l``.
    """

    kept: Tensor
    depth: Tensor
    grid: tuple[int, int, int]
    layers: int


class HaltingViT(InflatedViT):
    """HaltingVT backbone: ``glimpser_blocks`` divided blocks, the rest joint blocks with token halting.

    Keys follow DeiT/timm naming, so ``load_pretrained`` takes DeiT-S weights directly; the divided blocks'
    temporal attention is initialised from their spatial attention when the checkpoint has none.

    ``glimpser_init`` (training from scratch): ``trunc_normal`` initialises the Glimpser blocks as the joint
    blocks and the official model (truncated normal 0.02, zero temporal_fc); ``torch_default`` leaves PyTorch's
    default Linear initialisation in them (larger weights; the small quickstart escapes the chance plateau with it).
    ``drop_blocks`` (joint blocks only) and ``mlp_activation`` give a block-drop-compressed model's layout.
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
        glimpser_blocks: int = 2,
        glimpse_ratio: float = 0.5,
        halt_scale: float = 10.0,
        halt_center: float = 10.0,
        halt_eps: float = 0.01,
        tubelet_size: int = 1,
        pos_init: Literal["trunc_normal", "sinusoid"] = "trunc_normal",
        glimpser_init: Literal["trunc_normal", "torch_default"] = "trunc_normal",
        drop_blocks: list[int] | None = None,
        mlp_activation: MLPActivation = "gelu",
    ):
        super().__init__(
            size, embed_dim, depth, num_heads, img_size, num_frames, patch_size, in_chans,
            mlp_ratio, qkv_bias, drop_path_rate, norm_eps, tubelet_size, pos_init,
        )  # fmt: skip
        glimpser = sorted(set(drop_blocks or ()) & set(range(glimpser_blocks)))
        if glimpser:
            raise ValueError(
                f"drop_blocks {list(drop_blocks)} names Glimpser blocks {glimpser}: only the joint blocks "
                f"{glimpser_blocks}..{self.depth - 1} can be dropped"
            )
        if not 0 < glimpse_ratio <= 1:
            raise ValueError(f"glimpse_ratio must be in (0, 1], got {glimpse_ratio}")
        if glimpser_blocks >= self.depth:
            raise ValueError(
                f"glimpser_blocks ({glimpser_blocks}) must leave joint blocks (depth {self.depth})"
            )
        self.glimpser_blocks = glimpser_blocks
        self.glimpse_ratio = glimpse_ratio
        self.halt_scale = halt_scale
        self.halt_center = halt_center
        self.halt_eps = halt_eps
        for i in range(glimpser_blocks):
            old = self.blocks[i]
            keep = glimpse_ratio if i == glimpser_blocks - 1 else 1.0
            dpr = old.drop_path.drop_prob if isinstance(old.drop_path, DropPath) else 0.0
            self.blocks[i] = DividedBlock(
                self.embed_dim, self.num_heads, mlp_ratio, qkv_bias, dpr, norm_eps, keep
            )
            if glimpser_init == "trunc_normal":  # as the joint blocks (and the official model)
                self.blocks[i].apply(trunc_normal_init)
                nn.init.zeros_(self.blocks[i].temporal_fc.weight)
                nn.init.zeros_(self.blocks[i].temporal_fc.bias)
            elif glimpser_init != "torch_default":
                raise ValueError(
                    f"glimpser_init must be 'trunc_normal' or 'torch_default', got {glimpser_init!r}"
                )
        self.compress(drop_blocks, mlp_activation)

    def droppable_blocks(self) -> list[int]:
        """The blocks block drop may remove (original indices): the joint ones, not the Glimpser."""
        return self.block_ids[self.glimpser_blocks :]

    @property
    def joint_blocks(self) -> list[Block]:
        return list(self.blocks[self.glimpser_blocks :])

    def glimpse(self, video: Tensor, return_kept: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Embedding and the Glimpser: (B, 3, T, H, W) -> (B, 1 + T*P', C); with ``return_kept`` also the kept
        patch indices (B, T, P')."""
        frames, h, w = self.token_grid(video.shape)
        x = self.embed(video)
        kept = torch.arange(h * w, device=x.device).expand(x.shape[0], frames, -1)
        for position in range(self.glimpser_blocks):
            x, keep = self.run_block(position, x, frames, return_kept=True)
            if keep is not None:
                kept = kept.gather(2, keep)
        return (x, kept) if return_kept else x

    def halting_score(self, x: Tensor, last: bool) -> Tensor:
        if last:
            return torch.ones_like(x[..., 0])
        return torch.sigmoid(self.halt_scale * x[..., 0] - self.halt_center)

    def forward_masked(self, video: Tensor) -> HaltingOutput:
        """Halting with every token kept in place: halted tokens are frozen and masked out as keys."""
        return self.halt_masked(self.glimpse(video))

    def halt_masked(self, x: Tensor) -> HaltingOutput:
        """The joint blocks of ``forward_masked`` on Glimpser output ``x`` (B, N, C)."""
        b, n, _ = x.shape
        joint = self.joint_blocks
        cum = x.new_zeros(b, n)
        remainder = x.new_ones(b, n)
        ponder = x.new_zeros(b, n)
        active = torch.ones(b, n, dtype=torch.bool, device=x.device)
        feature = x.new_zeros(b, x.shape[-1])
        counts, halting = [], []
        depth = torch.zeros(b, n, dtype=torch.long, device=x.device)
        for i in range(len(joint)):
            counts.append(active.sum(1))
            depth += active
            # A sample with no active token left attends to all (its rows are discarded) rather than to none.
            keys = active | ~active.any(1, keepdim=True)
            y = self.run_block(self.glimpser_blocks + i, x, attn_mask=keys[:, None, None, :])
            x = torch.where(active[..., None], y, x)
            score = self.halting_score(x, last=False)
            # A-ViT's layer mean for the prior: the unforced score over all tokens, a halted one counting 0.
            halting.append((score * active).sum() / active.numel())
            h = (torch.ones_like(score) if i == len(joint) - 1 else score) * active
            cum = cum + h
            reached = active & (cum >= 1.0 - self.halt_eps)
            running = active & ~reached
            weight = torch.where(reached, remainder, torch.where(running, h, 0.0))
            ponder = ponder + active.float() + torch.where(reached, remainder, 0.0)
            remainder = remainder - torch.where(running, h, 0.0)
            feature = feature + weight[:, :1] * x[:, 0]
            active = running
        return HaltingOutput(
            self.norm(feature), ponder, torch.stack(counts, 1), torch.stack(halting), depth, depth[:, 0]
        )

    def forward_compact(self, video: Tensor, losses: bool = False, early_exit: bool = False) -> HaltingOutput:
        """Halting with halted tokens removed: packed token-wise layers, per-sample attention.

        Differentiable: with ``losses`` it also returns what training needs (``ponder``, ``halting``, ``depth``),
        so a training step costs what the active tokens cost; its loss and gradients are the masked path's.
        ``early_exit`` (inference) also removes every token of a sample once its class token has halted: the
        sample's feature is then final, so the output is the same and only ``active`` differs.
        """
        return self.halt_compact(self.glimpse(video), losses, early_exit)

    def halt_compact(self, x: Tensor, losses: bool = False, early_exit: bool = False) -> HaltingOutput:
        """The joint blocks of ``forward_compact`` on Glimpser output ``x`` (B, N, C)."""
        if losses and early_exit:
            raise ValueError("early_exit is for inference: the ponder loss needs every token's halting")
        b, n, c = x.shape
        joint = self.joint_blocks
        tokens = x.reshape(b * n, c)  # packed active tokens, sample by sample, class token first
        position = torch.arange(b * n, device=x.device)  # each packed token's place in the (B, N) grid
        owner = position // n
        is_cls = position % n == 0
        cum = x.new_zeros(b * n)
        remainder = x.new_ones(b * n)
        feature = x.new_zeros(b, c)
        ponder = x.new_zeros(b * n)
        depth = torch.zeros(b * n, dtype=torch.long, device=x.device)
        exit_depth = torch.full((b,), len(joint), dtype=torch.long, device=x.device)
        counts, halting = [], []
        for i in range(len(joint)):
            lengths = torch.bincount(owner, minlength=b)
            counts.append(lengths)
            tokens = self.run_block(self.glimpser_blocks + i, tokens, packed=Packed(lengths, owner))
            score = self.halting_score(tokens, last=False)
            h = torch.ones_like(score) if i == len(joint) - 1 else score
            cum = cum + h
            reached = cum >= 1.0 - self.halt_eps
            weight = torch.where(reached, remainder, h)
            cls_rows = is_cls.nonzero().squeeze(1)
            feature = feature.index_add(0, owner[cls_rows], weight[cls_rows, None] * tokens[cls_rows])
            exited = cls_rows[reached[cls_rows]]
            exit_depth[owner[exited]] = i + 1
            if losses:
                halting.append(score.sum() / (b * n))  # as halt_masked: halted tokens count 0
                depth[position] += 1
                # A token halting here ran i + 1 layers and keeps its remainder as the rest of its ponder cost.
                ponder = ponder.index_put((position[reached],), (i + 1) + remainder[reached])
            remainder = remainder - torch.where(reached, 0.0, h)
            keep = ~reached
            if early_exit:  # a sample whose class token halted is final: drop all of its tokens
                done = torch.zeros(b, dtype=torch.bool, device=x.device).index_fill_(0, owner[exited], True)
                keep &= ~done[owner]
            tokens, position, owner, is_cls, cum, remainder = (
                tokens[keep],
                position[keep],
                owner[keep],
                is_cls[keep],
                cum[keep],
                remainder[keep],
            )
            if tokens.shape[0] == 0:
                counts += [torch.zeros_like(lengths)] * (len(joint) - 1 - i)
                if losses:
                    halting += [x.new_zeros(())] * (len(joint) - 1 - i)
                break
        if not losses:
            empty = x.new_zeros(0)
            return HaltingOutput(self.norm(feature), empty, torch.stack(counts, 1), empty, empty, exit_depth)
        return HaltingOutput(
            self.norm(feature),
            ponder.view(b, n),
            torch.stack(counts, 1),
            torch.stack(halting),
            depth.view(b, n),
            exit_depth,
        )

    @torch.no_grad()
    def halting_map(self, video: Tensor) -> tuple[HaltingMap, HaltingOutput]:
        """Where each patch token of ``video`` (B, 3, T, H, W) stops: for pictures (the paper's Fig. 4)."""
        x, kept = self.glimpse(video, return_kept=True)
        out = self.halt_masked(x)
        frames, h, w = self.token_grid(video.shape)
        depth = out.depth[:, 1:].view(kept.shape)
        return HaltingMap(kept, depth, (frames, h, w), len(self.joint_blocks)), out

    def macs(self, active: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """Multiply-accumulates per sample from the joint layers' active token counts ``active`` (B, L).

        Counts the matrix products (patch embedding, projections, attention, MLPs) as fvcore does; ``grid`` is
        the (frames, h, w) token grid of the input.
        """
        t, h, w = grid
        p, c = h * w, self.embed_dim
        hidden = self.blocks[0].mlp.fc1.out_features
        patch = self.patch_embed.proj
        total = t * p * c * patch.in_channels * math.prod(patch.kernel_size)
        n = 1 + t * p  # tokens entering each divided block
        for block in self.blocks[: self.glimpser_blocks]:
            total += t * p * 5 * c * c + 2 * p * t * t * c  # temporal qkv + proj + temporal_fc, attention
            total += t * (1 + p) * 4 * c * c + 2 * t * (1 + p) ** 2 * c  # spatial attention per frame
            n = 1 + t * block.kept_per_frame(p)
            total += n * 2 * c * hidden  # the MLP sees only the kept tokens
        a = active.double()
        joint = (a * (4 * c * c + 2 * c * hidden) + 2 * a * a * c).sum(1)
        return joint + total

    def forward(self, video: Tensor) -> Tensor:
        """(B, 3, T, H, W) -> (B, C) class feature: masked halting in training, token removal otherwise."""
        return (self.forward_masked(video) if self.training else self.forward_compact(video)).feature
