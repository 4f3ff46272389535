"""Expert label networks: images/s and peak memory per expert at the official
input size, in float32, and how far bf16 / fp16 autocast labels move from the
float32 ones (`--precisions no,bf16,fp16`; timing them is worth it only on a CPU
with AMX or AVX-512-BF16, `--images 0` measures the drift alone), on this machine's CPU.

    python benchmarks/experts.py [--experts depth,normal] [--images 3] [--precisions no,bf16,fp16]

Weights are synthesised from the official layouts (tests/fixtures/experts) and
written in the official formats, then loaded the way generate_experts.py loads
them; the images are 640x480 photos-like arrays (COCO's common size). Each
expert runs in its own process, so its peak resident memory (VmHWM, reset at
its start) is its own: the loaded network plus one image's forward pass and
label. Timing covers
preprocess, predict and to_label of `--images` images one at a time after one
warm-up image. `vs float32`: how far a bf16 / fp16 label moves from the float32 one
(mean absolute grey levels for dense maps, share of changed pixels for id
maps) — with synthetic weights, so only a rough guide to real labels.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def peak_mib() -> float:
    """VmHWM of /proc/self/status: the peak resident memory since the last reset."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def measure(expert: str, precision: str, images: int, weights: Path) -> dict:
    """Runs in a child process: one expert, one precision, its weights already on disk."""
    import numpy as np
    import torch
    from PIL import Image

    from experts import generator_network

    # The peak resident memory is this process's from here on: a child's ru_maxrss starts
    # at its parent's resident size when forked, so reset the kernel's high-water mark.
    Path("/proc/self/clear_refs").write_text("5")
    from tests.expert_files import write_tiny_clip

    options = {}
    if expert == "ocr_detection":  # its word encoder, CLIP ViT-L/14 text, cannot be downloaded here: a tiny stand-in
        write_tiny_clip(weights.parent / "clip")
        options["clip"] = str(weights.parent / "clip")
    network = generator_network(expert, **options)
    model = network.load(weights)
    # Emulated bf16 / fp16 convolutions run ~8x faster channels-last on an AVX2 CPU (1.2 -> 10 GFLOP/s):
    # the drift is measured that way, its float32 reference too; float32 is timed as generate_experts runs.
    layout = torch.channels_last if precision != "no" else torch.contiguous_format
    model = model.to(memory_format=layout)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640]
    photo = np.stack([xx * 255 // 640, yy * 255 // 480, (xx + yy) % 256], -1) + rng.integers(0, 40, (480, 640, 3))
    image = Image.fromarray(photo.clip(0, 255).astype(np.uint8))

    # Labels of other experts the network reads (detection: depth), as smooth maps.
    inputs = {}
    for needed in network.uses_labels:
        inputs[needed] = weights.parent / f"{needed}.png"
        Image.fromarray((yy * 255 // 480).astype(np.uint8)).save(inputs[needed])

    def one(precision: str):
        x = network.preprocess(image)[None].contiguous(memory_format=layout)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            (raw,) = network.predict(model, x)
        return network.to_label(raw, image.size, **inputs)

    label = one(precision)  # also the warm-up
    start = time.perf_counter()
    for _ in range(images):
        one(precision)
    seconds = time.perf_counter() - start
    peak = peak_mib()
    # How far the label moves from the float32 one: grey levels for dense maps, pixels for id maps.
    change = ""
    if precision != "no":
        a = np.asarray(label.ids if hasattr(label, "ids") else label, dtype=np.float32)
        b = one("no")
        b = np.asarray(b.ids if hasattr(b, "ids") else b, dtype=np.float32)
        painted = network.expert.kind.painted
        change = f"{(a != b).mean():.2%} px" if painted else f"{np.abs(a - b).mean():.2f} levels"
    shape = tuple(network.preprocess(image).shape[1:])
    return {
        "expert": expert,
        "precision": precision,
        "input": f"{shape[1]}x{shape[0]}",
        "images/s": images / seconds if images else float("nan"),  # --images 0: the drift alone
        "peak MiB": peak,
        "vs float32": change,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    from common.modalities import label_networks

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", default=",".join(label_networks()))
    # bf16 / fp16 run fast only where the CPU computes them (AMX / AVX-512-BF16); on AVX2 many times slower.
    p.add_argument("--precisions", default="no", help="comma-separated: no (float32), bf16, fp16")
    p.add_argument("--images", type=int, default=3)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:  # expert,precision,weight file
        expert, precision, weights = args.child.split(",", 2)
        print(json.dumps(measure(expert, precision, args.images, Path(weights))))
        return []
    from tests.expert_files import write_official

    rows = []
    for expert in args.experts.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            weights = write_official(expert, Path(tmp))  # here, so the child's peak is the network's alone
            for precision in args.precisions.split(","):
                cmd = [
                    sys.executable,
                    __file__,
                    "--images",
                    str(args.images),
                    "--child",
                    f"{expert},{precision},{weights}",
                ]
                done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if done.returncode != 0:
                    raise RuntimeError(f"{expert} {precision} failed:\n{done.stderr[-3000:]}")
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), file=sys.stderr)
    import torch

    print(f"\nexpert label networks, {torch.get_num_threads()} CPU threads, synthetic weights, 640x480 images")
    print(f"{'expert':<14} {'precision':<9} {'input':>9} {'images/s':>9} {'peak MiB':>9} {'vs float32':>12}")
    for r in rows:
        print(
            f"{r['expert']:<14} {r['precision']:<9} {r['input']:>9} {r['images/s']:>9.3f} {r['peak MiB']:>9.0f} "
            f"{r['vs float32']:>12}"
        )
    return rows


if __name__ == "__main__":
    main()
