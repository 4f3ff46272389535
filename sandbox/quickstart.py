"""The main job (`make quickstart`): the synthetic world end to end on a laptop.

Generates the world if missing (`sandbox.world`), trains small models from
random init through the engine the scripts run (`helpers.engine.run`) with the
world recipes in `configs/`: a PrismerZ captioner (RGB only) and a Prismer VQA
model with all six experts (`--set experts=[...]` sets both; caption and VQA
side by side in two processes where there are 2+ threads: a model this small
trains only 1.3x faster on two threads than on one), scores them with the
engine's evaluation (COCO caption metrics, VQA accuracy), writes sample
captions beside their images (an HTML page), and prints a results table
against baselines that ignore the image (the most frequent training caption
for every image; the most frequent training answer, overall and per question
text) and chance, VQA per question type, and how much of each image the
captions name correctly (`grounded_scores`, from the world's scene facts).
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch

from common.modalities import PRISMER_EXPERTS
from helpers.config import RunConfig, load_config
from helpers.engine import EVAL_HISTORY, RunOptions, read_evaluations, run
from helpers.metrics import coco_caption_scores, format_caption, vqa_accuracy
from helpers.tasks import CAPTION, VQA, answer_truth
from sandbox.side_by_side import SideBySide
from sandbox.world import COLOURS, SHAPES, WorldConfig, answer_choices, generate

log = logging.getLogger("quickstart")
# Sized so both tasks train and evaluate in about six minutes on 2 CPU cores (side by side, one thread each).
WORLD = WorldConfig(train_scenes=2000, test_scenes=100, balance=True)
# Captions from RGB only: with all six experts a step costs ~3x (their 64 resampler latents
# double the encoder's tokens) and the captioner's two epochs would not fit the quickstart's
# minutes. VQA keeps its recipe's experts: one epoch of Prismer scores about what three of
# PrismerZ do in the same minutes, and learns shape from the experts where PrismerZ learns
# colour (README, world section). `--set experts=[...]` sets both.
CAPTION_EXPERTS = ["none"]
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PRIOR = "most frequent answer to the same question"
CHANCE = "chance (a uniform guess among the question's answers)"
RECIPES = {"caption": CONFIGS / "world_caption.yaml", "vqa": CONFIGS / "world_vqa.yaml"}


def world_config(task: str, root: Path, values: Mapping[str, Any] | None = None, overrides=()) -> RunConfig:
    """The world recipe of `task` pointed at the world under `root`, then `values`,
    then a command line's `--set` overrides."""
    paths = {
        "data_path": str(root / "data"),
        "label_path": str(root / "labels"),
        "label_space_path": str(root / "label_spaces"),
        "tokenizer": str(root / "tokenizer"),
    }
    return load_config(RECIPES[task], None, overrides, paths | dict(values or {}))


def model_name(experts: list[str]) -> str:
    """How the results table names a run's model."""
    if not experts:
        return "PrismerZ (RGB only)"
    return "Prismer, all experts" if set(experts) == set(PRISMER_EXPERTS) else f"Prismer ({', '.join(experts)})"


def caption_baseline(data_path: Path) -> tuple[str, dict]:
    """The most frequent training caption, scored as the answer for every test image."""
    train = json.loads((data_path / "coco_karpathy_train.json").read_text())
    caption = Counter(e["caption"] for e in train).most_common(1)[0][0]
    gt = json.loads((data_path / "coco_karpathy_test_gt.json").read_text())
    results = [{"image_id": im["id"], "caption": format_caption(caption)} for im in gt["images"]]
    return caption, coco_caption_scores(results, data_path / "coco_karpathy_test_gt.json")


def _votes(entries: list[dict]) -> Counter:
    votes = Counter()
    for e in entries:
        for answer, weight in zip(e["answer"], e.get("weight", [1.0] * len(e["answer"]))):
            votes[answer] += weight
    return votes


def vqa_scores(data_path: Path, answers: Mapping[int, str]) -> dict:
    """VQA accuracy of `answers` (question_id -> answer) on the test list:
    `overall` and `per_type`, by the world's question type, as the engine's evaluation scores them."""
    test = json.loads((data_path / "vqav2_test.json").read_text())
    truth = [answer_truth(e) for e in test]
    results = [{"question_id": e["question_id"], "answer": answers[e["question_id"]]} for e in test]
    scores = vqa_accuracy(results, truth)
    return {"overall": scores["overall"], "per_type": scores["per_answer_type"]}


