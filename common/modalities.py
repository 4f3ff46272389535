"""The one table of expert modalities.

The encoder builds its stems from it, the datasets read and paint labels by
it, and `generate_experts.py` writes labels by it, so a name means the same
thing everywhere. Each row names its label kind (common/labels), which owns
everything about the label files. It lives on the ground floor because model, dataset and
experts all read it and none of them may import another.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.labels import CLASS_MAP, DENSE, INSTANCE, OCR, LabelKind


@dataclass(frozen=True)
class Expert:
    name: str
    # Channels of the tensor the model receives for this expert.
    channels: int
    # Key of the encoder stem; every segmentation expert shares `seg`.
    stem: str
    # What its label files are and how they become model input (common/labels);
    # None for the RGB image itself.
    kind: LabelKind | None
    # Label space the ids index into (`label_spaces/` features), if any.
    label_space: str | None = None
    # The network that generates the labels: its module under experts/ (a
    # LabelNetwork named Generator) and the official weight file in the hub repo.
    network: str | None = None
    weights: str | None = None


EXPERTS: dict[str, Expert] = {
    e.name: e
    for e in (
        Expert("rgb", 3, "rgb", None),
        Expert("depth", 1, "depth", DENSE, network="depth", weights="expert_weights/dpt_hybrid-midas-501f0c75.pt"),
        Expert("normal", 3, "normal", DENSE, network="normal", weights="expert_weights/scannet.pt"),
        Expert("edge", 1, "edge", DENSE, network="edge", weights="expert_weights/10_model.pth"),
        Expert("seg_coco", 64, "seg", CLASS_MAP, "coco", "segmentation", "expert_weights/model_final_f07440.pkl"),
        Expert("seg_ade", 64, "seg", CLASS_MAP, "ade", "segmentation", "expert_weights/model_final_e0c58e.pkl"),
        Expert(
            "obj_detection",
            64,
            "obj_detection",
            INSTANCE,
            "detection",
            network="detection",
            weights="expert_weights/Unified_learned_OCIM_RS200_6x+2x.pth",
        ),
        Expert(
            "ocr_detection", 64, "ocr_detection", OCR, network="ocr", weights="expert_weights/icdar2015_hourglass88.pth"
        ),
    )
}

# The expert set of the released Prismer checkpoints, in the official order.
PRISMER_EXPERTS = ("depth", "normal", "seg_coco", "edge", "obj_detection", "ocr_detection")


def label_networks() -> list[str]:
    """Experts whose labels `generate_experts.py` can make."""
    return [e.name for e in EXPERTS.values() if e.network]


def parse_experts(names) -> list[str]:
    """Validate a config's expert list (official configs say ['none'] for PrismerZ).

    Returns the expert names without `rgb`, which every model has.
    """
    if names is None or isinstance(names, str):
        names = [] if names in (None, "none", "") else [names]
    out: list[str] = []
    for name in names:
        if name in ("none", "rgb"):
            continue
        if name not in EXPERTS:
            valid = ", ".join(n for n in EXPERTS if n != "rgb")
            raise ValueError(f"unknown expert {name!r}; known experts: {valid} (or 'none' for PrismerZ)")
        if name in out:
            raise ValueError(f"expert {name!r} is listed twice")
        out.append(name)
    return out
