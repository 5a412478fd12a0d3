"""W&B logging that works on clusters without internet and never mixes two runs' files."""

from __future__ import annotations

import netrc
import os
from typing import Any

from lightning.pytorch.loggers import WandbLogger

from lightning_modules.runs import resolve_run_id


def wandb_key_configured() -> bool:
    """True when W&B can authenticate: an API key in the environment or a ``wandb login`` entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class AutoWandbLogger(WandbLogger):
    """``WandbLogger`` that goes offline when no API key is configured and is off under ``WANDB_MODE=disabled``.

    ``offline=None`` decides by the presence of a key (``WANDB_MODE`` still wins). The CLI sets ``save_dir`` to
    the run directory and ``id`` to the run id (the SLURM job id on a cluster), so a resumed or requeued run
    continues the same W&B run; its files go to ``<save_dir>/wandb`` (``wandb sync <save_dir>/wandb/offline-run-*``
    uploads an offline run later).
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
        id: str | None = None,
        **kwargs: Any,
    ):
        os.makedirs(save_dir, exist_ok=True)
        if os.environ.get("WANDB_MODE") == "disabled":
            # Lightning turns offline=True into WANDB_MODE=dryrun, which would write an offline run anyway.
            offline = False
            kwargs["mode"] = "disabled"
        elif offline is None:
            offline = not wandb_key_configured()
        super().__init__(
            name=name, save_dir=save_dir, project=project, offline=offline, log_model=log_model,
            id=id or resolve_run_id(None), group=group, tags=tags, resume="allow", **kwargs,
        )  # fmt: skip
