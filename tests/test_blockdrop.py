"""Block drop on the shared core: removal, temporary removal for scoring, block taps, alignment losses."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from models.blockdrop import (
    ActivationSparsity,
    block_ids,
    choose_block,
    class_alignment,
    detector_alignment,
    drop_blocks,
    feature_alignment,
    prepare_recovery,
    segment_alignment,
    set_mlp_activation,
    without_blocks,
)
from models.checkpoint import CheckpointError, load_pretrained
from models.temporal_backbone import ChunkedVideoBackbone
from models.vit import VideoMAEViT


def tiny_vit(depth: int = 5) -> VideoMAEViT:
    torch.manual_seed(0)
    return VideoMAEViT(size=None, embed_dim=32, depth=depth, num_heads=2, img_size=32, num_frames=4).eval()


def skipping_forward(vit: VideoMAEViT, video: torch.Tensor, skip: set[int]) -> torch.Tensor:
    """The reference: the full model's own blocks, run in order except ``skip``."""
    x = vit.embed(video)
    for i, block in enumerate(vit.blocks):
        if i not in skip:
            x = block(x)
    return vit.norm(x)


def by_hand(vit: VideoMAEViT, video: torch.Tensor) -> dict[int, torch.Tensor]:
    """The reference: every block's output by original index, the blocks called one after another by hand."""
    x, out = vit.embed(video), {}
    for i, block in zip(vit.block_ids, vit.blocks, strict=True):
        x = out[i] = block(x)
    return out


def test_dropped_blocks_are_gone_and_the_rest_run_in_order():
    vit = tiny_vit()
    video = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        expected = skipping_forward(vit, video, {1, 3})
        drop_blocks(vit, [3, 1])
        out = vit.forward_features(video)
        assert block_ids(vit) == [0, 2, 4] and vit.depth == 3 and len(vit.blocks) == 3
        assert torch.equal(out, expected)
        drop_blocks(vit, [4])  # a later round names blocks by their original index
        assert block_ids(vit) == [0, 2]
        assert torch.equal(vit.forward_features(video), skipping_forward(tiny_vit(), video, {1, 3, 4}))
    assert sorted({k.split(".")[1] for k in vit.state_dict() if k.startswith("blocks.")}) == ["0", "1"]


@pytest.mark.parametrize(
    "ids,message", [([7], "not in the model"), ([1, 1], "repeat"), ([0, 1, 2, 3, 4], "no block")]
)
def test_drop_names_what_is_wrong(ids, message):
    with pytest.raises(ValueError, match=message):
        drop_blocks(tiny_vit(), ids)


def test_without_blocks_is_temporary():
    vit = tiny_vit()
    video = torch.randn(2, 3, 4, 32, 32)
    blocks = list(vit.blocks)
    with torch.no_grad():
        full = vit.forward_features(video)
        with without_blocks(vit, [2]):
            inside = vit.forward_features(video)
            assert block_ids(vit) == [0, 1, 3, 4]
        assert torch.equal(inside, skipping_forward(vit, video, {2}))
        assert torch.equal(vit.forward_features(video), full)
    assert all(a is b for a, b in zip(vit.blocks, blocks, strict=True)) and vit.depth == 5
    assert vit.block_ids == [0, 1, 2, 3, 4]
    drop_blocks(vit, [0])
    with without_blocks(vit, [4]):
        assert block_ids(vit) == [1, 2, 3]
    assert block_ids(vit) == [1, 2, 3, 4]


def test_recorded_outputs_and_taps_by_original_index_are_the_blocks_own():
    vit = tiny_vit()
    video = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        full = by_hand(vit, video)
        drop_blocks(vit, [1])
        kept = by_hand(vit, video)
        with vit.recording() as outputs:
            vit.forward_features(video)
        _, taps = vit.forward_blocks(vit.embed(video), taps=(0, 3))
    assert sorted(outputs) == [0, 2, 3, 4] and sorted(taps) == [0, 3]
    assert torch.equal(outputs[0], full[0])  # before the dropped block: the full model's output
    for index in [0, 2, 3, 4]:
        assert torch.equal(outputs[index], kept[index])
    assert torch.equal(taps[0], kept[0]) and torch.equal(taps[3], kept[3])
    assert vit._recording is None  # nothing recorded after the with


