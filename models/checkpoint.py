"""One path to load pretrained weights into the backbones, from every format researchers have on disk.

Supported sources (all local files; nothing is downloaded):

- official VideoMAE ``.pth`` checkpoints, pre-trained or fine-tuned, with ``encoder.`` / ``backbone.`` /
  ``module.`` / ``model.`` prefixes and ``model`` / ``module`` / ``state_dict`` wrappers;
- mmaction2 VideoMAE checkpoints (``backbone.*`` in mmaction2's names beside a ``cls_head.*``);
- Hugging Face ``VideoMAEModel`` / ``VideoMAEForVideoClassification`` directories written by
  ``save_pretrained`` (``model.safetensors`` or ``pytorch_model.bin``), or one of those files directly;
- timm DeiT / ViT image weights (``.pth``, ``.bin`` or ``.safetensors``), inflated to video;
- this project's Lightning checkpoints (``state_dict`` holding ``backbone.*`` beside the task's ``head.*``).

``load_pretrained`` remaps the keys, lets the model adapt tensors whose shape depends on the input size
(positions, the patch kernel) and is strict: it never leaves part of the model at its initial values, nor
drops part of the checkpoint, without being asked to. What it refuses, it refuses with a ``CheckpointError``
that names the file, the keys and the fix. Whole trained models of the official EVAD, HaltingVT and OpenTAD code
load through ``models.official_weights``, as strictly.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from models.layers import sinusoid_table
from models.torch_files import TorchFileError, read_torch_file
from models.vit import VIT_SIZES

log = logging.getLogger(__name__)

_WRAPPERS = ("model", "module", "state_dict", "model_state", "model_state_dict")
#: Wrapper prefixes, stripped from each key on its own, as the official VideoMAE loader does: a checkpoint may
#: hold ``backbone.*`` beside a ``cls_head.*`` that has no prefix to strip.
_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "videomae.")
#: In the Hugging Face layout ``encoder.`` is part of the name (``encoder.layer.N``), not a wrapper.
_HF_PREFIXES = ("module.", "model.", "backbone.", "videomae.")
#: Keys a backbone never takes: heads (classification, detection), MAE decoders, training state.
_FOREIGN = re.compile(
    r"^(head\.|cls_head\.|classifier\.|fc_cls\.|head_dist\.|dist_token|decoder\.|decoder_|encoder_to_decoder"
    r"|mask_token|neck\.|rpn_head\.|roi_heads?\.|bbox_head\.)"
)
#: Keys a checkpoint may carry for a pooling the model does not use.
_OPTIONAL = re.compile(r"^(fc_norm|norm)\.")
#: Layer scale: VideoMAE / mmaction2 ``gamma_1``/``gamma_2`` and timm ``ls1``/``ls2`` (``init_values`` > 0).
_LAYER_SCALE = re.compile(r"^blocks\.\d+\.(gamma_[12]|ls[12]\.gamma)$")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
#: Parameters only a video model has (time embedding, the divided blocks' temporal branch).
_VIDEO_ONLY = re.compile(r"^(time_embed$|blocks\.\d+\.temporal_)")
# Parameters peft adds beside a wrapped layer, whose own weights move to ``<layer>.base_layer``.
_LORA_FACTOR = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into the model as asked."""


@dataclass
class LoadReport:
    """What ``load_pretrained`` did with each key.

    ``missing`` lists every model tensor left at its initial value; ``expected_missing`` is the part of it
    that this kind of checkpoint cannot hold (see ``load_pretrained``). ``unexpected`` are checkpoint tensors
    dropped under ``allow_unexpected``; ``ignored`` are heads, decoders and other keys a backbone never takes;
    ``added`` are the model's fine-tuning parameters (LoRA factors, adapters), which keep their initial values.
    """

    path: str
    source_format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    expected_missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            (
                f"{self.path}: {self.source_format} checkpoint, {len(self.loaded)} tensors loaded, "
                f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, {len(self.ignored)} ignored"
            )
        ]
        other = [k for k in self.missing if k not in self.expected_missing]
        if self.expected_missing:
            lines.append(
                f"  not in this kind of checkpoint (initial values): {', '.join(self.expected_missing)}"
            )
        if other:
            lines.append(f"  missing (initial values, allow_missing=True): {', '.join(other)}")
        if self.unexpected:
            lines.append(f"  unexpected (dropped, allow_unexpected=True): {', '.join(self.unexpected)}")
        if self.ignored:
            lines.append(f"  ignored: {_prefix_counts(self.ignored)}")
        if self.added:
            lines.append(f"  added for fine-tuning (initial values): {_prefix_counts(self.added)}")
        return "\n".join(lines)


