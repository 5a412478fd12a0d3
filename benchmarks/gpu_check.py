"""``make gpu-check``: the device code and the benchmarks that mean something on a GPU, in one go.

On a CUDA machine (one H100: a few minutes) it runs

- checks of the device paths: every SDPA backend the device offers (math, flash, memory-efficient, cuDNN) through
  the core's ``Attention`` against the math backend in float32; bf16 autocast against float32 for each model;
  the RoIAlign paths EVAD uses against torchvision's kernel on the device; the transforms the recipes leave to
  the device (AVA's resize and flip, the Kinetics-style and THUMOS training geometry) against the loader's on
  the CPU, within one grey level; a one-GPU DDP fit (NCCL) of each quickstart recipe through the CLI;
- the benchmarks: EVAD keep rate 0.7 vs 1.0 inference throughput at batch 8 (the paper's A100: 1.38x) and
  training-step memory (the paper: -47%); HaltingVT with halted tokens removed vs the dense DeiT-S; the THUMOS
  VideoMAE-S detector's latency per dropped block (the paper: 0.774 at a MACs ratio of 0.761); its LoRA training
  step with and without activation checkpointing; each model's forward in bf16 vs float32;

and writes one JSON (``--out``) and prints a short table. ``--tiny`` runs the same steps at tiny sizes on the CPU
(``tests/test_gpu_check.py`` runs it in ``make test``, so the script cannot rot): its figures mean nothing,
only that every step runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.measure import REPO, interleaved, stability

QUICKSTARTS = ("synthetic_dense_vit", "synthetic_haltingvt", "tad_synthetic", "evad_synthetic")


@dataclass(frozen=True)
class Sizes:
    """The inputs of each step: the papers' on a GPU, tiny ones on the CPU."""

    evad_batch: int = 8
    evad_image: int = 224
    halting_batch: int = 8
    halting_image: int = 224
    tad_frames: int = 192  # the input of the block-drop paper's MACs (12 chunks of 16 frames at 160x160)
    tad_train_frames: int = 768
    repeats: int = 5
    fit_batches: int = 20


PAPER = Sizes()
TINY = Sizes(
    evad_batch=2, evad_image=64, halting_batch=2, halting_image=32, tad_frames=64, tad_train_frames=64, repeats=2,
    fit_batches=2,
)  # fmt: skip


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any]) -> Callable[[], None]:
    """``fn`` as a timed call: it waits for the device's queued work, so the seconds are the work's."""

    def run() -> None:
        fn()
        synchronize(device)

    return run


def peak_memory(device: torch.device, fn: Callable[[], Any]) -> float | None:
    """Peak device memory (MiB) allocated while ``fn`` runs (None on the CPU: the benchmarks measure RSS apart)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


# ------------------------------------------------------------------------------------------------- models


def evad(tiny: bool, keep_rate: float, activation_checkpointing: bool = False) -> torch.nn.Module:
    """EVAD ViT-B with the paper's parts, or a narrow 4-block one (pruning in blocks 1 and 2) for ``tiny``."""
    from benchmarks.evad import evad_model

    if not tiny:
        return evad_model("base", keep_rate, activation_checkpointing)
    from models.context_decoder import ContextRefinementDecoder
    from models.evad import EVAD
    from models.query_localiser import QueryLocaliser
    from models.vit import VideoMAEViT

    torch.manual_seed(0)
    backbone = VideoMAEViT(embed_dim=32, depth=4, num_heads=2, use_mean_pooling=False, img_size=64)
    localiser = QueryLocaliser(
        num_proposals=10, hidden_dim=32, num_stages=2, num_heads=2, dim_dynamic=8, dim_feedforward=32
    )
    decoder = ContextRefinementDecoder(
        5, encoder_dim=32, embed_dim=32, depth=2, num_heads=2, head_hidden_dim=32, drop_path_rate=0.0
    )
    return EVAD(
        backbone, localiser, decoder, keep_rate=keep_rate, prune_layers=[1, 2], tap_layers=[0, 1, 2, 3],
        num_classes=5, activation_checkpointing=activation_checkpointing,
    )  # fmt: skip


