"""AVA v2.2 annotation files: the action CSVs, the label map, the excluded timestamps and detector proposals.

The official files, as PySlowFast lays them out under ``root/annotations``:

- ``ava_{train,val}_v2.2.csv`` (``read_ava_csv``): rows ``video_id, timestamp, x1, y1, x2, y2, action_id[,
  person_id]`` with boxes normalised to [0, 1]. The rows of one (video, timestamp, box) are one person: their
  actions are merged into one multi-hot target (boxes are keyed by their coordinates, as PySlowFast does). An
  ``AVAKeyframe`` is every person of one (video, timestamp).
- ``ava_action_list_v2.2_for_activitynet_2019.pbtxt`` (``read_label_map``): the classes trained and evaluated
  (60 of the 80 ids); class index ``c`` is the ``c``-th smallest id of the label map (``action_ids[c]``). Rows of
  ids in 1..``num_actions`` that the map leaves out are dropped; a box left without a class stays as a person
  with an all-zero target (``keep_unlabelled_boxes``), since the localiser must still find it.
- ``ava_{train,val}_excluded_timestamps_v2.2.csv`` (``read_excluded_timestamps``): keyframes ``video_id,
  timestamp`` left out entirely.
- Person-detector proposals (``read_proposals_csv``): boxes ``video_id, timestamp, x1, y1, x2, y2, [action,]
  score`` per keyframe, the best score of a box listed on several rows, kept from a score threshold on.

Errors: a missing file, a malformed row, a timestamp that is not a whole second, a box outside [0, 1] or
reversed, or an action id neither in the label map nor in 1..``num_actions`` is an ``AnnotationError`` naming the
file and line, what was expected and the fix; nothing malformed is skipped silently, and a label map is parsed
strictly (a misspelt block is an error at its line). Only rows of known AVA classes the label map leaves out are
dropped, with a warning counting them per id; a class of the map with no row in the training CSV is an error
(``empty_classes``). Reading the videos, and the checks of
keyframes against them, are the data module's (``datamodules.ava``).
"""

from __future__ import annotations

import csv
import logging
import math
import re
from collections import Counter, defaultdict
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from datamodules.base import AnnotationError

log = logging.getLogger(__name__)

CSV_COLUMNS = "video_id, timestamp, x1, y1, x2, y2, action_id[, person_id]"
PROPOSAL_COLUMNS = "video_id, timestamp, x1, y1, x2, y2, [action_id,] score"


@dataclass(frozen=True, eq=False)
class AVAKeyframe:
    """One keyframe: its persons (normalised boxes, multi-hot targets) and where it was read."""

    video_id: str
    timestamp: int
    file: str
    line: int  # first row of the keyframe in ``file``
    boxes: np.ndarray  # (n, 4) float32 x1, y1, x2, y2 in [0, 1]
    labels: np.ndarray  # (n, C) float32 multi-hot over the label map's classes
    video_index: int = -1  # position in the stage's video list, set by the data module
    proposals: np.ndarray | None = None  # (m, 4) float32 detector boxes in [0, 1]
    proposal_scores: np.ndarray | None = None  # (m,) float32

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def read_label_map(path: str | Path) -> dict[int, str]:
    """Classes of an AVA label map ``.pbtxt`` (``item { name: "..." id: N }``; ``label_id`` also accepted)."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(
            f"label map {path} not found; pass the .pbtxt of the classes to train and evaluate "
            "(ava_action_list_v2.2_for_activitynet_2019.pbtxt for the standard 60)"
        )
    text = path.read_text(encoding="utf-8", errors="replace")
    # Comments blanked out in place, so offsets (and line numbers) stay those of the file.
    bare = re.sub(r"#[^\n]*", lambda m: " " * len(m.group()), text)
    line_at = lambda offset: text.count("\n", 0, offset) + 1  # noqa: E731
    classes: dict[int, str] = {}
    end = 0
    for block in re.finditer(r"(\w+)\s*\{([^{}]*)\}", bare):
        stray = re.search(r"\S", bare[end : block.start()])
        if stray:
            raise AnnotationError(
                f"{path}:{line_at(end + stray.start())}: unexpected text {bare[end + stray.start():].split()[0]!r}; a "
                'label map holds only item { name: "..." id: N } blocks'
            )
        end, line = block.end(), line_at(block.start())
        if block.group(1) != "item":
            raise AnnotationError(
                f'{path}:{line}: "{block.group(1)} {{" is not a label-map block; write item {{ name: "..." id: N }}'
            )
        name = re.search(r'\bname\s*:\s*"([^"]*)"', block.group(2))
        number = re.search(r"\b(?:label_id|id)\s*:\s*(-?\d+)", block.group(2))
        if name is None or number is None:
            raise AnnotationError(f'{path}:{line}: an item needs name: "..." and id: N')
        action = int(number.group(1))
        if action < 1 or action in classes:
            raise AnnotationError(f"{path}:{line}: class id {action} must be a positive integer listed once")
        classes[action] = name.group(1)
    stray = re.search(r"\S", bare[end:])
    if stray:
        raise AnnotationError(
            f"{path}:{line_at(end + stray.start())}: unexpected text {bare[end + stray.start():].split()[0]!r} "
            "(an unclosed or stray brace?); a label map holds only item { ... } blocks"
        )
    if not classes:
        raise AnnotationError(f'{path}: no class found; expected items like item {{ name: "stand" id: 12 }}')
    return classes


def csv_rows(path: Path) -> Iterator[tuple[str, list[str]]]:
    """(``"<file>:<line>"``, stripped fields) of the non-blank rows of a CSV."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        try:
            for fields in reader:
                fields = [f.strip() for f in fields]
                if any(fields):
                    yield f"{path}:{reader.line_num}", fields
        except (UnicodeDecodeError, csv.Error) as err:
            raise AnnotationError(f"{path}:{reader.line_num + 1}: not a readable CSV ({err})") from None


