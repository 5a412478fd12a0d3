"""``load_pretrained`` never half-loads in silence: depth, layer scale, learned positions, key prefixes."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import Tensor

from models.checkpoint import CheckpointError, load_pretrained
from models.vit import VideoMAEViT


def tiny(depth: int = 2, seed: int = 0, use_mean_pooling: bool = True) -> VideoMAEViT:
    """A 32-wide VideoMAE ViT on 4 frames at 32x32 (2x2x2 = 8 tokens), every tensor random so that a tensor
    loaded into the wrong place, or left at its initial value, cannot pass for the right one."""
    torch.manual_seed(seed)
    model = VideoMAEViT(
        size=None, embed_dim=32, depth=depth, num_heads=2, img_size=32, num_frames=4,
        use_mean_pooling=use_mean_pooling,
    ).eval()  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.5)
    return model


def state(model: VideoMAEViT) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def sinusoid_by_hand(n: int, dim: int) -> Tensor:
    """Channel 2i: sin(p / 10000^(2i/dim)), channel 2i+1: its cosine, one value at a time."""
    rows = []
    for p in range(n):
        row = []
        for c in range(dim):
            angle = p / 10000 ** (2 * (c // 2) / dim)
            row.append(math.sin(angle) if c % 2 == 0 else math.cos(angle))
        rows.append(row)
    return torch.tensor(rows)[None]  # (1, N, D), mmaction2 keeps it as a buffer of this shape


@pytest.mark.parametrize("have,want", [(1, 2), (3, 2)])
def test_block_count_mismatch_is_an_error_naming_both_depths_and_the_fix(tmp_path, have, want):
    torch.save({"model": tiny(depth=have).state_dict()}, tmp_path / "vit_d.pth")
    dst = tiny(depth=want, seed=1)
    before = state(dst)
    opt_in = "allow_missing=True" if have < want else "allow_unexpected=True"
    with pytest.raises(CheckpointError) as err:
        load_pretrained(dst, tmp_path / "vit_d.pth")
    message = str(err.value)
    assert "vit_d.pth" in message
    assert f"has {have} blocks but VideoMAEViT has {want}" in message
    assert f"`depth: {have}`" in message and opt_in in message
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items()), "nothing may be half-loaded"


def test_depth_mismatch_with_opt_in_loads_the_shared_blocks_and_warns(tmp_path, caplog):
    src = tiny(depth=1)
    torch.save(src.state_dict(), tmp_path / "shallow.pth")
    dst = tiny(depth=2, seed=1)
    block1 = {k: v.clone() for k, v in dst.blocks[1].state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="models.checkpoint"):
        report = load_pretrained(dst, tmp_path / "shallow.pth", allow_missing=True)
    assert all(torch.equal(v, src.blocks[0].state_dict()[k]) for k, v in dst.blocks[0].state_dict().items())
    assert all(torch.equal(v, block1[k]) for k, v in dst.blocks[1].state_dict().items())
    assert report.missing == sorted(f"blocks.1.{k}" for k in block1)
    assert "has 1 blocks but VideoMAEViT has 2" in caplog.text and "blocks.1.mlp.fc2.weight" in caplog.text


@pytest.mark.parametrize("names", [("gamma_1", "gamma_2"), ("ls1.gamma", "ls2.gamma")])
def test_layer_scale_is_refused_even_with_the_opt_ins(tmp_path, names):
    """VideoMAE init_values > 0 (or timm's ls1/ls2): dropping them changes every block's output."""
    sd = {f"encoder.{k}": v for k, v in tiny().state_dict().items()}
    for i in range(2):
        for n in names:
            sd[f"encoder.blocks.{i}.{n}"] = torch.full((32,), 0.1)
    torch.save({"model": sd}, tmp_path / "ls.pth")
    for opt_in in ({}, {"allow_missing": True, "allow_unexpected": True}):
        with pytest.raises(CheckpointError) as err:
            load_pretrained(tiny(seed=1), tmp_path / "ls.pth", **opt_in)
        message = str(err.value)
        assert "ls.pth" in message and "layer-scale" in message and f"blocks.0.{names[0]}" in message
        assert "init_values" in message and "no layer scale" in message


def test_learned_pos_embed_is_refused(tmp_path):
    sd = tiny().state_dict()
    torch.manual_seed(2)
    sd["pos_embed"] = 0.02 * torch.randn(1, 8, 32)  # VideoMAE use_learnable_pos_emb=True
    torch.save(sd, tmp_path / "learned_pos.pth")
    with pytest.raises(CheckpointError) as err:
        load_pretrained(tiny(seed=1), tmp_path / "learned_pos.pth", allow_unexpected=True)
    message = str(err.value)
    assert "learned_pos.pth" in message and "'pos_embed'" in message and "(1, 8, 32)" in message
    assert "fixed sinusoid" in message and "use_learnable_pos_emb" in message


def test_mmaction2_layout_with_its_sinusoid_buffer_loads(tmp_path):
    """mmaction2: backbone.* in mmcv names, the fixed table as a buffer, a cls_head without the prefix."""
    src = tiny()
    rename = {
        "patch_embed.proj.": "patch_embed.projection.",
        "mlp.fc1.": "mlp.layers.0.0.",
        "mlp.fc2.": "mlp.layers.1.",
    }
    sd = {}
    for key, value in src.state_dict().items():
        for ours, theirs in rename.items():
            key = key.replace(ours, theirs)
        sd[f"backbone.{key}"] = value
    sd["backbone.pos_embed"] = sinusoid_by_hand(8, 32)
    sd |= {"cls_head.fc_cls.weight": torch.zeros(5, 32), "cls_head.fc_cls.bias": torch.zeros(5)}
    torch.save({"state_dict": sd}, tmp_path / "mm.pth")
    dst = tiny(seed=1)
    report = load_pretrained(dst, tmp_path / "mm.pth")
    assert report.source_format == "mmaction2-videomae" and report.missing == []
    assert sorted(report.ignored) == ["cls_head.fc_cls.bias", "cls_head.fc_cls.weight", "pos_embed"]
    video = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        assert torch.equal(dst(video), src(video))


def test_prefixes_are_stripped_per_key_and_heads_ignored(tmp_path):
    """``backbone.*`` beside an unprefixed ``cls_head.*`` and a DDP ``module.head.*``: the official loaders
    strip per key; a strip only when every key has the prefix fails here."""
    src = tiny()
    sd = {f"backbone.{k}": v for k, v in src.state_dict().items()}
    sd |= {"cls_head.fc_cls.weight": torch.ones(5, 32), "module.head.weight": torch.ones(5, 32)}
    torch.save(sd, tmp_path / "mixed.pth")
    dst = tiny(seed=1)
    report = load_pretrained(dst, tmp_path / "mixed.pth")
    assert sorted(report.ignored) == ["cls_head.fc_cls.weight", "head.weight"]
    assert report.missing == [] and report.unexpected == []
    assert report.loaded == sorted(src.state_dict())
    for key, value in dst.state_dict().items():
        assert torch.equal(value, sd[f"backbone.{key}"]), key


def test_keys_that_still_do_not_map_name_their_prefix(tmp_path):
    src = tiny()
    # A full backbone plus an EMA copy under a prefix the loader does not know: never dropped silently.
    sd = {f"backbone.{k}": v for k, v in src.state_dict().items()} | {
        f"model_ema.{k}": v for k, v in src.state_dict().items()
    }
    torch.save(sd, tmp_path / "ema.pth")
    with pytest.raises(CheckpointError) as err:
        load_pretrained(tiny(seed=1), tmp_path / "ema.pth")
    message = str(err.value)
    assert "ema.pth" in message and f"'model_ema.' ({len(src.state_dict())})" in message
    assert "allow_unexpected=True" in message
    # Nothing maps at all: the error names the prefix seen in the file.
    torch.save({f"teacher.{k}": v for k, v in src.state_dict().items()}, tmp_path / "teacher.pth")
    with pytest.raises(CheckpointError, match=r"teacher\.pth: no tensor .*'teacher\.'"):
        load_pretrained(tiny(seed=1), tmp_path / "teacher.pth")
    # Two keys naming the same tensor once stripped are two copies of the weights, not one.
    w = src.state_dict()["fc_norm.weight"]
    torch.save(src.state_dict() | {"module.fc_norm.weight": w + 1}, tmp_path / "twice.pth")
    with pytest.raises(CheckpointError, match=r"'fc_norm\.weight' and 'module\.fc_norm\.weight' both name"):
        load_pretrained(tiny(seed=1), tmp_path / "twice.pth")


def test_partial_load_is_an_error_unless_asked_for_and_then_warns(tmp_path, caplog):
    src = tiny()
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith(("patch_embed.", "blocks.1.attn."))}
    torch.save(sd, tmp_path / "partial.pth")
    absent = ["blocks.1.attn.proj.bias", "blocks.1.attn.proj.weight", "blocks.1.attn.q_bias",
              "blocks.1.attn.qkv.weight", "blocks.1.attn.v_bias", "patch_embed.proj.bias",
              "patch_embed.proj.weight"]  # fmt: skip
    dst = tiny(seed=1)
    before = state(dst)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(dst, tmp_path / "partial.pth")
    assert "partial.pth" in str(err.value) and "allow_missing=True" in str(err.value)
    assert all(k in str(err.value) for k in absent)
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())

    with caplog.at_level(logging.WARNING, logger="models.checkpoint"):
        report = load_pretrained(dst, tmp_path / "partial.pth", allow_missing=True)
    assert report.missing == absent and report.expected_missing == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and all(k in warnings[0].getMessage() for k in absent)
    for key, value in dst.state_dict().items():
        assert torch.equal(value, before[key] if key in absent else sd[key]), key


def test_pretraining_checkpoint_into_mean_pooling_model_leaves_only_fc_norm_fresh(tmp_path, caplog):
    """The official fine-tuning recipe: the pre-trained encoder has ``norm``, not ``fc_norm``; no warning."""
    src = tiny(use_mean_pooling=False)
    torch.save({"model": {f"encoder.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "pre.pth")
    dst = tiny(seed=1)
    fc_norm = dst.fc_norm.weight.clone()
    with caplog.at_level(logging.WARNING, logger="models.checkpoint"):
        report = load_pretrained(dst, tmp_path / "pre.pth")
    assert report.missing == report.expected_missing == ["fc_norm.bias", "fc_norm.weight"]
    assert sorted(report.ignored) == ["norm.bias", "norm.weight"]
    assert torch.equal(dst.fc_norm.weight, fc_norm) and torch.equal(
        dst.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight
    )
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_nothing_in_a_checkpoint_runs_unless_trusted(tmp_path, caplog):
    """A file beside its tensors holds an ``argparse.Namespace`` (as official VideoMAE files do) and an object
    whose unpickling calls a function: the weights load, the foreign objects are stood in for, the call never
    happens. ``trust_pickle=True`` unpickles fully, and the call happens."""
    import argparse

    from models.torch_files import read_torch_file
    from tests.helpers import Payload

    source = tiny(seed=1)
    marker = tmp_path / "ran"
    path = tmp_path / "hostile.pth"
    hostile = {"model": source.state_dict(), "args": argparse.Namespace(lr=1.5e-4), "x": Payload(str(marker))}
    torch.save(hostile, path)
    model = tiny(seed=2)
    report = load_pretrained(model, path)
    assert not marker.exists()
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())
    assert len(report.loaded) == len(source.state_dict())
    obj, foreign = read_torch_file(path)
    assert "argparse.Namespace" in foreign and any("touch" in name for name in foreign) and not marker.exists()
    assert set(obj["model"]) == set(source.state_dict())
    with caplog.at_level(logging.WARNING):
        load_pretrained(tiny(seed=2), path, trust_pickle=True)
    assert marker.exists() and "trust_pickle" in caplog.text


class Shell:
    def __reduce__(self):
        import os

        return os.getcwd, ()


class Chained:
    """Unpickles as ``getattr(Path, "touch")(Path(marker))``: a call of what another call returned."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return Path.touch, (Path(self.marker),)


@pytest.mark.parametrize("payload", ["blocked", "chained"])
def test_a_checkpoint_whose_calls_cannot_be_stood_in_for_is_refused_with_the_opt_in_named(tmp_path, payload):
    marker = tmp_path / "ran"
    path = tmp_path / "hostile.pth"
    torch.save({"model": tiny().state_dict(), "x": Shell() if payload == "blocked" else Chained(str(marker))}, path)
    name = "getcwd" if payload == "blocked" else "getattr"
    with pytest.raises(CheckpointError, match=rf"(?s){name}.*nothing in it ran.*trust_pickle: true"):
        load_pretrained(tiny(), path)
    assert not marker.exists()
