"""The core's one block runner: every model of the project runs its blocks through it, so a wrapper on a block's
projections (peft LoRA, unmerged) takes part in every forward path, and each path equals the merged model's."""

from __future__ import annotations

import copy

import pytest
import torch

from models.haltingvt import HaltingViT
from models.lora import add_lora, merge_lora
from models.temporal_backbone import ChunkedVideoBackbone
from models.vit import InflatedViT, VideoMAEViT
from tests.test_evad_model import tiny_evad


def with_live_lora(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """LoRA on every block's attention projections with non-zero B (a trained adapter, not merged)."""
    if not any("lora_B" in name for name, _ in model.named_parameters()):
        add_lora(model, rank=4)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    return model


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """The reference: the same weights with every LoRA update folded into its base weight (peft's merge)."""
    return merge_lora(copy.deepcopy(model))


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and (a - b).abs().max() <= 1e-9 * max(1.0, b.abs().max().item())


def test_the_lora_is_live_and_every_path_of_the_plain_vits_equals_the_merged_model():
    torch.manual_seed(0)
    video = torch.randn(3, 3, 4, 32, 32, dtype=torch.float64)
    for vit in (
        VideoMAEViT(size=None, embed_dim=32, depth=3, num_heads=2, img_size=32, num_frames=4),
        InflatedViT(
            size=None, embed_dim=32, depth=3, num_heads=2, img_size=32, num_frames=4, drop_path_rate=0.0
        ),
    ):
        vit = vit.double().eval()
        plain = copy.deepcopy(vit)
        lora = with_live_lora(vit)
        reference = merged(lora)
        with torch.no_grad():
            assert (lora(video) - plain(video)).abs().max() > 1e-2  # the adapter changes the output
            close(lora(video), reference(video))
            lora.micro_batch = 1
            x, taps = lora.forward_blocks(lora.embed(video), taps=(0, 2))
            y, ref_taps = reference.forward_blocks(reference.embed(video), taps=(0, 2))
            close(x, y)
            close(taps[0], ref_taps[0])
        lora.train()
        lora.activation_checkpointing = True
        reference.train()
        close(lora.forward_features(video), reference.forward_features(video))


@pytest.mark.parametrize("drop", [[], [3]])
def test_haltingvt_masked_compact_and_early_exit_paths_equal_the_merged_model(drop):
    """The review's case: with an unmerged LoRA on qkv the packed (compact) path read ``attn.qkv.weight`` directly
    and differed from the masked path by 2.7; evaluation, which uses it, lost the LoRA."""
    torch.manual_seed(0)
    model = HaltingViT(
        size=None, embed_dim=64, depth=6, num_heads=4, img_size=64, num_frames=4, glimpse_ratio=0.5,
        halt_scale=10.0, halt_center=-2.0, glimpser_init="torch_default", drop_blocks=drop,
    ).double().eval()  # fmt: skip
    lora = with_live_lora(model)
    reference = merged(lora)
    video = torch.randn(4, 3, 4, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        masked, compact = lora.forward_masked(video), lora.forward_compact(video)
        training = lora.forward_compact(video, losses=True)
        early = lora.forward_compact(video, early_exit=True)
        want_masked, want_compact = reference.forward_masked(video), reference.forward_compact(video)
    assert (masked.active[:, -1] < masked.active[:, 0]).all(), "the test needs halted tokens"
    for got, want in [(masked, want_masked), (compact, want_compact), (training, want_masked)]:
        assert torch.equal(got.active, want.active)
        close(got.feature, want.feature)
    close(masked.feature, compact.feature)
    close(early.feature, want_compact.feature)
    close(training.ponder, want_masked.ponder)


def test_the_temporal_backbone_with_lora_micro_batches_and_checkpointing_equals_the_merged_model():
    torch.manual_seed(0)
    vit = VideoMAEViT(size=None, embed_dim=32, depth=3, num_heads=2, img_size=32, num_frames=4)
    backbone = ChunkedVideoBackbone(vit, chunk_frames=4, head_length=None, finetune="lora").double()
    with_live_lora(backbone)
    video = torch.randn(2, 3, 8, 32, 32, dtype=torch.float64)
    reference = merged(backbone).eval()
    backbone.eval()
    with torch.no_grad():
        want = reference(video)
        close(backbone(video), want)
        backbone.chunk_batch = 1
        close(backbone(video), want)
    backbone.train()
    backbone.activation_checkpointing = True
    reference.train()
    close(backbone(video), reference(video))


def test_evad_encoder_with_pruning_equals_the_merged_model():
    model = tiny_evad().double().eval()
    lora = with_live_lora(model.backbone)
    reference = copy.deepcopy(model)
    merge_lora(reference.backbone)
    video = torch.randn(2, 3, 16, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        tokens, maps, kept, _ = model.encode(video)
        want_tokens, want_maps, want_kept, _ = reference.encode(video)
    assert lora is model.backbone and kept.keys() == want_kept.keys()
    assert all(torch.equal(kept[i], want_kept[i]) for i in kept)
    close(tokens, want_tokens)
    for got, want in zip(maps, want_maps, strict=True):
        close(got, want)