def read_state_dict(path: str | Path, *, trust_pickle: bool = False) -> dict[str, Tensor]:
    """Read a raw state dict from a file or a ``save_pretrained`` directory, unwrapping training wrappers.
    Nothing in the file runs (``models.torch_files.read_torch_file``) unless ``trust_pickle``."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).exists():
                return read_state_dict(path / name, trust_pickle=trust_pickle)
        raise CheckpointError(
            f"{path} is a directory without model.safetensors or pytorch_model.bin; "
            "point to the checkpoint file, or to a directory written by save_pretrained"
        )
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {path} does not exist; check the path in your recipe (pretrained: ...)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        # Official VideoMAE checkpoints pickle their argparse namespace beside the weights: stood in for.
        obj, _ = read_torch_file(path, trust_pickle=trust_pickle)
    except TorchFileError as err:
        raise CheckpointError(str(err)) from None
    except Exception as err:  # any failure here means the file is not a readable checkpoint
        raise CheckpointError(
            f"cannot read {path} as a PyTorch checkpoint ({err}); is the file complete?"
        ) from err
    for key in _WRAPPERS:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not contain a state dict of tensors")
    return obj


def _prefix_counts(keys: Iterable[str], limit: int = 8) -> str:
    """``'teacher.' (24), 'pos_embed' (1)``: the first part of each key's name and its count, commonest
    first."""
    counts = Counter(k.split(".", 1)[0] + ("." if "." in k else "") for k in keys)
    shown = ", ".join(f"'{p}' ({n})" for p, n in counts.most_common(limit))
    return shown + (f" and {len(counts) - limit} more" if len(counts) > limit else "")


def _some(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def _strip_prefixes(sd: dict[str, Tensor], prefixes: tuple[str, ...], source: str) -> dict[str, Tensor]:
    """Drop the wrapper prefixes each key starts with (``module.backbone.blocks.0...`` -> ``blocks.0...``)."""
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in sd.items():
        new = key
        while prefix := next((p for p in prefixes if new.startswith(p)), None):
            new = new.removeprefix(prefix)
        if new in out:
            raise CheckpointError(
                f"{source}: '{origin[new]}' and '{key}' both name '{new}' once their prefixes are stripped; "
                "the file holds two copies of the weights (e.g. a model and its EMA): save the one to load "
                "alone"
            )
        out[new], origin[new] = value, key
    return out


def _rename(sd: dict[str, Tensor], rules: list[tuple[str, str]]) -> dict[str, Tensor]:
    out = {}
    for key, value in sd.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


_HF_RULES = [
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^layernorm\.", "norm."),
]

#: mmaction2's VideoMAE ViT: mmcv's PatchEmbed and FFN (Sequential(Sequential(fc1, act, drop), fc2, drop)).
_MMACTION_RULES = [
    (r"^patch_embed\.projection\.", "patch_embed.proj."),
    (r"^blocks\.(\d+)\.mlp\.layers\.0\.0\.", r"blocks.\1.mlp.fc1."),
    (r"^blocks\.(\d+)\.mlp\.layers\.1\.", r"blocks.\1.mlp.fc2."),
]


def _from_hf_videomae(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face VideoMAE naming (wrapper prefixes stripped) -> ours; q/k/v Linears fuse into one qkv."""
    sd = dict(sd)
    out: dict[str, Tensor] = {}
    layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    for i in layers:
        p = f"encoder.layer.{i}.attention.attention."
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat(
            [sd.pop(p + n + ".weight") for n in ("query", "key", "value")]
        )
        if p + "key.bias" in sd:  # qv_bias=False: an ordinary biased Linear
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat(
                [sd.pop(p + n + ".bias") for n in ("query", "key", "value")]
            )
        else:  # VideoMAE's q/v biases, saved as q_bias/v_bias or (in memory, newer releases) query/value.bias
            for ours, names in (("q_bias", ("q_bias", "query.bias")), ("v_bias", ("v_bias", "value.bias"))):
                for name in names:
                    if p + name in sd:
                        out[f"blocks.{i}.attn.{ours}"] = sd.pop(p + name)
    out.update(_rename(sd, _HF_RULES))
    return out


