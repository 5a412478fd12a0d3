"""Each paper recipe's resolved configuration (through the CLI parser, defaults included) against the official
values, each with the official file and line it comes from, so that a change that drifts from a paper's protocol
fails here. The sources, as read:

- EVAD: github.com/MCG-NJU/EVAD at 0efdb7e (PySlowFast base: slowfast/..., the configs in projects/evad/configs).
- OpenTAD: github.com/sming256/OpenTAD at 3dd7b03 (AdaTAD configs in configs/adatad).
- Block drop: github.com/nanxiaolu/Progressive_Block_Drop-TAD at 74bce47 (an OpenTAD fork; "BD" below).

A value that departs from the official one on purpose is listed in ``DEPARTURES`` with the official value; its
option must be named in the recipe's header.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lightning_modules.cli import resolved_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"

EVAD_B = {
    # projects/evad/configs/ViT_B_16x4_KTP.yaml
    "model.detector.num_classes": 80,  # :51 MODEL.NUM_CLASSES (80-way head; slowfast/datasets/ava_dataset.py:546-553)
    "model.detector.keep_rate": 0.7,  # :60 keep rate
    "model.detector.keyframe_weight": 1.0,  # enhanced weight only in ViT_B_16x4_KTP_EW.yaml
    "model.detector.box_extension": [0.4, 0.2],
    "model.detector.person_threshold": 0.7,  # projects/evad/models/config.py:40 PERSON_THRESHOLD
    "model.detector.score": "action",  # projects/evad/models/e2e_detector.py:208 (sigmoid action score alone)
    "model.detector.loss_normalisation": "terms",  # projects/evad/train_net.py:71 sum / len(loss_dict)
    "model.detector.backbone.drop_path_rate": 0.1,
    "model.optimizer.name": "adamw",  # slowfast/models/optimizer.py:146-151
    "model.optimizer.lr": 2.5e-5,  # :39 SOLVER.BASE_LR
    "model.optimizer.weight_decay": 1e-4,  # SOLVER.WEIGHT_DECAY
    "model.head_lr_mult": 8.0,  # :43 SOLVER.LR_SCALE on det_head.* (slowfast/models/optimizer.py:48,56-59)
    "model.schedule.kind": "step",  # :40-42 steps_with_relative_lrs
    "model.schedule.milestones": [5.0, 8.0],  # :41 STEPS [0, 5, 8]
    "model.schedule.gamma": 0.1,  # :42 LRS [1, 0.1, 0.01]
    "model.schedule.warmup_epochs": 2.0,  # :47 WARMUP_EPOCHS
    "warmup_start_lr": 2.5e-6,  # :48 WARMUP_START_LR
    "model.max_detections_per_keyframe": None,  # slowfast/utils/ava_eval_helper.py:308-313: every (box, class)
    "trainer.max_epochs": 12,  # :44 MAX_EPOCH
    "trainer.precision": "32-true",
    "clips_per_step": 16,  # :4 TRAIN.BATCH_SIZE over 8 GPUs
    "validation_from": 5,  # train_net.py:331 with TRAIN.EVAL_PERIOD 5 (:5) and TEST_AFTER_EPOCH 5 (defaults.py:53)
    "data.num_frames": 16,
    "data.frame_stride": 4,
    "data.train_short_side": 288,  # :22 TRAIN_SCALES
    "data.eval_short_side": 288,  # :23 TEST_SCALE
    "data.antialias": False,  # slowfast/datasets/dataset_mapper.py:76-78 cv2.resize(INTER_LINEAR)
    "data.flip": True,  # defaults.py:384 DATA.RANDOM_FLIP
    "data.label_map": "annotations/ava_action_list_v2.2_for_activitynet_2019.pbtxt",  # defaults.py:613
    "data.train_label_map": "annotations/ava_action_list_v2.2.pbtxt",  # the 80 classes of ava_train_v2.2.csv
}
EVAD_L = {
    **EVAD_B,
    # projects/evad/configs/ViT_L_16x4_KTP.yaml
    "model.detector.backbone.drop_path_rate": 0.2,
    "model.optimizer.lr": 1e-5,  # :39 BASE_LR
    "warmup_start_lr": 2.5e-6,  # :48 WARMUP_START_LR
    "clips_per_step": 8,  # :4 TRAIN.BATCH_SIZE
}
EVAD_L_V21 = {
    **EVAD_L,
    # projects/evad/configs/ViT_L_16x4_KTP_v2.1.yaml
    "data.train_csv": "annotations/ava_train_v2.1.csv",  # :29 TRAIN_GT_BOX_LISTS
    "data.val_csv": "annotations/ava_val_v2.1.csv",  # :28, :31 GROUNDTRUTH_FILE
    "data.label_map": "annotations/ava_action_list_v2.1_for_activitynet_2018.pbtxt",  # :30 LABEL_MAP_FILE
    "data.train_label_map": "annotations/ava_action_list_v2.1.pbtxt",
    "data.val_excluded_timestamps": "annotations/ava_val_excluded_timestamps_v2.2.csv",  # EXCLUSION_FILE not set
}

TAD_S = {
    # BD configs/adatad/thumos/e2e_thumos_videomae_s_768x1_160_LongLoRA.py (on OpenTAD's adapter config)
    "model.backbone.finetune": "lora",
    "model.backbone.lora_rank": 96,  # :83
    "model.backbone.lora_init": "official",  # opentad/models/backbones/vit_longlora.py:21-24 (BD)
    "model.backbone_lr": 5e-5,  # LoRA / norm / patch_embed group lr
    "model.backbone_weight_decay": 0.05,  # BD opentad/cores/optimizer.py:112-124 custom groups, wd 0.05
    "model.optimizer.lr": 1e-4,  # head
    "model.optimizer.weight_decay": 0.05,
    "model.schedule.kind": "cosine",
    "model.schedule.warmup_epochs": 5.0,  # scheduler warmup_epoch 5
    "model.schedule.warmup_start_factor": 0.0,  # opentad/cores/scheduler.py:74-75 warmup_start_lr 0
    "model.schedule.epochs": 100.0,  # cosine max_epoch 100
    "trainer.max_epochs": 60,  # end_epoch 60
    "trainer.gradient_clip_val": 1.0,  # solver clip_grad 1.0
    "ema_decay": 0.999,  # opentad/utils/ema.py:6,24
    "validation_from": 45,  # val_start_epoch 45 (:154-155), every epoch
    "data.window_size": 768,
    "data.frame_stride": 4,
    "data.window_overlap": 0.5,
    "model.postprocess.sigma": 0.7,
    "model.tious": [0.3, 0.4, 0.5, 0.6, 0.7],
}
TAD_L = {
    **{k: v for k, v in TAD_S.items() if not k.startswith("model.backbone.lora")},
    # OpenTAD configs/adatad/thumos/e2e_thumos_videomae_l_768x1_160_adapter.py (on the S adapter config)
    "model.backbone.finetune": "adapter",
    "model.backbone_lr": 1e-4,  # :16 adapter lr (S: 2e-4)
    "validation_from": 40,  # S adapter config :154-155, every 2 epochs
}
TAD_L_LORA = {
    **TAD_L,
    # BD configs/adatad/thumos/e2e_thumos_videomae_l_768x1_160_longlora.py
    "model.backbone.finetune": "lora",
    "model.backbone.lora_rank": 256,  # :9 1024 // 4
    "model.backbone.lora_init": "official",
    "model.backbone_lr": 5e-5,  # :16-17
}
TAD_ANET = {
    # BD configs/adatad/anet/e2e_anet_videomae_s_768x1_160_LongLoRA.py
    "model.backbone.finetune": "lora",
    "model.backbone.lora_rank": 96,  # :78
    "model.backbone.lora_init": "official",
    "model.backbone_lr": 5e-5,
    "model.backbone_weight_decay": 0.05,
    "model.optimizer.lr": 1e-3,  # head lr
    "model.schedule.warmup_start_factor": 0.0,
    "model.schedule.epochs": 15.0,  # :143 cosine 15
    "trainer.max_epochs": 15,  # no end_epoch
    "validation_from": 8,  # :169
    "data.mode": "resize",
    "model.postprocess.multiclass": False,
    "model.postprocess.voting_thresh": 0.9,
    "model.postprocess.max_seg_num": 100,
    "model.postprocess.min_score": 0.001,
    "model.postprocess.external_cls_topk": 2,  # CUHKANETClassifier topk=2
}
TAD_RELU = {
    **TAD_S,
    # BD configs/adatad/thumos/e2e_thumos_videomae_s_768x1_160_LongLoRA_relu.py
    "model.backbone.vit.mlp_activation": "relu",  # vit_longlora_relu.py:185-192
    "model.backbone_lr": 2e-4,  # :123
    "model.schedule.epochs": 80.0,  # :137
}

BLOCKDROP_S = {
    # BD configs/adatad/thumos/e2e_thumos_videomae_s_768x1_160_LongLoRA_distillation_auto.py and
    # tools/train_distillation_auto.py
    "metric": "map",  # drop_type train_mAP (:244)
    "score_key": "val/mAP@0.5",  # opentad/cores/test_engine_sub.py:138-150 (THUMOS: mAP@0.5)
    "score_data.eval_subset": "training",
    "max_blocks": 4,  # the paper's Table A ([7, 10, 6, 3]); the released loop: depth // 4 (:238)
    "one_shot": False,
    "recovery": "lora",
    "lora_rank": 96,  # :156 384 // 4
    "lora_init": "official",
    "epochs": 60,
    "lr": 1e-4,  # head
    "backbone_lr": 1e-4,  # LoRA / norm / patch_embed
    "warmup_epochs": 5.0,
    "schedule_epochs": 65.0,
    "teacher": "original",
    "alignment.feature": 1.0,
    "alignment.prediction": 1.0,
    "alignment.segment": 1.0,
    "alignment.temperature": 3.5,
    "eval_first_epoch": 10,  # :254-265 every 5 from 10
    "eval_every": 5,
}
BLOCKDROP_ANET = {
    **BLOCKDROP_S,
    # BD configs/adatad/anet/e2e_anet_videomae_s_768x1_160_LongLoRA_distillation_auto.py
    "score_key": "val/average_mAP",
    "max_blocks": 4,  # the paper's Table A ([6, 3, 8, 11])
    "epochs": 15,  # :286
    "first_round_epochs": 8,  # :280
    "first_round_schedule_epochs": 10.0,  # :250
    "schedule_epochs": 15.0,  # :251
    "lr": 1e-3,  # :236-248 head
    "teacher": "previous",  # :231 dynamic_teacher
    "eval_first_epoch": 8,
    "eval_every": 1,
}
BLOCKDROP_L = {
    **BLOCKDROP_S,
    # BD configs/adatad/thumos/e2e_thumos_videomae_l_768x1_160_LongLoRA_distillation_auto.py
    "max_blocks": 6,  # depth // 4
    "lora_rank": 256,  # :9
    "schedule_epochs": 80.0,  # :33-34
    "epochs": 60,  # :40, :46
}
THREE = {"max_blocks": 3}  # the paper's ablations drop 3 blocks
ABLATIONS = {
    "random_2_5_9.yaml": {**THREE, "blocks": [2, 5, 9], "one_shot": True},  # Table B, 68.41
    "random_0_4_7.yaml": {**THREE, "blocks": [0, 4, 7], "one_shot": True},  # Table B, 69.06
    "one_shot.yaml": {**THREE, "one_shot": True},  # 68.91
    "no_finetune.yaml": {**THREE, "recovery": "none", "head_trainable": False},  # 65.29
    "full_finetune.yaml": {**THREE, "recovery": "full"},  # 70.42
    "head_frozen.yaml": {**THREE, "head_trainable": False},  # -1.57
    "metric_train_loss.yaml": {**THREE, "metric": "train_loss"},  # 70.88
    "metric_feature_mse.yaml": {**THREE, "metric": "feature_mse"},  # 69.37
    "no_alignment.yaml": {**THREE, "alignment.feature": 0.0, "alignment.prediction": 0.0, "alignment.segment": 0.0},
    "feature_only.yaml": {**THREE, "alignment.feature": 1.0, "alignment.prediction": 0.0, "alignment.segment": 0.0},
    "prediction_only.yaml": {
        **THREE, "alignment.feature": 0.0, "alignment.prediction": 1.0, "alignment.segment": 1.0,
    },  # fmt: skip
}

#: (recipes) -> {key: (this recipe's value, the official value)}; the key must be named in the recipe header
DEPARTURES: dict[tuple[str, ...], dict[str, tuple[Any, Any]]] = {
    ("tad_thumos_videomae_s.yaml",): {"trainer.precision": ("bf16-mixed", "16-mixed (fp16 + grad scaler)")},
    ("blockdrop_thumos_videomae_s.yaml",): {"keep": ("last", "best")},
    ("blockdrop_anet_videomae_s.yaml",): {"keep": ("last", "best")},
    ("blockdrop_thumos_videomae_l.yaml",): {"keep": ("last", "best")},
}

TASK_RECIPES = {
    ("evad_ava_vitb.yaml",): EVAD_B,
    ("evad_ava_vitb.yaml", "evad_variants/ava_vitb_rho1.yaml"): {
        **EVAD_B, "model.detector.keep_rate": 1.0, "model.detector.box_extension": [0.0, 0.0],  # ViT_B_16x4.yaml
    },  # fmt: skip
    ("evad_ava_vitb.yaml", "evad_variants/ava_vitb_ew.yaml"): {
        **EVAD_B, "model.detector.keep_rate": 0.6, "model.detector.keyframe_weight": 4.0,  # _KTP_EW.yaml:60-61
    },  # fmt: skip
    ("evad_ava_vitl.yaml",): EVAD_L,
    ("evad_ava_vitl.yaml", "evad_variants/ava_vitl_v21.yaml"): EVAD_L_V21,
    ("tad_thumos_videomae_s.yaml",): TAD_S,
    ("tad_thumos_videomae_l.yaml",): TAD_L,
    ("tad_thumos_videomae_l.yaml", "tad_variants/thumos_videomae_l_lora.yaml"): TAD_L_LORA,
    ("tad_thumos_videomae_s.yaml", "tad_variants/thumos_videomae_s_relu.yaml"): TAD_RELU,
    ("tad_anet_videomae_s.yaml",): TAD_ANET,
}
COMPRESS_RECIPES = {
    ("tad_thumos_videomae_s.yaml", "blockdrop_thumos_videomae_s.yaml"): BLOCKDROP_S,
    ("tad_anet_videomae_s.yaml", "blockdrop_anet_videomae_s.yaml"): BLOCKDROP_ANET,
    ("tad_thumos_videomae_l.yaml", "tad_variants/thumos_videomae_l_lora.yaml",
     "blockdrop_thumos_videomae_l.yaml"): BLOCKDROP_L,
    **{
        ("tad_thumos_videomae_s.yaml", "blockdrop_thumos_videomae_s.yaml", f"blockdrop/{name}"):
            {**BLOCKDROP_S, **values}
        for name, values in ABLATIONS.items()
    },
}  # fmt: skip


def dig(node: Any, dotted: str) -> Any:
    """``a.b.c`` of a resolved config, stepping through ``init_args`` of class entries."""
    for key in dotted.split("."):
        if isinstance(node, dict) and "init_args" in node and key not in node:
            node = node["init_args"]
        node = node[key]
    return node


def callback(config: dict[str, Any], name: str) -> dict[str, Any] | None:
    found = [c for c in config["trainer"]["callbacks"] or [] if c["class_path"].rsplit(".", 1)[1] == name]
    return (found[0].get("init_args") or {}) if found else None


def derived(config: dict[str, Any], key: str) -> Any:
    """Values the official configs state directly that the recipe states through two settings."""
    model, trainer = config["model"]["init_args"], config["trainer"]
    if key == "warmup_start_lr":
        return model["optimizer"]["lr"] * model["schedule"]["warmup_start_factor"]
    if key == "clips_per_step":
        return trainer["devices"] * trainer["num_nodes"] * config["data"]["init_args"]["batch_size"]
    if key == "validation_from":
        schedule = callback(config, "ValidationSchedule")
        assert schedule is not None and trainer["check_val_every_n_epoch"] == 1
        return schedule["first_epoch"]
    if key == "ema_decay":
        return callback(config, "EMAWeightAveraging")["decay"]
    return dig(config, key)


def check(values: dict[str, Any], read) -> list[str]:
    drift = []
    for key, official in values.items():
        got = read(key)
        same = got == pytest.approx(official) if isinstance(official, float) else got == official
        if not same:
            drift.append(f"{key}: {got!r}, official {official!r}")
    return drift


def header(recipes: tuple[str, ...]) -> str:
    """The comment lines of the recipe."""
    lines = (RECIPES / recipes[-1]).read_text().splitlines()
    return "\n".join(line for line in lines if line.startswith("#"))


@pytest.mark.parametrize("recipes", list(TASK_RECIPES), ids=lambda r: "+".join(r))
def test_task_recipe_follows_the_official_protocol(recipes):
    config = resolved_config(["fit", *(a for r in recipes for a in ("--config", str(RECIPES / r)))])
    official = dict(TASK_RECIPES[recipes])
    departures = DEPARTURES.get(recipes, {})
    for key, (ours, _) in departures.items():
        official.pop(key, None)
        assert derived(config, key) == ours
        assert key.rsplit(".", 1)[-1] in header(recipes), f"{key} departs but {recipes[-1]} does not say so"
    assert check(official, lambda k: derived(config, k)) == []


@pytest.mark.parametrize("recipes", list(COMPRESS_RECIPES), ids=lambda r: "+".join(r))
def test_compress_recipe_follows_the_official_protocol(recipes):
    from lightning_modules.compression.command import build_parser

    args = [a for r in recipes for a in ("--config", str(RECIPES / r))]
    settings = build_parser().parse_args([*args, "--compress.checkpoint=x"]).compress.as_dict()
    official = dict(COMPRESS_RECIPES[recipes])
    for key, (ours, _) in DEPARTURES.get(recipes[1:2], {}).items():
        official.pop(key, None)
        assert dig(settings, key) == ours
        assert f"keep: {ours}" in header(recipes[1:2])
    assert check(official, lambda k: dig(settings, k)) == []


def test_drift_is_caught():
    """The comparison fails on a changed value (the tests above cannot pass vacuously)."""
    recipe = str(RECIPES / "evad_ava_vitb.yaml")
    config = resolved_config(["fit", "--config", recipe, "--model.init_args.head_lr_mult=4"])
    assert check(EVAD_B, lambda k: derived(config, k)) == ["model.head_lr_mult: 4.0, official 8.0"]
