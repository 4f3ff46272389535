"""The data keys of a run, typed, with one default each. A training run's
RunConfig (helpers/config.py) inherits them; the datasets read nothing else."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from common.config import from_mapping
from common.modalities import parse_experts
from dataset.lists import ConfigError


@dataclass(kw_only=True)
class DataConfig:
    # Shared with the model: a run takes them from its model keys.
    experts: list[str]
    image_resolution: int
    # The official keys; see dataset.create_dataset.
    dataset: str = "coco"  # caption: coco | nocaps | demo (a folder of images)
    datasets: list[str] = field(default_factory=list)  # VQA: vqav2, vg; pre-training: coco, vg, cc3m_sgu, cc12m
    data_path: str = "data"
    # Pre-training sources (official keys); each falls back to data_path.
    coco_data_path: str | None = None
    vg_data_path: str | None = None
    cc3m_data_path: str | None = None
    cc12m_data_path: str | None = None
    label_path: str | None = "data/experts"  # null: no labels on disk (PrismerZ)
    label_space_path: str | None = None  # None: the official label spaces shipped in common/label_spaces
    label_resolution: int = 224  # official; smaller only for small-scale research
    # Official training augmentation: random crop (area 0.5-1), flip, RandAugment. Off for a
    # world whose answers a crop can change (a count, an object cropped out).
    augment: bool = True
    prefix: str = ""  # caption fine-tuning: "A picture of"
    max_bad_fraction: float = 0.5  # of a batch's samples unreadable before the loader stops
    seed: int = 42  # augmentation draws depend on (seed, epoch, sample) only

    def __post_init__(self):
        self.experts = parse_experts(self.experts)
        if self.label_resolution < 1 or self.image_resolution < 1:
            raise ValueError(
                f"image_resolution and label_resolution must be positive, got {self.image_resolution}, "
                f"{self.label_resolution}"
            )
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "data config") -> DataConfig:
        try:
            return from_mapping(cls, values, where)
        except ValueError as e:
            raise ConfigError(str(e)) from e


def as_data_config(config: DataConfig | Mapping[str, Any]) -> DataConfig:
    return config if isinstance(config, DataConfig) else DataConfig.from_dict(config)
