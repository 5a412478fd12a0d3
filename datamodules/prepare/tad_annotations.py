"""The official temporal-detection annotation releases -> the JSON ``TemporalDetectionDataModule`` reads.

THUMOS14. The release has one text file per class and set: ``<Class>_val.txt`` (in
``TH14_Temporal_annotations_validation/annotation/``) and ``<Class>_test.txt`` (in
``TH14_Temporal_Annotations_Test/annotations/annotation/``), each line ``<video id> <start s> <end s>``, plus
``Ambiguous_val.txt`` / ``Ambiguous_test.txt`` (segments of unclear action). ``read_thumos_annotations`` reads
them; ``thumos_database`` makes the OpenTAD layout the data module reads (``{"database": {id: {"subset",
"duration", "fps", "frame", "annotations": [{"label", "segment"}]}}}``), with OpenTAD's subsets: the validation
videos are ``training``, the test videos ``validation``. The release has no durations: they come from the video
files (``VideoFacts``). Ambiguous segments stay, labelled ``Ambiguous``, which the data module ignores by default
(``ignore_labels``) as OpenTAD does; the class list is the 20 other classes sorted by name (the official
detection index order). A video is in the JSON when a file of a real class lists it.

ActivityNet-1.3. The data module reads the official ``activity_net.v1-3.min.json`` as it is (through
``activitynet.load_database``). What it lacks is only what the files know: ``fill_activitynet`` adds each
video's ``fps`` and ``frame`` count (and a ``duration`` where one is missing), reports the videos without a
file and those whose file is more than a tolerance longer or shorter than the JSON's duration (downloads often
differ; the data module checks the same, ``duration_tolerance``), and can drop the videos without a file.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datamodules.base import AnnotationError
from datamodules.prepare.video_check import VideoFacts

#: The release's sets, by file-name suffix -> OpenTAD's subset names.
THUMOS_SUBSETS = {"val": "training", "test": "validation"}
THUMOS_AMBIGUOUS = "Ambiguous"
THUMOS_FILE = re.compile(r"(?P<label>[A-Za-z]+)_(?P<set>val|test)\.txt")


@dataclass
class ThumosAnnotations:
    """Per video: its subset and its segments (label, start, end) in file order."""

    subsets: dict[str, str] = field(default_factory=dict)
    segments: dict[str, list[tuple[str, float, float]]] = field(default_factory=lambda: defaultdict(list))
    classes: set[str] = field(default_factory=set)
    files: int = 0


def read_thumos_annotations(folders: list[str | Path]) -> ThumosAnnotations:
    """Read every ``<Class>_{val,test}.txt`` of ``folders``; errors name the file, the line and the fix."""
    found = ThumosAnnotations()
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise AnnotationError(
                f"THUMOS14 annotation folder {folder} not found; give the folders holding <Class>_val.txt "
                "(TH14_Temporal_annotations_validation/annotation) and <Class>_test.txt"
            )
        files = sorted(p for p in folder.iterdir() if THUMOS_FILE.fullmatch(p.name))
        if not files:
            raise AnnotationError(f"{folder} holds no <Class>_val.txt or <Class>_test.txt annotation file")
        for path in files:
            match = THUMOS_FILE.fullmatch(path.name)
            label, subset = match["label"], THUMOS_SUBSETS[match["set"]]
            found.files += 1
            if label != THUMOS_AMBIGUOUS:
                found.classes.add(label)
            for lineno, line in enumerate(path.read_text().splitlines(), start=1):
                parts = line.split()
                if not parts:
                    continue
                try:
                    if len(parts) != 3:
                        raise ValueError
                    start, end = float(parts[1]), float(parts[2])
                except ValueError:
                    raise AnnotationError(
                        f"{path}:{lineno}: expected '<video id> <start seconds> <end seconds>', got {line!r}"
                    ) from None
                video = parts[0]
                if found.subsets.setdefault(video, subset) != subset:
                    raise AnnotationError(
                        f"{path}:{lineno}: video {video!r} is in both the validation and the test annotations"
                    )
                found.segments[video].append((label, start, end))
    return found


def thumos_database(
    annotations: ThumosAnnotations, facts: dict[str, VideoFacts | None], ambiguous: bool = True
) -> dict[str, dict[str, Any]]:
    """The OpenTAD-layout database (module doc) of every video with a segment of a real class, in id order;
    ``facts`` gives each video's file facts (None: no file, the entry then has no duration)."""
    database = {}
    for video in sorted(annotations.segments):
        rows = annotations.segments[video]
        if all(label == THUMOS_AMBIGUOUS for label, _, _ in rows):
            continue
        kept = sorted(
            (start, end, label) for label, start, end in rows if ambiguous or label != THUMOS_AMBIGUOUS
        )  # fmt: skip
        entry: dict[str, Any] = {"subset": annotations.subsets[video]}
        known = facts.get(video)
        if known is not None:
            entry.update(duration=known.duration, fps=known.fps, frame=known.num_frames)
        entry["annotations"] = [{"label": label, "segment": [start, end]} for start, end, label in kept]
        database[video] = entry
    return database


@dataclass
class FilledDatabase:
    database: dict[str, dict[str, Any]]
    missing: list[str]
    duration_mismatch: list[str]


def fill_activitynet(
    database: dict[str, dict[str, Any]],
    facts: dict[str, VideoFacts | None],
    duration_tolerance: float = 3.0,
    drop_missing: bool = False,
) -> FilledDatabase:
    """``database`` (as ``load_database`` read it) with each video's ``fps`` and ``frame`` from ``facts``, and
    ``duration`` where it has none; the ids without a file (``facts`` None, dropped when ``drop_missing``) and
    those whose file's duration is more than ``duration_tolerance`` seconds from the JSON's."""
    filled, missing, mismatch = {}, [], []
    for video, entry in database.items():
        known = facts.get(video)
        if known is None:
            missing.append(video)
            if not drop_missing:
                filled[video] = entry
            continue
        entry = {**entry, "fps": entry.get("fps", known.fps), "frame": entry.get("frame", known.num_frames)}
        if entry.get("duration") is None:
            entry["duration"] = known.duration
        elif abs(float(entry["duration"]) - known.duration) > duration_tolerance:
            mismatch.append(video)
        filled[video] = entry
    return FilledDatabase(filled, missing, mismatch)