def test_block_outputs_of_micro_batched_chunks_are_whole():
    vit = tiny_vit(depth=3)
    video = torch.randn(2, 3, 8, 32, 32)  # 2 videos x 2 chunks of 4 frames
    whole = ChunkedVideoBackbone(
        copy.deepcopy(vit), chunk_frames=4, head_length=None, finetune="frozen"
    ).eval()
    parts = ChunkedVideoBackbone(
        vit, chunk_frames=4, head_length=None, finetune="frozen", chunk_batch=1
    ).eval()
    with torch.no_grad(), whole.vit.recording() as a, parts.vit.recording() as b:
        whole(video)
        parts(video)
    assert sorted(a) == sorted(b) == [0, 1, 2]
    for i in range(3):
        assert a[i].shape == (4, 2 * 2 * 2, 32)
        assert torch.allclose(a[i], b[i], atol=1e-6)


def test_feature_alignment_is_the_mean_blockwise_mse_at_the_same_original_index():
    torch.manual_seed(0)
    teacher = {i: torch.randn(2, 5, 4) for i in range(4)}
    student = {0: torch.randn(2, 5, 4), 3: torch.randn(2, 5, 4)}
    expected = (
        ((student[0] - teacher[0]) ** 2).sum() / student[0].numel()
        + ((student[3] - teacher[3]) ** 2).sum() / student[3].numel()
    ) / 2
    assert torch.isclose(feature_alignment(student, teacher), expected)
    assert feature_alignment(teacher, teacher) == 0
    with pytest.raises(KeyError, match="no output for blocks \\[5\\]"):
        feature_alignment({5: torch.zeros(1)}, teacher)


def test_class_alignment_is_hintons_kd_loss():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    t = 3.5
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        zs = sum(math.exp(v / t) for v in s_row)
        zt = sum(math.exp(v / t) for v in t_row)
        for s, q in zip(s_row, t_row, strict=True):
            p_t, p_s = math.exp(q / t) / zt, math.exp(s / t) / zs
            total += p_t * (math.log(p_t) - math.log(p_s))
    expected = total / 6 * t * t
    assert abs(class_alignment(student, teacher, t).item() - expected) < 1e-5
    # (B, points, C) is the same as its rows flattened; identical scores cost nothing.
    assert torch.isclose(
        class_alignment(student.view(2, 3, 5), teacher.view(2, 3, 5), t), torch.tensor(expected), atol=1e-5
    )
    assert class_alignment(teacher, teacher).abs() < 1e-6


def test_segment_alignment_is_the_mean_diou_at_positive_points():
    student = torch.tensor([[[0.0, 4.0], [1.0, 2.0], [5.0, 9.0]]], requires_grad=True)
    teacher = torch.tensor([[[2.0, 6.0], [7.0, 8.0], [5.0, 9.0]]])
    positive = torch.tensor([[True, False, True]])
    # [0, 4] vs [2, 6]: IoU 2/6, centres 2 apart in a 6-long hull -> 1 - 1/3 + 4/36; identical segments -> 0.
    expected = (1 - 1 / 3 + 4 / 36 + 0.0) / 2
    loss = segment_alignment(student, teacher, positive)
    assert abs(loss.item() - expected) < 1e-6
    none = segment_alignment(student, teacher, torch.zeros(1, 3, dtype=torch.bool))
    none.backward()  # no positive point: zero, and still differentiable
    assert none.item() == 0 and student.grad is not None