def haltingvt(tiny: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """HaltingVT G05 and the dense inflated ViT it starts from (DeiT-S, 8 frames; tiny: width 64, 4 frames)."""
    from models.haltingvt import HaltingViT
    from models.vit import InflatedViT

    torch.manual_seed(0)
    if not tiny:
        return (
            HaltingViT(size="small", num_frames=8, img_size=224, glimpse_ratio=0.5),
            InflatedViT(size="small", num_frames=8, img_size=224),
        )
    small = {"size": None, "embed_dim": 64, "depth": 6, "num_heads": 4, "img_size": 32, "num_frames": 4}
    return HaltingViT(glimpse_ratio=0.5, **small), InflatedViT(**small)


def tad(tiny: bool, finetune: str = "frozen", activation_checkpointing: bool = False) -> torch.nn.Module:
    """The THUMOS VideoMAE-S detector of its recipe (random weights); tiny: width 32, 4 blocks, 32x32 frames."""
    from benchmarks.tad import thumos_detector

    if not tiny:
        return thumos_detector(finetune, activation_checkpointing)
    vit = {"embed_dim": 32, "depth": 4, "num_heads": 2, "img_size": 32}
    return thumos_detector(finetune, activation_checkpointing, head_length=64, vit_overrides=vit)


def tad_input(
    sizes: Sizes, tiny: bool, frames: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    side = 32 if tiny else 160
    return torch.randn(1, 3, frames, side, side, device=device), torch.ones(
        1, frames, dtype=torch.bool, device=device
    )


# ------------------------------------------------------------------------------------------------- checks


def check_sdpa_backends(device: torch.device) -> dict:
    """The core's ``Attention`` under each SDPA backend against the math backend in float32 (bf16 where the
    backend needs it), with a boolean mask as the pruning and packing paths pass one."""
    from models.layers import Attention

    torch.manual_seed(0)
    attention = Attention(256, num_heads=4).to(device).eval()
    x = torch.randn(2, 197, 256, device=device)
    mask = torch.ones(2, 1, 197, 197, dtype=torch.bool, device=device)
    mask[1, ..., 150:] = False
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH):
        reference = attention(x, mask)[0].float()
    backends = [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    if device.type == "cuda":
        backends.append(SDPBackend.CUDNN_ATTENTION)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH):
        plain = attention(x)[0].float()
    rows = {}
    for backend in backends:
        for dtype in (torch.float32, torch.bfloat16):
            for masked in (False, True):  # the fused kernels take no mask on some devices: each case apart
                name = (
                    f"{backend.name.lower()}_{str(dtype).removeprefix('torch.')}{'_masked' if masked else ''}"
                )
                autocast = torch.autocast(device.type, dtype, enabled=dtype != torch.float32)
                try:
                    with torch.inference_mode(), sdpa_kernel(backend), autocast:
                        out = attention(x, mask if masked else None)[0].float()
                except RuntimeError as e:  # the backend does not run this input on this device
                    rows[name] = {"ran": False, "why": str(e).splitlines()[0][:200]}
                    continue
                error = (out - (reference if masked else plain)).abs().max().item()
                tolerance = 1e-4 if dtype == torch.float32 else 5e-2
                rows[name] = {"ran": True, "max_abs_error": error, "ok": error <= tolerance}
    ran = [r for r in rows.values() if r["ran"]]
    return {"ok": bool(ran) and all(r["ok"] for r in ran), "backends": rows}


def check_bf16(device: torch.device, tiny: bool, sizes: Sizes) -> dict:
    """Each model's forward in bf16 autocast against float32: the outputs' agreement and the time ratio."""
    torch.manual_seed(0)
    side, batch = sizes.evad_image, sizes.evad_batch
    halting, dense = haltingvt(tiny)
    detector = tad(tiny)
    video_h = torch.randn(
        sizes.halting_batch, 3, 4 if tiny else 8, sizes.halting_image, sizes.halting_image, device=device
    )
    tad_video, tad_valid = tad_input(sizes, tiny, sizes.tad_frames, device)
    evad_video = torch.randn(batch, 3, 16, side, side, device=device)
    evad_sizes = torch.tensor([[side, side]] * batch, device=device)
    models = {
        "evad": (evad(tiny, 0.7).to(device), lambda m: m(evad_video, evad_sizes).action_logits[-1]),
        "haltingvt": (halting.to(device), lambda m: m.forward_compact(video_h).feature),
        "dense_vit": (dense.to(device), lambda m: m(video_h)),
        "tad_detector": (detector.to(device), lambda m: torch.cat(m(tad_video, tad_valid).cls_logits, 1)),
    }
    rows = {}
    for name, (model, run) in models.items():
        model.eval()

        def forward(bf16: bool, model=model, run=run) -> torch.Tensor:
            with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                return run(model).float()

        fp32, bf16 = forward(False), forward(True)
        cosine = F.cosine_similarity(fp32.flatten(), bf16.flatten(), dim=0).item()
        t = interleaved(
            {"fp32": timed(device, lambda f=forward: f(False)), "bf16": timed(device, lambda f=forward: f(True))},
            sizes.repeats, stat=min,
        )  # fmt: skip
        rows[name] = {"cosine": cosine, "ok": cosine > 0.98, "speedup": t["fp32"] / t["bf16"], **stability(t)}
    return {"ok": all(r["ok"] for r in rows.values()), "models": rows}


def check_roi_align(device: torch.device) -> dict:
    """EVAD's RoIAlign paths (per-box maxima, the pooled bins) against torchvision's kernel on the device."""
    from torchvision.ops import roi_align

    from models.roi_align import roi_align_boxes, roi_align_max

    torch.manual_seed(0)
    features = torch.randn(2, 3, 16, 14, 14, device=device)  # (B, S, C, H, W)
    boxes = torch.rand(2, 5, 4, device=device) * 200
    boxes[..., 2:] = boxes[..., :2] + 24 + torch.rand(2, 5, 2, device=device) * 100
    flat = features.flatten(0, 1)
    rois = torch.cat(
        [
            torch.arange(6, device=device).repeat_interleave(5)[:, None].float(),
            boxes.repeat_interleave(3, 0).flatten(0, 1),
        ],
        1,
    )
    reference = roi_align(flat, rois, 7, 1 / 16, -1, True).view(2, 3, 5, 16, 7, 7)
    errors = {}
    with torch.no_grad():
        for impl in ("auto", "torchvision", "separable"):
            pooled = roi_align_boxes(features, boxes, 7, 1 / 16, -1, True, impl)
            maxima = roi_align_max(features, boxes, 7, 1 / 16, -1, True, impl)
            errors[impl] = max(
                (pooled - reference).abs().max().item(),
                (maxima - reference.flatten(-2).max(-1).values).abs().max().item(),
            )
    return {"ok": all(e <= 1e-4 for e in errors.values()), "max_abs_error": errors}


def check_device_transforms(device: torch.device) -> dict:
    """The transforms the recipes leave to the device (``resize_on`` / ``augment_on: device``) run there against
    the loader's on the CPU, as grey levels: AVA's resize and flip (OpenCV's INTER_LINEAR in the loader), the
    Kinetics-style resize, crop and flip, a THUMOS window's resized crop and flip (torchvision's uint8 kernel in
    the loader). At most one level apart."""
    from datamodules.keyframes import collate_keyframes, resize_keyframe_batch, transform_keyframe_clip
    from datamodules.temporal_windows import TemporalTrainTransform
    from datamodules.transforms import TrainClipTransform, to_tchw

    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (4, 180, 320, 3), dtype=torch.uint8, generator=gen)
    diff = {}
    boxes = [torch.zeros(0, 4).numpy()]
    samples = {where: [] for where in ("loader", "device")}
    for where, out in samples.items():
        for flip in (False, True):
            clip, (b,), size = transform_keyframe_clip(frames, boxes, 144, flip, False, where)
            out.append({"video": clip, "boxes": b, "image_size": size, "orig_size": (180, 320)} | (
                {"flip": flip} if where == "device" else {}
            ))  # fmt: skip
    loader, batch = collate_keyframes(samples["loader"]), collate_keyframes(samples["device"])
    moved = [clip.to(device) for clip in batch["video"]]
    resized = resize_keyframe_batch(moved, batch["image_size"], batch["flip"].to(device), 32, False).cpu()
    diff["ava_resize"] = (resized.int() - loader["video"].int()).abs().max().item()
    torch.manual_seed(1)
    kinetics = TrainClipTransform(224, (256, 320), flip=True, randaugment_ops=0, photometric_on="device")
    plan = kinetics.plan(180, 320)
    expected = kinetics.on_device(frames.permute(3, 0, 1, 2), plan)  # on the CPU: the loader's clip
    got = kinetics.on_device(frames.permute(3, 0, 1, 2).to(device), plan).cpu()
    diff["kinetics_transform"] = (got.int() - expected.int()).abs().max().item()
    tad = TemporalTrainTransform(160, 182, randaugment_ops=0, color_jitter=None, photometric_on="device")
    plan = tad.plan(180, 320)
    crop = to_tchw(tad.crop(frames, plan))
    got = tad.geometry(crop.to(device), True).cpu()
    diff["tad_window_geometry"] = (got.int() - tad.geometry(crop, True).int()).abs().max().item()
    return {"ok": all(d <= 1 for d in diff.values()), "max_grey_level_difference": diff}


