"""Every quickstart recipe under 2-process DDP on the CPU (gloo), through ``python -m lightning_modules fit
--trainer.strategy=ddp`` as a user runs it, each result checked against a reference computed another way:

- the weights are the same on both ranks after the optimiser steps (and equal to the checkpoint rank 0 wrote);
- the validation figures of the 2 ranks (an odd number of videos, so the sampler's padding repeats one)
  equal a single-process ``validate`` of the same checkpoint, for the dense ViT and HaltingVT (whose GFLOPs
  come from its halting);
- HaltingVT with the motion loss: every rank's static clips are stills of its own samples (checked against
  frames decoded directly), and the DDP step (2 ranks x b clips) equals one process's step on the 2b clips;
- a corrupt video under ``bad_video: error`` stops every rank within seconds, naming the file.

The two recipes' DDP fits run side by side (start-up is the cost) and every check reads what they recorded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from torch.utils.data import DistributedSampler

from datamodules.kinetics_list import read_video_list
from datamodules.transforms import resize_short_side, to_tchw
from datamodules.video_io import open_video
from lightning_modules.cli import main
from tests.helpers import reserved_port
from tests.quick import quick_overrides

REPO = Path(__file__).resolve().parents[1]
RECIPES = {
    "dense": REPO / "recipes" / "quickstart" / "synthetic_dense_vit.yaml",
    "haltingvt": REPO / "recipes" / "quickstart" / "synthetic_haltingvt.yaml",
}
DDP = ["--trainer.strategy=ddp", "--trainer.accelerator=cpu", "--trainer.devices=2"]
#: HaltingVT's motion loss with static clips, the set-up whose pairing DDP must keep.
MOTION = [
    "--model.init_args.motion_weight=1.0", "--model.init_args.static_label_weight=0",
    "--data.init_args.static_clips=true",
]  # fmt: skip
EXTRA = {"dense": [], "haltingvt": MOTION}
BATCH = 2  # per rank
STEPS = 3
SHORT = [
    "--trainer.max_epochs=1", f"--trainer.limit_train_batches={STEPS}", "--trainer.check_val_every_n_epoch=1",
    "--trainer.num_sanity_val_steps=0",
]  # fmt: skip
VAL_VIDEOS = 7  # odd: padded to 2 ranks x 4 videos, so one video is evaluated twice
SEED = 0  # the quickstart recipes' seed_everything
CROP = 64


def launch(args: list[str], log_file: Path) -> subprocess.Popen:
    """``python -m lightning_modules`` in its own process, output to a file (not a pipe a stray rank could
    hold open)."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": str(REPO)}
    env["MASTER_PORT"] = str(reserved_port())  # two runs may be launched side by side
    env.pop("EVT_RUN_ID", None)
    with log_file.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "lightning_modules", *args], cwd=REPO, env=env, stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip


def processes_mentioning(marker: str) -> list[psutil.Process]:
    """Live processes whose command line holds ``marker``: the ranks of one run (the children repeat its
    arguments)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and any(marker in a for a in p.info["cmdline"] or []):
            found.append(p)
    return found


def kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def val_list(tmp_path_factory, synthetic_classification) -> Path:
    lines = (synthetic_classification / "val.txt").read_text().splitlines()[:VAL_VIDEOS]
    path = tmp_path_factory.mktemp("lists") / "val_odd.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def common_args(name: str, run_dir: Path, data: Path, val: Path) -> list[str]:
    return [
        "--config", str(RECIPES[name]), *quick_overrides(run_dir, data, batch_size=BATCH),
        f"--data.init_args.val_list={val}", *EXTRA[name],
    ]  # fmt: skip


@pytest.fixture(scope="module")
def ddp_fits(tmp_path_factory, synthetic_classification, val_list) -> dict[str, dict]:
    """Both recipes fitted for a few steps on 2 DDP ranks, side by side; per recipe: the checkpoint and each
    rank's record (``tests.helpers.RankRecord``)."""
    root = tmp_path_factory.mktemp("ddp")
    procs = {}
    for name in RECIPES:
        run_dir, records = root / name, root / f"{name}_records"
        run_dir.mkdir()
        args = ["fit", *common_args(name, run_dir, synthetic_classification, val_list), *SHORT, *DDP,
                "--run_id=ddp", "--trainer.callbacks+=tests.helpers.RankRecord",
                f"--trainer.callbacks.out_dir={records}"]  # fmt: skip
        procs[name] = launch(args, root / f"{name}.log")
    try:
        for proc in procs.values():
            proc.wait(timeout=600)
    finally:
        for name, proc in procs.items():
            if proc.poll() is None:
                proc.kill()
            kill_all(processes_mentioning(str(root / name)))
    runs = {}
    for name, proc in procs.items():
        assert proc.returncode == 0, (root / f"{name}.log").read_text()[-3000:]
        records = [torch.load(root / f"{name}_records" / f"rank{r}.pt", weights_only=False) for r in range(2)]
        runs[name] = {"ckpt": root / name / "ddp" / "checkpoints" / "last.ckpt", "records": records}
    return runs


