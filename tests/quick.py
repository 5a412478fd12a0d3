"""Command-line overrides shared by the tests that run a quickstart recipe end to end on a small local set."""

from __future__ import annotations

from pathlib import Path

TAD_QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart" / "tad_synthetic.yaml"


def quick_overrides(run_dir: Path, data_root: Path, batch_size: int = 4) -> list[str]:
    """Read ``data_root`` as it is (no synthetic writing), no loader workers, CSV logs and checkpoints in
    ``run_dir``."""
    return [
        f"--data.init_args.root={data_root}", "--data.init_args.synthetic=false",
        "--data.init_args.num_workers=0", f"--data.init_args.batch_size={batch_size}",
        f"--trainer.default_root_dir={run_dir}", "--trainer.logger=lightning_modules.runs.RunCSVLogger",
        f"--trainer.logger.init_args.save_dir={run_dir}",
    ]  # fmt: skip


def tiny_tad(run_dir: Path, data_root: Path) -> list[str]:
    """The quickstart detector recipe shrunk to one narrow block on 32x32 frames and 64-frame windows of every
    frame (two windows per 6 s video), from scratch (the backbone the recipe names is not trained here), reading
    ``data_root`` as it is, without loader workers, runs under ``run_dir``."""
    return [
        "--config", str(TAD_QUICKSTART), f"--data.init_args.root={data_root}", "--data.init_args.synthetic=false",
        "--model.init_args.pretrained=null", "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=2", "--data.init_args.window_size=64", "--data.init_args.frame_stride=1",
        "--data.init_args.crop_size=32", "--data.init_args.train_short_side=32", "--data.init_args.eval_short_side=32",
        "--model.init_args.backbone.init_args.head_length=64", "--model.init_args.head.init_args.max_seq_len=64",
        "--model.init_args.backbone.init_args.vit.init_args.img_size=32",
        "--model.init_args.backbone.init_args.vit.init_args.embed_dim=32",
        "--model.init_args.backbone.init_args.vit.init_args.depth=1", f"--trainer.default_root_dir={run_dir}",
    ]  # fmt: skip
