"""What every label kind provides, and the id-map reading the painted kinds share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

NONE_ID = 255  # "no class / no instance / no word" in every id map


class SampleError(ValueError):
    """One sample cannot be used (its message names the file); it is skipped and counted."""


class LabelKind:
    """A kind of label file. Subclasses set the class attributes and the methods they support."""

    name: str
    # Label value for pixels an augmentation moves in from outside the image.
    fill: int
    # True when the label holds ids that are painted with 64-d label-space features.
    painted: bool
    # Stem upsampling numerator: labels arrive at 224 px; 1- or 3-channel maps go
    # through four stride-2 convs (x16), 64-channel painted maps through two (x4).
    stem_upsample: int
    # Suffixes of the files that belong to one label besides its PNG.
    sidecars: tuple[str, ...] = ()
    # True when the encoder also embeds the map's instance ids (`model_input` is a dict).
    instances: bool = False

    def mode(self, channels: int) -> str:
        """PIL mode of the label PNG."""
        return "L"

    def read(self, path: Path, size: tuple[int, int], expert, spaces) -> tuple[Image.Image | None, Any]:
        """The label at the image's (W, H) as a PIL image, and for painted kinds its
        (256, 64) id -> feature table from `spaces` (dataset.LabelSpaces); image None
        when the expert found nothing."""
        raise NotImplementedError

    def empty(self, size: tuple[int, int], expert, spaces) -> tuple[Image.Image, Any]:
        """What a missing label reads as: the expert found nothing."""
        raise NotImplementedError

    def write(self, path: Path, label) -> None:
        """Write the kind's in-memory label (see each kind) atomically."""
        raise NotImplementedError

    def found_nothing(self, label) -> bool:
        """True when a label (in memory) says the expert found nothing: no object, no word."""
        return False

    def exists(self, path: Path) -> bool:
        """A finished label is on disk (its PNG is written last)."""
        return path.is_file()

    def files(self, path: Path) -> list[Path]:
        """The files of one label on disk: its PNG and sidecars."""
        return [p for p in (path, *(path.with_suffix(s) for s in self.sidecars)) if p.is_file()]

    def to_tensor(self, label: Image.Image) -> torch.Tensor:
        """The label at label resolution as a sample tensor: painted kinds as uint8 ids (1, H, W)."""
        return torch.from_numpy(np.asarray(label, dtype=np.uint8).copy())[None]

    def model_input(self, features_BDHW: torch.Tensor, ids_B1HW: torch.Tensor):
        """What the encoder receives for a painted batch."""
        return features_BDHW

    def stem_input(self, x):
        """The tensor the expert's stem convolves, out of `model_input`'s result."""
        return x

    # `noise(label, rng, num_classes) -> label`: a random label of the same size and
    # format, for the ablation's corruption; None where noise has no meaning.
    noise = None

    def __repr__(self) -> str:
        return f"<label kind {self.name}>"


def read_ids(path: Path, size: tuple[int, int]) -> np.ndarray | None:
    """An id map (H, W) uint8 with 255 = none; None when the expert found nothing.
    Palette and 16-bit PNGs are read as raw values (converting them to grey
    would turn ids into luminances); ids above 255 are an error."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with Image.open(path) as img:
        img.load()
        if img.mode in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
            ids = np.asarray(img)
            if ids.ndim != 2:
                raise SampleError(f"{path}: id map has shape {ids.shape}, expected (H, W)")
            if ids.dtype != np.uint8:
                if ids.max(initial=0) > 255 or ids.min(initial=0) < 0:
                    raise SampleError(f"{path}: id {int(ids.max())} does not fit 8 bits (255 = none)")
                ids = ids.astype(np.uint8)
        else:
            ids = np.asarray(img.convert("L"))
    if (ids.shape[1], ids.shape[0]) != size:
        ids = np.asarray(Image.fromarray(ids).resize(size, Image.NEAREST))
    return ids


def present_ids(ids: np.ndarray) -> list[int]:
    """The ids (not 255) that occur in a map."""
    counts = np.bincount(ids.ravel(), minlength=256)
    return [int(i) for i in np.flatnonzero(counts[:NONE_ID])]


def check_ids_array(ids: np.ndarray, path: Path) -> np.ndarray:
    """A label to write must be an (H, W) uint8 id map."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.dtype != np.uint8:
        raise ValueError(f"{path}: an id map must be (H, W) uint8, got {ids.shape} {ids.dtype}")
    return ids


def save_png(path: Path, image: Image.Image) -> None:
    from common.files import atomic_write

    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
