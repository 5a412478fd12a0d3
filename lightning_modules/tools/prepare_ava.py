"""Cut AVA's movies to the annotated 15 minutes and, optionally, extract their frames at 30 fps.

    python -m lightning_modules prepare-ava --movies data/ava/movies --output data/ava/videos_15min \\
        --frames data/ava/frames --workers 8

For every movie ``<id>.<ext>`` in ``--movies`` (or only the ids ``--ids`` lists, e.g. AVA's
``ava_file_names_trainval_v2.1.txt``), writes ``--output/<id>.mp4``: the frames from ``--start`` (900) for
``--duration`` (901) seconds, PySlowFast's ``ffmpeg -ss 900 -t 901`` cut, re-encoded as H.264 with PyAV; and
with ``--frames``, ``--frames/<id>/<id>_000001.jpg, ...``: the cut's frames on a ``--frame-rate`` (30) grid, the
layout ``AVADataModule`` reads with ``frames_dir``. See ``datamodules.prepare.ava_movies``.

Resumable: a cut or frame folder that exists is complete and is skipped; an interrupted one is redone. Prints
one JSON object: what was written, skipped and failed (with the reasons), and the ids whose cut is shorter than
asked (a movie that ends early). Exits 1 when a movie failed, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

from datamodules.ava import VIDEO_EXTENSIONS
from datamodules.prepare.ava_movies import (
    AVA_DURATION_S,
    AVA_FRAME_RATE,
    AVA_START_S,
    MovieError,
    cut_movie,
    extract_frames,
)
from datamodules.video_io import VideoDecodeError, open_video
from lightning_modules.tools.parallel import decoder_messages_hidden, default_workers, run_parallel

#: A cut this much shorter than asked is reported (one frame of slack at any rate).
SHORT_SLACK_S = 0.5


def prepare_movie(source: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Cut one movie and extract its frames, each unless already done; what happened, never raises."""
    video_id = source.stem
    done: dict[str, Any] = {"id": video_id}
    cut = args.output / f"{video_id}.mp4"
    try:
        if cut.is_file():
            done["cut"] = "skipped"
        else:
            cut_movie(source, cut, args.start, args.duration, crf=args.crf)
            done["cut"] = "written"
        with decoder_messages_hidden():
            done["duration"] = open_video(cut).duration
        if args.frames is not None:
            done["frames"] = "skipped"
            if not (args.frames / video_id).is_dir():
                extract_frames(cut, args.frames, video_id, args.frame_rate, args.jpeg_quality)
                done["frames"] = "written"
    except (MovieError, VideoDecodeError) as err:
        done["error"] = str(err)
    return done


def movies_to_prepare(folder: Path, ids_file: Path | None) -> tuple[list[Path], list[str]]:
    """The movies of ``folder`` (those ``ids_file`` names, when given) and the listed ids without a movie."""
    movies = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in VIDEO_EXTENSIONS}
    if ids_file is None:
        return list(movies.values()), []
    ids = [Path(line.split()[0]).stem for line in ids_file.read_text().splitlines() if line.strip()]
    return [movies[i] for i in ids if i in movies], [i for i in ids if i not in movies]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_modules prepare-ava",
        description="Cut AVA movies to the annotated 15 minutes (PySlowFast's ffmpeg -ss 900 -t 901) and "
        "optionally extract frames at 30 fps in the layout AVADataModule reads.",
    )
    parser.add_argument("--movies", type=Path, required=True, help="folder of the downloaded movies <id>.<ext>")
    parser.add_argument("--output", type=Path, required=True, help="folder for the cuts <id>.mp4 (videos_15min)")
    parser.add_argument("--frames", type=Path, help="also extract frames into <frames>/<id>/<id>_%%06d.jpg")
    parser.add_argument("--ids", type=Path, help="only the movies this file lists (one <id>[.<ext>] per line)")
    parser.add_argument("--start", type=float, default=AVA_START_S, help="first second of the cut (900)")
    parser.add_argument("--duration", type=float, default=AVA_DURATION_S, help="seconds to keep (901)")
    parser.add_argument("--frame-rate", type=float, default=AVA_FRAME_RATE, help="frames per second (30)")
    parser.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality of the frames, 1-100 (95)")
    parser.add_argument("--crf", type=int, default=18, help="H.264 quality of the cuts, lower is better (18)")
    parser.add_argument("--workers", type=int, default=default_workers(), help="movies prepared at once")
    args = parser.parse_args(argv)
    if args.start < 0 or args.duration <= 0 or args.frame_rate <= 0:
        parser.error("--start must be >= 0, --duration and --frame-rate > 0")
    if not 1 <= args.jpeg_quality <= 100 or args.workers < 1:
        parser.error("--jpeg-quality must be in 1-100 and --workers >= 1")
    if not args.movies.is_dir():
        parser.error(f"--movies {args.movies} is not a folder; give the folder of the downloaded movies")
    if args.ids is not None and not args.ids.is_file():
        parser.error(f"--ids {args.ids} not found")
    if args.output.resolve() == args.movies.resolve():
        parser.error("--output must differ from --movies (the cuts would replace the movies)")
    movies, absent = movies_to_prepare(args.movies, args.ids)
    if not movies:
        parser.error(f"no movie ({', '.join(VIDEO_EXTENSIONS)}) to prepare in {args.movies}")
    args.output.mkdir(parents=True, exist_ok=True)
    if args.frames is not None:
        args.frames.mkdir(parents=True, exist_ok=True)

    results = sorted(
        run_parallel(functools.partial(prepare_movie, args=args), movies, args.workers, "preparing AVA", "movie"),
        key=lambda r: r["id"],
    )
    failed = {r["id"]: r["error"] for r in results if "error" in r}
    short = [r["id"] for r in results if r.get("duration", args.duration) < args.duration - SHORT_SLACK_S]
    summary = {
        "movies": len(movies),
        "cut_written": sum(r.get("cut") == "written" for r in results),
        "cut_skipped": sum(r.get("cut") == "skipped" for r in results),
        **(
            {
                "frames_written": sum(r.get("frames") == "written" for r in results),
                "frames_skipped": sum(r.get("frames") == "skipped" for r in results),
            }
            if args.frames is not None
            else {}
        ),
        "failed": failed,
        "shorter_than_asked": short,
        "listed_without_movie": absent,
        "output": str(args.output),
        **({"frames": str(args.frames)} if args.frames is not None else {}),
    }
    print(json.dumps(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
