"""The input pipeline in cores per GPU: what one loader worker delivers per source against raw decoding of the same
frames, and how many workers each paper recipe's GPU needs.

Sources (written once by the synthetic generators at the sizes of the real data, real H.264 files):

- ``kinetics_mp4``: Kinetics-style 10 s clips at 30 fps, short side 320; training clips of 16 frames every 4
  (VideoMAE's), short side 256-320, crop 224, flip, RandAugment 2/9; ``kinetics_8x32_static``: the same videos
  as HaltingVT's Mini-Kinetics recipe reads them (8 frames every 32, no flip, and each clip's static twin);
- ``ava_mp4`` / ``ava_frames``: AVA-style 640x360 30 fps movies, keyframe clips of 16 frames every 4 at short side
  288 and flip (EVAD's training), from the mp4 and from the frames extracted as JPEG files (the official layout);
- ``thumos_window``: THUMOS-style 120 s videos at 30 fps, 180 pixels high; one 768-frame training window (every
  4th frame, AdaTAD) at 160x160.

The sources with photometric augmentations (RandAugment, colour jitter) are also measured with
``augment_on: device``, the recipes' setting, where the worker leaves them to the training device, and AVA's
with ``resize_on: device`` (the EVAD recipes'), where it leaves the resize and flip. The >= 0.9 target is for
each source as the recipes read it (``RECIPE_SETTINGS``); the process keeps freed memory as every loader worker
does (``datamodules.base.keep_freed_memory``).

``decoders`` (``bench_decoders``): the ``kinetics_mp4`` pipeline with each decoding backend (``decoder: decord``,
``decoder: pyav``) against raw decord and raw PyAV decoding of the same clips, and the same videos re-encoded as
AV1 (what yt-dlp fetches today) through ``decoder: auto``, which reads them with PyAV, against raw PyAV.

``pipeline``: the data module's training loader with no worker processes (so: one worker's work) for a number of
batches: decode, sample, transform, collate. ``raw``: exactly the frames that pass read (``recorded_reads``),
decoded by the plain decoder call (``replay``: decord's ``get_batch`` with a fresh reader wherever the loader
opened a video; for JPEG files simplejpeg's ``decode_jpeg``, the decoder the pipeline reads them with, 1.6x
PIL's speed), nothing else. ``ratio`` = pipeline clips/s over raw clips/s (target >= 0.9).

Workers per GPU = the GPU's training clips/s / one worker's clips/s. The GPU figure is an assumption stated with
it: an A100 at 40% model-FLOPs utilisation of its dense peak (312 TFLOPS bf16; 156 TF32 for HaltingVT's fp32
recipe), a training step costing three forwards, each forward's multiply-accumulates as this project counts them.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.measure import interleaved, stability

#: The GPU behind the workers-per-GPU column: A100 dense peak (TFLOPS) and the utilisation assumed.
A100_BF16_TFLOPS, A100_TF32_TFLOPS, UTILISATION = 312.0, 156.0, 0.4

#: GMACs per training clip/window forward of each recipe (this project's counts) and its precision's peak.
RECIPES = {
    # HaltingVT G05 on Mini-Kinetics at its 24.2 GMACs budget, plus the static clip of the motion loss; fp32
    "haltingvt_minik (8x32, fp32)": ("kinetics_8x32_static (augment_on: device)", 2 * 24.2, A100_TF32_TFLOPS),
    # EVAD ViT-B at keep rate 0.7 (benchmarks.evad: 137.8 GMACs)
    "evad_ava_vitb (16x4, bf16)": ("ava_frames (resize_on: device)", 137.8, A100_BF16_TFLOPS),
    # the THUMOS VideoMAE-S detector on a 768-frame window: 4 x the 192-frame 294.7 GMACs (head included once)
    "tad_thumos_videomae_s (768 frames, bf16)": (
        "thumos_window (augment_on: device)", 4 * 280.2 + 14.5, A100_BF16_TFLOPS
    ),
}


#: Each source as the paper recipes configure its loader (the rows the >= 0.9 target is for).
RECIPE_SETTINGS = (
    "kinetics_mp4 (augment_on: device)", "kinetics_8x32_static (augment_on: device)", "ava_mp4 (resize_on: device)",
    "ava_frames (resize_on: device)", "thumos_window (augment_on: device)",
)

#: The Kinetics-style source's synthetic set: 10 s clips at 30 fps, 320 pixels.
KINETICS_SET = {"videos_per_class": 1, "val_fraction": 0.0, "size": 320, "num_frames": 300, "fps": 30}


def gpu_clips_per_s(gmacs: float, peak_tflops: float) -> float:
    """Training clips/s of one GPU at ``UTILISATION`` of ``peak_tflops``: 3 forwards, 2 FLOPs per MAC."""
    return UTILISATION * peak_tflops * 1e12 / (3 * 2 * gmacs * 1e9)


def _write_frames(video: Path, folder: Path) -> int:
    """Every frame of ``video`` as ``folder/<id>/<id>_<n:06d>.jpg`` from 1 (PySlowFast's AVA layout)."""
    import decord
    from PIL import Image

    reader = decord.VideoReader(str(video))
    out = folder / video.stem
    out.mkdir(parents=True, exist_ok=True)
    for i in range(len(reader)):
        Image.fromarray(reader[i].asnumpy()).save(out / f"{video.stem}_{i + 1:06d}.jpg", quality=90)
    return len(reader)


def _raw_frames(paths: list[Path]) -> None:
    import simplejpeg

    for p in paths:
        simplejpeg.decode_jpeg(p.read_bytes(), colorspace="RGB", fastdct=False, fastupsample=False)


@contextmanager
def recorded_reads() -> Iterator[list[tuple[Any, np.ndarray]]]:
    """Every frame read the data modules make meanwhile, as (reader, clamped frame indices)."""
    from datamodules.keyframes import FrameFolder
    from datamodules.video_io import Video

    reads: list[tuple[Any, np.ndarray]] = []
    originals = {cls: cls.get_frames for cls in (Video, FrameFolder)}

    def spy(cls: type) -> Callable[..., Any]:
        def get_frames(self: Any, indices: Any) -> Any:
            reads.append((self, np.clip(np.asarray(indices), 0, self.num_frames - 1)))
            return originals[cls](self, indices)

        return get_frames

    try:
        for cls in originals:
            cls.get_frames = spy(cls)
        yield reads
    finally:
        for cls, original in originals.items():
            cls.get_frames = original


def replay(reads: list[tuple[Any, np.ndarray]], backend: str | None = None) -> Callable[[], None]:
    """Raw decoding of exactly the frames ``reads`` asked for, call by call: a fresh reader of the backend the
    loader used (or ``backend``: decord or pyav) wherever it opened a video (the same reader for its further
    calls, e.g. a THUMOS window's chunks), each frame file once per call, nothing else."""
    from datamodules.keyframes import FrameFolder
    from datamodules.video_pyav import PyAVReader

    def open_reader(source: Any) -> Callable[[np.ndarray], Any]:
        if (backend or source.backend) != "decord":
            return PyAVReader(str(source.path), num_threads=1).read
        import decord

        reader = decord.VideoReader(str(source.path), num_threads=1)
        return lambda idx: reader.get_batch(idx.tolist()).asnumpy()

    def run() -> None:
        read, opened = None, None
        for source, idx in reads:
            if isinstance(source, FrameFolder):
                _raw_frames([source.path(i) for i in dict.fromkeys(idx.tolist())])
                continue
            if source is not opened:
                read, opened = open_reader(source), source
            read(idx)

    return run


def batches_of(dm: Any, batches: int) -> tuple[Callable[[], int], int, list[tuple[Any, np.ndarray]]]:
    """A pass of ``batches`` batches of ``dm``'s training loader (starting it again when an epoch is shorter:
    the same clips every time, no ``set_epoch``), the clips such a pass delivers, and the frame reads it makes."""
    loader = dm.train_dataloader()

    def run() -> int:
        clips, done = 0, 0
        while done < batches:
            for batch in loader:
                clips, done = clips + int(batch["batch_size"]), done + 1
                if done == batches:
                    break
        return clips

    with recorded_reads() as reads:
        clips = run()
    return run, clips, reads


def sources(root: Path) -> dict[str, Any]:
    """The data module of each source, its media written under ``root``."""
    from datamodules.ava import AVADataModule
    from datamodules.classification import VideoClassificationDataModule
    from datamodules.synthetic import ClassificationSet, SpatiotemporalSet, TemporalSet
    from datamodules.temporal import TemporalDetectionDataModule

    kinetics = VideoClassificationDataModule(
        str(root / "kinetics"), num_frames=16, frame_stride=4, crop_size=224, train_short_side=(256, 320),
        batch_size=4, num_workers=0,
        synthetic=ClassificationSet(**KINETICS_SET),
    )  # fmt: skip
    ava_set = SpatiotemporalSet(num_videos=2, val_fraction=0.5, size=(360, 640), seconds=20, fps=30)
    ava_common = {"num_frames": 16, "frame_stride": 4, "train_short_side": 288, "batch_size": 4, "num_workers": 0}
    ava = AVADataModule(str(root / "ava"), synthetic=ava_set, **ava_common)
    thumos = TemporalDetectionDataModule(
        str(root / "thumos"), window_size=768, frame_stride=4, crop_size=160, train_short_side=182, batch_size=1,
        num_workers=0, synthetic=TemporalSet(num_videos=2, val_fraction=0.5, size=180, seconds=120.0, fps=30),
    )  # fmt: skip
    for dm in (kinetics, ava, thumos):
        dm.prepare_data()
        dm.setup("fit")
    # HaltingVT's Mini-Kinetics clips on the same videos: 8 frames every 32, no flip, and the static twin of
    # each clip that its motion loss trains on (a second transform per sample).
    halting = VideoClassificationDataModule(
        str(root / "kinetics"), num_frames=8, frame_stride=32, crop_size=224, train_short_side=(256, 320),
        flip=False, static_clips=True, batch_size=4, num_workers=0,
    )  # fmt: skip
    halting.setup("fit")
    # The same pipelines with the photometric ops left to the training device (augment_on: device).
    kinetics_device = VideoClassificationDataModule(
        str(root / "kinetics"), num_frames=16, frame_stride=4, crop_size=224, train_short_side=(256, 320),
        batch_size=4, num_workers=0, augment_on="device",
    )  # fmt: skip
    halting_device = VideoClassificationDataModule(
        str(root / "kinetics"), num_frames=8, frame_stride=32, crop_size=224, train_short_side=(256, 320),
        flip=False, static_clips=True, batch_size=4, num_workers=0, augment_on="device",
    )  # fmt: skip
    thumos_device = TemporalDetectionDataModule(
        str(root / "thumos"), window_size=768, frame_stride=4, crop_size=160, train_short_side=182, batch_size=1,
        num_workers=0, augment_on="device",
    )  # fmt: skip
    for dm in (kinetics_device, halting_device, thumos_device):
        dm.setup("fit")
    # The same AVA set read from extracted frames.
    videos = sorted((root / "ava").rglob("*.mp4"))
    for video in videos:
        _write_frames(video, root / "ava_frames")
    files = {
        "train_csv": "annotations/train.csv", "val_csv": "annotations/val.csv",
        "label_map": "annotations/label_map.pbtxt", "timestamp_offset": 0.0, "empty_classes": "warn",
        "train_excluded_timestamps": "annotations/train_excluded_timestamps.csv",
        "val_excluded_timestamps": "annotations/val_excluded_timestamps.csv",
    }  # fmt: skip
    ava_frames = AVADataModule(str(root / "ava"), frames_dir=str(root / "ava_frames"), **files, **ava_common)
    ava_frames.setup("fit")
    # Both with the resize and flip left to the training device (resize_on: device, the EVAD recipes').
    ava_device = AVADataModule(str(root / "ava"), synthetic=ava_set, resize_on="device", **ava_common)
    ava_frames_device = AVADataModule(
        str(root / "ava"), frames_dir=str(root / "ava_frames"), resize_on="device", **files, **ava_common
    )
    for dm in (ava_device, ava_frames_device):
        dm.setup("fit")

    return {
        "kinetics_mp4": kinetics,
        "kinetics_8x32_static": halting,
        "kinetics_mp4 (augment_on: device)": kinetics_device,
        "kinetics_8x32_static (augment_on: device)": halting_device,
        "ava_mp4": ava,
        "ava_frames": ava_frames,
        "ava_mp4 (resize_on: device)": ava_device,
        "ava_frames (resize_on: device)": ava_frames_device,
        "thumos_window": thumos,
        "thumos_window (augment_on: device)": thumos_device,
    }


def _av1_copy(source: Path, out: Path) -> None:
    """The classification set at ``source`` with every video re-encoded as AV1 (same frames, rate and lists)."""
    import shutil

    import av

    from datamodules.synthetic import write_video

    for name in ("classes.txt", "train.txt", "val.txt"):
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / name, out / name)
    for video in sorted((source / "videos").glob("*.mp4")):
        with av.open(str(video)) as container:
            stream = container.streams.video[0]
            fps = round(float(stream.average_rate))
            frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        write_video(out / "videos" / video.name, frames, fps, codec="av1")


