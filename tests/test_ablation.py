"""The expert ablation: corrupted label trees the real loaders read, and the
whole `--fast` pipeline end to end on a tiny world."""

import csv
import json
import random
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataset.datasets import make_reader
from sandbox import ablation
from sandbox.world import WorldConfig, generate, image_name
from tests.test_quickstart import answers_a_question_can_have, exact_accuracy, question_prior

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
    clean_pngs = sorted((world / "labels" / expert).rglob("*.png"))
    assert len(clean_pngs) == TINY.num_scenes
    for old in clean_pngs:  # every image's label is rewritten, in the same format
        new = labels / old.relative_to(world / "labels")
        with Image.open(new) as a, Image.open(old) as b:
            assert (a.mode, a.size) == (b.mode, b.size)
            assert not np.array_equal(np.asarray(a), np.asarray(b)), new
    for other in {"depth", "normal", "edge", "seg_coco", "obj_detection", "ocr_detection"} - {expert}:
        assert (labels / other).resolve() == (world / "labels" / other).resolve()
    image = image_name(0, TINY)
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
    with pytest.raises(ValueError, match="noise is not defined for ocr_detection"):
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


def read_submission(path: Path) -> dict:
    return {r["question_id"]: r["answer"] for r in json.loads(path.read_text())}


def test_fast_ablation_end_to_end(world, tmp_path):
    out = tmp_path / "out"
    argv = ["--fast", "--root", str(world), "--output_dir", str(out), "--sizes", "4", "8"]
    argv += ["--test_scenes", "4", "--world_resolution", "64", "--seeds", "2", "--models", "PrismerZ"]
    argv += ["--corrupt", "seg_coco:noise", "--robust_size", "8", "--steps", "16", "--set", "batch_size_train=2"]
    argv += ["--no-balance"]  # the original generator: TINY's world
    argv += ["--workers", "2"]  # as on a user's 2+ cores: runs side by side, each logging to its folder
    rows = ablation.main(argv)

    # Every size x model x seed trained once: PrismerZ at 4 and 8 scenes, clean Prismer at 8
    # (the reference), Prismer with noisy seg at 8; the image-blind question prior once per size.
    trained = [r for r in rows if r["model"] not in (ablation.PRIOR, ablation.CHANCE)]
    points = {"PrismerZ": [4, 8], "Prismer": [8], "Prismer, seg_coco noise": [8]}
    assert sorted((r["model"], r["train_scenes"], r["seed"]) for r in trained) == sorted(
        (m, n, seed) for m, sizes in points.items() for n in sizes for seed in (0, 1)
    )
    assert {r["model"]: r["experiment"] for r in trained} == {
        "PrismerZ": "data",
        "Prismer": "data",
        "Prismer, seg_coco noise": "robust",
    }
    # 4 questions a scene, batches of 2: 4 scenes train 2 epochs, 8 scenes 1, both 16 steps.
    assert {(r["train_scenes"], r["epochs"], r["steps"]) for r in trained} == {(4, 2, 16), (8, 1, 16)}

    # The prior is the question prior of each size's training list (its first scenes' questions).
    all_train = json.loads((world / "data" / "vqav2_train_val.json").read_text())
    test = json.loads((world / "data" / "vqav2_test.json").read_text())
    kinds = sorted({e["question_type"] for e in test})
    priors = {r["train_scenes"]: r for r in rows if r["model"] == ablation.PRIOR}
    assert priors.keys() == {4, 8}
    for n, row in priors.items():
        first = {image_name(i, TINY) for i in range(n)}
        prior = question_prior([e for e in all_train if e["image"] in first], test)
        assert row["accuracy"] == pytest.approx(exact_accuracy(prior, test))
        for kind in kinds:  # and per question type, on that type's questions
            of_kind = [e for e in test if e["question_type"] == kind]
            assert row[f"accuracy {kind}"] == pytest.approx(exact_accuracy(prior, of_kind))
    # Chance: the mean over a type's test questions of 1 / the answers its text can have.
    for row in (r for r in rows if r["model"] == ablation.CHANCE):
        for kind in kinds:
            guess = [100 / answers_a_question_can_have(e["question"]) for e in test if e["question_type"] == kind]
            assert row[f"accuracy {kind}"] == pytest.approx(sum(guess) / len(guess))

    # Each run trained what its row says: its experts, seed, training list and label tree.
    noisy = out / "labels" / "seg_coco_noise"
    for r in trained:
        name = f"{r['experiment']}_{r['model']}_{r['train_scenes']}_{r['seed']}".replace(", ", "_").replace(" ", "_")
        cfg = json.loads((out / "runs" / name / "vqa_run" / "config.json").read_text())
        assert cfg["experts"] == ([] if r["model"] == "PrismerZ" else ablation.ALL_EXPERTS)
        assert (cfg["seed"], cfg["max_epoch"], cfg["batch_size_train"]) == (r["seed"], r["epochs"], 2)
        assert Path(cfg["data_path"]) == out / "data" / f"train{r['train_scenes']}"
        assert Path(cfg["label_path"]) == (noisy if r["experiment"] == "robust" else world / "labels")
        assert "vqa summary" in (out / "runs" / name / "train.log").read_text()
        submission = read_submission(out / "runs" / name / "vqa_run" / "vqa_submission.json")
        assert r["accuracy"] == pytest.approx(exact_accuracy(submission, test))
        for kind in kinds:
            of_kind = [e for e in test if e["question_type"] == kind]
            assert r[f"accuracy {kind}"] == pytest.approx(exact_accuracy(submission, of_kind))

    # runs.csv holds every row; summary.json the mean and std over seeds of each point.
    with open(out / "runs.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert csv_rows == [{k: str(v) for k, v in r.items()} for r in rows]
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary) == 8  # PrismerZ at 2 sizes, Prismer, Prismer with noise, prior and chance at 2 sizes
    for s in summary:
        same = [r for r in rows if (r["model"], r["train_scenes"]) == (s["model"], s["train_scenes"])]
        assert s["seeds"] == len(same) == (1 if s["model"] in (ablation.PRIOR, ablation.CHANCE) else 2)
        for key, (mean, std) in [("accuracy", (s["mean"], s["std"]))] + [
            (f"accuracy {k}", v) for k, v in s["per_type"].items()
        ]:
            accs = [r[key] for r in same]
            assert mean == pytest.approx(statistics.fmean(accs))
            assert std == pytest.approx(statistics.stdev(accs) if len(accs) > 1 else 0.0)
        assert sorted(s["per_type"]) == kinds
    for plot in ("ablation.png", "ablation_per_type.png"):
        with Image.open(out / plot) as png:
            assert png.format == "PNG" and png.size[0] > 100
