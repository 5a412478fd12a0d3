"""THUMOS14's official annotation files -> the JSON and class list the temporal detection data module reads.

    python -m lightning_modules convert-thumos \\
        --annotations TH14_Temporal_annotations_validation/annotation \\
            TH14_Temporal_Annotations_Test/annotations/annotation \\
        --video-dir data/thumos-14/raw_data/video --output data/thumos-14/annotations/thumos_14_anno.json

Reads every ``<Class>_val.txt`` / ``<Class>_test.txt`` (and ``Ambiguous_*.txt``) of the ``--annotations``
folders and the length of each annotated video from ``--video-dir`` (``<id>.<ext>``, opened as the data modules
open it); writes ``--output`` (OpenTAD's layout: the validation videos are the ``training`` subset, the test
videos ``validation``; ``duration``, ``fps`` and ``frame`` from the files) and ``--classes-output`` (default:
``category_idx.txt`` beside it), the 20 classes sorted by name. See ``datamodules.prepare.tad_annotations``.

Prints one JSON object: videos and segments per subset, classes, and the videos without a file or that cannot
be opened (their entries have no duration; the data module then reports them under its ``bad_video`` policy).
Exits 2 with a message naming the file and line when an annotation file is malformed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from datamodules.activitynet import VIDEO_EXTENSIONS
from datamodules.base import AnnotationError
from datamodules.prepare.tad_annotations import THUMOS_AMBIGUOUS, read_thumos_annotations, thumos_database
from datamodules.video_io import DECODERS
from lightning_modules.tools.parallel import default_workers, video_facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_modules convert-thumos",
        description="THUMOS14 per-class annotation files -> the temporal detection JSON (OpenTAD layout) and "
        "class list, with durations from the videos.",
    )
    parser.add_argument("--annotations", type=Path, nargs="+", required=True,
                        help="folders of <Class>_val.txt / <Class>_test.txt")  # fmt: skip
    parser.add_argument("--video-dir", type=Path, required=True, help="folder of the videos <id>.<ext>")
    parser.add_argument("--output", type=Path, required=True, help="the JSON to write")
    parser.add_argument("--classes-output", type=Path, help="class list (default: category_idx.txt beside it)")
    parser.add_argument("--no-ambiguous", action="store_true", help="leave the Ambiguous segments out")
    parser.add_argument("--workers", type=int, default=default_workers(), help="videos opened at once")
    parser.add_argument("--decoder", choices=DECODERS, help="decoding backend (default: the data modules')")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if not args.video_dir.is_dir():
        parser.error(f"--video-dir {args.video_dir} is not a folder; give the folder of the THUMOS14 videos")
    try:
        annotations = read_thumos_annotations(args.annotations)
    except AnnotationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    files = {p.stem: str(p) for p in args.video_dir.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS}
    wanted = {v for v, rows in annotations.segments.items() if any(r[0] != THUMOS_AMBIGUOUS for r in rows)}
    facts, failed = video_facts({v: files[v] for v in sorted(wanted) if v in files}, args.workers, args.decoder)
    database = thumos_database(annotations, facts, ambiguous=not args.no_ambiguous)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"version": "THUMOS14", "database": database}, indent=1) + "\n")
    classes_output = args.classes_output or args.output.with_name("category_idx.txt")
    classes = sorted(annotations.classes)
    classes_output.write_text("".join(f"{name}\n" for name in classes))
    count = Counter(entry["subset"] for entry in database.values())
    segments = Counter(
        (entry["subset"], "ambiguous" if a["label"] == THUMOS_AMBIGUOUS else "segments")
        for entry in database.values() for a in entry["annotations"]
    )  # fmt: skip
    summary = {
        "annotation_files": annotations.files,
        "videos": dict(sorted(count.items())),
        "segments": {s: segments[(s, "segments")] for s in sorted(count)},
        "ambiguous_segments": {s: segments[(s, "ambiguous")] for s in sorted(count)},
        "classes": len(classes),
        "videos_without_file": sorted(wanted - set(files)),
        "videos_unreadable": failed,
        "output": str(args.output),
        "classes_file": str(classes_output),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