def bench_decoders(root: Path, batches: int = 4, repeats: int = 3, kinetics: dict | None = None) -> dict:
    """Clips/s of one worker through the Kinetics-style training pipeline (16 frames every 4, ``kinetics_mp4``'s,
    ``augment_on: device`` as the recipes: the worker decodes) with each decoding backend, against raw decoding of the same clips (``replay``): decord's ``get_batch`` (as
    ``kinetics_mp4``) and PyAV's (``PyAVReader.read``), a fresh reader per clip; and the videos re-encoded as AV1
    through ``decoder: auto`` against raw PyAV. The set is written under ``root`` (``kinetics``: its
    ``ClassificationSet`` settings, ``KINETICS_SET`` by default; an existing one is reused)."""
    from datamodules.classification import VideoClassificationDataModule
    from datamodules.synthetic import ClassificationSet

    settings = kinetics or KINETICS_SET
    common = {
        "num_frames": 16, "frame_stride": 4, "crop_size": 224, "train_short_side": (256, 320), "batch_size": 4,
        "num_workers": 0, "augment_on": "device",
    }  # fmt: skip
    h264 = root / "kinetics"
    modules = {
        name: VideoClassificationDataModule(
            str(h264), synthetic=ClassificationSet(**settings), decoder=name, **common
        )
        for name in ("decord", "pyav")
    }
    modules["decord"].prepare_data()
    _av1_copy(h264, root / "kinetics_av1")
    modules["auto (AV1)"] = VideoClassificationDataModule(str(root / "kinetics_av1"), decoder="auto", **common)
    passes = {name: batches_of(dm, batches) for name, dm in modules.items()}
    clips = passes["decord"][1]
    if any(n != clips for _, n, _ in passes.values()):
        raise RuntimeError(f"the decoders' passes gave {[n for _, n, _ in passes.values()]} clips, not the same")
    t264 = interleaved({
        "decord": passes["decord"][0], "pyav": passes["pyav"][0],
        "raw_decord": replay(passes["decord"][2], "decord"), "raw_pyav": replay(passes["decord"][2], "pyav"),
    }, repeats, stat=min)  # fmt: skip
    tav1 = interleaved(
        {"auto": passes["auto (AV1)"][0], "raw_pyav": replay(passes["auto (AV1)"][2], "pyav")}, repeats, stat=min
    )
    rows = {
        "decord (H.264)": (t264["decord"], t264["raw_decord"], t264["raw_decord"]),
        "pyav (H.264)": (t264["pyav"], t264["raw_pyav"], t264["raw_decord"]),
        "auto (AV1: PyAV)": (tav1["auto"], tav1["raw_pyav"], t264["raw_decord"]),
    }
    return {
        name: {
            "pipeline_clips_per_s": clips / t, "raw_clips_per_s": clips / own, "ratio": own / t,
            "raw_decord_h264_clips_per_s": clips / decord, "ratio_to_raw_decord_h264": decord / t,
            **stability(t264, tav1),
        }
        for name, (t, own, decord) in rows.items()
    }  # fmt: skip


