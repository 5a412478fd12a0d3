"""HaltingVT's benchmarks: inference with halted tokens removed against the dense model, and the compacted training
step against the masked one, each as a fraction of the MACs ratio."""

from __future__ import annotations

import torch

from benchmarks.measure import interleaved, stability


def calibrate_halting(model, video: torch.Tensor, target_gmacs: float, steps: int = 12) -> float:
    """Bisect ``halt_center`` so that the mean cost of ``video`` is ``target_gmacs``: random weights halt
    arbitrarily, this gives them the token-count spread of a trained model at that budget."""
    lo, hi = -20.0, 20.0
    grid = model.token_grid(video.shape)
    for _ in range(steps):
        model.halt_center = (lo + hi) / 2
        gmacs = model.macs(model.forward_compact(video).active, grid).mean().item() / 1e9
        lo, hi = (model.halt_center, hi) if gmacs < target_gmacs else (lo, model.halt_center)
    return gmacs


def calibrate_class_exit(model, video: torch.Tensor, target_layers: float, steps: int = 10) -> None:
    """Bisect channel 0 of the class token so that class tokens run ``target_layers`` joint layers on average:
    random weights never halt it before the last layer, a trained model does (its output is then final)."""
    lo, hi = -2.0, 2.0
    for _ in range(steps):
        with torch.no_grad():
            model.cls_token[..., 0] = (lo + hi) / 2
        depth = model.forward_compact(video).exit_depth.double().mean().item()
        lo, hi = (lo, (lo + hi) / 2) if depth < target_layers else ((lo + hi) / 2, hi)


def bench_haltingvt(
    batch: int, frames: int, image: int, glimpse_ratio: float, target_gmacs: float, repeats: int,
    class_exit: float = 0.6,
) -> dict:  # fmt: skip
    from models.flops import count_macs
    from models.haltingvt import HaltingViT
    from models.vit import InflatedViT

    torch.manual_seed(0)
    dense = InflatedViT(size="small", num_frames=frames, img_size=image).eval()
    halting = HaltingViT(size="small", num_frames=frames, img_size=image, glimpse_ratio=glimpse_ratio).eval()
    video = torch.randn(batch, 3, frames, image, image)
    with torch.inference_mode():
        gmacs = calibrate_halting(halting, video, target_gmacs)
        out = halting.forward_compact(video)
        grid = halting.token_grid(video.shape)
        per_sample = halting.macs(out.active, grid) / 1e9
        dense_gmacs = count_macs(dense, video[:1]) / 1e9
        t = interleaved(
            {
                "dense": lambda: dense(video),
                "removal": lambda: halting.forward_compact(video),
                # Halted tokens kept in the tensor, as the official code does (its Glimpser does drop tokens).
                "masked": lambda: halting.forward_masked(video),
            },
            repeats,
            stat=min,  # seconds-long compute-bound calls: the fastest run is the least disturbed one
        )
        # Early exit on its own model: class tokens set to halt at ``class_exit`` of the joint depth (random
        # weights never halt them early), the budget re-calibrated with them, then removal vs early exit.
        calibrate_class_exit(halting, video, class_exit * len(halting.joint_blocks))
        exit_gmacs = calibrate_halting(halting, video, target_gmacs)
        exited = halting.forward_compact(video, early_exit=True)
        early_gmacs = halting.macs(exited.active, grid).mean().item() / 1e9
        t_exit = interleaved(
            {
                "removal": lambda: halting.forward_compact(video),
                "early_exit": lambda: halting.forward_compact(video, early_exit=True),
            },
            repeats,
            stat=min,
        )
    flops_ratio = dense_gmacs / gmacs
    speedup = t["dense"] / t["removal"]
    return {
        "what": (
            f"HaltingVT G{round(10 * glimpse_ratio):02d} at {gmacs:.1f} GMACs vs dense DeiT-S, {frames}x{image}x{image},"
            f" batch {batch}: speedup "
            f"{speedup:.2f}x for a FLOPs ratio of {flops_ratio:.2f}x (ratio = speedup / FLOPs ratio); early exit "
            f"(class tokens set to halt after {exited.exit_depth.double().mean():.1f} of "
            f"{len(halting.joint_blocks)} joint layers on average) over removal alone: "
            f"{t_exit['removal'] / t_exit['early_exit']:.2f}x for executed MACs {exit_gmacs / early_gmacs:.2f}x"
        ),
        "ours_clips_per_s": batch / t["removal"],
        "reference_clips_per_s": batch / t["dense"],
        "ratio": speedup / flops_ratio,
        "target": 0.8,
        "speedup": speedup,
        "flops_ratio": flops_ratio,
        "dense_gmacs": dense_gmacs,
        "halting_gmacs": gmacs,
        "halting_gmacs_min_max": [per_sample.min().item(), per_sample.max().item()],
        "tokens_per_joint_layer": out.active.float().mean(0).tolist(),
        "masked_no_removal_speedup": t["dense"] / t["masked"],
        # Per-sample early exit (a sample stops when its class token halts) against removal alone, same budget;
        # the class tokens' exit layers are set (class_exit of the joint depth on average), not learnt.
        "early_exit_speedup": t_exit["removal"] / t_exit["early_exit"],
        "early_exit_macs_ratio": exit_gmacs / early_gmacs,
        "early_exit_ratio": (t_exit["removal"] / t_exit["early_exit"]) / (exit_gmacs / early_gmacs),
        "early_exit_gmacs": early_gmacs,
        "class_token_exit_layers": exited.exit_depth.tolist(),
        **stability(t, t_exit),
    }


