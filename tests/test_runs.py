"""Runs that survive: run directories, fresh last.ckpt, resume after SIGKILL and SIGTERM, workers that die with
their trainer, W&B off when disabled, per-stage skip counts, and clear errors for unusable data."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest import mock

import psutil
import pytest
import torch

from datamodules.base import AnnotationError
from datamodules.classification import VideoClassificationDataModule
from lightning_modules.cli import main
from lightning_modules.pictures.tradeoff import read_run_result
from lightning_modules.runs import SIGTERM_EXIT
from tests.quick import quick_overrides

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart" / "synthetic_dense_vit.yaml"
#: 3 epochs of 3 optimiser steps, validation every epoch on 2 batches.
SHORT = [
    "--trainer.max_epochs=3", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
    "--trainer.check_val_every_n_epoch=1", "--trainer.log_every_n_steps=1",
]  # fmt: skip


def args(run_root: Path, data: Path, *extra: str) -> list[str]:
    return ["--config", str(QUICKSTART), *quick_overrides(run_root, data), *SHORT, *extra]


def launch_fit(run_root: Path, data: Path, *extra: str) -> subprocess.Popen:
    """``python -m lightning_modules fit`` in its own process; its output goes to ``run_root/fit.log``, not a pipe,
    so processes it leaves behind cannot keep a reader waiting."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": str(REPO)}
    env.pop("EVT_RUN_ID", None)
    with (run_root / "fit.log").open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "lightning_modules", "fit", *args(run_root, data, *extra)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def ckpt_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def best_record(cli) -> tuple[float, str, dict[str, float]]:
    ckpt = cli.trainer.checkpoint_callback
    return (
        float(ckpt.best_model_score),
        Path(ckpt.best_model_path).name,
        {Path(k).name: float(v) for k, v in ckpt.best_k_models.items()},
    )


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, synthetic_classification):
    """Two fits in their own processes, started side by side and left running (each is one thread, and start-up is
    most of their time: the tests' own work here goes on meanwhile); a test takes one with ``finished``:

    - ``kill``: run k with a loader worker per loader (a fork server starts them), SIGKILLed before step 5, mid
      second epoch; a watcher records ``children``, the ids of its child processes then, and ``left``, those
      still alive 15 s after its exit;
    - ``term``: run t, sent SIGTERM before step 1, mid first epoch (before any last.ckpt of its own)."""
    root = tmp_path_factory.mktemp("interrupted")
    pids_file = root / "kill" / "children.json"
    extra = {
        "kill": ["--run_id=k", "--data.init_args.num_workers=1", "--trainer.callbacks+=tests.helpers.KillAt",
                 "--trainer.callbacks.step=5", f"--trainer.callbacks.pids_file={pids_file}",
                 "--trainer.logger.init_args.flush_logs_every_n_steps=1"],  # the rows of steps 3, 4 reach the file
        "term": ["--run_id=t", "--data.init_args.num_workers=1", "--trainer.callbacks+=tests.helpers.KillAt",
                 "--trainer.callbacks.step=1", "--trainer.callbacks.sig=SIGTERM",
                 "--trainer.logger.init_args.flush_logs_every_n_steps=1"],
    }  # fmt: skip
    runs = {}
    for name, more in extra.items():
        (root / name).mkdir()
        runs[name] = {"root": root / name, "proc": launch_fit(root / name, synthetic_classification, *more)}
    kill = runs["kill"]
    kill["watcher"] = threading.Thread(target=watch_children, args=(kill, pids_file), daemon=True)
    kill["watcher"].start()
    yield runs
    for r in runs.values():
        if r["proc"].poll() is None:
            r["proc"].kill()
            r["proc"].wait()


