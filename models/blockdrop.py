"""Progressive block drop on any block stack of the shared core: removal, scoring views, alignment losses.

A "stack" is a ViT of the shared core (``VideoMAEViT``, ``InflatedViT``, ``HaltingViT``, the ViT inside the TAD
backbone): its ``blocks`` run through its block runner. Removing a block deletes it from the list, so the model
really runs one block fewer; the stack's ``block_ids`` keep the original index of every remaining block, for
reports and for aligning each kept block with the teacher's block of the same original index (recorded by the
runner: ``stack.recording()``). Every stack is built compressed with ``drop_blocks`` / ``mlp_activation``.

- ``drop_blocks(stack, ids)``: remove blocks for good (by original index).
- ``without_blocks(stack, ids)``: remove them only inside a ``with`` (scoring candidate drops on one model).
- ``feature_alignment``, ``class_alignment``, ``segment_alignment``: the recovery's alignment losses against
  the teacher (block features, class scores, and for detectors the regressed segments).
- ``prepare_recovery(model, stack, mode)``: what trains while the model recovers from a drop (LoRA through peft
  on the attention projections + norms + patch embedding, everything, or nothing) and whether the parts
  outside the stack (the head) train; ``merge_lora`` folds the LoRA back before the next round.
- ``set_mlp_activation(stack, "relu")`` and ``ActivationSparsity(stack)``: the supplement's optional stage,
  GELU swapped for ReLU in every block's MLP, and the share of MLP hidden activations that are exactly zero.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.actionformer import ActionFormerOutputs, diou_loss_1d
from models.lora import LoraInit, add_lora, merge_lora

Recovery = Literal["lora", "full", "none"]
MLPActivation = Literal["gelu", "relu"]
_ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU}


def block_ids(stack: nn.Module) -> list[int]:
    """Original indices of ``stack.blocks`` (0..depth-1 until a block is dropped)."""
    return list(stack.block_ids)


def droppable_blocks(stack: nn.Module) -> list[int]:
    """The blocks block drop may remove (original indices): ``stack.droppable_blocks()`` where the stack
    restricts them (HaltingVT's Glimpser stays), else every block."""
    restrict = getattr(stack, "droppable_blocks", None)
    return restrict() if restrict is not None else block_ids(stack)


def _positions(stack: nn.Module, ids: Iterable[int]) -> list[int]:
    current = block_ids(stack)
    ids = list(ids)
    unknown = [i for i in ids if i not in current]
    if unknown:
        raise ValueError(f"blocks {unknown} are not in the model (its blocks, by original index: {current})")
    fixed = [i for i in ids if i not in droppable_blocks(stack)]
    if fixed:
        raise ValueError(
            f"blocks {fixed} cannot be dropped from {type(stack).__name__} (droppable: {droppable_blocks(stack)})"
        )
    if len(set(ids)) != len(ids):
        raise ValueError(f"block ids repeat: {ids}")
    if len(ids) >= len(current):
        raise ValueError(f"dropping {ids} would leave no block (the model has {current})")
    return [current.index(i) for i in ids]


def _set_blocks(stack: nn.Module, keep: list[int], ids: list[int]) -> None:
    stack.blocks = nn.ModuleList(stack.blocks[p] for p in keep)
    stack.block_ids = ids
    stack.depth = len(ids)


def drop_blocks(stack: nn.Module, ids: Iterable[int]) -> nn.Module:
    """Remove the blocks with original indices ``ids`` from ``stack`` in place; return ``stack``."""
    drop = set(_positions(stack, ids))
    current = block_ids(stack)
    keep = [p for p in range(len(current)) if p not in drop]
    _set_blocks(stack, keep, [current[p] for p in keep])
    return stack


@contextmanager
def without_blocks(stack: nn.Module, ids: Iterable[int]) -> Iterator[nn.Module]:
    """Inside the ``with``, ``stack`` runs without the blocks ``ids``; afterwards it is as it was (same modules)."""
    blocks, previous, depth = stack.blocks, stack.block_ids, stack.depth
    drop_blocks(stack, ids)
    try:
        yield stack
    finally:
        stack.blocks, stack.block_ids, stack.depth = blocks, previous, depth


def set_mlp_activation(stack: nn.Module, activation: MLPActivation) -> nn.Module:
    """Give every block's MLP of ``stack`` the ``activation`` (a new module in place of ``mlp.act``; the
    weights are untouched); return ``stack``."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"mlp activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    for block in stack.blocks:
        block.mlp.act = _ACTIVATIONS[activation]()
    return stack


class ActivationSparsity:
    """Counts, during the forwards inside the ``with``, how many MLP hidden activations (the output of each
    block's ``mlp.act``) are exactly zero, and how many there are.

    ``with ActivationSparsity(stack) as sparsity: model(x)`` leaves ``sparsity.zeros`` and ``sparsity.total``
    summed over blocks and forwards, and ``sparsity.ratio`` = zeros / total (0 before any forward). A ReLU MLP
    is sparse wherever its input is negative; GELU is zero only at 0 and where it underflows.
    """

    def __init__(self, stack: nn.Module):
        self.stack = stack
        self.zeros = 0
        self.total = 0
        self._handles = []

    def __enter__(self) -> ActivationSparsity:  # noqa: PYI034 (a plain class, not meant for subclassing)
        for block in self.stack.blocks:
            self._handles.append(block.mlp.act.register_forward_hook(self._count))
        return self

    def _count(self, module: nn.Module, args, output: Tensor) -> None:
        self.zeros += int((output == 0).sum())
        self.total += output.numel()

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def ratio(self) -> float:
        return self.zeros / self.total if self.total else 0.0


def feature_alignment(student: dict[int, Tensor], teacher: dict[int, Tensor]) -> Tensor:
    """Mean over the student's blocks of the MSE between its output and the teacher's block of the same
    original index (the teacher has every block the student kept)."""
    missing = sorted(set(student) - set(teacher))
    if missing:
        raise KeyError(f"the teacher has no output for blocks {missing}: it must be the larger model")
    differ = [i for i, out in student.items() if out.shape != teacher[i].shape]
    if differ:
        raise ValueError(
            f"block {differ[0]}'s output is {tuple(student[differ[0]].shape)} in the student but "
            f"{tuple(teacher[differ[0]].shape)} in the teacher: feature alignment needs the same tokens in both"
        )
    losses = [F.mse_loss(out.float(), teacher[i].float()) for i, out in student.items()]
    return torch.stack(losses).mean()


def class_alignment(student: Tensor, teacher: Tensor, temperature: float = 3.5) -> Tensor:
    """Knowledge distillation on class scores: KL(teacher || student) of the softmax over classes at
    ``temperature``, averaged over the rows (points, clips) and scaled by T^2 (Hinton et al.)."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"student scores {tuple(student.shape)} and teacher scores {tuple(teacher.shape)} differ"
        )
    log_p = F.log_softmax(student.float() / temperature, dim=-1)
    q = F.softmax(teacher.float() / temperature, dim=-1)
    rows = max(student.numel() // student.shape[-1], 1)
    return (
        F.kl_div(log_p.reshape(-1, student.shape[-1]), q.reshape(-1, student.shape[-1]), reduction="sum")
        / rows
        * temperature**2
    )


def segment_alignment(student: Tensor, teacher: Tensor, positive: Tensor) -> Tensor:
    """Mean DIoU loss between the student's and the teacher's decoded segments (B, P, 2) at the ``positive``
    points (B, P) (those the ground truth assigns a segment); 0, still in the graph, when there is none."""
    pred = student[positive].float()
    if pred.shape[0] == 0:
        return student.sum() * 0.0
    return diou_loss_1d(pred, teacher[positive].float()).mean()


def detector_alignment(
    student: ActionFormerOutputs, teacher: ActionFormerOutputs, positive: Tensor, temperature: float = 3.5
) -> dict[str, Tensor]:
    """The prediction alignment of a temporal detector: ``class_kl`` over the class logits of every valid point
    of every pyramid level, ``segment_diou`` at the positive points. With a one-class head (class-agnostic
    ActivityNet) the softmax over classes is constant, so ``class_kl`` is 0, as in the block-drop paper's code."""
    valid = torch.cat(student.masks, dim=1)
    logits = torch.cat(student.cls_logits, dim=1)[valid]
    teacher_logits = torch.cat(teacher.cls_logits, dim=1)[valid]
    return {
        "class_kl": class_alignment(logits, teacher_logits, temperature),
        "segment_diou": segment_alignment(student.segments(), teacher.segments(), positive & valid),
    }


def prepare_recovery(
    model: nn.Module,
    stack: nn.Module,
    mode: Recovery = "lora",
    head_trainable: bool = True,
    lora_rank: int | None = None,
    lora_init: LoraInit = "official",
) -> list[nn.Parameter]:
    """Set what trains in ``model`` while it recovers from a drop; return the trainable parameters.

    ``lora``: LoRA (peft, rank ``lora_rank`` or embed dim / 4, fresh: B = 0, A drawn as ``lora_init`` says,
    ``models.lora``) on every block's attention ``qkv``
    and ``proj``, plus the stack's LayerNorms and patch embedding, the other stack weights frozen (the block-drop
    paper's recipe; LoRA already in the model, e.g. from the previous round, is merged first). ``full``: every
    stack weight. ``none``: nothing in the stack (no fine-tuning after the drop). Everything outside the stack
    (the head, the detector's neck) trains when ``head_trainable``.
    """
    if mode not in ("lora", "full", "none"):
        raise ValueError(f"recovery mode must be 'lora', 'full' or 'none', got {mode!r}")
    # A clip-pooling norm the model does not use (the TAD backbone froze VideoMAE's fc_norm) stays frozen: under
    # DDP a trainable parameter without a gradient is an error.
    fc_norm = getattr(stack, "fc_norm", None)
    fc_norm_used = fc_norm is not None and any(p.requires_grad for p in fc_norm.parameters())
    merge_lora(model)
    model.requires_grad_(head_trainable)
    stack.requires_grad_(mode == "full")
    if mode == "lora":
        dim = getattr(stack, "embed_dim", None) or stack.blocks[0].attn.qkv.in_features
        add_lora(stack, rank=lora_rank or dim // 4, init=lora_init)
        for module in stack.modules():
            if isinstance(module, nn.LayerNorm):
                module.requires_grad_(True)
        if hasattr(stack, "patch_embed"):
            stack.patch_embed.requires_grad_(True)
    if fc_norm is not None:
        fc_norm.requires_grad_(fc_norm_used and mode != "none")
    return [p for p in model.parameters() if p.requires_grad]


def choose_block(scores: dict[int, float], higher_is_better: bool) -> int:
    """The candidate with the best score; ties go to the lowest original index."""
    if not scores:
        raise ValueError("no candidate block was scored")
    best = max(scores.values()) if higher_is_better else min(scores.values())
    return min(i for i, v in scores.items() if v == best)
