"""The one table of expert modalities.

The encoder builds its stems from it, the datasets read and paint labels by
it, and `generate_experts.py` writes labels by it, so a name means the same
thing everywhere. It lives on the ground floor because model, dataset and
experts all read it and none of them may import another.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Expert:
    name: str
    # Channels of the tensor the model receives for this expert.
    channels: int
    # Key of the encoder stem; every segmentation expert shares `seg`.
    stem: str
    # How the label file is read and turned into model input:
    #   dense     8-bit grey/RGB PNG, rescaled per image to [-1, 1]
    #   class_map grey PNG of class ids (255 = none), painted with a label space
    #   instance  grey PNG of instance ids + JSON instance -> class id
    #   ocr       grey PNG of word ids + per-image word records (text, 64-d feature)
    kind: str
    # Label space the ids index into (`label_spaces/` features), if any.
    label_space: str | None = None
    # The network that generates the labels: its module under experts/ (with
    # load, preprocess, to_label) and the official weight file in the hub repo.
    network: str | None = None
    weights: str | None = None

    @property
    def upsample(self) -> int:
        """Stem upsampling numerator: labels arrive at 224 px; dense maps go
        through four stride-2 convs (x16), 64-channel maps through two (x4)."""
        return 16 if self.kind == "dense" else 4

    @property
    def fill(self) -> int:
        """Label value for pixels an augmentation moves in from outside the
        image, and for a missing label file: dense maps are 0, id maps 255 (none)."""
        return 0 if self.kind == "dense" else 255

    @property
    def label_mode(self) -> str:
        """PIL mode of the label PNG: normals are RGB, everything else one grey channel."""
        return "RGB" if self.channels == 3 else "L"

    @property
    def painted(self) -> bool:
        """True when the label file holds ids that become 64-d label-space features."""
        return self.kind in ("class_map", "instance", "ocr")


EXPERTS: dict[str, Expert] = {
    e.name: e
    for e in (
        Expert("rgb", 3, "rgb", "rgb"),
        Expert("depth", 1, "depth", "dense"),
        Expert("normal", 3, "normal", "dense"),
        Expert("edge", 1, "edge", "dense", network="edge", weights="expert_weights/10_model.pth"),
        Expert("seg_coco", 64, "seg", "class_map", "coco"),
        Expert("seg_ade", 64, "seg", "class_map", "ade"),
        Expert("obj_detection", 64, "obj_detection", "instance", "detection"),
        Expert("ocr_detection", 64, "ocr_detection", "ocr"),
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
