"""The shared video-ViT core against independent implementations: Hugging Face VideoMAE and timm DeiT."""

from __future__ import annotations

import argparse

import pytest
import timm
import torch
from transformers import VideoMAEConfig, VideoMAEForVideoClassification, VideoMAEModel
from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table

from models.checkpoint import CheckpointError, load_pretrained
from models.layers import Attention, Block, sinusoid_table
from models.vit import InflatedViT, VideoMAEViT


def hf_videomae(layers: int, use_mean_pooling: bool, classifier: bool = False, qv_bias: bool = True):
    cfg = VideoMAEConfig(
        hidden_size=384, num_hidden_layers=layers, num_attention_heads=6, intermediate_size=1536, num_frames=16,
        image_size=224, use_mean_pooling=use_mean_pooling, layer_norm_eps=1e-6, num_labels=7, qv_bias=qv_bias,
    )  # fmt: skip
    torch.manual_seed(0)
    model = (VideoMAEForVideoClassification if classifier else VideoMAEModel)(cfg).eval()
    with torch.no_grad():  # non-zero biases and norms, so a mis-mapped key cannot go unnoticed
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def videomae_small():
    """transformers' ViT-S VideoMAEModel, a 16-frame clip at 224 and its token features: the reference both
    serialisations are checked against (built and run once, most of those checks' time)."""
    hf = hf_videomae(layers=12, use_mean_pooling=False)
    video = torch.randn(1, 3, 16, 224, 224)
    with torch.no_grad():
        expected = hf(pixel_values=video.transpose(1, 2)).last_hidden_state
    return hf, video, expected


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_videomae_small_matches_transformers(tmp_path, safe_serialization, videomae_small):
    """ViT-S, 16 frames at 224: token features equal to transformers' VideoMAEModel with the same weights."""
    hf, video, expected = videomae_small
    hf.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    ours = VideoMAEViT(size="small", num_frames=16, img_size=224, use_mean_pooling=False).eval()
    report = load_pretrained(ours, tmp_path)
    assert report.source_format == "huggingface-videomae"
    assert report.missing == [] and report.unexpected == []
    with torch.no_grad():
        got = ours.forward_features(video)
    assert got.shape == (1, 8 * 14 * 14, 384)
    assert (got - expected).abs().max().item() <= 1e-4


def test_videomae_classification_checkpoint_mean_pooling(tmp_path):
    """VideoMAEForVideoClassification: fc_norm loads, classifier is ignored, pooled features match."""
    hf = hf_videomae(layers=2, use_mean_pooling=True, classifier=True)
    hf.save_pretrained(tmp_path)
    ours = VideoMAEViT(size="small", depth=2, num_frames=16, img_size=224).eval()
    report = load_pretrained(ours, tmp_path / "model.safetensors")
    assert "classifier.weight" in report.ignored and report.missing == []
    video = torch.randn(2, 3, 16, 224, 224)
    with torch.no_grad():
        logits = hf(pixel_values=video.transpose(1, 2)).logits
        ours_logits = hf.classifier(ours(video))
    assert (logits - ours_logits).abs().max().item() <= 1e-4


def test_official_videomae_pth_with_prefixes_and_namespace(tmp_path):
    """An official-style pre-training checkpoint: {'model': {'encoder.*', 'decoder.*', ...}, 'args': Namespace}."""
    src = VideoMAEViT(size="small", depth=2, img_size=64, num_frames=4, use_mean_pooling=False).eval()
    sd = {f"encoder.{k}": v for k, v in src.state_dict().items()}
    sd.update({"decoder.blocks.0.norm1.weight": torch.ones(192), "mask_token": torch.zeros(1, 1, 192),
               "encoder_to_decoder.weight": torch.zeros(192, 384)})  # fmt: skip
    torch.save({"model": sd, "args": argparse.Namespace(lr=1.5e-4), "epoch": 799}, tmp_path / "pretrain.pth")
    dst = VideoMAEViT(size="small", depth=2, img_size=64, num_frames=4, use_mean_pooling=False).eval()
    report = load_pretrained(dst, tmp_path / "pretrain.pth")
    assert report.source_format == "videomae" and report.missing == []
    assert set(report.ignored) == {"decoder.blocks.0.norm1.weight", "mask_token", "encoder_to_decoder.weight"}
    video = torch.randn(1, 3, 4, 64, 64)
    with torch.no_grad():
        assert torch.equal(src.forward_features(video), dst.forward_features(video))
    # A DDP-saved fine-tuned checkpoint: "module." prefix and a head.
    torch.save({"module": {f"module.{k}": v for k, v in src.state_dict().items()} | {"module.head.weight": torch.zeros(3, 384)}},
               tmp_path / "finetuned.pth")  # fmt: skip
    assert load_pretrained(dst, tmp_path / "finetuned.pth").ignored == ["head.weight"]


