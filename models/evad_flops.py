"""Multiply-accumulates of the whole EVAD detector, counted without running it (the paper's "GFLOPs")."""

from __future__ import annotations

from typing import Literal

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental import _config as fx_config

from models.evad import EVAD
from models.flops import count_macs
from models.query_localiser import QueryLocaliser
from models.vit import VideoMAEViT


def evad_gmacs(
    keep_rate: float,
    size: Literal["base", "large"] = "base",
    num_frames: int = 16,
    image_size: tuple[int, int] = (224, 224),
    num_proposals: int = 100,
) -> dict[str, float]:
    """Giga multiply-accumulates of one clip through the whole detector, by part and ``total``.

    The paper's "GFLOPs" (16x224x224: 223.8 / 186.3 / 157.0 / 134.2 / 116.3 at keep rates 1.0 / 0.9 / 0.8 /
    0.7 / 0.6). Nothing is computed: the localiser (pyramid + box stages) runs on the meta device, told to
    take every box on every pyramid level (its level choice is data-dependent; the per-box work counted is the
    same), the backbone and the decoder on fake tensors (the pruning score's autocast guard refuses the meta
    device). RoIAlign is not counted (nor does fvcore count it). ``backbone`` includes the key-importance
    scoring of the pruning blocks, which this implementation computes beside fused attention (a second q.k
    product there: 3.3 GMACs of ViT-B at 224 and keep rate 0.7).
    """
    height, width = image_size
    with torch.device("meta"):
        backbone = VideoMAEViT(size, use_mean_pooling=False)
        model = EVAD(backbone, localiser=QueryLocaliser(num_proposals), keep_rate=keep_rate)
        # frozen: under no_grad a view of a trainable parameter (the proposal features) still asks for
        # gradient, which the counter's module tracker refuses
        model.requires_grad_(False).eval()
        # RoIAlign is not counted: torchvision's operator, which the counter does not see (the factorised
        # form's matrix products would be counted, and its sample counts are data-dependent)
        model.decoder.roi_impl = "torchvision"
        grid = backbone.token_grid((num_frames, height, width))
        maps = [torch.empty(1, backbone.embed_dim, *grid[1:]) for _ in model.tap_layers]
        sizes = torch.tensor([[height, width]])
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        localise = count_macs(model.localise, maps, sizes)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        video = torch.empty(1, 3, num_frames, height, width)
        sizes = torch.tensor([[height, width]])
        encoded = []
        encode = count_macs(lambda: encoded.append(model.encode(video, keyframe_maps=False)))
        tokens = encoded[0][0]
        kept = model.kept_after(len(backbone.blocks) - 1, tokens)
        boxes = torch.zeros(1, num_proposals, 4)
        decode = count_macs(model.classify, tokens, boxes, sizes, grid, kept)
    parts = {"backbone": encode / 1e9, "localiser": localise / 1e9, "decoder": decode / 1e9}
    parts["total"] = sum(parts.values())
    return parts
