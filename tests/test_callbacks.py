"""Callbacks of the recipes: the validation schedule against the official rule it reproduces, the progress lines of a
batch log, the model summary."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import lightning as L
import pytest
import yaml
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger

from lightning_modules.callbacks import ProgressReport, RunModelSummary, ValidationSchedule

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


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


class LossLogged(BoringModel):
    """Logs its training loss to the progress bar and keeps every value, the reference for the printed lines."""

    def __init__(self):
        super().__init__()
        self.losses: list[float] = []
        self.lrs: list[float] = []

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.log("train/loss", out["loss"], prog_bar=True)
        self.losses.append(float(out["loss"].detach()))
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        return out

    def validation_step(self, batch, batch_idx):
        out = super().validation_step(batch, batch_idx)
        self.log("val/loss", out["x"])
        return out


def plain_fit(tmp_path, **progress) -> tuple[LossLogged, L.Trainer]:
    model = LossLogged()
    trainer = L.Trainer(
        max_epochs=2, limit_train_batches=7, limit_val_batches=2, num_sanity_val_steps=1,
        callbacks=[ProgressReport(every_n_steps=3, **progress)], default_root_dir=tmp_path,
        logger=CSVLogger(tmp_path), enable_checkpointing=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model)
    return model, trainer


TRAIN_LINE = re.compile(r"^Epoch\(train\) \[(\d)/2\]\[(\d)/7\]  eta: (\S+)  time: \S+  it/s: \S+  lr: (\S+)  (.*)$")


def test_batch_log_gets_plain_lines_with_loss_lr_and_eta(tmp_path, capsys):
    """stdout is not a terminal here (pytest captures it): a line every 3 batches and at each epoch's end, with the
    loss the model logged last, the optimiser's lr at that step and an ETA that reaches 0 on the fit's last batch."""
    model, trainer = plain_fit(tmp_path)
    lines = capsys.readouterr().out.splitlines()
    train = [m for m in map(TRAIN_LINE.match, lines) if m]
    assert [(int(m[1]), int(m[2])) for m in train] == [(1, 3), (1, 6), (1, 7), (2, 3), (2, 6), (2, 7)]
    for m in train:
        step = (int(m[1]) - 1) * 7 + int(m[2])
        assert f"train/loss: {model.losses[step - 1]:.4f}" in m[5]
        assert float(m[4]) == pytest.approx(model.lrs[step - 1], rel=1e-4)
        assert "max_mem: " in m[5] and "v_num" not in m[5]
    assert train[-1][3] == "0:00:00"
    done = [line for line in lines if line.startswith("Epoch(val)") and " done in " in line]
    assert [line.split("]")[0] for line in done] == ["Epoch(val) [1/2", "Epoch(val) [2/2"]  # no sanity-check line
    assert f"val/loss: {float(trainer.callback_metrics['val/loss']):.4f}" in done[-1]


def test_a_terminal_keeps_the_rich_bar(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    plain_fit(tmp_path)
    assert "Epoch(train)" not in capsys.readouterr().out
    plain_fit(tmp_path / "forced", plain=True)
    assert "Epoch(train) [2/2][7/7]" in capsys.readouterr().out


def test_progress_metrics_leave_out_the_loggers_version(tmp_path):
    model, trainer = plain_fit(tmp_path)
    assert "v_num" in RichProgressBar().get_metrics(trainer, model)  # what Lightning's bar shows
    shown = ProgressReport().get_metrics(trainer, model)
    assert "v_num" not in shown and "train/loss" in shown


def test_model_summary_counts_parameters_without_a_flops_total(tmp_path, capsys):
    model = BoringModel()
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=1, limit_val_batches=0, callbacks=[RunModelSummary()], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model)
    out = capsys.readouterr().out
    total = sum(p.numel() for p in model.parameters())
    assert f"Total params: {total:,}" in out and "Linear" in out
    assert "FLOPs" not in out


def test_the_cli_adds_the_report_and_summary_unless_a_recipe_names_its_own():
    from jsonargparse import Namespace

    from lightning_modules.cli import default_callbacks

    trainer = Namespace(
        callbacks=[Namespace(class_path="lightning.pytorch.callbacks.LearningRateMonitor")],
        enable_progress_bar=None, enable_model_summary=None,
    )  # fmt: skip
    assert [type(c) for c in default_callbacks(trainer, fit=True)] == [ProgressReport, RunModelSummary]
    assert [type(c) for c in default_callbacks(trainer, fit=False)] == [ProgressReport]
    trainer.callbacks.append(Namespace(class_path="lightning.pytorch.callbacks.TQDMProgressBar"))
    assert [type(c) for c in default_callbacks(trainer, fit=True)] == [RunModelSummary]
    trainer.enable_model_summary = False
    assert default_callbacks(trainer, fit=True) == []


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml") if not p.name.startswith("blockdrop")))
def test_paper_recipes_report_progress_in_plain_lines(recipe):
    """Each training recipe (the block-drop ones take their trainer from the detector's recipe)."""
    callbacks = yaml.safe_load((RECIPES / recipe).read_text())["trainer"].get("callbacks") or []
    bars = [c["class_path"] for c in callbacks if "Progress" in c["class_path"]]
    assert bars == ["lightning_modules.callbacks.ProgressReport"]


def test_the_epochs_clock_survives_a_validation_inside_it_and_a_resume(tmp_path, capsys):
    """A validation in the middle of an epoch (val_check_interval 0.5) times itself on its own clock; the epoch's
    rate counts from the first batch this process trained (a resumed epoch starts after batch 0)."""
    from lightning_modules.callbacks import _Pass

    report = ProgressReport(plain=True, every_n_steps=1)
    clocks = []

    class Spy(L.Callback):
        def on_validation_start(self, trainer, pl_module):
            clocks.append(report._train)

        def on_validation_end(self, trainer, pl_module):
            clocks.append(report._train)

    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=4, limit_val_batches=1, val_check_interval=0.5, num_sanity_val_steps=0,
        callbacks=[report, Spy()], default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(LossLogged())
    assert len(clocks) == 4 and clocks[0] is clocks[1] is clocks[2] is clocks[3]
    assert clocks[0].first == 0 and clocks[0].last_batch == 4
    resumed = _Pass()
    resumed.begin(1000)
    resumed.start -= 10.0  # ten seconds ago
    _, rate = resumed.lap(1010)
    assert rate == pytest.approx(1.0, rel=0.05)  # 10 batches in 10 s, not 1010