def test_timm_deit_inflated_single_frame_equals_image_model(tmp_path):
    deit = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    torch.save(deit.state_dict(), tmp_path / "deit_s.pth")
    ours = InflatedViT(size="small", num_frames=1, drop_path_rate=0.0).eval()
    report = load_pretrained(ours, tmp_path / "deit_s.pth")
    assert report.source_format == "timm-vit"
    assert report.missing == ["time_embed"]  # the only video-specific parameter
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = deit.forward_features(images)
        got = ours.forward_features(images[:, :, None])
    assert (got - expected).abs().max().item() <= 1e-5


def test_timm_deit_into_video_model_of_other_size(tmp_path):
    """A 224 DeiT checkpoint into an 8-frame 112x112 model: positions resampled, time embedding left at zero."""
    deit = timm.create_model("deit_small_patch16_224", pretrained=False)
    torch.save({"model": deit.state_dict()}, tmp_path / "deit.pth")
    ours = InflatedViT(size="small", img_size=112, num_frames=8)
    load_pretrained(ours, tmp_path / "deit.pth")
    assert ours.pos_embed.shape == (1, 1 + 7 * 7, 384)
    assert torch.equal(ours.cls_token, deit.cls_token)
    assert ours(torch.randn(1, 3, 8, 112, 112)).shape == (1, 384)


def test_shape_mismatch_is_refused_with_key_and_fix(tmp_path):
    small = VideoMAEViT(size="small", depth=1, img_size=32, num_frames=2)
    torch.save(small.state_dict(), tmp_path / "s.pth")
    base = VideoMAEViT(size="base", depth=1, img_size=32, num_frames=2)
    with pytest.raises(CheckpointError, match=r"s\.pth: '.*' has shape .*model size"):
        load_pretrained(base, tmp_path / "s.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(base, tmp_path / "absent.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_pretrained(base, tmp_path / "junk.pth")


def test_sinusoid_table_matches_transformers():
    expected = get_sinusoid_encoding_table(8 * 14 * 14, 384)[0]
    assert torch.allclose(sinusoid_table(8 * 14 * 14, 384), expected, atol=1e-6)


@pytest.mark.parametrize("qkv_bias", ["qv", "qkv", "none"])
def test_explicit_attention_equals_fused(qkv_bias):
    torch.manual_seed(0)
    attn = Attention(64, 4, qkv_bias).eval()
    if attn.q_bias is not None:
        torch.nn.init.normal_(attn.q_bias)
        torch.nn.init.normal_(attn.v_bias)
    x = torch.randn(2, 10, 64)
    mask = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    mask[0, ..., 7:] = False
    fused, none = attn(x, mask)
    explicit, weights = attn(x, mask, need_weights=True)
    assert none is None and weights.shape == (2, 4, 10, 10)
    assert torch.allclose(fused, explicit, atol=1e-5)
    assert weights[0, ..., 7:].abs().max() == 0  # masked keys get no attention
    assert torch.allclose(weights.sum(-1), torch.ones(2, 4, 10))


def test_block_hook_sees_attention_and_can_prune():
    class KeepFirst:
        needs_attention = True

        def __init__(self):
            self.seen = None

        def __call__(self, x, attn):
            self.seen = attn
            return x[:, :5]

    block = Block(32, 4, qkv_bias="qv").eval()
    hook = KeepFirst()
    out = block(torch.randn(3, 12, 32), hook=hook)
    assert hook.seen.shape == (3, 4, 12, 12) and out.shape == (3, 5, 32)


def test_hooks_only_request_attention_where_asked(monkeypatch):
    model = VideoMAEViT(size=None, embed_dim=64, depth=3, num_heads=4, img_size=32, num_frames=4).eval()
    calls = []
    original = Attention.forward

    def spy(self, x, attn_mask=None, need_weights=False):
        calls.append(need_weights)
        return original(self, x, attn_mask, need_weights)

    monkeypatch.setattr(Attention, "forward", spy)

    class Identity:
        needs_attention = True

        def __call__(self, x, attn):
            return x

    model.forward_features(torch.randn(1, 3, 4, 32, 32), hooks={1: Identity()})
    assert calls == [False, True, False]
