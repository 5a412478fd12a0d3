"""What a researcher puts beside a paper recipe, written by the tests: weight files in the layouts the recipes name
(random values of the real shapes) and tiny datasets in each recipe's file format, under one working directory,
so that a recipe runs with its own relative paths (``checkpoints/...``, ``data/...``).

The key names and shapes below are written out from the releases' own code, independently of the project's
loader: timm's ``deit_small_patch16_224`` (the model timm builds), the official VideoMAE fine-tuned checkpoints
(``{'module': ...}``, MCG-NJU/VideoMAE ``modeling_finetune.py``) and mmaction2's VideoMAE checkpoints as OpenTAD
uses them (``{'meta', 'state_dict'}``, ``backbone.*`` in mmaction2's ``vit_mae.py`` names, the fixed sinusoid
``pos_embed`` kept as a buffer, ``cls_head.fc_cls``).
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

#: width, depth of the ViT sizes the recipes use
VIT = {"small": (384, 12), "base": (768, 12), "large": (1024, 24)}
#: AVA v2.2's 60 evaluated action ids (ava_action_list_v2.2_for_activitynet_2019.pbtxt)
AVA_IDS = [
    1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 17, 20, 22, 24, 26, 27, 28, 29, 30, 34, 36, 37, 38, 41, 43,
    45, 46, 47, 48, 49, 51, 52, 54, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 72, 73, 74, 76,
    77, 78, 79, 80,
]  # fmt: skip


def _random(shape: tuple[int, ...], generator: torch.Generator, norm: bool = False) -> Tensor:
    """Values of a trained model's scale: weights about N(0, 0.02), LayerNorm scales about 1."""
    value = torch.randn(shape, generator=generator) * 0.02
    return value + 1.0 if norm else value


def _block(prefix: str, dim: int, g: torch.Generator, fc1: str, fc2: str, qv_bias: bool) -> dict[str, Tensor]:
    out = {}
    for norm in ("norm1", "norm2"):
        out[f"{prefix}{norm}.weight"] = _random((dim,), g, norm=True)
        out[f"{prefix}{norm}.bias"] = _random((dim,), g)
    if qv_bias:  # VideoMAE: q and v biases, no k bias, a bias-free qkv Linear
        out[f"{prefix}attn.q_bias"] = _random((dim,), g)
        out[f"{prefix}attn.v_bias"] = _random((dim,), g)
    else:
        out[f"{prefix}attn.qkv.bias"] = _random((3 * dim,), g)
    out[f"{prefix}attn.qkv.weight"] = _random((3 * dim, dim), g)
    out[f"{prefix}attn.proj.weight"] = _random((dim, dim), g)
    out[f"{prefix}attn.proj.bias"] = _random((dim,), g)
    out[f"{prefix}{fc1}.weight"] = _random((4 * dim, dim), g)
    out[f"{prefix}{fc1}.bias"] = _random((4 * dim,), g)
    out[f"{prefix}{fc2}.weight"] = _random((dim, 4 * dim), g)
    out[f"{prefix}{fc2}.bias"] = _random((dim,), g)
    return out


