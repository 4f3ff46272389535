"""Pre-training data, streamed: COCO and VG caption lists plus CC3M+SBU and
CC12M as written by img2dataset, either as folders (`00000/000000001.jpg`
+ `.txt`) or as webdataset `.tar` shards read member by member with
`tarfile`, so a 12M-image set is never listed in memory.

Work is split into units (one shard folder, one tar, or a chunk of a caption
list). Each epoch the units are shuffled from (seed, epoch) and dealt out:
rank r takes every world-th unit, then worker w of that rank every
num_workers-th, so every (rank, worker) reads a disjoint part. Ranks get
equally many units, not equally many samples (shards differ in size), so a
data-parallel loop should stop all ranks at a common step count. Samples are
shuffled within a folder or list chunk; a tar is read in its stored order
(img2dataset already writes shards in random URL order). A sample's
augmentation depends only on (seed, epoch, unit, position in the unit), not
on the samples read before it.
"""

from __future__ import annotations

import logging
import os
import random
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import IterableDataset, get_worker_info

from dataset.datasets import IMAGE_SUFFIXES, Skipped, make_reader
from dataset.files import READ_ERRORS, read_image
from dataset.lists import ConfigError, load_data_list
from dataset.sample import stack_experts
from dataset.text import pre_caption

logger = logging.getLogger(__name__)

LIST_CHUNK = 1000
PRETRAIN_SCALE = (0.5, 1.5)
# name -> (config key of its root, caption list or None for img2dataset output, image folder)
SOURCES = {
    "coco": ("coco_data_path", "coco_karpathy_train.json", "vqav2"),
    "vg": ("vg_data_path", "vg_caption.json", "vg"),
    "cc3m_sgu": ("cc3m_data_path", None, "cc3m_sgu"),
    "cc12m": ("cc12m_data_path", None, "cc12m"),
}


@dataclass(frozen=True)
class Unit:
    source: str
    kind: str  # "list", "folder" or "tar"
    path: str  # folder or tar file; the list's source name for "list"
    start: int = 0
    stop: int = 0


def _vg_name(image: str) -> str:
    """VG list entries carry a longer path; images live at `vg/<folder>/<file>`."""
    return "/".join(image.split("/")[-2:])


def iter_tar(path: str | Path):
    """Yield (key, {extension: bytes}) for each sample of a webdataset tar:
    consecutive members sharing the name up to the first dot of their base name."""
    key, files = None, {}
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            stem, _, ext = base.partition(".")
            name = os.path.join(os.path.dirname(member.name), stem)
            if name != key and files:
                yield key, files
                files = {}
            key = name
            files[ext.lower()] = tar.extractfile(member).read()
    if files:
        yield key, files


def stream_rng(seed: int, epoch: int, unit_seed: int, position: int) -> random.Random:
    """Augmentation randomness of one streamed sample: (seed, epoch, unit,
    position in the unit) only, never what the samples before it drew."""
    return random.Random((seed << 112) | (epoch << 80) | (unit_seed << 48) | position)