def test_detector_alignment_reads_every_valid_point_of_every_level():
    from models.actionformer import ActionFormerOutputs

    torch.manual_seed(0)

    def outputs(scale: float) -> ActionFormerOutputs:
        logits = [torch.randn(2, 8, 3) * scale, torch.randn(2, 4, 3) * scale]
        offsets = [torch.rand(2, 8, 2) * 2, torch.rand(2, 4, 2) * 2]
        masks = [torch.arange(8).expand(2, 8) < 6, torch.arange(4).expand(2, 4) < 3]
        points = [torch.arange(8.0), torch.arange(4.0) * 2]
        return ActionFormerOutputs(logits, offsets, masks, points, (1, 2))

    student, teacher = outputs(1.0), outputs(2.0)
    positive = torch.zeros(2, 12, dtype=torch.bool)
    positive[:, [1, 9, 11]] = True  # point 11 lies in the padded tail: not aligned
    terms = detector_alignment(student, teacher, positive, temperature=2.0)
    valid = torch.cat(student.masks, 1)
    rows_s = torch.cat(student.cls_logits, 1)[valid]
    rows_t = torch.cat(teacher.cls_logits, 1)[valid]
    assert rows_s.shape == (2 * (6 + 3), 3)
    assert torch.isclose(terms["class_kl"], class_alignment(rows_s, rows_t, 2.0))
    keep = positive & valid
    expected = segment_alignment(student.segments(), teacher.segments(), keep)
    assert keep.sum() == 4 and torch.isclose(terms["segment_diou"], expected)


def test_a_compressed_backbone_is_rebuilt_from_its_dropped_blocks(tmp_path):
    """The layout the TAD commands load a compressed model into: the ViT built with ``drop_blocks``."""
    video = torch.randn(1, 3, 8, 32, 32)
    compressed = ChunkedVideoBackbone(tiny_vit(), chunk_frames=4, head_length=None, finetune="lora").eval()
    drop_blocks(compressed.vit, [1, 3])
    tiny = {"size": None, "embed_dim": 32, "depth": 5, "num_heads": 2, "img_size": 32, "num_frames": 4}
    rebuilt = ChunkedVideoBackbone(
        VideoMAEViT(**tiny, drop_blocks=[1, 3]), chunk_frames=4, head_length=None, finetune="lora"
    ).eval()
    rebuilt.load_state_dict(compressed.state_dict())  # strict: the same keys
    assert block_ids(rebuilt.vit) == [0, 2, 4]
    with torch.no_grad():
        assert torch.equal(rebuilt(video), compressed(video))
    # An uncompressed pretrained file gives a compressed ViT the weights of its kept blocks.
    full = tiny_vit()
    torch.save({"module": full.state_dict()}, tmp_path / "full.pth")
    pretrained = ChunkedVideoBackbone(
        VideoMAEViT(**tiny, drop_blocks=[1, 3]), chunk_frames=4, head_length=None, finetune="frozen"
    ).eval()
    pretrained.load_pretrained(str(tmp_path / "full.pth"))
    for position, index in enumerate([0, 2, 4]):
        mine, theirs = pretrained.vit.blocks[position].state_dict(), full.blocks[index].state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    # The last blocks dropped: the first ones of the file, not a refusal for its depth.
    trailing = VideoMAEViT(**tiny, drop_blocks=[3, 4])
    load_pretrained(trailing, tmp_path / "full.pth")
    assert trailing.block_ids == [0, 1, 2]
    assert torch.equal(trailing.blocks[2].mlp.fc1.weight, full.blocks[2].mlp.fc1.weight)
    # A ViT built shallower (not compressed) still refuses a deeper file.
    with pytest.raises(CheckpointError, match="the checkpoint has 5 blocks but VideoMAEViT has 3"):
        load_pretrained(VideoMAEViT(**{**tiny, "depth": 3}), tmp_path / "full.pth")


# ------------------------------------------------------------------------------ recovery against a teacher


def logs_of(task) -> dict[str, float]:
    """What the task logs, as floats, without a trainer."""
    logged: dict[str, float] = {}
    task.log = lambda name, value, **kw: logged.__setitem__(name, float(value.detach()))
    task.log_dict = lambda d, **kw: logged.update({k: float(v.detach()) for k, v in d.items()})
    return logged


def tiny_classifier():
    from lightning_modules.tasks.classification import VideoClassifier

    return VideoClassifier(tiny_vit(), num_classes=4).train()


