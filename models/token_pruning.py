"""EVAD's keyframe-centric token pruning (KTP) as block hooks on the shared ViT core.

Inside a pruning block, after the attention residual and before the MLP, every non-keyframe token ``j`` gets the
importance ``mean_h mean_i w_i attn_h(i, j)``: the attention it receives, averaged over all N queries with the
keyframe queries' rows weighted by ``keyframe_weight`` (no renormalisation), then over heads. The S tokens of the
keyframe (the middle temporal slice) always survive; of the others the ``ceil(keep_rate * N) - S`` most important
do, N counting the tokens entering that block. Dropped tokens are gone for every later block.

The importance comes from the core's key-importance request (``models.layers.KeyImportanceHook``): the block
output uses fused attention and the score is accumulated over chunks of queries, never as a (B, heads, N, N) map.
Two defects of the official code are not reproduced: the kept tokens stay in ascending order of their original
positions (the official top-k leaves them in score order), and the score is computed without gradient, out of
place (the official code scales the attention map in place).

Each hook records ``kept``, the original positions (B, n_kept) of the tokens that leave its block, so a decoder
can put the tokens back on the t x h x w grid.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from models.vit import VideoMAEViT

Grid = tuple[int, int, int]


class KeyframeTokenPruning:
    """The KTP hook of one pruning block.

    ``grid`` is the (t, h, w) token grid of the input (``model.token_grid(video.shape)``) and ``keyframe_index``
    the keyframe's temporal slice (default ``t // 2``, the middle one). ``previous`` is the pruning hook of the
    preceding pruning block, from which this one learns which original positions its input tokens hold; the first
    hook (``previous=None``) expects the full t*h*w tokens. ``keep_rate`` is a plain attribute: change it at
    evaluation time without retraining; at 1.0 the hook is the identity and asks for nothing.
    ``importance_chunk`` is the number of queries whose attention is held at once while scoring (None: as many
    as fit a cache-sized budget, ``models.layers.importance_chunk_elements``).
    """

    needs_attention = False

    def __init__(
        self,
        keep_rate: float = 0.7,
        keyframe_weight: float = 1.0,
        grid: Grid = (8, 14, 14),
        keyframe_index: int | None = None,
        importance_chunk: int | None = None,
        previous: KeyframeTokenPruning | None = None,
    ):
        if importance_chunk is not None and importance_chunk < 1:
            raise ValueError(f"importance_chunk must be a positive number of queries, got {importance_chunk}")
        if keyframe_weight < 0:
            raise ValueError(f"keyframe_weight must be >= 0, got {keyframe_weight}")
        self.keep_rate = keep_rate
        self.keyframe_weight = keyframe_weight
        self.importance_chunk = importance_chunk
        self.previous = previous
        self.kept: Tensor | None = None
        self.set_grid(grid, keyframe_index)

    def set_grid(self, grid: Grid, keyframe_index: int | None = None) -> None:
        """Point the hook at another input grid (another input size); the keyframe defaults to the middle slice."""
        t, h, w = grid
        if min(grid) < 1:
            raise ValueError(f"the token grid must be positive (t, h, w), got {grid}")
        keyframe_index = t // 2 if keyframe_index is None else keyframe_index
        if not 0 <= keyframe_index < t:
            raise ValueError(
                f"keyframe_index {keyframe_index} is outside the {t} temporal slices of grid {grid}"
            )
        self.grid = (t, h, w)
        self.keyframe_index = keyframe_index

    @property
    def keep_rate(self) -> float:
        return self._keep_rate

    @keep_rate.setter
    def keep_rate(self, value: float) -> None:
        if not 0 < value <= 1:
            raise ValueError(f"keep_rate must be in (0, 1], got {value}")
        self._keep_rate = value

    @property
    def keyframe_span(self) -> tuple[int, int]:
        """Original positions [start, stop) of the keyframe tokens (time-major layout)."""
        _, h, w = self.grid
        return self.keyframe_index * h * w, (self.keyframe_index + 1) * h * w

    def num_kept(self, n: int) -> int:
        """Tokens leaving the block when ``n`` enter: ``ceil(keep_rate * n)``, at least the keyframe, at most n."""
        _, h, w = self.grid
        return min(n, max(math.ceil(self.keep_rate * n), h * w))

    def positions(self, x: Tensor) -> Tensor:
        """Original positions (B, N) of the tokens ``x`` (B, N, C) entering this block."""
        b, n, _ = x.shape
        if self.previous is None:
            if n != math.prod(self.grid):
                raise ValueError(
                    f"the first pruning block got {n} tokens but the grid {self.grid} has {math.prod(self.grid)}:"
                    " build the hooks with model.token_grid(video.shape) of this input (or call set_grid)"
                )
            return torch.arange(n, device=x.device).expand(b, n)
        kept = self.previous.kept
        if kept is None or kept.shape != (b, n):
            raise ValueError(
                f"a pruning block got {b}x{n} tokens but the previous pruning block kept "
                f"{None if kept is None else tuple(kept.shape)}: pass the hooks of all pruning blocks together"
            )
        return kept

    def query_weights(self, x: Tensor) -> Tensor | None:
        """Per-query weights (B, N): ``keyframe_weight`` on keyframe tokens, 1 elsewhere; None when not pruning."""
        if self.num_kept(x.shape[1]) >= x.shape[1]:
            return None
        start, stop = self.keyframe_span
        positions = self.positions(x)
        keyframe = (positions >= start) & (positions < stop)
        return torch.where(keyframe, self.keyframe_weight, 1.0)

    def __call__(self, x: Tensor, importance: Tensor | None) -> Tensor:
        """Keep the keyframe tokens and the most important others of ``x`` (B, N, C), in original order."""
        positions = self.positions(x)
        n = x.shape[1]
        keep = self.num_kept(n)
        if keep >= n:
            self.kept = positions
            return x
        if importance is None:
            raise ValueError(
                "KeyframeTokenPruning got no key importance: run it through models.layers.Block, which answers "
                "its query_weights request"
            )
        start, stop = self.keyframe_span
        keyframe = (positions >= start) & (positions < stop)
        # the S keyframe tokens are always among the top
        score = importance.masked_fill(keyframe, float("inf"))
        local = score.topk(keep, dim=1).indices.sort(dim=1).values  # (B, keep), ascending position
        self.kept = positions.gather(1, local)
        return x.gather(1, local[..., None].expand(-1, -1, x.shape[-1]))


def default_prune_layers(depth: int) -> tuple[int, ...]:
    """EVAD's pruning blocks: after the first, second and third quarter (3/6/9 of ViT-B, 6/12/18 of ViT-L)."""
    return depth // 4, depth // 2, 3 * depth // 4