def _vqa_score(data_path: Path, answer_for) -> float:
    """VQA accuracy on the test list of answering each entry with `answer_for(entry)`."""
    test = json.loads((data_path / "vqav2_test.json").read_text())
    return vqa_scores(data_path, {e["question_id"]: answer_for(e) for e in test})["overall"]


def vqa_baseline(data_path: Path) -> tuple[str, float]:
    """The answer with the most training weight, given to every test question."""
    answer = _votes(json.loads((data_path / "vqav2_train_val.json").read_text())).most_common(1)[0][0]
    return answer, _vqa_score(data_path, lambda e: answer)


def question_prior_answers(data_path: Path) -> dict[int, str]:
    """question_id -> the most frequent training answer to the same question
    text (unseen questions get the overall one): what a model can learn from
    the training answers alone, without the image."""
    train = json.loads((data_path / "vqav2_train_val.json").read_text())
    by_question = {}
    for e in train:
        by_question.setdefault(e["question"], []).append(e)
    best = {q: _votes(es).most_common(1)[0][0] for q, es in by_question.items()}
    fallback = _votes(train).most_common(1)[0][0]
    test = json.loads((data_path / "vqav2_test.json").read_text())
    return {e["question_id"]: best.get(e["question"], fallback) for e in test}


def vqa_question_prior(data_path: Path) -> float:
    """Accuracy of the question prior (`question_prior_answers`) on the test list."""
    return vqa_scores(data_path, question_prior_answers(data_path))["overall"]


def vqa_chance(data_path: Path, cfg: WorldConfig) -> dict:
    """Expected accuracy of a uniform guess among the answers each test
    question can have (`sandbox.world.answer_choices`), overall and per type."""
    per_type = {}
    for e in json.loads((data_path / "vqav2_test.json").read_text()):
        q = {"type": e["question_type"], "question": e["question"]}
        per_type.setdefault(e["question_type"], []).append(100 / answer_choices(q, cfg))
    every = [v for vs in per_type.values() for v in vs]
    return {"overall": sum(every) / len(every), "per_type": {t: sum(v) / len(v) for t, v in sorted(per_type.items())}}


def named_pairs(caption: str) -> set[tuple[str, str]]:
    """The (colour, shape) pairs a caption names: a colour word followed by a
    shape word, singular or plural ('two red cubes' names (red, cube))."""
    words = re.findall(r"[a-z]+", caption.lower())
    return {
        (c, s.removesuffix("s")) for c, s in zip(words, words[1:]) if c in COLOURS and s.removesuffix("s") in SHAPES
    }


def grounded_scores(captions: Mapping[Any, str], scenes: Mapping[Any, dict]) -> dict[str, float]:
    """How much of each image a caption gets right, from the scene's facts:
    `objects named`, the mean over images of the fraction of objects whose
    colour and shape the caption names; `named exist`, of all colour-shape
    pairs the captions name, the percentage present in their scene."""
    named = exist = 0
    recall = []
    for key, caption in captions.items():
        pairs = named_pairs(caption)
        present = [(o["colour"], o["shape"]) for o in scenes[key]["objects"]]
        recall.append(sum(p in pairs for p in present) / len(present))
        named += len(pairs)
        exist += len(pairs & set(present))
    return {"objects named": 100 * sum(recall) / len(recall), "named exist": 100 * exist / max(named, 1)}


def constant_caption_scores(captions: Iterable[str], scenes: Mapping[Any, dict]) -> dict[str, dict[str, float]]:
    """`grounded_scores` of each caption given to every scene, for many captions at
    once: a constant caption's scores add up over the pairs it names, so two numbers
    per pair give them (scoring ~1000 captions on every image one by one took 30 s)."""
    share, held = Counter(), Counter()  # pair -> its mean share of a scene's objects; of scenes that hold it
    for scene in scenes.values():
        present = [(o["colour"], o["shape"]) for o in scene["objects"]]
        share.update({p: n / len(present) / len(scenes) for p, n in Counter(present).items()})
        held.update(dict.fromkeys(present, 1 / len(scenes)))
    scores = {}
    for caption in captions:
        pairs = named_pairs(caption)
        scores[caption] = {
            "objects named": 100 * sum(share[p] for p in pairs),
            "named exist": 100 * sum(held[p] for p in pairs) / max(len(pairs), 1),
        }
    return scores