def bench_pipeline(batches: int = 4, repeats: int = 3) -> dict:
    """Clips/s of one worker through each source's whole training pipeline against raw decoding, and the
    workers per GPU each paper recipe needs."""
    import torch

    from datamodules.base import keep_freed_memory

    # as in every loader worker (one thread, freed memory kept): this process stands for one
    keep_freed_memory()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _bench_pipeline(batches, repeats)
    finally:
        torch.set_num_threads(threads)


def _bench_pipeline(batches: int, repeats: int) -> dict:
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.monotonic()
        built = sources(Path(tmp))
        setup_seconds = time.monotonic() - start
        for name, dm in built.items():
            run_pipeline, clips, reads = batches_of(dm, batches)
            t = interleaved({"pipeline": run_pipeline, "raw": replay(reads)}, repeats, stat=min)
            rows[name] = {
                "clips": clips, "pipeline_clips_per_s": clips / t["pipeline"], "raw_clips_per_s": clips / t["raw"],
                "ratio": t["raw"] / t["pipeline"], **stability(t),
            }  # fmt: skip
        decoders = bench_decoders(Path(tmp), batches, repeats)
    workers = {}
    for recipe, (source, gmacs, peak) in RECIPES.items():
        gpu = gpu_clips_per_s(gmacs, peak)
        per_worker = rows[source]["pipeline_clips_per_s"]
        workers[recipe] = {"source": source, "gpu_clips_per_s": gpu, "workers_per_gpu": gpu / per_worker}
    # The target holds for each source as the recipes read it; the other rows show what moved to the device.
    worst = min(RECIPE_SETTINGS, key=lambda k: rows[k]["ratio"])
    table = "; ".join(
        f"{k} {r['pipeline_clips_per_s']:.2f} vs raw {r['raw_clips_per_s']:.2f} clips/s" for k, r in rows.items()
    )
    needs = "; ".join(f"{k}: {w['workers_per_gpu']:.0f} workers/GPU" for k, w in workers.items())
    by_decoder = "; ".join(
        f"{k} {r['pipeline_clips_per_s']:.2f} clips/s, {r['ratio']:.2f}x its raw decode, "
        f"{r['ratio_to_raw_decord_h264']:.2f}x raw decord on H.264" for k, r in decoders.items()
    )
    return {
        "what": f"one loader worker vs raw decode: {table}; {needs} (A100 at {UTILISATION:.0%} MFU); "
        f"kinetics_mp4 by decoder: {by_decoder}",
        "ours": rows[worst]["pipeline_clips_per_s"],
        "reference": rows[worst]["raw_clips_per_s"],
        "unit": "clips/s",
        "ratio": rows[worst]["ratio"],
        "target": 0.9,
        "sources": rows,
        "decoders": decoders,
        "workers": workers,
        "setup_seconds": setup_seconds,
        "reliable": all(r["reliable"] for r in [*rows.values(), *decoders.values()]),
        "unreliable_because": [
            f"{k}: {why}" for k, r in [*rows.items(), *decoders.items()] for why in r["unreliable_because"]
        ],
    }