class KeyframePruning(Mapping[int, KeyframeTokenPruning]):
    """The chained KTP hooks of one model, keyed by block index: pass it as ``hooks=`` to ``forward_blocks``.

    ``keep_rate``, ``keyframe_weight`` and ``grid`` set every hook at once; ``kept`` is the original positions of
    the tokens the last block outputs, ``kept_after(i)`` those of the tokens leaving block ``i``.
    """

    def __init__(self, hooks: Mapping[int, KeyframeTokenPruning], num_tokens: int):
        self._hooks = dict(sorted(hooks.items()))
        self.num_tokens = num_tokens

    def __getitem__(self, block: int) -> KeyframeTokenPruning:
        return self._hooks[block]

    def __iter__(self) -> Iterator[int]:
        return iter(self._hooks)

    def __len__(self) -> int:
        return len(self._hooks)

    @property
    def keep_rate(self) -> float:
        return next(iter(self._hooks.values())).keep_rate

    @keep_rate.setter
    def keep_rate(self, value: float) -> None:
        for hook in self._hooks.values():
            hook.keep_rate = value

    @property
    def keyframe_weight(self) -> float:
        return next(iter(self._hooks.values())).keyframe_weight

    @keyframe_weight.setter
    def keyframe_weight(self, value: float) -> None:
        for hook in self._hooks.values():
            hook.keyframe_weight = value

    def set_grid(self, grid: Grid, keyframe_index: int | None = None) -> None:
        """Point every hook at the token grid of a new input size."""
        for hook in self._hooks.values():
            hook.set_grid(grid, keyframe_index)
        self.num_tokens = math.prod(grid)

    def kept_after(self, block: int) -> Tensor:
        """Original positions (B, n) of the tokens leaving block ``block`` in the last forward, ascending."""
        hooks = list(self._hooks.values())
        if hooks[0].kept is None:
            raise ValueError("no forward has run through these hooks yet")
        done = [hook for i, hook in self._hooks.items() if i <= block]
        if not done:
            b = hooks[0].kept.shape[0]
            return torch.arange(self.num_tokens, device=hooks[0].kept.device).expand(b, -1)
        return done[-1].kept

    @property
    def kept(self) -> Tensor:
        """Original positions (B, n_kept) of the tokens the model outputs, ascending."""
        return self.kept_after(max(self._hooks))


def keyframe_pruning_hooks(
    model: VideoMAEViT,
    grid: Grid,
    prune_layers: Sequence[int] | None = None,
    keep_rate: float = 0.7,
    keyframe_weight: float = 1.0,
    keyframe_index: int | None = None,
    importance_chunk: int | None = None,
) -> KeyframePruning:
    """KTP hooks for ``model`` on inputs of token grid ``grid`` (``model.token_grid(video.shape)``).

    ``prune_layers`` defaults to ``default_prune_layers(model.depth)``. The model must have no class token (every
    token is a grid position), hence a ``VideoMAEViT``.
    """
    if not isinstance(model, VideoMAEViT):
        raise TypeError(
            f"keyframe token pruning needs a VideoMAEViT (no class token), got {type(model).__name__}"
        )
    layers = default_prune_layers(model.depth) if prune_layers is None else tuple(prune_layers)
    if not layers:
        raise ValueError(
            "prune_layers is empty: give at least one block, or use keep_rate 1.0 to disable pruning"
        )
    if len(set(layers)) != len(layers) or not all(0 <= i < model.depth for i in layers):
        raise ValueError(
            f"prune_layers {list(layers)} must be distinct blocks of the {model.depth} in the model"
        )
    hooks: dict[int, KeyframeTokenPruning] = {}
    previous = None
    for i in sorted(layers):
        previous = hooks[i] = KeyframeTokenPruning(
            keep_rate, keyframe_weight, grid, keyframe_index, importance_chunk, previous
        )
    return KeyframePruning(hooks, math.prod(grid))


def keyframe_tokens(x: Tensor, kept: Tensor, grid: Grid, keyframe_index: int | None = None) -> Tensor:
    """The keyframe's h*w tokens (B, h*w, C), row-major, out of pruned tokens ``x`` (B, n, C) at positions ``kept``.

    The keyframe tokens are always kept and the kept positions ascend, so they sit together, after the kept
    tokens of earlier slices.
    """
    t, h, w = grid
    start = (t // 2 if keyframe_index is None else keyframe_index) * h * w
    first = (kept < start).sum(dim=1, keepdim=True)  # (B, 1)
    index = first + torch.arange(h * w, device=x.device)  # (B, h*w)
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
