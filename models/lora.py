"""LoRA on the attention projections of any block stack of the shared core, through peft.

The block-drop TAD detector fine-tunes VideoMAE with low-rank updates of every block's ``attn.qkv`` and
``attn.proj`` (rank = embed dim / 4, B zero-initialised, so the adapted model starts equal to the original),
and merges them into the weights before the next compression round. peft does the injection and the merge;
this module names the targets and leaves the rest of the model as it was.

Initialisation (``init``): ``"official"`` draws A from a normal with std 1 / sqrt(rank), as the LoRALayer of the
block-drop code (OpenTAD's ``vit_longlora*.py``: ``randn(in, rank) / sqrt(rank)``, B zeros, scaling 1);
``"peft"`` keeps peft's Kaiming-uniform A (std 1 / sqrt(3 in_features): about 3.5x smaller at rank 96 of a
384-d ViT). Under AdamW the first updates of B move the output in proportion to A, so the official A trains
the adapted layers about 3.5x faster at the same learning rate.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

LoraInit = Literal["official", "peft"]

#: Full-name regex of the adapted layers: the attention projections of ``blocks.N`` at any nesting depth.
#: A bare ``proj`` would also catch ``patch_embed.proj``.
ATTENTION_PROJECTIONS = r"(.*\.)?blocks\.\d+\.attn\.(qkv|proj)"


def _lora_layers(module: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, LoraLayer)]


def add_lora(
    module: nn.Module,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    target: str = ATTENTION_PROJECTIONS,
    init: LoraInit = "official",
) -> nn.Module:
    """Wrap the layers whose full name matches ``target`` in peft LoRA layers, in place; return ``module``.

    ``alpha`` defaults to ``rank``: a scaling ``alpha / rank`` of 1, as the block-drop code's LoRA has.
    B starts at zero, so the output is unchanged until B is trained; A as ``init`` says (see the module doc).
    Unlike peft, which freezes
    everything else, the ``requires_grad`` of the existing parameters is kept (the caller chooses what else
    trains); the new LoRA parameters are trainable.
    """
    if init not in ("official", "peft"):
        raise ValueError(f"LoRA init must be 'official' or 'peft', got {init!r}")
    if _lora_layers(module):
        raise ValueError(
            f"{type(module).__name__} already has LoRA layers; call merge_lora(module) before adding new ones"
        )
    trainable = {name: p.requires_grad for name, p in module.named_parameters()}
    config = LoraConfig(
        r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout, target_modules=target
    )
    inject_adapter_in_model(config, module)  # raises if no layer matches ``target``
    if init == "official":
        with torch.no_grad():
            for _, layer in _lora_layers(module):
                for a in layer.lora_A.values():
                    a.weight.normal_(0.0, rank**-0.5)
    for name, p in module.named_parameters():
        # A wrapped layer's own weights now sit under ``<layer>.base_layer``.
        p.requires_grad = trainable.get(name.replace(".base_layer.", "."), False)
    for p in lora_parameters(module):
        p.requires_grad = True
    return module


def lora_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    """The LoRA tensors (A and B of every adapted layer) of ``module``."""
    for _, layer in _lora_layers(module):
        for attr in layer.adapter_layer_names:
            yield from getattr(layer, attr).parameters()


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold each LoRA update into its base weight (peft's merge), put the plain layer back; return ``module``.

    Afterwards ``module`` holds no LoRA layer and its state dict has the original keys again.
    """
    for name, layer in _lora_layers(module):
        layer.merge()
        parent_name, _, child_name = name.rpartition(".")
        setattr(module.get_submodule(parent_name), child_name, layer.get_base_layer())
    for m in module.modules():  # left by the injection (on whichever module it ran); peft drops it on unload too
        if "peft_config" in vars(m):
            del m.peft_config
    return module