def watch_children(run: dict, pids_file: Path) -> None:
    """Once the killed run has exited: its child processes then (``children``), and those still alive 15 s later
    (``left``)."""
    try:
        run["proc"].wait(timeout=600)
    except subprocess.TimeoutExpired:
        return
    run["children"] = json.loads(pids_file.read_text()) if pids_file.is_file() else []
    gone_by = time.monotonic() + 15
    while any(alive(p) for p in run["children"]) and time.monotonic() < gone_by:
        time.sleep(0.5)
    run["left"] = [p for p in run["children"] if alive(p)]


def finished(run: dict) -> dict:
    """One of the ``interrupted`` runs once it has ended, with its ``returncode`` (None: still running after 10
    minutes, then killed) and ``output``."""
    if "returncode" not in run:
        try:
            run["returncode"] = run["proc"].wait(timeout=600)
        except subprocess.TimeoutExpired:
            run["returncode"] = None
            run["proc"].kill()
            run["proc"].wait()
        if "watcher" in run:
            run["watcher"].join()
        run["output"] = (run["root"] / "fit.log").read_text()
    return run


def train_losses(metrics: Path) -> dict[int, float]:
    with metrics.open() as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, synthetic_classification):
    """The reference: the same fit without interruption, in this process, without loader workers."""
    root = tmp_path_factory.mktemp("uninterrupted")
    cli = main(["fit", *args(root, synthetic_classification, "--run_id=ref")])
    return cli.trainer.global_step, best_record(cli), train_losses(root / "ref" / "metrics.csv")


def test_run_directory_layout(tmp_path, synthetic_classification):
    cli = main(["fit", *args(tmp_path, synthetic_classification, "--run_id=one", "--trainer.max_epochs=1")])
    run = tmp_path / "one"
    assert cli.trainer.default_root_dir == str(run)
    assert (run / "config.yaml").is_file() and (run / "metrics.csv").is_file()
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in names
    # the best checkpoint says its epoch and score (it read "epoch000-top10.1250", top-1 run into the value)
    best = [n for n in names if n != "last.ckpt"]
    assert len(best) == 1 and re.fullmatch(r"epoch000-top1_[01]\.\d{4}\.ckpt", best[0]), best
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one"]  # nothing written beside the run directory


def test_two_fits_of_one_process_in_the_same_second_get_their_own_runs(tmp_path, synthetic_classification):
    """A fresh run id is unique within the process: the second fit must start from scratch, not resume the first
    (the demo fits two different models back to back)."""
    quick = args(tmp_path, synthetic_classification, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
                 "--trainer.limit_val_batches=1")  # fmt: skip
    with mock.patch("time.strftime", return_value="20260101-000000"):  # both in the same second
        first = main(["fit", *quick])
        second = main(["fit", *quick, "--model.init_args.backbone.init_args.embed_dim=32"])
    assert first.trainer.default_root_dir != second.trainer.default_root_dir
    assert second.trainer.global_step == 1  # one step of its own, nothing resumed
    assert len([p for p in tmp_path.iterdir() if (p / "checkpoints" / "last.ckpt").is_file()]) == 2


def test_last_checkpoint_is_written_every_epoch_whatever_the_validation(tmp_path, synthetic_classification):
    main(["fit", *args(tmp_path, synthetic_classification, "--run_id=r", "--trainer.check_val_every_n_epoch=5",
                       "--trainer.max_epochs=2")])  # fmt: skip
    # No validation ran (every 5 epochs), yet last.ckpt holds the end of the second epoch.
    assert ckpt_state(tmp_path / "r" / "checkpoints" / "last.ckpt")["global_step"] == 6