def test_classifier_recovery_adds_the_weighted_alignment_terms():
    from lightning_modules.compression.task import Alignment

    teacher = tiny_classifier()
    student = copy.deepcopy(teacher)
    drop_blocks(student.backbone, [2])
    batch = {"video": torch.randn(3, 3, 4, 32, 32), "label": torch.tensor([0, 1, 3]), "batch_size": 3}
    alignment = Alignment(feature=0.5, prediction=2.0, temperature=2.0)
    student.set_teacher(teacher, alignment)
    logged = logs_of(student)
    loss = student.training_step(batch, 0)
    loss.backward()
    # Reference: the same quantities from separate forwards.
    with torch.no_grad():
        student.eval()  # no dropout in these tiny models: train and eval agree
        s_logits, t_logits = student(batch["video"]), teacher(batch["video"])
        s_taps = by_hand(student.backbone, batch["video"])
        t_taps = by_hand(teacher.backbone, batch["video"])
    ce = torch.nn.functional.cross_entropy(s_logits, batch["label"])
    assert sorted(s_taps) == [0, 1, 3, 4]
    mse = sum(torch.nn.functional.mse_loss(s_taps[i], t_taps[i]) for i in s_taps) / 4
    kl = class_alignment(s_logits, t_logits, 2.0)
    assert abs(logged["train/align_feature_mse"] - 0.5 * mse.item()) < 1e-6
    assert abs(logged["train/align_class_kl"] - 2.0 * kl.item()) < 1e-6
    assert abs(loss.item() - (ce + 0.5 * mse + 2.0 * kl).item()) < 1e-5
    assert all(p.grad is None for p in teacher.parameters())  # the teacher only answers
    assert not any(k.startswith("teacher") or "_teacher" in k for k in student.state_dict())
    # Switched off terms are not computed; without a teacher the loss is the task's own.
    student.set_teacher(teacher, Alignment(feature=0.0, prediction=0.0))
    logged.clear()
    student.training_step(batch, 0)
    assert not any(k.startswith("train/align_") for k in logged)
    student.set_teacher(None)
    assert abs(student.training_step(batch, 0).item() - ce.item()) < 1e-5


