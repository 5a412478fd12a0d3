"""Where each recipe's pretrained weights come from: the file name a recipe expects under ``checkpoints/`` and the
release that provides it (nothing downloads at run time; put the file there, or point ``pretrained`` at yours)."""

from __future__ import annotations

#: file name -> (what it is, where to get it)
SOURCES: dict[str, tuple[str, str]] = {
    "deit_small_patch16_224.pth": (
        "DeiT-S ImageNet-1k (HaltingVT recipes)",
        (
            "https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth (facebookresearch/deit), or "
            "timm's deit_small_patch16_224 saved with torch.save(model.state_dict(), ...)"
        ),
    ),
    "videomae_vit_b_k400.pth": (
        "VideoMAE ViT-B pre-trained and fine-tuned on Kinetics-400 (EVAD ViT-B, UCF101-24, JHMDB)",
        (
            "the K400 'pre-train' link of the ViT-B rows in MCG-NJU/EVAD's README (Google Drive), or Hugging Face "
            "MCG-NJU/videomae-base-finetuned-kinetics (a folder works as the path too)"
        ),
    ),
    "videomae_vit_l_k700.pth": (
        "VideoMAE ViT-L Kinetics-700 (EVAD ViT-L)",
        "the K700 'pre-train' link of the ViT-L row in MCG-NJU/EVAD's README (Google Drive)",
    ),
    "vit-small-p16_videomae-k400-pre_16x4x1_kinetics-400.pth": (
        "VideoMAE ViT-S Kinetics-400 (AdaTAD / block-drop VideoMAE-S recipes)",
        (
            "the converted VideoMAE-S checkpoint of OpenTAD's configs/adatad/README.md (Google Drive; OpenTAD names "
            "it ..._my.pth), original in MCG-NJU/VideoMAE's MODEL_ZOO.md"
        ),
    ),
    "vit-large-p16_videomae-k400-pre_16x4x1_kinetics-400.pth": (
        "VideoMAE ViT-L Kinetics-400 (AdaTAD / block-drop VideoMAE-L recipes)",
        (
            "https://download.openmmlab.com/mmaction/v1.0/recognition/videomae/"
            "vit-large-p16_videomae-k400-pre_16x4x1_kinetics-400_20221013-229dbb03.pth (linked by OpenTAD's "
            "configs/adatad/README.md)"
        ),
    ),
}


def missing_weights_message(path: str, recipe: str | None) -> str:
    """One line: the missing file, the recipe key that names it, and where to get it."""
    name = path.rsplit("/", 1)[-1]
    what, where = SOURCES.get(name, ("", ""))
    source = f" It is {what}: get it from {where}." if where else ""
    recipe_part = f" (model.init_args.pretrained of {recipe})" if recipe else " (model.init_args.pretrained)"
    return (
        f"error: pretrained weights {path}{recipe_part} not found.{source} Put the file there, or pass "
        "--model.init_args.pretrained=<your file> (null: train from scratch)"
    )


__all__ = ["SOURCES", "missing_weights_message"]
