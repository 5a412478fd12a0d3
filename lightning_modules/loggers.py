"""W&B logging that works on clusters without internet and never mixes two runs' files."""

from __future__ import annotations

import netrc
import os
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger


def wandb_key_configured() -> bool:
    """True when W&B can authenticate: an API key in the environment or a ``wandb login`` entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def run_id() -> str:
    """Stable across a SLURM requeue (the job id), unique otherwise."""
    if "SLURM_JOB_ID" in os.environ:
        array = os.environ.get("SLURM_ARRAY_TASK_ID")
        return os.environ["SLURM_JOB_ID"] + (f"_{array}" if array else "")
    return time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"


class AutoWandbLogger(WandbLogger):
    """``WandbLogger`` that goes offline when no API key is configured and writes each run to its own directory.

    ``offline=None`` decides by the presence of a key (``WANDB_MODE`` still wins); the run directory is
    ``save_dir/<run id>``, the id being the SLURM job id when there is one, so a requeued job resumes the same run.
    Offline runs upload later with ``wandb sync <save_dir>/<run id>/wandb/offline-run-*``.
    """

    def __init__(
        self,
        project: str = "efficient-video-transformers",
        save_dir: str = "runs/wandb",
        name: str | None = None,
        offline: bool | None = None,
        log_model: bool = False,
        group: str | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ):
        rid = kwargs.pop("id", None) or run_id()
        run_dir = Path(save_dir) / rid
        run_dir.mkdir(parents=True, exist_ok=True)
        if offline is None:
            offline = not wandb_key_configured()
        super().__init__(
            name=name, save_dir=str(run_dir), project=project, offline=offline, log_model=log_model, id=rid,
            group=group, tags=tags, resume="allow", **kwargs,
        )  # fmt: skip
