"""Kinetics-style lists from a ``<root>/<split>/<class name>/<video>`` folder tree, and Mini-Kinetics in it.

The common Kinetics downloaders leave one folder per split and, in it, one per class (named after the class,
spaces kept or turned into underscores) holding the clips, named ``<YouTube id>_<start:06d>_<end:06d>.mp4``
(or ``<YouTube id>.mp4``). ``build_lists`` turns such a tree into one list per split in the form
``kinetics_list.read_video_list`` reads (``<path relative to root> <label>``) and the class index (one name per
line, the line number is the label).

Classes: by default every class folder of the tree, sorted by name (Kinetics' usual label order). A class list
(``classes``: names, one per line) fixes both the subset and the order: Mini-Kinetics-200 is such a subset of
Kinetics-400. Class names match folder names whatever their case and separators (``air drumming`` is the
folder ``air_drumming``). A video-id list (``video_ids``) keeps only the listed clips, matched by YouTube id
(or the whole file stem): the Mini-Kinetics split files of Xie et al. list YouTube ids, AR-Net's list clip
paths; either works, and ids absent from the tree are counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from datamodules.base import VIDEO_FILE_EXTENSIONS, AnnotationError

#: ``<YouTube id>_<start>_<end>``, the clip names of the Kinetics downloaders.
CLIP_STEM = re.compile(r"(?P<id>[A-Za-z0-9_-]{11})_\d{6}_\d{6}")


def class_key(name: str) -> str:
    """A class name as compared with folder names: lower case, runs of anything but letters and digits as one
    ``_`` (``"Passing American football (in game)"`` and ``passing_american_football_in_game`` agree)."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def video_key(stem: str) -> str:
    """The YouTube id of a Kinetics clip name, or the name itself."""
    match = CLIP_STEM.fullmatch(stem)
    return match["id"] if match else stem


def read_names(path: str | Path, what: str) -> list[str]:
    """Non-blank, non-``#`` lines of a text file, stripped."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{what} {path} not found")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not names:
        raise AnnotationError(f"{what} {path} is empty")
    return names


def read_video_ids(path: str | Path) -> set[str]:
    """Video ids of a list: the first field of each line (space or comma separated), its file stem and its
    YouTube id; a CSV with a ``youtube_id`` column (Kinetics' own annotation files) gives that column."""
    lines = read_names(path, "video-id list")
    fields = [re.split(r"[\s,]+", line) for line in lines]
    column = fields[0].index("youtube_id") if "youtube_id" in fields[0] else None
    if column is not None:
        return {f[column] for f in fields[1:] if len(f) > column}
    return {video_key(Path(f[0]).name.split(".")[0]) for f in fields}


@dataclass
class KineticsLists:
    """Classes (label order), per split the (path relative to root, label) of each video, and what was left."""

    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]
    #: Class folders of the tree outside the class list, per split.
    other_classes: dict[str, list[str]] = field(default_factory=dict)
    #: Listed classes without a folder, per split.
    absent_classes: dict[str, list[str]] = field(default_factory=dict)
    #: Listed video ids found nowhere in the tree.
    absent_videos: list[str] = field(default_factory=list)

    def list_text(self, split: str) -> str:
        return "".join(f"{path} {label}\n" for path, label in self.splits[split])


def split_folders(root: Path) -> list[str]:
    """The folders of ``root`` that hold class folders (train / val / test as distributed)."""
    return sorted(
        p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and any(
            c.is_dir() for c in p.iterdir()
        )
    )  # fmt: skip


def build_lists(
    root: str | Path,
    splits: dict[str, str] | None = None,
    classes: list[str] | None = None,
    video_ids: set[str] | None = None,
) -> KineticsLists:
    """Lists of the ``splits`` (list name -> split folder under ``root``; default every ``split_folders``).

    Raises ``AnnotationError`` for a missing split folder, a class list naming a class twice, a class list with
    no class folder in the tree at all, or a video path with white space (the list format splits on it).
    """
    root = Path(root)
    if not root.is_dir():
        raise AnnotationError(f"{root} is not a folder; give the folder holding <split>/<class>/<video>")
    splits = splits or {name: name for name in split_folders(root)}
    if not splits:
        raise AnnotationError(f"{root} has no <split>/<class>/ folders (e.g. train/abseiling/)")
    folders: dict[str, dict[str, Path]] = {}
    for name, folder in splits.items():
        path = root / folder
        if not path.is_dir():
            raise AnnotationError(f"split folder {path} not found")
        folders[name] = {class_key(p.name): p for p in sorted(path.iterdir()) if p.is_dir()}
    if classes is None:
        names = {p.name for found in folders.values() for p in found.values()}
        classes = sorted({class_key(n): n for n in sorted(names)}.values())
    keys = [class_key(c) for c in classes]
    if len(set(keys)) != len(keys):
        twice = sorted({c for c, k in zip(classes, keys, strict=True) if keys.count(k) > 1})
        raise AnnotationError(f"the class list names a class twice (as spelt here: {twice[:4]})")
    if not any(set(keys) & set(found) for found in folders.values()):
        raise AnnotationError(
            f"none of the {len(classes)} listed classes has a folder under {root}/{{{','.join(splits.values())}}}; "
            "check the class list against the folder names"
        )
    result = KineticsLists(list(classes), {})
    seen: set[str] = set()
    for name, found in folders.items():
        rows = []
        for label, key in enumerate(keys):
            if key not in found:
                result.absent_classes.setdefault(name, []).append(classes[label])
                continue
            for video in sorted(found[key].rglob("*")):
                if video.suffix.lower() not in VIDEO_FILE_EXTENSIONS or not video.is_file():
                    continue
                ids = {video.stem, video_key(video.stem)}
                if video_ids is not None and not ids & video_ids:
                    continue
                seen |= ids
                relative = video.relative_to(root).as_posix()
                if any(ch.isspace() for ch in relative):
                    raise AnnotationError(
                        f"{video}: the list format separates fields by white space, so paths cannot hold any; "
                        "rename the class folders with spaces to underscores (e.g. air drumming -> air_drumming)"
                    )
                rows.append((relative, label))
        result.splits[name] = rows
        result.other_classes[name] = sorted(p.name for k, p in found.items() if k not in set(keys))
    if video_ids is not None:
        result.absent_videos = sorted(video_ids - seen)
    return result
