"""Dense maps (depth, surface normal, edge): an 8-bit grey or RGB PNG whose values
the model sees rescaled per image to [-1, 1]. In memory: a PIL image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.labels.base import LabelKind, save_png

_EPS = 1e-6


def to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit grey images keep their top 8 bits (a plain convert would clip
    everything above 255 to white)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        x = np.asarray(img, dtype=np.int64)
        shift = 8 if x.max(initial=0) > 255 or img.mode.startswith("I;16") else 0
        return Image.fromarray((x >> shift).clip(0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        x = np.asarray(img, dtype=np.float32)
        return Image.fromarray(x.clip(0, 255).astype(np.uint8), "L")
    return img


class Dense(LabelKind):
    name = "dense"
    fill = 0
    painted = False
    stem_upsample = 16

    def mode(self, channels: int) -> str:
        return "RGB" if channels == 3 else "L"

    def read(self, path: Path, size, expert, spaces):
        if not path.is_file() or path.stat().st_size == 0:
            return None, None
        mode = self.mode(expert.channels)
        with Image.open(path) as img:
            img.load()
            img = to_8bit(img)
            img = img.convert(mode) if img.mode != mode else img
        return (img if img.size == size else img.resize(size, Image.NEAREST)), None

    def empty(self, size, expert, spaces):
        return Image.new(self.mode(expert.channels), size, 0), None

    def write(self, path: Path, label: Image.Image) -> None:
        if not isinstance(label, Image.Image) or label.mode not in ("L", "RGB"):
            raise ValueError(f"{path}: a dense label is an 'L' or 'RGB' PIL image, got {label!r}")
        save_png(path, label)

    def to_tensor(self, label: Image.Image) -> torch.Tensor:
        """(C, H, W) rescaled per image to [-1, 1] (a constant map, e.g. a missing
        label, becomes all -1, as officially)."""
        x = torch.from_numpy(np.array(label, dtype=np.uint8))
        x_CHW = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
        out = torch.empty(x_CHW.shape, dtype=torch.float32)
        out.copy_(x_CHW).div_(255)
        lo, hi = out.min(), out.max()
        return out.sub_(lo).mul_(2 / (hi - lo + _EPS)).sub_(1)

    def noise(self, label: Image.Image, rng: np.random.Generator, num_classes: int | None) -> Image.Image:
        """Uniform random values in every band."""
        bands = len(label.getbands())
        arr = rng.integers(0, 256, (label.height, label.width, bands), dtype=np.uint8)
        return Image.fromarray(arr[..., 0] if bands == 1 else arr, label.mode)
