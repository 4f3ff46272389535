"""Label kinds: one module per kind of expert label, owning everything about it.

A kind (dense map, class map, instance map, OCR words) decides the label's
files and their reading and atomic writing, the fill value for pixels an
augmentation moves in from outside the image, how its ids become 64-d
label-space features (painting), the noise the ablation corrupts it with,
and what the encoder stem receives. Every expert row in the table of
modalities (common/modalities.py) names its kind; nothing else asks which
kind a label is.

Layout (official): the label of image `<data_path>/<dataset>/<image>` is
`<label_path>/<expert>/<dataset>/<image with .png>`, plus the kind's
sidecar files beside it. A missing or empty label file means the expert
found nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from common.labels.base import NONE_ID, LabelKind, SampleError
from common.labels.class_map import ClassMap
from common.labels.dense import Dense
from common.labels.instance import InstanceMap, Instances
from common.labels.ocr import OcrWords, Words, read_ocr_record, write_ocr_record

DENSE, CLASS_MAP, INSTANCE, OCR = Dense(), ClassMap(), InstanceMap(), OcrWords()

__all__ = [
    "CLASS_MAP",
    "DENSE",
    "INSTANCE",
    "NONE_ID",
    "OCR",
    "Instances",
    "LabelKind",
    "SampleError",
    "Words",
    "label_file",
    "read_ocr_record",
    "write_ocr_record",
]


def label_file(label_path: str | Path, expert: str, dataset: str, image: str) -> Path:
    """`<label_path>/<expert>/<dataset>/<image with .png>` (official layout)."""
    return Path(label_path, expert, dataset, os.path.splitext(image)[0] + ".png")