def bench_haltingvt_train(
    batch: int, frames: int, image: int, glimpse_ratio: float, target_gmacs: float, repeats: int
) -> dict:
    """One HaltingVT training step (forward + backward + Adam) with halted tokens removed against the masked
    step, at ``halt_center`` bisected to ``target_gmacs``; the dense DeiT-S step is timed beside them."""
    import torch.nn.functional as F

    from models.haltingvt import HaltingViT
    from models.vit import InflatedViT

    torch.manual_seed(0)
    halting = HaltingViT(size="small", num_frames=frames, img_size=image, glimpse_ratio=glimpse_ratio)
    dense = InflatedViT(size="small", num_frames=frames, img_size=image)
    video, label = torch.randn(batch, 3, frames, image, image), torch.randint(0, 200, (batch,))
    with torch.inference_mode():
        gmacs = calibrate_halting(halting.eval(), video, target_gmacs)
    halting.train(), dense.train()
    heads = {name: torch.nn.Linear(384, 200) for name in ("halting", "dense")}
    opts = {
        "halting": torch.optim.Adam([*halting.parameters(), *heads["halting"].parameters()], lr=1e-5),
        "dense": torch.optim.Adam([*dense.parameters(), *heads["dense"].parameters()], lr=1e-5),
    }
    counts = {}

    def step(path: str) -> None:
        model, key = (dense, "dense") if path == "dense" else (halting, "halting")
        opts[key].zero_grad()
        if path == "dense":
            loss = F.cross_entropy(heads[key](dense(video)), label)
        else:
            out = (
                halting.forward_compact(video, losses=True)
                if path == "compact"
                else halting.forward_masked(video)
            )
            counts[path] = out.active
            loss = F.cross_entropy(heads[key](out.feature), label) + 5e-4 * out.ponder.mean()
        loss.backward()
        opts[key].step()

    t = interleaved({p: (lambda p=p: step(p)) for p in ("compact", "masked", "dense")}, repeats, stat=min)
    grid = halting.token_grid(video.shape)
    compact_macs = halting.macs(counts["compact"], grid).mean().item() / 1e9
    # The masked step runs every joint layer over every glimpsed token.
    full = torch.full_like(counts["masked"], int(counts["masked"][0, 0]))
    masked_macs = halting.macs(full, grid).mean().item() / 1e9
    macs_ratio = masked_macs / compact_macs
    speedup = t["masked"] / t["compact"]
    return {
        "what": (
            f"HaltingVT G{round(10 * glimpse_ratio):02d} training step (fwd+bwd+Adam, batch {batch}, {frames}x{image}"
            f"x{image}) at {compact_macs:.1f} GMACs/clip: tokens removed vs masked {speedup:.2f}x for a MACs ratio "
            f"of {macs_ratio:.2f}x (ratio = speedup / MACs ratio); vs the dense DeiT-S step "
            f"{t['dense'] / t['compact']:.2f}x"
        ),
        "ours_clips_per_s": batch / t["compact"],
        "reference_clips_per_s": batch / t["masked"],
        "ratio": speedup / macs_ratio,
        "target": 0.8,
        "speedup": speedup,
        "macs_ratio": macs_ratio,
        "compact_gmacs": compact_macs,
        "masked_gmacs": masked_macs,
        "speedup_vs_dense": t["dense"] / t["compact"],
        "calibrated_gmacs": gmacs,
        **stability(t),
    }
