"""Progressive block drop on a trained task: scoring candidate drops on a training subset.

The selection metrics (``metric``):

- ``map``: the evaluation score (e.g. ``val/average_mAP``) of the model without the candidate, through a
  caller-given ``evaluate(task) -> float`` (a ``Trainer.validate`` on the scoring subset); higher is better.
- ``train_loss``: the task's own loss (``task.batch_loss``) averaged over the subset's batches; lower is better.
- ``feature_mse``: the MSE between the block stack's output without the candidate and with every current block,
  averaged over the subset's batches; lower is better.

``train_loss`` and ``feature_mse`` make one pass over the data, trying every candidate on each batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import move_data_to_device
from tqdm.auto import tqdm

from lightning_modules.compression.task import Compressible
from models.blockdrop import block_ids, droppable_blocks, without_blocks

Metric = Literal["map", "train_loss", "feature_mse"]
HIGHER_IS_BETTER: dict[str, bool] = {"map": True, "train_loss": False, "feature_mse": False}


def _stack_output(
    task: Compressible, batch: dict[str, Any], forward: Callable[[Compressible, dict], Any]
) -> torch.Tensor:
    """The output of the last block of the task's stack on ``batch``."""
    stack = task.block_stack()
    with stack.recording() as outputs:
        forward(task, batch)
    return outputs[block_ids(stack)[-1]]


def _forward(task: Compressible, batch: dict[str, Any]) -> Any:
    return task(batch["video"], batch["valid"]) if "valid" in batch else task(batch["video"])


@torch.no_grad()
def score_candidates(
    task: Compressible,
    metric: Metric,
    candidates: Sequence[int] | None = None,
    batches: Iterable[dict[str, Any]] | None = None,
    evaluate: Callable[[Compressible], float] | None = None,
    progress: bool = True,
) -> dict[int, float]:
    """Score dropping each of ``candidates`` (original block indices; default: every block the stack lets go) from
    ``task``'s block stack; returns ``{block: score}``. ``batches`` feed ``train_loss`` / ``feature_mse``;
    ``evaluate`` gives ``map``. The task is left as it was (train/eval mode included)."""
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"metric must be one of {sorted(HIGHER_IS_BETTER)}, got {metric!r}")
    stack = task.block_stack()
    candidates = list(droppable_blocks(stack) if candidates is None else candidates)
    was_training = task.training
    task.eval()
    try:
        if metric == "map":
            if evaluate is None:
                raise ValueError("metric 'map' needs evaluate(task) -> score")
            scores = {}
            for block in tqdm(candidates, desc="scoring drops (mAP)", disable=not progress):
                with without_blocks(stack, [block]):
                    scores[block] = float(evaluate(task))
            return scores
        if batches is None:
            raise ValueError(f"metric {metric!r} needs batches of the scoring subset")
        totals = dict.fromkeys(candidates, 0.0)
        count = 0
        batches = list(batches) if not hasattr(batches, "__len__") else batches
        bar = tqdm(
            total=len(batches) * len(candidates), desc=f"scoring drops ({metric})", disable=not progress
        )
        for batch in batches:
            batch = move_data_to_device(batch, task.device)
            if batch.get("batch_size", 1) == 0:
                bar.update(len(candidates))
                continue
            reference = _stack_output(task, batch, _forward) if metric == "feature_mse" else None
            for block in candidates:
                with without_blocks(stack, [block]):
                    if metric == "train_loss":
                        value = task.batch_loss(batch)
                    else:
                        value = F.mse_loss(_stack_output(task, batch, _forward).float(), reference.float())
                totals[block] += float(value)
                bar.update(1)
            count += 1
        bar.close()
        if count == 0:
            raise ValueError("the scoring subset gave no batch with a clip in it")
        return {block: total / count for block, total in totals.items()}
    finally:
        task.train(was_training)