class Pretrain(IterableDataset):
    """Yields (experts, caption) or `Skipped` for unusable samples."""

    def __init__(self, config: dict):
        names = config.get("datasets") or []
        unknown = [n for n in names if n not in SOURCES]
        if not names or unknown:
            raise ConfigError(f"pre-training 'datasets' must name some of {list(SOURCES)}, got {names}")
        self.seed = int(config.get("seed", 0))
        self.max_bad_fraction = float(config.get("max_bad_fraction", 0.5))
        self.epoch, self.rank, self.world_size = 0, 0, 1
        self.reader = make_reader({"data_path": "", **config}, train=True, scale=PRETRAIN_SCALE)
        self.roots, self.lists, self.web_units = {}, {}, []
        for name in names:
            key, list_name, _ = SOURCES[name]
            root = config.get(key, config.get("data_path"))
            if root is None:
                raise ConfigError(f"pre-training dataset {name!r} needs {key!r} (or 'data_path') in the config")
            self.roots[name] = Path(root)
            if list_name:
                keys = {"image": str, "caption": str}
                self.lists[name] = load_data_list(Path(root, list_name), keys, f"dataset {name!r}")
            else:
                self.web_units += self._web_units(name, Path(root, name))

    @staticmethod
    def _web_units(name: str, folder: Path) -> list[Unit]:
        if not folder.is_dir():
            raise ConfigError(f"pre-training dataset {name!r}: {folder} does not exist")
        tars = sorted(folder.glob("*.tar"))
        if tars:
            return [Unit(name, "tar", str(p)) for p in tars]
        folders = sorted(p for p in folder.iterdir() if p.is_dir())
        if not folders:
            raise ConfigError(f"pre-training dataset {name!r}: no .tar shards or img2dataset folders in {folder}")
        return [Unit(name, "folder", str(p)) for p in folders]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def units(self, worker: int = 0, num_workers: int = 1) -> list[Unit]:
        """This (rank, worker)'s units for the current epoch. Every rank gets
        the same number of units (the few left over are dropped this epoch)."""
        rng = random.Random((self.seed << 32) | self.epoch)
        units = list(self.web_units)
        for name, entries in self.lists.items():
            for i in range(0, len(entries), LIST_CHUNK):
                units.append(Unit(name, "list", name, i, min(i + LIST_CHUNK, len(entries))))
        rng.shuffle(units)
        if len(units) < self.world_size:
            raise ConfigError(f"{len(units)} data units cannot be split over {self.world_size} ranks")
        usable = len(units) // self.world_size * self.world_size
        return units[self.rank : usable : self.world_size][worker::num_workers]

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for unit in self.units(worker, num_workers):
            yield from self._iter_unit(unit)

    def _sample(self, unit: Unit, rel: str, image_bytes: bytes | None, caption: str | None, rng: random.Random):
        """One (experts, caption), or Skipped naming what was unusable."""
        source_dir = SOURCES[unit.source][2]
        try:
            path = self.roots[unit.source] / source_dir / rel
            image = read_image(image_bytes if image_bytes is not None else path, self.reader.transform.min_decode_side)
            if caption is None:
                with open(path.with_suffix(".txt"), encoding="utf-8") as f:
                    caption = f.readline()
            experts = self.reader(source_dir, rel, rng, image=image)
            return experts, pre_caption(caption)
        except READ_ERRORS as e:
            logger.debug("skipping %s/%s: %s", unit.source, rel, e)
            return Skipped(f"{unit.source}/{rel}: {type(e).__name__}: {e}")

    def _iter_unit(self, unit: Unit):
        """The unit's items: the order of a list chunk or folder is shuffled by a
        unit RNG; each sample's augmentation gets its own RNG from its position."""
        unit_seed = zlib.crc32(f"{unit.path}:{unit.start}".encode())
        order_rng = random.Random((self.seed << 80) | (self.epoch << 48) | unit_seed)

        def rng(position: int) -> random.Random:
            return stream_rng(self.seed, self.epoch, unit_seed, position)

        if unit.kind == "list":
            entries = self.lists[unit.source]
            order = list(range(unit.start, unit.stop))
            order_rng.shuffle(order)
            for position, i in enumerate(order):
                image = entries[i]["image"]
                rel = _vg_name(image) if unit.source == "vg" else image
                yield self._sample(unit, rel, None, entries[i]["caption"], rng(position))
        elif unit.kind == "folder":
            folder = Path(unit.path)
            names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            order_rng.shuffle(names)
            for position, name in enumerate(names):
                yield self._sample(unit, f"{folder.name}/{name}", None, None, rng(position))
        else:
            shard = Path(unit.path).stem
            try:
                for position, (key, files) in enumerate(iter_tar(unit.path)):
                    image_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
                    rel = f"{shard}/{os.path.basename(key)}.{image_ext or 'jpg'}"
                    if image_ext is None or "txt" not in files:
                        yield Skipped(f"{unit.path}: sample {key} lacks an image or a .txt caption")
                        continue
                    caption = files["txt"].decode("utf-8", "replace")
                    yield self._sample(unit, rel, files[image_ext], caption, rng(position))
            except (tarfile.TarError, OSError, EOFError) as e:
                logger.warning("%s: shard unreadable from here on (%s)", unit.path, e)
                yield Skipped(f"{unit.path}: {type(e).__name__}: {e}")

    def collate(self, samples):
        experts, captions = zip(*samples)
        return stack_experts(experts), list(captions)