def test_alignment_weights_are_checked():
    from lightning_modules.compression.task import Alignment

    with pytest.raises(ValueError, match="feature must be >= 0"):
        Alignment(feature=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        Alignment(temperature=0.0)


def test_detector_recovery_aligns_features_scores_and_segments():
    from lightning_modules.compression.task import Alignment
    from lightning_modules.tasks.temporal_detection import TemporalActionDetection
    from models.actionformer import ActionFormerHead

    def head(dim: int, classes: int) -> ActionFormerHead:
        return ActionFormerHead(dim, classes, embed_dim=16, num_heads=2, max_seq_len=64, head_channels=16,
                                drop_path=0.0)  # fmt: skip

    backbone = ChunkedVideoBackbone(tiny_vit(depth=4), chunk_frames=4, head_length=64, finetune="lora")
    teacher = TemporalActionDetection(backbone, head, num_classes=3)
    student = copy.deepcopy(teacher)
    drop_blocks(student.block_stack(), [1])
    torch.manual_seed(1)
    batch = {
        "video": torch.randn(2, 3, 16, 32, 32), "valid": torch.ones(2, 16, dtype=torch.bool),
        "segments": [torch.tensor([[2.0, 9.0]]), torch.tensor([[0.0, 5.0], [8.0, 15.0]])],
        "labels": [torch.tensor([1]), torch.tensor([0, 2])], "batch_size": 2,
    }  # fmt: skip
    student.set_teacher(teacher, Alignment(feature=1.0, prediction=1.0, segment=3.0))
    logged = logs_of(student)
    student.train()
    loss = student.training_step(batch, 0)
    loss.backward()
    assert {"train/align_feature_mse", "train/align_class_kl", "train/align_segment_diou"} <= set(logged)
    # Reference from separate forwards (eval mode: no dropout or drop path in these models).
    student.eval()
    with torch.no_grad():
        s_out, t_out = student(batch["video"], batch["valid"]), teacher(batch["video"], batch["valid"])
        segments = [s * 64 / 16 for s in batch["segments"]]
        cls_targets, _ = student.detector.head.targets(s_out, segments, batch["labels"])
        positive = cls_targets.sum(-1) > 0
        terms = detector_alignment(s_out, t_out, positive, 3.5)
    assert positive.any() and terms["segment_diou"] > 0
    assert abs(logged["train/align_class_kl"] - terms["class_kl"].item()) < 1e-5
    assert abs(logged["train/align_segment_diou"] - 3.0 * terms["segment_diou"].item()) < 1e-5
    task_loss = logged["train/cls_loss"] + logged["train/reg_loss"]
    aligned = sum(v for k, v in logged.items() if k.startswith("train/align_"))
    assert abs(loss.item() - task_loss - aligned) < 1e-4
    lora = [p for n, p in student.named_parameters() if "lora_B" in n]
    assert lora and all(p.grad is not None for p in lora)


# ------------------------------------------------------------------------------ scoring and recovery set-up


def classifier_batches(n: int = 2) -> list[dict]:
    torch.manual_seed(3)
    return [
        {"video": torch.randn(2, 3, 4, 32, 32), "label": torch.randint(0, 4, (2,)), "batch_size": 2}
        for _ in range(n)
    ]


def test_train_loss_and_feature_mse_scores_match_separately_dropped_models():
    from lightning_modules.compression.scoring import score_candidates

    task = tiny_classifier()
    batches = classifier_batches()
    losses = score_candidates(task, "train_loss", batches=batches, progress=False)
    mses = score_candidates(task, "feature_mse", candidates=[1, 4], batches=batches, progress=False)
    assert task.training and block_ids(task.backbone) == [0, 1, 2, 3, 4]  # left as it was
    for block in range(5):
        other = copy.deepcopy(task).eval()
        drop_blocks(other.backbone, [block])
        with torch.no_grad():
            expected = sum(
                torch.nn.functional.cross_entropy(other(b["video"]), b["label"]).item() for b in batches
            ) / len(batches)
            assert abs(losses[block] - expected) < 1e-5
            if block in mses:
                diffs = []
                for b in batches:
                    full = by_hand(task.backbone, b["video"])[4]
                    dropped = by_hand(other.backbone, b["video"])[4 if block != 4 else 3]
                    diffs.append(((dropped - full) ** 2).mean().item())
                assert abs(mses[block] - sum(diffs) / len(diffs)) < 1e-6
    assert sorted(mses) == [1, 4] and all(v > 0 for v in mses.values())


def test_map_scoring_evaluates_each_candidate_without_its_block():
    from lightning_modules.compression.scoring import score_candidates

    task = tiny_classifier()
    drop_blocks(task.backbone, [0])
    seen = []

    def evaluate(t) -> float:
        ids = block_ids(t.block_stack())
        seen.append(ids)
        return 10.0 - len(ids) + (0.5 if 3 not in ids else 0.0)  # best when block 3 is the one left out

    scores = score_candidates(task, "map", evaluate=evaluate, progress=False)
    assert seen == [[2, 3, 4], [1, 3, 4], [1, 2, 4], [1, 2, 3]]
    assert choose_block(scores, higher_is_better=True) == 3
    assert block_ids(task.backbone) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="needs evaluate"):
        score_candidates(task, "map")


def test_choice_breaks_ties_towards_the_lowest_index():
    assert choose_block({5: 0.3, 2: 0.3, 7: 0.1}, higher_is_better=True) == 2
    assert choose_block({5: 0.1, 2: 0.3, 7: 0.1}, higher_is_better=False) == 5


