"""What a task implements to be compressed by progressive block drop, and the teacher it recovers against.

Block drop is opt-in: a task that can be compressed inherits ``Compressible`` beside ``VideoTask`` and implements
its four methods. ``compress`` refuses, at set-up and with the reason, a task that does not.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from models.blockdrop import MLPActivation, feature_alignment


@dataclass
class Alignment:
    """Losses that pull a compressed student towards its teacher during recovery (block drop), each weighted
    (0 switches it off): ``feature`` the MSE of every kept block's output against the teacher's block of the same
    original index; ``prediction`` the KL of class scores at ``temperature``; ``segment`` (detectors) the DIoU
    of the regressed segments at the ground truth's positive points."""

    feature: float = 1.0
    prediction: float = 1.0
    segment: float = 1.0
    temperature: float = 3.5

    def __post_init__(self) -> None:
        for name in ("feature", "prediction", "segment"):
            if getattr(self, name) < 0:
                raise ValueError(f"alignment weight {name} must be >= 0, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"alignment temperature must be > 0, got {self.temperature}")


class Compressible:
    """The block-drop protocol of a ``VideoTask`` (mix in before it: ``class T(Compressible, VideoTask)``).

    A task implements:

    - ``block_stack()``: the ViT of the shared core whose blocks are dropped (its ``drop_blocks`` /
      ``mlp_activation`` rebuild the compressed layout);
    - ``batch_loss(batch)``: its own loss on a batch, nothing logged (the ``train_loss`` selection metric);
    - ``cost_inputs(batch)``: one clip or window of an evaluation batch, as ``forward`` takes it (MACs, latency);
    - ``compressed_overrides(dropped, mlp_activation)``: the recipe override, as a nested dict, that rebuilds the
      task with those blocks removed and no pretrained file to read;

    and runs its training forward through ``aligned`` and adds ``log_alignment`` of the terms to its loss, so that
    a recovery trains against the teacher. ``alignment_problem`` may refuse alignment settings it cannot honour.
    """

    def block_stack(self) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} does not name its block stack")

    def batch_loss(self, batch: dict[str, Any]) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no batch_loss")

    def cost_inputs(self, batch: dict[str, Any]) -> tuple[Tensor, ...]:
        raise NotImplementedError(f"{type(self).__name__} has no cost_inputs")

    def compressed_overrides(self, dropped: list[int], mlp_activation: MLPActivation) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} cannot be rebuilt compressed")

    @classmethod
    def alignment_problem(cls, init_args: Mapping[str, Any], alignment: Alignment) -> str | None:
        """Why a task of this class built with ``init_args`` (the recipe's ``model.init_args``) cannot recover with
        ``alignment`` (None: it can). ``compress`` asks before it builds anything."""
        return None

    def compressed_config(self, dropped: list[int], mlp_activation: MLPActivation = "gelu") -> str:
        """The YAML recipe override that rebuilds this task with the ``dropped`` blocks removed (and the MLPs'
        activation ``mlp_activation``): stacked on the task's recipe it loads the exported checkpoint."""
        return yaml.safe_dump(self.compressed_overrides(list(dropped), mlp_activation))

    # ------------------------------------------------------------------------------------------ the teacher

    def set_teacher(self, teacher: Compressible | None, alignment: Alignment | None = None) -> None:
        """Train against ``teacher`` (a task of the same kind, frozen) with the ``alignment`` losses added to the
        task's own; None removes it. The teacher is not a submodule: it is neither trained, nor saved in
        checkpoints, nor wrapped by DDP, and it follows this task's device when fitting starts."""
        alignment = (alignment or Alignment()) if teacher is not None else None
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        self._teacher = [teacher] if teacher is not None else []
        self.alignment = alignment

    @property
    def teacher(self) -> Compressible | None:
        return self._teacher[0] if getattr(self, "_teacher", None) else None

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.teacher is not None:
            self.teacher.to(self.device)

    def aligned(
        self, run: Callable[[Any], Any], predictions: Callable[[Any, Any], dict[str, Tensor]]
    ) -> tuple[Any, dict[str, Tensor]]:
        """``run(task)`` -> output, on this task and, with a teacher, on the teacher (no grad); returns this
        task's output and the weighted alignment terms: ``feature_mse`` (every block's output, recorded by the
        block runner) and what ``predictions(student output, teacher output)`` gives (already weighted). Without
        a teacher: the output and no terms."""
        teacher = self.teacher
        if teacher is None:
            return run(self), {}
        teacher.eval()
        with self.block_stack().recording() as mine:
            out = run(self)
        with torch.no_grad(), teacher.block_stack().recording() as theirs:
            reference = run(teacher)
        terms = {}
        if self.alignment.feature > 0:
            terms["feature_mse"] = self.alignment.feature * feature_alignment(mine, theirs)
        terms.update(predictions(out, reference))
        return out, terms

    def log_alignment(self, terms: dict[str, Tensor], batch_size: int) -> Tensor:
        """Log each weighted alignment term as ``train/align_<name>``; return their sum (0 without any)."""
        for name, value in terms.items():
            self.log(f"train/align_{name}", value, batch_size=batch_size)
        return sum(terms.values(), torch.zeros((), device=self.device))