def sinusoid_positions(n: int, dim: int) -> Tensor:
    """The fixed position table of VideoMAE / mmaction2 (float64 sines and cosines, stored in float32)."""
    exponent = torch.tensor([2 * (j // 2) / dim for j in range(dim)], dtype=torch.float64)
    angles = torch.arange(n, dtype=torch.float64)[:, None] / torch.pow(10000.0, exponent)[None]
    angles[:, 0::2] = angles[:, 0::2].sin()
    angles[:, 1::2] = angles[:, 1::2].cos()
    return angles.float()[None]


def videomae_official(size: str, num_classes: int, seed: int) -> dict:
    """An official VideoMAE fine-tuned checkpoint: ``{'module': state}`` with mean pooling (``fc_norm``)."""
    dim, depth = VIT[size]
    g = torch.Generator().manual_seed(seed)
    state = {"patch_embed.proj.weight": _random((dim, 3, 2, 16, 16), g), "patch_embed.proj.bias": _random((dim,), g)}
    for i in range(depth):
        state.update(_block(f"blocks.{i}.", dim, g, "mlp.fc1", "mlp.fc2", qv_bias=True))
    state["fc_norm.weight"], state["fc_norm.bias"] = _random((dim,), g, norm=True), _random((dim,), g)
    state["head.weight"], state["head.bias"] = _random((num_classes, dim), g), _random((num_classes,), g)
    return {"module": state}


def videomae_mmaction(size: str, seed: int) -> dict:
    """An mmaction2 VideoMAE checkpoint (16x224x224, Kinetics-400 head), saved by mmengine."""
    dim, depth = VIT[size]
    g = torch.Generator().manual_seed(seed)
    state = {
        "backbone.patch_embed.projection.weight": _random((dim, 3, 2, 16, 16), g),
        "backbone.patch_embed.projection.bias": _random((dim,), g),
        "backbone.pos_embed": sinusoid_positions(8 * 14 * 14, dim),
    }
    for i in range(depth):
        state.update(_block(f"backbone.blocks.{i}.", dim, g, "mlp.layers.0.0", "mlp.layers.1", qv_bias=True))
    state["backbone.fc_norm.weight"] = _random((dim,), g, norm=True)
    state["backbone.fc_norm.bias"] = _random((dim,), g)
    state["cls_head.fc_cls.weight"], state["cls_head.fc_cls.bias"] = _random((400, dim), g), _random((400,), g)
    return {"meta": {"epoch": 1, "mmengine_version": "0.7.0"}, "state_dict": state}


def deit_small() -> dict:
    """timm's DeiT-S as the release stores it: ``{'model': state}`` (values: timm's own initialisation)."""
    import timm

    torch.manual_seed(0)
    return {"model": timm.create_model("deit_small_patch16_224", pretrained=False).state_dict()}


#: The weight files the paper recipes name, by file name: how to write each.
WEIGHTS: dict[str, Callable[[], dict]] = {
    "deit_small_patch16_224.pth": deit_small,
    "videomae_vit_b_k400.pth": lambda: videomae_official("base", 400, seed=1),
    "videomae_vit_l_k700.pth": lambda: videomae_official("large", 700, seed=2),
    "vit-small-p16_videomae-k400-pre_16x4x1_kinetics-400.pth": lambda: videomae_mmaction("small", seed=3),
    "vit-large-p16_videomae-k400-pre_16x4x1_kinetics-400.pth": lambda: videomae_mmaction("large", seed=4),
}


def weight_file(workspace: Path, relative: str) -> Path:
    """The weight file a recipe names (``checkpoints/<name>``), written once per test session."""
    path = workspace / relative
    if not path.exists():
        if path.name not in WEIGHTS:
            raise KeyError(f"no writer for the weight file {relative}: add its layout to tests/paper_files.py")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(WEIGHTS[path.name](), path)
    return path


def file_tensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a written weight file, wrappers removed (``module`` / ``model`` / ``state_dict``)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("module", "model", "state_dict"):
        if key in obj:
            return obj[key]
    return obj


# --------------------------------------------------------------------------------- file -> model names

#: mmaction2's names -> the official ones; the rest of the names are the same in both releases and timm
MMACTION_NAMES = [
    (r"^backbone\.", ""), (r"\.projection\.", ".proj."), (r"\.mlp\.layers\.0\.0\.", ".mlp.fc1."),
    (r"\.mlp\.layers\.1\.", ".mlp.fc2."),
]  # fmt: skip
#: What a backbone never takes: classification heads; mmaction2's fixed position buffer (the model computes the
#: same table for its own grid); the mean-pooling norm where the model pools otherwise
NOT_LOADED = re.compile(r"^(head\.|cls_head\.|backbone\.pos_embed$)")
POOLING_NORMS = re.compile(r"^(fc_norm|norm)\.")


def model_name(file_key: str) -> str:
    for pattern, repl in MMACTION_NAMES:
        file_key = re.sub(pattern, repl, file_key)
    return file_key


def assert_loaded(state: dict[str, Tensor], weights: dict[str, Tensor], backbone: str) -> int:
    """Every backbone tensor of ``weights`` (a file's) equals the model tensor of its name under ``backbone``
    (the backbone's prefix in the task's state dict; peft's ``base_layer`` counts as the layer it wraps).
    DeiT's image kernel is a one-frame tubelet in a video model of tubelet 1. Returns the tensors compared."""
    compared = 0
    for key, value in weights.items():
        if NOT_LOADED.match(key):
            continue
        name = model_name(key)
        layer, _, leaf = name.rpartition(".")
        found = [n for n in (f"{backbone}{name}", f"{backbone}{layer}.base_layer.{leaf}") if n in state]
        if not found and POOLING_NORMS.match(name):
            continue  # e.g. EVAD pools with its decoder: the checkpoint's fc_norm has no place
        assert found, f"{key} (as {name}) is not in the model under {backbone!r}"
        got = state[found[0]]
        if got.ndim == value.ndim + 1 and got.shape[2] == 1:  # (D, 3, 1, p, p): DeiT's kernel on one frame
            got = got.squeeze(2)
        assert torch.equal(got, value.to(got.dtype)), f"{found[0]} differs from the file's {key}"
        compared += 1
    return compared


# ------------------------------------------------------------------------------------------- datasets


def _videos(root: Path, names: list[str], num_frames: int, size: tuple[int, int] = (32, 40), fps: int = 10) -> None:
    from datamodules.synthetic import write_video

    rng = np.random.default_rng(0)
    for name in names:
        frames = rng.integers(0, 255, (num_frames, *size, 3), dtype=np.uint8)
        write_video(root / name, frames, fps)


def _once(root: Path, write: Callable[[Path], None]) -> Path:
    """Write a dataset under ``root`` unless a finished one is there."""
    if not (root / ".written").exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        write(root)
        (root / ".written").touch()
    return root


def kinetics_lists(root: Path, train_list: str, val_list: str) -> Path:
    """Mini-Kinetics: ``<video> <label>`` lists (AR-Net's form) and their videos."""

    def write(root: Path) -> None:
        names = [f"train/clip_{i}.mp4" for i in range(2)] + [f"val/clip_{i}.mp4" for i in range(2)]
        _videos(root, names, num_frames=40)
        (root / train_list).write_text("train/clip_0.mp4 3\ntrain/clip_1.mp4 7\n")
        (root / val_list).write_text("val/clip_0.mp4 3\nval/clip_1.mp4 7\n")

    return _once(root, write)


def activitynet_json(root: Path, json_name: str, video_dir: str, subsets: tuple[str, str]) -> Path:
    """An ActivityNet-1.3 annotation file (``database`` of videos with ``subset`` and labelled segments) and
    the videos as ``v_<id>.mp4``; the first two videos in ``subsets[0]``, the other two in ``subsets[1]``."""

    def write(root: Path) -> None:
        database = {}
        for i, (vid, label) in enumerate([("aa01", "Drinking coffee"), ("bb02", "Long jump"),
                                          ("cc03", "Drinking coffee"), ("dd04", "Long jump")]):  # fmt: skip
            database[vid] = {
                "subset": subsets[i // 2], "duration": 8.0, "resolution": "40x32", "url": "",
                "annotations": [{"label": label, "segment": [1.0 + i, 5.5]}],
            }  # fmt: skip
        (root / json_name).parent.mkdir(parents=True, exist_ok=True)
        (root / json_name).write_text(json.dumps({"version": "VERSION 1.3", "database": database}))
        _videos(root / video_dir, [f"v_{vid}.mp4" for vid in database], num_frames=80)

    return _once(root, write)


def cuhk_scores(path: Path, json_file: Path) -> None:
    """Video-level class scores in the CUHK file's form: ``{"class": [...], "results": {id: [...]}}``."""
    database = json.loads(json_file.read_text())["database"]
    labels = sorted({a["label"] for v in database.values() for a in v["annotations"]})
    results = {f"v_{vid}": [1.0 / len(labels)] * len(labels) for vid in database}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"class": labels, "results": results}))


def thumos(root: Path, json_name: str, classes_name: str, video_dir: str, subsets: tuple[str, str]) -> Path:
    """OpenTAD's THUMOS14 layout: the annotation JSON (segments with ``label`` and ``label_id``), the class list
    and the videos as ``<id>.mp4``."""

    def write(root: Path) -> None:
        classes = ["BaseballPitch", "BasketballDunk", "Billiards"]
        database = {}
        for i in range(4):
            vid = f"video_{'validation' if i < 2 else 'test'}_{i:07d}"
            database[vid] = {
                "subset": subsets[i // 2], "duration": 8.0, "frame": 80, "fps": 10.0,
                "annotations": [{"label": classes[i % 3], "label_id": i % 3, "segment": [1.0, 4.5 + i]}],
            }  # fmt: skip
        (root / json_name).parent.mkdir(parents=True, exist_ok=True)
        (root / json_name).write_text(json.dumps({"database": database}))
        (root / classes_name).write_text("\n".join(classes) + "\n")
        _videos(root / video_dir, [f"{vid}.mp4" for vid in database], num_frames=80)

    return _once(root, write)


def ava_frames(root: Path, frames_dir: str, frame_rate: int) -> Path:
    """AVA v2.2 as PySlowFast reads it: the annotation CSVs (a row of an action outside the 60 too), excluded
    timestamps, the 80-class and the 60-class label maps, and frames of the 15-minute clips as
    ``<frames>/<video>/<video>_%06d.jpg`` from second 900."""
    from PIL import Image

    def write(root: Path) -> None:
        ann = root / "annotations"
        ann.mkdir(parents=True)
        items = "".join(f'item {{\n  name: "action {i}"\n  id: {i}\n}}\n' for i in AVA_IDS)
        (ann / "ava_action_list_v2.2_for_activitynet_2019.pbtxt").write_text(items)
        every = "".join(f'item {{\n  name: "action {i}"\n  id: {i}\n}}\n' for i in range(1, 81))
        (ann / "ava_action_list_v2.2.pbtxt").write_text(every)
        rng = np.random.default_rng(0)
        for split, video in (("train", "trainvid001"), ("val", "valvid0001")):
            with (ann / f"ava_{split}_v2.2.csv").open("w", newline="") as f:
                rows = csv.writer(f)
                for second in (902, 903):
                    for person, (x1, y1, x2, y2) in enumerate([(0.1, 0.2, 0.5, 0.9), (0.5, 0.1, 0.9, 0.8)]):
                        for action in (AVA_IDS[person], AVA_IDS[10 + person], 2):  # 2: trained, not evaluated
                            rows.writerow([video, f"{second:04d}", x1, y1, x2, y2, action, person])
            (ann / f"ava_{split}_excluded_timestamps_v2.2.csv").write_text(f"{video},0904\n")
            for number in range(1, 5 * round(frame_rate) + 1):  # seconds 900-905
                path = root / frames_dir / video / f"{video}_{number:06d}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(path)
        # AVA v2.1 under its own names (the same stand-in rows)
        for v22, v21 in (
            ("ava_action_list_v2.2.pbtxt", "ava_action_list_v2.1.pbtxt"),
            ("ava_action_list_v2.2_for_activitynet_2019.pbtxt", "ava_action_list_v2.1_for_activitynet_2018.pbtxt"),
            ("ava_train_v2.2.csv", "ava_train_v2.1.csv"), ("ava_val_v2.2.csv", "ava_val_v2.1.csv"),
            ("ava_train_excluded_timestamps_v2.2.csv", "ava_train_excluded_timestamps_v2.1.csv"),
        ):  # fmt: skip
            (ann / v21).write_bytes((ann / v22).read_bytes())

    return _once(root, write)


def act_pickle(root: Path, annotation_file: str, frame_file: str, num_classes: int) -> Path:
    """An ACT-detector ground-truth pickle (UCF101-24 / JHMDB) and its frames (48x64) as ``frame_file`` under
    ``root`` (e.g. ``rgb-images/{video}/{index:05d}.jpg``), with the dataset's ``num_classes`` labels."""
    from PIL import Image

    from tests.test_act_data import NFRAMES, ground_truth, write_pickle

    def write(root: Path) -> None:
        truth = ground_truth()
        truth["labels"] += [f"action {i}" for i in range(len(truth["labels"]), num_classes)]
        truth["resolution"] = {v: (48, 64) for v in NFRAMES}
        write_pickle(root / annotation_file, truth)
        for video, n in NFRAMES.items():
            for f in range(1, n + 1):
                path = root / frame_file.format(video=video, index=f)
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((48, 64, 3), 10 * f, np.uint8)).save(path)

    return _once(root, write)

