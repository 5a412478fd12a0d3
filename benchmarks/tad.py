"""The temporal detector's benchmarks: the THUMOS VideoMAE-S detector's MACs against the block-drop paper, its
latency, the memory of a LoRA training step, and the block-drop MACs and latency ratios."""

from __future__ import annotations

import copy
import time

import torch

from benchmarks.measure import REPO, in_fresh_process, interleaved, peak_rss, stability

THUMOS_RECIPE = REPO / "recipes" / "tad_thumos_videomae_s.yaml"


THUMOS_CLASSES = 20


# The block-drop paper (CVPR 2025), VideoMAE-S on THUMOS14: 286.3 GMACs and 104.9 ms (GPU) uncompressed,
# 263.5 / 240.8 / 218.0 / 195.2 GMACs with 1-4 blocks dropped, i.e. 22.8 G per dropped block.
PAPER_GMACS, PAPER_BLOCK_GMACS, PAPER_LATENCY_MS = 286.3, 22.8, 104.9


# The input that reproduces the paper's MACs (see ``bench_tad_macs``): 12 chunks of 16 frames at 160x160.
PAPER_FRAMES = 192


def thumos_detector(
    finetune: str = "frozen",
    activation_checkpointing: bool = False,
    head_length: int | None = None,
    vit_overrides: dict | None = None,
):
    """The detector of ``recipes/tad_thumos_videomae_s.yaml`` with random weights, sizes read from the recipe.

    ``finetune="frozen"`` is the deployed model (merged LoRA costs what no LoRA costs); ``"lora"`` is the
    recipe's training set-up (LoRA rank 96 on qkv/proj, norms and patch embedding trainable). ``head_length``
    replaces the recipe's 768 head steps (backbone output and head ``max_seq_len``); ``vit_overrides`` the ViT's
    arguments (a narrow one for tiny checks).
    """
    import yaml

    from models.actionformer import ActionFormerHead
    from models.temporal_backbone import ChunkedVideoBackbone
    from models.temporal_detector import TemporalActionDetector
    from models.vit import VideoMAEViT

    model = yaml.safe_load(THUMOS_RECIPE.read_text())["model"]["init_args"]
    backbone_args = dict(model["backbone"]["init_args"])
    head_args = dict(model["head"]["init_args"])
    vit = VideoMAEViT(**{**backbone_args.pop("vit")["init_args"], **(vit_overrides or {})})
    backbone_args.update(finetune=finetune, activation_checkpointing=activation_checkpointing)
    if head_length is not None:
        backbone_args["head_length"] = head_args["max_seq_len"] = head_length
    backbone = ChunkedVideoBackbone(vit, **backbone_args)
    head = ActionFormerHead(backbone.embed_dim, THUMOS_CLASSES, **head_args)
    return TemporalActionDetector(backbone, head)


def _video(frames: int, device: str = "cpu") -> torch.Tensor:
    return torch.randn(1, 3, frames, 160, 160, device=device)