def best_constant_caption(data_path: Path, scenes: Mapping[Any, dict]) -> str:
    """The training caption that, given to every training image, scores the
    highest grounded F1 (harmonic mean of `grounded_scores`' two numbers)."""
    train = json.loads((data_path / "coco_karpathy_train.json").read_text())
    images = {e["image"] for e in train}
    scores = constant_caption_scores(sorted({e["caption"] for e in train}), {i: scenes[i] for i in images})

    def f1(caption):
        recall, precision = scores[caption]["objects named"], scores[caption]["named exist"]
        return 2 * recall * precision / max(recall + precision, 1e-9)

    return max(scores, key=f1)


def write_samples(run_dir: Path, data_path: Path, n: int = 24) -> Path:
    """An HTML page of the first `n` test images, each beside its generated
    caption and references (images linked, not copied)."""
    results = {r["image_id"]: r["caption"] for r in json.loads((run_dir / "caption_results_coco.json").read_text())}
    gt = json.loads((data_path / "coco_karpathy_test_gt.json").read_text())
    refs = {}
    for a in gt["annotations"]:
        refs.setdefault(a["image_id"], []).append(a["caption"])
    rows = []
    for im in gt["images"][:n]:
        src = os.path.relpath(data_path / "vqav2" / im["file_name"], run_dir)
        ref = "<br>".join(html.escape(c) for c in refs[im["id"]])
        rows.append(
            f'<tr><td><img src="{html.escape(src)}" width="128"></td>'
            f"<td><b>{html.escape(results.get(im['id'], '(none)'))}</b></td><td>{ref}</td></tr>"
        )
    page = run_dir / "samples.html"
    page.write_text(
        "<html><body><table border=1><tr><th>image</th><th>Prismer</th><th>references</th></tr>"
        + "".join(rows)
        + "</table></body></html>"
    )
    return page


def caption_rows(config: RunConfig, options: RunOptions, root: Path, output_dir: Path, model: str) -> list[tuple]:
    """Trains and scores the caption model; its rows beside the image-blind captions."""
    data = root / "data"
    metrics = run(CAPTION, config, options)
    page = write_samples(output_dir / "caption_world", data)
    log.info("sample captions beside their images: %s", page)
    caption, base = caption_baseline(data)
    rows = []
    for key in ("CIDEr", "Bleu_4", "METEOR", "ROUGE_L"):
        rows.append(("caption", model, key, 100 * metrics[f"eval/{key}"]))
        rows.append(("caption", f"most frequent caption ({caption!r})", key, 100 * base[key]))
    results = json.loads((output_dir / "caption_world" / "caption_results_coco.json").read_text())
    scenes = json.loads((root / "scenes.json").read_text())
    by_id = {s["index"] + 1: s for s in scenes}
    best = best_constant_caption(data, {s["image"]: s for s in scenes})
    written = {r["image_id"]: r["caption"] for r in results}
    for name, captions in (
        (model, written),
        (f"most frequent caption ({caption!r})", dict.fromkeys(written, caption)),
        (f"best constant caption ({best!r})", dict.fromkeys(written, best)),
    ):
        rows.append(("caption", name, "distinct", len(set(captions.values()))))
        rows += [("caption", name, k, v) for k, v in grounded_scores(captions, by_id).items()]
    return rows


def vqa_rows(config: RunConfig, options: RunOptions, root: Path, model: str, world: WorldConfig) -> list[tuple]:
    """Trains and scores the VQA model; its rows beside the image-blind answers and chance, per question type."""
    data = root / "data"
    metrics = run(VQA, config, options)
    scores = {"overall": metrics["eval/accuracy"], "per_type": per_type(metrics)}
    answer, base = vqa_baseline(data)
    prior, chance = vqa_scores(data, question_prior_answers(data)), vqa_chance(data, world)
    rows = [
        ("vqa", model, "accuracy", scores["overall"]),
        ("vqa", f"most frequent answer ({answer!r})", "accuracy", base),
        ("vqa", PRIOR, "accuracy", prior["overall"]),
        ("vqa", CHANCE, "accuracy", chance["overall"]),
    ]
    for kind in chance["per_type"]:
        rows += [
            ("vqa", name, kind, v["per_type"][kind]) for name, v in ((model, scores), (PRIOR, prior), (CHANCE, chance))
        ]
    return rows


