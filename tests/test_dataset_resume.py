"""Resuming an epoch at DataLoader batch k: the batches of the whole epoch from k on, tensor for tensor,
with no file of a sample before k read (those files are broken here, and nothing is counted unreadable)."""

import json
import tarfile
from pathlib import Path

import pytest
import torch

from dataset import create_dataset, create_loader
from tests.dataset_builders import (
    coco_world,
    img2dataset_folders,
    img2dataset_tars,
    jpeg_bytes,
    write_json,
    write_labels,
    write_tar,
)

BROKEN = b"not an image"


def _run(dataset, num_workers, start=0, epoch=1, batch_size=2, **kw):
    """(loader, batches) of one epoch started at `start`."""
    loader = create_loader(dataset, batch_size, num_workers, train=True, max_bad_fraction=1.0, **kw)
    loader.set_epoch(epoch, start)
    return loader, list(loader)


def _assert_equal(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_equal(x, y)
    else:
        assert a == b


def _captions(batches) -> list[str]:
    return [c for _, captions in batches for c in captions]


# Map-style (caption training): the sampler starts at k * batch_size of this rank's order.


@pytest.fixture
def coco(tmp_path):
    config = coco_world(tmp_path, n=16, experts=["depth"]) | {"image_resolution": 32, "label_resolution": 32}
    return config, create_dataset("caption", config)[0]


def _break_coco(config, captions):
    """Break the image and depth label of each training sample with these captions ("... number <i>")."""
    for caption in captions:
        name = f"train2014/COCO_train2014_{int(caption.split()[-1]):012d}"
        Path(config["data_path"], "vqav2", f"{name}.jpg").write_bytes(BROKEN)
        Path(config["label_path"], "depth", "vqav2", f"{name}.png").write_bytes(BROKEN)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_map_style_resume_continues_the_epoch_without_reading_before_it(coco, num_workers):
    config, train = coco
    _, full = _run(train, num_workers, rank=1, world_size=2)
    assert len(full) == 4  # 8 of the 16 samples on rank 1, batches of 2
    for k in range(1, 5):
        loader, tail = _run(train, num_workers, start=k, rank=1, world_size=2)
        assert len(loader) == 4 and loader.position == 4
        _assert_equal(tail, full[k:])
    _break_coco(config, _captions(full[:2]))
    loader, tail = _run(train, num_workers, start=2, rank=1, world_size=2)
    _assert_equal(tail, full[2:])
    assert loader.skipped == 0 and loader.seen == 4
    whole, _ = _run(train, num_workers, rank=1, world_size=2)
    assert whole.skipped == 4  # what reading the broken samples would have counted


def test_position_counts_a_batch_of_unreadable_samples_and_resumes_after_it(coco):
    config, train = coco
    _, full = _run(train, 0)
    _break_coco(config, _captions(full[1:2]))  # every sample of batch 1
    loader = create_loader(train, 2, 0, train=True, max_bad_fraction=1.0)
    loader.set_epoch(1)
    positions, batches = [], []
    for batch in loader:
        positions.append(loader.position)
        batches.append(batch)
    assert positions == [1, 3, 4, 5, 6, 7, 8] and loader.skipped == 2
    for i, p in enumerate(positions):
        _assert_equal(_run(train, 0, start=p)[1], batches[i + 1 :])


def test_a_start_past_the_epoch_is_an_error(coco, tmp_path):
    _, train = coco
    with pytest.raises(ValueError, match="cannot start"):
        _run(train, 0, start=9)
    img2dataset_folders(tmp_path, "cc3m_sgu", [2, 3])
    with pytest.raises(ValueError, match="cannot start at batch 3"):
        _run(create_dataset("pretrain", _config(tmp_path, ["cc3m_sgu"])), 2, start=3)


# Streams (pre-training): each worker skips its own count of items, by whole units and positions in a unit.

SIZES = [1, 2, 3, 6]  # any two-worker split gives the workers unequal batch counts: one stream ends first


def _config(root, datasets):
    return {
        "coco_data_path": str(root),
        "vg_data_path": str(root),
        "cc3m_data_path": str(root),
        "cc12m_data_path": str(root),
        "label_path": str(root / "labels"),
        "experts": ["depth"],
        "image_resolution": 32,
        "label_resolution": 32,
        "datasets": datasets,
        "seed": 3,
    }


def _caption_lists(root):
    """COCO (7 entries) and VG (5) caption lists, one unit each; the caption names the image."""
    for source, folder, n in (("coco", "vqav2", 7), ("vg", "vg", 5)):
        entries = []
        for i in range(n):
            image = f"{source}{i}/{i}.jpg"
            (root / folder / image).parent.mkdir(parents=True)
            (root / folder / image).write_bytes(jpeg_bytes())
            write_labels(root / "labels", folder, image, ["depth"])
            caption = f"list {folder} {source} {i}"
            entries.append({"image": f"images/{image}" if source == "vg" else image, "caption": caption})
        list_name = "coco_karpathy_train.json" if source == "coco" else "vg_caption.json"
        write_json(root / list_name, entries)


def _break_list_samples(root, captions):
    for caption in captions:
        _, folder, source, i = caption.split()
        image = f"{source}{i}/{i}.jpg"
        (root / folder / image).write_bytes(BROKEN)
        (root / "labels" / "depth" / folder / image).with_suffix(".png").write_bytes(BROKEN)


def _break_web_samples(root, name, captions, stats):
    """Break the image and label of each sample (img2dataset key in its caption): in a folder the .jpg is garbage and
    the .txt gone; in a tar the .jpg data is garbage (headers intact), and with `stats` a tar all of whose samples
    are broken is garbage as a whole."""
    keys = {c.split()[-1] for c in captions}
    for key in keys:
        shard = key[:5]
        (root / "labels" / "depth" / name / shard / f"{key}.png").write_bytes(BROKEN)
        if (root / name / shard).is_dir():
            (root / name / shard / f"{key}.jpg").write_bytes(BROKEN)
            (root / name / shard / f"{key}.txt").unlink()
    for tar_path in (root / name).glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            members = [(m.name.split(".")[0], m.name.split(".")[1], tar.extractfile(m).read()) for m in tar]
        samples: dict = {}
        for key, ext, data in members:
            samples.setdefault(key, {})[ext] = BROKEN if key in keys and ext == "jpg" else data
        if stats and set(samples) <= keys:
            tar_path.write_bytes(BROKEN * 100)
        else:
            write_tar(tar_path, samples)


def _stream_world(root, kind):
    """(pre-training dataset, break(captions)) for a stream of the given kind of units."""
    if kind == "list":
        _caption_lists(root)
        return create_dataset("pretrain", _config(root, ["coco", "vg"])), lambda c: _break_list_samples(root, c)
    if kind == "folder":
        img2dataset_folders(root, "cc3m_sgu", SIZES, labels=root / "labels")
        dataset = create_dataset("pretrain", _config(root, ["cc3m_sgu"]))
        return dataset, lambda c: _break_web_samples(root, "cc3m_sgu", c, stats=False)
    stats = kind == "tar_stats"
    img2dataset_tars(root, "cc12m", SIZES, labels=root / "labels", stats=stats)
    dataset = create_dataset("pretrain", _config(root, ["cc12m"]))
    return dataset, lambda c: _break_web_samples(root, "cc12m", c, stats)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("kind", ["list", "folder", "tar", "tar_stats"])
def test_stream_resume_continues_the_epoch_without_reading_before_it(tmp_path, kind, num_workers):
    dataset, break_samples = _stream_world(tmp_path, kind)
    _, full = _run(dataset, num_workers)
    assert len(full) >= 5
    for k in range(1, len(full) + 1):
        loader, tail = _run(dataset, num_workers, start=k)
        assert loader.position == len(full)
        _assert_equal(tail, full[k:])
    k = len(full) - 2
    break_samples(_captions(full[:k]))
    loader, tail = _run(dataset, num_workers, start=k)
    _assert_equal(tail, full[k:])
    assert loader.skipped == 0 and loader.seen == 4
    if kind == "tar_stats":
        assert any(p.read_bytes() == BROKEN * 100 for p in (tmp_path / "cc12m").glob("*.tar"))
    whole, _ = _run(dataset, num_workers)
    assert whole.skipped == 2 * k  # what reading the broken samples would have counted


def test_tar_shard_with_fewer_samples_than_its_stats_streams_the_lost_ones_as_unreadable(tmp_path):
    img2dataset_tars(tmp_path, "cc12m", [4], stats=True)
    (tmp_path / "cc12m" / "00000_stats.json").write_text(json.dumps({"successes": 6}))
    dataset = create_dataset("pretrain", {**_config(tmp_path, ["cc12m"]), "experts": ["none"]})
    loader, full = _run(dataset, 0, batch_size=1)
    assert len(full) == 4 and loader.skipped == 2 and loader.position == 6
    loader, tail = _run(dataset, 0, start=2, batch_size=1)
    _assert_equal(tail, full[2:])
    assert loader.position == 6


@pytest.mark.parametrize("member, cut", [(3, "data"), (4, "header"), (6, "header"), (7, "start")])
def test_a_truncated_tar_is_counted_from_its_headers_as_it_streams(tmp_path, member, cut):
    """Cut in the data or the header of a member, or between two: the headers give the count the shard streams."""
    img2dataset_tars(tmp_path, "cc12m", [4, 4])
    shard = tmp_path / "cc12m" / "00000.tar"
    with tarfile.open(shard) as tar:
        m = tar.getmembers()[member]  # jpg, txt, json per sample
    end = {"data": m.offset_data + m.size // 2, "header": m.offset + 100, "start": m.offset}[cut]
    shard.write_bytes(shard.read_bytes()[:end])
    dataset = create_dataset("pretrain", {**_config(tmp_path, ["cc12m"]), "experts": ["none"]})
    loader = create_loader(dataset, 1, 0, train=True, max_bad_fraction=1.0)
    loader.set_epoch(1)
    assert dataset.units()[0].path == str(shard)  # read first: resuming past it goes by its count
    full = [(loader.position, batch) for batch in loader]  # position after each yielded batch
    assert len(full) < 8  # samples were lost
    for k in range(1, loader.position + 1):
        _assert_equal(_run(dataset, 0, start=k, batch_size=1)[1], [b for p, b in full if p > k])
