"""Deterministic synthetic video datasets written as real H.264 mp4 files with public-dataset annotations.

Three kinds, each in the on-disk format of a public benchmark so that the real data-loading code paths are
exercised end to end:

* ``classification`` (Kinetics / AR-Net list files): one textured object per clip; the label is its motion.
* ``spatiotemporal`` (AVA v2.2 CSVs + label map): textured "actors" with per-keyframe boxes and actions.
* ``temporal`` (ActivityNet-1.3 / OpenTAD JSON): untrimmed clips with labelled action segments.

Everything is a pure function of ``seed`` (and the size arguments): each video draws from its own
``np.random.default_rng([seed, kind, ...])`` stream, so annotation files are byte-identical, rendered frames
are identical (the encoded files nearly always too: libx264 was seen to differ about once in a hundred runs),
and changing one video's parameters never
shifts another's.

Run as ``python -m datamodules.synthetic --out DIR [--kind classification|spatiotemporal|temporal|all]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from datamodules.synthetic.classification import (
    CLASSIFICATION_CLASSES,
    ClassificationSet,
    classification_geometry,
    classification_trajectory,
    generate_classification,
)
from datamodules.synthetic.files import DECORD_UNSAFE_WIDTHS, VIDEO_CODECS, is_complete, write_video
from datamodules.synthetic.spatiotemporal import (
    SPATIOTEMPORAL_ACTIONS,
    SpatiotemporalSet,
    generate_spatiotemporal,
)
from datamodules.synthetic.temporal import TEMPORAL_ACTIONS, TemporalSet, generate_temporal

KINDS: tuple[str, ...] = ("classification", "spatiotemporal", "temporal")


_GENERATORS: dict[str, Callable[..., Path]] = {
    "classification": generate_classification,
    "spatiotemporal": generate_spatiotemporal,
    "temporal": generate_temporal,
}
#: The settings of each kind (a data module's ``synthetic`` argument).
SETTINGS: dict[str, type] = {
    "classification": ClassificationSet,
    "spatiotemporal": SpatiotemporalSet,
    "temporal": TemporalSet,
}


def chosen_settings(synthetic: bool | object, kind: str) -> object | None:
    """A data module's ``synthetic`` argument -> the settings of its set: ``True`` the defaults, ``False`` None
    (real data), or the given settings of that kind."""
    cls = SETTINGS[kind]
    if isinstance(synthetic, cls):
        return synthetic
    if isinstance(synthetic, bool):
        return cls() if synthetic else None
    raise TypeError(f"synthetic must be true, false or {cls.__name__} settings, got {synthetic!r}")


def generate(root: str | Path, kind: str = "all", seed: int = 0, **kwargs: Any) -> dict[str, Path]:
    """Dispatch: writes root/classification, root/spatiotemporal, root/temporal as asked.

    Each keyword goes to every selected generator that accepts it; ``<kind>_<name>=...`` (e.g.
    ``temporal_size=64``) targets one kind only, which matters for ``size`` whose type differs per kind.
    """
    kinds = KINDS if kind == "all" else (kind,)
    if any(k not in _GENERATORS for k in kinds):
        raise ValueError(f"kind must be 'all' or one of {KINDS}, got {kind!r}")
    per_kind: dict[str, dict[str, Any]] = {k: {} for k in kinds}
    for key, value in kwargs.items():
        prefix = next((k for k in KINDS if key.startswith(k + "_")), None)
        if prefix is not None and prefix not in kinds:
            continue  # aimed at a kind that was not selected
        targets = [prefix] if prefix is not None else list(kinds)
        name = key[len(prefix) + 1 :] if prefix is not None else key
        accepted = [k for k in targets if name in {f.name for f in fields(SETTINGS[k])}]
        if not accepted:
            raise TypeError(f"no selected generator ({', '.join(kinds)}) accepts {key!r}")
        for k in accepted:
            per_kind[k][name] = value
    root = Path(root)
    return {k: _GENERATORS[k](root / k, seed=seed, **per_kind[k]) for k in kinds}


__all__ = [
    "CLASSIFICATION_CLASSES",
    "DECORD_UNSAFE_WIDTHS",
    "KINDS",
    "SETTINGS",
    "SPATIOTEMPORAL_ACTIONS",
    "TEMPORAL_ACTIONS",
    "VIDEO_CODECS",
    "ClassificationSet",
    "SpatiotemporalSet",
    "TemporalSet",
    "chosen_settings",
    "classification_geometry",
    "classification_trajectory",
    "generate",
    "generate_classification",
    "generate_spatiotemporal",
    "generate_temporal",
    "is_complete",
    "write_video",
]