def check_ddp_fits(device: torch.device, sizes: Sizes, data_root: Path, out_dir: Path) -> dict:
    """A one-device DDP fit (NCCL on CUDA, gloo on the CPU) of each quickstart recipe through the CLI."""
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    roots = {
        "synthetic_dense_vit": "classification", "synthetic_haltingvt": "classification",
        "tad_synthetic": "temporal", "evad_synthetic": "ava",
    }  # fmt: skip
    rows = {}
    for recipe in QUICKSTARTS:
        args = [
            sys.executable, "-m", "lightning_modules", "fit", "--config", f"recipes/quickstart/{recipe}.yaml",
            f"--data.init_args.root={data_root / roots[recipe]}", "--data.init_args.num_workers=0",
            "--trainer.strategy=ddp", "--trainer.devices=1", f"--trainer.accelerator={accelerator}",
            "--trainer.max_epochs=1", f"--trainer.limit_train_batches={sizes.fit_batches}",
            "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
            "--trainer.logger=lightning_modules.runs.RunCSVLogger",
            f"--trainer.default_root_dir={out_dir / recipe}", "--model.init_args.pretrained=null",
        ]  # fmt: skip
        start = time.monotonic()
        # Without the SLURM variables of an enclosing allocation, whose task count would not match one device.
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        done = subprocess.run(
            args, cwd=REPO, capture_output=True, text=True, check=False, env={**env, "WANDB_MODE": "disabled"}
        )
        rows[recipe] = {"ok": done.returncode == 0, "seconds": round(time.monotonic() - start, 1)}
        if done.returncode:
            rows[recipe]["error"] = done.stderr[-1500:]
    return {"ok": all(r["ok"] for r in rows.values()), "recipes": rows}


