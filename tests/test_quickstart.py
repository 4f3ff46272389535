"""The README's main job (`make quickstart`), end to end on a tiny world: the
table's rows are the model and its image-blind baselines, and each number is
what its definition gives on the world's files, worked out again here."""

import contextlib
import html
import io
import json
import re
from collections import Counter

import pytest

from common.modalities import PRISMER_EXPERTS
from helpers.demo import Describer
from helpers.metrics import coco_caption_scores, format_caption
from model import PrismerCaption, PrismerVQA
from sandbox import quickstart
from sandbox.world import WorldConfig, generate

METRICS = ("CIDEr", "Bleu_4", "METEOR", "ROUGE_L")
VQA_MODEL = "Prismer, all experts"  # captions are PrismerZ (RGB only); VQA keeps its recipe's experts


def read(path):
    return json.loads(path.read_text())


def exact_accuracy(answer_for: dict, test: list[dict]) -> float:
    """VQA accuracy where every test question carries ten equal answers (the
    world's): 100 for that answer, else 0."""
    return 100 * sum(answer_for[e["question_id"]] == e["answer"][0] for e in test) / len(test)


def question_prior(train: list[dict], test: list[dict]) -> dict:
    """question_id -> the most frequent training answer to its question text
    (the most frequent training answer overall for a text never trained on)."""
    overall = Counter(e["answer"][0] for e in train).most_common(1)[0][0]
    by_text = {}
    for e in train:
        by_text.setdefault(e["question"], Counter())[e["answer"][0]] += 1
    prior = {q: c.most_common(1)[0][0] for q, c in by_text.items()}
    return {e["question_id"]: prior.get(e["question"], overall) for e in test}


def answers_a_question_can_have(question: str) -> int:
    """For the quickstart world: 6 colours, 4 shapes, 1-4 objects, 8 sign words."""
    if question == "how many objects are there?":
        return 4
    if question.startswith("how many"):
        return 5  # 0-4 of a shape
    starts = {"what colour": 6, "what shape": 4, "is there": 2, "which is closer": 2, "what does the sign": 8}
    return next(n for start, n in starts.items() if question.startswith(start))


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """(table rows, the world's data folder, the output folder, what was printed)."""
    tmp = tmp_path_factory.mktemp("quickstart")
    root, out = tmp / "world", tmp / "out"
    argv = ["--root", str(root), "--output_dir", str(out), "--train_scenes", "16", "--test_scenes", "4"]
    # Two epochs: after one, the demo test's caption model was so near random that one
    # test image's beams tied closely enough to decode differently in the demo.
    argv += ["--set", "max_epoch=2", "--set", "num_workers=0"]
    argv += ["--parallel"]  # as on a user's 2+ cores: VQA in a second process beside captioning
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rows = quickstart.main(argv)
    return rows, root / "data", out, printed.getvalue()


def test_the_table_is_the_model_beside_its_baselines(job):
    rows, data, _, printed = job
    caption = Counter(e["caption"] for e in read(data / "coco_karpathy_train.json")).most_common(1)[0][0]
    answer = Counter(e["answer"][0] for e in read(data / "vqav2_train_val.json")).most_common(1)[0][0]
    best = quickstart.best_constant_caption(data, {s["image"]: s for s in read(data.parent / "scenes.json")})
    expected = [
        ("caption", model, metric)
        for metric in METRICS
        for model in ("PrismerZ (RGB only)", f"most frequent caption ({caption!r})")
    ]
    constants = (f"most frequent caption ({caption!r})", f"best constant caption ({best!r})")
    expected += [
        ("caption", model, metric)
        for model in ("PrismerZ (RGB only)", *constants)
        for metric in ("distinct", "objects named", "named exist")
    ]
    expected += [
        ("vqa", VQA_MODEL, "accuracy"),
        ("vqa", f"most frequent answer ({answer!r})", "accuracy"),
        ("vqa", quickstart.PRIOR, "accuracy"),
        ("vqa", quickstart.CHANCE, "accuracy"),
    ]
    kinds = sorted({e["question_type"] for e in read(data / "vqav2_test.json")})
    models = (VQA_MODEL, quickstart.PRIOR, quickstart.CHANCE)
    expected += [("vqa", model, kind) for kind in kinds for model in models]
    assert [r[:3] for r in rows] == expected
    assert "Results on the synthetic world's test split" in printed
    for task, model, metric, value in rows:
        assert re.search(rf"{task} +{re.escape(model)} +{re.escape(metric)} +{value:.1f}\n", printed), (model, metric)