def test_sigterm_saves_and_exits_nonzero_then_resumes(interrupted, synthetic_classification, uninterrupted):
    stopped = finished(interrupted["term"])
    assert stopped["returncode"] == SIGTERM_EXIT, stopped["output"][-2000:]
    root = stopped["root"]
    saved = ckpt_state(root / "t" / "checkpoints" / "last.ckpt")["global_step"]
    assert saved == 2  # saved mid-epoch (of 3 batches), where it stopped
    resumed = main(["fit", *args(root, synthetic_classification, "--run_id=t", "--data.init_args.num_workers=1")])
    assert resumed.trainer.global_step == uninterrupted[0]
    # Resumed mid-epoch (with a loader worker, as the stopped run had): every step trained on the batch the
    # uninterrupted run (no worker) trained on, so every loss is the same.
    losses = train_losses(root / "t" / "metrics.csv")
    assert sorted(losses) == sorted(uninterrupted[2]) == list(range(9))
    assert [losses[k] for k in range(9)] == pytest.approx([uninterrupted[2][k] for k in range(9)], rel=1e-5)
    # last.ckpt is the newest (no last-v1.ckpt beside a stale one), so a longer re-run continues from the end.
    checkpoints = root / "t" / "checkpoints"
    assert not list(checkpoints.glob("last-*.ckpt")) and ckpt_state(checkpoints / "last.ckpt")["global_step"] == 9
    longer = main(["fit", *args(root, synthetic_classification, "--run_id=t", "--trainer.max_epochs=4")])
    assert longer.trainer.global_step == 12
    with (root / "t" / "metrics.csv").open() as f:
        train_steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert train_steps == sorted(set(train_steps))  # no epoch trained twice


def test_sigkill_mid_epoch_then_resume_matches_the_uninterrupted_run(
    interrupted, synthetic_classification, uninterrupted
):
    killed = finished(interrupted["kill"])
    assert killed["returncode"] == -signal.SIGKILL, killed["output"][-2000:]
    root = killed["root"]
    last = root / "k" / "checkpoints" / "last.ckpt"
    assert ckpt_state(last)["global_step"] == 3  # killed in the second epoch: the first epoch's end is kept
    resumed = main(["fit", *args(root, synthetic_classification, "--run_id=k")])
    steps, record, _ = uninterrupted
    assert resumed.trainer.global_step == steps == 9
    assert best_record(resumed) == record  # same scores, same files: the first part's best is remembered
    with (root / "k" / "metrics.csv").open() as f:
        val_steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("val/top1")]
    assert val_steps == [2, 5, 8]  # one validation row per epoch: the lost part's rows were dropped
    with (root / "k" / "metrics.csv").open() as f:
        train_steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert train_steps == list(range(9))  # steps 3 and 4, logged before the kill, are in the file once


def test_a_truncated_last_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, synthetic_classification,
                                                                         caplog):  # fmt: skip
    """``last.ckpt`` cut in half (a disk that filled up under another writer): the re-run says so and continues
    from the run's newest intact checkpoint; the ``.part`` file of a killed write is removed at the start."""
    main(["fit", *args(tmp_path, synthetic_classification, "--run_id=r", "--trainer.max_epochs=2")])
    checkpoints = tmp_path / "r" / "checkpoints"
    last = checkpoints / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    stale = checkpoints / ".last.ckpt.999999999.part"
    stale.write_bytes(b"half")
    best = max((p for p in checkpoints.glob("epoch*.ckpt")), key=lambda p: p.stat().st_mtime_ns)
    with caplog.at_level(logging.WARNING):
        resumed = main(["fit", *args(tmp_path, synthetic_classification, "--run_id=r")])
    assert "last.ckpt cannot be read" in caplog.text and best.name in caplog.text
    assert resumed.trainer.global_step == 9 and not stale.exists()
    assert ckpt_state(last)["global_step"] == 9  # whole again


