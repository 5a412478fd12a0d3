"""Whole trained models of the official code bases, loaded strictly into this project's models.

``models.checkpoint`` loads a pre-trained *backbone*; this module loads a *trained detector or classifier* as its
authors released it, every tensor accounted for. The layouts, read from each official code base's module names and
constructors (keys after a DDP ``module.`` prefix, which is stripped):

``evad`` (MCG-NJU/EVAD, PySlowFast: the ``model_state`` of a ``.pth``; ``projects/evad/models``)
    ``patch_embed.proj``, ``blocks.N.{norm1,attn.{qkv,q_bias,v_bias,proj},norm2,mlp.{fc1,fc2}}`` (``vit_model.py``
    ``KTPBlock``) and the encoder's final ``norm``, which runs inside our ``decoder.norm``; the pyramid as
    ``fpn_lateral{2..5}`` / ``fpn_output{2..5}`` (level 2 = stride 4 = our level 0; ``e2e_detector.py``
    ``_construct_fpn``); ``init_proposal_boxes`` / ``init_proposal_features`` (``nn.Embedding``: ``.weight``);
    ``det_head.s0_headseries.N.*`` the Sparse R-CNN stages (``head_helper.py`` ``RCNNHead``: ``inst_interact`` is
    our ``dynamic_conv``, ``cls_module`` / ``reg_module`` our ``class_tower`` / ``box_tower``, ``bboxes_delta``
    our ``box_deltas``); ``det_head.encoder_to_decoder``, ``det_head.mask_token`` and
    ``det_head.decoder.blocks.N.*`` the context refinement decoder, each block's ``act_module.{0,1}`` +
    ``action_logits`` being our ``heads.N.{0,1,3}``. Dropped: ``criterion.empty_weight`` (the loss's no-object
    class weight, a training setting).
``haltingvt`` (dun-research/HaltingVT, mmaction2: the ``state_dict`` of a ``.pth``; ``models/backbones``)
    ``backbone.model.{cls_token,pos_embed,time_embed,patch_embed.proj,blocks.N.*,norm}`` (``HaltingVTModel``; the
    Glimpser blocks 0-1 add ``temporal_norm1``, ``temporal_attn``, ``temporal_fc``), ``cls_head.fc_cls`` (our
    ``head.1``) and ``cls_head.fc_motion`` (our ``motion_head``). The patch kernel is a 2D convolution
    (D, 3, p, p): ours is a one-frame tubelet (D, 3, 1, p, p).
``opentad-adatad`` (sming256/OpenTAD, ``state_dict`` / ``state_dict_ema`` of a ``.pth``)
    ``backbone.model.backbone.*`` the VideoMAE ViT with adapters (``vit_adapter.py``: mmcv's
    ``patch_embed.projection`` and ``mlp.layers.{0.0,1}`` are our ``patch_embed.proj`` and ``mlp.{fc1,fc2}``;
    ``blocks.N.adapter.*`` our adapters; the sinusoid ``pos_embed`` buffer is dropped), then the ActionFormer
    head as for ``opentad-actionformer``.
``opentad-actionformer`` (the same, feature-based: no backbone)
    ``projection.embed.N.{conv,norm}``, ``projection.{stem,branch}.N.*`` (``bricks/transformer.py``
    ``TransformerBlock``: ``ln1``/``ln2`` are our ``norm1``/``norm2``; the 1x1 ``Conv1d`` q/k/v/proj and
    ``mlp.{0,3}`` are our ``Linear`` layers, kernel dimension squeezed; ``AffineDropPath.scale`` (1, C, 1) is our
    (C, 1)), ``neck.fpn_norms.N`` (our ``neck_norms``), ``rpn_head.{cls,reg}_convs``, ``rpn_head.{cls,reg}_head``,
    ``rpn_head.scale.N.scale`` (one scalar per level: our ``reg_scales`` vector) and ``rpn_head.loss_normalizer``.

``load_official`` reads the file (nothing in it runs), finds the layout from its keys, converts every tensor and
loads strictly: an official key with no place, a model tensor left unfilled or a shape that differs raises a
``CheckpointError`` naming the file, the keys and the fix. OpenTAD files hold the raw weights and, when trained
with ``solver.ema``, their EMA; OpenTAD's test script evaluates the EMA whenever the config trains one, and so
does ``load_official`` by default.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from models.checkpoint import CheckpointError
from models.layers import sinusoid_table
from models.torch_files import TorchFileError, read_torch_file

#: Each layout with the official code it comes from.
LAYOUTS: dict[str, str] = {
    "evad": "EVAD detector (MCG-NJU/EVAD, PySlowFast model_state)",
    "haltingvt": "HaltingVT recognizer (dun-research/HaltingVT, mmaction2 state_dict)",
    "opentad-adatad": "OpenTAD end-to-end detector (sming256/OpenTAD: VideoMAE backbone + ActionFormer head)",
    "opentad-actionformer": "OpenTAD feature-based ActionFormer (sming256/OpenTAD: head only, no backbone)",
}

#: The official file's wrappers around the weights, outermost first.
_WRAPPERS = ("model_state", "state_dict", "model", "module")

Transform = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Rule:
    """An official key pattern (full match) and our name for it, with the tensor conversion it needs."""

    pattern: str
    target: str | Callable[[re.Match[str]], str]
    transform: Transform | None = None

    def apply(self, key: str) -> str | None:
        m = re.fullmatch(self.pattern, key)
        if m is None:
            return None
        return self.target(m) if callable(self.target) else m.expand(self.target)


@dataclass
class Converted:
    """An official state dict in our names: ``tensors`` (our name -> tensor), ``origin`` (our name -> official
    key), ``dropped`` (official key -> why it has no place) and ``unmapped`` (official keys no rule knows)."""

    layout: str
    tensors: dict[str, Tensor] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)


@dataclass
class OfficialLoad:
    """What ``load_official`` did: the file, where in it the weights were (``wrapper``), the layout, the model
    tensors it filled and the official keys it dropped with their reasons."""

    path: str
    wrapper: str
    layout: str
    loaded: list[str]
    dropped: dict[str, str]
    ema: bool

    def summary(self) -> str:
        ema = ", EMA weights" if self.ema else ""
        head = f"{self.path}: {LAYOUTS[self.layout]} ({self.layout}, '{self.wrapper}'{ema})"
        lines = [f"{head}: {len(self.loaded)} tensors loaded, {len(self.dropped)} dropped"]
        lines += [f"  dropped {key}: {why}" for key, why in sorted(self.dropped.items())]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ reading


def read_official(path: str | Path, ema: bool | None = None, trust_pickle: bool = False) -> tuple[dict, str]:
    """The official state dict of ``path`` with its ``module.`` prefixes stripped, and the wrapper it was under.

    ``ema``: OpenTAD files hold ``state_dict`` and, when trained with EMA, ``state_dict_ema``. None takes the EMA
    when there is one (what OpenTAD's test script evaluates), True requires it, False requires the raw weights.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"official checkpoint {path} does not exist; give the path of the downloaded file")
    try:
        obj, _ = read_torch_file(path, trust_pickle=trust_pickle)
    except TorchFileError as err:
        raise CheckpointError(str(err)) from None
    except Exception as err:  # any failure here means the file is not a readable checkpoint
        raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint ({err}); is the download complete?") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dictionary")
    has_ema = isinstance(obj.get("state_dict_ema"), dict)
    if ema and not has_ema:
        raise CheckpointError(
            f"{path} has no 'state_dict_ema' (its top-level keys: {sorted(obj)}): it was trained without EMA; "
            "convert its raw weights with --no-ema"
        )
    if ema is False and not isinstance(obj.get("state_dict"), dict):
        raise CheckpointError(
            f"{path} holds no raw 'state_dict' (top-level keys: {sorted(obj)}; published OpenTAD models keep only "
            "the EMA): convert it without --no-ema"
        )
    wrapper = "state_dict_ema" if has_ema and ema is not False else ""
    if not wrapper:
        wrapper = next((w for w in _WRAPPERS if isinstance(obj.get(w), dict)), "")
    sd = obj[wrapper] if wrapper else obj
    if not sd or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors (top-level keys: {sorted(obj)[:8]})")
    if all(k.startswith("module.") for k in sd):  # saved from a DistributedDataParallel model
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return sd, wrapper or "(top level)"


