"""Every paper recipe starts from the weight file it names and trains: the recipe's task is built through the CLI
with a weight file in the release's layout (random values of the real shapes, ``tests/paper_files.py``), on tiny
data in the recipe's file format, and runs one training step and one validation step. The tensors the task starts
from must equal the file's. The ViT-L recipes stop after building and loading (a step of 300M parameters does not
fit the suite's time). The block-drop recipes compress such a trained detector (one scoring pass on two videos,
one recovery step); ``validate`` and ``predict`` restore a trained classifier and detector with ``--ckpt_path``.

The recipes run with their own relative paths (``checkpoints/...``, ``data/...``) from one working directory
shared by the session, so each weight file and dataset is written once. Inputs are reduced only where the model
allows it: VideoMAE's fixed positions are resized to any frame size, so the VideoMAE recipes see 32-pixel frames
and TAD windows of 64 frames; HaltingVT's learned positions keep its 224x224 crops, and its variants run 2 frames
(the time embedding is not part of DeiT's file)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_modules.cli import main, resolved_config
from tests import paper_files as files

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
TASKS = sorted(p.name for p in RECIPES.glob("*.yaml") if not p.name.startswith("blockdrop_"))
#: Each variant folder's overlays and the recipe they are stacked after.
VARIANT_BASES = {
    "haltingvt_variants": "haltingvt_minik.yaml",
    "evad_variants": "evad_ava_vitb.yaml",
    "tad_variants": "tad_thumos_videomae_s.yaml",
}
#: Variants whose base is not their folder's.
VARIANT_BASE_FILES = {"evad_variants/ava_vitl_v21.yaml": "evad_ava_vitl.yaml"}
VARIANTS = sorted(
    (VARIANT_BASE_FILES.get(f"{folder}/{p.name}", base), f"{folder}/{p.name}")
    for folder, base in VARIANT_BASES.items()
    for p in (RECIPES / folder).glob("*.yaml")
)
#: block-drop recipe -> the task recipe it stacks on
BLOCKDROP = {p.name: p.name.replace("blockdrop_", "tad_") for p in RECIPES.glob("blockdrop_*.yaml")}
OVERLAYS = sorted(f"blockdrop/{p.name}" for p in (RECIPES / "blockdrop").glob("*.yaml"))
#: overlays that change how blocks are chosen; the others change the recovery, and drop a fixed block (the
#: scoring pass they share is the base recipe's, run by its own test)
CHOOSING = {"blockdrop/metric_feature_mse.yaml", "blockdrop/metric_train_loss.yaml",
            "blockdrop/one_shot.yaml"}  # fmt: skip
#: overlays that only reweigh the alignment losses or freeze the head of the recovery that ``full_finetune`` /
#: ``no_finetune`` / ``relu`` and the base recipe run, or drop a fixed set at once as ``one_shot`` does: their
#: settings are checked by tests/test_cli.py and tests/test_protocols.py, and compressing with each would not fit
#: the suite's time
REWEIGHTING = {"blockdrop/feature_only.yaml", "blockdrop/prediction_only.yaml", "blockdrop/no_alignment.yaml",
               "blockdrop/head_frozen.yaml", "blockdrop/random_2_5_9.yaml", "blockdrop/random_0_4_7.yaml"}  # fmt: skip
#: a classifier and a detector, also restored with --ckpt_path by validate and predict
RESTORED = ["haltingvt_minik.yaml", "tad_thumos_videomae_s.yaml"]
#: ViT-L: built and loaded, no step (a step of 300M parameters does not fit the test suite's time)
BUILT_ONLY = {"evad_ava_vitl.yaml", "evad_variants/ava_vitl_v21.yaml", "tad_thumos_videomae_l.yaml"}
#: where each task keeps the ViT the weight file loads into (its prefix in the task's state dict)
BACKBONE = {
    "HaltingVTClassifier": "backbone.", "VideoClassifier": "backbone.", "SpatioTemporalDetection": "detector.backbone.",
    "TemporalActionDetection": "detector.backbone.vit.",
}  # fmt: skip


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Iterator[Path]:
    """The shared working directory; its paper-size weight files and checkpoints (gigabytes) go at the end."""
    path = tmp_path_factory.mktemp("paper")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def configs(*recipes: str) -> list[str]:
    return [a for r in recipes for a in ("--config", str(RECIPES / r))]


def pretrained_path(config: dict[str, Any]) -> str:
    """The weight file a task config names: every task keeps it in ``model.init_args.pretrained``, and nothing
    below the task names another."""
    found = []

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            found.extend(v for k, v in node.items() if k == "pretrained" and v)
            for value in node.values():
                visit(value)

    visit(config["model"])
    assert found == [config["model"]["init_args"].get("pretrained")], f"pretrained files in the recipe: {found}"
    return found[0]


def prepare_data(config: dict[str, Any]) -> None:
    """Tiny data in the recipe's format, where the recipe expects it (relative to the working directory)."""
    data, model = config["data"]["init_args"], config["model"]["init_args"]
    root = Path(data["root"])
    kind = config["data"]["class_path"].rsplit(".", 1)[1]
    if kind == "VideoClassificationDataModule" and data["train_list"].endswith(".json"):
        files.activitynet_json(
            root, data["train_list"], data["video_dir"], (data["train_subset"], data["eval_subset"])
        )
    elif kind == "VideoClassificationDataModule":
        files.kinetics_lists(root, data["train_list"], data["val_list"])
    elif kind == "AVADataModule":
        files.ava_frames(root, data["frames_dir"], data["frame_rate"])
    elif kind == "ActPickleDataModule":
        classes = config["model"]["init_args"]["detector"]["init_args"]["num_classes"]
        files.act_pickle(
            root, data["annotation_file"], f"{data['frames_dir']}/{data['frame_pattern']}", classes
        )
    elif kind == "TemporalDetectionDataModule" and data["classes_file"] is None:  # ActivityNet-1.3
        subsets = (data["train_subset"], data["eval_subset"])
        files.activitynet_json(root, data["annotation_file"], data["video_dir"], subsets)
        if model.get("external_class_scores"):
            files.cuhk_scores(Path(model["external_class_scores"]), root / data["annotation_file"])
    elif kind == "TemporalDetectionDataModule":
        subsets = (data["train_subset"], data["eval_subset"])
        files.thumos(root, data["annotation_file"], data["classes_file"], data["video_dir"], subsets)
    else:
        raise AssertionError(f"no tiny dataset for {kind}: add one to tests/paper_files.py")


