"""Map-style datasets: captioning (COCO Karpathy, NoCaps), VQA (VQAv2 + VG QA)
and a plain image folder (demo), in the official data-list formats."""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from common.label_space import load_label_spaces
from common.modalities import EXPERTS
from dataset.config import DataConfig, as_data_config
from dataset.files import READ_ERRORS
from dataset.lists import ConfigError, load_data_list
from dataset.sample import ExpertReader, stack_experts
from dataset.text import pre_caption, pre_question
from dataset.transforms import Transform

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
VG_QA_WEIGHT = 0.2


class Skipped:
    """Stands in for a sample whose files are unusable; the collate drops it
    and the loader counts it (never replaced by another sample's data)."""

    def __init__(self, reason: str):
        self.reason = reason

    def __repr__(self) -> str:
        return f"Skipped({self.reason!r})"


def list_images(root: Path, what: str, exclude: Path | None = None) -> list[Path]:
    """Every image file under `root` (recursively, sorted), leaving out the `exclude` tree."""
    if not root.is_dir():
        raise ConfigError(f"{what}: {root} is not a folder")
    skip = exclude.resolve() if exclude is not None else None
    paths = [
        p
        for p in sorted(root.rglob("*"))
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not (skip and p.resolve().is_relative_to(skip))
    ]
    if not paths:
        raise ConfigError(f"{what}: no {'/'.join(IMAGE_SUFFIXES)} files under {root}")
    return paths


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """Augmentation randomness that depends only on (seed, epoch, index)."""
    return random.Random((seed << 80) | (epoch << 48) | index)


def make_reader(config: DataConfig | Mapping[str, Any], train: bool, scale=(0.5, 1.0)) -> ExpertReader:
    config = as_data_config(config)
    experts = config.experts
    # `label_path: null` means no labels on disk: fine for rgb alone (PrismerZ).
    if experts and config.label_path is None:
        raise ConfigError(
            f"config's 'label_path' is null (no labels on disk) but experts {experts} need labels: "
            "set label_path to their label tree, or experts to ['none']"
        )
    painted = any(EXPERTS[e].kind.painted for e in experts)
    spaces = load_label_spaces(config.label_space_path) if painted else None
    transform = Transform(
        config.image_resolution, train=train and config.augment, scale=scale, label_resolution=config.label_resolution
    )
    return ExpertReader(config.data_path, config.label_path, experts, spaces, transform)


class ExpertDataset(Dataset):
    """Shared machinery: expert reading, per-sample seeded augmentation, and
    turning unreadable samples into `Skipped` markers."""

    def __init__(self, config: DataConfig, train: bool):
        self.train = train
        self.seed = config.seed
        self.max_bad_fraction = config.max_bad_fraction
        self.epoch = 0
        self.reader = make_reader(config, train)
        self.data_list: list[dict] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.data_list)

    def __getitem__(self, index: int):
        try:
            return self.load(index, sample_rng(self.seed, self.epoch, index))
        except READ_ERRORS as e:
            logger.debug("skipping sample %d: %s", index, e)
            image = self.data_list[index].get("image", "")
            return Skipped(f"entry {index} ({image}): {type(e).__name__}: {e}")

    def load(self, index: int, rng: random.Random):
        raise NotImplementedError


class Caption(ExpertDataset):
    """`dataset`: coco (Karpathy train/test, images in `vqav2/`), nocaps
    (train on COCO Karpathy train, test on NoCaps val) or demo (a folder).
    Train samples are (experts, caption); test samples (experts, index).
    Training captions start with the config's `prefix` ("A picture of" in
    fine-tuning), as the official data pipeline writes them; the model keeps
    the prefix tokens out of the loss."""

    IMAGE_DIR = {"coco": "vqav2", "nocaps": "nocaps"}

    def __init__(self, config: DataConfig, train: bool):
        super().__init__(config, train)
        self.dataset = config.dataset
        self.prefix = config.prefix
        root = Path(config.data_path)
        if self.dataset not in ("coco", "nocaps"):
            raise ConfigError(f"caption dataset {self.dataset!r} is not one of 'coco', 'nocaps', 'demo'")
        if train:
            self.image_dir = "vqav2"
            keys = {"image": str, "caption": str}
            self.data_list = load_data_list(root / "coco_karpathy_train.json", keys, "captions")
        elif self.dataset == "coco":
            self.image_dir = "vqav2"
            self.data_list = load_data_list(root / "coco_karpathy_test.json", {"image": str}, "captions")
        else:
            self.image_dir = "nocaps"
            self.data_list = load_data_list(root / "nocaps_val.json", {"image": str, "img_id": (int, str)}, "captions")

    def load(self, index, rng):
        entry = self.data_list[index]
        experts = self.reader(self.image_dir, entry["image"], rng)
        if not self.train:
            return experts, index
        return experts, pre_caption(f"{self.prefix} {entry['caption']}" if self.prefix else entry["caption"])

    def collate(self, samples):
        experts, second = zip(*samples)
        return stack_experts(experts), (list(second) if self.train else torch.tensor(second))


