"""SLURM: the batch scripts on a real single-node cluster (``recipes/slurm/local_cluster.sh``), and the commands
of the submit helper.

The cluster tests need the Debian packages slurmctld, slurmd, slurm-client and munge (``.ci/run`` installs them)
and root; without them they skip with the reason. A module fixture starts the cluster, unless it is already
running, and stops it again at the end; every job a test submits is cancelled when the test ends.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_modules.tools import submit
from tests.quick import quick_overrides

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "recipes" / "slurm" / "local_cluster.sh"
QUICKSTART = REPO / "recipes" / "quickstart" / "synthetic_dense_vit.yaml"
MINIK = str(REPO / "recipes" / "haltingvt_minik.yaml")
#: Job names of this module start with it, so jobs left by an interrupted run can be found and cancelled.
JOB_PREFIX = "evt-test-"
CPU_DDP = ["--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.num_sanity_val_steps=0"]
JOB_ENV = {"PATH", "HOME", "USER", "LOGNAME", "LANG", "TMPDIR", "TZ"}
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture
def dry_run(capsys):
    """Runs the submit helper with ``--dry-run`` in this process: (exit status, stdout, stderr)."""

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        status = submit.main(["--dry-run", *argv])
        out, err = capsys.readouterr()
        return status, out, err

    return run


def test_submit_dry_run_asks_for_one_task_per_gpu_of_the_recipe(dry_run):
    status, out, err = dry_run(MINIK, "--time", "12:00:00", "--partition", "gpu")
    assert status == 0, err
    assert out.strip() == (
        "sbatch --job-name=haltingvt_minik --nodes=1 --ntasks-per-node=8 --gres=gpu:8 --time=12:00:00 "
        "--partition=gpu recipes/slurm/train.sbatch recipes/haltingvt_minik.yaml"
    )
    assert "run directory: runs/haltingvt_minik/<job id>" in err
    assert "global batch: 16 per device x 8 device(s) x 1 node(s) x 1 accumulated = 128" in err


def test_submit_dry_run_multinode_and_cpu_tasks(dry_run):
    status, out, err = dry_run(MINIK, "--nodes", "2", "--", "--trainer.num_nodes=2", "--trainer.max_epochs", "5")
    assert status == 0, err
    assert out.strip() == (
        "sbatch --job-name=haltingvt_minik --nodes=2 --ntasks-per-node=8 --gres=gpu:8 "
        "recipes/slurm/train_multinode.sbatch recipes/haltingvt_minik.yaml "
        "--trainer.num_nodes=2 --trainer.max_epochs 5"
    )
    assert "= 256" in err  # two nodes double the global batch, and the helper says so
    status, out, err = dry_run(
        str(QUICKSTART), "--gpus-per-node", "0", "--cpus-per-task", "1", "--", "--trainer.devices=2"
    )
    assert status == 0, err
    assert out.strip() == (
        "sbatch --job-name=synthetic_dense_vit --nodes=1 --ntasks-per-node=2 --gres=none --cpus-per-task=1 "
        "recipes/slurm/train.sbatch recipes/quickstart/synthetic_dense_vit.yaml --trainer.devices=2 "
        "--trainer.accelerator=cpu"
    )


def test_submit_passes_other_sbatch_options_on_and_names_the_job_after_the_stacked_recipes(dry_run):
    """sbatch options the helper does not manage go through as given (before: "unrecognized arguments"); a GPU
    type in --gres replaces the helper's when it asks for the recipe's GPUs; stacked recipes name the job."""
    variant = "recipes/haltingvt_variants/minik_g03_b05.yaml"
    status, out, err = dry_run(
        MINIK, "--account", "foo", "--qos=high", "--constraint", "a100|a800", "--mem", "0", "--mail-type=END",
        "--exclusive", "--gres=gpu:a100:8", "--", "--config", variant,
    )  # fmt: skip
    assert status == 0, err
    assert out.strip() == (
        "sbatch --job-name=haltingvt_minik+minik_g03_b05 --nodes=1 --ntasks-per-node=8 --account=foo --qos=high "
        "'--constraint=a100|a800' --mem=0 --mail-type=END --exclusive --gres=gpu:a100:8 recipes/slurm/train.sbatch "
        f"recipes/haltingvt_minik.yaml --config {variant}"
    )
    for argv, message in (
        (["--gres=gpu:a100:4"], r"--gres=gpu:a100:4 does not ask for the recipe's 8 GPUs"),
        (["--ntasks=8"], r"--ntasks is set by the helper"),
        (["stray"], r"'stray' is not an sbatch option"),
    ):
        status, out, err = dry_run(MINIK, *argv)
        assert status == 2 and out == "" and re.search(message, err), err


def test_submit_parses_the_recipe_once(dry_run, monkeypatch):
    """The allocation, the sbatch line and the description come from one parse (each costs the CLI's parser)."""
    from lightning_modules import cli

    calls = []
    real = cli.resolved_config
    monkeypatch.setattr(cli, "resolved_config", lambda args: calls.append(args) or real(args))
    submit._parsed.cache_clear()
    status, out, err = dry_run(MINIK, "--", "--trainer.max_epochs=3")
    assert status == 0 and "--ntasks-per-node=8" in out, err
    assert calls == [["fit", "--config", MINIK, "--trainer.max_epochs=3"]]


def test_submit_of_a_sweep_asks_for_the_allocation_of_its_recipe(dry_run):
    """A sweep of an 8-GPU recipe gets 8 tasks and 8 GPUs per array task (the agent script asked for 1 of each,
    and the trial failed: "You set devices=8 ... --ntasks-per-node=1 does not match")."""
    status, out, err = dry_run(str(REPO / "recipes/sweeps/haltingvt_minik.yaml"), "--sweep-id", "me/evt/abc123",
                               "--array=0-7%4", "--account", "foo")  # fmt: skip
    assert status == 0, err
    assert out.strip() == (
        "sbatch --job-name=sweep-haltingvt_minik --nodes=1 --ntasks-per-node=8 --gres=gpu:8 --array=0-7%4 "
        "--account=foo recipes/slurm/sweep_agent.sbatch me/evt/abc123"
    )
    status, out, err = dry_run(str(REPO / "recipes/sweeps/quickstart_lr.yaml"), "--sweep-id", "me/evt/abc123",
                               "--gpus-per-node", "0", "--", "--trainer.devices=2")  # fmt: skip
    assert status == 0, err
    assert out.strip().endswith(
        "--ntasks-per-node=2 --gres=none recipes/slurm/sweep_agent.sbatch me/evt/abc123 --trainer.devices=2 "
        "--trainer.accelerator=cpu"
    )
    for argv, message in (
        (["recipes/sweeps/haltingvt_minik.yaml"], r"is a W&B sweep file: pass --sweep-id"),
        ([MINIK, "--sweep-id", "me/evt/abc123"], r"--sweep-id needs a sweep file"),
        (["recipes/sweeps/blockdrop_thumos_lora_lr.yaml", "--sweep-id", "x/y/z"], r"do not run `fit`"),
    ):
        status, out, err = dry_run(*argv)
        assert status == 2 and out == "" and re.search(message, err), err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--gpus-per-node", "4"], r"trainer.devices=8 GPUs per node but --gpus-per-node 4 .* --trainer.devices=4"),
        (["--nodes", "2"], r"trainer.num_nodes=1 but --nodes 2 .* --trainer.num_nodes=2"),
        (["--gpus-per-node", "0"], r"trainer.accelerator=gpu but --gpus-per-node 0"),
        (["--", "--trainer.accelerator=cpu", "--trainer.devices=2"], None),  # an explicit override is fine
    ],
)
def test_submit_refuses_flags_that_disagree_with_the_recipe(argv, message, dry_run):
    status, out, err = dry_run(MINIK, *argv)
    if message is None:
        assert status == 0 and "--ntasks-per-node=2 --gres=none" in out, err
        return
    assert status == 2 and out == ""
    assert re.search(message, err), err