def reduced(config: dict[str, Any]) -> list[str]:
    """One CPU process, one batch of one clip each way, a CSV log, and smaller inputs where the model allows."""
    out = [
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.num_nodes=1", "--trainer.strategy=auto",
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
        "--trainer.limit_predict_batches=1", "--trainer.num_sanity_val_steps=0", "--trainer.check_val_every_n_epoch=1",
        "--trainer.logger=lightning_modules.runs.RunCSVLogger", "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=1",
    ]  # fmt: skip
    kind = config["data"]["class_path"].rsplit(".", 1)[1]
    if kind == "AVADataModule":
        out += ["--data.init_args.train_short_side=32", "--data.init_args.eval_short_side=32"]
        out += ["--data.init_args.empty_classes=warn"]  # the few rows of the stand-in CSV miss most classes
    if kind == "ActPickleDataModule":  # a range of short sides
        out += ["--data.init_args.train_short_side=[32, 32]", "--data.init_args.eval_short_side=32"]
    if kind == "TemporalDetectionDataModule":
        data = config["data"]["init_args"]
        window = 64 if data["mode"] == "sliding_window" else 128
        head = (
            window
            * config["model"]["init_args"]["backbone"]["init_args"]["head_length"]
            // data["window_size"]
        )
        out += [
            f"--data.init_args.window_size={window}", "--data.init_args.crop_size=32",
            "--data.init_args.train_short_side=36", "--data.init_args.eval_short_side=32",
            f"--model.init_args.backbone.init_args.head_length={head}",
            f"--model.init_args.head.init_args.max_seq_len={head}",
        ]  # fmt: skip
    return out