def detect_layout(keys: Iterable[str], source: str = "checkpoint") -> str:
    """The layout of an official state dict (``module.`` stripped) from its keys; see ``LAYOUTS``."""
    keys = list(keys)
    if any(k.startswith("det_head.s0_headseries.") for k in keys):
        return "evad"
    if any(k.startswith("backbone.model.blocks.") for k in keys) and any(k.startswith("cls_head.") for k in keys):
        return "haltingvt"
    if any(k.startswith("rpn_head.") for k in keys) and any(k.startswith("projection.") for k in keys):
        backbone = any(k.startswith("backbone.model.backbone.") for k in keys)
        return "opentad-adatad" if backbone else "opentad-actionformer"
    heads = sorted({k.split(".", 1)[0] for k in keys})
    raise CheckpointError(
        f"{source}: not a layout of the official EVAD, HaltingVT or OpenTAD code (first names of its keys: "
        f"{', '.join(heads[:12])}); expected det_head.* (EVAD), backbone.model.* + cls_head.* (HaltingVT) or "
        "projection.* + rpn_head.* (OpenTAD). A pre-trained backbone goes to the recipe's `pretrained` instead"
    )


def official_num_classes(layout: str, sd: dict[str, Tensor]) -> int | None:
    """The number of classes the official model was trained for, from its classifier's weight."""
    key = {
        "evad": "det_head.decoder.blocks.0.action_logits.weight",
        "haltingvt": "cls_head.fc_cls.weight",
        "opentad-adatad": "rpn_head.cls_head.weight",
        "opentad-actionformer": "rpn_head.cls_head.weight",
    }[layout]
    return int(sd[key].shape[0]) if key in sd else None


