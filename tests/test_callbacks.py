"""Callbacks of the recipes: the validation schedule against the official rule it reproduces."""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_modules.callbacks import ValidationSchedule


def pyslowfast_validates(epoch0: int, max_epoch: int, eval_period: int, test_after_epoch: int) -> bool:
    """EVAD's train_net.py: evaluate when misc.is_eval_epoch (the last epoch, or (e + 1) % EVAL_PERIOD == 0)
    or cur_epoch >= TRAIN.TEST_AFTER_EPOCH, with 0-based epochs."""
    return epoch0 + 1 == max_epoch or (epoch0 + 1) % eval_period == 0 or epoch0 >= test_after_epoch


def test_evad_schedule_equals_the_official_rule():
    schedule = ValidationSchedule(first_epoch=5)
    ours = [e for e in range(1, 13) if schedule.validates(e, 12)]
    official = [e + 1 for e in range(12) if pyslowfast_validates(e, 12, eval_period=5, test_after_epoch=5)]
    assert ours == official == [5, 6, 7, 8, 9, 10, 11, 12]


class Recorded(BoringModel):
    def __init__(self):
        super().__init__()
        self.validated: list[int] = []

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self.validated.append(self.current_epoch + 1)


@pytest.mark.parametrize(
    ("first", "every", "expected"), [(3, 2, [3, 5, 6]), (1, 1, [1, 2, 3, 4, 5, 6]), (7, 1, [6])]
)
def test_a_fit_validates_on_the_scheduled_epochs(tmp_path, first, every, expected):
    model = Recorded()
    trainer = L.Trainer(
        max_epochs=6, limit_train_batches=2, limit_val_batches=1, callbacks=[ValidationSchedule(first, every)],
        default_root_dir=tmp_path, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model)
    assert model.validated == expected
