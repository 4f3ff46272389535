"""Does bf16 keep the world recipe's quality, and what does it cost here?

Trains the world caption recipe (configs/world_caption.yaml, through the
engine's `run`, as the quickstart does) from the same seed for `--steps`
steps in float32 and in bf16 autocast, on a small generated world, and prints
both loss curves side by side with seconds per step; `--plot FILE` draws them.

    python benchmarks/precision.py [--steps 100] [--plot precision.png]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers.distributed import hardware  # noqa: E402
from helpers.engine import RunOptions, run  # noqa: E402
from helpers.tasks import CAPTION  # noqa: E402
from sandbox.quickstart import WORLD, world_config  # noqa: E402
from sandbox.world import generate  # noqa: E402


def losses(run_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((run_dir / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


def train(root: Path, out: Path, precision: str, steps: int) -> None:
    values = {
        "output_dir": str(out),
        "max_train_steps": steps,
        "log_every_steps": 5,
        "tracker": "tensorboard",
        "mixed_precision": precision,
        "num_workers": 0,
    }
    run(CAPTION, world_config("caption", root, values), RunOptions(exp_name=precision))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--plot", help="write the two loss curves to this PNG")
    p.add_argument("--child", nargs=3, metavar=("PRECISION", "WORLD", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.child:  # accelerate's precision is fixed once per process: one process per precision
        precision, root, out = args.child
        train(Path(root), Path(out), precision, args.steps)
        return {}
    curves, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        root = generate(dataclasses.replace(WORLD, train_scenes=300, test_scenes=10), Path(tmp) / "world")
        for precision in ("no", "bf16"):
            t0 = time.perf_counter()
            cmd = [sys.executable, __file__, "--steps", str(args.steps), "--child", precision, str(root), tmp]
            subprocess.run(cmd, check=True, cwd=ROOT)
            seconds[precision] = (time.perf_counter() - t0) / args.steps
            curves[precision] = losses(Path(tmp) / f"caption_{precision}")
    print(f"\nworld caption recipe, {args.steps} steps from one seed, on {hardware().description}")
    print(f"{'step':>5} {'float32':>9} {'bf16':>9}")
    for step in sorted(curves["no"]):
        print(f"{step:>5} {curves['no'][step]:>9.3f} {curves['bf16'].get(step, float('nan')):>9.3f}")
    print(f"{'s/step':>5} {seconds['no']:>9.2f} {seconds['bf16']:>9.2f}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for precision, label in (("no", "float32"), ("bf16", "bf16 autocast")):
            steps = sorted(curves[precision])
            ax.plot(steps, [curves[precision][s] for s in steps], label=f"{label} ({seconds[precision]:.2f} s/step)")
        ax.set(xlabel="step", ylabel="training loss", title="world caption recipe: float32 vs bf16")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
    return {"curves": curves, "seconds_per_step": seconds}


if __name__ == "__main__":
    main()