# --------------------------------------------------------------------------------------------- conversion


def _image_kernel_to_tubelet(w: Tensor) -> Tensor:
    return w.unsqueeze(2) if w.ndim == 4 else w  # (D, 3, p, p) -> (D, 3, 1, p, p)


def _squeeze_kernel(w: Tensor) -> Tensor:
    return w.squeeze(-1) if w.ndim == 3 and w.shape[-1] == 1 else w  # 1x1 Conv1d (O, I, 1) -> Linear (O, I)


def _channel_scale(s: Tensor) -> Tensor:
    return s.reshape(-1, 1)  # AffineDropPath (1, C, 1) -> (C, 1)


def _evad_level(kind: str) -> Callable[[re.Match[str]], str]:
    return lambda m: f"pyramid.{kind}.{int(m.group(1)) - 2}.{m.group(2)}"


_STAGE = r"det_head\.s0_headseries\.(\d+)\."
_EVAD_RULES = [
    Rule(r"(patch_embed\.proj\.(?:weight|bias))", r"backbone.\1"),
    Rule(r"(blocks\.\d+\.(?:norm1|norm2)\.(?:weight|bias))", r"backbone.\1"),
    Rule(r"(blocks\.\d+\.attn\.(?:q_bias|v_bias|qkv\.weight|proj\.weight|proj\.bias))", r"backbone.\1"),
    Rule(r"(blocks\.\d+\.mlp\.(?:fc1|fc2)\.(?:weight|bias))", r"backbone.\1"),
    Rule(r"norm\.(weight|bias)", r"decoder.norm.\1"),
    Rule(r"fpn_lateral([2-5])\.(weight|bias)", _evad_level("lateral_convs")),
    Rule(r"fpn_output([2-5])\.(weight|bias)", _evad_level("output_convs")),
    Rule(r"init_proposal_boxes\.weight", "localiser.proposal_boxes"),
    Rule(r"init_proposal_features\.weight", "localiser.proposal_features"),
    Rule(_STAGE + r"self_attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
         r"localiser.stages.\1.self_attn.\2"),
    Rule(_STAGE + r"inst_interact\.((?:dynamic_layer|out_layer|norm[123])\.(?:weight|bias))",
         r"localiser.stages.\1.dynamic_conv.\2"),
    Rule(_STAGE + r"((?:linear[12]|norm[123])\.(?:weight|bias))", r"localiser.stages.\1.\2"),
    Rule(_STAGE + r"cls_module\.(\d+\.(?:weight|bias))", r"localiser.stages.\1.class_tower.\2"),
    Rule(_STAGE + r"reg_module\.(\d+\.(?:weight|bias))", r"localiser.stages.\1.box_tower.\2"),
    Rule(_STAGE + r"class_logits\.(weight|bias)", r"localiser.stages.\1.class_logits.\2"),
    Rule(_STAGE + r"bboxes_delta\.(weight|bias)", r"localiser.stages.\1.box_deltas.\2"),
    Rule(r"det_head\.encoder_to_decoder\.weight", "decoder.encoder_to_decoder.weight"),
    Rule(r"det_head\.mask_token", "decoder.mask_token"),
    Rule(r"det_head\.decoder\.blocks\.(\d+)\.act_module\.([01]\.(?:weight|bias))", r"decoder.heads.\1.\2"),
    Rule(r"det_head\.decoder\.blocks\.(\d+)\.action_logits\.(weight|bias)", r"decoder.heads.\1.3.\2"),
    Rule(r"det_head\.decoder\.blocks\.(\d+\.(?:norm1|norm2|mlp\.fc[12])\.(?:weight|bias))", r"decoder.blocks.\1"),
    Rule(r"det_head\.decoder\.blocks\.(\d+\.attn\.(?:q_bias|v_bias|qkv\.weight|proj\.weight|proj\.bias))",
         r"decoder.blocks.\1"),
]  # fmt: skip
_EVAD_DROPS = {
    "criterion.empty_weight": "the set loss's class weights (person 1, no-object NO_OBJECT_WEIGHT), a training "
    "setting (EVAD's no_object_weight), not a weight of the model",
}

