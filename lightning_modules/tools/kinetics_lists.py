"""Kinetics-style lists and a class index from a ``<root>/<split>/<class>/<video>`` tree; Mini-Kinetics as a subset.

    python -m lightning_modules kinetics-lists --root data/kinetics400
    python -m lightning_modules kinetics-lists --root data/kinetics400 --prefix mini_kinetics_ \\
        --classes mini_kinetics_200_classes.txt --video-ids mini_train_ytids.txt mini_val_ytids.txt \\
        --splits train val:validation

Writes, under ``--root`` (or ``--output-dir``), ``<prefix><split>.txt`` per split (``<video path relative to
root> <label>`` per line, what ``VideoClassificationDataModule`` reads) and ``<prefix>classes.txt`` (one class
per line, the label order). ``--splits`` names the split folders (default: every folder of the root holding
class folders); ``NAME:FOLDER`` writes the list of ``FOLDER`` as ``NAME``. ``--classes`` keeps only the classes
it lists, in its order (Mini-Kinetics-200 is a 200-class subset of Kinetics-400); ``--video-ids`` only the clips
whose YouTube id (or file stem) the files list. See ``datamodules.prepare.kinetics_tree``.

Prints one JSON object: videos per list, classes, class folders left out, listed classes or ids not found, and
the files written. Exits 2 with a message naming the file when the tree or a list cannot be used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from datamodules.base import AnnotationError
from datamodules.prepare.kinetics_tree import build_lists, read_names, read_video_ids

#: Names of folders / ids shown in the summary before it only counts them.
SHOWN = 10


def parse_splits(items: list[str] | None) -> dict[str, str] | None:
    if not items:
        return None
    splits = {}
    for item in items:
        name, _, folder = item.partition(":")
        splits[name] = folder or name
    return splits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_modules kinetics-lists",
        description="Kinetics-style video lists and a class index from a <root>/<split>/<class>/<video> tree.",
    )
    parser.add_argument("--root", type=Path, required=True, help="the data root holding <split>/<class>/<video>")
    parser.add_argument("--splits", nargs="+", help="split folders, NAME or NAME:FOLDER (default: all)")
    parser.add_argument("--classes", type=Path, help="class names to keep, one per line, in label order")
    parser.add_argument("--video-ids", type=Path, nargs="+", help="files of the video ids to keep")
    parser.add_argument("--prefix", default="", help="prefix of the written files' names, e.g. mini_kinetics_")
    parser.add_argument("--output-dir", type=Path, help="where the lists go (default: --root; paths stay relative "
                        "to --root)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        classes = read_names(args.classes, "class list") if args.classes is not None else None
        video_ids = set().union(*(read_video_ids(p) for p in args.video_ids)) if args.video_ids else None
        lists = build_lists(args.root, parse_splits(args.splits), classes, video_ids)
    except AnnotationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.output_dir or args.root
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for split in lists.splits:
        path = out / f"{args.prefix}{split}.txt"
        path.write_text(lists.list_text(split))
        written[split] = str(path)
    classes_path = out / f"{args.prefix}classes.txt"
    classes_path.write_text("".join(f"{name}\n" for name in lists.classes))
    empty = [split for split, rows in lists.splits.items() if not rows]
    summary = {
        "videos": {split: len(rows) for split, rows in lists.splits.items()},
        "classes": len(lists.classes),
        "class_folders_left_out": {s: len(v) for s, v in lists.other_classes.items() if v},
        "listed_classes_without_folder": {s: v[:SHOWN] for s, v in lists.absent_classes.items()},
        **(
            {"listed_videos_not_found": len(lists.absent_videos), "first_not_found": lists.absent_videos[:SHOWN]}
            if video_ids is not None
            else {}
        ),
        "lists": written,
        "classes_file": str(classes_path),
    }
    print(json.dumps(summary))
    if empty:
        print(f"warning: no video in the list of {', '.join(empty)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
