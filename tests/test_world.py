"""The synthetic world: config checks, determinism, resumable generation, its
files read back through the real loaders, and QA/captions true of each scene."""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import create_dataset
from helpers.engine import RunOptions, run
from helpers.tasks import CAPTION
from model import PrismerCaption
from sandbox.quickstart import vqa_baseline, world_config
from sandbox.world import (
    CHUNK,
    DET_CLASSES,
    SEG_CLASSES,
    WorldConfig,
    WorldConfigError,
    generate,
    make_scene,
    name_feature,
)
from tests.test_quickstart import exact_accuracy, question_prior

ROOT = Path(__file__).resolve().parent.parent
ALL = ["depth", "normal", "edge", "seg_coco", "seg_ade", "obj_detection", "ocr_detection"]
SMALL = {"train_scenes": 24, "test_scenes": 6, "resolution": 64, "sign_fraction": 0.5}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return generate(WorldConfig(**SMALL), root, workers=1, progress=False)


def digest(root: Path) -> dict[str, str]:
    """Every file under root (but the tokenizer, whose JSON key order is not ours) -> sha256."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "tokenizer" not in p.parts
    }


@pytest.mark.parametrize(
    "bad, needle",
    [
        ({"min_objects": 0}, "every caption describes at least one object"),
        ({"resolution": 8}, "below the patch size"),
        ({"shapes": ("cube", "hexagon")}, "shapes"),
        ({"min_objects": 4, "max_objects": 2}, "min_objects <= max_objects"),
        ({"sign_fraction": 1.5}, "sign_fraction"),
        ({"words": ("Stop!",)}, "lower-case letters"),
    ],
)
def test_impossible_configs_are_rejected_before_generating(tmp_path, bad, needle):
    with pytest.raises(WorldConfigError, match=needle):
        generate(WorldConfig(**SMALL | bad), tmp_path / "w")
    assert not (tmp_path / "w").exists()
    with pytest.raises(WorldConfigError, match="unknown key"):
        WorldConfig.from_dict({"objects": 3})


def test_generation_is_deterministic_and_seeded(world, tmp_path):
    again = generate(WorldConfig(**SMALL), tmp_path / "again", workers=2, progress=False)
    assert digest(again) == digest(world)  # two processes write the same bytes as one
    a, _ = make_scene(WorldConfig(**SMALL), 3)
    b, _ = make_scene(WorldConfig(**SMALL | {"seed": 1}), 3)
    assert a != b


def test_other_config_in_the_same_root_is_refused(world):
    with pytest.raises(WorldConfigError, match="another config"):
        generate(WorldConfig(**SMALL | {"seed": 5}), world, progress=False)


def test_interrupted_generation_resumes_without_duplicates_or_corruption(tmp_path):
    values = {"train_scenes": 3 * CHUNK, "test_scenes": 4, "resolution": 32}
    cfg = WorldConfig(**values)
    root = tmp_path / "killed"
    args = [f"--set={k}={v}" for k, v in values.items()]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandbox.world", "--root", str(root), "--workers", "1", *args],
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while not (root / "progress" / "chunk_000000.json").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (root / "world.json").exists(), "the run finished before it could be interrupted"
    generate(cfg, root, workers=1, progress=False)
    clean = generate(cfg, tmp_path / "clean", workers=1, progress=False)
    assert digest(root) == digest(clean)
    scenes = json.loads((root / "scenes.json").read_text())
    assert [s["index"] for s in scenes] == list(range(cfg.num_scenes))


def loader_config(world: Path, experts=ALL) -> dict:
    return {
        "dataset": "coco",
        "data_path": str(world / "data"),
        "label_path": str(world / "labels"),
        "label_space_path": str(world / "label_spaces"),
        "experts": experts,
        "image_resolution": 64,
        "datasets": ["vqav2"],
    }


def test_labels_round_trip_through_the_real_loaders(world):
    train, test = create_dataset("caption", loader_config(world))
    assert len(train) == 24 * 5 and len(test) == 6
    scenes = {s["image"]: s for s in json.loads((world / "scenes.json").read_text())}
    for i in range(len(test)):
        experts, index = test[i]
        scene = scenes[test.data_list[index]["image"]]
        # Every object's shape appears in the painted segmentation, with the world's hashed feature.
        seg_ids = set(np.unique(experts["seg_coco"]["ids"].numpy()).tolist())
        shapes = {SEG_CLASSES.index(o["shape"]) for o in scene["objects"]}
        assert shapes <= seg_ids and SEG_CLASSES.index("floor") in seg_ids
        for c in shapes:
            assert torch.equal(experts["seg_coco"]["table"][c], torch.from_numpy(name_feature(SEG_CLASSES[c])))
        det = experts["obj_detection"]
        for inst, obj in enumerate(scene["objects"]):
            feature = torch.from_numpy(name_feature(DET_CLASSES[DET_CLASSES.index(obj["shape"])]))
            assert torch.equal(det["table"][inst], feature)
        ocr = experts["ocr_detection"]
        if scene["sign"] is not None:
            assert (ocr["ids"] == 0).any()
            assert torch.equal(ocr["table"][0], torch.from_numpy(name_feature(scene["sign"]["word"])))
        else:
            assert (ocr["ids"] == 255).all()
        for name in ("depth", "normal", "edge"):
            assert experts[name].shape[-2:] == (224, 224) and experts[name].min() < 0 < experts[name].max()
    vqa_train, vqa_test = create_dataset("vqa", loader_config(world))
    assert len(vqa_train) == 24 * 4 and len(vqa_test) == 6 * 4
    assert all(e["answer"][0] in vqa_test.answer_list for e in vqa_train.data_list + vqa_test.data_list)
    gt = json.loads((world / "data" / "coco_karpathy_test_gt.json").read_text())
    assert [im["id"] for im in gt["images"]] == [25, 26, 27, 28, 29, 30]  # ids parse from the file names
    assert Counter(a["image_id"] for a in gt["annotations"]) == {i: 5 for i in range(25, 31)}


def true_answer(scene: dict, question: str) -> str:
    """The answer worked out again from the scene's objects, independently of the generator's templates."""
    objs = scene["objects"]
    words = question.rstrip("?").split()
    if question == "how many objects are there?":
        return str(len(objs))
    if question.startswith("how many"):
        return str(sum(o["shape"] + "s" == words[2] for o in objs))
    if question.startswith("what colour is the"):
        return next(o["colour"] for o in objs if o["shape"] == words[-1])
    if question.startswith("what shape is the"):
        return next(o["shape"] for o in objs if o["colour"] == words[-2])
    if question.startswith("is there a"):
        return "yes" if any((o["colour"], o["shape"]) == (words[-2], words[-1]) for o in objs) else "no"
    if question.startswith("which is closer"):
        a, b = question.rstrip("?").split("the ")[1:]
        a, b = a.removesuffix(" or ").strip(), b.strip()
        depth = {f"{o['colour']} {o['shape']}": o["closeness"] for o in objs}
        return max((a, b), key=depth.get)
    if question == "what does the sign say?":
        return scene["sign"]["word"]
    raise AssertionError(f"unexpected question {question!r}")


def test_answers_and_captions_are_true_of_their_scene(world):
    scenes = json.loads((world / "scenes.json").read_text())
    labels = world / "labels"
    for scene in scenes:
        for q in scene["questions"]:
            assert q["answer"] == true_answer(scene, q["question"]), (scene["image"], q)
        near = scene["objects"][-1]
        stem = Path(scene["image"]).with_suffix("")
        classes = json.loads((labels / "obj_detection" / "vqav2" / f"{stem}.json").read_text())
        instances = np.unique(np.asarray(Image.open(labels / "obj_detection" / "vqav2" / f"{stem}.png")))
        assert len(classes) == len(scene["objects"]) + (scene["sign"] is not None)
        assert set(instances.tolist()) - {255} == {int(k) for k in classes}  # every object is visible
        for caption in scene["captions"]:
            colours = {w for w in caption.split() if w in ("red", "green", "blue", "yellow", "purple", "white")}
            assert colours <= {o["colour"] for o in scene["objects"]}, caption
            if "closest object" in caption or "in front of a" in caption and "wall" not in caption:
                assert near["colour"] in caption and near["shape"] in caption, caption
    answered = Counter(q["type"] for s in scenes for q in s["questions"])
    assert {"colour", "shape", "count", "yes/no"} <= set(answered)


def test_most_frequent_answer_baseline(world):
    answer, accuracy = vqa_baseline(world / "data")
    test = json.loads((world / "data" / "vqav2_test.json").read_text())
    assert accuracy == pytest.approx(100 * sum(e["answer"][0] == answer for e in test) / len(test))


def test_short_caption_run_through_the_engine_lowers_the_loss(world, tmp_path):
    """The world recipe through the engine; scoring is skipped (no ground-truth file) to stay fast."""
    values = {
        "output_dir": str(tmp_path),
        "experts": ["seg_coco", "ocr_detection"],
        "gt_file": str(tmp_path / "none.json"),
        "num_workers": 0,
        "max_length": 8,
        "min_length": 2,
        "warmup_steps": 0,
    }
    first = run(CAPTION, world_config("caption", world, values | {"max_train_steps": 1}), RunOptions("first"))
    trained = run(CAPTION, world_config("caption", world, values | {"max_epoch": 3}), RunOptions("trained"))
    assert trained["train/loss_epoch"] < 0.8 * first["train/loss_epoch"]
    assert (tmp_path / "caption_trained" / "caption_results_coco.json").exists()


def test_the_original_generator_is_unchanged(tmp_path):
    """balance=False (the default) writes the worlds it wrote before balancing
    existed: the sha256 of every JSON file (scene facts, data lists, configs; the
    tokenizer excluded), taken with the code before the change."""
    cfg = WorldConfig(train_scenes=6, test_scenes=3, resolution=32, sign_fraction=0.5)
    root = generate(cfg, tmp_path / "w", workers=1, progress=False)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.json")):
        if "tokenizer" not in p.parts:
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    assert h.hexdigest() == "dc6091c2787bc05a03e8fa5f87954afb6074bb4dfac92f9563903dc1aad27e24"
    assert "balance" not in json.loads((root / "world.json").read_text())["config"]


# A uniform guess's accuracy per question text, worked out by hand for the default world.
CHANCE = {"colour": 1 / 6, "shape": 1 / 4, "yes/no": 1 / 2, "closer": 1 / 2, "sign": 1 / 8}


def chance(q: dict) -> float:
    if q["type"] == "count":
        return 1 / 4 if q["question"] == "how many objects are there?" else 1 / 5  # 1-4 objects; 0-4 of a shape
    return CHANCE[q["type"]]


def test_balanced_world_answers_are_near_uniform_per_question_text():
    """Over the images that receive a question text, its answers are close to
    uniform (entropy >= 0.9 of log(answers it can have)), so the image-blind
    prior scores about chance; and every answer is still true of its scene."""
    cfg = WorldConfig(train_scenes=2400, test_scenes=1, resolution=32, balance=True)
    scenes = [make_scene(cfg, i)[0] for i in range(cfg.train_scenes)]
    by_text, question, first_named, kinds = {}, {}, Counter(), Counter()
    for scene in scenes:
        for q in scene["questions"]:
            assert q["answer"] == true_answer(scene, q["question"]), q
            by_text.setdefault(q["question"], Counter())[q["answer"]] += 1
            question[q["question"]] = q
            kinds[q["type"]] += 1
            if q["type"] == "closer":
                first_named[q["question"].split("the ")[1].startswith(q["answer"])] += 1
    assert set(kinds) == {"colour", "shape", "count", "yes/no", "closer", "sign"}
    checked = 0
    for text, answers in by_text.items():
        n = sum(answers.values())
        if n >= 50:
            possible = round(1 / chance(question[text]))
            entropy = -sum(k / n * math.log(k / n) for k in answers.values())
            assert entropy >= 0.9 * math.log(possible), (text, answers)
            checked += 1
    assert checked >= 30  # the colour, shape, count, sign and most yes/no texts
    # Closer questions name two objects in random order: the first is the answer about half the time.
    assert 0.45 < first_named[True] / first_named.total() < 0.55

    # The image-blind prior (the most frequent training answer per text) scores about chance.
    entries = [
        q | {"question_id": 100 * i + j, "image": i, "answer": [q["answer"]] * 10}
        for i, s in enumerate(scenes)
        for j, q in enumerate(s["questions"])
    ]
    train, test = [e for e in entries if e["image"] < 2000], [e for e in entries if e["image"] >= 2000]
    prior = exact_accuracy(question_prior(train, test), test)
    expected = 100 * sum(chance(e) for e in test) / len(test)
    assert abs(prior - expected) < 5, (prior, expected)


@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_world_recipes_start_the_decoder_at_their_own_init_scale(world, task):
    """The recipes' initializer_range (1/sqrt(width), not RoBERTa's 0.02 sized for
    width 768) reaches the text decoder's weights, cross-attention included."""
    cfg = world_config(task, world)
    model = PrismerCaption(cfg.model_config())
    scale = cfg.roberta_config["initializer_range"]
    assert scale == pytest.approx(128**-0.5, rel=0.01)
    cross = model.text_decoder.roberta.encoder.layer[0][1].self
    for weight in (cross.query.weight, cross.key.weight, model.text_decoder.roberta.embeddings.word_embeddings.weight):
        assert weight.std().item() == pytest.approx(scale, rel=0.1)