_HALTINGVT_RULES = [
    Rule(r"backbone\.model\.patch_embed\.proj\.weight", "backbone.patch_embed.proj.weight", _image_kernel_to_tubelet),
    Rule(r"backbone\.model\.((?:cls_token|pos_embed|time_embed)|patch_embed\.proj\.bias|norm\.(?:weight|bias))",
         r"backbone.\1"),
    Rule(r"backbone\.model\.(blocks\.\d+\.(?:norm1|norm2|temporal_norm1|temporal_fc|mlp\.fc[12])\.(?:weight|bias))",
         r"backbone.\1"),
    Rule(r"backbone\.model\.(blocks\.\d+\.(?:attn|temporal_attn)\.(?:qkv|proj)\.(?:weight|bias))", r"backbone.\1"),
    Rule(r"cls_head\.fc_cls\.(weight|bias)", r"head.1.\1"),
    Rule(r"cls_head\.fc_motion\.(weight|bias)", r"motion_head.\1"),
]  # fmt: skip
_PREPROCESSOR_DROP = (
    "the input normalisation of the official data preprocessor: the recipe's data module applies its own mean/std"
)

_VIT = r"backbone\.model\.backbone\."
_OPENTAD_BACKBONE_RULES = [
    Rule(_VIT + r"patch_embed\.projection\.(weight|bias)", r"backbone.vit.patch_embed.proj.\1"),
    Rule(_VIT + r"blocks\.(\d+)\.mlp\.layers\.0\.0\.(weight|bias)", r"backbone.vit.blocks.\1.mlp.fc1.\2"),
    Rule(_VIT + r"blocks\.(\d+)\.mlp\.layers\.1\.(weight|bias)", r"backbone.vit.blocks.\1.mlp.fc2.\2"),
    Rule(_VIT + r"(blocks\.\d+\.(?:norm1|norm2)\.(?:weight|bias))", r"backbone.vit.\1"),
    Rule(_VIT + r"(blocks\.\d+\.attn\.(?:q_bias|v_bias|qkv\.weight|qkv\.bias|proj\.weight|proj\.bias))",
         r"backbone.vit.\1"),
    Rule(_VIT + r"(blocks\.\d+\.adapter\.(?:(?:down_proj|up_proj|dwconv|conv)\.(?:weight|bias)|gamma))",
         r"backbone.vit.\1"),
    Rule(_VIT + r"((?:fc_norm|norm)\.(?:weight|bias))", r"backbone.vit.\1"),
]  # fmt: skip
_LAYER = r"projection\.(stem|branch)\.(\d+)\."
_OPENTAD_HEAD_RULES = [
    Rule(r"projection\.embed\.(\d+)\.(conv\.weight|norm\.weight|norm\.bias)", r"head.embed.\1.\2"),
    Rule(_LAYER + r"ln1\.(weight|bias)", r"head.\1.\2.norm1.\3"),
    Rule(_LAYER + r"ln2\.(weight|bias)", r"head.\1.\2.norm2.\3"),
    Rule(_LAYER + r"attn\.(query|key|value)_conv\.conv\.weight", r"head.\1.\2.attn.\3_conv.weight"),
    Rule(_LAYER + r"attn\.(query|key|value)_norm\.(weight|bias)", r"head.\1.\2.attn.\3_norm.\4"),
    Rule(_LAYER + r"attn\.(query|key|value|proj)\.(weight|bias)", r"head.\1.\2.attn.\3.\4", _squeeze_kernel),
    Rule(_LAYER + r"mlp\.0\.(weight|bias)", r"head.\1.\2.mlp.fc1.\3", _squeeze_kernel),
    Rule(_LAYER + r"mlp\.3\.(weight|bias)", r"head.\1.\2.mlp.fc2.\3", _squeeze_kernel),
    Rule(_LAYER + r"(drop_path_attn|drop_path_mlp)\.scale", r"head.\1.\2.\3.scale", _channel_scale),
    Rule(r"neck\.fpn_norms\.(\d+)\.(weight|bias)", r"head.neck_norms.\1.\2"),
    Rule(r"rpn_head\.(cls_convs|reg_convs)\.(\d+)\.(conv\.weight|norm\.weight|norm\.bias)", r"head.\1.\2.\3"),
    Rule(r"rpn_head\.(cls_head|reg_head)\.(weight|bias)", r"head.\1.\2"),
    Rule(r"rpn_head\.loss_normalizer", "head.loss_normalizer"),
]
_REG_SCALE = re.compile(r"rpn_head\.scale\.(\d+)\.scale")


