import numpy as np
import pytest
import torch
from PIL import Image

from dataset import ConfigError, create_dataset, create_loader, load_label_spaces, paint
from dataset.files import read_image
from dataset.transforms import CLIP_MEAN, CLIP_STD
from tests.dataset_builders import DET_CLASS, SEG_CLASS, coco_world, square_image, write_labels


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return coco_world(tmp_path_factory.mktemp("coco"))


def _batch(dataset, batch_size=2, **kw):
    return next(iter(create_loader(dataset, batch_size, 0, train=True, **kw)))


def test_caption_train_batch_shapes_dtypes_ranges(world):
    train, test = create_dataset("caption", world)
    experts, captions = _batch(train, 4)
    assert set(experts) == {"rgb", *world["experts"]}
    assert experts["rgb"].shape == (4, 3, 64, 64) and experts["rgb"].dtype == torch.float32
    for name, c in (("depth", 1), ("normal", 3), ("edge", 1)):
        x = experts[name]
        assert x.shape == (4, c, 224, 224)
        assert x.min() >= -1 and x.max() <= 1 + 1e-6
    for name in ("seg_coco", "seg_ade", "ocr_detection"):
        assert experts[name].shape == (4, 64, 224, 224) and experts[name].dtype == torch.float32
    det = experts["obj_detection"]
    assert det["label"].shape == (4, 64, 224, 224)
    assert det["instance"].shape == (4, 1, 224, 224) and det["instance"].dtype == torch.long
    assert set(det["instance"].unique().tolist()) <= {3, 255}
    # The prefix is written before the caption and the whole cleaned as one sentence, as officially.
    assert all(c.startswith("A picture of a red square number") and "." not in c for c in captions)
    _, zero_shot = _batch(create_dataset("caption", {**world, "prefix": ""})[0], 4)
    assert all(c.startswith("A red square number") for c in zero_shot)


def test_caption_test_set_yields_indices(world):
    _, test = create_dataset("caption", world)
    experts, index = next(iter(create_loader(test, 8, 0, train=False)))
    assert index.tolist() == [0, 1]
    assert experts["rgb"].shape == (2, 3, 64, 64)
    _, nocaps = create_dataset("caption", {**world, "dataset": "nocaps"})
    assert len(nocaps) == 1 and nocaps.image_dir == "nocaps"


def _rgb_mask(rgb_3HW: torch.Tensor) -> torch.Tensor:
    """Pixels of the white square: brighter than midway between the brightest
    pixel and the median (background or fill)."""
    x = (rgb_3HW * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)).mean(0)
    return x > (x.max() + x.median()) / 2


def test_labels_stay_under_the_same_pixels_after_augmentation(world):
    """Over many random crops/flips/RandAugment draws, each expert's square
    covers the RGB square (compared at 224 px) and painted maps carry the class feature."""
    config = {**world, "image_resolution": 96, "experts": ["depth", "seg_coco", "obj_detection"]}
    train, _ = create_dataset("caption", config)
    spaces = load_label_spaces()
    checked = 0
    for epoch in range(12):
        train.set_epoch(epoch)
        experts = paint(train.collate([train[0]])[0])
        rgb = torch.nn.functional.interpolate(_rgb_mask(experts["rgb"][0])[None, None].float(), size=224)[0, 0] > 0.5
        depth = experts["depth"][0, 0] > 0
        seg = (experts["seg_coco"][0] - spaces.tables["coco"][SEG_CLASS].view(64, 1, 1)).abs().amax(0) < 1e-6
        det = experts["obj_detection"]["instance"][0, 0] == 3
        if rgb.sum() < 200:
            continue  # the square was cropped or moved away
        checked += 1
        for name, mask in (("depth", depth), ("seg_coco", seg), ("obj_detection", det)):
            iou = (mask & rgb).sum() / (mask | rgb).sum()
            assert iou > 0.85, f"{name} misaligned in epoch {epoch}: IoU {iou:.2f}"
        label = experts["obj_detection"]["label"][0]
        torch.testing.assert_close(label[:, det].T, spaces.tables["detection"][DET_CLASS].expand(int(det.sum()), 64))
    assert checked >= 6


def test_augmentation_is_deterministic_per_seed_and_varies_per_epoch(world):
    train, _ = create_dataset("caption", world)
    a, b = train[1][0]["rgb"], train[1][0]["rgb"]
    torch.testing.assert_close(a, b)
    train.set_epoch(1)
    assert not torch.equal(a, train[1][0]["rgb"])


def test_test_transform_is_a_plain_resize(world):
    _, test = create_dataset("caption", world)
    experts, _ = test[0]
    expected = np.asarray(square_image().resize((64, 64), Image.BICUBIC), np.float32) / 255
    rgb = experts["rgb"] * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
    assert (rgb.permute(1, 2, 0).numpy() - expected).__abs__().mean() < 0.03  # JPEG noise only