def bench_tad_macs() -> dict:
    """MACs (``models.flops.count_macs``) of the detector at 768 and 192 frames against the paper's 286.3 G.

    The 192-frame count runs the model; the 768-frame count runs it on the meta device (shapes only: no
    compute, no memory, the same operators for the counter; it agrees at 192 frames). Both are also
    checked against a sum of parts: one 16-frame chunk of the backbone times the number of chunks, plus the
    head on its 768 steps (chunks never see each other; interpolating the features to 768 steps costs no MAC).
    """
    from models.flops import count_macs

    torch.manual_seed(0)
    detector = thumos_detector().eval()
    backbone, head = detector.backbone, detector.head
    chunk, steps, dim = backbone.chunk_frames, backbone.head_length, backbone.embed_dim
    t, h, w = backbone.vit.token_grid((1, 3, chunk, 160, 160))
    chunk_gmacs = count_macs(backbone, _video(chunk)) / 1e9
    head_gmacs = count_macs(head, torch.randn(1, dim, steps), torch.ones(1, steps, dtype=torch.bool)) / 1e9
    block_gmacs = count_macs(backbone.vit.blocks[0], torch.randn(1, t * h * w, dim)) / 1e9
    meta = copy.deepcopy(detector).to("meta")
    window, short = 768, PAPER_FRAMES  # the recipe's window; a quarter of it
    direct = {
        window: count_macs(meta, _video(window, "meta")) / 1e9,
        short: count_macs(detector, _video(short)) / 1e9,
    }
    meta_short = count_macs(meta, _video(short, "meta")) / 1e9
    combined = {f: f // chunk * chunk_gmacs + head_gmacs for f in direct}
    per_block = {f: f // chunk * block_gmacs for f in direct}
    matched = min(direct, key=lambda f: abs(direct[f] - PAPER_GMACS))
    by_block = min(per_block, key=lambda f: abs(per_block[f] - PAPER_BLOCK_GMACS))
    # The recipe's head runs on 768 steps whatever the input; the paper's head length is not known, so a head
    # as long as the short input is counted beside it (the two bracket the paper's figure).
    short_head = thumos_detector(head_length=short).head.to("meta")
    mask = torch.ones(1, short, dtype=torch.bool, device="meta")
    short_head_gmacs = count_macs(short_head, torch.zeros(1, dim, short, device="meta"), mask) / 1e9
    error = direct[matched] / PAPER_GMACS - 1
    return {
        "what": (
            f"THUMOS VideoMAE-S detector MACs at 160x160: {direct[window]:.1f} G at {window} frames, "
            f"{direct[short]:.1f} G at {short}; paper {PAPER_GMACS} G -> the paper counted {matched} frames "
            f"({matched // chunk} chunks, {100 * error:+.1f}%; "
            f"{direct[short] - head_gmacs + short_head_gmacs:.1f} G with a {short}-step head); a block costs "
            f"{block_gmacs:.3f} G per chunk: {per_block[short]:.1f} G at {short} frames, "
            f"{per_block[window]:.1f} G at {window} (paper {PAPER_BLOCK_GMACS} G per dropped block -> "
            f"{by_block} frames); within 5%"
        ),
        "ours": direct[matched],
        "reference": PAPER_GMACS,
        "unit": "GMACs",
        "ratio": direct[matched] / PAPER_GMACS,
        "target": 1.0,
        "ok": abs(error) <= 0.05 and matched == by_block,
        "paper_frames": matched,
        f"gmacs_{window}_frames": direct[window],
        f"gmacs_{short}_frames": direct[short],
        f"gmacs_{short}_frames_meta_device": meta_short,
        "block_gmacs_per_chunk": block_gmacs,
        f"block_gmacs_{short}_frames": per_block[short],
        f"block_gmacs_{window}_frames": per_block[window],
        "paper_block_gmacs": PAPER_BLOCK_GMACS,
        "backbone_gmacs_per_chunk": chunk_gmacs,
        "head_gmacs_768_steps": head_gmacs,
        f"head_gmacs_{short}_steps": short_head_gmacs,
        "chunks_times_chunk_plus_head": {str(f): g for f, g in combined.items()},
        "sum_of_parts_matches_direct": all(abs(combined[f] - direct[f]) < 1e-6 for f in direct),
    }


#: The paper's MACs of the THUMOS VideoMAE-S detector with 0..3 blocks dropped, and its GPU latency ratio at 3.
PAPER_DROP_GMACS = (286.3, 263.5, 240.8, 218.0)


PAPER_LATENCY_RATIO_3 = 81.2 / 104.9


#: The block-drop paper's first three THUMOS drops (any three cost the same).
PAPER_DROPPED = (7, 10, 6)


def progressively_dropped(model: torch.nn.Module, dropped: tuple[int, ...]) -> list[torch.nn.Module]:
    """``model`` and copies of it with the first 1, 2, ... of ``dropped`` blocks removed from its backbone."""
    from models.blockdrop import drop_blocks

    models = [model]
    for k in range(1, len(dropped) + 1):
        copied = copy.deepcopy(model)
        drop_blocks(copied.backbone.vit, dropped[:k])
        models.append(copied)
    return models


def bench_blockdrop(frames: int, repeats: int, dropped: tuple[int, ...] = PAPER_DROPPED) -> dict:
    """Per dropped block of the THUMOS VideoMAE-S detector (``frames`` input frames, batch 1, CPU, float32): MACs
    and forward latency against the uncompressed model, beside the paper's MACs. The blocks dropped are the
    paper's first three THUMOS choices (any three cost the same). Target: each latency ratio within 5% of its
    MACs ratio (the paper: latency 0.774 at a MACs ratio of 0.761)."""
    from models.flops import count_macs

    torch.manual_seed(0)
    models = progressively_dropped(thumos_detector().eval(), dropped)
    video = _video(frames)
    valid = torch.ones(1, frames, dtype=torch.bool)
    with torch.inference_mode():
        gmacs = [count_macs(m, video, valid) / 1e9 for m in models]
        macs_ratio = [g / gmacs[0] for g in gmacs]

        def possible(times: dict[str, list[float]]) -> str | None:
            """Dropping blocks cannot save much more time than MACs: a latency ratio 10% under its MACs ratio means
            the full model's calls ran while the machine was busier."""
            for k in range(1, len(models)):
                latency = min(times[str(k)]) / min(times["0"])
                if latency < 0.9 * macs_ratio[k]:
                    return f"{k} dropped: latency ratio {latency:.3f} far under the MACs ratio {macs_ratio[k]:.3f}"
            return None

        t = interleaved(
            {str(k): (lambda m=m: m(video, valid)) for k, m in enumerate(models)}, repeats, stat=min, check=possible
        )
    latency_ratio = [t[str(k)] / t["0"] for k in range(len(models))]
    worst = max(abs(lr / mr - 1) for lr, mr in zip(latency_ratio[1:], macs_ratio[1:], strict=True))
    rows = "; ".join(
        f"{k} dropped: {gmacs[k]:.1f} G (paper {PAPER_DROP_GMACS[k]}), MACs x{macs_ratio[k]:.3f}, "
        f"latency x{latency_ratio[k]:.3f}"
        for k in range(len(models))
    )
    return {
        "what": f"block drop, THUMOS VideoMAE-S detector at {frames} frames, CPU: {rows}; worst latency/MACs gap "
        f"{100 * worst:.1f}% (target <= 5%)",
        "ours": latency_ratio[-1],
        "reference": macs_ratio[-1],
        "unit": "ratio",
        "ratio": 1 - worst,
        "target": 0.95,
        "gmacs": gmacs,
        "paper_gmacs": list(PAPER_DROP_GMACS),
        "macs_ratio": macs_ratio,
        "latency_ratio": latency_ratio,
        "latency_ms": [1e3 * t[str(k)] for k in range(len(models))],
        "paper_latency_ratio_3_blocks": PAPER_LATENCY_RATIO_3,
        "dropped": list(dropped),
        **stability(t),
    }


def bench_tad_latency(frames: int, repeats: int) -> dict:
    """CPU forward latency of the detector (inference, batch 1, float32, fused SDPA), min of ``repeats``."""
    torch.manual_seed(0)
    detector = thumos_detector().eval()
    video, valid = _video(frames), torch.ones(1, frames, dtype=torch.bool)
    with torch.inference_mode():
        timing = interleaved({"detector": lambda: detector(video, valid)}, repeats, stat=min)
    seconds = timing["detector"]
    return {
        "what": (
            f"THUMOS VideoMAE-S detector forward, batch 1, {frames}x160x160, float32 on "
            f"{torch.get_num_threads()} CPU threads, min of {repeats} (paper: {PAPER_LATENCY_MS} ms on a GPU)"
        ),
        "ours": 1000 * seconds,
        "reference": PAPER_LATENCY_MS,
        "unit": "ms",
        "ratio": None,
        "target": None,
        "frames": frames,
        "repeats": repeats,
        **stability(timing),
    }


def train_step_memory(frames: int, activation_checkpointing: bool) -> dict:
    """One LoRA training step (forward, losses, backward; float32, batch 1) of the detector on a ``frames``
    window: the peak RSS of this process over the step minus its RSS before it. Meant for a fresh process
    (``bench_tad_memory``), whose peak so far is the model's."""
    torch.manual_seed(0)
    detector = thumos_detector("lora", activation_checkpointing).train()
    video, valid = _video(frames), torch.ones(1, frames, dtype=torch.bool)
    steps = detector.backbone.head_length
    segments, labels = [torch.tensor([[0.1, 0.3], [0.5, 0.9]]) * steps], [torch.tensor([1, 4])]
    with peak_rss() as mem:
        start = time.perf_counter()
        detector.head.loss(detector(video, valid), segments, labels)["loss"].backward()
        seconds = time.perf_counter() - start
    return {"step_bytes": mem["peak"] - mem["before"], "before_bytes": mem["before"], "seconds": seconds}


def bench_tad_memory(frames: int) -> dict:
    """Peak memory of a LoRA training step on a ``frames`` window, without and with activation checkpointing.

    Each variant runs in a fresh process (``train_step_memory``): its peak RSS over the step minus its RSS
    before it (model and input). glibc is told to map every allocation of 64 KiB or more on its own
    (``MALLOC_MMAP_THRESHOLD_``), so a freed tensor leaves the RSS at once and the peak is that of live
    memory; by default blocks of up to 32 MB come from the heap, whose freed space stays resident, and the
    peak would also count fragmentation (about 2x for the checkpointed step).
    """
    steps = {
        checkpointing: in_fresh_process(
            "tad",
            f"train_step_memory({frames}, {checkpointing})",
            f"the {frames}-frame training step (activation_checkpointing={checkpointing}); if killed (-9), most "
            "likely out of memory: pass a smaller --tad-memory-frames",
        )
        for checkpointing in (False, True)
    }
    plain, checkpointed = (steps[c]["step_bytes"] / 2**20 for c in (False, True))
    return {
        "what": (
            f"peak memory of a LoRA training step (forward + backward, float32, batch 1) on a "
            f"{frames}x160x160 window: {checkpointed:.0f} MiB with activation checkpointing, {plain:.0f} MiB "
            f"without ({plain / checkpointed:.1f}x); peak RSS over the step, each in a fresh process"
        ),
        "ours": checkpointed,
        "reference": plain,
        "unit": "MiB",
        "ratio": plain / checkpointed,
        "target": None,
        "frames": frames,
        "step_mib_without_checkpointing": plain,
        "step_mib_with_checkpointing": checkpointed,
        "rss_before_step_mib": {
            c: steps[k]["before_bytes"] / 2**20 for c, k in (("without", False), ("with", True))
        },
        "step_seconds": {"without": steps[False]["seconds"], "with": steps[True]["seconds"]},
    }
