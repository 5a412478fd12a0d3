"""The compress command end to end on a tiny detector: rounds, records, report, export, resume."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datamodules.synthetic import generate_temporal
from lightning_modules.cli import main as cli_main
from lightning_modules.compression.command import main as compress
from lightning_modules.runs import SIGTERM_EXIT
from models.torch_files import TorchFileError
from tests.helpers import Payload
from tests.quick import tiny_tad

REPO = Path(__file__).resolve().parents[1]


def tiny(run_dir: Path, data: Path) -> list[str]:
    """The tiny TAD recipe with 3 blocks, no W&B, 2 training batches per epoch."""
    return [
        *tiny_tad(run_dir, data), "--model.init_args.backbone.init_args.vit.init_args.depth=3",
        "--model.init_args.backbone.init_args.finetune=lora", "--model.init_args.head.init_args.embed_dim=16",
        "--model.init_args.head.init_args.head_channels=16", "--trainer.logger=lightning_modules.runs.RunCSVLogger",
        f"--trainer.logger.init_args.save_dir={run_dir}", "--trainer.limit_train_batches=2",
        "--trainer.check_val_every_n_epoch=1", "--trainer.callbacks=[]",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A temporal set and a detector fitted on it for one epoch (its last checkpoint)."""
    root = tmp_path_factory.mktemp("compress")
    data = generate_temporal(root / "set", num_videos=6, size=32, seconds=6, fps=10)
    cli_main(["fit", *tiny(root / "fit", data), "--trainer.max_epochs=1", "--run_id=teacher"])
    return data, root / "fit" / "teacher" / "checkpoints" / "last.ckpt"


def compress_args(out: Path, data: Path, checkpoint: Path, *extra: str) -> list[str]:
    return [
        *tiny(out / "runs", data), f"--compress.checkpoint={checkpoint}", f"--compress.out_dir={out}",
        "--compress.epochs=1", "--compress.score_batches=1",
        '--compress.score_data={"eval_subset": "training", "eval_max_videos": 2}', *extra,
    ]  # fmt: skip


