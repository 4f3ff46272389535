"""Datasets for Prismer: images + expert labels + text, as batches the model eats.

Public API as in the official code: `create_dataset`, `create_loader`.
"""

from __future__ import annotations

from dataset.datasets import VQA, Caption, ImageFolder, Skipped
from dataset.files import SampleError, read_ocr_record, write_ocr_record
from dataset.label_space import LabelSpaces, load_label_spaces
from dataset.lists import ConfigError
from dataset.loader import DataError, Loader, create_loader
from dataset.pretrain import Pretrain
from dataset.sample import paint
from dataset.text import pre_caption, pre_question

__all__ = [
    "VQA",
    "Caption",
    "ConfigError",
    "DataError",
    "ImageFolder",
    "LabelSpaces",
    "Loader",
    "Pretrain",
    "SampleError",
    "Skipped",
    "create_dataset",
    "create_loader",
    "load_label_spaces",
    "paint",
    "pre_caption",
    "pre_question",
    "read_ocr_record",
    "write_ocr_record",
]


def create_dataset(kind: str, config: dict):
    """'pretrain' -> one streamed dataset; 'caption' / 'vqa' -> (train, test);
    'caption' with config['dataset'] == 'demo' -> (None, image folder)."""
    if kind == "pretrain":
        return Pretrain(config)
    if kind == "caption":
        if config.get("dataset") == "demo":
            return None, ImageFolder(config)
        return Caption(config, train=True), Caption(config, train=False)
    if kind == "vqa":
        return VQA(config, train=True), VQA(config, train=False)
    raise ConfigError(f"unknown dataset kind {kind!r}; expected 'pretrain', 'caption' or 'vqa'")
