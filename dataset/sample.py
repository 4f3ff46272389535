"""One sample's expert inputs: read the label files, augment, and paint id maps.

Painting placement (measured by `benchmarks/data.py`, numbers in its
docstring): workers ship each painted expert as a uint8 id map (1, 224, 224)
plus a (256, 64) per-sample table, and `paint` turns a whole batch into 64-d
feature maps with one gather after the batch reaches its device. A painted
map is 64 x 224 x 224 float32 = 12.8 MB per expert per sample: painting in
a worker cut its Prismer throughput from 33.8 to 26.4 samples/s/core, and
collating 16 painted samples into shared memory took 1.5 s against 66 ms for
the compact form, while on a GPU the gather writes those bytes at HBM speed
(~1 ms per batch of 32, estimated from bandwidth, not timed here).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from common.label_space import LabelSpaces
from common.labels import label_file
from common.modalities import EXPERTS, parse_experts
from dataset.files import read_image
from dataset.transforms import Transform

logger = logging.getLogger(__name__)


class ExpertReader:
    """Reads an image and its expert labels in the official layout and turns
    them into the compact sample form: `rgb` and dense maps as float tensors,
    painted experts as {"ids": uint8 (1, 224, 224), "table": (256, 64)}."""

    def __init__(self, data_path, label_path, experts, spaces: LabelSpaces | None, transform: Transform):
        self.data_path = data_path
        self.label_path = label_path
        self.experts = parse_experts(experts)
        self.spaces = spaces
        self.transform = transform
        if any(EXPERTS[e].kind.painted for e in self.experts) and spaces is None:
            raise ValueError(f"experts {self.experts} need label-space features")
        # Experts already reported as lacking a label file (once per process:
        # many absences usually mean a wrong `label_path`).
        self._reported_absent: set[str] = set()

    def image_path(self, dataset: str, image: str):
        return f"{self.data_path}/{dataset}/{image}"

    def __call__(self, dataset: str, image_name: str, rng: random.Random, image: Image.Image | None = None) -> dict:
        """Experts for `<data_path>/<dataset>/<image_name>` (or the given
        decoded `image`, for streamed shards)."""
        if image is None:
            image = read_image(self.image_path(dataset, image_name), self.transform.min_decode_side)
        paths = {name: label_file(self.label_path, name, dataset, image_name) for name in self.experts}
        return self.from_files(image, paths, rng)

    def from_files(self, image: Image.Image, paths: dict, rng: random.Random) -> dict:
        """The sample of a decoded image and its experts' label files (any paths;
        an expert without one reads as having found nothing)."""
        labels, tables = {}, {}
        for name in self.experts:
            labels[name], table = self._read_label(name, paths.get(name), image.size)
            if table is not None:
                tables[name] = table
        out = self.transform(image, labels, rng)
        for name, table in tables.items():
            out[name] = {"ids": out[name], "table": table}
        return out

    def _read_label(self, name: str, path, size):
        expert = EXPERTS[name]
        label, table = expert.kind.read(Path(path), size, expert, self.spaces) if path else (None, None)
        if label is None:
            self._report_absent(name, path)
            label, table = expert.kind.empty(size, expert, self.spaces)
        return label, table

    def _report_absent(self, name: str, path) -> None:
        if name not in self._reported_absent:
            self._reported_absent.add(name)
            logger.info("%s: label missing or empty, read as 'the expert found nothing' (reported once)", path)


def paint(experts: dict) -> dict:
    """Replace every compact painted expert {"ids" (B,1,H,W) uint8, "table"
    (B,256,64)} by its (B, 64, H, W) feature map: one gather over the batch's
    stacked tables; the expert's label kind says what the encoder receives
    (instance maps: {"label", "instance" (long)}).
    The result is in channels_last memory layout (the gather's natural order)."""
    out = {}
    for name, x in experts.items():
        if not (isinstance(x, dict) and "ids" in x):
            out[name] = x
            continue
        ids_B1HW, table_BRD = x["ids"], x["table"]
        B, R, D = table_BRD.shape
        offset_B = torch.arange(B, device=ids_B1HW.device) * R
        rows_BHW = ids_B1HW[:, 0].long() + offset_B.view(B, 1, 1)
        label_BDHW = F.embedding(rows_BHW, table_BRD.reshape(B * R, D)).permute(0, 3, 1, 2)
        out[name] = EXPERTS[name].kind.model_input(label_BDHW, ids_B1HW)
    return out


def stack_experts(samples: list[dict]) -> dict:
    """Collate a list of compact per-sample expert dicts into batch tensors."""
    out = {}
    for name, first in samples[0].items():
        if isinstance(first, dict):
            out[name] = {k: torch.stack([s[name][k] for s in samples]) for k in first}
        else:
            out[name] = torch.stack([s[name] for s in samples])
    return out
