"""The label-network protocol: the four steps `generate_experts.py` drives for every expert.

A network module under `experts/` defines one subclass named `Generator`;
the registry row (common/modalities.py) names the module. The driver reads
each image, calls `preprocess` in loader workers, batches inputs of equal
shape (so a batch never changes a result), runs `predict` under no_grad and
the run's autocast, and writes `to_label`'s result with the expert's label
kind (common/labels), atomically.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from common.modalities import EXPERTS, Expert


class LabelNetwork(abc.ABC):
    """One expert's label generator (several experts may share a class, e.g. seg_coco / seg_ade)."""

    # Experts whose labels of the same image `to_label` reads (detection orders
    # overlapping boxes by the depth label); the driver makes them first.
    uses_labels: tuple[str, ...] = ()

    def __init__(self, expert: str):
        self.expert: Expert = EXPERTS[expert]

    @abc.abstractmethod
    def load(self, weights: str | Path) -> nn.Module:
        """The network in eval mode, from a local weight file in the official format
        (read without unpickling code), or another format the module documents."""

    @abc.abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The (C, H, W) float input for one RGB image of any size, resized as the
        official pipeline does; inputs of equal shape are batched together."""

    @abc.abstractmethod
    def predict(self, model: nn.Module, x_BCHW: torch.Tensor) -> Sequence[Any]:
        """Raw outputs, one per image, in whatever form `to_label` takes."""

    @abc.abstractmethod
    def to_label(self, raw: Any, size: tuple[int, int], **labels: Path) -> Any:
        """The label at the original (W, H), in the in-memory form of the expert's
        kind (common/labels: a PIL image for dense maps, an (H, W) uint8 array of
        ids for class maps, ...). `labels`: the label file of each expert in
        `uses_labels`, for the same image."""
