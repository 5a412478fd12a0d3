"""The videos a list names, in any of the project's formats, and that list written back without the bad ones.

Formats (``LIST_FORMATS``; ``detect_format`` picks one from the path):

- ``folder``: every file (or folder, which is then reported as not a video) with a video ending
  (``base.VIDEO_FILE_EXTENSIONS``) under a folder, searched recursively. Written back as a ``paths`` list
  relative to the folder.
- ``paths``: a plain text list, one video path per line (relative to ``root``, by default the list's folder;
  blank lines and ``#`` comments kept).
- ``kinetics``: a Kinetics-style list (``<path> [<num_frames>] <label>[,<label>...]``, read by
  ``kinetics_list.read_video_list``); a text list every line of which has that form.
- ``json``: an ActivityNet-1.3 / OpenTAD JSON (read by ``activitynet.load_database``), its videos found in
  ``video_dir`` as ``<id>.<ext>`` or ``v_<id>.<ext>``; an entry without a file is a missing video.
- ``ava_csv``: an AVA CSV (annotations, excluded timestamps or proposals: ``video_id`` first on every row), its
  videos ``<id>.<ext>`` in ``video_dir``.

Written back (``VideoList.write_clean``), a list keeps everything of the original but the lines, rows or entries
of the bad videos, byte for byte where the format is text.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from datamodules.activitynet import index_videos, load_database
from datamodules.ava import VIDEO_EXTENSIONS as AVA_VIDEO_EXTENSIONS
from datamodules.base import VIDEO_FILE_EXTENSIONS, AnnotationError
from datamodules.kinetics_list import read_video_list

LIST_FORMATS = ("folder", "paths", "kinetics", "json", "ava_csv")


@dataclass
class VideoList:
    """The videos of one list: ``videos`` (paths, each once, in list order) and, per entry of the list (a line,
    a row, a JSON entry), the video it names, so the list can be written back without some videos."""

    format: str
    source: Path
    #: Entry of the list -> the video path it names (entries are line numbers or video ids).
    entries: dict[int | str, str] = field(default_factory=dict)
    #: Paths relative to which a ``folder`` list is written back.
    root: Path | None = None

    @property
    def videos(self) -> list[str]:
        return list(dict.fromkeys(self.entries.values()))

    def write_clean(self, output: str | Path, bad: Collection[str]) -> int:
        """Write the list without the entries naming a video in ``bad``; returns the entries kept."""
        bad = set(bad)
        keep = {key for key, video in self.entries.items() if video not in bad}
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        if self.format == "folder":
            kept = [Path(v).relative_to(self.root).as_posix() for k, v in self.entries.items() if k in keep]
            text = "".join(f"{p}\n" for p in kept)
        elif self.format in ("paths", "kinetics", "ava_csv"):
            lines = self.source.read_text().splitlines(keepends=True)
            text = "".join(line for n, line in enumerate(lines, start=1) if n not in self.entries or n in keep)
        else:
            content = json.loads(self.source.read_text())
            content["database"] = {k: v for k, v in content["database"].items() if k in keep}
            text = json.dumps(content, indent=1) + "\n"
        tmp = output.with_name(output.name + ".part")
        tmp.write_text(text)
        tmp.replace(output)
        return len(keep)


def detect_format(source: str | Path) -> str:
    """``folder`` for a folder, ``json`` / ``ava_csv`` by ending, ``kinetics`` for a text list every line of
    which has the Kinetics form, else ``paths``."""
    source = Path(source)
    if source.is_dir():
        return "folder"
    if not source.is_file():
        raise AnnotationError(f"{source} not found: give a folder of videos or a list / annotation file")
    suffix = source.suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix == ".csv":
        return "ava_csv"
    try:
        read_video_list(source, source.parent)
    except AnnotationError:
        return "paths"
    return "kinetics"


def read_video_list_any(
    source: str | Path,
    format: str = "auto",
    root: str | Path | None = None,
    video_dir: str | Path | None = None,
) -> VideoList:
    """The videos ``source`` names (see the module doc); ``root`` resolves relative paths of text lists (default:
    the list's folder), ``video_dir`` holds the videos of a ``json`` or ``ava_csv`` list."""
    source = Path(source)
    format = detect_format(source) if format == "auto" else format
    if format not in LIST_FORMATS:
        raise ValueError(f"format must be 'auto' or one of {LIST_FORMATS}, got {format!r}")
    if format == "folder":
        found = sorted(p for p in source.rglob("*") if p.suffix.lower() in VIDEO_FILE_EXTENSIONS)
        if not found:
            raise AnnotationError(f"{source} holds no video ({', '.join(VIDEO_FILE_EXTENSIONS)})")
        return VideoList(format, source, {i: str(p) for i, p in enumerate(found)}, root=source)
    if not source.is_file():
        raise AnnotationError(f"list {source} not found")
    if format in ("paths", "kinetics"):
        base = Path(root) if root is not None else source.parent
        numbered = _content_lines(source)
        if format == "kinetics":
            records = read_video_list(source, base)
            paths = [r.path for r in records]
        else:
            paths = [str(p if (p := Path(line.strip())).is_absolute() else base / p) for _, line in numbered]
        if not paths:
            raise AnnotationError(f"{source} lists no video")
        return VideoList(format, source, {n: p for (n, _), p in zip(numbered, paths, strict=True)})
    if video_dir is None:
        raise AnnotationError(
            f"{source}: a {format} list names videos by id; give the folder holding them as <id>.<ext> "
            "(--video-dir)"
        )
    folder = Path(video_dir)
    if not folder.is_dir():
        raise AnnotationError(f"video folder {folder} not found; give the folder of the <id>.<ext> videos")
    if format == "json":
        files = index_videos(folder)
        entries = {}
        for video_id in load_database(source):
            path = files.get(video_id) or files.get(f"v_{video_id}")
            entries[video_id] = str(path if path is not None else folder / f"{video_id}.mp4")
        return VideoList(format, source, entries)
    files = {p.stem: p for p in folder.iterdir() if p.suffix.lower() in AVA_VIDEO_EXTENSIONS}
    entries = {}
    for n, line in _content_lines(source, comments=False):
        row = next(csv.reader([line]))
        if not row[0].strip():
            raise AnnotationError(f"{source}:{n}: expected a row starting with a video id, got {line.strip()!r}")
        video_id = row[0].strip()
        entries[n] = str(files.get(video_id, folder / f"{video_id}.mp4"))
    if not entries:
        raise AnnotationError(f"{source} has no row")
    return VideoList(format, source, entries)


def _content_lines(path: Path, comments: bool = True) -> list[tuple[int, str]]:
    """(1-based line number, line) of the non-blank lines (and, with ``comments``, not ``#`` ones)."""
    return [
        (n, line)
        for n, line in enumerate(path.read_text().splitlines(), start=1)
        if line.strip() and not (comments and line.strip().startswith("#"))
    ]