class ImageFolder(ExpertDataset):
    """Every image under `data_path` (recursively), for the demo. Labels at
    `<label_path>/<expert>/<data_path's folder name>/<relative path>.png`,
    which is the official demo layout. Samples are (experts, index)."""

    def __init__(self, config: DataConfig):
        super().__init__(config, train=False)
        root = Path(config.data_path)
        paths = list_images(root, "demo images")
        self.reader.data_path = str(root.parent)
        self.image_dir = root.name
        self.data_list = [{"image": p.relative_to(root).as_posix()} for p in paths]

    def load(self, index, rng):
        return self.reader(self.image_dir, self.data_list[index]["image"], rng), index

    def collate(self, samples):
        experts, index = zip(*samples)
        return stack_experts(experts), torch.tensor(index)


class VQA(ExpertDataset):
    """`datasets` picks the training lists: 'vqav2' (vqav2_train_val.json) and
    'vg' (vg_qa.json, answers weighted 0.2). Train samples are (experts,
    question, answers, weights); test samples (experts, index, question,
    question_id), with `answer_list` loaded for ranking."""

    LISTS = {"vqav2": "vqav2_train_val.json", "vg": "vg_qa.json"}
    IMAGE_DIR = {"vqa": "vqav2", "vg": "vg"}

    def __init__(self, config: DataConfig, train: bool):
        super().__init__(config, train)
        root = Path(config.data_path)
        if train:
            names = config.datasets or ["vqav2"]
            unknown = [n for n in names if n not in self.LISTS]
            if unknown:
                raise ConfigError(f"VQA datasets {unknown} unknown; choose from {list(self.LISTS)}")
            for name in names:
                keys = {"image": str, "question": str, "answer": list, "dataset": str}
                self.data_list += load_data_list(root / self.LISTS[name], keys, f"VQA dataset {name!r}")
        else:
            keys = {"image": str, "question": str, "question_id": int}
            self.data_list = load_data_list(root / "vqav2_test.json", keys, "VQA test")
            self.answer_list = load_data_list(root / "answer_list.json", None, "VQA answers")

    def load(self, index, rng):
        entry = self.data_list[index]
        source = entry.get("dataset", "vqa")
        if source not in self.IMAGE_DIR:
            raise ValueError(f"'dataset' is {source!r}, expected 'vqa' or 'vg'")
        experts = self.reader(self.IMAGE_DIR[source], entry["image"], rng)
        question = pre_question(entry["question"])
        if not self.train:
            return experts, index, question, entry["question_id"]
        answers = [str(a) for a in entry["answer"]]
        if source == "vg":
            weights = [VG_QA_WEIGHT] * len(answers)
        else:
            weights = entry.get("weight", [1.0 / len(answers)] * len(answers))
            if len(weights) != len(answers):
                raise ValueError(f"{len(answers)} answers but {len(weights)} weights")
        return experts, question, answers, torch.tensor(weights, dtype=torch.float32)

    def collate(self, samples):
        """Train: (experts, questions, answers flattened, weights flattened,
        answers per question) so each question keeps its own number of answers."""
        if not self.train:
            experts, index, questions, qids = zip(*samples)
            return stack_experts(experts), torch.tensor(index), list(questions), list(qids)
        experts, questions, answers, weights = zip(*samples)
        return (
            stack_experts(experts),
            list(questions),
            [a for group in answers for a in group],
            torch.cat(weights),
            [len(group) for group in answers],
        )