class Cluster:
    """Submits jobs to the local cluster and watches them through ``scontrol`` (there is no accounting database;
    the cluster keeps finished jobs visible)."""

    def __init__(self, conf: str):
        # Jobs get the submitting environment: a clean one, not the test process's (earlier tests leave DDP
        # rendezvous variables, W&B service addresses and seeds in it).
        self.env = {k: v for k, v in os.environ.items() if k in JOB_ENV or k.startswith("LC_")}
        self.env.update(
            SLURM_CONF=conf, PYTHON=sys.executable, PYTHONPATH=str(REPO), WANDB_MODE="offline", WANDB_SILENT="true"
        )  # fmt: skip
        self.jobs: list[str] = []

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(cmd, check=False, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
        return done

    def sbatch(self, *args: str) -> str:
        """``sbatch`` from the repository root; returns the job id."""
        job = self.run("sbatch", "--parsable", f"--chdir={REPO}", *args).stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def records(self, job: str) -> list[dict[str, str]]:
        """``scontrol show job``: one record per job (per task of an array job)."""
        out = self.run("scontrol", "show", "job", "--oneliner", job).stdout
        return [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in out.splitlines() if line.strip()]

    def state(self, job: str) -> dict[str, str]:
        (record,) = self.records(job)
        return record

    def cancel(self, jobs: list[str]) -> None:
        if jobs:
            self.run("scancel", *jobs, check=False)

    def leftover_test_jobs(self) -> list[str]:
        out = self.run("squeue", "--noheader", "--format=%A %j", check=False).stdout
        rows = [line.split() for line in out.splitlines()]
        return [row[0] for row in rows if len(row) == 2 and row[1].startswith(JOB_PREFIX)]


def wait_for(condition, timeout: float, what: str, details=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"{what} did not happen within {timeout:.0f} s\n{details()}")


@pytest.fixture(scope="module")
def cluster():
    needed = ["sbatch", "scontrol", "squeue", "scancel", "sinfo", "srun"]
    daemons = ["slurmctld", "slurmd", "munged"]
    sbin = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing = [b for b in needed if shutil.which(b) is None]
    missing += [d for d in daemons if shutil.which(d, path=sbin) is None]
    if missing:
        pytest.skip(f"SLURM is not installed (missing {', '.join(missing)}; Debian packages slurmctld slurmd "
                    "slurm-client munge, which .ci/run installs)")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") or k == "SLURM_LOCAL_DIR"}
    # The script declares the node's CPUs with `nproc`, which reports OMP_NUM_THREADS (set to 1 for the tests'
    # own processes) instead of the cores when it is set: the 2-task jobs would never fit.
    env.pop("OMP_NUM_THREADS", None)
    conf = subprocess.run([str(CLUSTER), "env"], env=env, capture_output=True, text=True, check=True).stdout
    conf = conf.strip().split("=", 1)[1]
    was_running = subprocess.run([str(CLUSTER), "status"], check=False, env=env, capture_output=True).returncode == 0
    started = time.monotonic()
    start = subprocess.run([str(CLUSTER), "start"], check=False, env=env, capture_output=True, text=True, timeout=180)
    if start.returncode != 0:
        pytest.skip(f"the local SLURM cluster did not start: {(start.stderr or start.stdout).strip()[-500:]}")
    print(f"\nlocal SLURM cluster {'was running' if was_running else 'started'} in {time.monotonic() - started:.1f} s")
    c = Cluster(conf)
    c.cancel(c.leftover_test_jobs())  # jobs of an interrupted earlier run would hold the cores
    try:
        yield c
    finally:
        c.cancel(c.jobs + c.leftover_test_jobs())
        if not was_running:
            subprocess.run([str(CLUSTER), "stop"], check=False, env=env, capture_output=True, timeout=180)


@pytest.fixture
def jobs(cluster):
    """The cluster, with the jobs of one test cancelled when it ends (whatever the outcome)."""
    first = len(cluster.jobs)
    yield cluster
    cluster.cancel(cluster.jobs[first:])


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else f"(no {path})"


def wait_done(cluster: Cluster, job: str, timeout: float, out: Path) -> str:
    record = wait_for(lambda: (r := cluster.state(job))["JobState"] in TERMINAL and r, timeout,
                      f"job {job} finishing", lambda: f"{cluster.state(job)}\n{tail(out)}")  # fmt: skip
    return record["JobState"]


def rank_lines(ranks: Path, procid: int) -> list[str]:
    path = ranks / f"rank-{procid}.txt"
    return path.read_text().splitlines() if path.is_file() else []


def global_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def test_quickstart_job_trains_on_two_ddp_ranks_and_resumes_after_preemption(
    jobs, tmp_path, synthetic_classification
):
    """The submit helper's command for the quickstart recipe on 2 CPU ranks, preempted (USR1) mid-epoch: every
    rank joins the HPC checkpoint, the job is requeued and resumes in the same run directory and W&B run, ending
    with the uninterrupted step count. One job for both (each start of 2 ranks costs tens of seconds)."""
    runs, ranks, out = tmp_path / "runs", tmp_path / "ranks", tmp_path / "job.out"
    epochs, batches, pause = 2, 2, 3  # 4 optimiser steps; the signal comes before step 3, mid second epoch
    overrides = [
        *quick_overrides(runs, synthetic_classification, batch_size=2), *CPU_DDP,
        f"--trainer.max_epochs={epochs}", f"--trainer.limit_train_batches={batches}", "--trainer.limit_val_batches=1",
        "--trainer.check_val_every_n_epoch=1", "--trainer.logger+=lightning_modules.loggers.AutoWandbLogger",
        "--trainer.callbacks+=tests.helpers.SlurmRankLog", f"--trainer.callbacks.out_dir={ranks}",
        f"--trainer.callbacks.pause_at_step={pause}",
    ]  # fmt: skip
    # What the submit helper would run, with the output kept out of the repository.
    cmd = submit.sbatch_command(QUICKSTART, overrides, gpus_per_node=0, cpus_per_task=1, job_name=f"{JOB_PREFIX}quick")
    assert cmd[:6] == ["sbatch", f"--job-name={JOB_PREFIX}quick", "--nodes=1", "--ntasks-per-node=2", "--gres=none",
                       "--cpus-per-task=1"], f"submit helper: {cmd}"  # fmt: skip
    t0 = time.monotonic()
    job = jobs.sbatch(f"--output={out}", *cmd[1:])

    def paused() -> bool:
        if jobs.state(job)["JobState"] in TERMINAL:
            raise AssertionError(f"job {job} ended before step {pause}:\n{tail(out)}")
        return all(f"paused step={pause}" in rank_lines(ranks, p) for p in (0, 1))

    wait_for(paused, 240, f"both ranks reaching step {pause}", lambda: tail(out))
    t_signal = time.monotonic()
    for procid in (0, 1):
        assert rank_lines(ranks, procid)[0] == f"start job={job} restart=0 rank={procid} world=2 step=0", (
            f"quickstart job: rank {procid} did not start as rank {procid} of 2: {rank_lines(ranks, procid)}"
        )
    jobs.run("scancel", "--signal=USR1", job)
    # Rank 0 requeues the job; SLURM holds a requeued job back (EligibleTime, about 2 minutes): start it now.
    requeued = wait_for(lambda: (s := jobs.state(job))["JobState"] != "RUNNING" and int(s["Restarts"]) >= 1 and s,
                        120, "the requeue", lambda: f"{jobs.state(job)}\n{tail(out)}")  # fmt: skip
    assert requeued["JobState"] in ("REQUEUED", "PENDING", "COMPLETING"), requeued
    wait_for(lambda: jobs.state(job)["JobState"] == "PENDING", 60, "the requeued job pending")
    t_requeued = time.monotonic()
    jobs.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    state = wait_done(jobs, job, 300, out)
    t_end = time.monotonic()
    print(
        f"\nquickstart job {job}, 2 ranks: submit -> step {pause} {t_signal - t0:.1f} s, USR1 -> requeued (pending) "
        f"{t_requeued - t_signal:.1f} s, restart -> COMPLETED {t_end - t_requeued:.1f} s, total {t_end - t0:.1f} s"
    )
    log = tail(out, 200_000)
    assert state == "COMPLETED", log[-4000:]
    run = runs / job  # the run directory is named by the job id
    assert sorted(p.name for p in runs.iterdir()) == [job]  # the requeued job wrote to the same run directory
    assert (run / "config.yaml").is_file()
    assert global_step(run / "hpc_ckpt_1.ckpt") == pause  # every rank joined the save before the requeue
    for procid in (0, 1):
        assert rank_lines(ranks, procid) == [
            f"start job={job} restart=0 rank={procid} world=2 step=0",
            f"paused step={pause}",
            f"start job={job} restart=1 rank={procid} world=2 step={pause}",  # resumed from the HPC checkpoint
            f"end step={epochs * batches}",
        ]
    assert f"resuming run {job} from {run / 'hpc_ckpt_1.ckpt'}" in log
    assert global_step(run / "checkpoints" / "last.ckpt") == epochs * batches  # as many steps as uninterrupted
    # --open-mode=append: the output file holds both parts.
    assert f"job {job} (restart 0)" in log and f"job {job} (restart 1)" in log
    # One W&B run id, the job id, in both parts (offline: one run directory per process start).
    parts = sorted((run / "wandb").glob("offline-run-*"))
    assert len(parts) == 2 and all((p / f"run-{job}.wandb").is_file() for p in parts), parts


def test_sweep_array_runs_one_agent_trial_per_task(jobs, tmp_path):
    calls = tmp_path / "calls"
    calls.mkdir()
    agent = tmp_path / "agent.sh"
    # Stands in for `wandb agent`: records its arguments and array task, one file per call.
    agent.write_text(f'#!/bin/sh\necho "task=$SLURM_ARRAY_TASK_ID args=$*" > "{calls}/call-$SLURM_ARRAY_TASK_ID-$$"\n')
    agent.chmod(0o755)
    jobs.env["WANDB_AGENT_CMD"] = f"{agent} agent"
    try:
        job = jobs.sbatch(f"--job-name={JOB_PREFIX}sweep", "--array=0-2", "--cpus-per-task=1", "--gres=none",
                          f"--output={tmp_path}/%x-%A_%a.out", "recipes/slurm/sweep_agent.sbatch",
                          "me/evt/abc123")  # fmt: skip
    finally:
        del jobs.env["WANDB_AGENT_CMD"]

    def all_done():
        records = jobs.records(job)
        return len(records) == 3 and all(r["JobState"] in TERMINAL for r in records) and records

    records = wait_for(all_done, 120, "the 3 array tasks finishing", lambda: str(jobs.records(job)))
    assert sorted((r["ArrayTaskId"], r["JobState"]) for r in records) == [(str(i), "COMPLETED") for i in range(3)]
    recorded = sorted(p.read_text().strip() for p in calls.iterdir())
    assert recorded == [f"task={i} args=agent --count 1 me/evt/abc123" for i in range(3)]


def test_sweep_trial_runs_on_every_task_of_its_allocation(jobs, tmp_path, synthetic_classification):
    """The submit helper's sweep job for a 2-rank CPU trial: the agent runs once, in the batch shell, and its
    trial (what `wandb agent` starts: the sweep's command with a proposal's arguments) trains on both tasks of
    the allocation, as rank 0 and rank 1 of 2, under the array task's run id."""
    runs, ranks, out = tmp_path / "runs", tmp_path / "ranks", tmp_path / "sweep.out"
    sweep = REPO / "recipes" / "sweeps" / "quickstart_lr.yaml"
    recipe, fixed = submit.sweep_trial(sweep)
    assert recipe == QUICKSTART
    proposal = [  # stands in for W&B's ${args}: a proposal, and this test's small run
        "--model.init_args.optimizer.lr=0.001", *quick_overrides(runs, synthetic_classification, batch_size=2),
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0", "--trainer.callbacks+=tests.helpers.SlurmRankLog",
        f"--trainer.callbacks.out_dir={ranks}",
    ]  # fmt: skip
    trial = [sys.executable, "-m", "lightning_modules", "fit", *fixed, "--config", str(recipe), *proposal]
    agent = tmp_path / "agent.sh"
    # Stands in for `wandb agent --count 1 SWEEP`: starts one trial as the agent does, in its own process.
    agent.write_text(f"#!/bin/sh\necho \"agent $*\"\nexec {shlex.join(trial)}\n")
    agent.chmod(0o755)
    cmd = submit.sbatch_command(
        sweep, ["--trainer.devices=2", "--trainer.strategy=ddp"], gpus_per_node=0, cpus_per_task=1,
        job_name=f"{JOB_PREFIX}sweep-ddp", extra=["--array=0"], sweep_id="me/evt/abc123",
    )  # fmt: skip
    assert cmd[3:5] == ["--ntasks-per-node=2", "--gres=none"], cmd
    jobs.env["WANDB_AGENT_CMD"] = str(agent)
    try:
        job = jobs.sbatch(f"--output={out}", *cmd[1:])
    finally:
        del jobs.env["WANDB_AGENT_CMD"]
    record = wait_for(lambda: (r := jobs.records(job)) and r[0]["JobState"] in TERMINAL and r[0], 300,
                      f"sweep job {job} finishing", lambda: f"{jobs.records(job)}\n{tail(out)}")  # fmt: skip
    log = tail(out, 200_000)
    assert record["JobState"] == "COMPLETED", log[-4000:]
    assert log.count("agent --count 1 me/evt/abc123") == 1  # one agent per allocation
    assert "trial across 2 task(s): srun --kill-on-bad-exit=1" in log
    run_id = f"{record['ArrayJobId']}_0"
    for procid in (0, 1):
        lines = rank_lines(ranks, procid)
        assert lines and lines[0].startswith("start job=") and f"rank={procid} world=2 step=0" in lines[0], log
        assert lines[-1] == "end step=2"
    assert (runs / run_id / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in runs.iterdir()) == [run_id]


def test_submit_reads_a_recipe_again_once_it_is_edited(tmp_path):
    recipe = tmp_path / "edited.yaml"
    text = QUICKSTART.read_text()
    recipe.write_text(text)
    first = submit.effective_settings(recipe, [])["trainer"]["max_epochs"]
    recipe.write_text(text.replace(f"max_epochs: {first}\n", f"max_epochs: {first + 7}\n", 1))
    os.utime(recipe, ns=(recipe.stat().st_atime_ns, recipe.stat().st_mtime_ns + 10**9))
    assert submit.effective_settings(recipe, [])["trainer"]["max_epochs"] == first + 7
