"""``python -m datamodules.synthetic --out DIR [--kind ...]``: write the synthetic datasets."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from datamodules.synthetic import KINDS, generate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m datamodules.synthetic", description="Write deterministic synthetic video datasets."
    )
    parser.add_argument("--out", required=True, type=Path, help="output root; one sub-folder per kind")
    parser.add_argument("--kind", default="all", choices=("all",) + KINDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--videos-per-class", type=int, default=None, help="classification only")
    parser.add_argument("--num-videos", type=int, default=None, help="spatiotemporal and temporal")
    args = parser.parse_args(argv)
    kwargs: dict[str, Any] = {}
    if args.videos_per_class is not None:
        kwargs["classification_videos_per_class"] = args.videos_per_class
    if args.num_videos is not None:
        for k in ("spatiotemporal", "temporal"):
            kwargs[f"{k}_num_videos"] = args.num_videos
    start = time.perf_counter()
    out = generate(args.out, kind=args.kind, seed=args.seed, **kwargs)
    for k, path in out.items():
        print(f"{k}: {path}")
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
