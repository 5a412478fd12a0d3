"""The end-to-end temporal action detector (AdaTAD form): chunked VideoMAE backbone -> ActionFormer head.

``TemporalActionDetector(video (B, 3, T, H, W), valid (B, T))`` returns the head's outputs over
``backbone.head_length`` steps; a step of the head covers ``T / head_length`` input frames. Padded frames
(``valid`` False, the tail of a window past the video's end) are masked out of the head.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from models.actionformer import ActionFormerHead, ActionFormerOutputs
from models.temporal_backbone import ChunkedVideoBackbone


class TemporalActionDetector(nn.Module):
    def __init__(self, backbone: ChunkedVideoBackbone, head: ActionFormerHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def head_mask(self, valid: Tensor, length: int) -> Tensor:
        """(B, T) frame mask -> (B, length) step mask (a step is valid when the frame it starts on is)."""
        if valid.shape[1] == length:
            return valid.bool()
        return F.interpolate(valid[:, None].float(), size=length, mode="nearest")[:, 0] > 0.5

    def forward(self, video: Tensor, valid: Tensor | None = None) -> ActionFormerOutputs:
        features = self.backbone(video)  # (B, D, L)
        length = features.shape[-1]
        mask = features.new_ones(features.shape[0], length, dtype=bool) if valid is None else self.head_mask(valid, length)
        return self.head(features, mask)
