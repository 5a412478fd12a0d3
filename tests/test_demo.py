"""The demo end to end on a tiny data set: both recipes fit, the report compares them, pictures are written."""

from __future__ import annotations

import json

from lightning_modules.demos.haltingvt import RunResult, main, report, verdict
from tests.quick import quick_overrides


def test_verdict_applies_both_targets():
    dense = RunResult("dense", 0.9775, 0.0671)
    assert verdict(dense, RunResult("h", 0.9600, 0.0400))["met"]  # -1.75 points at 59.6%
    assert not verdict(dense, RunResult("h", 0.9550, 0.0300))["met"]  # -2.25 points
    assert not verdict(dense, RunResult("h", 0.9800, 0.0410))["met"]  # 61.1% of the GFLOPs
    assert "NOT met" in report(dense, RunResult("h", 0.5, 0.05))
    assert "0.0200 GFLOPs/clip executed, 50.0% of" in report(dense, RunResult("h", 0.96, 0.04), 0.02)


def test_demo_runs_both_recipes_and_draws(tmp_path, synthetic_classification):
    overrides = [
        *quick_overrides(tmp_path, synthetic_classification), "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=2", "--trainer.check_val_every_n_epoch=1",
    ]  # fmt: skip
    summary = main(["--out", str(tmp_path / "demo"), "--max-epochs", "1", "--maps", "3", "--", *overrides])
    saved = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert saved == summary
    assert 0 < summary["haltingvt"]["gmacs"] and 0 < summary["dense"]["gmacs"]
    assert summary["gmacs_fraction"] == summary["haltingvt"]["gmacs"] / summary["dense"]["gmacs"]
    assert 0 < summary["haltingvt_early_exit_gmacs"] <= summary["haltingvt"]["gmacs"] * (1 + 1e-6)
    assert (tmp_path / "demo" / "accuracy_vs_macs.png").stat().st_size > 0
    maps = sorted(p.name for p in (tmp_path / "demo" / "halting_maps").glob("*.png"))
    assert len(maps) == 3 and len({m.split("_")[0] for m in maps}) == 3  # three different classes