# ------------------------------------------------------------------------------------------------- benchmarks


def bench_evad(device: torch.device, tiny: bool, sizes: Sizes) -> dict:
    """Inference clips/s at keep rate 0.7 vs 1.0 (same weights) and a training step's peak memory at each."""
    model = evad(tiny, 0.7).to(device).eval()
    side, batch = sizes.evad_image, sizes.evad_batch
    video = torch.randn(batch, 3, 16, side, side, device=device)
    image_sizes = torch.tensor([[side, side]] * batch, device=device)

    def at(rho: float) -> Callable[[], None]:
        def run() -> None:
            model.keep_rate = rho
            with (
                torch.inference_mode(),
                torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"),
            ):
                model(video, image_sizes)

        return timed(device, run)

    t = interleaved({"1.0": at(1.0), "0.7": at(0.7)}, sizes.repeats, stat=min)
    memory = {}
    for rho in (1.0, 0.7):
        train = evad(tiny, rho).to(device).train()
        labels = torch.zeros(1, train.num_classes, device=device)
        labels[0, 0] = 1.0
        box = torch.tensor([[0.1, 0.1, 0.6, 0.9]], device=device) * side
        targets = [{"boxes": box, "labels": labels} for _ in range(batch)]

        def step(train=train, targets=targets) -> None:
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                losses = train.loss(train(video, image_sizes), targets)
            losses["loss"].backward()

        memory[str(rho)] = peak_memory(device, step)
        del train
    saved = None if memory["1.0"] is None else 1 - memory["0.7"] / memory["1.0"]
    return {
        "throughput_ratio": t["1.0"] / t["0.7"], "paper_a100_ratio": 411 / 298,
        "clips_per_s": {k: batch / v for k, v in t.items()}, "train_memory_mib": memory,
        "train_memory_saved": saved, "paper_memory_saved": 0.47, **stability(t),
    }  # fmt: skip


