"""Official trained models (EVAD, HaltingVT, OpenTAD AdaTAD / ActionFormer) load strictly into our models.

Each test writes a file in the official layout, derived here from one of our models by the inverse of the naming
rules read in the official code (written out below, independently of ``models.official_weights``), with the
wrappers the official files have (PySlowFast ``model_state``, mmengine ``state_dict``, OpenTAD ``module.`` +
``state_dict_ema``). Loaded into a second model, it must give the first model's outputs: the first model, whose
weights were set directly, is the reference. A hand-written list of official key names and shapes for each paper
configuration, read from the official constructors, checks the inverse rules themselves.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from datamodules.synthetic import generate_temporal
from lightning_modules.__main__ import run
from lightning_modules.cli import main as cli_main
from lightning_modules.tasks.haltingvt import HaltingVTClassifier
from lightning_modules.tasks.temporal_detection import TemporalActionDetection
from lightning_modules.tools.convert_checkpoint import recipe_parser
from models.actionformer import ActionFormerHead
from models.checkpoint import CheckpointError
from models.context_decoder import ContextRefinementDecoder
from models.evad import EVAD
from models.haltingvt import HaltingViT
from models.official_weights import convert, detect_layout, load_official
from models.query_localiser import QueryLocaliser, SimpleFeaturePyramid
from models.temporal_backbone import ChunkedVideoBackbone
from models.temporal_detector import TemporalActionDetector
from models.vit import VideoMAEViT
from tests.quick import tiny_tad

# ------------------------------------------------------------------ the official layouts, ours -> theirs

#: EVAD (projects/evad/models: vit_model.py, e2e_detector.py, head_helper.py), PySlowFast's model_state.
EVAD_FROM_OURS = [
    (r"backbone\.(.*)", r"\1"),
    (r"decoder\.norm\.(.*)", r"norm.\1"),
    (r"pyramid\.lateral_convs\.(\d)\.(.*)", lambda m: f"fpn_lateral{int(m[1]) + 2}.{m[2]}"),
    (r"pyramid\.output_convs\.(\d)\.(.*)", lambda m: f"fpn_output{int(m[1]) + 2}.{m[2]}"),
    (r"localiser\.proposal_boxes", "init_proposal_boxes.weight"),
    (r"localiser\.proposal_features", "init_proposal_features.weight"),
    (r"localiser\.stages\.(\d+)\.dynamic_conv\.(.*)", r"det_head.s0_headseries.\1.inst_interact.\2"),
    (r"localiser\.stages\.(\d+)\.class_tower\.(.*)", r"det_head.s0_headseries.\1.cls_module.\2"),
    (r"localiser\.stages\.(\d+)\.box_tower\.(.*)", r"det_head.s0_headseries.\1.reg_module.\2"),
    (r"localiser\.stages\.(\d+)\.box_deltas\.(.*)", r"det_head.s0_headseries.\1.bboxes_delta.\2"),
    (r"localiser\.stages\.(\d+)\.(.*)", r"det_head.s0_headseries.\1.\2"),
    (r"decoder\.(encoder_to_decoder\.weight|mask_token)", r"det_head.\1"),
    (r"decoder\.heads\.(\d+)\.([01])\.(.*)", r"det_head.decoder.blocks.\1.act_module.\2.\3"),
    (r"decoder\.heads\.(\d+)\.3\.(.*)", r"det_head.decoder.blocks.\1.action_logits.\2"),
    (r"decoder\.blocks\.(.*)", r"det_head.decoder.blocks.\1"),
]
#: HaltingVT (models/backbones/haltingvt_model.py, models/heads/haltingvt_head.py), mmaction2's recognizer.
HALTINGVT_FROM_OURS = [
    (r"backbone\.(.*)", r"backbone.model.\1"),
    (r"head\.1\.(.*)", r"cls_head.fc_cls.\1"),
    (r"motion_head\.(.*)", r"cls_head.fc_motion.\1"),
]
#: OpenTAD (opentad/models: backbones/vit_adapter.py in mmaction's Recognizer3D in BackboneWrapper,
#: projections/actionformer_proj.py, bricks/transformer.py, necks/fpn.py, dense_heads/anchor_free_head.py).
OPENTAD_FROM_OURS = [
    (r"backbone\.vit\.patch_embed\.proj\.(.*)", r"backbone.model.backbone.patch_embed.projection.\1"),
    (r"backbone\.vit\.blocks\.(\d+)\.mlp\.fc1\.(.*)", r"backbone.model.backbone.blocks.\1.mlp.layers.0.0.\2"),
    (r"backbone\.vit\.blocks\.(\d+)\.mlp\.fc2\.(.*)", r"backbone.model.backbone.blocks.\1.mlp.layers.1.\2"),
    (r"backbone\.vit\.(.*)", r"backbone.model.backbone.\1"),
    (r"head\.embed\.(.*)", r"projection.embed.\1"),
    (r"head\.(stem|branch)\.(\d+)\.norm1\.(.*)", r"projection.\1.\2.ln1.\3"),
    (r"head\.(stem|branch)\.(\d+)\.norm2\.(.*)", r"projection.\1.\2.ln2.\3"),
    (r"head\.(stem|branch)\.(\d+)\.attn\.(query|key|value)_conv\.weight", r"projection.\1.\2.attn.\3_conv.conv.weight"),
    (r"head\.(stem|branch)\.(\d+)\.mlp\.fc1\.(.*)", r"projection.\1.\2.mlp.0.\3"),
    (r"head\.(stem|branch)\.(\d+)\.mlp\.fc2\.(.*)", r"projection.\1.\2.mlp.3.\3"),
    (r"head\.(stem|branch)\.(.*)", r"projection.\1.\2"),
    (r"head\.neck_norms\.(.*)", r"neck.fpn_norms.\1"),
    (r"head\.(cls_convs|reg_convs|cls_head|reg_head|loss_normalizer)(.*)", r"rpn_head.\1\2"),
]
LINEAR_AS_CONV1X1 = re.compile(r"projection\.(stem|branch)\.\d+\.(attn\.(query|key|value|proj)|mlp\.[03])\.weight")


def rename(name: str, rules) -> str:
    for pattern, repl in rules:
        m = re.fullmatch(pattern, name)
        if m:
            return repl(m) if callable(repl) else m.expand(repl)
    raise AssertionError(f"no inverse rule for {name}")


def numpy_sinusoid(n: int, d: int) -> Tensor:
    """The official get_sinusoid_encoding_table, in numpy, (1, n, d)."""
    angles = np.arange(n)[:, None] / np.power(10000, 2 * (np.arange(d) // 2) / d)[None]
    angles[:, 0::2], angles[:, 1::2] = np.sin(angles[:, 0::2]), np.cos(angles[:, 1::2])
    return torch.tensor(angles, dtype=torch.float32)[None]


def evad_official(ours: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {rename(k, EVAD_FROM_OURS): v.clone() for k, v in ours.items()}
    out["criterion.empty_weight"] = torch.tensor([1.0, 0.1])  # SetCriterion's registered buffer
    return out


def haltingvt_official(ours: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {rename(k, HALTINGVT_FROM_OURS): v.clone() for k, v in ours.items()}
    kernel = "backbone.model.patch_embed.proj.weight"
    out[kernel] = out[kernel][:, :, 0]  # a 2D Conv2d patch embedding per frame
    return out


def opentad_official(ours: dict[str, Tensor], pos_tokens: int | None) -> dict[str, Tensor]:
    """``module.``-prefixed, as OpenTAD saves its DDP model; ``pos_tokens``: the backbone's sinusoid buffer."""
    out = {}
    scales = [v for k, v in ours.items() if k == "head.reg_scales"]
    for key, value in ours.items():
        if key == "head.reg_scales":
            continue
        name = rename(key, OPENTAD_FROM_OURS)
        if LINEAR_AS_CONV1X1.fullmatch(name):
            value = value[..., None]  # Conv1d(k=1)
        if name.endswith((".drop_path_attn.scale", ".drop_path_mlp.scale")):
            value = value.reshape(1, -1, 1)  # AffineDropPath
        out["module." + name] = value.clone()
    for level, s in enumerate(scales[0]):
        out[f"module.rpn_head.scale.{level}.scale"] = s.clone()  # one Scale module per level
    if pos_tokens is not None:
        dim = ours["backbone.vit.patch_embed.proj.weight"].shape[0]
        out["module.backbone.model.backbone.pos_embed"] = numpy_sinusoid(pos_tokens, dim)
    return out