def test_the_model_rows_are_what_its_written_results_score(job):
    rows, data, out, _ = job
    score = {(task, model, metric): value for task, model, metric, value in rows}
    results = read(out / "caption_world" / "caption_results_coco.json")
    gt = read(data / "coco_karpathy_test_gt.json")
    assert sorted(r["image_id"] for r in results) == sorted(im["id"] for im in gt["images"])  # each image once
    scores = coco_caption_scores(results, data / "coco_karpathy_test_gt.json")
    for metric in METRICS:
        assert score["caption", "PrismerZ (RGB only)", metric] == pytest.approx(100 * scores[metric])

    test = read(data / "vqav2_test.json")
    submission = {r["question_id"]: r["answer"] for r in read(out / "vqa_world" / "vqa_submission.json")}
    assert submission.keys() == {e["question_id"] for e in test}
    assert set(submission.values()) <= set(read(data / "answer_list.json"))
    assert score["vqa", VQA_MODEL, "accuracy"] == pytest.approx(exact_accuracy(submission, test))
    for kind in {e["question_type"] for e in test}:  # per type: the same, on that type's questions
        of_kind = [e for e in test if e["question_type"] == kind]
        assert score["vqa", VQA_MODEL, kind] == pytest.approx(exact_accuracy(submission, of_kind))
    written = {r["caption"] for r in results}
    assert score["caption", "PrismerZ (RGB only)", "distinct"] == len(written)


def test_the_vqa_curve_shows_each_epoch_per_type_and_ends_at_the_table(job):
    rows, data, _, printed = job
    score = {(task, model, metric): value for task, model, metric, value in rows}
    header, *lines = printed.split("VQA accuracy per question type during training\n")[1].strip().splitlines()
    kinds = header.split()[3:]
    assert sorted(kinds) == sorted({e["question_type"] for e in read(data / "vqav2_test.json")})
    assert [line.split()[0] for line in lines] == ["1", "2"]  # max_epoch=2, evaluated after each
    last = dict(zip(["epoch", "step", "accuracy", *kinds], map(float, lines[-1].split())))
    for kind in ["accuracy", *kinds]:
        assert last[kind] == pytest.approx(score["vqa", VQA_MODEL, kind], abs=0.05)


def test_vqa_trained_beside_captioning_logs_to_its_own_file_and_loads_back(job):
    """The parallel path: the VQA process's progress and summary went to its log, not
    into the caption's terminal output, and its model is saved like any other run's."""
    _, _, out, printed = job
    beside = (out / "vqa_world.log").read_text()
    assert "vqa summary" in beside and "vqa summary" not in printed
    assert "caption summary" not in beside
    model = PrismerVQA.from_pretrained(out / "vqa_world" / "final")
    assert model.config.experts == list(PRISMER_EXPERTS)  # the VQA recipe's Prismer, all six experts


def test_the_baselines_are_what_their_definitions_give(job):
    rows, data, _, _ = job
    score = {(task, model.split(" (")[0], metric): value for task, model, metric, value in rows}
    train, test = read(data / "vqav2_train_val.json"), read(data / "vqav2_test.json")

    # Every question answered with the most frequent training answer.
    overall = Counter(e["answer"][0] for e in train).most_common(1)[0][0]
    expected = exact_accuracy({e["question_id"]: overall for e in test}, test)
    assert score["vqa", "most frequent answer", "accuracy"] == pytest.approx(expected)

    prior = question_prior(train, test)
    expected = exact_accuracy(prior, test)
    assert score["vqa", "most frequent answer to the same question", "accuracy"] == pytest.approx(expected)
    # Per type, the prior's accuracy on that type's questions, and chance: the mean over the
    # type's questions of 1 / the answers its text can have (worked out by hand for the world).
    for kind in {e["question_type"] for e in test}:
        of_kind = [e for e in test if e["question_type"] == kind]
        assert score["vqa", "most frequent answer to the same question", kind] == pytest.approx(
            exact_accuracy(prior, of_kind)
        )
        guess = [100 / answers_a_question_can_have(e["question"]) for e in of_kind]
        assert score["vqa", "chance", kind] == pytest.approx(sum(guess) / len(guess))

    # The most frequent training caption given to every test image, scored by the COCO toolkit.
    caption = Counter(e["caption"] for e in read(data / "coco_karpathy_train.json")).most_common(1)[0][0]
    images = read(data / "coco_karpathy_test_gt.json")["images"]
    same = [{"image_id": im["id"], "caption": format_caption(caption)} for im in images]
    scores = coco_caption_scores(same, data / "coco_karpathy_test_gt.json")
    for metric in METRICS:
        assert score["caption", "most frequent caption", metric] == pytest.approx(100 * scores[metric])


def test_samples_page_shows_every_test_image_beside_its_caption(job):
    _, _, out, _ = job
    page = out / "caption_world" / "samples.html"
    text = page.read_text()
    sources = re.findall(r'<img src="([^"]+)"', text)
    assert len(sources) == 4
    assert all((page.parent / html.unescape(s)).is_file() for s in sources)
    assert all(html.escape(r["caption"]) in text for r in read(out / "caption_world" / "caption_results_coco.json"))


