"""W&B logging that works on clusters without internet and never mixes two runs' files."""

from __future__ import annotations

import netrc
import os
import socket
import threading
from typing import Any
from urllib.parse import urlsplit

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from lightning_modules.runs import resolve_run_id


def wandb_key_configured() -> bool:
    """True when W&B can authenticate: an API key in the environment or a ``wandb login`` entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_server() -> tuple[str, int]:
    """Host and port of the W&B server: ``WANDB_BASE_URL`` (a local server) or api.wandb.ai."""
    url = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    return url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)


def wandb_reachable(timeout: float = 5.0) -> bool:
    """Whether a TCP connection to the W&B server opens within ``timeout`` seconds, name lookup included (a
    compute node without a route may hang in either: the probe runs in a thread that is left behind)."""
    host, port = wandb_server()
    opened = threading.Event()

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                opened.set()
        except OSError:
            pass

    threading.Thread(target=probe, daemon=True).start()
    return opened.wait(timeout)


class AutoWandbLogger(WandbLogger):
    """``WandbLogger`` that goes offline when no API key is configured or the server cannot be reached, and is off
    under ``WANDB_MODE=disabled``.

    ``offline=None`` decides by the presence of a key and, with a key, by whether the W&B server accepts a
    connection within ``connect_timeout`` seconds (compute nodes often have no route out: the run then logs
    offline into the run directory and says so in one line); ``WANDB_MODE`` still wins. The CLI sets ``save_dir`` to
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
        connect_timeout: float = 5.0,
        **kwargs: Any,
    ):
        os.makedirs(save_dir, exist_ok=True)
        mode = os.environ.get("WANDB_MODE")
        if mode == "disabled":
            # Lightning turns offline=True into WANDB_MODE=dryrun, which would write an offline run anyway.
            offline = False
            kwargs["mode"] = "disabled"
        elif offline is None and mode in ("offline", "dryrun"):
            offline = True
        elif offline is None:
            offline = not wandb_key_configured()
            if not offline and mode != "online" and not wandb_reachable(connect_timeout):
                host, port = wandb_server()
                rank_zero_info(
                    f"W&B: {host}:{port} cannot be reached within {connect_timeout:g} s; logging offline into "
                    f"{save_dir}/wandb (upload later with `wandb sync {save_dir}/wandb/offline-run-*`)"
                )
                offline = True
        super().__init__(
            name=name, save_dir=save_dir, project=project, offline=offline, log_model=log_model,
            id=id or resolve_run_id(None), group=group, tags=tags, resume="allow", **kwargs,
        )  # fmt: skip
        if self._wandb_init.get("anonymous") is None:
            # Lightning always passes it; W&B then warns on every run that the setting has no effect
            del self._wandb_init["anonymous"]
