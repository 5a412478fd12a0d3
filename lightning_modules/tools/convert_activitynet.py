"""The official ActivityNet-1.3 JSON checked against the videos, with what the release lacks filled in.

    python -m lightning_modules convert-activitynet \\
        --annotations data/activitynet-1.3/annotations/activity_net.v1-3.min.json \\
        --video-dir data/activitynet-1.3/raw_data/videos \\
        --output data/activitynet-1.3/annotations/activity_net.v1-3.filled.json

The data modules read ``activity_net.v1-3.min.json`` as it is; this command adds to each video whose file is
in ``--video-dir`` (``<id>.<ext>`` or ``v_<id>.<ext>``) its ``fps`` and ``frame`` count (and a ``duration``
where the entry has none), keeps everything else of the file, and writes ``--output`` and ``--classes-output``
(default: ``category_idx.txt`` beside it; the labels sorted by name, the order the data modules use without a
class list). ``--drop-missing`` leaves out the videos without a file (otherwise the data module reports them
under its ``bad_video`` policy). See ``datamodules.prepare.tad_annotations``.

Prints one JSON object: videos per subset, the videos without a file or that cannot be opened, and those
whose file's length differs from the JSON's duration by more than ``--duration-tolerance`` seconds (the data
module's check; raise its ``duration_tolerance`` or fix the files). Exits 2 when the JSON is malformed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from datamodules.activitynet import class_names_of, index_videos, load_database
from datamodules.base import AnnotationError
from datamodules.prepare.tad_annotations import fill_activitynet
from datamodules.video_io import DECODERS
from lightning_modules.tools.parallel import default_workers, video_facts

#: Ids shown in the summary before it only counts them.
SHOWN = 20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_modules convert-activitynet",
        description="ActivityNet-1.3 JSON checked against the videos: fps and frame counts filled in, missing "
        "videos and duration mismatches reported.",
    )
    parser.add_argument("--annotations", type=Path, required=True, help="activity_net.v1-3.min.json")
    parser.add_argument("--video-dir", type=Path, required=True, help="folder of the videos <id>.<ext>")
    parser.add_argument("--output", type=Path, required=True, help="the JSON to write")
    parser.add_argument("--classes-output", type=Path, help="class list (default: category_idx.txt beside it)")
    parser.add_argument("--drop-missing", action="store_true", help="leave out the videos without a file")
    parser.add_argument("--duration-tolerance", type=float, default=3.0, help="seconds (3, the data module's)")
    parser.add_argument("--workers", type=int, default=default_workers(), help="videos opened at once")
    parser.add_argument("--decoder", choices=DECODERS, help="decoding backend (default: the data modules')")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.duration_tolerance < 0:
        parser.error("--workers must be >= 1 and --duration-tolerance >= 0")
    if args.output.resolve() == args.annotations.resolve():
        parser.error("--output must differ from --annotations (keep the official file as it is)")
    try:
        database = load_database(args.annotations)
        files = index_videos(args.video_dir)
    except AnnotationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    paths = {v: str(p) for v in database if (p := files.get(v) or files.get(f"v_{v}")) is not None}
    facts, failed = video_facts(paths, args.workers, args.decoder)
    filled = fill_activitynet(database, facts, args.duration_tolerance, args.drop_missing)

    content = json.loads(args.annotations.read_text())
    content["database"] = filled.database
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(content) + "\n")
    classes_output = args.classes_output or args.output.with_name("category_idx.txt")
    classes = class_names_of(filled.database)
    classes_output.write_text("".join(f"{name}\n" for name in classes))
    without_file = sorted(set(database) - set(paths))
    summary = {
        "videos": dict(sorted(Counter(e["subset"] for e in filled.database.values()).items())),
        "classes": len(classes),
        "videos_without_file": len(without_file),
        "first_without_file": without_file[:SHOWN],
        "dropped": len(database) - len(filled.database),
        "videos_unreadable": failed,
        "duration_mismatch": len(filled.duration_mismatch),
        "first_duration_mismatch": filled.duration_mismatch[:SHOWN],
        "output": str(args.output),
        "classes_file": str(classes_output),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
