"""Command-line overrides shared by the tests that run a quickstart recipe end to end on a small local set."""

from __future__ import annotations

from pathlib import Path


def quick_overrides(run_dir: Path, data_root: Path, batch_size: int = 4) -> list[str]:
    """Read ``data_root`` as it is (no synthetic writing), no loader workers, CSV logs and checkpoints in
    ``run_dir``."""
    return [
        f"--data.init_args.root={data_root}", "--data.init_args.synthetic=false",
        "--data.init_args.num_workers=0", f"--data.init_args.batch_size={batch_size}",
        f"--trainer.default_root_dir={run_dir}", "--trainer.logger=lightning_modules.runs.RunCSVLogger",
        f"--trainer.logger.init_args.save_dir={run_dir}",
    ]  # fmt: skip
