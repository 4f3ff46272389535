"""`generate_experts.py --expert all` as a user runs it: a folder of real images of
two shapes (and a corrupt one), every network's weights in its official format in
one folder, labels the datasets read back into the tensors the encoder takes."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import generate_experts
from common.labels import label_file
from common.modalities import EXPERTS, PRISMER_EXPERTS, label_networks
from dataset import create_dataset, create_loader, paint
from dataset.files import read_image
from experts import generator_network
from tests.expert_files import write_official, write_tiny_clip

# name -> (W, H): the two share an input shape (one batch of 2) at the networks that resize
# to a square (depth, normal, edge, OCR) and are each alone at those that keep the aspect.
IMAGES = {"a.jpg": (640, 480), "sub/c.png": (300, 500)}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Images in the official data layout (`data/vqav2/...`), so a training run reads them."""
    root = tmp_path_factory.mktemp("all")
    photos, weights, save = root / "data" / "vqav2", root / "expert_weights", root / "labels"
    (photos / "sub").mkdir(parents=True)
    weights.mkdir()
    rng = np.random.default_rng(0)
    for name, (w, h) in IMAGES.items():
        yy, xx = np.mgrid[0:h, 0:w]
        x = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1) + rng.integers(0, 30, (h, w, 3))
        Image.fromarray(x.clip(0, 255).astype(np.uint8)).save(photos / name)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    for expert in label_networks():
        write_official(expert, weights)
    write_tiny_clip(root / "clip")  # OCR's word encoder (CLIP ViT-L/14 text is not downloadable here)
    argv = ["--expert", "all", "--data_path", str(photos), "--save_path", str(save), "--weights", str(weights)]
    argv += ["--network_option", f"ocr_detection.clip={root / 'clip'}"]
    totals = generate_experts.main([*argv, "--batch_size", "2", "--num_workers", "0"])
    yield photos, weights, save, totals
    shutil.rmtree(weights)  # 3.5 GB of synthetic weights: pytest keeps its last three runs' folders


def test_every_network_labels_every_readable_image(generated):
    photos, _, save, totals = generated
    assert list(totals) == label_networks()
    for expert, counts in totals.items():
        assert (counts["images"], counts["written"], counts["corrupt (skipped)"]) == (3, 2, 1), expert
        kind = EXPERTS[expert].kind
        for name, size in IMAGES.items():
            path = label_file(save, expert, photos.name, name)
            assert kind.exists(path), path
            with Image.open(path) as label:
                assert label.size == size and label.mode == kind.mode(EXPERTS[expert].channels), path
    assert not list(save.rglob("*.tmp"))


def test_detection_without_depth_labels_skips_and_counts_each_image(generated, tmp_path):
    """Detection orders overlapping boxes by the depth label: without one, nothing is guessed."""
    photos, weights, _, _ = generated
    argv = ["--expert", "obj_detection", "--data_path", str(photos), "--save_path", str(tmp_path / "labels")]
    counts = generate_experts.main([*argv, "--weights", str(weights), "--num_workers", "0"])["obj_detection"]
    assert (counts["written"], counts["input label missing (skipped)"], counts["corrupt (skipped)"]) == (0, 2, 1)
    assert not (tmp_path / "labels" / "obj_detection").exists() or not list((tmp_path / "labels").rglob("*.png"))


def test_a_batch_gives_each_image_the_label_it_gets_alone(generated):
    """a.jpg was labelled in one batch with c.png; alone it gets the same label up to
    float rounding (a batched matrix product rounds differently: 3e-5 on the raw
    depth here, one grey level on under 0.1% of pixels). Had the batch swapped their
    labels, each would have the other's size, which the first test rejects."""
    photos, weights, save, _ = generated
    network = generator_network("depth")
    model = network.load(weights / "dpt_hybrid-midas-501f0c75.pt")
    image = read_image(photos / "a.jpg")
    with torch.no_grad():
        (raw,) = network.predict(model, network.preprocess(image)[None])
    alone = np.asarray(network.to_label(raw, image.size))
    batched = np.asarray(Image.open(label_file(save, "depth", photos.name, "a.jpg")))
    moved = np.abs(batched.astype(int) - alone)
    assert moved.max() <= 1 and (moved > 0).mean() < 1e-3


def test_the_datasets_read_the_labels_back_as_the_encoder_takes_them(generated):
    photos, _, save, _ = generated
    experts = label_networks()
    config = {
        "dataset": "demo",
        "data_path": str(photos),
        "label_path": str(save),
        "experts": experts,
        "image_resolution": 224,
    }
    _, images = create_dataset("caption", config)
    loader = create_loader(images, batch_size=4, num_workers=0, train=False)
    (batch, _index), *rest = list(loader)
    assert not rest and loader.skipped == 1  # broken.jpg
    inputs = paint(batch)
    assert inputs["rgb"].shape == (2, 3, 224, 224)
    for expert in experts:
        e = EXPERTS[expert]
        x = e.kind.stem_input(inputs[expert])
        assert x.shape == (2, e.channels, 224, 224), expert
        if not e.kind.painted:  # rescaled per image to [-1, 1], not constant
            assert x.amin((1, 2, 3)).allclose(torch.tensor(-1.0)) and (x.amax((1, 2, 3)) > 0.9).all(), expert


def test_prismer_trains_on_the_labels_and_captions(generated, tokenizer, tmp_path):
    """The labels made here are what a Prismer with every expert trains on: a few
    steps through the engine (the loss falls on a repeated batch), then captions."""
    from helpers.config import load_config
    from helpers.engine import RunOptions, run
    from helpers.tasks import CAPTION
    from model import PrismerCaption
    from tests.conftest import tiny_size

    photos, _, save, _ = generated
    experts = [e for e in PRISMER_EXPERTS if e in label_networks()]
    data = photos.parent
    names = sorted(IMAGES)
    (data / "coco_karpathy_train.json").write_text(
        json.dumps([{"image": n, "caption": f"a synthetic photo number {i}"} for i, n in enumerate(names * 6)])
    )
    (data / "coco_karpathy_test.json").write_text(json.dumps([{"image": n} for n in names]))
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "prismer_model": tiny_size(len(tokenizer)),
                "tokenizer": str(tmp_path / "tokenizer"),
                "pretrained": False,
                "experts": experts,
                "data_path": str(data),
                "label_path": str(save),
                "image_resolution": 64,
                "label_resolution": 64,
                "batch_size_train": 3,
                "batch_size_test": 3,
                "num_workers": 0,
                "max_epoch": 1,
                "init_lr": 1e-3,
                "max_length": 8,
                "min_length": 2,
                "tracker": None,
                "output_dir": str(tmp_path / "out"),
                "gt_file": str(tmp_path / "none.json"),  # captions written, not scored
            }
        )
    )
    first = run(CAPTION, load_config(recipe, overrides=["max_train_steps=1"]), RunOptions(exp_name="first"))
    trained = run(CAPTION, load_config(recipe, overrides=["max_epoch=4"]), RunOptions(exp_name="trained"))
    assert trained["train/loss_epoch"] < 0.9 * first["train/loss_epoch"]  # 130 -> 106 when written
    folder = tmp_path / "out" / "caption_trained"
    assert PrismerCaption.from_pretrained(folder / "final").config.experts == experts
    captions = json.loads((folder / "caption_results_coco.json").read_text())
    assert len(captions) == 2 and all(c["caption"] for c in captions)