def _is_sinusoid(pos: Tensor) -> bool:
    """Whether a ``pos_embed`` is the fixed sinusoid table over the flat token index (the model builds its own)."""
    if not pos.is_floating_point() or pos.ndim not in (2, 3):
        return False
    table = pos.reshape(-1, pos.shape[-1]).float()
    return torch.allclose(table, sinusoid_table(*table.shape), rtol=0.0, atol=1e-4)


def _apply_rules(sd: dict[str, Tensor], rules: list[Rule], out: Converted) -> list[str]:
    """Convert every key a rule knows into ``out``; return the others."""
    left = []
    for key, value in sd.items():
        for rule in rules:
            name = rule.apply(key)
            if name is not None:
                if name in out.tensors:
                    raise CheckpointError(f"'{out.origin[name]}' and '{key}' both convert to '{name}'")
                out.tensors[name] = rule.transform(value) if rule.transform else value
                out.origin[name] = key
                break
        else:
            left.append(key)
    return left


def _drop_positions(keys: list[str], sd: dict[str, Tensor], out: Converted, source: str) -> list[str]:
    """Drop fixed sinusoid ``pos_embed`` tables (the model builds them); refuse learned ones."""
    left = []
    for key in keys:
        if key.rsplit(".", 1)[-1] != "pos_embed":
            left.append(key)
        elif _is_sinusoid(sd[key]):
            out.dropped[key] = "the fixed sinusoid position table, which the model builds for its own token grid"
        else:
            raise CheckpointError(
                f"{source}: '{key}' {tuple(sd[key].shape)} is a learned position table (USE_LEARNABLE_POS_EMB), "
                "but this model adds the fixed sinusoid table; loading the rest without it would change the "
                "features. Only checkpoints trained with the fixed positions convert"
            )
    return left