def test_question_prior_answers_each_question_with_its_most_frequent_training_answer(tmp_path):
    def entry(question, answer):
        return {"question": question, "answer": [answer], "weight": [1.0]}

    train = [entry("what colour?", "red"), entry("what colour?", "red"), entry("what colour?", "blue")]
    train += [entry("how many?", "2"), entry("how many?", "3"), entry("how many?", "2"), entry("how many?", "2")]
    test = [
        {"question_id": 1, "question": "what colour?", "answer": ["red"] * 10},  # right: red is its prior
        {"question_id": 2, "question": "how many?", "answer": ["3"] * 10},  # wrong: its prior is 2
        {"question_id": 3, "question": "is there?", "answer": ["2"] * 10},  # unseen: the overall answer, 2
    ]
    (tmp_path / "vqav2_train_val.json").write_text(json.dumps(train))
    (tmp_path / "vqav2_test.json").write_text(json.dumps(test))
    assert quickstart.vqa_question_prior(tmp_path) == pytest.approx(100 * 2 / 3)
    assert quickstart.vqa_baseline(tmp_path) == ("2", pytest.approx(100 / 3))  # only the unseen one is right


def test_the_demo_captions_world_scenes_with_the_quickstart_model(job, tmp_path):
    """demo.py with the model the quickstart trained, the world's labels reused (no expert runs)."""
    import demo

    _, data, out, _ = job
    (final,) = sorted(out.glob("caption_*/final"))
    labels = data.parent / "labels"
    before = {p: p.stat().st_mtime_ns for p in labels.rglob("*.png")}
    argv = ["--images", str(data / "vqav2"), "--labels", str(labels), "--model", str(final)]
    done = demo.main([*argv, "--out", str(tmp_path / "demo"), "--batch_size", "8"])
    images = sorted(p.relative_to(data / "vqav2").as_posix() for p in (data / "vqav2").rglob("*.jpg"))
    assert sorted(r["image"] for r in done["results"]) == images and done["skipped"] == 0
    # The test scenes get the captions the quickstart's own evaluation wrote: the demo feeds
    # the model what evaluation fed it (labels, label spaces, resolution, caption settings).
    (evaluated,) = sorted(out.glob("caption_*/caption_results_coco.json"))
    by_id = {int(re.findall(r"\d+", r["image"])[-1]): format_caption(r["caption"]) for r in done["results"]}
    for r in read(evaluated):
        assert by_id[r["image_id"]] == r["caption"]
    assert all(r["caption"] for r in done["results"])
    assert {p: p.stat().st_mtime_ns for p in labels.rglob("*.png")} == before
    # Its label sheets name the world's classes, not the official label spaces' ("person", ...).
    describer = Describer(PrismerCaption.from_pretrained(final), str(final))
    assert describer.class_names == read(data.parent / "label_spaces" / "label_names.json")
    assert describer.class_names["coco"][3:] == ["cube", "sphere", "cone", "cylinder"]


def test_grounded_scores_count_correctly_named_objects_and_named_pairs_that_exist():
    scenes = {
        1: {"objects": [{"colour": "red", "shape": "cube"}, {"colour": "blue", "shape": "sphere"}]},
        2: {"objects": [{"colour": "red", "shape": "cube"}, {"colour": "red", "shape": "cube"}]},
        3: {"objects": [{"colour": "green", "shape": "cone"}]},
    }
    captions = {
        1: "A small red cube in front of a green sphere.",  # names red cube (there), green sphere (not there)
        2: "Two red cubes on a wooden floor.",  # plural: names red cube, both objects
        3: "One object in a room with a grey wall.",  # names no pair
    }
    assert quickstart.named_pairs(captions[1]) == {("red", "cube"), ("green", "sphere")}
    assert quickstart.named_pairs(captions[2]) == {("red", "cube")}
    scores = quickstart.grounded_scores(captions, scenes)
    # Objects named: scene 1 one of two, scene 2 both, scene 3 none -> (1/2 + 1 + 0) / 3.
    assert scores["objects named"] == pytest.approx(100 * 1.5 / 3)
    # Named pairs that exist: red cube, green sphere (no), red cube -> 2 of 3.
    assert scores["named exist"] == pytest.approx(100 * 2 / 3)


def test_constant_caption_scores_are_the_grounded_scores_of_the_caption_on_every_image(tmp_path):
    """The per-pair sums best_constant_caption ranks with equal scoring each training
    caption on every training image with grounded_scores."""
    root = generate(WorldConfig(train_scenes=200, test_scenes=2, balance=True), tmp_path / "world", workers=1)
    train = read(root / "data" / "coco_karpathy_train.json")
    scenes = {s["image"]: s for s in read(root / "scenes.json") if s["image"] in {e["image"] for e in train}}
    captions = sorted({e["caption"] for e in train})
    fast = quickstart.constant_caption_scores(captions, scenes)
    for caption in captions:
        assert fast[caption] == pytest.approx(quickstart.grounded_scores(dict.fromkeys(scenes, caption), scenes))
    best = quickstart.best_constant_caption(root / "data", scenes)
    assert fast[best]["objects named"] > 0 and fast[best]["named exist"] > 0