def to_backbone_keys(raw: dict[str, Tensor], source: str = "checkpoint") -> tuple[str, dict[str, Tensor]]:
    """Recognise a checkpoint's layout and rename its keys to ours; returns (format name, state dict).

    ``source`` (the file) only names the checkpoint in error messages.
    """
    if any(".attention.attention.query." in k for k in raw):
        return "huggingface-videomae", _from_hf_videomae(_strip_prefixes(raw, _HF_PREFIXES, source))
    sd = _strip_prefixes(raw, _PREFIXES, source)
    if any(k.startswith("patch_embed.projection.") or ".mlp.layers.0.0." in k for k in sd):
        return "mmaction2-videomae", _rename(sd, _MMACTION_RULES)
    if any(k.endswith("attn.q_bias") for k in sd):
        return "videomae", sd
    if "cls_token" in sd and any(k.startswith("blocks.0.attn.qkv") for k in sd):
        return "timm-vit", sd
    if any(k.startswith("blocks.0.") for k in sd):
        return "vit", sd
    raise CheckpointError(
        f"{source}: unrecognised checkpoint layout; key prefixes seen: {_prefix_counts(raw)} (first keys: "
        f"{_some(list(raw), 5)}). Expected VideoMAE (official or mmaction2), Hugging Face VideoMAE or timm "
        f"ViT/DeiT weights, optionally under the prefixes {', '.join(_PREFIXES)}"
    )


