"""Every broken-input case, built for real on disk."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import ConfigError, DataError, create_dataset, create_loader, load_label_spaces
from dataset.transforms import CLIP_MEAN, CLIP_STD
from tests.dataset_builders import coco_world, square_map

EXPERTS = ["depth", "seg_coco", "obj_detection", "ocr_detection"]


@pytest.fixture
def world(tmp_path):
    return coco_world(tmp_path, n=4, experts=EXPERTS)


def _image(config, i):
    return f"{config['data_path']}/vqav2/train2014/COCO_train2014_{i:012d}.jpg"


def _label(config, expert, i, suffix=".png"):
    return f"{config['label_path']}/{expert}/vqav2/train2014/COCO_train2014_{i:012d}{suffix}"


def _epoch(config, batch_size=4, num_workers=0, **kw):
    train, _ = create_dataset("caption", config)
    loader = create_loader(train, batch_size, num_workers, train=False, **kw)
    train.train = True  # plain order, caption batches
    batches = list(loader)
    return loader, [c for _, captions in batches for c in captions], batches


def _unnormalise(rgb):
    return rgb * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)


@pytest.mark.parametrize("damage", ["truncated", "zero_bytes"])
def test_unreadable_image_is_skipped_and_counted_not_replaced(world, damage):
    path = _image(world, 1)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2] if damage == "truncated" else b"")
    loader, captions, _ = _epoch(world, num_workers=2)
    assert captions == [f"A picture of a red square number {i}" for i in (0, 2, 3)]
    assert loader.skipped == 1 and loader.seen == 4
    assert "entry 1 (train2014/COCO_train2014_000000000001.jpg)" in loader.reasons[0]


def test_too_many_unreadable_samples_stop_with_an_error(world):
    for i in range(3):
        open(_image(world, i), "wb").close()
    with pytest.raises(DataError, match="3 of the 3 samples read so far are unreadable, more than 50% of 4"):
        _epoch(world, batch_size=1)
    loader, captions, _ = _epoch(world, batch_size=1, max_bad_fraction=0.8)
    assert captions == ["A picture of a red square number 3"] and loader.skipped == 3
    with pytest.raises(DataError):
        _epoch({**world, "max_bad_fraction": 0.25}, batch_size=1)


@pytest.mark.parametrize("kind", ["grey", "cmyk_jpeg", "16bit", "palette", "rgba"])
def test_unusual_image_modes_become_rgb(world, kind):
    path = _image(world, 0)
    x = np.full((40, 48), 64, np.uint8)
    x[12:32, 8:28] = 255
    if kind == "grey":
        img = Image.fromarray(x, "L")
    elif kind == "cmyk_jpeg":  # PNG cannot hold CMYK; CMYK images arrive as JPEG
        img = Image.fromarray(np.stack([x] * 3, -1), "RGB").convert("CMYK")
    elif kind == "16bit":
        img = Image.fromarray(x.astype(np.uint16) * 257)
    elif kind == "palette":
        img = Image.fromarray(x, "L").convert("P")
        img.info["transparency"] = 0
    else:
        img = Image.fromarray(np.stack([x] * 4, -1), "RGBA")
    fmt = "JPEG" if kind == "cmyk_jpeg" else "PNG"
    img.save(path, fmt)  # keeps the .jpg name: decoding goes by content
    _, test = create_dataset("caption", world)
    rgb = _unnormalise(test[0][0]["rgb"])
    assert rgb.shape == (3, 64, 64)
    inside, outside = rgb[:, 30, 20], rgb[:, 2, 2]
    assert inside.min() > 0.9 and outside.max() < 0.4, (inside, outside)


def test_one_pixel_image_gives_full_size_inputs(world):
    Image.new("RGB", (1, 1), (200, 10, 10)).save(_image(world, 0))
    for expert in EXPERTS:
        open(_label(world, expert, 0), "wb").close()
    train, _ = create_dataset("caption", world)
    experts, caption = train[0]
    assert experts["rgb"].shape == (3, 64, 64) and experts["depth"].shape == (1, 224, 224)
    assert experts["seg_coco"]["ids"].shape == (1, 224, 224)


@pytest.mark.parametrize("how", ["missing", "empty"])
def test_absent_label_means_the_expert_found_nothing(world, how):
    for expert in EXPERTS:
        for suffix in (".png", ".json"):
            path = _label(world, expert, 0, suffix)
            try:
                if how == "missing":
                    os.remove(path)
                else:
                    open(path, "wb").close()
            except FileNotFoundError:
                pass
    _, test = create_dataset("caption", world)
    loader = create_loader(test, 1, 0, train=False)
    experts, _ = next(iter(loader))
    assert loader.skipped == 0
    assert (experts["depth"] == -1).all()  # zeros, rescaled per image like the official code
    background = load_label_spaces().background.view(1, 64, 1, 1)
    for name in ("seg_coco", "ocr_detection"):
        torch.testing.assert_close(experts[name], background.expand_as(experts[name]))
    assert (experts["obj_detection"]["instance"] == 255).all()


def test_class_id_outside_the_label_space_skips_the_sample(world):
    square_map(200, 255).save(_label(world, "seg_coco", 2))  # COCO has 133 classes
    loader, captions, _ = _epoch(world)
    assert "A picture of a red square number 2" not in captions and len(captions) == 3
    assert loader.skipped == 1 and "class id 200" in loader.reasons[0] and "seg_coco" in loader.reasons[0]


def test_detection_json_naming_an_absent_instance_is_harmless(world):
    json_path = _label(world, "obj_detection", 0, ".json")
    classes = json.load(open(json_path))
    classes["42"] = 100  # no pixel has instance 42
    json.dump(classes, open(json_path, "w"))
    _, test = create_dataset("caption", world)
    loader = create_loader(test, 1, 0, train=False)
    experts, _ = next(iter(loader))
    assert loader.skipped == 0
    assert set(experts["obj_detection"]["instance"].unique().tolist()) == {3, 255}


def test_detection_png_instance_without_class_skips_the_sample(world):
    json.dump({"9": 1}, open(_label(world, "obj_detection", 1, ".json"), "w"))
    loader, captions, _ = _epoch(world)
    assert loader.skipped == 1 and "instance 3 has no class" in loader.reasons[0]


def test_malformed_data_list_names_file_and_entry(world, tmp_path):
    path = f"{world['data_path']}/coco_karpathy_train.json"
    entries = json.load(open(path))
    entries[2] = {"image": entries[2]["image"]}  # caption missing
    json.dump(entries, open(path, "w"))
    with pytest.raises(ConfigError, match=r"coco_karpathy_train\.json: entry 2 lacks 'caption'"):
        create_dataset("caption", world)
    open(path, "w").write('[{"image": "a.jpg", "caption": "x"},')
    with pytest.raises(ConfigError, match=r"coco_karpathy_train\.json: not valid JSON"):
        create_dataset("caption", world)


def _recipe(world, tmp_path, experts):
    """A YAML recipe with `label_path: null`, read as a training run reads it."""
    from helpers.config import load_config

    path = tmp_path / "recipe.yaml"
    lines = [f"data_path: {world['data_path']}", "label_path: null", f"experts: {json.dumps(experts)}"]
    path.write_text("\n".join(lines + ["image_resolution: 64", "dataset: coco"]) + "\n")
    return load_config(path)


def test_null_label_path_means_no_labels_which_rgb_alone_needs_not(world, tmp_path):
    config = _recipe(world, tmp_path, ["none"])
    assert config.label_path is None and config.experts == []
    loader, captions, batches = _epoch(config)
    assert loader.skipped == 0 and len(captions) == 4
    assert set(batches[0][0]) == {"rgb"}


def test_null_label_path_with_experts_is_refused_naming_key_and_experts(world, tmp_path):
    config = _recipe(world, tmp_path, EXPERTS)
    with pytest.raises(ConfigError, match=r"'label_path' is null .* experts \['depth', 'seg_coco'.* need labels"):
        create_dataset("caption", config)
