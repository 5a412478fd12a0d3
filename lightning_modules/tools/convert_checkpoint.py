"""``python -m lightning_modules convert-checkpoint``: an official trained model -> a checkpoint of this project.

    python -m lightning_modules convert-checkpoint --config recipes/evad_ava_vitb.yaml \\
        --official EVAD_ViT_B_16x4_KTP.pth --output checkpoints/evad_vitb_kpr0.7.ckpt
    python -m lightning_modules validate --config recipes/evad_ava_vitb.yaml \\
        --ckpt_path checkpoints/evad_vitb_kpr0.7.ckpt

The recipe(s) (``--config``, several stack, then ``--model...`` / ``--data...`` overrides as in ``fit``) build the
task; the official file (EVAD model zoo, the HaltingVT release, OpenTAD's AdaTAD and ActionFormer checkpoints) is
read without running anything in it, its layout found from its keys and converted tensor by tensor, strictly
(``models.official_weights``); the result is written as a Lightning checkpoint whose hyperparameters are the
recipe's model, so ``validate`` / ``test`` / ``predict --ckpt_path`` and ``LightningModule.load_from_checkpoint``
rebuild the same task. The recipe's ``pretrained`` backbone file is not read: every weight comes from the
official file (a feature-based ActionFormer head takes its backbone from ``--backbone``).

The number of classes comes from the recipe's data module, as in ``fit``; where its annotation files are not
there (converting on a machine without the data), from the official classifier's weight. A file or recipe that
does not match exits with code 2 and a message naming the file, the keys and the fix.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import ActionConfigFile, Namespace
from lightning.pytorch.cli import LightningArgumentParser, instantiate_module

from lightning_modules.cli import class_of, without_pretrained
from lightning_modules.runs import AtomicCheckpointIO
from models.checkpoint import CheckpointError
from models.official_weights import (
    LAYOUTS,
    detect_layout,
    load_official,
    official_num_classes,
    read_official,
)

PROG = "python -m lightning_modules convert-checkpoint"
#: The task each official layout is a model of.
TASK_OF_LAYOUT = {
    "evad": "lightning_modules.tasks.detection.SpatioTemporalDetection",
    "haltingvt": "lightning_modules.tasks.haltingvt.HaltingVTClassifier",
    "opentad-adatad": "lightning_modules.tasks.temporal_detection.TemporalActionDetection",
    "opentad-actionformer": "lightning_modules.tasks.temporal_detection.TemporalActionDetection",
}
RECIPE_OF_LAYOUT = {
    "evad": "recipes/evad_ava_vitb.yaml (EVAD ViT-B), recipes/evad_ava_vitl.yaml (ViT-L)",
    "haltingvt": "recipes/haltingvt_minik.yaml with the variant of the released config "
    "(recipes/haltingvt_variants/), or recipes/haltingvt_anet.yaml",
    "opentad-adatad": "recipes/tad_thumos_videomae_s.yaml + recipes/tad_variants/thumos_videomae_s_adapter.yaml",
    "opentad-actionformer": "a recipes/tad_*.yaml with --backbone",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        allow_abbrev=False,
        description=__doc__.split("\n")[0].split(": ", 1)[1],
        epilog="Any other argument is a recipe override, as in fit (e.g. --model.init_args.detector.init_args."
        "keep_rate=0.6); overrides are applied after every --config.",
    )
    parser.add_argument(
        "-c", "--config", action="append", required=True, metavar="RECIPE",
        help="recipe YAML of the task to build; give several to stack them (later ones win), as in fit",
    )  # fmt: skip
    parser.add_argument("--official", required=True, type=Path, help="the official checkpoint file (.pth)")
    parser.add_argument("--output", required=True, type=Path, help="the Lightning checkpoint to write (.ckpt)")
    parser.add_argument(
        "--ema", action=argparse.BooleanOptionalAction, default=None,
        help="OpenTAD files: convert the EMA weights (state_dict_ema) or, with --no-ema, the raw ones (state_dict). "
        "Default: the EMA when the file has one, as OpenTAD's test script evaluates",
    )  # fmt: skip
    parser.add_argument(
        "--backbone", type=Path, default=None,
        help="a feature-based OpenTAD ActionFormer holds no backbone: the VideoMAE checkpoint its features came "
        "from, loaded by the recipe's backbone loader",
    )  # fmt: skip
    parser.add_argument(
        "--trust-pickle", action="store_true",
        help="unpickle the official file fully, running what it names (only for files you trust); by default "
        "foreign objects in it are stood in for and nothing runs",
    )  # fmt: skip
    return parser


def recipe_parser() -> LightningArgumentParser:
    """The recipe's sections as the Lightning CLI reads them (trainer and seed are parsed and unused)."""
    parser = LightningArgumentParser(prog=PROG)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--seed_everything", type=int | bool | None, default=0)
    parser.add_lightning_class_args(L.Trainer, "trainer")
    parser.add_lightning_class_args(L.LightningModule, "model", subclass_mode=True)
    parser.add_lightning_class_args(L.LightningDataModule, "data", subclass_mode=True)
    parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
    parser.link_arguments("data.multilabel", "model.init_args.multilabel", apply_on="instantiate")
    return parser