def per_type(metrics: Mapping[str, float]) -> dict[str, float]:
    """The per-question-type accuracies among a VQA evaluation's metrics."""
    prefix = "eval/accuracy/"
    return {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}


def print_vqa_curve(run_dir: Path) -> None:
    """VQA accuracy per question type after each evaluation (the engine's history):
    which types the model learns, and when."""
    history = read_evaluations(run_dir / EVAL_HISTORY)
    kinds = list(per_type(history[-1]))
    print("\nVQA accuracy per question type during training")
    print(f"{'epoch':>5} {'step':>5} {'overall':>7}" + "".join(f" {k:>8}" for k in kinds))
    for h in history:
        cells = "".join(f" {per_type(h)[k]:8.1f}" for k in kinds)
        print(f"{h['epoch']:>5} {h['step']:>5} {h['eval/accuracy']:7.1f}{cells}")


def main(argv: list[str] | None = None) -> list[tuple]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="data/world", help="where the world is (generated if missing)")
    p.add_argument("--task", choices=["caption", "vqa", "both"], default="both")
    p.add_argument("--output_dir", default="outputs")
    p.add_argument(
        "--train_scenes", type=int, default=WORLD.train_scenes, help="world size (a new --root for a new size)"
    )
    p.add_argument("--test_scenes", type=int, default=WORLD.test_scenes)
    p.add_argument(
        "--balance",
        action=argparse.BooleanOptionalAction,
        default=WORLD.balance,
        help="answer-balanced questions (--no-balance: the original world, for the older numbers; a new --root)",
    )
    p.add_argument(
        "--parallel",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train VQA in a second process beside captioning, each on half the threads "
        "(default: when torch has 2 or more; models this small use 2 threads at only 1.3x one)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    t0 = time.perf_counter()
    world = dataclasses.replace(
        WORLD, train_scenes=args.train_scenes, test_scenes=args.test_scenes, balance=args.balance
    )
    root, out = generate(world, args.root), Path(args.output_dir)
    values, options = {"output_dir": args.output_dir}, RunOptions(exp_name="world")
    configs = {
        "caption": world_config("caption", root, values | {"experts": CAPTION_EXPERTS}, args.set),
        "vqa": world_config("vqa", root, values, args.set),
    }
    caption = partial(caption_rows, configs["caption"], options, root, out, model_name(configs["caption"].experts))
    vqa = partial(vqa_rows, configs["vqa"], options, root, model_name(configs["vqa"].experts), world)
    threads = torch.get_num_threads()
    parallel = args.parallel if args.parallel is not None else threads >= 2
    if args.task == "both" and parallel:
        beside, share = out / "vqa_world.log", max(1, threads // 2)
        log.info("VQA trains in a second process beside captioning, on %d of %d threads: %s", share, threads, beside)
        with SideBySide(workers=1, threads=share) as pool:
            vqa_done = pool.submit(vqa, beside)
            torch.set_num_threads(max(1, threads - share))
            try:
                rows = caption()
            finally:
                torch.set_num_threads(threads)
            if not vqa_done.done():
                log.info("captioning done; waiting for VQA (%s)", beside)
            rows += vqa_done.result()
    else:
        rows = (caption() if args.task in ("caption", "both") else []) + (vqa() if args.task in ("vqa", "both") else [])
    print(f"\nResults on the synthetic world's test split ({time.perf_counter() - t0:.0f} s in all)")
    width = max(len(r[1]) for r in rows)
    print(f"{'task':<8} {'model':<{width}} {'metric':<13} {'score':>7}")
    for task, name, metric, score in rows:
        print(f"{task:<8} {name:<{width}} {metric:<13} {score:7.1f}")
    if args.task in ("vqa", "both"):
        print_vqa_curve(out / "vqa_world")
    return rows


if __name__ == "__main__":
    main()
