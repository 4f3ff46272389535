"""Class maps (segmentation): a grey PNG of class ids of a label space, 255 = none.
In memory: an (H, W) uint8 array."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from common.labels.base import NONE_ID, LabelKind, SampleError, check_ids_array, read_ids, save_png


class ClassMap(LabelKind):
    name = "class_map"
    fill = NONE_ID
    painted = True
    stem_upsample = 4

    def read(self, path: Path, size, expert, spaces):
        ids = read_ids(path, size)
        if ids is None:
            return None, None
        num_classes = spaces.num_classes(expert.label_space)
        counts = np.bincount(ids.ravel(), minlength=256)
        bad = np.flatnonzero(counts[num_classes:NONE_ID])
        if bad.size:
            first = int(bad[0]) + num_classes
            raise SampleError(f"{path}: class id {first} is outside the label space of {num_classes} classes")
        return Image.fromarray(ids, "L"), spaces.id_tables[expert.label_space]

    def empty(self, size, expert, spaces):
        return Image.new("L", size, NONE_ID), spaces.id_tables[expert.label_space]

    def write(self, path: Path, label: np.ndarray) -> None:
        save_png(path, Image.fromarray(check_ids_array(label, path), "L"))

    def noise(self, label: Image.Image, rng: np.random.Generator, num_classes: int | None) -> Image.Image:
        """Random classes of the label space everywhere."""
        return Image.fromarray(rng.integers(0, num_classes, (label.height, label.width), dtype=np.uint8), "L")
