"""The CLI end to end: every shipped recipe parses, a quickstart run trains, checkpoints resume, W&B stays local."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lightning_modules.cli import main, resolved_config
from tests.quick import quick_overrides

REPO = Path(__file__).resolve().parents[1]
#: Variant overlays, each stacked after its base recipe.
OVERLAY_BASES = {
    "haltingvt_variants": "haltingvt_minik.yaml",
    "evad_variants": "evad_ava_vitb.yaml",
    "tad_variants": "tad_thumos_videomae_s.yaml",
}
#: Overlays whose base is not their folder's.
OVERLAY_BASE_FILES = {"evad_variants/ava_vitl_v21.yaml": "evad_ava_vitl.yaml"}
RECIPES = sorted(
    p
    for p in (REPO / "recipes").rglob("*.yaml")
    if not {"sweeps", "blockdrop", *OVERLAY_BASES} & set(p.parts) and "blockdrop" not in p.name
)
OVERLAYS = sorted(p for folder in OVERLAY_BASES for p in (REPO / "recipes" / folder).glob("*.yaml"))
#: Block-drop recipes (compress) and the task recipe each stacks on.
BLOCKDROP = {
    "blockdrop_thumos_videomae_s.yaml": ["tad_thumos_videomae_s.yaml"],
    "blockdrop_thumos_videomae_l.yaml": ["tad_thumos_videomae_l.yaml"],
    "blockdrop_anet_videomae_s.yaml": ["tad_anet_videomae_s.yaml"],
    "quickstart/blockdrop_synthetic.yaml": ["quickstart/tad_synthetic.yaml"],
    **{
        f"blockdrop/{p.name}": ["tad_thumos_videomae_s.yaml", "blockdrop_thumos_videomae_s.yaml"]
        for p in (REPO / "recipes" / "blockdrop").glob("*.yaml")
    },
}
VARIANTS = sorted((REPO / "recipes" / "haltingvt_variants").glob("*.yaml"))
QUICKSTART = REPO / "recipes" / "quickstart" / "synthetic_dense_vit.yaml"


def print_config(args: list[str], capsys) -> dict:
    try:
        return resolved_config(args)
    except SystemExit as failed:
        raise AssertionError(f"the CLI refused {args}: {capsys.readouterr().err[-1500:]}") from failed


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_recipe_parses(recipe, capsys):
    config = print_config(["fit", "--config", str(recipe)], capsys)
    assert config["model"]["class_path"] and config["data"]["class_path"]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_variant_is_an_overlay_on_its_base(overlay, capsys):
    """A variant holds only what differs from its base recipe (no model, data or trainer class of its own) and
    parses stacked after it, logging under a directory of its own."""
    import yaml

    own = yaml.safe_load(overlay.read_text())
    assert "class_path" not in own.get("model", {}) and "class_path" not in own.get("data", {})
    name = f"{overlay.parent.name}/{overlay.name}"
    base = REPO / "recipes" / OVERLAY_BASE_FILES.get(name, OVERLAY_BASES[overlay.parent.name])
    config = print_config(["fit", "--config", str(base), "--config", str(overlay)], capsys)
    assert config["model"]["class_path"] and config["trainer"]["default_root_dir"].endswith(overlay.stem)


def test_every_blockdrop_recipe_is_listed():
    shipped = {
        str(p.relative_to(REPO / "recipes"))
        for p in (REPO / "recipes").rglob("*blockdrop*.yaml")
        if "sweeps" not in p.parts  # sweeps have tests of their own (test_sweeps.py)
    }
    shipped |= {str(p.relative_to(REPO / "recipes")) for p in (REPO / "recipes" / "blockdrop").glob("*.yaml")}
    assert shipped == set(BLOCKDROP)


@pytest.mark.parametrize("recipe", sorted(BLOCKDROP))
def test_every_blockdrop_recipe_parses_on_its_task_recipe(recipe):
    from lightning_modules.compression.command import build_parser
    from lightning_modules.compression.settings import BlockDrop

    configs = [a for base in BLOCKDROP[recipe] for a in ("--config", str(REPO / "recipes" / base))]
    cfg = build_parser().parse_args(
        [*configs, "--config", str(REPO / "recipes" / recipe), "--compress.checkpoint=x"]
    )
    settings = cfg.compress.as_dict()
    assert settings["max_blocks"] >= 1 and settings["metric"] in (
        "map",
        "train_loss",
        "feature_mse",
        "random",
    )
    BlockDrop(**{**settings, "alignment": None})  # the checks of the settings pass


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda p: p.stem)
def test_haltingvt_variants_stack_on_the_base_recipe(variant, capsys):
    config = print_config(
        ["fit", "--config", str(REPO / "recipes" / "haltingvt_minik.yaml"), "--config", str(variant)], capsys
    )
    backbone = config["model"]["init_args"]["backbone"]["init_args"]
    _, g, b = variant.stem.split("_")  # minik_gXX_bYY
    assert backbone["glimpse_ratio"] == int(g[1:]) / 10 and backbone["halt_center"] == float(b[1:])
    assert backbone["size"] == "small" and config["data"]["init_args"]["frame_stride"] == 32
    # Each variant logs under its own directory, so their results can be told apart and plotted together.
    root = config["trainer"]["default_root_dir"]
    assert root.endswith(variant.stem)


@pytest.mark.parametrize(
    "recipe,message",
    [
        ("haltingvt_minik.yaml", r"(?s)mini_kinetics_(train|val).txt not found.*AR-Net"),
        ("haltingvt_anet.yaml", r"activity_net.v1-3.min.json not found: download .* from the ActivityNet"),
    ],
)
def test_missing_dataset_says_what_to_download(tmp_path, recipe, message):
    with pytest.raises(Exception, match=message):
        main(["fit", "--config", str(REPO / "recipes" / recipe), f"--data.init_args.root={tmp_path}",
              "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
              "--trainer.precision=32-true", "--model.init_args.pretrained=null", "--trainer.logger=false",
              "--trainer.callbacks=[]", "--data.init_args.num_workers=0"])  # fmt: skip


def test_unknown_key_is_an_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    config = yaml.safe_load(QUICKSTART.read_text())
    config["model"]["init_args"]["learning_rat"] = 0.1  # a typo of a real key
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(bad), "--print_config"])
    assert exit_info.value.code != 0
    assert "learning_rat" in capsys.readouterr().err


def quick_args(root: Path, data_root: Path, *extra: str) -> list[str]:
    return [
        "--config", str(QUICKSTART), *quick_overrides(root, data_root),
        "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2", "--trainer.check_val_every_n_epoch=1",
        *extra,
    ]  # fmt: skip


def test_fit_then_resume_then_validate(tmp_path, synthetic_classification):
    cli = main(["fit", *quick_args(tmp_path, synthetic_classification, "--trainer.max_epochs=1")], run=True)
    assert cli.trainer.current_epoch == 1 and cli.trainer.global_step == 2
    (last,) = tmp_path.rglob("last.ckpt")
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["global_step"] == 2
    resumed = main(
        [
            "fit",
            *quick_args(tmp_path, synthetic_classification, "--trainer.max_epochs=2"),
            f"--ckpt_path={last}",
        ]
    )
    assert resumed.trainer.global_step == 4 and resumed.trainer.current_epoch == 2
    validated = main(["validate", *quick_args(tmp_path, synthetic_classification), f"--ckpt_path={last}"])
    metrics = validated.trainer.callback_metrics
    assert {"val/top1", "val/top5", "val/num_samples"} <= set(metrics)
    assert metrics["val/num_samples"] == 8  # limit_val_batches=2 x batch 4, each video counted once
    # Dense cost by hand for the quickstart ViT (dim 128, depth 4, MLP 512, 4x4x4 tubelets of 2x16x16, 8 classes).
    n, c, hidden, depth = 64, 128, 512, 4
    macs = n * c * 3 * 2 * 16 * 16 + depth * (n * (4 * c * c + 2 * c * hidden) + 2 * n * n * c) + c * 8
    assert abs(float(metrics["val/gmacs"]) - macs / 1e9) < 1e-6


def test_checkpoint_hyperparameters_yield_to_the_command_line(tmp_path, synthetic_classification):
    """validate/test with a checkpoint take the model's arguments from the checkpoint (what it was trained
    with), except those given on the command line."""
    fit = ["fit", *quick_args(tmp_path, synthetic_classification, "--trainer.max_epochs=1")]
    main([*fit, "--model.init_args.label_smoothing=0.3", "--model.init_args.head_dropout=0.2"])
    (last,) = tmp_path.rglob("last.ckpt")
    args = quick_args(tmp_path, synthetic_classification, f"--ckpt_path={last}")
    plain = main(["validate", *args])
    given = main(["validate", *args, "--model.init_args.head_dropout", "0.5"])
    assert plain.model.label_smoothing == given.model.label_smoothing == 0.3  # from the checkpoint
    assert plain.model.head[0].p == 0.2 and given.model.head[0].p == 0.5
    assert given.config.validate.trainer.limit_val_batches == 2  # the rest of the command line intact


def test_cli_errors_name_the_missing_list(tmp_path):
    with pytest.raises(Exception, match=r"not found.*one video per line"):
        main(["fit", *quick_args(tmp_path, tmp_path, "--trainer.max_epochs=1"),
              "--data.init_args.num_classes=8"])  # fmt: skip


def test_missing_data_root_is_named(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"data root .*nowhere does not exist: set data.init_args.root"
    ):
        main(["fit", *quick_args(tmp_path, tmp_path / "nowhere", "--trainer.max_epochs=1")])


def test_command_line_applies_once_without_a_checkpoint(tmp_path, synthetic_classification):
    """Without checkpoint hyperparameters the command line is parsed once: a list append stays one append."""
    args = quick_args(tmp_path, synthetic_classification, "--trainer.limit_val_batches=1")
    cli = main(["validate", *args, "--model.init_args.backbone.init_args.drop_blocks+=2"])
    assert cli.config.validate.model.init_args.backbone.init_args.drop_blocks == [2]
    assert cli.model.backbone.block_ids == [0, 1, 3]  # the quickstart ViT's 4 blocks, block 2 removed


def test_missing_pretrained_weights_are_one_line_with_the_key_and_the_source(tmp_path, monkeypatch, capsys):
    """A paper recipe without its weight file stops before anything is built, in one line naming the file, the
    recipe key and where the weights come from (it ended in a double traceback and "Does not validate against
    any of the Union subtypes")."""
    monkeypatch.chdir(tmp_path)  # no checkpoints/ here
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(REPO / "recipes" / "haltingvt_minik.yaml")])
    message = str(stop.value.code)
    assert "\n" not in message and message.startswith("error: pretrained weights checkpoints/deit_small")
    assert "model.init_args.pretrained of" in message and "haltingvt_minik.yaml" in message
    assert "dl.fbaipublicfiles.com/deit/deit_small_patch16_224" in message


def test_a_checkpoint_to_load_needs_no_pretrained_file(tmp_path, synthetic_classification):
    """validate / predict / resume with --ckpt_path take every weight from the checkpoint: the recipe's pretrained
    file is not read, so a cluster node without it can evaluate a trained model."""
    cli = main(["fit", *quick_args(tmp_path, synthetic_classification, "--trainer.max_epochs=1")])
    (last,) = tmp_path.rglob("last.ckpt")
    gone = str(tmp_path / "not_here.pth")
    validated = main(["validate", *quick_args(tmp_path, synthetic_classification), f"--ckpt_path={last}",
                      f"--model.init_args.pretrained={gone}"])  # fmt: skip
    trained = cli.model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in validated.model.state_dict().items())
