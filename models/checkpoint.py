"""One path to load pretrained weights into the backbones, from every format researchers have on disk.

Supported sources (all local files; nothing is downloaded):

- official VideoMAE ``.pth`` checkpoints, pre-trained or fine-tuned, with ``encoder.`` / ``backbone.`` /
  ``module.`` prefixes and ``model`` / ``module`` / ``state_dict`` wrappers;
- Hugging Face ``VideoMAEModel`` / ``VideoMAEForVideoClassification`` directories written by ``save_pretrained``
  (``model.safetensors`` or ``pytorch_model.bin``), or one of those files directly;
- timm DeiT / ViT image weights (``.pth``, ``.bin`` or ``.safetensors``), inflated to video.

``load_pretrained`` remaps the keys, lets the model adapt tensors whose shape depends on the input size
(positions, the patch kernel), reports missing and unexpected keys, and refuses a shape mismatch with a message
that names the file, the key and the fix.
"""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

log = logging.getLogger(__name__)

_WRAPPERS = ("model", "module", "state_dict", "model_state", "model_state_dict")
_PREFIXES = ("module.", "backbone.", "encoder.", "videomae.", "model.")
#: Keys a backbone never takes: heads, MAE decoders, training state.
_FOREIGN = re.compile(
    r"^(head\.|classifier\.|decoder\.|decoder_|encoder_to_decoder|mask_token|head_dist\.|dist_token)"
)
#: Keys a checkpoint may carry for a pooling the model does not use.
_OPTIONAL = re.compile(r"^(fc_norm|norm)\.")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into the model as asked."""


@dataclass
class LoadReport:
    path: str
    source_format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"{self.path}: {self.source_format} checkpoint, {len(self.loaded)} tensors loaded, "
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, {len(self.ignored)} ignored"
        ]
        if self.missing:
            lines.append(f"  missing (left at their initial values): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected (not used): {', '.join(self.unexpected)}")
        return "\n".join(lines)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a raw state dict from a file or a ``save_pretrained`` directory, unwrapping training wrappers."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).exists():
                return read_state_dict(path / name)
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
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # Official VideoMAE checkpoints pickle their argparse namespace beside the weights.
            obj = torch.load(path, map_location="cpu", weights_only=False)
            log.warning(
                "%s holds more than tensors; it was loaded with full unpickling (trust only your own files)",
                path,
            )
    except Exception as err:  # noqa: BLE001 - any failure here means the file is not a readable checkpoint
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


def _strip_prefixes(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop wrapper prefixes shared by all of the backbone's keys (e.g. ``encoder.`` of an MAE checkpoint)."""
    while True:
        own = [k for k in sd if not _FOREIGN.match(k)]
        prefix = next((p for p in _PREFIXES if own and all(k.startswith(p) for k in own)), None)
        if prefix is None:
            return sd
        sd = {k.removeprefix(prefix): v for k, v in sd.items()}


_HF_RULES = [
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^layernorm\.", "norm."),
]


def _from_hf_videomae(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face VideoMAE naming -> ours (separate q/k/v Linears are fused into one qkv)."""
    sd = {k.removeprefix("videomae."): v for k, v in sd.items()}
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
    for key, value in sd.items():
        new = key
        for pattern, repl in _HF_RULES:
            new = re.sub(pattern, repl, new)
        out[new] = value
    return out


def to_backbone_keys(raw: dict[str, Tensor]) -> tuple[str, dict[str, Tensor]]:
    """Recognise a checkpoint's layout and rename its keys to ours; returns (format name, state dict)."""
    if any(".attention.attention.query." in k for k in raw):
        return "huggingface-videomae", _from_hf_videomae(raw)
    sd = _strip_prefixes(raw)
    if any(k.endswith("attn.q_bias") for k in sd):
        return "videomae", sd
    if "cls_token" in sd and any(k.startswith("blocks.0.attn.qkv") for k in sd):
        return "timm-vit", sd
    if any(k.startswith("blocks.0.") for k in sd):
        return "vit", sd
    raise CheckpointError(
        "unrecognised checkpoint layout (first keys: " + ", ".join(list(raw)[:5]) + "); expected VideoMAE, "
        "Hugging Face VideoMAE or timm ViT/DeiT weights"
    )


def adapt_to_model(sd: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Reshape tensors whose shape depends on the input size or patch form to the model's."""
    target = model.state_dict()
    out = dict(sd)
    w = out.get("patch_embed.proj.weight")
    want = target.get("patch_embed.proj.weight")
    if w is not None and want is not None and w.shape != want.shape:
        if w.ndim == 4 and want.ndim == 5:
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
            side_src, side_dst = int(round(n_src**0.5)), int(round(n_dst**0.5))
            if side_src**2 == n_src and side_dst**2 == n_dst:
                out["pos_embed"] = resample_abs_pos_embed(src, (side_dst, side_dst), (side_src, side_src), 1)
    return out


def load_pretrained(model: nn.Module, path: str | Path, *, allow_missing: bool = True) -> LoadReport:
    """Load a checkpoint into ``model`` (a backbone), remapping its keys; return what was and was not loaded.

    Keys of heads and MAE decoders are ignored. Missing keys are allowed by default (a DeiT checkpoint has no
    time embedding) and listed in the report; any shape mismatch raises ``CheckpointError``.
    """
    fmt, sd = to_backbone_keys(read_state_dict(path))
    sd = adapt_to_model(sd, model)
    target = model.state_dict()
    report = LoadReport(str(path), fmt)
    usable: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key not in target:
            (report.ignored if _FOREIGN.match(key) or _OPTIONAL.match(key) else report.unexpected).append(key)
            continue
        if value.shape != target[key].shape:
            raise CheckpointError(
                f"{path}: '{key}' has shape {tuple(value.shape)} in the checkpoint but {tuple(target[key].shape)} "
                f"in {type(model).__name__}; choose the model size/tubelet/patch that matches the checkpoint "
                f"({fmt} format)"
            )
        usable[key] = value.to(target[key].dtype)
    report.loaded = sorted(usable)
    report.missing = sorted(k for k in target if k not in usable)
    if report.missing and not allow_missing:
        raise CheckpointError(f"{path}: missing keys {report.missing}")
    if not usable:
        raise CheckpointError(
            f"{path}: no tensor of the {fmt} checkpoint matches {type(model).__name__}; is it the right backbone?"
        )
    model.load_state_dict(usable, strict=False)
    log.info(report.summary())
    return report
