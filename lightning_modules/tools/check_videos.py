"""Decode every video of a list and write the list back without the unusable ones, plus a report.

    python -m lightning_modules check-videos data/kinetics400/mini_kinetics_train.txt --min-frames 8
    python -m lightning_modules check-videos data/thumos-14/annotations/thumos_14_anno.json \\
        --video-dir data/thumos-14/raw_data/video
    python -m lightning_modules check-videos data/ava/annotations/ava_train_v2.2.csv --video-dir data/ava/videos_15min
    python -m lightning_modules check-videos /datasets/my_videos --workers 8

The list is a folder (searched recursively), a plain list of paths, a Kinetics-style list, an ActivityNet /
OpenTAD JSON or an AVA CSV (``datamodules.prepare.video_lists``; ``--format`` when the ending does not say).
Every video is opened and its first, middle and last frame decoded (``datamodules.prepare.video_check``); a
missing, unreadable, empty, corrupt, unsupported-codec, too short (``--min-frames``) or undecodable one is bad.
``--decoder`` checks with the backend training will use (the data modules' ``decoder``: ``auto`` decodes with
PyAV what decord cannot, so a file only PyAV reads is usable under ``auto`` and ``pyav``, not under ``decord``).

Writes ``--output`` (default ``<list>.clean.<ext>`` beside the list; ``<folder>/clean_videos.txt`` for a folder):
the list in its own format without the bad entries; and ``--report`` (default ``<output stem>.report.csv``; a
``.json`` name writes JSON): one row per video with its status, reason, frames, rate and duration.
Prints one JSON object to stdout: the counts by status, entries kept and the files written. Exits 2 with a
message naming the file when the list cannot be read, 0 otherwise (the bad videos are in the report).
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from datamodules.base import AnnotationError
from datamodules.prepare.video_check import BAD_KINDS, VideoCheck, check_video
from datamodules.prepare.video_lists import LIST_FORMATS, read_video_list_any
from datamodules.video_io import DECODERS
from lightning_modules.tools.parallel import decoder_messages_hidden, default_workers, run_parallel

REPORT_COLUMNS = ("path", "status", "reason", "num_frames", "fps", "duration")


def default_output(source: Path) -> Path:
    if source.is_dir():
        return source / "clean_videos.txt"
    return source.with_name(f"{source.stem}.clean{source.suffix}")


def write_report(path: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps({"summary": summary, "videos": rows}, indent=1) + "\n")
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=REPORT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _check(path: str, min_frames: int, options: dict[str, Any]) -> VideoCheck:
    with decoder_messages_hidden():
        return check_video(path, min_frames, **options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_modules check-videos",
        description="Decode every video of a list (first, middle, last frame); write the list back without the "
        "bad ones and a report of why each is bad.",
    )
    parser.add_argument("source", type=Path, help="a folder of videos, or a list / annotation file")
    parser.add_argument("--format", default="auto", choices=("auto", *LIST_FORMATS), help="the list's format")
    parser.add_argument("--root", type=Path, help="folder the paths of a text list are relative to (its folder)")
    parser.add_argument("--video-dir", type=Path, help="folder of the <id>.<ext> videos of a JSON or AVA CSV")
    parser.add_argument("--min-frames", type=int, default=1, help="fewer frames than this is too short (1)")
    parser.add_argument("--output", type=Path, help="the clean list (default: <list>.clean.<ext>)")
    parser.add_argument("--report", type=Path, help="per-video report, .csv or .json (<output stem>.report.csv)")
    parser.add_argument("--workers", type=int, default=default_workers(), help="decoding processes")
    parser.add_argument(
        "--decoder", choices=DECODERS,
        help="decoding backend, as the data modules' decoder option (default: theirs, auto: decord, then PyAV)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.min_frames < 1 or args.workers < 1:
        parser.error("--min-frames and --workers must be >= 1")
    options = {"decoder": args.decoder} if args.decoder is not None else {}
    try:
        listed = read_video_list_any(args.source, args.format, args.root, args.video_dir)
    except AnnotationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    output = args.output or default_output(args.source)
    report = args.report or output.with_name(f"{output.stem}.report.csv")

    job = functools.partial(_check, min_frames=args.min_frames, options=options)
    checks = {c.path: c for c in run_parallel(job, listed.videos, args.workers, "checking videos")}
    rows = [checks[path].as_row() for path in listed.videos]  # list order, not completion order
    bad = {path for path, c in checks.items() if not c.ok}
    kept = listed.write_clean(output, bad)
    counts = Counter(row["status"] for row in rows)
    summary = {
        "format": listed.format, "videos": len(rows), "ok": counts.get("ok", 0), "bad": len(bad),
        **{kind: counts.get(kind, 0) for kind in BAD_KINDS},
        "entries": len(listed.entries), "entries_kept": kept, "output": str(output), "report": str(report),
    }  # fmt: skip
    write_report(report, rows, summary)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
