"""Instance maps (object detection): a grey PNG of instance ids (255 = none) and a
JSON sidecar of instance id -> class id in the detection label space. The model
sees each pixel's class feature plus an embedding of its instance.
In memory: `Instances(ids, classes)`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.files import atomic_write
from common.labels.base import NONE_ID, LabelKind, SampleError, check_ids_array, present_ids, read_ids, save_png

SPACE = "detection"


@dataclass
class Instances:
    ids: np.ndarray  # (H, W) uint8, 255 = none
    classes: dict[int, int]  # instance id -> class id


def _read_classes(path: Path):
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise SampleError(f"{path}: not valid JSON ({e})") from e


class InstanceMap(LabelKind):
    name = "instance"
    fill = NONE_ID
    painted = True
    stem_upsample = 4
    sidecars = (".json",)
    instances = True

    def read(self, path: Path, size, expert, spaces):
        """JSON entries for instances absent from the PNG are ignored; a PNG instance
        the JSON does not name, or a class outside the space, makes the sample unusable."""
        ids = read_ids(path, size)
        if ids is None:
            return None, None
        present = present_ids(ids)
        json_path = path.with_suffix(".json")
        classes = (_read_classes(json_path) or {}) if present else {}
        if not isinstance(classes, dict):
            raise SampleError(f"{json_path}: expected an object of instance id -> class id")
        table = spaces.tables[SPACE]
        num_classes = table.shape[0] - 1
        rows = torch.full((256,), num_classes, dtype=torch.long)
        for inst in present:
            cls = classes.get(str(inst))
            if cls is None:
                raise SampleError(f"{path}: instance {inst} has no class in {json_path}")
            if not isinstance(cls, int) or not 0 <= cls < num_classes:
                raise SampleError(
                    f"{json_path}: instance {inst} has class {cls!r}, outside the {num_classes}-class detection space"
                )
            rows[inst] = cls
        return Image.fromarray(ids, "L"), table[rows]

    def empty(self, size, expert, spaces):
        table = spaces.tables[SPACE]
        return Image.new("L", size, NONE_ID), table[-1].expand(256, -1)

    def found_nothing(self, label: Instances) -> bool:
        return not label.classes

    def write(self, path: Path, label: Instances) -> None:
        """The JSON first, the PNG last: a PNG on disk means the label is complete."""
        ids = check_ids_array(label.ids, path)
        unnamed = sorted(set(present_ids(ids)) - {int(i) for i in label.classes})
        if unnamed:
            raise ValueError(f"{path}: instances {unnamed} are in the map but have no class")
        payload = json.dumps({str(int(i)): int(c) for i, c in sorted(label.classes.items())})
        atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(payload, encoding="utf-8"))
        save_png(path, Image.fromarray(ids, "L"))

    def model_input(self, features_BDHW: torch.Tensor, ids_B1HW: torch.Tensor):
        return {"label": features_BDHW, "instance": ids_B1HW.long()}

    def stem_input(self, x):
        return x["label"]
