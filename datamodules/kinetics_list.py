"""Kinetics-style video lists, as used by mmaction2, AR-Net (Mini-Kinetics splits) and VideoMAE.

One video per line, space separated: ``<path> [<num_frames>] <label>[,<label>...]``. ``path`` is relative to the
data root (or absolute); the optional frame count is a hint only; several comma-separated labels make a
multi-label sample. Blank lines and lines starting with ``#`` are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from datamodules.base import AnnotationError

LINE_FORMAT = "'<video path> [<num_frames>] <label>[,<label>...]'"


@dataclass(frozen=True)
class VideoRecord:
    path: str
    labels: tuple[int, ...]


def read_video_list(
    list_file: str | Path, root: str | Path, num_classes: int | None = None
) -> list[VideoRecord]:
    """Parse a list file; video paths are resolved against ``root``; labels are checked against ``num_classes``."""
    list_file, root = Path(list_file), Path(root)
    if not list_file.is_file():
        raise AnnotationError(
            f"annotation list {list_file} not found. It lists one video per line as {LINE_FORMAT}, paths relative "
            f"to the data root {root}. Point data.init_args.root / *_list at your copy of the dataset."
        )
    records = []
    for lineno, line in enumerate(list_file.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) not in (2, 3):
            raise AnnotationError(f"{list_file}:{lineno}: expected {LINE_FORMAT}, got {line!r}")
        try:
            labels = tuple(int(x) for x in parts[-1].split(","))
            if len(parts) == 3:
                int(parts[1])
        except ValueError:
            raise AnnotationError(
                f"{list_file}:{lineno}: expected integer frame count and labels, got {line!r}"
            ) from None
        bad = [x for x in labels if x < 0 or (num_classes is not None and x >= num_classes)]
        if bad:
            raise AnnotationError(
                f"{list_file}:{lineno}: label {bad[0]} is outside [0, {num_classes}); check num_classes "
                "(or classes_file) against the list"
            )
        path = Path(parts[0])
        records.append(VideoRecord(str(path if path.is_absolute() else root / path), labels))
    if not records:
        raise AnnotationError(f"{list_file} lists no video")
    return records


def read_class_names(classes_file: str | Path) -> list[str]:
    """One class name per line; the line number is the label index."""
    path = Path(classes_file)
    if not path.is_file():
        raise AnnotationError(
            f"class list {path} not found; give num_classes instead, or the right classes_file"
        )
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise AnnotationError(f"class list {path} is empty")
    return names
