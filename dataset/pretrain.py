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
augmentation depends only on (seed, epoch, unit, position in the unit), so a
resumed epoch skips whole units and positions in a unit without reading them
(`set_start`).
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import os
import random
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import IterableDataset, get_worker_info

from dataset.config import DataConfig
from dataset.datasets import IMAGE_SUFFIXES, Skipped, make_reader
from dataset.files import READ_ERRORS, read_image
from dataset.lists import ConfigError, load_data_list
from dataset.sample import stack_experts
from dataset.text import pre_caption

logger = logging.getLogger(__name__)

LIST_CHUNK = 1000
TAR_ERRORS = (tarfile.TarError, OSError, EOFError)
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


def _tar_samples(tar: tarfile.TarFile):
    """(key, members) per webdataset sample: consecutive file members sharing
    the name up to the first dot of their base name."""
    key, members = None, []
    for member in tar:
        if not member.isfile():
            continue
        base = os.path.basename(member.name)
        name = os.path.join(os.path.dirname(member.name), base.partition(".")[0])
        if name != key and members:
            yield key, members
            members = []
        key = name
        members.append(member)
    if members:
        yield key, members


def iter_tar(path: str | Path, skip: int = 0):
    """Yield (key, {extension: bytes}) for each sample of a webdataset tar from
    the `skip`-th on; the data of the samples before is seeked over, never read."""
    with tarfile.open(path, mode="r:*") as tar:
        for key, members in itertools.islice(_tar_samples(tar), skip, None):
            files = {}
            for member in members:
                ext = os.path.basename(member.name).partition(".")[2]
                files[ext.lower()] = tar.extractfile(member).read()
            yield key, files


