"""Typed model configuration, and the named sizes in `sizes.yaml` beside it (found
relative to the package, so an installed model finds them too)."""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.modalities import parse_experts

SIZES_FILE = Path(__file__).resolve().parent / "sizes.yaml"
FREEZE_MODES = ("none", "freeze_vision", "freeze_lang", "freeze_lang_vision")
VISION_KEYS = {"width", "layers", "patch_size", "act", "image_resolution", "label_resolution"}


@functools.cache
def model_sizes() -> dict[str, dict]:
    with open(SIZES_FILE) as f:
        return yaml.safe_load(f)


def resolve_size(prismer_model: str | Mapping) -> dict:
    """A size name from `model/sizes.yaml`, or an inline size
    `{"vision": {...}, "roberta": {...}}` (the form of the parity spec.json)."""
    if isinstance(prismer_model, str):
        sizes = model_sizes()
        if prismer_model not in sizes:
            raise ValueError(
                f"unknown model size {prismer_model!r} (prismer_model); sizes in {SIZES_FILE}: {', '.join(sizes)}"
            )
        size = copy.deepcopy(sizes[prismer_model])
    else:
        size = copy.deepcopy(dict(prismer_model))
    for key in ("vision", "roberta"):
        if key not in size:
            raise ValueError(f"model size needs a {key!r} section, got keys {sorted(size)}")
    unknown = set(size["vision"]) - VISION_KEYS
    if unknown:
        raise ValueError(f"unknown vision key(s) {sorted(unknown)} in model size; known: {sorted(VISION_KEYS)}")
    size["vision"].setdefault("act", "quick_gelu")
    size.setdefault("clip", None)
    size.setdefault("roberta_name", None)
    return size


@dataclass
class ModelConfig:
    """What builds a Prismer. Training configs carry these keys beside their own."""

    prismer_model: str | dict
    experts: list[str] = field(default_factory=list)
    image_resolution: int = 224
    freeze: str = "none"
    # False: random init, nothing loaded (tests, from-scratch research).
    pretrained: bool = True
    # Overrides of the size's pretrained sources: hub ids or local paths.
    clip: str | None = None
    roberta: str | None = None
    tokenizer: str | None = None

    def __post_init__(self):
        self.experts = parse_experts(self.experts)
        if self.freeze not in FREEZE_MODES:
            raise ValueError(f"unknown freeze mode {self.freeze!r}; choose one of {FREEZE_MODES}")
        self.size = resolve_size(self.prismer_model)
        # Any resolution: the grid is floor(resolution / patch) per side and the
        # RGB patch conv (stride = kernel = patch) never sees the remainder, as
        # officially (Large fine-tunes at 480 px: 34 x 34 patches of 14, last 4 px unseen).
        patch = self.size["vision"]["patch_size"]
        if not isinstance(self.image_resolution, int) or self.image_resolution < patch:
            raise ValueError(
                f"image_resolution {self.image_resolution!r} is not an integer of at least the patch size {patch} "
                f"of model {self.prismer_model if isinstance(self.prismer_model, str) else 'inline'}"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], strict: bool = True) -> ModelConfig:
        """strict: reject keys that are not model keys; False picks the model
        keys out of a whole training config (whose own schema checks the rest)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if strict and unknown:
            raise ValueError(f"unknown model config key(s) {sorted(unknown)}; known: {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @property
    def vision(self) -> dict:
        return self.size["vision"]

    @property
    def roberta_config(self) -> dict:
        return self.size["roberta"]
