"""ActivityNet-1.3 annotation JSON as a (multi-label) video classification set.

The file is the one the ActivityNet challenge distributes (``activity_net.v1-3.min.json``)::

    {"version": ..., "database": {"<id>": {"subset": "training", "duration": 120.4,
                                            "annotations": [{"segment": [3.2, 50.1], "label": "Long jump"}]}}}

A video's targets are the distinct labels of its annotated segments (most videos have one, some several).
Classes are the labels of the whole database sorted by name, unless a class list file fixes the order. Video
files are looked up in the video folder as ``<id>.<ext>`` or ``v_<id>.<ext>`` (the official crawler's naming),
any common container extension.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datamodules.base import AnnotationError
from datamodules.kinetics_list import VideoRecord

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv")
SUBSETS = ("training", "validation", "testing")


@dataclass(frozen=True)
class ActivityNetSplit:
    """The records of one subset whose video file exists, and the ids whose file does not."""

    records: list[VideoRecord]
    missing: list[str]


#: The layout ``load_database`` reads (ActivityNet-1.3, and OpenTAD's THUMOS14 JSON).
DATABASE_LAYOUT = '{"database": {video_id: {"subset", "annotations": [{"label", "segment": [start, end]}]}}}'


def load_database(json_file: str | Path) -> dict[str, dict[str, Any]]:
    """Read and check the ``database`` mapping of an ActivityNet-style JSON (ActivityNet-1.3, OpenTAD's THUMOS14):
    every entry has a ``subset`` string and an ``annotations`` list of entries with a string ``label``. The one
    reader of this format: the data modules and the temporal mAP read it here; each checks the segments under
    its own policy. Errors name the file, the video id and the fix."""
    path = Path(json_file)
    if not path.is_file():
        raise AnnotationError(
            f"annotation file {path} not found: download it (ActivityNet-1.3: activity_net.v1-3.min.json from the "
            "ActivityNet challenge site; THUMOS14: OpenTAD's thumos_14_anno.json) and point the recipe at it"
        )
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AnnotationError(f"{path}: not valid JSON ({err}); expected {DATABASE_LAYOUT}") from None
    database = content.get("database") if isinstance(content, dict) else None
    if not isinstance(database, dict):
        raise AnnotationError(f"{path}: expected an object with a 'database' mapping of video id -> entry")
    for video_id, entry in database.items():
        where = f"{path}: video {video_id!r}"
        if not isinstance(entry, dict) or not isinstance(entry.get("subset"), str):
            raise AnnotationError(f"{where}: the entry needs a 'subset' string (one of {SUBSETS})")
        annotations = entry.get("annotations")
        if not isinstance(annotations, list):
            raise AnnotationError(f"{where}: the entry needs an 'annotations' list (empty without action)")
        for ann in annotations:
            if not isinstance(ann, dict) or not isinstance(ann.get("label"), str):
                raise AnnotationError(f"{where}: every annotation needs a string 'label', got {ann!r}")
    return database


def class_names_of(database: dict[str, dict[str, Any]]) -> list[str]:
    """All labels of the database, sorted by name (200 for ActivityNet-1.3)."""
    return sorted({ann["label"] for entry in database.values() for ann in entry.get("annotations", [])})


def index_videos(video_dir: str | Path) -> dict[str, Path]:
    """File stem -> path for every video file directly under ``video_dir``."""
    folder = Path(video_dir)
    if not folder.is_dir():
        raise AnnotationError(
            f"video folder {folder} not found: put the ActivityNet videos there as <id>.mp4 or v_<id>.mp4 "
            "(any common container), or set data.init_args.video_dir"
        )
    return {p.stem: p for p in folder.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS}


def read_activitynet(
    json_file: str | Path,
    video_dir: str | Path,
    subset: str,
    class_names: list[str] | None = None,
) -> ActivityNetSplit:
    """Records of ``subset`` with their label indices into ``class_names`` (default: ``class_names_of``)."""
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
    database = load_database(json_file)
    names = class_names if class_names is not None else class_names_of(database)
    index = {name: i for i, name in enumerate(names)}
    files = index_videos(video_dir)
    records, missing = [], []
    for video_id, entry in database.items():
        if entry["subset"] != subset:
            continue
        labels = sorted({ann["label"] for ann in entry.get("annotations", [])})
        if not labels:
            if subset == "testing":
                raise AnnotationError(
                    f"{json_file}: the 'testing' subset has no labels (they are withheld); evaluate on "
                    "'validation' instead"
                )
            raise AnnotationError(f"{json_file}: video {video_id!r} of subset {subset!r} has no annotation")
        unknown = [label for label in labels if label not in index]
        if unknown:
            raise AnnotationError(
                f"{json_file}: video {video_id!r} has label {unknown[0]!r}, which is not in the class list; "
                "fix classes_file or leave it unset to take the classes from the JSON"
            )
        path = files.get(video_id) or files.get(f"v_{video_id}")
        if path is None:
            missing.append(video_id)
            continue
        records.append(VideoRecord(str(path), tuple(index[label] for label in labels)))
    if not records and not missing:
        raise AnnotationError(f"{json_file}: subset {subset!r} has no video")
    return ActivityNetSplit(records, missing)