def stats_size(path: str | Path) -> int | None:
    """The sample count img2dataset writes beside each shard (`00000_stats.json`,
    key `successes`: only downloaded samples go into the tar), or None."""
    try:
        return int(json.loads(Path(path).with_name(f"{Path(path).stem}_stats.json").read_text())["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def tar_size(path: str | Path) -> int:
    """Items a tar unit streams, without reading any sample: its stats count,
    else its samples counted from member headers (one 512-byte read each),
    plus the one `Skipped` an unreadable rest of the shard streams as."""
    size = stats_size(path)
    if size is not None:
        return size
    size = 0
    try:
        with tarfile.open(path, mode="r:*") as tar:
            for _ in _tar_samples(tar):
                size += 1
    except TAR_ERRORS:
        size += 1
    return size


def _folder_images(unit: Unit) -> list[str]:
    return sorted(p.name for p in Path(unit.path).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def stream_rng(seed: int, epoch: int, unit_seed: int, position: int) -> random.Random:
    """Augmentation randomness of one streamed sample: (seed, epoch, unit,
    position in the unit) only, never what the samples before it drew."""
    return random.Random((seed << 112) | (epoch << 80) | (unit_seed << 48) | position)


class Pretrain(IterableDataset):
    """Yields (experts, caption) or `Skipped` for unusable samples."""

    def __init__(self, config: DataConfig):
        names = config.datasets
        unknown = [n for n in names if n not in SOURCES]
        if not names or unknown:
            raise ConfigError(f"pre-training 'datasets' must name some of {list(SOURCES)}, got {names}")
        self.seed = config.seed
        self.max_bad_fraction = config.max_bad_fraction
        self.epoch, self.rank, self.world_size = 0, 0, 1
        self.starts: list[tuple[int, int, int]] | None = None  # see set_start
        self.reader = make_reader(config, train=True, scale=PRETRAIN_SCALE)
        self.roots, self.lists, self.web_units = {}, {}, []
        for name in names:
            key, list_name, _ = SOURCES[name]
            root = getattr(config, key) or config.data_path
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
        self.epoch, self.starts = epoch, None

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

    def unit_size(self, unit: Unit) -> int:
        """Items (samples and Skipped) the unit streams, known without reading a sample."""
        if unit.kind == "list":
            return unit.stop - unit.start
        if unit.kind == "folder":
            return len(_folder_images(unit))
        return tar_size(unit.path)

    def set_start(self, start_batch: int, batch_size: int, num_workers: int, drop_last: bool) -> None:
        """Make this epoch's DataLoader continue at its batch `start_batch` (a
        resume), from unit sizes alone. The DataLoader takes batches from its
        workers in turn, passing over those whose stream has ended; each batch is
        the next `batch_size` items of one worker's stream (a short last one is
        dropped with `drop_last`). So each worker skips its own count of items,
        and as the DataLoader starts with worker 0, streams are rotated over the
        workers to put the one whose batch is due first there."""
        streams = max(num_workers, 1)
        ends = [itertools.accumulate(map(self.unit_size, self.units(w, streams))) for w in range(streams)]
        known = [[0] for _ in range(streams)]  # items up to the end of each unit, counted only as far as needed

        def holds(w: int, items: int) -> bool:
            while known[w][-1] < items and (end := next(ends[w], None)) is not None:
                known[w].append(end)
            return known[w][-1] >= items

        batches, position, last = [0] * streams, 0, streams - 1  # each stream's batches before the start; the last's
        while position < start_batch:
            before = position
            for w in range(streams):
                need = (batches[w] + 1) * batch_size if drop_last else batches[w] * batch_size + 1
                if position < start_batch and holds(w, need):
                    batches[w] += 1
                    position, last = position + 1, w
            if position == before:
                raise ValueError(f"cannot start at batch {start_batch}: rank {self.rank}'s epoch has {position}")
        self.starts = []
        for i in range(streams):
            w = (last + 1 + i) % streams
            skip = bisect.bisect_right(known[w], batches[w] * batch_size) - 1
            self.starts.append((w, skip, batches[w] * batch_size - known[w][skip]))
        if start_batch:
            logger.info(
                "epoch %d rank %d: starting at batch %d; per worker (stream, units skipped, then items skipped) %s",
                self.epoch,
                self.rank,
                start_batch,
                self.starts,
            )

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream, skip, start = self.starts[worker] if self.starts else (worker, 0, 0)
        for i, unit in enumerate(self.units(stream, num_workers)[skip:]):
            yield from self._iter_unit(unit, start if i == 0 else 0)

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

    def _iter_unit(self, unit: Unit, start: int = 0):
        """The unit's items from position `start` on (those before are not
        read): a list chunk or folder in an order shuffled by a unit RNG, a tar
        in its stored order; each sample's augmentation has its own RNG."""
        unit_seed = zlib.crc32(f"{unit.path}:{unit.start}".encode())
        order_rng = random.Random((self.seed << 80) | (self.epoch << 48) | unit_seed)

        def rng(position: int) -> random.Random:
            return stream_rng(self.seed, self.epoch, unit_seed, position)

        if unit.kind == "list":
            entries = self.lists[unit.source]
            order = list(range(unit.start, unit.stop))
            order_rng.shuffle(order)
            for position in range(start, len(order)):
                entry = entries[order[position]]
                rel = _vg_name(entry["image"]) if unit.source == "vg" else entry["image"]
                yield self._sample(unit, rel, None, entry["caption"], rng(position))
        elif unit.kind == "folder":
            names = _folder_images(unit)
            order_rng.shuffle(names)
            for position in range(start, len(names)):
                yield self._sample(unit, f"{Path(unit.path).name}/{names[position]}", None, None, rng(position))
        else:
            items = self._iter_tar(unit, start, rng)
            size = stats_size(unit.path)
            if size is not None:  # the count skipping goes by: missing samples stream as unreadable ones
                lost = Skipped(f"{unit.path}: holds fewer samples than the {size} of its stats file")
                items = itertools.islice(itertools.chain(items, itertools.repeat(lost)), max(0, size - start))
            yield from items

    def _iter_tar(self, unit: Unit, start: int, rng):
        shard = Path(unit.path).stem
        try:
            for position, (key, files) in enumerate(iter_tar(unit.path, skip=start), start=start):
                image_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
                rel = f"{shard}/{os.path.basename(key)}.{image_ext or 'jpg'}"
                if image_ext is None or "txt" not in files:
                    yield Skipped(f"{unit.path}: sample {key} lacks an image or a .txt caption")
                    continue
                caption = files["txt"].decode("utf-8", "replace")
                yield self._sample(unit, rel, files[image_ext], caption, rng(position))
        except TAR_ERRORS as e:
            logger.warning("%s: shard unreadable from here on (%s)", unit.path, e)
            yield Skipped(f"{unit.path}: {type(e).__name__}: {e}")

    def collate(self, samples):
        experts, captions = zip(*samples)
        return stack_experts(experts), list(captions)