# ------------------------------------------------------------------ paper configurations: names and shapes

EVAD_VITB_KEYS = {  # ViT_B_16x4_KTP.yaml: ViT-B, 100 proposals of 256, 6 RCNN heads, CRD 384 x 6, 80 classes
    "patch_embed.proj.weight": (768, 3, 2, 16, 16),
    "blocks.0.attn.q_bias": (768,),
    "blocks.11.attn.qkv.weight": (2304, 768),
    "blocks.11.mlp.fc2.weight": (768, 3072),
    "norm.weight": (768,),
    "fpn_lateral2.weight": (256, 768, 1, 1),
    "fpn_output5.weight": (256, 256, 3, 3),
    "init_proposal_boxes.weight": (100, 4),
    "init_proposal_features.weight": (100, 256),
    "det_head.s0_headseries.0.self_attn.in_proj_weight": (768, 256),
    "det_head.s0_headseries.5.inst_interact.dynamic_layer.weight": (2 * 256 * 64, 256),
    "det_head.s0_headseries.0.inst_interact.out_layer.weight": (256, 256 * 49),
    "det_head.s0_headseries.0.linear1.weight": (2048, 256),
    "det_head.s0_headseries.0.cls_module.0.weight": (256, 256),
    "det_head.s0_headseries.0.reg_module.6.weight": (256, 256),
    "det_head.s0_headseries.0.class_logits.weight": (2, 256),
    "det_head.s0_headseries.0.bboxes_delta.weight": (4, 256),
    "det_head.encoder_to_decoder.weight": (384, 768),
    "det_head.mask_token": (1, 1, 384),
    "det_head.decoder.blocks.5.attn.qkv.weight": (1152, 384),
    "det_head.decoder.blocks.0.attn.v_bias": (384,),
    "det_head.decoder.blocks.0.act_module.0.weight": (2048, 384),
    "det_head.decoder.blocks.0.act_module.1.weight": (2048,),
    "det_head.decoder.blocks.5.action_logits.weight": (80, 2048),
    "criterion.empty_weight": (2,),
}
HALTINGVT_MINIK_KEYS = {  # HaltingVT_jointST_8x32x1_minik_deitSmall_G05_ML_Beta20: DeiT-S, 8 frames, 200 classes
    "backbone.model.cls_token": (1, 1, 384),
    "backbone.model.pos_embed": (1, 197, 384),
    "backbone.model.time_embed": (1, 8, 384),
    "backbone.model.patch_embed.proj.weight": (384, 3, 16, 16),
    "backbone.model.blocks.0.temporal_fc.weight": (384, 384),
    "backbone.model.blocks.1.temporal_attn.qkv.weight": (1152, 384),
    "backbone.model.blocks.1.temporal_norm1.weight": (384,),
    "backbone.model.blocks.11.attn.qkv.bias": (1152,),
    "backbone.model.blocks.11.mlp.fc1.weight": (1536, 384),
    "backbone.model.norm.weight": (384,),
    "cls_head.fc_cls.weight": (200, 384),
    "cls_head.fc_motion.weight": (2, 384),
}
ADATAD_S_KEYS = {  # configs/adatad/thumos/e2e_thumos_videomae_s_768x1_160_adapter.py + _base_/models/actionformer.py
    "module.backbone.model.backbone.patch_embed.projection.weight": (384, 3, 2, 16, 16),
    "module.backbone.model.backbone.pos_embed": (1, 1568, 384),
    "module.backbone.model.backbone.blocks.0.attn.q_bias": (384,),
    "module.backbone.model.backbone.blocks.0.mlp.layers.0.0.weight": (1536, 384),
    "module.backbone.model.backbone.blocks.11.mlp.layers.1.weight": (384, 1536),
    "module.backbone.model.backbone.blocks.3.adapter.down_proj.weight": (96, 384),
    "module.backbone.model.backbone.blocks.3.adapter.dwconv.weight": (96, 1, 3),
    "module.backbone.model.backbone.blocks.3.adapter.conv.weight": (96, 96, 1),
    "module.backbone.model.backbone.blocks.11.adapter.gamma": (1,),
    "module.backbone.model.backbone.fc_norm.weight": (384,),
    "module.projection.embed.0.conv.weight": (512, 384, 3),
    "module.projection.embed.1.norm.weight": (512,),
    "module.projection.stem.0.ln1.weight": (512,),
    "module.projection.stem.0.attn.query_conv.conv.weight": (512, 1, 3),
    "module.projection.branch.4.attn.key_conv.conv.weight": (512, 1, 3),
    "module.projection.branch.4.attn.query.weight": (512, 512, 1),
    "module.projection.stem.1.attn.proj.bias": (512,),
    "module.projection.stem.0.mlp.0.weight": (2048, 512, 1),
    "module.projection.branch.0.mlp.3.weight": (512, 2048, 1),
    "module.projection.stem.0.drop_path_attn.scale": (1, 512, 1),
    "module.neck.fpn_norms.5.weight": (512,),
    "module.rpn_head.cls_convs.1.conv.weight": (512, 512, 3),
    "module.rpn_head.cls_head.weight": (20, 512, 3),
    "module.rpn_head.reg_head.weight": (2, 512, 3),
    "module.rpn_head.scale.5.scale": (),
    "module.rpn_head.loss_normalizer": (),
}


