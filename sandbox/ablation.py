"""The paper's expert ablations in miniature, on the built-in synthetic world.

(a) Data efficiency: PrismerZ (RGB only), Prismer (all six experts) and
single-expert models trained on the first N training scenes for several N.
(b) Robustness: Prismer with one expert's labels replaced by noise or by a
corrupted version of themselves (each image given another image's label),
against clean Prismer at the same N.

Every run goes through the real paths: `sandbox.world.generate`, the recipe
`configs/world_vqa.yaml` with the run's keys set, the engine's `run` (what
train_vqa.py runs) and its evaluation. The metric is VQA accuracy (percent,
the engine's `eval/accuracy` and `eval/accuracy/<type>` of the run's last
evaluation): ranking a short answer list is cheap (no beam search, no
pycocoevalcap), and the world's questions (colour, shape, count, which is
closer, the sign's word) ask for exactly what the experts encode.

Scores are reported overall and per question type (colour, shape, count,
yes/no, closer, sign), each beside the image-blind question prior and chance
(a uniform guess among the answers a question can have). The world is
answer-balanced (`WorldConfig.balance`), so the prior sits near chance;
`--no-balance` generates the original world the older numbers came from.

One world is generated with the largest N; a size-N run trains on a copy of the
VQA training list keeping the first N scenes' questions (images linked, not
copied) and is evaluated on the same test scenes as every other run. Every run
trains for about the same number of optimizer steps (smaller sets for more
epochs, one cosine schedule over the run, evaluated once at the end), so a
size axis measures data, not compute. Corrupted experts are real label trees
(same PNG formats) that `label_path` points at. Runs go side by side, one
thread each (`--workers`, default one per thread; `sandbox.side_by_side`).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import statistics
import time
from collections import defaultdict
from concurrent.futures import as_completed
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from common.modalities import EXPERTS, PRISMER_EXPERTS
from helpers.config import load_config
from helpers.engine import EVAL_HISTORY, RunOptions, read_evaluations, run
from helpers.tasks import VQA
from sandbox.quickstart import RECIPES, per_type, question_prior_answers, vqa_chance, vqa_scores, world_config
from sandbox.side_by_side import SideBySide
from sandbox.world import WorldConfig, generate, image_name

log = logging.getLogger("ablation")

ALL_EXPERTS = list(PRISMER_EXPERTS)
MODELS = {
    "PrismerZ": ["none"],
    "Prismer": ALL_EXPERTS,
    "depth": ["depth"],
    "seg_coco": ["seg_coco"],
    "obj_detection": ["obj_detection"],
}
PRIOR = "question prior (no image)"  # most frequent training answer to the same question
CHANCE = "chance"  # a uniform guess among the answers each test question can have
CORRUPTIONS = ("noise", "shuffle")
REFERENCE_STYLE = {PRIOR: "--", CHANCE: ":"}  # image-blind references, drawn black
TYPE_PREFIX = "accuracy "  # a row's per-type columns: "accuracy colour", ...
# Sized for issue 16's recipe (configs/world_vqa.yaml): in a plain loop on one core
# Prismer with all experts learned shape from the segmentation expert by ~500 steps
# (52% against chance 25) while PrismerZ learned only colour in 3000; an expert step
# costs ~3.6x a PrismerZ step. So: enough steps for that effect, few models and sizes.
DEFAULTS = {  # --fast: one size, one seed, the two main models
    False: {
        "sizes": [400, 2000],
        "test_scenes": 200,
        "models": ["PrismerZ", "Prismer", "seg_coco"],
        "corrupt": ["seg_coco:noise"],
        "robust_size": 2000,
        "steps": 500,
        "seeds": 2,
    },
    True: {
        "sizes": [2000],
        "test_scenes": 100,
        "models": ["PrismerZ", "Prismer"],
        "corrupt": [],
        "robust_size": 2000,
        "steps": 500,
        "seeds": 1,
    },
}


def relink(link: Path, target: Path) -> None:
    """`link` -> `target`, replacing an older link: a reused output folder must
    not keep pointing at a previous world."""
    if link.is_symlink():
        link.unlink()
    link.symlink_to(target.resolve())


def subset_data(world: Path, cfg: WorldConfig, n: int, out: Path) -> tuple[Path, int]:
    """A data folder training on the world's first `n` scenes: the VQA training
    list filtered to their images, everything else linked to the world's.
    Returns the folder and its number of training questions."""
    if not 1 <= n <= cfg.train_scenes:
        raise ValueError(f"training size {n} is outside the world's 1..{cfg.train_scenes} training scenes")
    out.mkdir(parents=True, exist_ok=True)
    src = world / "data"
    for name in ("vqav2", "vqav2_test.json", "answer_list.json"):
        relink(out / name, src / name)
    keep = {image_name(i, cfg) for i in range(n)}
    train = [e for e in json.loads((src / "vqav2_train_val.json").read_text()) if e["image"] in keep]
    (out / "vqav2_train_val.json").write_text(json.dumps(train))
    return out, len(train)


def epochs_for(steps: int, questions: int, batch: int) -> int:
    """Epochs of `questions` (last partial batch dropped) closest to `steps` optimizer steps."""
    per_epoch = questions // batch
    if per_epoch == 0:
        raise ValueError(f"{questions} training questions make no batch of {batch}")
    return max(1, round(steps / per_epoch))


def corrupt_labels(labels: Path, expert: str, mode: str, out: Path, seed: int = 0) -> Path:
    """A label tree equal to `labels` except `expert`, whose files are rewritten
    in the same formats: 'noise' (uniform random values for dense maps, random
    class ids for class maps) or 'shuffle' (every image gets another image's
    label files, a plausible but wrong expert). Other experts are linked."""
    if mode not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {mode!r}; known: {CORRUPTIONS}")
    spec = EXPERTS[expert]
    if mode == "noise" and spec.kind.noise is None:
        raise ValueError(f"noise is not defined for {expert} ({spec.kind.name} labels)")
    out.mkdir(parents=True, exist_ok=True)
    for child in labels.iterdir():
        if child.name != expert:
            relink(out / child.name, child)
    target = out / expert
    if target.exists():
        shutil.rmtree(target)
    pngs = sorted((labels / expert).rglob("*.png"))
    rng = np.random.default_rng(seed)
    if mode == "shuffle":
        order = rng.permutation(len(pngs))
        donors = {pngs[order[i]]: pngs[order[(i + 1) % len(pngs)]] for i in range(len(pngs))}  # a derangement
    num_classes = None
    if mode == "noise" and spec.label_space is not None:
        names = json.loads((labels.parent / "label_spaces" / "label_names.json").read_text())
        num_classes = len(names[spec.label_space])
    for png in tqdm(pngs, desc=f"{expert}: {mode}", unit="label"):
        dst = target / png.relative_to(labels / expert)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if mode == "shuffle":
            for f in spec.kind.files(donors[png]):  # the PNG and its sidecars (classes, words)
                shutil.copyfile(f, dst.with_suffix(f.suffix))
            continue
        with Image.open(png) as img:
            img.load()
            spec.kind.noise(img, rng, num_classes).save(dst)
    return out


class Run(NamedTuple):
    """One training run of the ablation: what its row reports, where it writes, its recipe values."""

    experiment: str  # data | robust
    model: str
    experts: list[str]
    train_scenes: int
    seed: int
    epochs: int
    folder: Path
    values: dict


def train_eval(world: Path, values: dict, overrides: list[str]) -> dict:
    """One real VQA run of the engine: the world recipe with `values` set, then
    the command line's `--set` overrides. Returns its last evaluation from the
    run's history (epoch, step trained, metrics overall and per question type)
    and the seconds the run took."""
    start = time.perf_counter()
    run(VQA, world_config("vqa", world, values, overrides), RunOptions(exp_name="run"))
    return evaluations(Path(values["output_dir"]))[-1] | {"seconds": time.perf_counter() - start}


def evaluations(folder: Path) -> list[dict]:
    """The evaluation history of the `train_eval` run in `folder`, oldest first."""
    return read_evaluations(folder / "vqa_run" / EVAL_HISTORY)


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and std (over seeds) of accuracy per experiment, model and size,
    overall and per question type (`per_type`: type -> [mean, std])."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["experiment"], r["model"], r["train_scenes"], r["steps"])].append(r)
    summary = []
    for (e, m, n, steps), rs in groups.items():
        mean, std = _stats([r["accuracy"] for r in rs])
        kinds = [k for k in rs[0] if k.startswith(TYPE_PREFIX)]
        by_type = {k.removeprefix(TYPE_PREFIX): list(_stats([r[k] for r in rs])) for k in kinds}
        summary.append(
            {
                "experiment": e,
                "model": m,
                "train_scenes": n,
                "steps": steps,
                "seeds": len(rs),
                "mean": mean,
                "std": std,
                "per_type": by_type,
            }
        )
    return summary


def plot(summary: list[dict], path: Path) -> Path:
    """Accuracy vs training scenes per model (mean ± std over seeds), plus the
    robustness runs as points at their size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for experiment, marker, style in (("data", "o", "-"), ("robust", "x", "none")):
        by_model = defaultdict(list)
        for s in summary:
            if s["experiment"] == experiment:
                by_model[s["model"]].append(s)
        for model, pts in sorted(by_model.items()):
            pts.sort(key=lambda s: s["train_scenes"])
            ax.errorbar(
                [s["train_scenes"] for s in pts],
                [s["mean"] for s in pts],
                yerr=[s["std"] for s in pts],
                marker=marker,
                linestyle=REFERENCE_STYLE.get(model, style),
                color="black" if model in REFERENCE_STYLE else None,
                capsize=3,
                label=model,
            )
    ax.set_xscale("log")
    sizes = sorted({s["train_scenes"] for s in summary})
    ax.set_xticks(sizes, [str(n) for n in sizes], minor=False)
    ax.set_xticks([], minor=True)
    ax.set_xlabel("training scenes")
    ax.set_ylabel("VQA accuracy on the test scenes (%)")
    ax.set_title("Expert ablation on the synthetic world (mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_per_type(summary: list[dict], path: Path) -> Path:
    """One panel per question type: accuracy vs training scenes per model of
    the data experiment (mean ± std over seeds), beside the prior and chance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({k for s in summary for k in s["per_type"]})
    cols = 3
    rows = -(-len(kinds) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    by_model = defaultdict(list)
    for s in summary:
        if s["experiment"] == "data":
            by_model[s["model"]].append(s)
    sizes = sorted({s["train_scenes"] for s in summary})
    for ax, kind in zip(axes.flat, kinds):
        for model, pts in sorted(by_model.items()):
            pts = sorted((s for s in pts if kind in s["per_type"]), key=lambda s: s["train_scenes"])
            ax.errorbar(
                [s["train_scenes"] for s in pts],
                [s["per_type"][kind][0] for s in pts],
                yerr=[s["per_type"][kind][1] for s in pts],
                marker="o",
                linestyle=REFERENCE_STYLE.get(model, "-"),
                color="black" if model in REFERENCE_STYLE else None,
                capsize=3,
                label=model,
            )
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(n) for n in sizes], minor=False)
        ax.set_xticks([], minor=True)
        ax.set_title(kind)
        ax.set_xlabel("training scenes")
        ax.set_ylabel("accuracy (%)")
    return save_panels(fig, axes, len(kinds), "VQA accuracy per question type (mean ± std over seeds)", path)


def save_panels(fig, axes, used: int, title: str, path: Path) -> Path:
    """Writes a grid of per-type panels: the unused ones hidden, the legend on the first."""
    import matplotlib.pyplot as plt

    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(rows: list[dict], summary: list[dict], out: Path) -> None:
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


def print_table(summary: list[dict]) -> None:
    width = max(len(s["model"]) for s in summary)
    kinds = sorted({k for s in summary for k in s["per_type"]})
    head = "".join(f" {k:>12}" for k in kinds)
    print(f"\n{'experiment':<10} {'model':<{width}} {'scenes':>6} {'steps':>5} {'seeds':>5} {'accuracy':>12}{head}")
    for s in summary:
        cells = [f"{s['mean']:.1f} ± {s['std']:.1f}"]
        cells += [f"{s['per_type'][k][0]:.1f} ± {s['per_type'][k][1]:.1f}" if k in s["per_type"] else "" for k in kinds]
        cols = f"{s['train_scenes']:>6} {s['steps']:>5} {s['seeds']:>5}"
        print(f"{s['experiment']:<10} {s['model']:<{width}} {cols}" + "".join(f" {c:>12}" for c in cells))


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fast", action="store_true", help="small sizes and fewer models (minutes, not an hour)")
    p.add_argument("--root", default=None, help="where the ablation world is (generated if missing)")
    p.add_argument("--output_dir", default="outputs/ablation")
    p.add_argument("--sizes", type=int, nargs="+", help="training scenes per point")
    p.add_argument("--test_scenes", type=int)
    p.add_argument("--seeds", type=int, help="seeds per point (0..seeds-1)")
    p.add_argument("--models", nargs="+", choices=list(MODELS))
    p.add_argument(
        "--corrupt", nargs="*", metavar="EXPERT:MODE", help=f"Prismer with a bad expert; MODE in {CORRUPTIONS}"
    )
    p.add_argument("--robust_size", type=int, help="training scenes of the robustness runs")
    p.add_argument("--steps", type=int, help="approximate training steps per run (rounded to whole epochs)")
    p.add_argument("--world_resolution", type=int, default=128)
    p.add_argument(
        "--balance",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="an answer-balanced world (--no-balance: the original generator, for the older numbers)",
    )
    p.add_argument(
        "--workers",
        type=int,
        help="runs side by side, one thread each (default: one per thread torch has; 1: one after the other)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    args = p.parse_args(argv)
    args.workers = args.workers or torch.get_num_threads()
    for key, value in DEFAULTS[args.fast].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    corruptions = [c.split(":") for c in args.corrupt]
    for c in corruptions:
        if len(c) != 2 or c[0] not in EXPERTS or c[1] not in CORRUPTIONS:
            p.error(f"--corrupt wants EXPERT:MODE with MODE in {CORRUPTIONS}, got {':'.join(c)!r}")
    owned = [kv for kv in args.set if kv.split("=", 1)[0] in ("max_epoch", "schedule", "eval_every_epochs")]
    if owned:
        p.error(f"--set {owned[0]}: the ablation sets the schedule itself; change --steps instead")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    t0 = time.perf_counter()
    cfg = WorldConfig(
        train_scenes=max(*args.sizes, args.robust_size),
        test_scenes=args.test_scenes,
        resolution=args.world_resolution,
        balance=args.balance,
    )
    name = f"ablation_world_{cfg.train_scenes}_{cfg.test_scenes}_{cfg.resolution}" + ("_balanced" * cfg.balance)
    root = Path(args.root or Path("data") / name)
    world = generate(cfg, root)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    batch = load_config(RECIPES["vqa"], None, args.set).batch_size_train  # also rejects a bad --set now

    jobs = [("data", m, MODELS[m], None, n) for n in args.sizes for m in args.models]
    if corruptions and ("Prismer" not in args.models or args.robust_size not in args.sizes):
        jobs.append(("data", "Prismer", ALL_EXPERTS, None, args.robust_size))  # the clean reference
    jobs += [("robust", f"Prismer, {e} {mode}", ALL_EXPERTS, (e, mode), args.robust_size) for e, mode in corruptions]
    subsets = {n: subset_data(world, cfg, n, out / "data" / f"train{n}") for n in {n for *_, n in jobs}}
    rows = []
    chance = vqa_chance(world / "data", cfg)

    def scored(scores: dict) -> dict:
        return {"accuracy": scores["overall"]} | {TYPE_PREFIX + k: v for k, v in scores["per_type"].items()}

    for n in sorted(subsets):  # the image-blind references each size's models must beat
        for model, scores in (
            (PRIOR, vqa_scores(subsets[n][0], question_prior_answers(subsets[n][0]))),
            (CHANCE, chance),
        ):
            row = {"experiment": "data", "model": model, "experts": "", "train_scenes": n, "seed": 0}
            rows.append(row | {"epochs": 0, "steps": 0} | scored(scores) | {"seconds": 0.0})
    runs = []
    for experiment, model, experts, corruption, n in jobs:
        data, questions = subsets[n]
        epochs = epochs_for(args.steps, questions, batch)
        labels = world / "labels"
        if corruption is not None:
            labels = corrupt_labels(labels, *corruption, out / "labels" / "_".join(corruption))
        point = {"experts": experts, "data_path": str(data), "label_path": str(labels)}
        point |= {"max_epoch": epochs, "schedule": "cosine_step", "eval_every_epochs": 0}
        for seed in range(args.seeds):
            folder = out / "runs" / f"{experiment}_{model}_{n}_{seed}".replace(", ", "_").replace(" ", "_")
            values = point | {"seed": seed, "output_dir": str(folder)}
            runs.append(Run(experiment, model, experts, n, seed, epochs, folder, values))

    def row(r: Run, result: dict) -> dict:
        log.info("%s, %d scenes, seed %d: accuracy %.1f", r.model, r.train_scenes, r.seed, result["eval/accuracy"])
        return (
            {"experiment": r.experiment, "model": r.model, "experts": " ".join(r.experts)}
            | {"train_scenes": r.train_scenes, "seed": r.seed, "epochs": r.epochs, "steps": result["step"]}
            | scored({"overall": result["eval/accuracy"], "per_type": per_type(result)})
            | {"seconds": round(result["seconds"], 1)}
        )

    progress = tqdm(total=len(runs), desc="ablation", unit="run")
    if args.workers > 1:
        log.info(
            "%d runs, %d side by side (one thread each); a run's output: its folder's train.log",
            len(runs),
            args.workers,
        )
        with SideBySide(args.workers, threads=1) as pool:
            futures = {
                pool.submit(partial(train_eval, world, r.values, args.set), r.folder / "train.log"): r for r in runs
            }
            results = {}
            for future in as_completed(futures):
                results[futures[future].folder] = future.result()
                progress.update()
        rows += [row(r, results[r.folder]) for r in runs]
    else:
        for r in runs:
            rows.append(row(r, train_eval(world, r.values, args.set)))
            progress.update()
    progress.close()
    summary = summarise(rows)
    write_results(rows, summary, out)
    png = plot(summary, out / "ablation.png")
    types_png = plot_per_type(summary, out / "ablation_per_type.png")
    print_table(summary)
    print(f"({time.perf_counter() - t0:.0f} s in all; runs in {out / 'runs.csv'}, plots {png}, {types_png})")
    return rows


if __name__ == "__main__":
    main()