def test_augment_false_trains_on_the_plain_resize_labels_included(world):
    """A world whose answers a crop could change (counts) trains on whole images."""
    train, test = create_dataset("caption", {**world, "augment": False})
    first = train[1][0]
    train.set_epoch(1)
    again = train[1][0]
    plain = test[[e["image"] for e in test.data_list].index(train.data_list[1]["image"])][0]
    for name in plain:
        torch.testing.assert_close(first[name], plain[name], msg=name)
        torch.testing.assert_close(again[name], plain[name], msg=name)


def test_prismerz_config_gives_rgb_only(world):
    train, _ = create_dataset("caption", {**world, "experts": ["none"]})
    experts, _ = _batch(train)
    assert set(experts) == {"rgb"}


def test_vqa_batches_carry_answers_and_weights(world):
    train, test = create_dataset("vqa", world)
    assert len(train) == 3
    experts, questions, answers, weights, n = train.collate([train[i] for i in range(3)])
    assert questions == ["What colour is the square?", "Is it a square?", "What shape?"]
    assert answers == ["red", "crimson", "yes", "square"]
    assert n == [2, 1, 1]
    torch.testing.assert_close(weights, torch.tensor([0.7, 0.3, 1.0, 0.2]))
    assert experts["rgb"].shape[0] == 3
    experts, index, questions, qids = next(iter(create_loader(test, 4, 0, train=False)))
    assert qids == [7] and questions == ["What colour?"] and test.answer_list == ["red", "blue", "square"]


def test_missing_optional_dataset_is_a_config_error(world, tmp_path):
    with pytest.raises(ConfigError, match="vg_qa.json"):
        create_dataset("vqa", {**world, "data_path": str(tmp_path), "datasets": ["vg"]})
    with pytest.raises(ConfigError, match="unknown"):
        create_dataset("vqa", {**world, "datasets": ["gqa"]})


def test_demo_image_folder(tmp_path):
    images = tmp_path / "helpers" / "images"
    images.mkdir(parents=True)
    square_image().save(images / "a.jpg")
    square_image().save(images / "b.png")
    write_labels(tmp_path / "labels", "helpers", "images/a.jpg", ["depth"])
    train, demo = create_dataset(
        "caption",
        {
            "dataset": "demo",
            "data_path": str(tmp_path / "helpers"),
            "label_path": str(tmp_path / "labels"),
            "experts": ["depth"],
            "image_resolution": 32,
        },
    )
    assert train is None and len(demo) == 2
    experts, index = next(iter(create_loader(demo, 2, 0, train=False)))
    assert index.tolist() == [0, 1] and experts["depth"].shape == (2, 1, 224, 224)
    assert experts["depth"][0].max() > 0.99 and experts["depth"][1].max() == -1  # b has no label: constant


def test_painting_on_a_device_matches_painting_in_workers(world):
    train, _ = create_dataset("caption", world)
    host = next(iter(create_loader(train, 2, 0, train=True)))[0]
    device = next(iter(create_loader(train, 2, 0, train=True, device="cpu")))[0]
    for name in ("seg_coco", "ocr_detection"):
        torch.testing.assert_close(host[name], device[name])
    torch.testing.assert_close(host["obj_detection"]["label"], device["obj_detection"]["label"])


def test_large_jpeg_is_decoded_smaller_and_labels_follow(world, tmp_path):
    """An 8x larger JPEG is decoded at reduced scale; labels at full size still line up."""
    config = {**world, "data_path": str(tmp_path / "data"), "label_path": str(tmp_path / "labels")}
    name = "train2014/big.jpg"
    path = tmp_path / "data" / "vqav2" / name
    path.parent.mkdir(parents=True)
    square_image().resize((48 * 8, 40 * 8), Image.NEAREST).save(path, quality=95)
    write_labels(tmp_path / "labels", "vqav2", name, ["depth"])
    big = tmp_path / "labels" / "depth" / "vqav2" / "train2014" / "big.png"
    Image.open(big).resize((48 * 8, 40 * 8), Image.NEAREST).save(big)
    (tmp_path / "data" / "coco_karpathy_test.json").write_text(f'[{{"image": "{name}"}}]')
    (tmp_path / "data" / "coco_karpathy_train.json").write_text(f'[{{"image": "{name}", "caption": "big"}}]')
    _, test = create_dataset("caption", {**config, "experts": ["depth"], "image_resolution": 32})
    assert read_image(path, test.reader.transform.min_decode_side).size == (48, 40)  # 1/8 scale, >= 32 px
    experts, _ = test[0]
    rgb = torch.nn.functional.interpolate(_rgb_mask(experts["rgb"])[None, None].float(), size=224)[0, 0] > 0.5
    depth = experts["depth"][0] > 0
    assert (rgb & depth).sum() / (rgb | depth).sum() > 0.9
