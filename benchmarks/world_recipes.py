"""Which VQA recipe learns the synthetic world's images fastest: each named
recipe (the world recipe `configs/world_vqa.yaml` with `key=value` changes)
trains through the engine on one generated world, is evaluated once at the
end, and is reported beside the image-blind question prior and chance,
overall and per question type:

    python benchmarks/world_recipes.py --root data/world \
        --recipe base --recipe "p8 prismer_model.vision.patch_size=8 init_lr=5e-4" ...

`--recipe "NAME key=value ..."`: a dotted key sets one value inside a nested
recipe key (the model size). The table, with each run's minutes, goes to
stdout and to `<output_dir>/recipes.json`.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers.engine import RunOptions, run  # noqa: E402
from helpers.tasks import VQA  # noqa: E402
from sandbox.quickstart import (  # noqa: E402
    RECIPES,
    question_prior_answers,
    vqa_chance,
    vqa_scores,
    world_config,
)
from sandbox.world import WorldConfig  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="a generated world")
    p.add_argument("--recipe", action="append", required=True, metavar="NAME=k=v,k=v")
    p.add_argument("--output_dir", default="outputs/recipes")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    root, out = Path(args.root), Path(args.output_dir)
    data = root / "data"
    recipe = yaml.safe_load(RECIPES["vqa"].read_text())
    cfg = WorldConfig.from_dict(json.loads((root / "world.json").read_text())["config"])
    table = [
        {"recipe": "question prior (no image)", "minutes": 0.0, **vqa_scores(data, question_prior_answers(data))},
        {"recipe": "chance", "minutes": 0.0, **vqa_chance(data, cfg)},
    ]
    for spec in args.recipe:
        name, *overrides = spec.split()
        values = {"output_dir": str(out / name), "eval_every_epochs": 0}
        for item in overrides:
            key, _, raw = item.partition("=")
            *path, leaf = key.split(".")
            if not path:
                values[key] = yaml.safe_load(raw)
                continue
            values.setdefault(path[0], copy.deepcopy(recipe[path[0]]))
            functools.reduce(dict.__getitem__, path[1:], values[path[0]])[leaf] = yaml.safe_load(raw)
        t0 = time.perf_counter()
        run(VQA, world_config("vqa", root, values), RunOptions(exp_name="world"))
        minutes = (time.perf_counter() - t0) / 60
        answers = json.loads((out / name / "vqa_world" / "vqa_submission.json").read_text())
        scores = vqa_scores(data, {r["question_id"]: r["answer"] for r in answers})
        table.append({"recipe": f"{name}: {' '.join(overrides) or '(as configured)'}", "minutes": minutes, **scores})
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipes.json").write_text(json.dumps(table, indent=1))
    kinds = sorted(table[0]["per_type"])
    print(f"\n{'recipe':<60} {'min':>5} {'all':>5} " + " ".join(f"{k:>7}" for k in kinds))
    for row in table:
        cells = " ".join(f"{row['per_type'].get(k, 0):7.1f}" for k in kinds)
        print(f"{row['recipe'][:60]:<60} {row['minutes']:5.1f} {row['overall']:5.1f} {cells}")
    return table


if __name__ == "__main__":
    main()