class Fits:
    """Each recipe fitted once per session (the block-drop tests compress the TAD fits). Checkpoints are written
    only for the fits that a later command restores (they are large: weights and optimiser state)."""

    def __init__(self, workspace: Path):
        self.workspace = workspace
        self.done: dict[tuple[str, ...], dict[str, Any]] = {}

    def __call__(self, *recipes: str) -> dict[str, Any]:
        if recipes not in self.done:
            self.done[recipes] = self.fit(recipes)
        return self.done[recipes]

    def fit(self, recipes: tuple[str, ...]) -> dict[str, Any]:
        config = resolved_config(["fit", *configs(*recipes)])
        weights = files.weight_file(self.workspace, pretrained_path(config))
        prepare_data(config)
        backbone = BACKBONE[config["model"]["class_path"].rsplit(".", 1)[1]]
        run_root = self.workspace / "runs" / "_".join(Path(r).stem for r in recipes)
        args = [*configs(*recipes), *reduced(config), f"--trainer.default_root_dir={run_root}"]
        if recipes[-1].startswith("haltingvt_variants/"):  # no time embedding in DeiT's file: fewer frames
            args += ["--data.init_args.num_frames=2", "--model.init_args.backbone.init_args.num_frames=2"]
        out = {"args": args, "config": config, "checkpoint": run_root / "fit" / "checkpoints" / "last.ckpt"}
        if recipes[-1] in BUILT_ONLY:
            cli = main(args, run=False)
            out["compared"] = files.assert_loaded(
                cli.model.state_dict(), files.file_tensors(weights), backbone
            )
            return out
        keep = recipes[-1] in RESTORED or recipes[-1] in BLOCKDROP.values()
        callbacks = [
            cb
            for cb in config["trainer"]["callbacks"]
            if keep or not cb["class_path"].endswith(".ModelCheckpoint")
        ]
        loaded = {
            "class_path": "tests.helpers.LoadedFrom",
            "init_args": {"weights": str(weights), "backbone": backbone},
        }
        args += [f"--trainer.callbacks={json.dumps([*callbacks, loaded])}"]
        args += [] if keep else ["--trainer.enable_checkpointing=false"]
        cli = main(["fit", *args, "--run_id=fit"])
        check = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "LoadedFrom")
        assert check.error is None, check.error
        out.update(
            compared=check.compared, steps=cli.trainer.global_step,
            metrics={k: float(v) for k, v in cli.trainer.callback_metrics.items()},
        )  # fmt: skip
        return out


@pytest.fixture(scope="session")
def fits(workspace) -> Fits:
    return Fits(workspace)


def blocks_in(config: dict[str, Any]) -> int:
    """The depth of the recipe's ViT (its ``size``)."""
    vit = json.dumps(config["model"])
    return next(depth for size, (_, depth) in files.VIT.items() if f'"size": "{size}"' in vit)


@pytest.mark.parametrize("recipes", [(r,) for r in TASKS] + VARIANTS, ids=lambda r: r[-1])
def test_paper_recipe_starts_from_the_file_it_names_and_trains(recipes, fits, workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    fitted = fits(*recipes)
    # every block's tensors (12 in timm's blocks and in VideoMAE's, with q/v biases and no qkv bias) at least
    assert fitted["compared"] >= 12 * blocks_in(fitted["config"])
    if recipes[-1] in BUILT_ONLY:
        return
    assert fitted["steps"] == 1
    logged = fitted["metrics"]
    assert any(k.startswith("val/") for k in logged), sorted(logged)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in logged.items() if "loss" in k), logged


