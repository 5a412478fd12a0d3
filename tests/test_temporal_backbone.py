"""The chunked TAD backbone against per-chunk runs of the ViT; adapters, fine-tuning modes, memory knobs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer

from models.blockdrop import drop_blocks
from models.temporal_backbone import ChunkedVideoBackbone, TemporalInformativeAdapter
from models.vit import VideoMAEViT

# 2 chunks of 16 frames a video; 8 tubelets x 2 x 2 patches a chunk
B, FRAMES, SIZE, DIM, HEAD_LENGTH = 2, 32, 32, 32, 24


def tiny_vit(use_mean_pooling: bool = True, img_size: int = 48) -> VideoMAEViT:
    """Positions laid out for 48 px, resized to the 32 px input (AdaTAD runs a 224 px model at 160 px)."""
    torch.manual_seed(0)
    vit = VideoMAEViT(
        embed_dim=DIM, depth=2, num_heads=2, img_size=img_size, num_frames=16,
        use_mean_pooling=use_mean_pooling,
    )  # fmt: skip
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return vit


def make_video(frames: int = FRAMES, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, 3, frames, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def perturb_adapters(backbone: ChunkedVideoBackbone) -> None:
    """Move the adapters away from their identity start, so that their effect and gradients are visible."""
    torch.manual_seed(2)
    with torch.no_grad():
        for adapter in backbone.adapters.values():
            for p in adapter.parameters():
                p.add_(0.2 * torch.randn_like(p))


def per_chunk_reference(vit: VideoMAEViT, video: torch.Tensor, length: int | None) -> torch.Tensor:
    """Each 16-frame chunk through the plain ViT alone, tokens averaged per tubelet, chunks concatenated."""
    out = []
    for clip in video:
        steps = []
        for start in range(0, clip.shape[1], 16):
            tokens = vit.forward_features(clip[None, :, start : start + 16])[0]  # (8*h*w, D), time-major
            steps.append(tokens.view(8, -1, DIM).mean(1))  # (8, D)
        out.append(torch.cat(steps).T)  # (D, T/2)
    features = torch.stack(out)
    if length is None:
        return features
    return F.interpolate(features, size=length, mode="linear", align_corners=False)


@pytest.mark.parametrize("head_length", [HEAD_LENGTH, None])
def test_output_shape(head_length):
    backbone = ChunkedVideoBackbone(tiny_vit(), head_length=head_length)
    assert backbone.embed_dim == DIM
    out = backbone(make_video())
    assert out.shape == (B, DIM, head_length or FRAMES // 2) and out.dtype == torch.float32


@pytest.mark.parametrize("use_mean_pooling", [True, False])
def test_matches_per_chunk_reference(use_mean_pooling):
    """No fc_norm; the token-wise norm only where the ViT has one (not VideoMAE's mean-pooling variant)."""
    vit = tiny_vit(use_mean_pooling).eval()
    video = make_video()
    with torch.no_grad():
        expected = per_chunk_reference(vit, video, HEAD_LENGTH)
        got = ChunkedVideoBackbone(vit, head_length=HEAD_LENGTH, finetune="frozen").eval()(video)
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("finetune", ["adapter", "lora"])
def test_starts_equal_to_the_pretrained_backbone(finetune):
    video = make_video()
    plain = ChunkedVideoBackbone(tiny_vit(), finetune="frozen")
    tuned = ChunkedVideoBackbone(tiny_vit(), finetune=finetune)
    with torch.no_grad():
        assert torch.allclose(tuned(video), plain(video), atol=1e-6, rtol=0)
    if finetune == "adapter":
        assert sorted(tuned.adapters) == [0, 1]
        perturb_adapters(tuned)
        with torch.no_grad():
            assert (tuned(video) - plain(video)).abs().max() > 1e-3


def adapter_reference(
    adapter: TemporalInformativeAdapter, x: torch.Tensor, chunks: int, t: int
) -> torch.Tensor:
    """The TIA of one video, spatial position by spatial position, its time axis through all chunks."""
    hw = x.shape[1] // t
    y = adapter.act(adapter.down_proj(x))  # (chunks, t*hw, C)
    mixed = torch.empty_like(y)
    for s in range(hw):
        rows = [(c, tt * hw + s) for c in range(chunks) for tt in range(t)]
        sequence = torch.stack([y[c, i] for c, i in rows], dim=1)[None]  # (1, C, chunks*t)
        conv = adapter.conv(adapter.dwconv(sequence))[0]
        for k, (c, i) in enumerate(rows):
            mixed[c, i] = conv[:, k]
    return x + adapter.gamma * adapter.up_proj(y + mixed)


def test_adapter_mixes_time_across_chunks():
    torch.manual_seed(3)
    adapter = TemporalInformativeAdapter(DIM, ratio=0.25, kernel_size=3)
    with torch.no_grad():
        adapter.up_proj.weight.normal_(std=0.1)
        x = torch.randn(B * 3, 4 * 2 * 2, DIM)  # 3 chunks of 4 tubelets x 2 x 2 per video
        got = adapter(x, num_chunks=3, grid=(4, 2, 2))
        expected = torch.cat([adapter_reference(adapter, part, chunks=3, t=4) for part in x.split(3)])
    assert (got - expected).abs().max().item() <= 1e-5


def test_adapters_see_the_neighbouring_chunk():
    """Changing the second chunk changes the last features of the first only through the adapters."""
    video = make_video()
    changed = video.clone()
    changed[:, :, 16:] = make_video(seed=7)[:, :, 16:]
    for finetune, moves in (("frozen", False), ("adapter", True)):
        backbone = ChunkedVideoBackbone(tiny_vit(), head_length=None, finetune=finetune)
        if finetune == "adapter":
            perturb_adapters(backbone)
        with torch.no_grad():
            diff = (backbone(video)[..., 7] - backbone(changed)[..., 7]).abs().max()
        assert (diff > 1e-4) == moves


def trainable(backbone: ChunkedVideoBackbone) -> set[str]:
    return {name for name, p in backbone.named_parameters() if p.requires_grad}


def test_requires_grad_per_mode():
    names = {name for name, _ in ChunkedVideoBackbone(tiny_vit(), finetune="frozen").named_parameters()}
    assert trainable(ChunkedVideoBackbone(tiny_vit(), finetune="frozen")) == set()
    assert trainable(ChunkedVideoBackbone(tiny_vit(), finetune="full")) == {
        n for n in names if not n.startswith("vit.fc_norm.")
    }

    lora = ChunkedVideoBackbone(tiny_vit(), finetune="lora")
    assert lora.vit.blocks[0].attn.qkv.lora_A["default"].weight.shape == (DIM // 4, DIM)
    assert {n for n, m in lora.named_modules() if isinstance(m, LoraLayer)} == {
        f"vit.blocks.{i}.attn.{p}" for i in range(2) for p in ("qkv", "proj")
    }
    expected = {n for n, _ in lora.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    expected |= {
        f"vit.blocks.{i}.norm{k}.{w}" for i in range(2) for k in (1, 2) for w in ("weight", "bias")
    }
    expected |= {"vit.patch_embed.proj.weight", "vit.patch_embed.proj.bias"}
    assert trainable(lora) == expected

    adapter = ChunkedVideoBackbone(tiny_vit(), finetune="adapter", adapter_blocks=[1])
    assert list(adapter.adapters) == [1]
    assert trainable(adapter) and all(n.startswith("vit.blocks.1.adapter.") for n in trainable(adapter))
    assert adapter.vit.blocks[1].adapter.down_proj.out_features == DIM // 4


@pytest.mark.parametrize("finetune", ["adapter", "lora", "full"])
def test_activation_checkpointing_same_loss_and_gradients(finetune):
    video = make_video()
    results = []
    for checkpointing in (False, True):
        backbone = ChunkedVideoBackbone(
            tiny_vit(), head_length=HEAD_LENGTH, finetune=finetune, activation_checkpointing=checkpointing,
            chunk_batch=1,
        ).train()  # fmt: skip
        if finetune == "adapter":
            perturb_adapters(backbone)
        calls = []
        backbone.vit.blocks[-1].register_forward_pre_hook(lambda *_: calls.append(1))
        loss = backbone(video).sin().sum()
        loss.backward()
        assert len(calls) == (2 if checkpointing else 1) * B * FRAMES // 16  # recomputed in the backward pass
        grads = {n: p.grad for n, p in backbone.named_parameters() if p.requires_grad}
        assert all(g is not None for g in grads.values())
        results.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-5), name


@pytest.mark.parametrize("chunk_batch", [1, 3])
def test_chunk_batch_gives_the_same_output(chunk_batch):
    video = make_video(frames=64)  # 4 chunks per video, 8 in the batch
    whole = ChunkedVideoBackbone(tiny_vit(), finetune="adapter")
    perturb_adapters(whole)
    micro = copy.deepcopy(whole)
    micro.chunk_batch = chunk_batch
    with torch.no_grad():
        assert torch.allclose(micro(video), whole(video), atol=1e-6, rtol=0)


def test_dropping_a_block_drops_its_adapter():
    backbone = ChunkedVideoBackbone(tiny_vit(), finetune="adapter")
    kept = backbone.vit.blocks[1].adapter
    drop_blocks(backbone.vit, [0])
    assert backbone.adapters == {0: kept}
    assert backbone(make_video()).shape == (B, DIM, 768)


@pytest.mark.parametrize("finetune", ["lora", "adapter"])
def test_pretrained_loads_under_lora_and_adapters(tmp_path, finetune):
    """A plain ViT checkpoint loads into the backbone once LoRA or adapters are attached: every tensor of the
    file lands in its layer (LoRA's wrapped weights under ``base_layer``), the added parameters keep their
    values and are reported as added."""
    source = tiny_vit()
    path = tmp_path / "videomae.pth"
    torch.save({"model": source.state_dict()}, path)
    torch.manual_seed(5)
    backbone = ChunkedVideoBackbone(
        VideoMAEViT(embed_dim=DIM, depth=2, num_heads=2, img_size=48, num_frames=16), finetune=finetune
    )
    added_before = {k: v.clone() for k, v in backbone.vit.state_dict().items() if "lora_" in k or ".adapter." in k}
    report = backbone.load_pretrained(str(path))
    own = backbone.vit.state_dict()
    for key, value in source.state_dict().items():
        wrapped = key.replace("attn.qkv.", "attn.qkv.base_layer.").replace("attn.proj.", "attn.proj.base_layer.")
        assert torch.equal(own[key if key in own else wrapped], value), key
    assert sorted(report.added) == sorted(added_before) and added_before
    assert all(torch.equal(own[k], v) for k, v in added_before.items())
    assert not report.missing and not report.unexpected


def test_window_not_a_multiple_of_the_chunk_is_an_error():
    with pytest.raises(ValueError, match="multiple of chunk_frames"):
        ChunkedVideoBackbone(tiny_vit())(make_video(frames=24))
