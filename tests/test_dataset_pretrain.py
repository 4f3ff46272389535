import pytest

from dataset import ConfigError, create_dataset, create_loader
from tests.dataset_builders import img2dataset_folders, img2dataset_tars


def _config(root, datasets, experts=("none",)):
    return {
        "cc3m_data_path": str(root),
        "cc12m_data_path": str(root),
        "label_path": str(root / "labels"),
        "experts": list(experts),
        "image_resolution": 32,
        "datasets": datasets,
        "seed": 3,
    }


def _captions(dataset, rank, world_size, num_workers=0, epoch=0, batch_size=4):
    loader = create_loader(dataset, batch_size, num_workers, train=True, rank=rank, world_size=world_size)
    loader.set_epoch(epoch)
    return [c for _, captions in loader for c in captions]


def test_img2dataset_folders_stream_with_labels(tmp_path):
    img2dataset_folders(tmp_path, "cc3m_sgu", [4, 4], labels=tmp_path / "labels")
    dataset = create_dataset("pretrain", _config(tmp_path, ["cc3m_sgu"], ["depth"]))
    loader = create_loader(dataset, 4, 0, train=True)
    batches = list(loader)
    assert len(batches) == 2
    experts, captions = batches[0]
    assert experts["rgb"].shape == (4, 3, 32, 32) and experts["depth"].shape == (4, 1, 224, 224)
    assert experts["depth"].amax(dim=(1, 2, 3)).min() > 0.99  # every image found its label
    assert all(c.startswith("Cc3m_sgu caption") and "second" not in c for c in captions)
    assert loader.images_per_s > 0


def test_webdataset_tars_shard_disjointly_over_two_ranks(tmp_path):
    img2dataset_tars(tmp_path, "cc12m", [4, 4, 4, 4])
    dataset = create_dataset("pretrain", _config(tmp_path, ["cc12m"]))
    rank0, rank1 = _captions(dataset, 0, 2), _captions(dataset, 1, 2)
    assert len(rank0) == len(rank1) == 8
    assert not set(rank0) & set(rank1)
    assert len(set(rank0) | set(rank1)) == 16
    assert _captions(dataset, 0, 2) == rank0  # deterministic from the seed
    assert set(_captions(dataset, 0, 2, epoch=1)) != set(rank0)  # reshuffled across epochs


def test_two_workers_read_disjoint_units(tmp_path):
    img2dataset_tars(tmp_path, "cc12m", [3, 3, 3, 3])
    dataset = create_dataset("pretrain", _config(tmp_path, ["cc12m"]))
    captions = _captions(dataset, 0, 1, num_workers=2, batch_size=3)  # each worker batches its own samples
    assert len(captions) == len(set(captions)) == 12


def test_map_style_datasets_shard_over_two_ranks(tmp_path):
    from tests.dataset_builders import coco_world

    config = coco_world(tmp_path, n=6, experts=["depth"])
    train, _ = create_dataset("caption", config)
    rank0, rank1 = (_captions(train, r, 2, batch_size=1) for r in (0, 1))
    assert len(rank0) == len(rank1) == 3 and not set(rank0) & set(rank1)
    assert _captions(train, 0, 2, batch_size=1) == rank0


def test_missing_web_dataset_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cc12m"):
        create_dataset("pretrain", _config(tmp_path, ["cc12m"]))
    with pytest.raises(ConfigError, match="laion"):
        create_dataset("pretrain", _config(tmp_path, ["laion"]))


def test_caption_lists_and_web_folders_mix(tmp_path):
    from tests.dataset_builders import coco_world

    config = coco_world(tmp_path / "coco", n=4, experts=["depth"])
    img2dataset_folders(tmp_path, "cc3m_sgu", [2, 2])
    pretrain = create_dataset(
        "pretrain",
        {
            **_config(tmp_path, ["coco", "cc3m_sgu"], ["depth"]),
            "coco_data_path": config["data_path"],
            "label_path": config["label_path"],
        },
    )
    loader = create_loader(pretrain, 1, 0, train=True)
    captions = sorted(c for _, cs in loader for c in cs)
    assert len(captions) == 8 and loader.skipped == 0
    assert captions[-1] == "Cc3m_sgu caption 000010001" and "A red square number 3" in captions


def test_truncated_tar_shard_yields_what_it_holds_then_counts_a_skip(tmp_path):
    img2dataset_tars(tmp_path, "cc12m", [4])
    shard = tmp_path / "cc12m" / "00000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) * 6 // 10])
    dataset = create_dataset("pretrain", _config(tmp_path, ["cc12m"]))
    loader = create_loader(dataset, 1, 0, train=True, max_bad_fraction=1.0)
    captions = [c for _, cs in loader for c in cs]
    assert 1 <= len(captions) < 4 and loader.skipped >= 1
    assert all(c.startswith("Cc12m caption 00000") for c in captions)