def test_recovery_trains_lora_norms_patch_embedding_and_head_only():
    task = tiny_classifier()
    stack = task.block_stack()
    video = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        before = task.eval()(video)
    trainable = prepare_recovery(task, stack, "lora")
    names = {n for n, p in task.named_parameters() if p.requires_grad}
    assert {p.data_ptr() for p in trainable} == {p.data_ptr() for p in task.parameters() if p.requires_grad}
    for name in names:
        assert "lora_" in name or "norm" in name or name.startswith(("backbone.patch_embed", "head.")), name
    assert any("lora_A" in n for n in names) and "backbone.blocks.0.norm1.weight" in names
    assert "backbone.blocks.0.attn.qkv.base_layer.weight" not in names and "backbone.fc_norm.weight" in names
    assert not any(n.startswith("backbone.blocks.0.mlp") for n in names)
    lora_b = [p for n, p in task.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 2 * 5 and lora_b[0].shape[1] == 32 // 4  # qkv and proj of 5 blocks, rank dim/4
    with torch.no_grad():
        assert torch.allclose(task(video), before, atol=1e-6)  # fresh LoRA changes nothing
        for p in lora_b:
            p.normal_(std=0.1)
        adapted = task(video)
    # A second round merges the trained LoRA first (same function), then adds a fresh one.
    prepare_recovery(task, stack, "lora", head_trainable=False)
    with torch.no_grad():
        assert torch.allclose(task(video), adapted, atol=1e-5)
    assert not any(p.requires_grad for p in task.head.parameters())
    assert all(not p.any() for n, p in task.named_parameters() if "lora_B" in n)


def test_recovery_modes_full_and_none_and_the_unused_pooling_norm():
    task = tiny_classifier()
    prepare_recovery(task, task.backbone, "full")
    assert all(p.requires_grad for p in task.parameters())
    prepare_recovery(task, task.backbone, "none")
    assert [n for n, p in task.named_parameters() if p.requires_grad] == ["head.1.weight", "head.1.bias"]
    detector_backbone = ChunkedVideoBackbone(tiny_vit(), chunk_frames=4, head_length=None, finetune="lora")
    holder = torch.nn.ModuleDict({"backbone": detector_backbone, "head": torch.nn.Linear(32, 2)})
    for mode in ("lora", "full"):
        prepare_recovery(holder, detector_backbone.vit, mode)
        assert not detector_backbone.vit.fc_norm.weight.requires_grad  # the TAD path never runs it
    with pytest.raises(ValueError, match="recovery mode"):
        prepare_recovery(holder, detector_backbone.vit, "partial")


def test_relu_mlps_and_their_activation_sparsity():
    """With ReLU a block computes fc2(relu(fc1(.))) (checked by hand), and its MLP hidden activations are exactly
    zero where fc1's output is <= 0: the reference counts those from fc1's outputs, captured by hooks of its own."""
    vit = tiny_vit(depth=3)
    video = torch.randn(2, 3, 4, 32, 32)
    set_mlp_activation(vit, "relu")
    assert all(isinstance(b.mlp.act, torch.nn.ReLU) for b in vit.blocks)
    fc1_outputs = []
    handles = [b.mlp.fc1.register_forward_hook(lambda m, a, out: fc1_outputs.append(out)) for b in vit.blocks]
    with torch.no_grad():
        x = vit.embed(video)
        block = vit.blocks[0]
        y = x + block.attn(block.norm1(x))[0]
        by_hand = y + block.mlp.fc2(torch.relu(block.mlp.fc1(block.norm2(y))))
        assert torch.allclose(block(x), by_hand, atol=1e-5)
        fc1_outputs.clear()
        with ActivationSparsity(vit) as counted:
            vit.forward_features(video)
            vit.forward_features(video[:1])
    for h in handles:
        h.remove()
    assert len(fc1_outputs) == 6
    assert counted.total == sum(h.numel() for h in fc1_outputs)
    assert counted.zeros == sum(int((h <= 0).sum()) for h in fc1_outputs)
    assert 0.2 < counted.ratio < 0.8  # about half of a random layer's pre-activations are negative
    # GELU (the model as built) is zero only where it underflows: none of these.
    with torch.no_grad(), ActivationSparsity(set_mlp_activation(vit, "gelu")) as gelu:
        vit.forward_features(video)
    assert gelu.total == counted.total * 2 // 3 and gelu.zeros == 0
    with pytest.raises(ValueError, match="gelu"):
        set_mlp_activation(vit, "swish")