def bench_haltingvt(device: torch.device, tiny: bool, sizes: Sizes) -> dict:
    """HaltingVT G05 with halted tokens removed vs the dense inflated ViT, inference, bf16 on CUDA."""
    halting, dense = (m.to(device).eval() for m in haltingvt(tiny))
    video = torch.randn(
        sizes.halting_batch, 3, 4 if tiny else 8, sizes.halting_image, sizes.halting_image, device=device
    )
    cuda = device.type == "cuda"

    def run(fn: Callable[[], Any]) -> Callable[[], None]:
        def call() -> None:
            with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=cuda):
                fn()

        return timed(device, call)

    t = interleaved({"dense": run(lambda: dense(video)), "removal": run(lambda: halting.forward_compact(video))},
                    sizes.repeats, stat=min)  # fmt: skip
    with torch.inference_mode():
        out = halting.forward_compact(video)
        gmacs = halting.macs(out.active, halting.token_grid(video.shape)).mean().item() / 1e9
    from models.flops import count_macs

    dense_gmacs = count_macs(dense, video[:1]) / 1e9
    return {
        "speedup": t["dense"] / t["removal"], "macs_ratio": dense_gmacs / gmacs, "halting_gmacs": gmacs,
        "dense_gmacs": dense_gmacs, **stability(t),
    }  # fmt: skip


def bench_blockdrop(device: torch.device, tiny: bool, sizes: Sizes) -> dict:
    """Latency of the detector with 1-3 blocks dropped against the whole one (the paper's first THUMOS drops;
    blocks 3, 2, 1 of the tiny one), beside the MACs ratios."""
    from benchmarks.tad import PAPER_DROPPED, progressively_dropped
    from models.flops import count_macs

    models = progressively_dropped(tad(tiny).eval(), (3, 2, 1) if tiny else PAPER_DROPPED)
    video, valid = tad_input(sizes, tiny, sizes.tad_frames, torch.device("cpu"))
    with torch.inference_mode():
        gmacs = [count_macs(m, video, valid) / 1e9 for m in models]
    models = [m.to(device) for m in models]
    video, valid = video.to(device), valid.to(device)

    def call(m: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            with (
                torch.inference_mode(),
                torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"),
            ):
                m(video, valid)

        return timed(device, run)

    t = interleaved({str(k): call(m) for k, m in enumerate(models)}, sizes.repeats, stat=min)
    return {
        "macs_ratio": [g / gmacs[0] for g in gmacs],
        "latency_ratio": [t[str(k)] / t["0"] for k in range(len(models))],
        "latency_ms": [1e3 * t[str(k)] for k in range(len(models))],
        "paper": {"macs_ratio": 0.761, "latency_ratio": 0.774},
        **stability(t),
    }


def bench_tad_training(device: torch.device, tiny: bool, sizes: Sizes) -> dict:
    """The recipe's LoRA training step (forward, backward) with and without activation checkpointing: seconds
    and peak device memory."""
    rows = {}
    video, valid = tad_input(sizes, tiny, sizes.tad_train_frames, device)
    for checkpointing in (False, True):
        model = tad(tiny, "lora", checkpointing).to(device).train()

        def step(model=model) -> None:
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                out = model(video, valid)
                loss = sum(c.float().square().mean() for c in out.cls_logits)
            loss.backward()

        step()  # the libraries' one-time workspaces are not the step's memory
        memory = peak_memory(device, step)
        t = interleaved({"step": timed(device, step)}, sizes.repeats, stat=min)
        rows["checkpointing" if checkpointing else "plain"] = {
            "seconds": t["step"],
            "memory_mib": memory,
            **stability(t),
        }
        del model
    return rows


# ------------------------------------------------------------------------------------------------- driver


def run(device: torch.device, tiny: bool, work: Path) -> dict:
    sizes = TINY if tiny else PAPER
    data = work / "data"
    subprocess.run(
        [sys.executable, "-m", "datamodules.synthetic", "--out", str(data), "--kind", "all"], cwd=REPO, check=True,
        capture_output=True,
    )  # fmt: skip
    steps: dict[str, Callable[[], dict]] = {
        "sdpa_backends": lambda: check_sdpa_backends(device),
        "bf16_vs_fp32": lambda: check_bf16(device, tiny, sizes),
        "roi_align": lambda: check_roi_align(device),
        "device_transforms": lambda: check_device_transforms(device),
        "ddp_fits": lambda: check_ddp_fits(device, sizes, data, work / "runs"),
        "evad": lambda: bench_evad(device, tiny, sizes),
        "haltingvt": lambda: bench_haltingvt(device, tiny, sizes),
        "blockdrop": lambda: bench_blockdrop(device, tiny, sizes),
        "tad_training": lambda: bench_tad_training(device, tiny, sizes),
    }
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "tiny": tiny, "sizes": asdict(sizes),
    }  # fmt: skip
    for name, step in steps.items():
        start = time.monotonic()
        try:
            results[name] = step()
        except Exception as e:  # noqa: BLE001 -- one failing step must not hide the others' figures
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
        results[name]["seconds_taken"] = round(time.monotonic() - start, 1)
        print(f"{name}: {summary(name, results[name])}", flush=True)
    results["ok"] = all(results[name].get("ok", True) for name in steps)
    return results


