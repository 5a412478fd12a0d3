"""EVAD (Chen et al., ICCV 2023), assembled: one VideoMAE ViT feeds an actor localiser and an action
classifier.

- Backbone: ``VideoMAEViT`` with keyframe-centric token pruning (``models.token_pruning``) in its pruning
  blocks.
- Localisation: the keyframe's tokens (the middle temporal slice, never pruned) after the tap blocks, put back
  on their (h, w) grid -> ``SimpleFeaturePyramid`` -> ``QueryLocaliser`` (``models.query_localiser``).
- Classification: the last block's tokens, where pruning left them, with the final-stage boxes (detached) ->
  ``ContextRefinementDecoder`` (``models.context_decoder``), which applies the encoder's final LayerNorm.

``EVAD.forward`` returns an ``EVADOutput``; ``EVAD.loss`` and ``EVAD.predict`` turn it into the training loss
and per-image detections. ``models.evad_flops.evad_gmacs`` counts the multiply-accumulates of the whole
detector without running it (the paper's "GFLOPs").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from einops import rearrange
from torch import Tensor, nn

from models.checkpoint import LoadReport, load_pretrained
from models.context_decoder import ContextRefinementDecoder, extend_boxes
from models.query_localiser import LocaliserOutput, QueryLocaliser, SimpleFeaturePyramid, postprocess
from models.set_criterion import HungarianMatcher, action_losses, action_targets, mean_over_ranks, set_losses
from models.token_pruning import keyframe_pruning_hooks, keyframe_tokens
from models.vit import VideoMAEViT

Grid = tuple[int, int, int]
Score = Literal["person_x_action", "action"]

#: Width, depth and heads of the context refinement decoder that goes with a ViT-B (and smaller) or a ViT-L.
DECODER_SIZES: dict[str, tuple[int, int, int]] = {"base": (384, 6, 6), "large": (512, 12, 8)}


def default_tap_layers(depth: int) -> tuple[int, ...]:
    """The blocks whose keyframe tokens feed the pyramid: the last of each quarter (2/5/8/11 of ViT-B,
    5/11/17/23 of ViT-L)."""
    return tuple(q * depth // 4 - 1 for q in (1, 2, 3, 4))


def _is_large(backbone: VideoMAEViT) -> bool:
    return backbone.embed_dim >= 1024


@dataclass
class EVADOutput:
    """One forward pass of ``EVAD``.

    - ``localiser``: per-stage boxes (B, P, 4) and person / no-object logits (B, P, 2); None with given boxes.
    - ``action_logits``: the decoder's action logits (B, P, C) after each of its layers, the last one the
      prediction.
    - ``boxes``: the boxes that were classified (B, P, 4), x1, y1, x2, y2 pixels, detached: the final box
      stage, or the given boxes padded to the batch's largest count.
    - ``box_mask``: (B, P) True for real boxes, False for padding (only given boxes are ever padded).
    - ``kept``: for each pruning block, the original token positions (B, n) leaving it, ascending.
    - ``grid``: the (t, h, w) token grid; ``image_sizes``: the (B, 2) (height, width) the forward was given.
    """

    localiser: LocaliserOutput | None
    action_logits: list[Tensor]
    boxes: Tensor
    box_mask: Tensor
    kept: dict[int, Tensor]
    grid: Grid
    image_sizes: Tensor


@dataclass
class ActionDetections:
    """Detections of one image: ``boxes`` (K, 4) pixels clipped to the image, ``person_scores`` (K,) (ones
    for given boxes), ``action_scores`` (K, C) as ``EVAD.score`` defines them, ``index`` (K,) their rows."""

    boxes: Tensor
    person_scores: Tensor
    action_scores: Tensor
    index: Tensor


class EVAD(nn.Module):
    """EVAD: keyframe-centric token pruning in a VideoMAE ViT, a query-based actor localiser on the keyframe
    tokens and the context refinement decoder for the actions.

    Parts (each a module a recipe can configure with ``class_path``/``init_args``, or None for the paper's):

    - ``backbone``: None builds ViT-B with drop-path 0.1; ``load_pretrained`` fills it from a checkpoint. The
      encoder's final LayerNorm belongs to the decoder: a backbone with a token-wise ``norm``
      (``use_mean_pooling=False``, as the default is built, so that a pre-training checkpoint's norm loads)
      hands it to ``decoder.norm`` and keeps an identity; ``fc_norm`` (clip pooling) is unused here and frozen.
    - ``localiser``: None builds the paper's (100 proposals, 256-d, 6 stages); ``pyramid``: None builds one
      from the backbone width to the localiser width.
    - ``decoder``: None builds the paper's for the backbone (384-d, 6 layers, 6 heads; ViT-L: 512-d, 12, 8)
      with ``num_classes`` and ``box_extension``; a given decoder must agree with both. The paper's keep
      rate 1.0 model uses ``box_extension`` (0, 0).

    ``keep_rate`` (settable after construction, e.g. for evaluation), ``keyframe_weight``, ``prune_layers``
    (None: 3/6/9 of ViT-B, 6/12/18 of ViT-L) and ``importance_chunk`` configure the pruning; ``tap_layers``
    (None: 2/5/8/11, 5/11/17/23 for ViT-L) the pyramid's inputs. ``person_threshold`` selects boxes at
    inference. Losses: the localiser's set losses (``class_loss_weight``, ``l1_loss_weight``,
    ``giou_loss_weight``, ``no_object_weight``; the matcher uses the same three as costs) on every stage, and
    the action BCE x ``action_loss_weight`` (None: 12, 6 for ViT-L) on every decoder layer.
    ``loss_normalisation``: the loss trained on is the sum of these weighted terms divided by their number
    (``"terms"``: 18 + 6 for ViT-B, 18 + 12 for ViT-L), as the official training loop divides it, or their sum
    (``"sum"``). Under AdamW without gradient clipping (the official recipe) the factor cancels between Adam's
    moments except against its epsilon (1e-8), which then weighs 24x more: elements whose gradients are that
    small take smaller steps, so the two differ measurably (three steps of a tiny model already part by about
    the size of a step) and the official division is the default.

    ``score``: a detection's action score. ``"person_x_action"`` (default) multiplies the sigmoid action score
    by the box's person probability, the usual convention of AVA frame-mAP; ``"action"`` is the sigmoid alone,
    what the official code reports (its person score only selects boxes). ``activation_checkpointing``
    recomputes the backbone blocks, the localiser stages and the decoder layers in the backward pass instead of
    storing their activations (the official code checkpoints the backbone and the decoder; the localiser's
    stages hold about 690 MB more at ViT-B batch 2).
    """

    def __init__(
        self,
        backbone: VideoMAEViT | None = None,
        localiser: QueryLocaliser | None = None,
        decoder: ContextRefinementDecoder | None = None,
        pyramid: SimpleFeaturePyramid | None = None,
        keep_rate: float = 0.7,
        keyframe_weight: float = 1.0,
        prune_layers: list[int] | None = None,
        tap_layers: list[int] | None = None,
        num_classes: int = 80,
        box_extension: tuple[float, float] = (0.4, 0.2),
        person_threshold: float = 0.7,
        action_loss_weight: float | None = None,
        class_loss_weight: float = 2.0,
        l1_loss_weight: float = 5.0,
        giou_loss_weight: float = 2.0,
        no_object_weight: float = 0.1,
        score: Score = "person_x_action",
        activation_checkpointing: bool = False,
        importance_chunk: int | None = None,
        loss_normalisation: Literal["terms", "sum"] = "terms",
    ):
        super().__init__()
        if loss_normalisation not in ("terms", "sum"):
            raise ValueError(f"loss_normalisation must be 'terms' or 'sum', got {loss_normalisation!r}")
        self.loss_normalisation = loss_normalisation
        if score not in ("person_x_action", "action"):
            raise ValueError(f"score must be 'person_x_action' or 'action', got {score!r}")
        backbone = (
            VideoMAEViT("base", drop_path_rate=0.1, use_mean_pooling=False) if backbone is None else backbone
        )
        self.backbone = backbone
        large = _is_large(backbone)
        self.tap_layers = tuple(default_tap_layers(backbone.depth) if tap_layers is None else tap_layers)
        if not all(0 <= i < backbone.depth for i in self.tap_layers):
            raise ValueError(
                f"tap_layers {list(self.tap_layers)} must be blocks of the {backbone.depth} in the backbone"
            )
        self.pruning = keyframe_pruning_hooks(
            backbone, backbone.pretrain_grid, prune_layers, keep_rate, keyframe_weight,
            importance_chunk=importance_chunk,
        )  # fmt: skip

        self.localiser = QueryLocaliser() if localiser is None else localiser
        self.pyramid = self._checked_pyramid(pyramid, backbone)
        self.decoder = self._checked_decoder(decoder, backbone, num_classes, box_extension)
        self._norm_in_decoder = isinstance(backbone.norm, nn.LayerNorm)
        if self._norm_in_decoder:  # the encoder's final norm runs inside the decoder
            self.decoder.norm.load_state_dict(backbone.norm.state_dict())
            backbone.norm = nn.Identity()
        if backbone.fc_norm is not None:
            backbone.fc_norm.requires_grad_(False)
        for part in (self.decoder, self.localiser, backbone):
            part.activation_checkpointing = part.activation_checkpointing or activation_checkpointing

        self.num_classes = num_classes
        self.person_threshold = person_threshold
        self.action_loss_weight = (
            (6.0 if large else 12.0) if action_loss_weight is None else action_loss_weight
        )
        self.class_loss_weight, self.l1_loss_weight = class_loss_weight, l1_loss_weight
        self.giou_loss_weight, self.no_object_weight = giou_loss_weight, no_object_weight
        self.matcher = HungarianMatcher(class_loss_weight, l1_loss_weight, giou_loss_weight)
        self.score = score

    def load_pretrained(self, path: str, **options: Any) -> LoadReport:
        """Load a backbone checkpoint (``models.checkpoint.load_pretrained``, ``options`` passed on); its final
        norm goes to ``decoder.norm``, where this model runs it."""
        if not self._norm_in_decoder:
            return load_pretrained(self.backbone, path, **options)
        self.backbone.norm = self.decoder.norm  # the same module: the checkpoint's norm loads into the decoder
        try:
            return load_pretrained(self.backbone, path, **options)
        finally:
            self.backbone.norm = nn.Identity()

    def _checked_pyramid(
        self, pyramid: SimpleFeaturePyramid | None, backbone: VideoMAEViT
    ) -> SimpleFeaturePyramid:
        """The given pyramid, or the paper's from the backbone width to the localiser's, checked against the taps,
        the localiser's strides and the backbone width."""
        if pyramid is None:
            pyramid = SimpleFeaturePyramid(
                backbone.embed_dim, self.localiser.hidden_dim, input_stride=backbone.patch_embed.patch_size
            )
        levels, strides = len(pyramid.scale_factors), pyramid.strides
        if levels != len(self.tap_layers) or strides != self.localiser.strides:
            raise ValueError(
                f"EVAD: {len(self.tap_layers)} tap_layers feed a pyramid of {levels} levels at strides "
                f"{strides}, the localiser expects strides {self.localiser.strides}; tap one block per "
                "pyramid level and give pyramid and localiser the same strides"
            )
        in_channels = pyramid.lateral_convs[0].in_channels
        if in_channels != backbone.embed_dim:
            raise ValueError(
                f"EVAD: the pyramid takes {in_channels} channels but the backbone is {backbone.embed_dim} "
                "wide; set the pyramid's in_channels to the backbone's embed_dim"
            )
        return pyramid

    @staticmethod
    def _checked_decoder(
        decoder: ContextRefinementDecoder | None,
        backbone: VideoMAEViT,
        num_classes: int,
        box_extension: tuple[float, float],
    ) -> ContextRefinementDecoder:
        """The given decoder, or the paper's for the backbone's size, checked against EVAD's classes, box
        extension and backbone width."""
        if decoder is None:
            width, depth, heads = DECODER_SIZES["large" if _is_large(backbone) else "base"]
            decoder = ContextRefinementDecoder(
                num_classes, backbone.embed_dim, width, depth, heads, box_extension=box_extension,
                patch_size=backbone.patch_embed.patch_size, pretrain_grid=backbone.pretrain_grid,
            )  # fmt: skip
        elif decoder.num_classes != num_classes or decoder.box_extension != tuple(map(float, box_extension)):
            raise ValueError(
                f"EVAD: the given decoder has num_classes {decoder.num_classes} and box_extension "
                f"{decoder.box_extension}, EVAD was given {num_classes} and {tuple(box_extension)}; set the "
                "same values in both places (or leave decoder unset to have it built from EVAD's)"
            )
        encoder_dim = decoder.norm.normalized_shape[0]
        if encoder_dim != backbone.embed_dim:
            raise ValueError(
                f"EVAD: the decoder's encoder_dim {encoder_dim} differs from the backbone width "
                f"{backbone.embed_dim}; set encoder_dim to the backbone's embed_dim"
            )
        return decoder

    @property
    def keep_rate(self) -> float:
        """The keep rate of every pruning block; set it to evaluate another rate without retraining."""
        return self.pruning.keep_rate

    @keep_rate.setter
    def keep_rate(self, value: float) -> None:
        self.pruning.keep_rate = value

    @property
    def keyframe_weight(self) -> float:
        return self.pruning.keyframe_weight

    @keyframe_weight.setter
    def keyframe_weight(self, value: float) -> None:
        self.pruning.keyframe_weight = value

    def kept_after(self, block: int, x: Tensor) -> Tensor:
        """Original positions (B, n) of the tokens ``x`` leaving ``block``."""
        if any(i <= block for i in self.pruning):
            return self.pruning.kept_after(block)
        return torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)

    def encode(
        self, video: Tensor, keyframe_maps: bool = True
    ) -> tuple[Tensor, list[Tensor], dict[int, Tensor], Grid]:
        """Run the backbone with pruning: the last block's tokens (B, n, D) (no final norm), the keyframe
        maps (B, D, h, w) of the tap blocks (if ``keyframe_maps``), the kept positions per pruning block and
        the token grid."""
        grid = self.backbone.token_grid(video.shape)
        _, h, w = grid
        self.pruning.set_grid(grid)
        x = self.backbone.embed(video)  # (B, t*h*w, D)

        def keyframe_map(
            i: int, tokens: Tensor
        ) -> Tensor:  # the keyframe's tokens leaving block i, on their grid
            keyframe = keyframe_tokens(tokens, self.kept_after(i, tokens), grid)  # (B, h*w, D)
            return rearrange(keyframe, "b (h w) d -> b d h w", h=h, w=w)

        taps = {i: partial(keyframe_map, i) for i in self.tap_layers} if keyframe_maps else {}
        x, maps = self.backbone.forward_blocks(x, hooks=self.pruning, taps=taps)
        kept = {i: self.pruning[i].kept for i in self.pruning}
        return x, [maps[i] for i in taps], kept, grid

    def localise(self, maps: Sequence[Tensor], image_sizes: Tensor) -> LocaliserOutput:
        """Keyframe maps of the tap blocks -> pyramid -> the localiser's per-stage boxes and logits.

        In training every pyramid level takes part in the first stage's logits with weight zero: a level no box
        is pooled from in a step (small frames leave the coarsest one empty) would otherwise leave its
        convolution without a gradient, which DDP refuses unless it searches for unused parameters every step.
        Values and every other gradient are unchanged (zero is added)."""
        levels = self.pyramid(maps)
        out = self.localiser(levels, image_sizes)
        if self.training and torch.is_grad_enabled():
            out.logits[0] = out.logits[0] + sum(level.sum() for level in levels) * 0.0
        return out

    def classify(
        self, tokens: Tensor, boxes: Tensor, image_sizes: Tensor, grid: Grid, kept: Tensor
    ) -> list[Tensor]:
        """The decoder's per-layer action logits (B, P, C) for boxes (B, P, 4) in pixels."""
        return self.decoder(tokens, boxes, image_sizes, grid, kept)

    def _classify_given(
        self, tokens: Tensor, given: Sequence[Tensor], image_sizes: Tensor, grid: Grid, kept: Tensor
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        # Padded actors would take part in the decoder's attention (it has no mask), so images are decoded in
        # groups of equal box count and padding never enters it: its rows stay zero and box_mask marks them.
        b = tokens.shape[0]
        if len(given) != b:
            raise ValueError(f"given_boxes holds boxes for {len(given)} images, the batch has {b}")
        counts = [len(g) for g in given]
        width = max(counts, default=0)
        boxes = torch.zeros(b, width, 4, device=tokens.device)
        mask = torch.zeros(b, width, dtype=torch.bool, device=tokens.device)
        for i, g in enumerate(given):
            if g.dim() != 2 or g.shape[-1] != 4:
                raise ValueError(
                    f"given_boxes[{i}] must be (n, 4) x1, y1, x2, y2 pixels, got {tuple(g.shape)}"
                )
            boxes[i, : len(g)] = g.to(boxes)
            mask[i, : len(g)] = True
        logits = [tokens.new_zeros(b, width, self.num_classes) for _ in self.decoder.blocks]
        for n in sorted(set(counts) - {0}):
            rows = torch.tensor([i for i, c in enumerate(counts) if c == n], device=tokens.device)
            group = self.classify(tokens[rows], boxes[rows, :n], image_sizes[rows], grid, kept[rows])
            for full, part in zip(logits, group):
                full[rows, :n] = part.to(full.dtype)
        return logits, boxes, mask

    def forward(
        self, video: Tensor, image_sizes: Tensor, given_boxes: Sequence[Tensor] | None = None
    ) -> EVADOutput:
        """``video`` (B, 3, T, H, W) normalised and padded; ``image_sizes`` (B, 2) (height, width) of each
        image before padding, in pixels. ``given_boxes`` (a list of (n_i, 4) pixel boxes, e.g. an
        off-the-shelf person detector's) skips the localiser and classifies exactly those boxes."""
        tokens, maps, kept, grid = self.encode(video, keyframe_maps=given_boxes is None)
        last = self.kept_after(len(self.backbone.blocks) - 1, tokens)
        if given_boxes is None:
            localiser = self.localise(maps, image_sizes)
            boxes = localiser.boxes[-1].detach()
            mask = torch.ones(boxes.shape[:2], dtype=torch.bool, device=boxes.device)
            logits = self.classify(tokens, boxes, image_sizes, grid, last)
        else:
            localiser = None
            logits, boxes, mask = self._classify_given(tokens, given_boxes, image_sizes, grid, last)
        return EVADOutput(localiser, logits, boxes, mask, kept, grid, image_sizes)

    def loss(self, outputs: EVADOutput, targets: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """Weighted loss terms and ``loss``: their sum, divided by their number under ``loss_normalisation:
        terms``. ``targets`` per image: ``boxes`` (G, 4) pixels,
        ``labels`` (G, C) multi-hot. Set losses on every box stage (``stage{s}_class/l1/giou``), the action
        BCE on the proposals matched by the last stage, for every decoder layer (``action{l}``)."""
        if outputs.localiser is None:
            raise ValueError(
                "EVAD.loss needs the localiser's outputs: given_boxes is an inference-only path; train "
                "without it"
            )
        losses, matches = set_losses(
            outputs.localiser, [t["boxes"] for t in targets], outputs.image_sizes, self.matcher,
            self.class_loss_weight, self.l1_loss_weight, self.giou_loss_weight, self.no_object_weight,
            deep_supervision=True, reduce_num_boxes=mean_over_ranks,
        )  # fmt: skip
        action, matched = action_targets(matches, [t["labels"] for t in targets], outputs.boxes.shape[1])
        losses.update(action_losses(outputs.action_logits, action, matched, self.action_loss_weight))
        total = sum(losses.values())
        losses["loss"] = total / len(losses) if self.loss_normalisation == "terms" else total
        return losses

    @torch.no_grad()
    def person_proposals(self, outputs: EVADOutput) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: every proposal of the last box stage (pixels, clipped to the image) and its person
        probability, before any threshold: what the official person meter scores."""
        if outputs.localiser is None:
            raise ValueError("person_proposals needs the localiser's outputs (not given boxes)")
        kept = postprocess(
            outputs.localiser.logits[-1].float(),
            outputs.localiser.boxes[-1].float(),
            outputs.image_sizes,
            0.0,
        )
        return [d.boxes for d in kept], [d.scores for d in kept]

    @torch.no_grad()
    def predict(self, outputs: EVADOutput, image_sizes: Tensor | None = None) -> list[ActionDetections]:
        """Per image: the boxes with person probability >= ``person_threshold`` (all if none passes; every
        given box with given boxes), clipped to the image, with their action scores (see ``score``)."""
        sizes = outputs.image_sizes if image_sizes is None else image_sizes
        actions = outputs.action_logits[-1].float().sigmoid()
        detections = []
        if outputs.localiser is not None:
            kept = postprocess(
                outputs.localiser.logits[-1].float(),
                outputs.localiser.boxes[-1].float(),
                sizes,
                self.person_threshold,
            )
            chosen = [(d.boxes, d.scores, d.index) for d in kept]
        else:
            chosen = []
            for i, mask in enumerate(outputs.box_mask):
                index = torch.nonzero(mask).squeeze(1)
                boxes = extend_boxes(outputs.boxes[i, index][None].float(), sizes[i], (0.0, 0.0))[0]
                chosen.append((boxes, torch.ones(len(index), device=boxes.device), index))
        for i, (boxes, person, index) in enumerate(chosen):
            scores = actions[i, index]
            if self.score == "person_x_action":
                scores = scores * person[:, None]
            detections.append(ActionDetections(boxes, person, scores, index))
        return detections