@pytest.mark.parametrize("recipe", RESTORED)
def test_validate_and_predict_restore_the_trained_task(recipe, fits, workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    fitted = fits(recipe)
    ckpt = fitted["checkpoint"]
    assert ckpt.is_file()
    trained = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    for command in ("validate", "predict"):
        cli = main([command, *fitted["args"], f"--run_id={command}", f"--ckpt_path={ckpt}"])
        state = cli.model.state_dict()
        assert set(state) == set(trained)
        assert all(torch.equal(state[k], trained[k]) for k in trained), f"{command} did not restore {ckpt}"
    assert any(k.startswith("val/") for k in cli.trainer.callback_metrics) or command == "predict"


def test_dense_classifier_starts_from_deit(fits, workspace, monkeypatch, tmp_path):
    """The dense classifier (the quickstart's task) with DeiT-S inflated to video, from the timm file."""
    monkeypatch.chdir(workspace)
    weights = files.weight_file(workspace, "checkpoints/deit_small_patch16_224.pth")
    data = files.kinetics_lists(Path("data/kinetics400"), "mini_kinetics_train.txt", "mini_kinetics_val.txt")
    backbone = {"class_path": "models.vit.InflatedViT", "init_args": {
        "size": "small", "embed_dim": None, "depth": None, "num_heads": None, "img_size": 224, "num_frames": 2,
        "tubelet_size": 1}}  # fmt: skip
    config = resolved_config(["fit", *configs("quickstart/synthetic_dense_vit.yaml")])
    args = [
        *configs("quickstart/synthetic_dense_vit.yaml"), *reduced(config), f"--model.init_args.backbone={json.dumps(backbone)}",
        f"--model.init_args.pretrained={weights.relative_to(workspace)}", f"--data.init_args.root={data}",
        "--data.init_args.synthetic=false", "--data.init_args.train_list=mini_kinetics_train.txt",
        "--data.init_args.val_list=mini_kinetics_val.txt", "--data.init_args.num_classes=200",
        "--data.init_args.num_frames=2", "--data.init_args.crop_size=224", "--data.init_args.train_short_side=[224, 224]",
        "--data.init_args.eval_short_side=224", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]",
        f'--trainer.callbacks+={{"class_path": "tests.helpers.LoadedFrom", "init_args": {{"weights": "{weights}", '
        '"backbone": "backbone."}}',
    ]  # fmt: skip
    cli = main(["fit", *args, "--run_id=fit"])
    check = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "LoadedFrom")
    assert check.error is None and check.compared >= 12 * 12, check.error
    assert cli.trainer.global_step == 1 and "val/top1" in cli.trainer.callback_metrics


@pytest.mark.parametrize(
    "recipes",
    [(BLOCKDROP[b], b) for b in sorted(BLOCKDROP) if BLOCKDROP[b] not in BUILT_ONLY] + [("tad_thumos_videomae_s.yaml", "blockdrop_thumos_videomae_s.yaml", o) for o in OVERLAYS if o not in REWEIGHTING],
    ids=lambda r: r[-1],
)  # fmt: skip
def test_blockdrop_recipe_compresses_the_trained_detector(recipes, fits, workspace, monkeypatch):
    from lightning_modules.compression.command import main as compress

    monkeypatch.chdir(workspace)
    fitted = fits(recipes[0])
    out = workspace / "compress" / Path(recipes[-1]).stem
    records = compress([
        *configs(*recipes), *reduced(fitted["config"]), f"--trainer.default_root_dir={out / 'runs'}",
        f"--compress.checkpoint={fitted['checkpoint']}", f"--compress.out_dir={out}", "--compress.max_blocks=1",
        "--compress.epochs=1", "--compress.score_batches=1", "--compress.relu_epochs=1",
        '--compress.score_data={"eval_subset": "training", "eval_max_videos": 2}',
        *([] if recipes[-1] in CHOOSING or len(recipes) == 2 else ["--compress.blocks=[5]"]),
    ])  # fmt: skip
    depth = blocks_in(fitted["config"])
    assert records[0]["kept"] == list(range(depth))
    assert len(records[-1]["kept"]) == depth - 1 and (out / "compressed.ckpt").is_file()
    if recipes[-1] not in CHOOSING and len(recipes) == 3:
        assert records[1]["chosen"] == [5]
    else:  # every candidate scored once
        assert sorted(int(b) for b in records[1]["scores"]) == list(range(depth))
