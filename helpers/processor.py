"""Photos and their expert label files to a Prismer's input, in the Hugging Face style:

    processor = PrismerProcessor.for_model(model)
    inputs = processor([image], [{"depth": Path("labels/depth/photos/cat.png"), ...}])
    caption = model.generate(inputs)

The same reading, resizing, normalising and painting as the datasets' test
path (dataset/sample.py), so a model sees here exactly what it saw in evaluation.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from dataset import DataConfig, paint
from dataset.datasets import make_reader
from dataset.sample import stack_experts


class PrismerProcessor:
    def __init__(
        self,
        experts: Sequence[str],
        image_resolution: int,
        label_resolution: int = 224,
        label_space_path: str | None = None,
    ):
        config = DataConfig(
            experts=list(experts),
            image_resolution=image_resolution,
            label_resolution=label_resolution,
            label_space_path=label_space_path,
            label_path="",  # labels come as paths per image
        )
        self.experts = config.experts
        self.reader = make_reader(config, train=False)

    @classmethod
    def for_model(cls, model, label_resolution: int = 224, label_space_path: str | None = None) -> PrismerProcessor:
        return cls(model.config.experts, model.config.image_resolution, label_resolution, label_space_path)

    def __call__(
        self, images: Sequence[Image.Image], labels: Sequence[dict[str, Path]] | None = None, device=None
    ) -> dict:
        """The model input of a batch: RGB images (any mode or size) and, per image,
        each expert's label file; a missing one reads as "the expert found nothing"."""
        if labels is None:
            labels = [{}] * len(images)
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} label sets")
        samples = [
            self.reader.from_files(image.convert("RGB"), paths, random.Random(0))
            for image, paths in zip(images, labels)
        ]
        batch = stack_experts(samples)
        if device is not None:
            batch = {k: _to(v, device) for k, v in batch.items()}
        return paint(batch)


def _to(x, device):
    return {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else torch.as_tensor(x).to(device)