def test_a_second_fit_of_a_running_run_refuses_and_a_dead_owner_is_taken_over(tmp_path,
                                                                             synthetic_classification):  # fmt: skip
    run = tmp_path / "r"
    run.mkdir()
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (run / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": owner.pid}))
        with pytest.raises(RuntimeError, match=rf"is being trained by process {owner.pid}"):
            main(["fit", *args(tmp_path, synthetic_classification, "--run_id=r", "--trainer.max_epochs=1")])
        assert not (run / "checkpoints" / "last.ckpt").exists()  # refused before training
    finally:
        owner.kill()
        owner.wait()
    fit = main(["fit", *args(tmp_path, synthetic_classification, "--run_id=r", "--trainer.max_epochs=1")])
    assert fit.trainer.global_step == 3 and not (run / "run.lock").exists()  # taken over, released at the end


def test_an_unwritable_run_directory_stops_before_anything_is_built(tmp_path, synthetic_classification):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the runs should go")
    with pytest.raises(PermissionError, match=r"cannot write the run directory .*not_a_folder.*default_root_dir"):
        main(["fit", *args(blocker, synthetic_classification, "--run_id=r")])


def test_loader_workers_die_with_a_killed_trainer(interrupted):
    killed = finished(interrupted["kill"])
    assert killed["returncode"] == -signal.SIGKILL, killed["output"][-2000:]
    assert len(killed.get("children", [])) >= 2  # the fork server and the workers (and the resource tracker)
    assert not killed.get("left", ["(not watched)"]), "processes left behind by a SIGKILLed trainer"


def test_wandb_disabled_writes_nothing(tmp_path, synthetic_classification, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "disabled")
    cli = main(["fit", *args(tmp_path, synthetic_classification, "--run_id=d", "--trainer.max_epochs=1",
                             "--trainer.logger+=lightning_modules.loggers.AutoWandbLogger")])  # fmt: skip
    # W&B fixes its mode for the whole process: end this session so later tests can run offline.
    cli.trainer.loggers[-1].experiment.finish()
    wandb.teardown()
    assert not list(tmp_path.rglob("wandb")) and not list(tmp_path.rglob("*.wandb"))


def wandb_records(log_file: Path) -> list:
    """The protobuf records of an offline W&B run file: a LevelDB-style log of 32 KiB blocks, each record
    split into chunks with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending, records = log_file.read_bytes(), 32768, 7, b"", []
    if len(data) < 7:
        return records  # not written yet
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block  # the rest of a block too short for a header is padding
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):
            break  # a chunk still being written
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_run_holds_the_whole_recipe_and_metrics(
    tmp_path, synthetic_classification, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cli = main(["fit", *args(tmp_path, synthetic_classification, "--run_id=w1", "--trainer.max_epochs=1",
                             "--trainer.logger+=lightning_modules.loggers.AutoWandbLogger")])  # fmt: skip
    cli.trainer.loggers[-1].experiment.finish()
    (log_file,) = (tmp_path / "w1" / "wandb").glob("offline-run-*/run-w1.wandb")
    # finish() can return before W&B's service has flushed the file: wait for the run's closing record.
    deadline, records = time.monotonic() + 60, wandb_records(log_file)
    while not any(r.HasField("exit") for r in records) and time.monotonic() < deadline:
        time.sleep(0.2)
        records = wandb_records(log_file)
    config, history = {}, set()
    for record in records:
        if record.HasField("config"):
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        if record.HasField("history"):
            history.update(item.key or "/".join(item.nested_key) for item in record.history.item)
    assert {"model", "data", "trainer"} <= set(config)  # the whole recipe, not only the task's arguments
    assert config["model"]["init_args"]["backbone"]["init_args"]["embed_dim"] == 128
    assert config["trainer"]["default_root_dir"] == str(tmp_path / "w1") and config["run_id"] == "w1"
    assert {"val/top1", "val/gmacs", "train/loss"} <= history


def test_wandb_with_a_key_and_no_route_logs_offline_and_the_fit_goes_on(
    tmp_path, synthetic_classification, monkeypatch, caplog, capsys
):
    """A compute node with the shared ~/.netrc key and no route to the W&B server: the run logs offline into its
    directory (before: online, and the fit died at start with "CommError: Failed to get resume status")."""
    from lightning_modules.loggers import wandb_reachable

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens there once closed
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    caplog.set_level(logging.INFO)
    start = time.perf_counter()
    assert not wandb_reachable(timeout=2.0) and time.perf_counter() - start < 3.0
    cli = main(["fit", *args(tmp_path, synthetic_classification, "--run_id=w2", "--trainer.max_epochs=1",
                             "--trainer.logger+=lightning_modules.loggers.AutoWandbLogger",
                             "--trainer.logger.init_args.connect_timeout=2")])  # fmt: skip
    logger = cli.trainer.loggers[-1]
    assert logger._offline and cli.trainer.current_epoch == 1
    logger.experiment.finish()
    assert list((tmp_path / "w2" / "wandb").glob("offline-run-*/run-w2.wandb"))
    assert f"127.0.0.1:{port} cannot be reached within 2 s; logging offline" in caplog.text
    assert "anonymous setting has no effect" not in capsys.readouterr().err  # W&B's warning on every run, gone
    with socket.socket() as listening:  # and a server that answers is used
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{listening.getsockname()[1]}")
        assert wandb_reachable(timeout=2.0)


def write_list_with_bad_videos(root: Path, data: Path, name: str, good: int, bad: int, missing: int = 0) -> None:
    lines = (data / "val.txt").read_text().splitlines()[:good]
    for i in range(bad):
        (root / f"bad_{name}_{i}.mp4").write_bytes(b"\0" * 4096)  # exists, but holds no video
        lines.append(f"{root / f'bad_{name}_{i}.mp4'} 0")
    lines += [f"{root / f'gone_{name}_{i}.mp4'} 0" for i in range(missing)]  # found missing at set-up
    (root / f"{name}.txt").write_text("\n".join(lines) + "\n")


def test_skip_counts_per_stage_and_epoch(tmp_path, synthetic_classification):
    lists = tmp_path / "lists"
    lists.mkdir()
    for stage in ("train", "val"):
        write_list_with_bad_videos(lists, synthetic_classification, stage, good=5, bad=3, missing=2)
    cli = main(["fit", *args(tmp_path, synthetic_classification, "--run_id=s", "--trainer.max_epochs=2",
                             "--trainer.limit_train_batches=null", "--trainer.limit_val_batches=null",
                             "--data.init_args.bad_video=skip", f"--data.init_args.train_list={lists / 'train.txt'}",
                             f"--data.init_args.val_list={lists / 'val.txt'}")])  # fmt: skip
    with (tmp_path / "s" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    train = [float(r["train/skipped_videos"]) for r in rows if r.get("train/skipped_videos")]
    val = [float(r["val/skipped_videos"]) for r in rows if r.get("val/skipped_videos")]
    # 8 videos per list, batch 4, drop_last: the 3 bad ones all fall in training batches, each epoch anew; the 2
    # missing ones were left out at set-up, and are counted in every epoch they are left out of.
    assert train == [5.0, 5.0] and val == [5.0, 5.0]  # per epoch, not cumulative; the sanity check apart
    assert cli.trainer.callback_metrics["val/num_samples"] == 5


def test_every_video_skipped_says_so(tmp_path, synthetic_classification):
    lists = tmp_path / "lists"
    lists.mkdir()
    write_list_with_bad_videos(lists, synthetic_classification, "val", good=0, bad=2)
    with pytest.raises(Exception, match=r"every validation video was skipped as bad \(2 samples skipped"):
        main(["fit", *args(tmp_path, synthetic_classification, "--run_id=a", "--trainer.max_epochs=1",
                           "--data.init_args.bad_video=skip", f"--data.init_args.val_list={lists / 'val.txt'}",
                           "--trainer.num_sanity_val_steps=0")])  # fmt: skip


def test_missing_listed_videos_are_found_at_setup(tmp_path, synthetic_classification):
    listed = (synthetic_classification / "val.txt").read_text().splitlines()
    (tmp_path / "val.txt").write_text("\n".join(listed + ["gone/a.mp4 1", "gone/b.mp4 2"]) + "\n")
    common = dict(root=str(synthetic_classification), val_list=str(tmp_path / "val.txt"), num_workers=0)
    with pytest.raises(
        AnnotationError,
        match=r"val.txt: video .*gone/a.* does not exist \(2 of 10 listed videos missing\) \(1 more problems",
    ):
        VideoClassificationDataModule(**common).build_dataset("val")
    dm = VideoClassificationDataModule(**common, bad_video="skip")
    assert len(dm.build_dataset("val")) == 8 and dm.skip_counts["missing"] == 2


def test_synthetic_data_never_written_over_foreign_files(tmp_path):
    (tmp_path / "my_videos").mkdir()
    precious = tmp_path / "my_videos" / "train.txt"
    precious.write_text("real data\n")
    dm = VideoClassificationDataModule(root=str(tmp_path / "my_videos"), synthetic=True, num_workers=0)
    with pytest.raises(FileExistsError, match="did not write; refusing"):
        dm.prepare_data()
    assert precious.read_text() == "real data\n" and sorted(p.name for p in precious.parent.iterdir()) == [
        "train.txt"
    ]


def test_accuracy_plot_reads_the_validation_run_not_the_newest_file(tmp_path):
    fit_dir, test_dir = tmp_path / "recipe" / "fit1", tmp_path / "recipe" / "test2"
    for d, header, row in (
        (fit_dir, "step,val/gmacs,val/top1", "9,0.5,0.75"),
        (test_dir, "step,test/top1", "0,0.7"),
    ):
        d.mkdir(parents=True)
        (d / "metrics.csv").write_text(f"{header}\n{row}\n")
    os.utime(fit_dir / "metrics.csv", (time.time() - 60, time.time() - 60))  # the test run is newer
    result = read_run_result(tmp_path / "recipe")
    assert (result.name, result.accuracy, result.gmacs) == ("recipe/fit1", 0.75, 0.5)
    assert read_run_result(fit_dir / "metrics.csv").name == "recipe/fit1"


def test_accuracy_vs_macs_is_a_command_of_the_package(tmp_path, capsys):
    """``python -m lightning_modules accuracy-vs-macs RUN... --out PNG``: one point per run, a PNG written."""
    from lightning_modules.__main__ import run

    for name, row in (("dense", "9,0.067,0.955"), ("halting", "9,0.020,0.995")):
        (tmp_path / "runs" / name / "r1").mkdir(parents=True)
        (tmp_path / "runs" / name / "r1" / "metrics.csv").write_text(f"step,val/gmacs,val/top1\n{row}\n")
    out = tmp_path / "plot.png"
    run(
        [
            "accuracy-vs-macs",
            str(tmp_path / "runs" / "dense"),
            str(tmp_path / "runs" / "halting"),
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert "dense/r1: val/top1 95.50  GMACs 0.0670" in printed and "halting/r1: val/top1 99.50" in printed
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_a_lock_from_another_host_holds_unless_stale_or_the_same_requeued_job(tmp_path, monkeypatch):
    """The owner on another node cannot be asked whether it lives: its lock holds while refreshed, is taken over
    once not refreshed for ``stale`` seconds, and at once by the same SLURM job after a requeue."""
    from lightning_modules.runs import RunLock

    lock = RunLock(tmp_path, stale=60.0)
    (tmp_path / "run.lock").write_text(json.dumps({"host": "node-b", "pid": 4242, "job": "77"}))
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    with pytest.raises(RuntimeError, match="is being trained by process 4242 on node-b"):
        lock.acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # the same job, requeued onto this node
    lock.acquire()
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "run.lock").exists()
    (tmp_path / "run.lock").write_text(json.dumps({"host": "node-b", "pid": 4242, "job": "77"}))
    old = time.time() - 120
    os.utime(tmp_path / "run.lock", (old, old))  # not refreshed for two minutes
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    lock.acquire()
    lock.release()
