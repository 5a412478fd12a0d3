"""Multiply-accumulate counting by running the model under ``torch.utils.flop_counter``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def count_macs(module: nn.Module | Any, *inputs: Any) -> int:
    """Multiply-accumulates (FLOPs / 2, the "GFLOPs" of the video papers) of one call ``module(*inputs)``.

    The math SDPA backend is forced: the counter does not see the fused CPU kernels' attention products.
    """
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops() // 2
