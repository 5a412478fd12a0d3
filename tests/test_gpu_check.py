"""``make gpu-check`` cannot rot: its tiny mode runs every step on the CPU (the SDPA backends the CPU has, bf16
autocast of each model, the RoIAlign paths, a one-process DDP fit of each quickstart recipe through the CLI, and
every benchmark) and writes the JSON it returns."""

from __future__ import annotations

import json

import pytest

from benchmarks import gpu_check

STEPS = (
    "sdpa_backends", "bf16_vs_fp32", "roi_align", "device_transforms", "ddp_fits", "evad", "haltingvt", "blockdrop",
    "tad_training",
)  # fmt: skip


@pytest.mark.slow
def test_tiny_gpu_check_runs_every_step(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    results = gpu_check.main(["--tiny", "--out", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    failed = {step: results[step] for step in STEPS if not results[step].get("ok", True)}
    assert failed == {} and results["ok"], failed
    for step in STEPS:
        assert "error" not in results[step] and f"{step}: " in printed
    backends = results["sdpa_backends"]["backends"]
    assert backends["math_float32"]["ran"] and backends["flash_attention_float32"]["ran"]  # the CPU's two
    assert set(results["ddp_fits"]["recipes"]) == set(gpu_check.QUICKSTARTS)
    assert set(results["bf16_vs_fp32"]["models"]) == {"evad", "haltingvt", "dense_vit", "tad_detector"}
    assert len(results["blockdrop"]["latency_ratio"]) == 4 and results["blockdrop"]["macs_ratio"][0] == 1.0
    assert set(results["tad_training"]) == {"plain", "checkpointing", "seconds_taken"}
    assert results["device"] == "cpu" and results["tiny"] is True


def test_without_cuda_the_full_check_says_to_use_tiny(capsys, monkeypatch):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as done:
        gpu_check.main(["--out", "unused.json"])
    assert done.value.code == 2 and "--tiny" in capsys.readouterr().err
