"""The expert ablation: corrupted label trees the real loaders read, and the
whole `--fast` pipeline end to end on a tiny world."""

import csv
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from dataset.datasets import make_reader
from sandbox import ablation
from sandbox.world import WorldConfig, generate, image_name

TINY = WorldConfig(train_scenes=8, test_scenes=4, resolution=64)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate(TINY, tmp_path_factory.mktemp("world"), workers=1, progress=False)


def read(labels, world, experts, image):
    reader = make_reader(
        {
            "data_path": str(world / "data"),
            "image_resolution": 64,
            "label_resolution": 64,
            "experts": experts,
            "label_path": str(labels),
            "label_space_path": str(world / "label_spaces"),
        },
        train=False,
    )
    return reader("vqav2", image, random.Random(0))


@pytest.mark.parametrize(
    "expert,mode", [("depth", "noise"), ("normal", "noise"), ("seg_coco", "noise"), ("obj_detection", "shuffle")]
)
def test_corrupted_labels_are_valid_and_different(world, tmp_path, expert, mode):
    labels = ablation.corrupt_labels(world / "labels", expert, mode, tmp_path / "labels")
    image = image_name(0, TINY)
    stem = image.rsplit(".", 1)[0]
    new, old = (
        tmp_path / "labels" / expert / "vqav2" / f"{stem}.png",
        world / "labels" / expert / "vqav2" / f"{stem}.png",
    )
    with Image.open(new) as a, Image.open(old) as b:
        assert (a.mode, a.size) == (b.mode, b.size)
        assert not np.array_equal(np.asarray(a), np.asarray(b))
    assert (tmp_path / "labels" / "edge").resolve() == (world / "labels" / "edge").resolve()
    clean, bad = read(world / "labels", world, [expert], image), read(labels, world, [expert], image)
    x, y = clean[expert], bad[expert]
    if isinstance(x, dict):  # painted: compare the feature each pixel gets
        x, y = x["table"][x["ids"].long()], y["table"][y["ids"].long()]
    assert x.shape == y.shape and not torch.equal(x, y)
    assert torch.equal(clean["rgb"], bad["rgb"])


def test_reused_output_folder_is_relinked_to_the_current_world(world, tmp_path):
    """A folder left by an earlier, different world must not keep its links."""
    stale = tmp_path / "old_world"
    (stale / "edge").mkdir(parents=True)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "edge").symlink_to(stale / "edge")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "vqav2").symlink_to(stale)
    ablation.corrupt_labels(world / "labels", "depth", "noise", tmp_path / "labels")
    ablation.subset_data(world, TINY, 2, tmp_path / "d")
    assert (tmp_path / "labels" / "edge").resolve() == (world / "labels" / "edge").resolve()
    assert (tmp_path / "d" / "vqav2").resolve() == (world / "data" / "vqav2").resolve()


def test_unknown_corruption_is_refused(world, tmp_path):
    with pytest.raises(ValueError, match="noise is defined"):
        ablation.corrupt_labels(world / "labels", "ocr_detection", "noise", tmp_path)
    with pytest.raises(ValueError, match="unknown corruption"):
        ablation.corrupt_labels(world / "labels", "depth", "blur", tmp_path)


def test_subset_keeps_the_first_scenes(world, tmp_path):
    data, questions = ablation.subset_data(world, TINY, 3, tmp_path / "d")
    train = json.loads((data / "vqav2_train_val.json").read_text())
    assert {e["image"] for e in train} == {image_name(i, TINY) for i in range(3)}
    assert len(train) == questions == 3 * TINY.questions_per_image
    assert (data / "vqav2_test.json").read_text() == (world / "data" / "vqav2_test.json").read_text()


def test_smaller_sets_train_more_epochs_for_the_same_steps():
    assert ablation.epochs_for(144, questions=2304, batch=16) == 1
    assert ablation.epochs_for(144, questions=768, batch=16) == 3
    assert ablation.epochs_for(144, questions=250, batch=16) == 10  # 15 full batches an epoch
    with pytest.raises(ValueError, match="no batch"):
        ablation.epochs_for(144, questions=10, batch=16)


def test_schedule_keys_are_refused_before_anything_is_generated(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ablation.main(["--fast", "--root", str(tmp_path / "w"), "--set", "max_epoch=5"])
    assert "change --steps instead" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_fast_ablation_end_to_end(world, tmp_path):
    out = tmp_path / "out"
    argv = ["--fast", "--root", str(world), "--output_dir", str(out), "--sizes", "4", "8"]
    argv += ["--test_scenes", "4", "--world_resolution", "64", "--seeds", "2", "--models", "PrismerZ"]
    argv += ["--corrupt", "seg_coco:noise", "--robust_size", "8", "--steps", "16", "--set", "batch_size_train=2"]
    rows = ablation.main(argv)
    # PrismerZ at 4 and 8 scenes, clean Prismer at 8 (the reference), Prismer with noisy seg at 8;
    # the image-blind question prior once per size.
    trained = [r for r in rows if r["model"] != ablation.PRIOR]
    assert len(trained) == 4 * 2
    assert {(r["model"], r["train_scenes"]) for r in trained} == {
        ("PrismerZ", 4),
        ("PrismerZ", 8),
        ("Prismer", 8),
        ("Prismer, seg_coco noise", 8),
    }
    assert sorted(r["train_scenes"] for r in rows if r["model"] == ablation.PRIOR) == [4, 8]
    assert all(0 <= r["accuracy"] <= 100 for r in rows)
    # 4 questions a scene, batches of 2: 4 scenes train 2 epochs, 8 scenes 1, both 16 steps.
    assert {(r["train_scenes"], r["epochs"], r["steps"]) for r in trained} == {(4, 2, 16), (8, 1, 16)}
    with open(out / "runs.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    summary = json.loads((out / "summary.json").read_text())
    assert all(s["seeds"] == (1 if s["model"] == ablation.PRIOR else 2) for s in summary)
    with Image.open(out / "ablation.png") as png:
        assert png.format == "PNG" and png.size[0] > 100
