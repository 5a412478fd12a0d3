"""The assembled EVAD detector against hand-worked counts and targets, direct loops and part-by-part runs."""

from __future__ import annotations

import math
import time

import pytest
import torch

from models.context_decoder import ContextRefinementDecoder
from models.evad import EVAD, EVADOutput, default_tap_layers
from models.evad_flops import evad_gmacs
from models.query_localiser import LocaliserOutput, QueryLocaliser
from models.set_criterion import action_losses, action_targets
from models.vit import VideoMAEViT

CLASSES = 5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster than two fighting over shared cores (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_evad(keep_rate: float = 0.7, mean_pooling: bool = True, **kwargs) -> EVAD:
    """Width 32, depth 4 (pruning in blocks 1 and 2, every block tapped), 10 proposals, 2 stages, 2 decoder
    layers; the proposals span all four pyramid levels at 224 (sizes 0.1, 0.5, 1, 2 of the image)."""
    torch.manual_seed(0)
    backbone = VideoMAEViT(embed_dim=32, depth=4, num_heads=2, use_mean_pooling=mean_pooling)
    localiser = QueryLocaliser(
        num_proposals=10, hidden_dim=32, num_stages=2, num_heads=2, dim_dynamic=8, dim_feedforward=32
    )
    with torch.no_grad():
        localiser.proposal_boxes[:, 2:] = torch.tensor([0.1, 0.5, 1.0, 2.0]).repeat(3)[:10, None]
    decoder = ContextRefinementDecoder(
        CLASSES, encoder_dim=32, embed_dim=32, depth=2, num_heads=2, head_hidden_dim=32, drop_path_rate=0.0
    )
    options = {
        "keep_rate": keep_rate,
        "prune_layers": [1, 2],
        "tap_layers": [0, 1, 2, 3],
        "num_classes": CLASSES,
    }
    return EVAD(backbone, localiser, decoder, **{**options, **kwargs})


def clip(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 16, height, width, generator=torch.Generator().manual_seed(seed))


TARGETS = [
    {
        "boxes": torch.tensor([[20.0, 30.0, 120.0, 210.0], [100.0, 10.0, 200.0, 150.0]]),
        "labels": torch.tensor([[1.0, 0, 0, 1, 0], [0, 1, 0, 0, 0]]),
    },
    {"boxes": torch.tensor([[50.0, 40.0, 180.0, 190.0]]), "labels": torch.tensor([[0.0, 0, 1, 0, 1]])},
]


def sigmoid_bce(x: float, y: float) -> float:
    p = 1 / (1 + math.exp(-x))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


@pytest.mark.parametrize("keep_rate, counts", [(1.0, (1568, 1568)), (0.7, (1098, 769))])
def test_forward_backward_at_224_reaches_every_parameter(keep_rate, counts):
    model = tiny_evad(keep_rate).train()
    sizes = torch.tensor([[224, 224], [200, 224]])  # the second image padded at the bottom
    start = time.perf_counter()
    out = model(clip(2, 224, 224), sizes)
    # 1568 tokens on the 8x14x14 grid; ceil(0.7 * 1568) = 1098, ceil(0.7 * 1098) = ceil(768.6) = 769
    assert out.grid == (8, 14, 14)
    assert tuple(out.kept[i].shape[1] for i in (1, 2)) == counts
    if keep_rate == 1.0:  # nothing pruned: every position, in order
        for kept in out.kept.values():
            assert torch.equal(kept, torch.arange(1568).expand(2, -1))
    assert len(out.localiser.boxes) == 2 and len(out.action_logits) == 2
    assert all(x.shape == (2, 10, CLASSES) for x in out.action_logits)
    losses = model.loss(out, TARGETS)
    names = {f"stage{s}_{k}" for s in (0, 1) for k in ("class", "l1", "giou")} | {
        "action0",
        "action1",
        "loss",
    }
    assert set(losses) == names
    terms = [v for k, v in losses.items() if k != "loss"]
    torch.testing.assert_close(
        losses["loss"], sum(terms) / len(terms)
    )  # the official loop's mean of the terms
    losses["loss"].backward()
    elapsed = time.perf_counter() - start
    assert not model.backbone.fc_norm.weight.requires_grad  # clip pooling: not on the detector's path
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        if name == "decoder.mask_token" and keep_rate == 1.0:
            assert param.grad.abs().sum() == 0  # no dropped position to fill
        else:
            assert param.grad.abs().sum() > 0, name
    print(f"keep rate {keep_rate}: forward + loss + backward at 2x16x224x224, width 32: {elapsed:.2f} s")


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_evad(0.7, activation_checkpointing=checkpointing).train()
        out = model(clip(2, 64, 96, seed=3), torch.tensor([[64, 96], [64, 80]]))
        targets = [{"boxes": t["boxes"] * 0.3, "labels": t["labels"]} for t in TARGETS]
        model.loss(out, targets)["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_keep_rate_set_after_construction_changes_the_counts():
    model = tiny_evad(0.7).eval()
    video, sizes = clip(1, 64, 64), torch.tensor([[64, 64]])  # grid 8x4x4: 128 tokens, 16 on the keyframe
    # ceil arithmetic: 0.7 -> ceil(89.6) = 90, ceil(63.0) = 63; 0.5 -> 64, 32; 0.1 -> ceil(12.8) = 13 is fewer
    # than the 16 keyframe tokens, which always stay: 16, 16; 1.0 -> all 128
    for rate, counts in [(0.7, (90, 63)), (0.5, (64, 32)), (0.1, (16, 16)), (1.0, (128, 128))]:
        model.keep_rate = rate
        assert model.keep_rate == rate and all(model.pruning[i].keep_rate == rate for i in (1, 2))
        with torch.no_grad():
            out = model(video, sizes)
        assert (out.kept[1].shape[1], out.kept[2].shape[1]) == counts
        keyframe = torch.arange(64, 80)  # slice 4 of 8, 16 tokens each
        assert torch.isin(keyframe, out.kept[2][0]).all()


def test_action_targets_and_bce_on_a_hand_built_matching():
    matches = [
        (torch.tensor([3, 0]), torch.tensor([1, 0])),
        (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)),
        (torch.tensor([2]), torch.tensor([0])),
    ]
    labels = [torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]]), torch.zeros(0, 4), torch.tensor([[0.0, 0, 1, 1]])]
    targets, matched = action_targets(matches, labels, num_proposals=5)
    want = torch.zeros(3, 5, 4)
    want[0, 3] = torch.tensor([0.0, 1, 0, 0])  # proposal 3 <- actor 1
    want[0, 0] = torch.tensor([1.0, 0, 0, 1])  # proposal 0 <- actor 0
    want[2, 2] = torch.tensor([0.0, 0, 1, 1])
    assert torch.equal(targets, want)
    assert matched.nonzero().tolist() == [[0, 0], [0, 3], [2, 2]]

    logits = [torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    losses = action_losses(logits, targets, matched, weight=12.0)
    for layer, x in enumerate(logits):
        terms = [
            sigmoid_bce(x[b, p, c].item(), want[b, p, c].item())
            for b, p in matched.nonzero()
            for c in range(4)
        ]
        assert losses[f"action{layer}"].item() == pytest.approx(12.0 * sum(terms) / len(terms), rel=1e-5)

    x = torch.randn(2, 5, 4, requires_grad=True)
    empty = action_losses([x], torch.zeros(2, 5, 4), torch.zeros(2, 5, dtype=torch.bool), 12.0)["action0"]
    empty.backward()
    assert empty.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_action_loss_uses_the_last_box_stage_matching():
    model = tiny_evad(0.7).train()
    out = model(clip(2, 64, 96, seed=5), torch.tensor([[64, 96], [64, 96]]))
    targets = [
        {
            "boxes": torch.tensor([[5.0, 5.0, 40.0, 60.0], [50.0, 0.0, 90.0, 50.0]]),
            "labels": TARGETS[0]["labels"],
        },
        {"boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0]]), "labels": TARGETS[1]["labels"]},
    ]
    first = [(torch.tensor([0, 1]), torch.tensor([0, 1])), (torch.tensor([2]), torch.tensor([0]))]
    last = [(torch.tensor([4, 7]), torch.tensor([1, 0])), (torch.tensor([9]), torch.tensor([0]))]
    calls = iter([first, last])  # set_losses matches stage 0, then stage 1
    model.matcher = lambda *args: next(calls)
    losses = model.loss(out, targets)
    rows = [(0, 4, targets[0]["labels"][1]), (0, 7, targets[0]["labels"][0]), (1, 9, targets[1]["labels"][0])]
    for layer, x in enumerate(out.action_logits):
        terms = [sigmoid_bce(x[b, p, c].item(), y[c].item()) for b, p, y in rows for c in range(CLASSES)]
        assert losses[f"action{layer}"].item() == pytest.approx(12.0 * sum(terms) / len(terms), rel=1e-5)


def test_keyframe_maps_fed_to_the_pyramid_equal_a_direct_placement():
    model = tiny_evad(0.7).eval()
    taps, fed = {}, []
    for i, block in enumerate(model.backbone.blocks):
        block.register_forward_hook(lambda m, a, y, i=i: taps.__setitem__(i, y))
    model.pyramid.register_forward_pre_hook(lambda m, args: fed.append(args[0]))
    with torch.no_grad():  # 96 x 64: a 6 x 4 keyframe, so rows and columns cannot be confused
        out = model(clip(2, 96, 64, seed=2), torch.tensor([[96, 64], [90, 64]]))
    t, h, w = out.grid
    assert (t, h, w) == (8, 6, 4) and out.kept[1].shape[1] == math.ceil(0.7 * 192)
    start = (t // 2) * h * w
    maps = fed[0]
    assert len(maps) == 4
    for tap, got in zip([0, 1, 2, 3], maps):
        # block 0 prunes nothing; blocks 1 and 2 prune inside, so from block 1 on the tokens are the kept ones
        positions = torch.arange(t * h * w).expand(2, -1) if tap == 0 else out.kept[min(tap, 2)]
        want = torch.full((2, 32, h, w), float("nan"))
        for b in range(2):
            for j, pos in enumerate(positions[b].tolist()):
                if start <= pos < start + h * w:
                    row, col = divmod(pos - start, w)
                    want[b, :, row, col] = taps[tap][b, j]
        assert not want.isnan().any()
        assert torch.equal(got, want)


def test_given_boxes_are_classified_exactly_and_padding_is_kept_out():
    model = tiny_evad(0.7).eval()
    video, sizes = clip(2, 64, 96, seed=4), torch.tensor([[64, 96], [60, 96]])
    given = [
        torch.tensor([[4.0, 6.0, 40.0, 60.0], [50.0, 2.0, 90.0, 58.0]]),
        torch.tensor([[0.0, 0.0, 96.0, 60.0], [10.0, 10.0, 30.0, 50.0], [60.0, 20.0, 100.0, 70.0]]),
    ]
    with torch.no_grad():
        out = model(video, sizes, given)
        assert out.localiser is None
        assert out.box_mask.tolist() == [[True, True, False], [True, True, True]]
        assert torch.equal(out.boxes[0, :2], given[0]) and torch.equal(out.boxes[1], given[1])
        for i in range(2):  # each image alone, straight through the decoder: no padded actor took part
            tokens, _, _, grid = model.encode(video[i : i + 1], keyframe_maps=False)
            kept = model.pruning.kept
            want = model.decoder(tokens, given[i][None], sizes[i : i + 1], grid, kept)
            for got, ref in zip(out.action_logits, want):
                torch.testing.assert_close(got[i, : len(given[i])], ref[0], rtol=1e-4, atol=1e-5)
        assert torch.equal(out.action_logits[-1][0, 2], torch.zeros(CLASSES))
        detections = model.predict(out)
    assert [len(d.boxes) for d in detections] == [2, 3]
    torch.testing.assert_close(detections[0].boxes, given[0])
    clipped = torch.tensor([[0.0, 0.0, 96.0, 60.0], [10.0, 10.0, 30.0, 50.0], [60.0, 20.0, 96.0, 60.0]])
    torch.testing.assert_close(detections[1].boxes, clipped)
    torch.testing.assert_close(detections[1].action_scores, out.action_logits[-1][1].sigmoid())
    assert torch.equal(detections[0].person_scores, torch.ones(2))
    with pytest.raises(ValueError, match="inference-only"):
        model.loss(out, TARGETS)


def test_predict_thresholds_people_and_scores_actions():
    model = tiny_evad(0.7)
    people = torch.tensor([[0.9, 0.5, 0.75], [0.2, 0.3, 0.1]])  # image 1: none passes 0.7 -> all three
    person_logits = torch.stack(
        [people.log(), (1 - people).log()], dim=-1
    )  # softmax gives back the probabilities
    boxes = torch.tensor([[[1.0, 2.0, 30.0, 40.0], [0, 0, 10, 10], [-5.0, 5.0, 70.0, 50.0]]]).repeat(2, 1, 1)
    actions = torch.randn(2, 3, CLASSES, generator=torch.Generator().manual_seed(7))
    out = EVADOutput(
        LocaliserOutput([boxes], [person_logits], torch.zeros(2, 3, 8)), [actions * 0, actions], boxes,
        torch.ones(2, 3, dtype=torch.bool), {}, (8, 4, 4), torch.tensor([[48, 64], [48, 64]]),
    )  # fmt: skip
    detections = model.predict(out)
    assert detections[0].index.tolist() == [0, 2] and detections[1].index.tolist() == [0, 1, 2]
    torch.testing.assert_close(
        detections[0].boxes, torch.tensor([[1.0, 2.0, 30.0, 40.0], [0.0, 5.0, 64.0, 48.0]])
    )
    sig = actions.sigmoid()
    torch.testing.assert_close(detections[0].action_scores, sig[0, [0, 2]] * torch.tensor([[0.9], [0.75]]))
    torch.testing.assert_close(detections[1].person_scores, people[1])
    model.score = "action"
    torch.testing.assert_close(model.predict(out)[0].action_scores, sig[0, [0, 2]])


def test_pretrained_backbone_and_its_final_norm(tmp_path):
    torch.manual_seed(1)
    source = VideoMAEViT(embed_dim=32, depth=4, num_heads=2, use_mean_pooling=False)
    with torch.no_grad():
        source.norm.weight.uniform_(0.5, 1.5)
        source.norm.bias.normal_()
    path = tmp_path / "pretrain.pth"
    torch.save({"model": {f"encoder.{k}": v for k, v in source.state_dict().items()}}, path)
    model = tiny_evad(mean_pooling=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = model.load_pretrained(str(path))
    assert report.added == [] and not report.unexpected
    for key, value in source.state_dict().items():
        if not key.startswith("norm."):
            assert torch.equal(model.backbone.state_dict()[key], value), key
    # the checkpoint's final norm now runs inside the decoder; the backbone's is the identity
    assert isinstance(model.backbone.norm, torch.nn.Identity) and model.backbone.fc_norm is None
    assert torch.equal(model.decoder.norm.weight, source.norm.weight)
    assert torch.equal(model.decoder.norm.bias, source.norm.bias)
    # nothing outside the backbone and the decoder's norm changed
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("backbone.", "decoder.norm.")) for k in changed), sorted(changed)


def test_defaults_and_refusals():
    assert default_tap_layers(12) == (2, 5, 8, 11) and default_tap_layers(24) == (5, 11, 17, 23)
    with pytest.raises(ValueError, match="num_classes"):
        tiny_evad(num_classes=7)
    with pytest.raises(ValueError, match="box_extension"):
        tiny_evad(box_extension=(0.0, 0.0))
    with pytest.raises(ValueError, match="tap one block per pyramid level"):
        tiny_evad(tap_layers=[1, 2, 3])


def test_whole_detector_macs_at_keep_rate_07_within_5_percent_of_the_paper():
    start = time.perf_counter()
    parts = evad_gmacs(0.7)
    elapsed = time.perf_counter() - start
    print(f"EVAD ViT-B 16x224x224 keep rate 0.7: {parts} (paper 134.2), {elapsed:.1f} s")
    assert parts["total"] == pytest.approx(134.2, rel=0.05)


def test_bf16_autocast_forward_loss_backward():
    model = tiny_evad(0.7).train()
    sizes = torch.tensor([[64, 96], [64, 80]])
    targets = [{"boxes": t["boxes"] * 0.3, "labels": t["labels"]} for t in TARGETS]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(clip(2, 64, 96, seed=6), sizes)
        losses = model.loss(out, targets)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and losses["loss"].dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    detections = model.predict(out)
    assert len(detections) == 2
    assert all(((d.action_scores >= 0) & (d.action_scores <= 1)).all() for d in detections)