def convert(layout: str, sd: dict[str, Tensor], target: Collection[str] = (), source: str = "checkpoint") -> Converted:
    """Convert an official state dict of ``layout`` (``module.`` stripped) to our names.

    ``target`` (the model's tensor names) decides what has no place on purpose: a HaltingVT motion head where the
    task trains none. Layer scale (``gamma_1``/``gamma_2``) and learned positions raise: the model has no place
    for them and the features would change without them.
    """
    out = Converted(layout)
    scale = sorted(k for k in sd if re.search(r"\.gamma_[12]$", k))
    if scale:
        raise CheckpointError(
            f"{source}: layer-scale parameters ({', '.join(scale[:3])}...: trained with INIT_VALUES > 0) scale "
            "every block's outputs, and this model has no layer scale; only checkpoints without it convert"
        )
    if layout == "evad":
        left = _apply_rules(sd, _EVAD_RULES, out)
        for key in [k for k in left if k in _EVAD_DROPS]:
            out.dropped[key] = _EVAD_DROPS[key]
        left = _drop_positions([k for k in left if k not in _EVAD_DROPS], sd, out, source)
    elif layout == "haltingvt":
        left = _apply_rules(sd, _HALTINGVT_RULES, out)
        if not any(k.startswith("motion_head.") for k in target):
            for name in [n for n in out.tensors if n.startswith("motion_head.")]:
                out.tensors.pop(name)
                out.dropped[out.origin.pop(name)] = (
                    "the motion head feeds only the motion loss, never the class scores, and the task was built "
                    "without one (motion_weight 0)"
                )
        preprocessor = [k for k in left if re.fullmatch(r"data_preprocessor\.(mean|std)", k)]
        out.dropped.update(dict.fromkeys(preprocessor, _PREPROCESSOR_DROP))
        left = [k for k in left if k not in preprocessor]
    elif layout in ("opentad-adatad", "opentad-actionformer"):
        rules = _OPENTAD_HEAD_RULES + (_OPENTAD_BACKBONE_RULES if layout == "opentad-adatad" else [])
        left = _apply_rules(sd, rules, out)
        scales = {int(m.group(1)): k for k in left if (m := _REG_SCALE.fullmatch(k))}
        if scales:
            if sorted(scales) != list(range(len(scales))):
                raise CheckpointError(f"{source}: rpn_head.scale levels {sorted(scales)} are not 0..{len(scales) - 1}")
            out.tensors["head.reg_scales"] = torch.stack([sd[scales[i]].reshape(()) for i in range(len(scales))])
            out.origin["head.reg_scales"] = "rpn_head.scale.*.scale"
        left = [k for k in left if k not in scales.values()]
        preprocessor = [k for k in left if re.fullmatch(r"backbone\.model\.data_preprocessor\.(mean|std)", k)]
        out.dropped.update(dict.fromkeys(preprocessor, _PREPROCESSOR_DROP))
        left = _drop_positions([k for k in left if k not in preprocessor], sd, out, source)
    else:
        raise ValueError(f"unknown layout {layout!r}; one of {sorted(LAYOUTS)}")
    out.unmapped = left
    return out


# ------------------------------------------------------------------------------------------------ loading