def _data_classes(parser: LightningArgumentParser, cfg: Namespace) -> tuple[int, bool | None] | str:
    """(num_classes, multilabel: None where the data module has no such notion) of the recipe's data module, or
    why it could not say."""
    only_data = copy.deepcopy(cfg)
    only_data.model = None
    try:
        data = parser.instantiate_classes(only_data).data
        multilabel = getattr(data, "multilabel", None)
        return int(data.num_classes), None if multilabel is None else bool(multilabel)
    except (OSError, ValueError) as err:  # missing or unreadable annotations (AnnotationError): the data's message
        return f"{type(err).__name__}: {err}"


def task_hyperparameters(model: Namespace, num_classes: int, multilabel: bool | None) -> dict[str, Any]:
    """The model section of the recipe as the Lightning CLI stores it in a checkpoint (``_class_path`` and the
    init arguments, the data's class count included)."""
    hparams = {"_class_path": model.class_path, **model.init_args.as_dict()}
    hparams["num_classes"] = num_classes
    if multilabel is not None and "multilabel" in inspect.signature(class_of(model.class_path)).parameters:
        hparams["multilabel"] = multilabel
    return hparams


def convert(argv: Sequence[str] | None = None) -> Path:
    """Run the conversion; returns the written checkpoint. Raises ``CheckpointError`` on a mismatch."""
    args, overrides = build_parser().parse_known_args(argv)
    parser = recipe_parser()
    configs = [a for c in args.config for a in ("--config", c)]
    cfg = parser.parse_args([*configs, *overrides])
    without_pretrained(cfg.model)

    sd, _ = read_official(args.official, ema=args.ema, trust_pickle=args.trust_pickle)
    layout = detect_layout(sd, str(args.official))
    expected = TASK_OF_LAYOUT[layout]
    if cfg.model.class_path != expected:
        raise CheckpointError(
            f"{args.official} is an {LAYOUTS[layout]}, a model of {expected.rsplit('.', 1)[1]}, but the recipe "
            f"builds {cfg.model.class_path}; convert it with {RECIPE_OF_LAYOUT[layout]}"
        )
    if layout == "opentad-actionformer" and args.backbone is None:
        raise CheckpointError(
            f"{args.official} is a feature-based ActionFormer: it holds the detection head only, and the recipe's "
            "task runs a video backbone. Pass --backbone <VideoMAE checkpoint the features were extracted with>"
        )
    classes = _data_classes(parser, cfg)
    if isinstance(classes, str):
        num_classes, multilabel = official_num_classes(layout, sd), None
        print(
            f"note: the recipe's data module cannot say its classes ({classes}); taking {num_classes} from "
            f"{args.official}",
            file=sys.stderr,
        )
    else:
        num_classes, multilabel = classes
    hparams = task_hyperparameters(cfg.model, num_classes, multilabel)
    task = instantiate_module(L.LightningModule, copy.deepcopy(hparams))
    target = getattr(task, "detector", task)
    filled = ()
    if layout == "opentad-actionformer":
        print(target.backbone.load_pretrained(str(args.backbone), trust_pickle=args.trust_pickle).summary())
        filled = ("backbone.",)
    report = load_official(target, args.official, ema=args.ema, trust_pickle=args.trust_pickle, filled=filled)
    print(report.summary())
    checkpoint = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": L.__version__,
        "state_dict": task.state_dict(),
        "hyper_parameters": {**hparams, "_instantiator": "lightning.pytorch.cli.instantiate_module"},
        "official_weights": {
            "file": str(args.official),
            "layout": report.layout,
            "weights": report.wrapper,
            "dropped": report.dropped,
            **({"backbone": str(args.backbone)} if args.backbone else {}),
        },
    }
    AtomicCheckpointIO().save_checkpoint(checkpoint, args.output)
    recipes = " ".join(f"--config {c}" for c in args.config)
    print(f"wrote {args.output}; evaluate it with: python -m lightning_modules validate {recipes} --ckpt_path {args.output}")
    return args.output


def main(argv: Sequence[str] | None = None) -> int:
    try:
        convert(argv)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
