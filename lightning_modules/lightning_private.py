"""The private Lightning APIs this project relies on, in one place: why ``pyproject.toml`` caps ``lightning<2.7``.

Any Lightning release may change these; the test suite exercises every one (``tests/test_layout.py`` checks that no
other module imports a private Lightning name and that each below still exists). Before raising the cap, run the
suite against the new Lightning and revisit each reason.
"""

from __future__ import annotations

from lightning.fabric.utilities.seed import _collect_rng_states as collect_rng_states
from lightning.fabric.utilities.seed import _set_rng_states as set_rng_states
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher as SubprocessScriptLauncher

#: Each private use: (what, where, why).
USES = (
    (
        "lightning.fabric.utilities.seed._collect_rng_states / _set_rng_states",
        "lightning_modules/runs.py (RunState)",
        "a checkpoint carries every RNG state (python, numpy, torch, CUDA) so that a resumed run draws the same "
        "augmentations and sampling as one that never stopped; Lightning only saves them for its own SLURM "
        "requeue and has no public call for it",
    ),
    (
        "lightning.pytorch.strategies.launchers._SubprocessScriptLauncher and its .procs",
        "lightning_modules/callbacks.py (BadVideoReport.on_exception)",
        "a failing run kills the DDP ranks the launching process started instead of leaving them blocked in a "
        "collective for NCCL's 30-minute timeout; the launcher's list of processes is the only handle on them",
    ),
    (
        "LightningCLI._parse_ckpt_path (overridden)",
        "lightning_modules/cli.py (VideoCLI)",
        "model arguments given on the command line still win over the hyperparameters Lightning reads from "
        "--ckpt_path (e.g. validate --ckpt_path ... --model.init_args.early_exit=true)",
    ),
    (
        "the checkpoint's loops.fit_loop layout (epoch_loop.batch_progress, epoch_progress)",
        "lightning_modules/runs.py (RunState.on_load_checkpoint)",
        "a run stopped mid-epoch (SIGTERM, requeue) goes on after the batches its epoch already trained on; "
        "Lightning restores its counters but not the data module's position",
    ),
)

__all__ = ["USES", "SubprocessScriptLauncher", "collect_rng_states", "set_rng_states"]