def test_two_rounds_by_training_loss_record_report_and_export(tmp_path, trained, capsys):
    data, checkpoint = trained
    out = tmp_path / "bd"
    records = compress(
        compress_args(out, data, checkpoint, "--compress.metric=train_loss", "--compress.max_blocks=2")
    )
    printed = capsys.readouterr().out
    assert [r["round"] for r in records] == [0, 1, 2]
    assert records[0]["kept"] == [0, 1, 2] and len(records[2]["kept"]) == 1
    for r in records[1:]:
        scores = {int(b): v for b, v in r["scores"].items()}
        assert r["chosen"] == [min(scores, key=scores.get)]  # the drop that hurts the training loss least
        assert set(scores) == set(records[r["round"] - 1]["kept"])
    assert records[2]["dropped"] == records[1]["chosen"] + records[2]["chosen"]
    # One block of three fewer: the MACs fall by one block's cost each round.
    per_block = records[0]["gmacs"] - records[1]["gmacs"]
    assert (
        per_block > 0
        and abs((records[1]["gmacs"] - records[2]["gmacs"]) - per_block) < 1e-6 * records[0]["gmacs"]
    )
    assert json.loads((out / "rounds.json").read_text()) == records
    report = (out / "report.md").read_text()
    assert report in printed and len(report.strip().splitlines()) == 2 + 3
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    # The exported model is an ordinary TAD checkpoint: validate scores it as the last round did.
    validated = cli_main([
        "validate", *tiny(tmp_path / "v", data), "--config", str(out / "compressed.yaml"),
        f"--ckpt_path={out / 'compressed.ckpt'}",
    ])  # fmt: skip
    assert validated.model.block_stack().block_ids == records[2]["kept"]
    assert abs(float(validated.trainer.callback_metrics["val/average_mAP"]) - records[2]["score"]) < 1e-6
    # A finished compression re-run does nothing new; as a process it exits 0 with nothing on stderr but logs.
    args = compress_args(out, data, checkpoint, "--compress.metric=train_loss", "--compress.max_blocks=2")
    again = compress(args)
    assert again == records
    done = subprocess.run(
        [sys.executable, "-m", "lightning_modules", "compress", *args], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert report in done.stdout and "'round'" not in done.stderr  # no record list printed as an exit message
    # The folder records its source; another checkpoint is refused there before anything is built.
    source = json.loads((out / "source.json").read_text())
    assert source["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    other = tmp_path / "other.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state["global_step"] += 1
    torch.save(state, other)
    with pytest.raises(FileExistsError, match=r"holds the compression of .*last\.ckpt.*not of .*other\.ckpt"):
        compress(compress_args(out, data, other, "--compress.metric=train_loss", "--compress.max_blocks=2"))
    assert json.loads((out / "rounds.json").read_text()) == records


@pytest.mark.parametrize(
    ("extra", "env"),
    [(["--trainer.devices=2", "--trainer.accelerator=cpu"], {}), (["--trainer.num_nodes=2"], {}),
     ([], {"WORLD_SIZE": "2"}), ([], {"SLURM_NTASKS": "4"})],
)  # fmt: skip
def test_compress_refuses_several_processes_with_the_way_to_launch_it(tmp_path, trained, monkeypatch, extra, env):
    data, checkpoint = trained
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=r"compress runs as one process.*--trainer\.devices=1"):
        compress(compress_args(tmp_path / "bd", data, checkpoint, *extra))
    assert not (tmp_path / "bd" / "rounds.json").exists()


def test_compress_never_runs_code_from_its_checkpoint(tmp_path, trained):
    """The trained checkpoint with one object more, which calls a function when unpickled: compress refuses the
    file, naming what to use, and the call never happens (a checkpoint of this project holds no such object)."""
    data, checkpoint = trained
    marker = tmp_path / "ran"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state["extra"] = Payload(str(marker))
    torch.save(state, tmp_path / "hostile.ckpt")
    with pytest.raises(TorchFileError, match="nothing in it ran"):
        compress(compress_args(tmp_path / "bd", data, tmp_path / "hostile.ckpt", "--compress.max_blocks=1"))
    assert not marker.exists()


def test_fixed_blocks_and_no_recovery(tmp_path, trained):
    data, checkpoint = trained
    out = tmp_path / "fixed"
    args = compress_args(out, data, checkpoint, "--compress.blocks=[2, 0]", "--compress.max_blocks=2",
                         "--compress.recovery=none", "--compress.head_trainable=false")  # fmt: skip
    records = compress(args)
    assert [r["chosen"] for r in records[1:]] == [[2], [0]] and records[2]["kept"] == [1]
    assert records[1]["trainable_params"] == 0
    # Without recovery the model is the original minus the blocks: its weights are the trained ones.
    state = torch.load(out / "round_2" / "model.pt", weights_only=False)["state_dict"]
    original = torch.load(checkpoint, weights_only=False)["state_dict"]
    assert torch.equal(
        state["detector.backbone.vit.blocks.0.mlp.fc1.weight"],
        original["detector.backbone.vit.blocks.1.mlp.fc1.weight"],
    )


@pytest.mark.parametrize(("sig", "step"), [("SIGKILL", 3), ("SIGTERM", 2)])
def test_killed_in_a_recovery_the_same_command_resumes_at_the_round_and_epoch(tmp_path, trained, sig, step):
    """Killed (SIGKILL), or stopped by a scheduler (SIGTERM: status 143, the last epoch's checkpoint kept), in a
    recovery's second epoch: the same command continues from the first epoch's end and ends as the uninterrupted
    command does."""
    data, checkpoint = trained
    settings = [
        "--compress.metric=feature_mse", "--compress.max_blocks=2", "--compress.epochs=2",
        "--compress.eval_first_epoch=1", "--compress.eval_every=1",  # every epoch's validation in the log
    ]  # fmt: skip
    out = tmp_path / "killed"
    kill = [
        "--trainer.callbacks+=tests.helpers.KillAt",
        f"--trainer.callbacks.step={step}",
        f"--trainer.callbacks.sig={sig}",
    ]  # round 1, second (last) epoch (a SIGTERM stops at the next batch: sent at its first)
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    env.pop("EVT_RUN_ID", None)
    with (tmp_path / "killed.log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lightning_modules", "compress", *compress_args(out, data, checkpoint, *settings, *kill)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        # Meanwhile, on the other core, the uninterrupted command in this process: the reference for the end.
        reference = compress(compress_args(tmp_path / "straight", data, checkpoint, *settings))
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    expected = -signal.SIGKILL if sig == "SIGKILL" else SIGTERM_EXIT
    assert proc.returncode == expected, (tmp_path / "killed.log").read_text()[-2000:]
    last = out / "round_1" / "recovery" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2  # the first epoch's end
    assert not (out / "round_1" / "model.pt").exists()
    choice = (out / "round_1" / "choice.json").stat().st_mtime_ns

    records = compress(compress_args(out, data, checkpoint, *settings))
    assert (out / "round_1" / "choice.json").stat().st_mtime_ns == choice  # scored once
    rows = (out / "round_1" / "recovery" / "metrics.csv").read_text().splitlines()
    epochs = sorted({int(r.split(",")[0]) for r in rows[1:] if r.split(",")[0].isdigit()})
    assert epochs == [0, 1]  # the resumed fit went on from epoch 1, in the same log
    # The result is the uninterrupted command's.
    for got, want in zip(records, reference, strict=True):
        assert got["chosen" if got["round"] else "kept"] == want["chosen" if want["round"] else "kept"]
        assert abs(got["score"] - want["score"]) < 1e-6 and abs(got["gmacs"] - want["gmacs"]) < 1e-9


def test_the_dense_quickstart_classifier_compresses_by_top1_on_training_videos(
    tmp_path, synthetic_classification
):
    """Generic over ViTs: the quickstart classifier, scored by validation top-1 on a training list (the ``map``
    metric through the task's own evaluation), recovered with LoRA and the class-score alignment."""
    from tests.quick import quick_overrides

    recipe = REPO / "recipes" / "quickstart" / "synthetic_dense_vit.yaml"
    base = [
        "--config", str(recipe), *quick_overrides(tmp_path / "runs", synthetic_classification),
        "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2", "--trainer.callbacks=[]",
    ]  # fmt: skip
    cli_main(["fit", *base, "--trainer.max_epochs=1", "--run_id=teacher"])
    checkpoint = tmp_path / "runs" / "teacher" / "checkpoints" / "last.ckpt"
    out = tmp_path / "bd"
    records = compress([
        *base, f"--compress.checkpoint={checkpoint}", f"--compress.out_dir={out}", "--compress.metric=map",
        "--compress.score_key=val/top1", '--compress.score_data={"val_list": "train.txt"}', "--compress.max_blocks=1",
        "--compress.epochs=1",
    ])  # fmt: skip
    scores = {int(b): v for b, v in records[1]["scores"].items()}
    assert sorted(scores) == [0, 1, 2, 3] and all(0 <= v <= 1 for v in scores.values())
    best = max(scores.values())
    assert records[1]["chosen"] == [min(b for b, v in scores.items() if v == best)]
    validated = cli_main([
        "validate", *base, "--config", str(out / "compressed.yaml"), f"--ckpt_path={out / 'compressed.ckpt'}",
    ])  # fmt: skip
    assert validated.model.backbone.block_ids == records[1]["kept"]
    assert abs(float(validated.trainer.callback_metrics["val/top1"]) - records[1]["score"]) < 1e-6


def test_haltingvt_compresses_its_joint_blocks_and_the_export_validates_to_the_recorded_score(
    tmp_path, synthetic_classification
):
    """HaltingVT through the same protocol: only joint blocks are candidates (the Glimpser stays), the recovery
    aligns block outputs and class scores on the masked path (prior loss on: its depth prior follows the drop),
    and the exported compressed model loads and validates to the last round's score."""
    from tests.quick import quick_overrides

    recipe = REPO / "recipes" / "quickstart" / "synthetic_haltingvt.yaml"
    base = [
        "--config", str(recipe), *quick_overrides(tmp_path / "runs", synthetic_classification),
        "--data.init_args.num_frames=4", "--model.init_args.backbone.init_args.num_frames=4",
        "--model.init_args.prior_weight=0.1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2",
        "--trainer.callbacks=[]",
    ]  # fmt: skip
    cli_main(["fit", *base, "--trainer.max_epochs=1", "--run_id=teacher"])
    checkpoint = tmp_path / "runs" / "teacher" / "checkpoints" / "last.ckpt"
    out = tmp_path / "bd"
    records = compress([
        *base, f"--compress.checkpoint={checkpoint}", f"--compress.out_dir={out}", "--compress.metric=train_loss",
        "--compress.score_batches=1", "--compress.max_blocks=2", "--compress.epochs=1", "--compress.score_key=val/top1",
    ])  # fmt: skip
    assert records[0]["kept"] == [0, 1, 2, 3, 4, 5]
    assert sorted(int(b) for b in records[1]["scores"]) == [2, 3, 4, 5]  # the joint blocks only
    assert records[2]["gmacs"] < records[1]["gmacs"] < records[0]["gmacs"]
    validated = cli_main([
        "validate", *base, "--config", str(out / "compressed.yaml"), f"--ckpt_path={out / 'compressed.ckpt'}",
    ])  # fmt: skip
    assert validated.model.backbone.block_ids == records[2]["kept"] and len(records[2]["kept"]) == 4
    assert abs(float(validated.trainer.callback_metrics["val/top1"]) - records[2]["score"]) < 1e-6
    # The compact training path removes halted tokens: feature alignment is refused before anything is built.
    with pytest.raises(ValueError, match="training_path: masked"):
        compress([
            *base, "--model.init_args.training_path=compact", f"--compress.checkpoint={checkpoint}",
            f"--compress.out_dir={tmp_path / 'refused'}",
        ])  # fmt: skip
    assert not (tmp_path / "refused").exists()


def test_a_task_without_the_protocol_is_refused_at_set_up(tmp_path):
    """EVAD does not implement block drop: compress names the task and the protocol before reading anything."""
    recipe = REPO / "recipes" / "quickstart" / "evad_synthetic.yaml"
    with pytest.raises(TypeError, match=r"SpatioTemporalDetection .*cannot be compressed.*Compressible"):
        compress([
            "--config", str(recipe), f"--compress.checkpoint={tmp_path / 'none.ckpt'}",
            f"--compress.out_dir={tmp_path / 'bd'}",
        ])  # fmt: skip


def test_several_seeds_report_mean_and_deviation(tmp_path, trained):
    import statistics

    data, checkpoint = trained
    out = tmp_path / "seeds"
    runs = compress([
        *compress_args(out, data, checkpoint, "--compress.metric=random", "--compress.max_blocks=1",
                       "--compress.epochs=0"), "--seeds=[0, 1]",
    ])  # fmt: skip
    assert sorted(runs) == [0, 1] and all((out / f"seed_{s}" / "rounds.json").is_file() for s in runs)
    picks = [runs[s][1]["chosen"] for s in runs]
    assert all(len(p) == 1 and p[0] in (0, 1, 2) for p in picks)
    row = (out / "seeds.md").read_text().splitlines()[3]  # round 1
    scores = [100 * runs[s][1]["score"] for s in runs]
    assert row.startswith(f"| 1 | {statistics.mean(scores):.2f} | {statistics.stdev(scores):.2f} | 2 |")


def test_demo_compresses_the_given_detector_and_judges_the_target(tmp_path, trained):
    from lightning_modules.demos.blockdrop import main as demo
    from lightning_modules.demos.blockdrop import report, verdict

    data, checkpoint = trained
    summary = demo([
        f"--checkpoint={checkpoint}", f"--out={tmp_path / 'demo'}", "--",
        *compress_args(tmp_path / "bd", data, checkpoint, "--compress.metric=train_loss", "--compress.epochs=0"),
    ])  # fmt: skip
    assert summary["blocks_dropped"] == 2 and (tmp_path / "bd" / "report.md").is_file()
    rounds = summary["rounds"]
    assert (
        summary["average_mAP_after"] == rounds[2]["score"]
        and summary["average_mAP_before"] == rounds[0]["score"]
    )
    # The verdict on hand-made records: 2 points below is within, 2.5 is not; too slow is not.
    made = [{"score": 0.70, "gmacs": 1.0, "dropped": []}, {"score": 0.69, "gmacs": 0.8, "dropped": [3]},
            {"score": 0.68, "gmacs": 0.6, "dropped": [3, 0]}]  # fmt: skip
    assert verdict(made, 10.0)["met"] and "met" in report(verdict(made, 10.0))
    made[2]["score"] = 0.675
    assert not verdict(made, 10.0)["met"]
    made[2]["score"] = 0.69
    assert not verdict(made, 15.5)["met"] and "NOT met" in report(verdict(made, 15.5))
    made[2]["rejected"] = True  # a rejected round does not count: one block kept
    assert verdict(made, 10.0)["blocks_dropped"] == 1 and not verdict(made, 10.0)["met"]


def test_stopping_rules_macs_latency_and_score_tolerance(tmp_path, trained):
    from lightning_modules.compression.settings import BlockDrop

    data, checkpoint = trained
    fixed = ["--compress.blocks=[2, 0]", "--compress.max_blocks=2", "--compress.epochs=0"]
    # Already at the latency target: nothing is dropped, the export is the uncompressed model.
    out = tmp_path / "latency"
    records = compress(compress_args(out, data, checkpoint, *fixed, "--compress.latency_target=1.0",
                                     "--compress.latency_repeats=1"))  # fmt: skip
    assert len(records) == 1 and records[0]["latency_ms"] > 0
    assert torch.load(out / "compressed.ckpt", weights_only=False)["dropped"] == []
    # A MACs target one block reaches stops after that block.
    one_block = records[0]["gmacs"] * 0.95  # any drop of one of the 3 blocks reaches it
    records = compress(compress_args(tmp_path / "macs", data, checkpoint, *fixed,
                                     f"--compress.macs_target={one_block / records[0]['gmacs']}"))  # fmt: skip
    assert [r["round"] for r in records] == [0, 1] and records[1]["gmacs"] <= one_block
    # A round below the tolerance (here one no score can meet) is rejected and the one before it exported.
    records = compress(
        compress_args(tmp_path / "tol", data, checkpoint, *fixed, "--compress.score_tolerance=-1.0")
    )
    assert len(records) == 2 and records[1]["rejected"]
    assert torch.load(tmp_path / "tol" / "compressed.ckpt", weights_only=False)["dropped"] == []
    with pytest.raises(ValueError, match="latency_repeats"):
        BlockDrop(checkpoint="x", latency_target=0.8)


def test_relu_stage_sparsity_export_and_the_wandb_table(tmp_path, trained, monkeypatch):
    """The ReLU stage recovers the kept model with ReLU MLPs and measures their sparsity; its export validates
    to the same score; the per-round table and the summary a sweep optimises land in a real (offline) W&B run."""
    from lightning_modules.compression.report import COLUMNS, SUMMARY_KEYS
    from lightning_modules.compression.report import summary as expected_summary

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_RUN_ID", "trial7")  # as a sweep agent sets it
    data, checkpoint = trained
    wandb_logger = '--trainer.logger=[{"class_path": "lightning_modules.loggers.AutoWandbLogger"}]'
    args = compress_args(
        tmp_path / "bd" / "{run_id}", data, checkpoint, "--compress.blocks=[1]", "--compress.max_blocks=1",
        "--compress.relu_stage=true", "--compress.relu_epochs=1", "--compress.sparsity_batches=2", wandb_logger,
    )  # fmt: skip
    records = compress(args)
    out = tmp_path / "bd" / "trial7"  # {run_id}: the sweep trial's W&B run id
    assert [r["round"] for r in records] == [0, 1, "relu"]
    assert json.loads((out / "rounds.json").read_text()) == records
    relu = records[-1]
    assert relu["from_round"] == 1 and relu["dropped"] == [1] and relu["recovery_epochs"] == 1
    assert relu["sparsity_gelu"] < 0.01 < 0.2 < relu["sparsity"]
    assert "ReLU stage" in (out / "report.md").read_text()
    validated = cli_main([
        "validate", *tiny(tmp_path / "v", data), "--config", str(out / "compressed_relu.yaml"),
        f"--ckpt_path={out / 'compressed_relu.ckpt'}",
    ])  # fmt: skip
    stack = validated.model.block_stack()
    assert stack.block_ids == [0, 2] and all(isinstance(b.mlp.act, torch.nn.ReLU) for b in stack.blocks)
    assert abs(float(validated.trainer.callback_metrics["val/average_mAP"]) - relu["score"]) < 1e-6
    # W&B: one run "<compression id>-rounds" with the table and the summary, read back from W&B's own files.
    (run,) = [p for p in (out / "wandb").glob("offline-run-*") if p.name.endswith("-rounds")]
    logged = wandb_values(next(run.glob("*.wandb")).read_bytes())
    for key, value in expected_summary(records).items():
        assert logged[key] == pytest.approx(value)
    assert set(SUMMARY_KEYS) <= set(logged)
    # The kept round's score, not the ReLU stage's.
    assert logged["compress/score"] == pytest.approx(records[1]["score"])
    (table_file,) = (run / "files" / "media" / "table" / "compress").glob("rounds_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == list(COLUMNS) and [row[0] for row in table["data"]] == ["0", "1", "relu"]
    assert [row[2] for row in table["data"]] == [3, 2, 2]


def wandb_values(record_file: bytes) -> dict[str, object]:
    """The last value logged under each ``compress/...`` key in a W&B run file: its history items are protobuf
    (key, value_json) pairs, the value's field tagged 0x82 0x01 and prefixed by its (one-byte) length."""
    import re

    values = {}
    for match in re.finditer(rb"(compress/[a-z_]+)\x82\x01(.)", record_file, flags=re.DOTALL):
        start, length = match.end(), match.group(2)[0]
        values[match.group(1).decode()] = json.loads(record_file[start : start + length])
    return values


def test_keep_best_first_round_schedule_and_validation_epochs(tmp_path, trained):
    """Round 1 trains first_round_epochs, later rounds epochs; a recovery validates at eval_first_epoch and every
    eval_every epochs after it and at its last; keep: best ends the round with its best validated epoch."""
    import csv

    data, checkpoint = trained
    out = tmp_path / "best"
    args = compress_args(
        out, data, checkpoint, "--compress.blocks=[2, 0]", "--compress.max_blocks=2", "--compress.epochs=3",
        "--compress.first_round_epochs=2", "--compress.eval_first_epoch=1", "--compress.eval_every=2",
        "--compress.keep=best",
    )  # fmt: skip
    records = compress(args)
    assert [r["recovery_epochs"] for r in records[1:]] == [2, 3]
    (log,) = (out / "round_2").rglob("metrics.csv")
    rows = list(csv.DictReader(log.open()))
    validated = {int(r["epoch"]): float(r["val/average_mAP"]) for r in rows if r.get("val/average_mAP")}
    assert sorted(validated) == [0, 2]  # epochs 1 and 3 (1-based): the first, then every second, the last
    assert records[2]["kept_epoch"] - 1 in validated
    assert records[2]["kept_score"] == pytest.approx(max(validated.values()), abs=1e-6)
    (best,) = (out / "round_2").rglob("best.ckpt")
    kept = torch.load(out / "round_2" / "model.pt", weights_only=True)["state_dict"]
    chosen = torch.load(best, weights_only=True)["state_dict"]
    head = [k for k in chosen if k.startswith("detector.head.") and chosen[k].is_floating_point()]
    assert head and all(torch.equal(kept[k], chosen[k]) for k in head)  # the head has no LoRA to merge


def test_rounds_of_an_unknown_checkpoint_are_refused_and_the_demo_clears_its_own(tmp_path, trained, capsys):
    """Rounds without the record of their checkpoint (a folder older than source.json) are refused, not taken as
    rounds of the checkpoint given; the demo, which owns its folder, removes another detector's rounds."""
    from lightning_modules.demos.blockdrop import clear_other_detector

    data, checkpoint = trained
    out = tmp_path / "old"
    out.mkdir()
    (out / "rounds.json").write_text("[]")
    with pytest.raises(FileExistsError, match="without a record of the checkpoint they compress"):
        compress(compress_args(out, data, checkpoint, "--compress.max_blocks=1"))
    clear_other_detector(out, checkpoint)
    assert not out.exists() and "another detector: removed" in capsys.readouterr().out
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "rounds.json").write_text("[]")
    (mine / "source.json").write_text(json.dumps({"sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest()}))
    clear_other_detector(mine, checkpoint)
    assert (mine / "rounds.json").is_file()  # the same detector: kept, to resume