def adapt_to_model(
    sd: dict[str, Tensor], model: nn.Module, target: dict[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """Reshape tensors whose shape depends on the input size or patch form to the model's (``target``: its
    tensors under their pre-training names, default its state dict)."""
    target = model.state_dict() if target is None else target
    out = _kept_blocks(dict(sd), model)
    w = out.get("patch_embed.proj.weight")
    want = target.get("patch_embed.proj.weight")
    if w is not None and want is not None and w.ndim == 4 and want.ndim == 5:
        # Image patch kernel -> tubelet kernel: spread over time so a static clip gives the image response.
        t = want.shape[2]
        out["patch_embed.proj.weight"] = w.unsqueeze(2).repeat(1, 1, t, 1, 1) / t
    for key in target:
        # Divided space-time blocks start their temporal attention as a copy of the spatial one (TimeSformer).
        if ".temporal_attn." in key or ".temporal_norm1." in key:
            spatial = key.replace(".temporal_attn.", ".attn.").replace(".temporal_norm1.", ".norm1.")
            if key not in out and spatial in out:
                out[key] = out[spatial].clone()
    if "pos_embed" in out and "pos_embed" in target and out["pos_embed"].shape != target["pos_embed"].shape:
        src, dst = out["pos_embed"], target["pos_embed"]
        if src.shape[-1] == dst.shape[-1]:
            n_src, n_dst = src.shape[1] - 1, dst.shape[1] - 1
            side_src, side_dst = round(n_src**0.5), round(n_dst**0.5)
            if side_src**2 == n_src and side_dst**2 == n_dst:
                out["pos_embed"] = resample_abs_pos_embed(src, (side_dst, side_dst), (side_src, side_src), 1)
    return out


def _is_sinusoid_table(pos: Tensor) -> bool:
    """Whether a checkpoint's ``pos_embed`` is the fixed sinusoid table (mmaction2 keeps it as a buffer).

    The table is a function of the flat token index only, so a table of any length is the one the model builds
    for its own grid. The tolerance admits a table computed in float32 or stored in half precision; a learned
    table (initialised at std 0.02 and trained) is orders of magnitude further away.
    """
    if not pos.is_floating_point() or pos.ndim not in (2, 3) or (pos.ndim == 3 and pos.shape[0] != 1):
        return False
    table = pos.reshape(-1, pos.shape[-1]).float()
    atol = max(1e-4, 4 * torch.finfo(pos.dtype).eps)
    return torch.allclose(table, sinusoid_table(*table.shape), rtol=0.0, atol=atol)


def _refuse_feature_changes(
    sd: dict[str, Tensor], target: dict[str, Tensor], model: str, source: str
) -> None:
    """Refuse checkpoint tensors that shape the features but have no place in the model: dropping them would
    load another function than the one the checkpoint was trained as, whatever ``allow_unexpected`` says."""
    scale = sorted(k for k in sd if _LAYER_SCALE.match(k) and k not in target)
    if scale:
        raise CheckpointError(
            f"{source}: the checkpoint has layer-scale parameters ({_some(scale, 4)}; trained with "
            "init_values > 0) that multiply every block's attention and MLP outputs, but "
            f"{model} has no layer scale, so loading the rest without them would change the features. Use a "
            "checkpoint trained without layer scale (init_values = 0), or a backbone that has it"
        )
    pos = sd.get("pos_embed")
    if pos is not None and "pos_embed" not in target and not _is_sinusoid_table(pos):
        raise CheckpointError(
            f"{source}: the checkpoint has a learned 'pos_embed' of shape {tuple(pos.shape)} (e.g. VideoMAE "
            f"use_learnable_pos_emb=True), but {model} adds the fixed sinusoid position table and has no "
            "learned positions, so loading the rest without them would change the features. Use a checkpoint "
            "trained with the fixed sinusoid positions (a 'pos_embed' equal to that table is accepted and "
            "ignored)"
        )


def _kept_blocks(sd: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """A checkpoint of the uncompressed stack for a block-drop-compressed one (fewer ``block_ids`` than the
    ``original_depth`` it was built with, which the checkpoint has): its kept blocks renumbered to their
    positions, the dropped ones left out (logged)."""
    ids = list(getattr(model, "block_ids", None) or [])
    original = getattr(model, "original_depth", None)
    if not ids or original is None or len(ids) >= original or _depth(sd) != original:
        return sd
    position = {block: p for p, block in enumerate(ids)}
    out, dropped = {}, set()
    for key, value in sd.items():
        m = _BLOCK.match(key)
        if m is None:
            out[key] = value
        elif int(m.group(1)) in position:
            out[f"blocks.{position[int(m.group(1))]}.{key[m.end() :]}"] = value
        else:
            dropped.add(int(m.group(1)))
    log.info("checkpoint blocks %s left out: the model was built without them (drop_blocks)", sorted(dropped))
    return out


def _depth(keys: Iterable[str]) -> int:
    return 1 + max((int(m.group(1)) for k in keys if (m := _BLOCK.match(k))), default=-1)


def _check_depth(
    sd: dict[str, Tensor], target: dict[str, Tensor], model: str, source: str,
    allow_missing: bool, allow_unexpected: bool,
) -> None:  # fmt: skip
    """A checkpoint of another depth would fill some blocks only: refuse it unless asked for explicitly."""
    have, want = _depth(sd), _depth(target)
    if not have or not want or have == want:
        return
    allowed = allow_missing if have < want else allow_unexpected
    opt_in = (
        f"allow_missing=True to load its {have} blocks into the first {have} and leave the last "
        f"{want - have} at their initial values"
        if have < want
        else f"allow_unexpected=True to load its first {want} blocks and drop the last {have - want}"
    )
    message = f"{source}: the checkpoint has {have} blocks but {model} has {want}"
    if not allowed:
        kernel = sd.get("patch_embed.proj.weight")
        width = kernel.shape[0] if kernel is not None else None
        sizes = "/".join(s for s, (dim, d, _) in VIT_SIZES.items() if d == have and width in (dim, None))
        raise CheckpointError(
            f"{message}; set the model's depth to match the checkpoint (`depth: {have}`"
            f"{f', or `size: {sizes}`' if sizes else ''}), or pass {opt_in} deliberately"
        )
    log.warning("%s; loading anyway (%s)", message, opt_in)


def _expected_missing(key: str, sd: dict[str, Tensor], image_source: bool) -> bool:
    """Whether a model tensor is one this kind of checkpoint cannot hold, so it starts at its initial value.

    - video-only parameters when the checkpoint is an image ViT (the time embedding, the divided blocks'
      temporal branch, whose output projection starts at zero so the block begins as the image block);
    - ``fc_norm``, the mean-pooling norm: a pre-training checkpoint has none and official fine-tuning starts
      it fresh;
    - ``norm``, the token-wise final norm, when the checkpoint was trained with mean pooling (it has
      ``fc_norm``).
    """
    if image_source and _VIDEO_ONLY.match(key):
        return True
    if key.startswith("fc_norm."):
        return True
    return key.startswith("norm.") and any(k.startswith("fc_norm.") for k in sd)


def pretraining_names(model: nn.Module, added: Collection[str] = ()) -> tuple[dict[str, str], list[str]]:
    """The model's tensors by the name a pre-training checkpoint gives them -> their name in ``model``, and the
    tensors no pre-training holds: the LoRA factors peft added (its wrapped layers keep their weights under
    ``<layer>.base_layer``) and the ``added`` names (e.g. adapters)."""
    names, fresh = {}, []
    for key in model.state_dict():
        if key in added or _LORA_FACTOR.search(key):
            fresh.append(key)
        else:
            names[key.replace(".base_layer.", ".")] = key
    return names, fresh


def load_pretrained(
    model: nn.Module,
    path: str | Path,
    *,
    allow_missing: bool = False,
    allow_unexpected: bool = False,
    added: Collection[str] = (),
    trust_pickle: bool = False,
) -> LoadReport:
    """Load a checkpoint into ``model`` (a backbone), remapping its keys; return what was and was not loaded.

    Strict by default, so that a checkpoint never half-loads in silence:

    - heads, MAE decoders and detection heads are ignored (``report.ignored``), wherever their prefix;
    - model tensors that this kind of checkpoint cannot hold start at their initial values and are reported
      (``report.expected_missing``): see ``_expected_missing``;
    - any other missing tensor, any checkpoint tensor the model has no place for, and a different number of
      blocks raise ``CheckpointError``. ``allow_missing`` / ``allow_unexpected`` accept them for a deliberate
      partial load; the load then logs a warning listing them;
    - layer scale and a learned ``pos_embed``, which the model has no place for, always raise: dropping them
      would change the features. A ``pos_embed`` equal to the fixed sinusoid table is the model's own and is
      ignored;
    - a tensor of another shape always raises;
    - parameters added for fine-tuning keep their initial values (``report.added``): the LoRA factors of peft
      layers, whose wrapped weights load under their plain names, and the state-dict names in ``added``.
      So a model loads the same file before and after LoRA or adapters were attached.

    Nothing in the file runs: objects beside the tensors (an ``argparse.Namespace``, a message hub) are stood
    in for and never built; a file that calls a function while it loads is refused. ``trust_pickle`` unpickles
    fully instead, running what the file names: only for files you made or trust.
    """
    source = str(path)
    raw = read_state_dict(path, trust_pickle=trust_pickle)
    fmt, sd = to_backbone_keys(raw, source)
    kernel = sd.get("patch_embed.proj.weight")
    image_source = kernel is not None and kernel.ndim == 4
    names, fresh = pretraining_names(model, added)
    own = model.state_dict()
    target = {key: own[real] for key, real in names.items()}
    sd = adapt_to_model(sd, model, target)
    name = type(model).__name__
    _refuse_feature_changes(sd, target, name, source)
    _check_depth(sd, target, name, source, allow_missing, allow_unexpected)
    report = LoadReport(source, fmt, added=sorted(fresh))
    usable: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key not in target:
            # A pos_embed the model has no place for comes here only as the fixed sinusoid table.
            own = _FOREIGN.match(key) or _OPTIONAL.match(key) or key == "pos_embed"
            (report.ignored if own else report.unexpected).append(key)
            continue
        if value.shape != target[key].shape:
            raise CheckpointError(
                f"{source}: '{key}' has shape {tuple(value.shape)} in the checkpoint but "
                f"{tuple(target[key].shape)} in {name}; choose the model size/tubelet/patch that matches the "
                f"checkpoint ({fmt} format)"
            )
        usable[key] = value.to(target[key].dtype)
    if not usable:
        raise CheckpointError(
            f"{source}: no tensor of the {fmt} checkpoint matches {name}; key prefixes seen: "
            f"{_prefix_counts(raw)}. Is it the right backbone?"
        )
    report.loaded = sorted(usable)
    report.missing = sorted(k for k in target if k not in usable)
    report.expected_missing = [k for k in report.missing if _expected_missing(k, sd, image_source)]
    if report.unexpected:
        message = (
            f"{source}: {len(report.unexpected)} tensors of the checkpoint have no place in {name} (their "
            f"prefixes after stripping {', '.join(_PREFIXES)}: {_prefix_counts(report.unexpected)}; key "
            f"prefixes in the file: {_prefix_counts(raw)})"
        )
        if not allow_unexpected:
            raise CheckpointError(
                f"{message}: {_some(report.unexpected)}. Choose the backbone the checkpoint was trained as, "
                "or pass allow_unexpected=True to drop them deliberately"
            )
        log.warning("%s; dropped (allow_unexpected=True): %s", message, ", ".join(report.unexpected))
    unexplained = [k for k in report.missing if k not in report.expected_missing]
    if unexplained:
        message = f"{source}: {len(unexplained)} tensors of {name} are not in the {fmt} checkpoint"
        if not allow_missing:
            raise CheckpointError(
                f"{message}: {_some(unexplained)}. Choose the model configuration the checkpoint was trained "
                "with, or pass allow_missing=True to leave them at their initial values deliberately"
            )
        log.warning(
            "%s; left at their initial values (allow_missing=True): %s", message, ", ".join(unexplained)
        )
    model.load_state_dict({names[k]: v for k, v in usable.items()}, strict=False)
    log.info(report.summary())
    return report
