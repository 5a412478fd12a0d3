"""Reading ``torch.save`` files without running code from them.

A pickle can name any function of any installed module and have it called while it loads; ``torch.load`` with
``weights_only=True`` refuses every name outside an allowlist of tensor and container types. Released checkpoints
often carry more than tensors (the official VideoMAE files pickle the training script's ``argparse.Namespace``,
mmengine files their message hub), which that refuses. ``read_torch_file`` reads them anyway, safely: every name
outside the allowlist is stood in for by an inert object (built from nothing, it calls nothing of the file), so
the tensors load and the foreign objects are reported, never executed. Only ``trust_pickle=True`` unpickles fully,
running whatever the file names: for files you made yourself.
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class TorchFileError(RuntimeError):
    """A ``torch.save`` file that cannot be read safely, with the reason and the fix."""


class Inert:
    """Stands for an object of a file that is neither a tensor nor a plain container: accepts any construction
    and state and keeps none of it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<{type(self).__module__}.{type(self).__qualname__}, stood in for>"


def _inert(full_name: str) -> tuple[type, str]:
    module, _, name = full_name.rpartition(".")
    return type(name, (Inert,), {"__module__": module or "builtins", "__qualname__": name}), full_name


def read_torch_file(path: str | Path, *, trust_pickle: bool = False) -> tuple[Any, list[str]]:
    """The object ``torch.save`` wrote to ``path`` (on the CPU) and the names of the foreign objects in it,
    each of which was replaced by an ``Inert`` stand-in; with ``trust_pickle`` the file is unpickled fully
    (its code runs) and nothing is replaced."""
    path = Path(path)
    if trust_pickle:
        log.warning("%s: unpickled fully (trust_pickle=True): any code it names has run", path)
        return torch.load(path, map_location="cpu", weights_only=False), []
    try:
        return torch.load(path, map_location="cpu", weights_only=True), []
    except pickle.UnpicklingError:
        pass  # names outside the allowlist: stand in for them below
    try:
        foreign = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)))
    except Exception as err:  # not a zip archive: the legacy format, which cannot be inspected without running it
        raise TorchFileError(
            f"{path} is in PyTorch's legacy (pre-1.6) format, whose objects cannot be checked before they run "
            f"({err}); if you made the file yourself or trust its source, pass trust_pickle: true, or re-save "
            "its state dict with torch.save in a current PyTorch"
        ) from err
    with torch.serialization.safe_globals([_inert(name) for name in foreign]):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            named = re.search(r"GLOBAL (\S+)", str(err))
            what = named.group(1) if named else ", ".join(foreign)
            raise TorchFileError(
                f"{path} calls {what} while it loads, which is never run from a data file: it was not loaded "
                "(nothing in it ran). If you made the file yourself or trust its source, pass trust_pickle: true"
            ) from None
    log.info("%s: stood in for %d foreign objects without running them: %s", path, len(foreign), foreign)
    return obj, foreign


def read_own_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint this project wrote (Lightning's or the compress command's): tensors and plain values only,
    read as Lightning reads ``--ckpt_path`` (``weights_only``); anything else is refused, never run."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise TorchFileError(
            f"{path} holds objects beyond tensors and plain values, which a checkpoint of this project never "
            f"does; it was not loaded (nothing in it ran). Use a checkpoint written by fit or compress ({err})"
        ) from err


__all__ = ["Inert", "TorchFileError", "read_own_checkpoint", "read_torch_file"]
