"""Evaluation metrics as torchmetrics ``Metric``s that are exact under DDP.

Lightning's distributed sampler pads the evaluation set by repeating samples so every rank gets the same number;
these metrics keep each sample's id and drop repeats after gathering, so every sample counts exactly once.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import multiclass_accuracy, multilabel_average_precision


def first_occurrences(ids: Tensor) -> Tensor:
    """Positions of the first occurrence of each distinct id (in order of first appearance)."""
    order = torch.argsort(ids, stable=True)
    sorted_ids = ids[order]
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    return order[first].sort().values


class VideoClassificationScores(Metric):
    """Top-k accuracy (micro, i.e. over samples) and the loss (NLL of the scores, which are probabilities) over
    de-duplicated per-video scores; for multi-label targets
    mAP (mean over the classes that have a positive sample, as the ActivityNet evaluation) and top-k hit rate (a
    true label among the k best scores).

    ``update(scores, targets, ids)``: ``scores`` (B, C) class scores already averaged over views; ``targets`` class
    indices (B,) or multi-hot (B, C) when ``multilabel``; ``ids`` (B,) sample ids.
    """

    full_state_update = False

    def __init__(self, num_classes: int, top_k: tuple[int, ...] = (1, 5), multilabel: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.top_k = tuple(k for k in top_k if k <= num_classes)
        self.multilabel = multilabel
        self.add_state("ids", default=[], dist_reduce_fx="cat")
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, targets: Tensor, ids: Tensor) -> None:
        self.ids.append(ids.detach().long())
        self.scores.append(scores.detach().float())
        self.targets.append(targets.detach())

    def _gathered(self) -> tuple[Tensor, Tensor, Tensor]:
        def cat(x):
            return torch.cat(x) if isinstance(x, list) else x

        ids, scores, targets = cat(self.ids), cat(self.scores), cat(self.targets)
        keep = first_occurrences(ids)
        return ids[keep], scores[keep], targets[keep]

    def compute(self) -> dict[str, Tensor]:
        ids, scores, targets = self._gathered()
        out = {"num_samples": torch.tensor(float(len(ids)), device=scores.device)}
        if self.multilabel:
            per_class = multilabel_average_precision(
                scores, targets.long(), num_labels=self.num_classes, average=None
            )
            # A class without a positive sample has no AP (torchmetrics would count it as 0).
            present = targets.sum(0) > 0
            out["mAP"] = per_class[present].mean() if present.any() else scores.new_tensor(float("nan"))
            for k in self.top_k:
                best = scores.topk(k, dim=1).indices
                out[f"top{k}"] = targets.gather(1, best).gt(0).any(1).float().mean()
        else:
            for k in self.top_k:
                out[f"top{k}"] = multiclass_accuracy(
                    scores, targets.long(), num_classes=self.num_classes, top_k=k, average="micro"
                )
            # Negative log-likelihood of the view-averaged probabilities, over the same de-duplicated samples.
            out["loss"] = -scores.gather(1, targets.long()[:, None]).clamp_min(1e-8).log().mean()
        return out
