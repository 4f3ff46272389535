"""Datasets for Prismer: images + expert labels + text, as batches the model eats.

Public API as in the official code: `create_dataset`, `create_loader`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.label_space import LabelSpaces, load_label_spaces
from common.labels import SampleError, read_ocr_record, write_ocr_record
from dataset.config import DataConfig, as_data_config
from dataset.datasets import VQA, Caption, ImageFolder, Skipped
from dataset.lists import ConfigError
from dataset.loader import DataError, Loader, create_loader
from dataset.pretrain import Pretrain
from dataset.sample import paint
from dataset.text import pre_caption, pre_question

__all__ = [
    "VQA",
    "Caption",
    "ConfigError",
    "DataConfig",
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


def create_dataset(kind: str, config: DataConfig | Mapping[str, Any]):
    """'pretrain' -> one streamed dataset; 'caption' / 'vqa' -> (train, test);
    'caption' with dataset 'demo' -> (None, image folder). `config`: a DataConfig
    (a training run's RunConfig is one) or a mapping of data keys."""
    config = as_data_config(config)
    if kind == "pretrain":
        return Pretrain(config)
    if kind == "caption":
        if config.dataset == "demo":
            return None, ImageFolder(config)
        return Caption(config, train=True), Caption(config, train=False)
    if kind == "vqa":
        return VQA(config, train=True), VQA(config, train=False)
    raise ConfigError(f"unknown dataset kind {kind!r}; expected 'pretrain', 'caption' or 'vqa'")