@pytest.mark.parametrize("name", list(RECIPES))
def test_weights_identical_on_both_ranks_after_training(ddp_fits, name):
    rank0, rank1 = ddp_fits[name]["records"]
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert len(rank0["batches"]) == len(rank1["batches"]) == STEPS
    # Bit-identical, by the all-gather inside the run and by the vectors each rank saved.
    assert rank0["max_rank_diff"] == rank1["max_rank_diff"] == 0.0
    assert torch.equal(rank0["params"], rank1["params"])
    assert torch.equal(rank0["start_params"], rank1["start_params"])  # DDP started both from rank 0's weights
    assert (rank0["params"] - rank0["start_params"]).abs().max() > 1e-5  # and the steps did move them
    # The checkpoint rank 0 wrote holds rank 1's weights too.
    ckpt = torch.load(ddp_fits[name]["ckpt"], map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == STEPS
    saved = torch.cat([ckpt["state_dict"][n].flatten() for n in rank1["names"]])
    assert torch.equal(saved, rank1["params"])


@pytest.mark.parametrize("name", list(RECIPES))
def test_validation_under_ddp_equals_a_single_process(ddp_fits, name, tmp_path, synthetic_classification,
                                                       val_list):  # fmt: skip
    """The fit's final validation ran on 2 ranks with the weights of last.ckpt (written after it in the same
    epoch); validating that checkpoint in one process must give the same figures."""
    rank0, rank1 = ddp_fits[name]["records"]
    # The distributed sampler padded 7 videos to 2 x 4: one video was evaluated twice.
    seen = rank0["val_ids"] + rank1["val_ids"]
    assert len(seen) == VAL_VIDEOS + 1 and sorted(set(seen)) == list(range(VAL_VIDEOS))
    single = main([
        "validate", *common_args(name, tmp_path, synthetic_classification, val_list), "--trainer.devices=1",
        "--trainer.accelerator=cpu", f"--ckpt_path={ddp_fits[name]['ckpt']}",
    ])  # fmt: skip
    reference = {k: float(v) for k, v in single.trainer.callback_metrics.items() if k.startswith("val/")}
    assert {"val/top1", "val/top5", "val/num_samples", "val/loss", "val/gmacs"} <= set(reference)
    assert reference["val/num_samples"] == VAL_VIDEOS
    assert set(rank0["val"]) == set(reference)  # rank 1 lacks only what is logged on rank 0 alone
    for record in (rank0, rank1):
        for key, value in reference.items():
            if key in record["val"] or key != "val/skipped_videos":
                assert record["val"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def still_matches(still: torch.Tensor, frames: torch.Tensor) -> bool:
    """Whether the uint8 image ``still`` (3, CROP, CROP) is a crop of one of ``frames`` (T, 3, H, W)."""
    rows = frames[:, :, : frames.shape[2] - CROP + 1].unfold(3, CROP, 1)  # (T, 3, y, x, CROP)
    candidates = (rows == still[:, 0].view(1, 3, 1, 1, CROP)).all(-1).all(1).nonzero()  # where its top row is
    crops = (frames[t, :, y : y + CROP, x : x + CROP] for t, y, x in candidates.tolist())
    return any(torch.equal(crop, still) for crop in crops)


def test_static_clips_are_stills_of_the_same_samples_on_every_rank(ddp_fits, synthetic_classification):
    rank0, rank1 = ddp_fits["haltingvt"]["records"]
    records = read_video_list(synthetic_classification / "train.txt", synthetic_classification)
    decoded: dict[int, torch.Tensor] = {}

    def frames_of(i: int) -> torch.Tensor:
        if i not in decoded:
            video = open_video(records[i].path)
            # The recipe's short side (80), resized as the training transform does.
            decoded[i] = resize_short_side(to_tchw(video.get_frames(list(range(video.num_frames)))), 80)
        return decoded[i]

    def as_uint8(x: torch.Tensor) -> torch.Tensor:  # undoes the normalisation (mean = std = 0.5)
        return (x * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)

    ids = [[int(i) for b in rec["batches"] for i in b["index"]] for rec in (rank0, rank1)]
    assert not set(ids[0]) & set(ids[1])  # the ranks train on different samples
    for rec in (rank0, rank1):
        for batch in rec["batches"]:
            assert batch["static"].shape == batch["video"].shape == (BATCH, 3, 8, CROP, CROP)
            video, static = as_uint8(batch["video"]), as_uint8(batch["static"])
            for j, i in enumerate(batch["index"].tolist()):
                assert (static[j] == static[j][:, :1]).all()  # one frame, repeated
                assert still_matches(video[j][:, 0], frames_of(i))  # the clip is of sample i ...
                assert still_matches(static[j][:, 0], frames_of(i)), f"static clip {j} is not a still of {i}"
                other = batch["index"][1 - j].item()  # ... and the comparison tells samples apart
                assert not still_matches(static[j][:, 0], frames_of(other))


def test_ddp_step_equals_one_process_on_both_ranks_batches(ddp_fits, tmp_path, synthetic_classification,
                                                          val_list):  # fmt: skip
    """DDP averages the ranks' gradients, so 2 ranks x b clips must be one process's step on the 2b clips:
    the mean of the ranks' losses is the loss of the union, and the applied gradient is the union's."""
    rank0, rank1 = ddp_fits["haltingvt"]["records"]
    cli = main([*common_args("haltingvt", tmp_path, synthetic_classification, val_list)], run=False)
    task = cli.model
    task.load_state_dict(rank0["start_state"])
    task.train()
    task.log = lambda *a, **kw: None  # type: ignore[method-assign]
    task.log_dict = lambda *a, **kw: None  # type: ignore[method-assign]
    halves = [rank0["batches"][0], rank1["batches"][0]]

    def step(batch: dict) -> torch.Tensor:
        task.zero_grad()
        loss = task.training_step({**batch, "batch_size": len(batch["index"])}, 0)
        loss.backward()
        return loss.detach()

    for half, rec in zip(halves, (rank0, rank1)):
        assert step(half).item() == pytest.approx(rec["first_loss"], rel=1e-5)  # each rank's own loss, redone
    union = {k: torch.cat([h[k] for h in halves]) for k in halves[0]}
    loss = step(union)
    grad = torch.cat([p.grad.flatten() for n, p in task.named_parameters() if n in set(rank0["names"])])
    assert loss.item() == pytest.approx((rank0["first_loss"] + rank1["first_loss"]) / 2, rel=1e-5)
    for rec in (rank0, rank1):
        assert torch.allclose(grad, rec["first_grad"], rtol=1e-4, atol=1e-7)


def list_with_a_corrupt_video(folder: Path, data: Path, bad_rank: int) -> tuple[Path, Path]:
    """A 2-video training list whose corrupt video (4 KB of zeros, so it passes the existence check at setup)
    falls to ``bad_rank`` in the first epoch, the good one to the other rank."""
    corrupt = folder / f"corrupt_for_rank{bad_rank}.mp4"
    corrupt.write_bytes(b"\0" * 4096)
    good = (data / "train.txt").read_text().splitlines()[0]
    first_rank0 = next(iter(DistributedSampler(range(2), num_replicas=2, rank=0, shuffle=True, seed=SEED)))
    lines = [good, good]
    lines[first_rank0 if bad_rank == 0 else 1 - first_rank0] = f"{corrupt} 24 0"
    path = folder / f"train_bad_rank{bad_rank}.txt"
    path.write_text("\n".join(lines) + "\n")
    return path, corrupt


def test_corrupt_video_under_error_policy_stops_every_rank(tmp_path, synthetic_classification):
    """Once per failing rank (0: the launching process, 1: the rank it started), the two runs side by side:
    the command exits non-zero within seconds of the error, names the file, and leaves no rank running."""
    runs = {}
    for bad_rank in (0, 1):
        run_dir, data = tmp_path / f"bad{bad_rank}", synthetic_classification
        run_dir.mkdir()
        train_list, corrupt = list_with_a_corrupt_video(tmp_path, data, bad_rank)
        args = ["fit", "--config", str(RECIPES["dense"]), *quick_overrides(run_dir, data, batch_size=1),
                f"--data.init_args.train_list={train_list}", "--data.init_args.bad_video=error",
                "--trainer.max_epochs=1", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
                *DDP, "--run_id=bad"]  # fmt: skip
        log = tmp_path / f"bad{bad_rank}.log"
        runs[bad_rank] = {"proc": launch(args, log), "log": log, "file": str(corrupt), "marker": str(run_dir)}
    # Start-up alone can take a minute on a busy machine: the time that counts is from the error to the exit.
    deadline = time.monotonic() + 180
    while any("exit" not in r for r in runs.values()) and time.monotonic() < deadline:
        for r in runs.values():
            if "error" not in r and r["file"] in r["log"].read_text():
                r["error"] = time.monotonic()
            if "exit" not in r and r["proc"].poll() is not None:
                r["exit"] = time.monotonic()
                r["left"] = [p.pid for p in processes_mentioning(r["marker"])]  # ranks alive at the exit
        time.sleep(0.2)
    for r in runs.values():
        if r["proc"].poll() is None:
            r["proc"].kill()
        kill_all(processes_mentioning(r["marker"]))
    for bad_rank, r in runs.items():
        out = r["log"].read_text()
        case = f"bad video on rank {bad_rank}"
        assert "exit" in r and "error" in r, f"{case}: still running after 180 s\n{out[-3000:]}"
        assert r["proc"].returncode != 0
        assert f"BadVideoError: {r['file']}: cannot be opened as a video" in out, out[-3000:]
        assert r["exit"] - r["error"] < 30, f"{case}: exited {r['exit'] - r['error']:.0f} s after the error"
        assert r["left"] == [], f"{case}: ranks still running when the command returned: {r['left']}"