def shapes(sd: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def assert_converts_exactly(official: dict[str, Tensor], layout: str, ours: dict[str, Tensor]) -> None:
    """Every official key converted or dropped with a reason, onto exactly our keys and shapes."""
    official = {k.removeprefix("module."): v for k, v in official.items()}
    assert detect_layout(official) == layout
    converted = convert(layout, official, ours)
    assert converted.unmapped == []
    assert shapes(converted.tensors) == shapes(ours)
    assert set(converted.origin.values()) | set(converted.dropped) >= set(official) - {
        k for k in official if k.startswith("rpn_head.scale.")
    }


def test_paper_evad_vitb_layout():
    with torch.device("meta"):
        model = EVAD(VideoMAEViT("base", drop_path_rate=0.1, use_mean_pooling=False), num_classes=80)
    official = evad_official(model.state_dict())
    assert {k: shapes(official)[k] for k in EVAD_VITB_KEYS} == EVAD_VITB_KEYS
    assert_converts_exactly(official, "evad", model.state_dict())


def test_paper_haltingvt_minik_layout():
    with torch.device("meta"):
        backbone = HaltingViT(size="small", img_size=224, num_frames=8, glimpse_ratio=0.5, halt_center=20.0)
        model = nn.Module()
        model.backbone, model.head, model.motion_head = backbone, nn.Sequential(nn.Dropout(), nn.Linear(384, 200)), nn.Linear(384, 2)
    official = haltingvt_official(model.state_dict())
    assert {k: shapes(official)[k] for k in HALTINGVT_MINIK_KEYS} == HALTINGVT_MINIK_KEYS
    assert_converts_exactly(official, "haltingvt", model.state_dict())


def test_paper_adatad_videomae_s_layout():
    with torch.device("meta"):
        vit = VideoMAEViT("small", drop_path_rate=0.1)
        model = TemporalActionDetector(ChunkedVideoBackbone(vit, finetune="adapter"), ActionFormerHead(384, 20))
    official = opentad_official(model.state_dict(), pos_tokens=1568)
    assert {k: shapes(official)[k] for k in ADATAD_S_KEYS} == ADATAD_S_KEYS
    assert_converts_exactly(official, "opentad-adatad", model.state_dict())


# ------------------------------------------------------------------ tiny models: values and strictness


def tiny_evad(seed: int) -> EVAD:
    torch.manual_seed(seed)
    backbone = VideoMAEViT(None, 32, 4, 2, img_size=64, num_frames=8, use_mean_pooling=False)
    localiser = QueryLocaliser(6, 16, 2, 2, dim_dynamic=4, dim_feedforward=32, sampling_ratio=1)
    decoder = ContextRefinementDecoder(
        4, 32, 16, 2, 2, drop_path_rate=0.0, head_hidden_dim=24, pretrain_grid=(4, 4, 4), sampling_ratio=1
    )
    model = EVAD(
        backbone, localiser, decoder, SimpleFeaturePyramid(32, 16), keep_rate=0.7, prune_layers=[1, 2],
        tap_layers=[0, 1, 2, 3], num_classes=4,
    )  # fmt: skip
    with torch.no_grad():  # every tensor away from its initial value, so a tensor left unloaded shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def save(path: Path, obj: dict) -> Path:
    torch.save(obj, path)
    return path


def test_evad_model_zoo_file_loads_and_predicts_as_the_reference(tmp_path):
    reference, loaded = tiny_evad(0), tiny_evad(1)
    official = evad_official(reference.state_dict())
    path = save(tmp_path / "evad.pth", {"epoch": 12, "model_state": official, "cfg": "MODEL:\n  NUM_CLASSES: 4\n"})
    report = load_official(loaded, path)
    assert report.layout == "evad" and report.wrapper == "model_state"
    assert set(report.dropped) == {"criterion.empty_weight"}
    video, sizes = torch.randn(2, 3, 8, 64, 64), torch.tensor([[64, 64], [64, 48]])
    with torch.no_grad():
        want, got = reference(video, sizes), loaded(video, sizes)
    torch.testing.assert_close(got.localiser.boxes[-1], want.localiser.boxes[-1], rtol=0, atol=0)
    torch.testing.assert_close(got.action_logits[-1], want.action_logits[-1], rtol=0, atol=0)


def test_evad_missing_extra_and_layer_scale_keys_are_refused(tmp_path):
    official = evad_official(tiny_evad(0).state_dict())
    missing = dict(official)
    del missing["det_head.s0_headseries.1.bboxes_delta.weight"]
    with pytest.raises(CheckpointError, match=r"missing\.pth.*localiser\.stages\.1\.box_deltas\.weight"):
        load_official(tiny_evad(1), save(tmp_path / "missing.pth", {"model_state": missing}))
    extra = {**official, "det_head.s0_headseries.2.class_logits.weight": torch.zeros(2, 16)}
    with pytest.raises(CheckpointError, match=r"s0_headseries\.2\.class_logits\.weight"):
        load_official(tiny_evad(1), save(tmp_path / "extra.pth", {"model_state": extra}))
    unknown = {**official, "det_head.s0_pool.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"no place.*det_head\.s0_pool\.weight"):
        load_official(tiny_evad(1), save(tmp_path / "unknown.pth", {"model_state": unknown}))
    scaled = {**official, "blocks.0.gamma_1": torch.ones(32)}
    with pytest.raises(CheckpointError, match="layer-scale"):
        load_official(tiny_evad(1), save(tmp_path / "scaled.pth", {"model_state": scaled}))
    pooled = tiny_evad(1)
    pooled.backbone.fc_norm = nn.LayerNorm(32)  # a backbone built for clip pooling: EVAD never uses fc_norm
    with pytest.raises(CheckpointError, match="use_mean_pooling: false"):
        load_official(pooled, save(tmp_path / "evad.pth", {"model_state": official}))


def tiny_haltingvt(seed: int, motion_weight: float = 1.0) -> HaltingVTClassifier:
    torch.manual_seed(seed)
    backbone = HaltingViT(
        size=None, embed_dim=32, depth=4, num_heads=2, img_size=32, num_frames=4, drop_path_rate=0.0,
        glimpse_ratio=0.5, halt_scale=10.0, halt_center=1.0,
    )  # fmt: skip
    task = HaltingVTClassifier(backbone, num_classes=5, motion_weight=motion_weight)
    with torch.no_grad():
        for p in task.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return task.eval()


def test_haltingvt_release_loads_and_classifies_as_the_reference(tmp_path):
    reference, loaded = tiny_haltingvt(0), tiny_haltingvt(1)
    official = haltingvt_official(reference.state_dict())
    path = save(tmp_path / "haltingvt.pth", {"meta": {"epoch": 20}, "state_dict": official})
    report = load_official(loaded, path)
    assert report.layout == "haltingvt" and report.dropped == {}
    video = torch.randn(3, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(video), reference(video), rtol=0, atol=0)
    assert torch.equal(loaded.motion_head.weight, reference.motion_head.weight)

    without_motion = tiny_haltingvt(2, motion_weight=0.0)
    report = load_official(without_motion, path)
    assert set(report.dropped) == {"cls_head.fc_motion.weight", "cls_head.fc_motion.bias"}
    with torch.no_grad():
        torch.testing.assert_close(without_motion(video), reference(video), rtol=0, atol=0)

    tubelets = HaltingVTClassifier(HaltingViT(None, 32, 4, 2, img_size=32, num_frames=8, tubelet_size=2), 5)
    with pytest.raises(CheckpointError, match=r"haltingvt\.pth.*patch_embed\.proj\.weight.*\(32, 3, 2, 16, 16\)"):
        load_official(tubelets, path)


def tiny_tad_detector(seed: int, finetune: str = "adapter") -> TemporalActionDetector:
    torch.manual_seed(seed)
    vit = VideoMAEViT(None, 32, 2, 2, img_size=32, num_frames=8)
    backbone = ChunkedVideoBackbone(vit, chunk_frames=8, head_length=16, finetune=finetune)
    head = ActionFormerHead(32, 3, embed_dim=16, num_heads=2, max_seq_len=16, arch=(2, 1, 2), head_channels=16,
                            regression_ranges=((0, 4), (4, 8), (8, 10000)))  # fmt: skip
    model = TemporalActionDetector(backbone, head)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def test_opentad_adatad_loads_the_ema_by_default_and_the_raw_weights_on_request(tmp_path):
    reference, raw_reference = tiny_tad_detector(0), tiny_tad_detector(1)
    official = opentad_official(reference.state_dict(), pos_tokens=4 * 2 * 2)
    raw = opentad_official(raw_reference.state_dict(), pos_tokens=4 * 2 * 2)
    path = save(tmp_path / "adatad.pth", {"epoch": 59, "state_dict": raw, "state_dict_ema": official})
    video = torch.randn(2, 3, 16, 32, 32)
    for ema, want in ((None, reference), (True, reference), (False, raw_reference)):
        loaded = tiny_tad_detector(2)
        report = load_official(loaded, path, ema=ema)
        assert report.layout == "opentad-adatad" and report.ema == (ema is not False)
        assert set(report.dropped) == {"backbone.model.backbone.pos_embed"}
        with torch.no_grad():
            got, expected = loaded(video), want(video)
        for a, b in zip(got.cls_logits + got.reg_offsets, expected.cls_logits + expected.reg_offsets):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    no_ema = save(tmp_path / "plain.pth", {"epoch": 59, "state_dict": raw})
    with pytest.raises(CheckpointError, match=r"plain\.pth has no 'state_dict_ema'.*--no-ema"):
        load_official(tiny_tad_detector(2), no_ema, ema=True)
    with pytest.raises(CheckpointError, match=r"finetune: adapter"):
        load_official(tiny_tad_detector(2, finetune="full"), path)
    with pytest.raises(CheckpointError, match=r"LoRA factors"):
        load_official(tiny_tad_detector(2, finetune="lora"), path)
    learned = {**official, "module.backbone.model.backbone.pos_embed": torch.randn(1, 16, 32)}
    with pytest.raises(CheckpointError, match="learned position table"):
        load_official(tiny_tad_detector(2), save(tmp_path / "learned.pth", {"state_dict_ema": learned}))


def test_opentad_feature_based_actionformer_fills_the_head(tmp_path):
    reference = tiny_tad_detector(0, finetune="full")
    head_only = {k: v for k, v in reference.state_dict().items() if k.startswith("head.")}
    path = save(tmp_path / "actionformer.pth", {"epoch": 34, "state_dict_ema": opentad_official(head_only, None)})
    loaded = tiny_tad_detector(1, finetune="full")
    with pytest.raises(CheckpointError, match=r"not fill: backbone\.vit\."):
        load_official(loaded, path)
    report = load_official(loaded, path, filled=("backbone.",))
    assert report.layout == "opentad-actionformer"
    features, mask = torch.randn(2, 32, 16), torch.ones(2, 16, dtype=torch.bool)
    with torch.no_grad():
        got, want = loaded.head(features, mask), reference.head(features, mask)
    for a, b in zip(got.cls_logits + got.reg_offsets, want.cls_logits + want.reg_offsets):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------ the command, end to end


def test_convert_checkpoint_command_then_validate_and_load_from_checkpoint(tmp_path):
    data = generate_temporal(tmp_path / "set", num_videos=6, size=32, seconds=6, fps=10)
    recipe = [
        *tiny_tad(tmp_path / "runs", data), "--model.init_args.head.init_args.embed_dim=16",
        "--model.init_args.head.init_args.head_channels=16", "--trainer.logger=false", "--trainer.callbacks=[]",
    ]  # fmt: skip
    parser = recipe_parser()
    torch.manual_seed(0)
    reference = parser.instantiate_classes(parser.parse_args(recipe)).model.eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    tokens = 4 * 2 * 2  # the recipe's 8-frame 64x64 pre-training grid of tubelets 2x16x16
    official = opentad_official(reference.detector.state_dict(), pos_tokens=tokens)
    source = save(tmp_path / "epoch_59.pth", {"epoch": 59, "state_dict": official, "state_dict_ema": official})
    out = tmp_path / "converted.ckpt"
    configs, overrides = recipe[:2], recipe[2:]
    assert run(["convert-checkpoint", *configs, "--official", str(source), "--output", str(out), *overrides]) == 0
    assert run(["convert-checkpoint", *configs, "--official", str(source), "--output", str(tmp_path / "no.ckpt"),
                "--model.init_args.backbone.init_args.finetune=adapter", *overrides]) == 2  # fmt: skip
    assert not (tmp_path / "no.ckpt").exists()

    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["official_weights"]["layout"] == "opentad-adatad"
    assert checkpoint["official_weights"]["weights"] == "state_dict_ema"
    expected = reference.state_dict()
    assert checkpoint["state_dict"].keys() == expected.keys()
    assert all(torch.equal(checkpoint["state_dict"][k], v) for k, v in expected.items())

    video = torch.randn(1, 3, 64, 32, 32)
    restored = TemporalActionDetection.load_from_checkpoint(out).eval()
    with torch.no_grad():
        got, want = restored(video), reference(video)
    for a, b in zip(got.cls_logits + got.reg_offsets, want.cls_logits + want.reg_offsets):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    validated = cli_main(["validate", *recipe, f"--ckpt_path={out}"])
    assert all(torch.equal(v, expected[k]) for k, v in validated.model.state_dict().items())
    assert math.isfinite(float(validated.trainer.callback_metrics["val/average_mAP"]))