def _some(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def _fix(layout: str, missing: list[str], extra: list[str]) -> str:
    """The likely fix for a structural mismatch, from what differs."""
    if any(".lora_" in k for k in missing):
        return (
            "the model has LoRA factors, which no official file holds: convert with a recipe whose backbone is "
            "fine-tuned with adapters (AdaTAD: finetune: adapter) or fully (finetune: full)"
        )
    if any(".adapter." in k for k in extra):
        return (
            "the file was trained with AdaTAD's adapters: add the adapter overlay (e.g. --config "
            "recipes/tad_variants/thumos_videomae_s_adapter.yaml, finetune: adapter)"
        )
    if any(".adapter." in k for k in missing):
        return "the file has no adapters (an OpenTAD fullft/frozen config): use a recipe with finetune: full"
    if any(k.startswith("backbone.fc_norm.") for k in missing) and layout == "evad":
        return "EVAD has no clip pooling: build the backbone with use_mean_pooling: false, as the EVAD recipes do"
    return "use the recipe of the official configuration (model size, depth, number of layers and stages)"


def load_official(
    model: nn.Module,
    path: str | Path,
    *,
    ema: bool | None = None,
    trust_pickle: bool = False,
    filled: Collection[str] = (),
) -> OfficialLoad:
    """Load an official trained checkpoint into ``model``, strictly.

    ``model`` is what the layout's names are relative to: an ``EVAD`` (``evad``), a ``TemporalActionDetector``
    (``opentad-*``), or a classifier with ``backbone`` (``HaltingViT``), ``head`` (Dropout, Linear) and optionally
    ``motion_head`` (``haltingvt``: the HaltingVT task itself). ``filled``: prefixes of model tensors filled
    otherwise (the backbone of a feature-based ActionFormer head), which the file need not hold. Every official
    key must convert or be dropped for a stated reason, every other model tensor must be filled, every shape must
    agree; otherwise ``CheckpointError``. ``ema`` as in ``read_official``.
    """
    source = str(path)
    sd, wrapper = read_official(path, ema=ema, trust_pickle=trust_pickle)
    layout = detect_layout(sd, source)
    own = model.state_dict()
    # peft keeps a wrapped layer's weights under ``<layer>.base_layer``: the official names are the plain ones
    names = {k.replace(".base_layer.", "."): k for k in own}
    converted = convert(layout, sd, names, source)
    if converted.unmapped:
        raise CheckpointError(
            f"{source}: {len(converted.unmapped)} keys of the {layout} checkpoint have no place in "
            f"{type(model).__name__}: {_some(converted.unmapped)}. The file was trained with a configuration this "
            f"model does not have: {_fix(layout, [], converted.unmapped)}"
        )
    extra = sorted(k for k in converted.tensors if k not in names)
    missing = sorted(k for k in names if k not in converted.tensors and not k.startswith(tuple(filled)))
    if extra or missing:
        parts = []
        if extra:
            parts.append(f"official tensors without a place in {type(model).__name__}: "
                         f"{_some([f'{converted.origin[k]} (-> {k})' for k in extra])}")  # fmt: skip
        if missing:
            parts.append(f"tensors of {type(model).__name__} the file does not fill: {_some(missing)}")
        raise CheckpointError(
            f"{source}: the {layout} checkpoint does not match the model ({'; '.join(parts)}). "
            f"{_fix(layout, missing, extra)}"
        )
    for name, value in converted.tensors.items():
        want = own[names[name]]
        if value.shape != want.shape:
            raise CheckpointError(
                f"{source}: '{converted.origin[name]}' converts to {name} of shape {tuple(value.shape)}, but the "
                f"model's is {tuple(want.shape)}; set the recipe to the official configuration (embed dim, heads, "
                "number of classes, patch and tubelet size, proposals)"
            )
    state = {names[k]: v.to(own[names[k]].dtype) for k, v in converted.tensors.items()}
    model.load_state_dict(state, strict=False)
    return OfficialLoad(source, wrapper, layout, sorted(converted.tensors), converted.dropped, wrapper == "state_dict_ema")


__all__ = [
    "LAYOUTS",
    "Converted",
    "OfficialLoad",
    "Rule",
    "convert",
    "detect_layout",
    "load_official",
    "official_num_classes",
    "read_official",
]
