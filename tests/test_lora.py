"""LoRA through peft on the shared core: identity at init, only LoRA trains, merged == adapted model."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from models.lora import add_lora, lora_parameters, merge_lora
from models.vit import InflatedViT, VideoMAEViT


def tiny_vit(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "videomae":  # q/v biases supplied apart from the qkv Linear
        vit = VideoMAEViT(embed_dim=32, depth=2, num_heads=2, img_size=32, num_frames=4)
    else:  # plain biased qkv Linear
        vit = InflatedViT(embed_dim=32, depth=2, num_heads=2, img_size=32, num_frames=2)
    with torch.no_grad():  # non-zero biases, so a dropped bias cannot go unnoticed
        for name, p in vit.named_parameters():
            if "bias" in name:
                p.normal_(std=0.1)
    return vit.eval()


def video(kind: str) -> torch.Tensor:
    frames = 4 if kind == "videomae" else 2
    return torch.randn(2, 3, frames, 32, 32, generator=torch.Generator().manual_seed(1))


KINDS = ["videomae", "inflated"]


@pytest.mark.parametrize("kind", KINDS)
def test_targets_attention_projections_only(kind):
    vit = add_lora(tiny_vit(kind), rank=4)
    wrapped = sorted(name for name, m in vit.named_modules() if isinstance(m, LoraLayer))
    assert wrapped == sorted(f"blocks.{i}.attn.{p}" for i in range(2) for p in ("qkv", "proj"))
    assert type(vit.patch_embed.proj) is nn.Conv3d


def test_targets_blocks_of_a_nested_model():
    outer = nn.ModuleDict({"backbone": tiny_vit("videomae")})
    add_lora(outer, rank=4)
    assert isinstance(outer["backbone"].blocks[1].attn.qkv, LoraLayer)
    assert type(outer["backbone"].patch_embed.proj) is nn.Conv3d


@pytest.mark.parametrize("kind", KINDS)
def test_adapted_model_starts_equal(kind):
    vit, x = tiny_vit(kind), video(kind)
    with torch.no_grad():
        before = vit(x)
        after = add_lora(vit, rank=4, dropout=0.1)(x)
    assert torch.allclose(before, after, atol=1e-6, rtol=0)


def test_qkv_update_reaches_the_output():
    """The qkv projection of VideoMAE carries its q/v biases apart; the LoRA update must still be applied."""
    vit, x = tiny_vit("videomae"), video("videomae")
    with torch.no_grad():
        before = vit(x)
        add_lora(vit, rank=4, target=r"blocks\.\d+\.attn\.qkv")
        for name, p in vit.named_parameters():
            if "lora_B" in name:
                p.normal_()
        assert (vit(x) - before).abs().max() > 1e-2


@pytest.mark.parametrize("kind", KINDS)
def test_only_lora_gets_gradients_and_other_flags_are_kept(kind):
    vit, x = tiny_vit(kind), video(kind)
    vit.requires_grad_(False)
    vit.blocks[0].norm1.requires_grad_(True)
    add_lora(vit, rank=4)
    vit(x).square().sum().backward()
    lora = {id(p) for p in lora_parameters(vit)}
    assert len(lora) == 2 * 2 * 2  # A and B of qkv and proj in two blocks
    with_grad = {id(p) for p in vit.parameters() if p.grad is not None}
    assert with_grad == lora | {id(vit.blocks[0].norm1.weight), id(vit.blocks[0].norm1.bias)}
    assert not vit.blocks[0].attn.qkv.base_layer.weight.requires_grad


@pytest.mark.parametrize("kind", KINDS)
def test_merge_equals_adapted_model_after_training(kind):
    vit, x = tiny_vit(kind), video(kind)
    original_keys = set(vit.state_dict())
    with torch.no_grad():
        original = vit(x)
    vit.requires_grad_(False)
    add_lora(vit, rank=4)
    opt = torch.optim.SGD(lora_parameters(vit), lr=0.5)
    for _ in range(3):  # B moves first, then A
        opt.zero_grad()
        (vit(x) - 1).square().mean().backward()
        opt.step()
    with torch.no_grad():
        adapted = vit(x)
        merged = merge_lora(vit)(x)
    assert (adapted - original).abs().max() > 1e-3
    assert (merged - adapted).abs().max().item() <= 1e-5
    assert not any(isinstance(m, LoraLayer) for m in vit.modules())
    assert set(vit.state_dict()) == original_keys and not hasattr(vit, "peft_config")


def test_rounds_add_merge_add():
    vit = tiny_vit("videomae")
    add_lora(vit, rank=4)
    with pytest.raises(ValueError, match="merge_lora"):
        add_lora(vit, rank=4)
    merge_lora(vit)
    add_lora(vit, rank=2)
    assert vit.blocks[0].attn.proj.lora_A["default"].weight.shape == (2, 32)


def test_no_matching_layer_is_an_error():
    with pytest.raises(ValueError, match="not found"):
        add_lora(nn.Sequential(nn.Linear(4, 4)), rank=2)


def test_official_initialisation_statistics():
    """The block-drop code's LoRALayer: A ~ N(0, 1/sqrt(rank)) (randn(in, rank) / sqrt(rank)), B = 0, scaling 1;
    peft's default A is Kaiming-uniform, bound 1/sqrt(in_features) (std 1/sqrt(3 in))."""
    torch.manual_seed(0)
    rank, dim = 96, 384
    vit = VideoMAEViT(embed_dim=dim, depth=2, num_heads=6, img_size=32, num_frames=4)
    add_lora(vit, rank=rank)
    a = torch.cat([m.lora_A["default"].weight.flatten() for _, m in vit.named_modules() if isinstance(m, LoraLayer)])
    assert a.mean().abs() < 3 * rank**-0.5 / a.numel() ** 0.5
    assert a.std().item() == pytest.approx(rank**-0.5, rel=0.01)
    kurtosis = ((a - a.mean()) ** 4).mean() / a.var() ** 2
    assert kurtosis.item() == pytest.approx(3.0, abs=0.1)  # a normal, not a uniform (1.8)
    for _, m in vit.named_modules():
        if isinstance(m, LoraLayer):
            assert m.lora_B["default"].weight.abs().max() == 0 and m.scaling["default"] == 1.0
    default = VideoMAEViT(embed_dim=dim, depth=2, num_heads=6, img_size=32, num_frames=4)
    add_lora(default, rank=rank, init="peft")
    layers = [m for _, m in default.named_modules() if isinstance(m, LoraLayer)]
    a = torch.cat([m.lora_A["default"].weight.flatten() for m in layers])
    assert a.abs().max() <= dim**-0.5 and a.std().item() == pytest.approx((3 * dim) ** -0.5, rel=0.02)
    with pytest.raises(ValueError, match="LoRA init must be"):
        add_lora(tiny_vit("videomae"), rank=4, init="kaiming")
