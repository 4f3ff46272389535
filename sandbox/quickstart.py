"""The main job (`make quickstart`): the synthetic world end to end on a laptop.

Generates the world if missing (`sandbox.world`), trains a small Prismer with
every expert from random init through the engine the scripts run
(`helpers.engine.run`) with the world recipes in `configs/`, scores it with the
engine's evaluation (COCO caption metrics, VQA accuracy), writes sample
captions beside their images (an HTML page), and prints a results table
against baselines that ignore the image (the most frequent training caption
for every image; the most frequent training answer, overall and per question text).
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from helpers.config import RunConfig, load_config
from helpers.engine import RunOptions, run
from helpers.metrics import coco_caption_scores, format_caption, vqa_accuracy
from helpers.tasks import CAPTION, VQA
from sandbox.world import WorldConfig, generate

log = logging.getLogger("quickstart")
# Sized so both tasks train and evaluate in about ten minutes on 2 CPU cores.
WORLD = WorldConfig(train_scenes=600, test_scenes=100)
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
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


def _vqa_score(data_path: Path, answer_for) -> float:
    """VQA accuracy on the test list of answering each entry with `answer_for(entry)`."""
    test = json.loads((data_path / "vqav2_test.json").read_text())
    truth = [{"question_id": e["question_id"], "answers": e["answer"]} for e in test]
    results = [{"question_id": e["question_id"], "answer": answer_for(e)} for e in test]
    return vqa_accuracy(results, truth)["overall"]


def vqa_baseline(data_path: Path) -> tuple[str, float]:
    """The answer with the most training weight, given to every test question."""
    answer = _votes(json.loads((data_path / "vqav2_train_val.json").read_text())).most_common(1)[0][0]
    return answer, _vqa_score(data_path, lambda e: answer)


def vqa_question_prior(data_path: Path) -> float:
    """Accuracy of answering each test question with the most frequent training
    answer to the same question text (unseen questions get the overall one):
    what a model can learn from the training answers alone, without the image."""
    train = json.loads((data_path / "vqav2_train_val.json").read_text())
    by_question = {}
    for e in train:
        by_question.setdefault(e["question"], []).append(e)
    best = {q: _votes(es).most_common(1)[0][0] for q, es in by_question.items()}
    fallback = _votes(train).most_common(1)[0][0]
    return _vqa_score(data_path, lambda e: best.get(e["question"], fallback))


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


def main(argv: list[str] | None = None) -> list[tuple]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="data/world", help="where the world is (generated if missing)")
    p.add_argument("--task", choices=["caption", "vqa", "both"], default="both")
    p.add_argument("--output_dir", default="outputs")
    p.add_argument(
        "--train_scenes", type=int, default=WORLD.train_scenes, help="world size (a new --root for a new size)"
    )
    p.add_argument("--test_scenes", type=int, default=WORLD.test_scenes)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    t0 = time.perf_counter()
    world = dataclasses.replace(WORLD, train_scenes=args.train_scenes, test_scenes=args.test_scenes)
    root = generate(world, args.root)
    data = root / "data"
    values, options = {"output_dir": args.output_dir}, RunOptions(exp_name="world")
    rows = []
    if args.task in ("caption", "both"):
        metrics = run(CAPTION, world_config("caption", root, values, args.set), options)
        page = write_samples(Path(args.output_dir) / "caption_world", data)
        log.info("sample captions beside their images: %s", page)
        caption, base = caption_baseline(data)
        for key in ("CIDEr", "Bleu_4", "METEOR", "ROUGE_L"):
            rows.append(("caption", "Prismer, all experts", key, 100 * metrics[f"eval/{key}"]))
            rows.append(("caption", f"most frequent caption ({caption!r})", key, 100 * base[key]))
    if args.task in ("vqa", "both"):
        metrics = run(VQA, world_config("vqa", root, values, args.set), options)
        answer, base = vqa_baseline(data)
        rows.append(("vqa", "Prismer, all experts", "accuracy", metrics["eval/accuracy"]))
        rows.append(("vqa", f"most frequent answer ({answer!r})", "accuracy", base))
        rows.append(("vqa", "most frequent answer to the same question", "accuracy", vqa_question_prior(data)))
    print(f"\nResults on the synthetic world's test split ({time.perf_counter() - t0:.0f} s in all)")
    width = max(len(r[1]) for r in rows)
    print(f"{'task':<8} {'model':<{width}} {'metric':<9} {'score':>7}")
    for task, model, metric, score in rows:
        print(f"{task:<8} {model:<{width}} {metric:<9} {score:7.1f}")
    return rows


if __name__ == "__main__":
    main()
