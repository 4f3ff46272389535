"""Which question types a world model learns, and when: VQA training curves per type.

Trains each model (`--models`, as in `sandbox.ablation`: PrismerZ, Prismer, single
experts) on one generated answer-balanced world for `--epochs` epochs with the
world recipe (`configs/world_vqa.yaml`, its cosine schedule over the run),
evaluated after every epoch by the engine, which records each evaluation per
question type in the run's `eval_history.jsonl`. Runs go side by side, one
thread each (`sandbox.side_by_side`). Writes `curves.csv` and `curves.png`
(one panel per type: accuracy against training steps, beside the image-blind
question prior and chance) under `--output_dir` and prints the table.

A step of a model with experts costs several times a PrismerZ step, so the
table also gives each run's minutes: the curves compare data seen, the minutes
compare compute.
"""

from __future__ import annotations

import argparse
import csv
import logging
import time
from functools import partial
from pathlib import Path

import torch

from helpers.config import load_config
from sandbox.ablation import CHANCE, MODELS, PRIOR, REFERENCE_STYLE, evaluations, save_panels, train_eval
from sandbox.quickstart import RECIPES, per_type, question_prior_answers, vqa_chance, vqa_scores
from sandbox.side_by_side import SideBySide
from sandbox.world import WorldConfig, generate

log = logging.getLogger("curves")


def curve(run_dir: Path) -> list[dict]:
    """A run's evaluations: epoch, step, overall and per-type accuracy."""
    history = evaluations(run_dir)
    return [{"epoch": h["epoch"], "step": h["step"], "overall": h["eval/accuracy"]} | per_type(h) for h in history]


def plot(rows: list[dict], references: dict[str, dict], path: Path) -> Path:
    """One panel per question type (and overall): accuracy against steps per model,
    the image-blind references as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = ["overall", *sorted(references[CHANCE]["per_type"])]
    cols = 4
    fig, axes = plt.subplots(-(-len(kinds) // cols), cols, figsize=(3.6 * cols, 3 * -(-len(kinds) // cols)))
    models = list(dict.fromkeys(r["model"] for r in rows))
    for ax, kind in zip(axes.flat, kinds):
        for model in models:
            pts = [r for r in rows if r["model"] == model]
            ax.plot([r["step"] for r in pts], [r[kind] for r in pts], marker="o", markersize=3, label=model)
        for name, scores in references.items():
            value = scores["overall"] if kind == "overall" else scores["per_type"][kind]
            ax.axhline(value, color="black", linestyle=REFERENCE_STYLE[name], linewidth=1, label=name)
        ax.set_title(kind)
        ax.set_xlabel("training steps")
        ax.set_ylabel("accuracy (%)")
    return save_panels(fig, axes, len(kinds), "VQA accuracy per question type during training (test scenes)", path)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=["PrismerZ", "Prismer"])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--train_scenes", type=int, default=2000)
    p.add_argument("--test_scenes", type=int, default=300)
    p.add_argument("--root", default=None, help="where the world is (generated if missing)")
    p.add_argument("--output_dir", default="outputs/curves")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, help="runs side by side, one thread each (default: one per thread)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error(f"--epochs must be at least 1, got {args.epochs}")
    owned = [kv for kv in args.set if kv.split("=", 1)[0] in ("max_epoch", "eval_every_epochs", "seed")]
    if owned:
        p.error(f"--set {owned[0]}: use --epochs / --seed; every epoch is evaluated")
    load_config(RECIPES["vqa"], None, args.set)  # a bad --set fails now, not in the runs after the world is made
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    t0 = time.perf_counter()
    cfg = WorldConfig(train_scenes=args.train_scenes, test_scenes=args.test_scenes, balance=True)
    world = generate(cfg, args.root or f"data/curves_world_{cfg.train_scenes}_{cfg.test_scenes}")
    out = Path(args.output_dir)
    data = world / "data"
    references = {PRIOR: vqa_scores(data, question_prior_answers(data)), CHANCE: vqa_chance(data, cfg)}

    folders = {model: out / model for model in args.models}
    values = {"max_epoch": args.epochs, "eval_every_epochs": 1, "seed": args.seed}
    workers = min(args.workers or torch.get_num_threads(), len(args.models))
    log.info("%d runs, %d side by side; a run's output: its folder's train.log", len(args.models), workers)
    with SideBySide(workers, threads=1) as pool:
        futures = {
            model: pool.submit(
                partial(train_eval, world, values | {"experts": MODELS[model], "output_dir": str(folder)}, args.set),
                folder / "train.log",
            )
            for model, folder in folders.items()
        }
        minutes = {model: future.result()["seconds"] / 60 for model, future in futures.items()}

    rows = [{"model": m} | point for m, folder in folders.items() for point in curve(folder)]
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    png = plot(rows, references, out / "curves.png")

    kinds = [k for k in rows[0] if k not in ("model", "epoch", "step")]
    width = max(len(m) for m in [*folders, PRIOR, CHANCE])
    print(f"\n{'model':<{width}} {'epoch':>5} {'step':>5} {'min':>5}" + "".join(f" {k:>8}" for k in kinds))
    for r in rows:  # a run's minutes (training and every evaluation) beside its last epoch
        spent = f"{minutes[r['model']]:5.1f}" if r["epoch"] == args.epochs else ""
        cells = "".join(f" {r[k]:8.1f}" for k in kinds)
        print(f"{r['model']:<{width}} {r['epoch']:>5} {r['step']:>5} {spent:>5}{cells}")
    for name, scores in references.items():
        cells = "".join(f" {(scores['overall'] if k == 'overall' else scores['per_type'][k]):8.1f}" for k in kinds)
        print(f"{name:<{width}} {'':>5} {'':>5} {'':>5}{cells}")
    print(f"({time.perf_counter() - t0:.0f} s in all; {out / 'curves.csv'}, {png})")
    return rows


if __name__ == "__main__":
    main()