def parse_int(value: str, where: str, field: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise AnnotationError(f"{where}: {field} must be an integer, got {value!r}") from None


def parse_finite(value: str, where: str, field: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise AnnotationError(f"{where}: {field} must be a finite number, got {value!r}")
    return number


def parse_box(
    fields: Sequence[str], where: str, allow_empty: bool = False
) -> tuple[float, float, float, float]:
    """x1, y1, x2, y2 normalised to [0, 1], not reversed; empty (x2 == x1 or y2 == y1) only if ``allow_empty``
    (detections, which the official evaluator drops after the cap; never a ground-truth box)."""
    x1, y1, x2, y2 = (parse_finite(v, where, name) for v, name in zip(fields, ("x1", "y1", "x2", "y2")))
    box = (x1, y1, x2, y2)
    if not all(0.0 <= v <= 1.0 for v in box):
        raise AnnotationError(
            f"{where}: box {box} lies outside [0, 1]; AVA boxes are normalised by the frame width and height "
            "(divide pixel coordinates by them, clip to [0, 1])"
        )
    if x2 < x1 or y2 < y1 or (not allow_empty and (x2 == x1 or y2 == y1)):
        raise AnnotationError(
            f"{where}: box {box} is empty or reversed; columns are x1, y1, x2, y2 with x1 < x2 and y1 < y2"
        )
    return box


def read_excluded_timestamps(path: str | Path | None) -> frozenset[tuple[str, int]]:
    """Keyframes ``(video_id, timestamp)`` of an excluded-timestamps CSV; empty without a file."""
    if path is None:
        return frozenset()
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"excluded-timestamps file {path} not found; give the right path or null")
    excluded = set()
    for where, fields in csv_rows(path):
        if len(fields) != 2:
            raise AnnotationError(f"{where}: expected 'video_id, timestamp', got {len(fields)} columns")
        excluded.add((fields[0], parse_int(fields[1], where, "timestamp")))
    return frozenset(excluded)


def read_ava_csv(
    path: str | Path,
    action_ids: Sequence[int],
    num_actions: int | None = 80,
    excluded: Collection[tuple[str, int]] = (),
    keep_unlabelled_boxes: bool = True,
    empty_classes: Literal["error", "warn"] = "warn",
) -> list[AVAKeyframe]:
    """Keyframes of an AVA annotation CSV, ordered by video (first appearance) then timestamp.

    Class ``c`` of the targets is ``action_ids[c]``. Rows of an id in 1..``num_actions`` but not in
    ``action_ids`` are dropped, with a warning counting them per id; any other id, a malformed row, a box outside
    [0, 1] or with x2 <= x1 / y2 <= y1 is an ``AnnotationError`` naming the file and line. Excluded keyframes are
    left out. A class of ``action_ids`` without any row (a mistyped id in the label map, most often) is an error
    under ``empty_classes: error`` and a warning under ``warn``.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"annotation file {path} not found; rows are '{CSV_COLUMNS}'")
    column = {a: c for c, a in enumerate(action_ids)}
    # (video, timestamp) -> box -> class indices, in file order, and the first line of each keyframe.
    people: dict[tuple[str, int], dict[tuple[float, ...], set[int]]] = defaultdict(dict)
    first_line: dict[tuple[str, int], int] = {}
    dropped: Counter[int] = Counter()
    seen: set[int] = set()
    excluded_keys = set()
    for where, fields in csv_rows(path):
        line = int(where.rpartition(":")[2])
        if len(fields) not in (7, 8):
            raise AnnotationError(f"{where}: expected '{CSV_COLUMNS}', got {len(fields)} columns")
        key = (fields[0], parse_int(fields[1], where, "timestamp"))
        box = parse_box(fields[2:6], where)
        action = parse_int(fields[6], where, "action_id")
        if action not in column and (num_actions is None or not 1 <= action <= num_actions):
            valid = "the label map" + ("" if num_actions is None else f" nor in 1..num_actions={num_actions}")
            raise AnnotationError(
                f"{where}: action id {action} is not in {valid}; check the label map and num_actions"
            )
        if action in column:
            seen.add(action)
        if key in excluded:
            excluded_keys.add(key)
            continue
        first_line.setdefault(key, line)
        classes = people[key].setdefault(box, set())
        if action in column:
            classes.add(column[action])
        else:
            dropped[action] += 1
    videos = {video: i for i, (video, _) in reversed(list(enumerate(first_line)))}
    keyframes = []
    for key in sorted(first_line, key=lambda k: (videos[k[0]], k[1])):
        persons = [(b, c) for b, c in people[key].items() if c or keep_unlabelled_boxes]
        if not persons:
            continue
        labels = np.zeros((len(persons), len(action_ids)), dtype=np.float32)
        for row, (_, classes) in enumerate(persons):
            labels[row, sorted(classes)] = 1.0
        boxes = np.array([b for b, _ in persons], dtype=np.float32).reshape(-1, 4)
        keyframes.append(AVAKeyframe(key[0], key[1], str(path), first_line[key], boxes, labels))
    log.info("%s: %d keyframes, %d excluded keyframes left out", path, len(keyframes), len(excluded_keys))
    if dropped:
        counts = ", ".join(f"{a}: {n}" for a, n in sorted(dropped.items()))
        log.warning(
            "%s: %d rows of action ids outside the label map dropped (rows per id: %s)",
            path, sum(dropped.values()), counts,
        )  # fmt: skip
    empty = [a for a in action_ids if a not in seen]
    if empty:
        message = (
            f"{path}: class ids {empty} of the label map have no row (a mistyped id in the label map?); "
            "fix the label map, or set data.init_args.empty_classes=warn to train without them"
        )
        if empty_classes == "error":
            raise AnnotationError(message)
        log.warning(message)
    return keyframes


def read_proposals_csv(
    path: str | Path, score_threshold: float = 0.0, excluded: Collection[tuple[str, int]] = ()
) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray, int]]:
    """Person-detector boxes per keyframe: (boxes (m, 4) in [0, 1], scores (m,), first line).

    Rows are ``video_id, timestamp, x1, y1, x2, y2, [action_id,] score``; a box listed on several rows (one per
    action in some files) is kept once with its best score. Boxes scoring below ``score_threshold`` and empty
    boxes are left out; malformed rows are errors naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"proposals file {path} not found; rows are '{PROPOSAL_COLUMNS}'")
    found: dict[tuple[str, int], dict[tuple[float, ...], float]] = defaultdict(dict)
    first_line: dict[tuple[str, int], int] = {}
    for where, fields in csv_rows(path):
        line = int(where.rpartition(":")[2])
        if len(fields) not in (7, 8):
            raise AnnotationError(f"{where}: expected '{PROPOSAL_COLUMNS}', got {len(fields)} columns")
        key = (fields[0], parse_int(fields[1], where, "timestamp"))
        score = parse_finite(fields[-1], where, "score")
        box = parse_box(fields[2:6], where, allow_empty=True)
        if key in excluded or score < score_threshold or box[2] == box[0] or box[3] == box[1]:
            continue
        first_line.setdefault(key, line)
        found[key][box] = max(score, found[key].get(box, -math.inf))
    return {
        key: (
            np.array(list(boxes), dtype=np.float32).reshape(-1, 4),
            np.array(list(boxes.values()), dtype=np.float32),
            first_line[key],
        )
        for key, boxes in found.items()
    }


__all__ = [
    "CSV_COLUMNS",
    "PROPOSAL_COLUMNS",
    "AVAKeyframe",
    "csv_rows",
    "parse_box",
    "parse_finite",
    "parse_int",
    "read_ava_csv",
    "read_excluded_timestamps",
    "read_label_map",
    "read_proposals_csv",
]