def summary(name: str, r: dict) -> str:
    """One line of the table."""
    if "error" in r:
        return f"FAILED {r['error'].splitlines()[0]}"
    if name == "sdpa_backends":
        ran = {k: f"{v['max_abs_error']:.1e}" for k, v in r["backends"].items() if v["ran"]}
        return f"{'ok' if r['ok'] else 'FAILED'}: max error vs math {ran}"
    if name == "bf16_vs_fp32":
        return ", ".join(
            f"{k} cos {v['cosine']:.4f} speed-up {v['speedup']:.2f}x" for k, v in r["models"].items()
        )
    if name == "roi_align":
        return f"{'ok' if r['ok'] else 'FAILED'}: {r['max_abs_error']}"
    if name == "device_transforms":
        return f"{'ok' if r['ok'] else 'FAILED'}: grey levels from the loader's {r['max_grey_level_difference']}"
    if name == "ddp_fits":
        return ", ".join(
            f"{k} {'ok' if v['ok'] else 'FAILED'} ({v['seconds']} s)" for k, v in r["recipes"].items()
        )
    if name == "evad":
        saved = r["train_memory_saved"]
        memory = "" if saved is None else f", training memory -{100 * saved:.0f}% (paper -47%)"
        return f"keep 0.7 vs 1.0 throughput {r['throughput_ratio']:.2f}x (paper A100 1.38x){memory}"
    if name == "haltingvt":
        return f"removal vs dense {r['speedup']:.2f}x for a MACs ratio of {r['macs_ratio']:.2f}x"
    if name == "blockdrop":
        pairs = zip(r["macs_ratio"][1:], r["latency_ratio"][1:], strict=True)
        return "; ".join(f"MACs x{m:.3f} latency x{t:.3f}" for m, t in pairs) + " (paper: x0.761 -> x0.774)"
    if name == "tad_training":
        plain, ckpt = r["plain"], r["checkpointing"]
        memory = (
            ""
            if plain["memory_mib"] is None
            else f", memory {plain['memory_mib']:.0f} -> {ckpt['memory_mib']:.0f} MiB"
        )
        return (
            f"step {plain['seconds']:.3f} s -> {ckpt['seconds']:.3f} s with activation checkpointing{memory}"
        )
    return json.dumps(r)[:200]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--tiny", action="store_true", help="tiny sizes on the CPU: every step runs, no figure means anything"
    )
    parser.add_argument("--out", default="runs/gpu_check.json", help="the JSON of every figure")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --tiny for the CPU check that every step runs")
    device = torch.device("cpu" if args.tiny else "cuda")
    with tempfile.TemporaryDirectory() as work:
        results = run(device, args.tiny, Path(work))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(
        f"{'all checks passed' if results['ok'] else 'SOME CHECKS FAILED'} on {results['device']}; written to {out}"
    )
    return results


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
