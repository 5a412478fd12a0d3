"""Evaluation metrics: exact under DDP padding, and equal to a direct computation."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from lightning_modules.metrics.classification import VideoClassificationScores, first_occurrences

NUM, CLASSES = 7, 6


def fixed_data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(NUM, CLASSES, generator=g).softmax(-1), torch.randint(0, CLASSES, (NUM,), generator=g)


def direct_topk(scores, targets, k):
    """Fraction of samples whose target is among the k highest scores, computed by hand."""
    return sum(int(t) in s.topk(k).indices.tolist() for s, t in zip(scores, targets)) / len(targets)


def test_first_occurrences():
    assert first_occurrences(torch.tensor([3, 1, 3, 2, 1, 0])).tolist() == [0, 1, 3, 5]


def test_topk_is_micro_over_samples():
    scores, targets = fixed_data()
    metric = VideoClassificationScores(CLASSES, top_k=(1, 5))
    metric.update(scores[:4], targets[:4], torch.arange(4))
    metric.update(scores[4:], targets[4:], torch.arange(4, NUM))
    metric.update(scores[:2], targets[:2], torch.arange(2))  # repeated samples must not count twice
    out = metric.compute()
    assert out["num_samples"] == NUM
    assert abs(out["top1"].item() - direct_topk(scores, targets, 1)) < 1e-6
    assert abs(out["top5"].item() - direct_topk(scores, targets, 5)) < 1e-6


def _rank(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    scores, targets = fixed_data()
    # The sampler Lightning inserts: pads 7 samples to 8 by repeating, so one sample is seen twice.
    idx = torch.tensor(list(DistributedSampler(range(NUM), num_replicas=world, rank=rank, shuffle=False)))
    metric = VideoClassificationScores(CLASSES, top_k=(1, 5))
    metric.update(scores[idx], targets[idx], idx)
    out = metric.compute()
    results[rank] = {k: v.item() for k, v in out.items()}
    dist.destroy_process_group()


def test_exact_under_ddp_padding():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    # Forked ranks: a spawned one would import torch and the metrics afresh, most of this test's time.
    mp.start_processes(_rank, args=(2, port, results), nprocs=2, join=True, start_method="fork")
    scores, targets = fixed_data()
    for rank in range(2):
        assert results[rank]["num_samples"] == NUM
        assert abs(results[rank]["top1"] - direct_topk(scores, targets, 1)) < 1e-6
        assert abs(results[rank]["top5"] - direct_topk(scores, targets, 5)) < 1e-6
