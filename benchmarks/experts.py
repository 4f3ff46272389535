"""Expert label networks: images/s and peak memory per expert at the official
input size, in float32, and how far bf16 / fp16 autocast labels move from the
float32 ones (`--precisions no,bf16,fp16`; timing them is worth it only on a CPU
with AMX or AVX-512-BF16, `--images 0` measures the drift alone), on this machine's CPU.

    python benchmarks/experts.py [--experts depth,normal] [--images 3] [--precisions no,bf16,fp16] [--weights DIR]

Weights are synthesised from the official layouts (tests/fixtures/experts) and
written in the official formats, or taken from `--weights DIR` (the official
files), then loaded the way generate_experts.py loads them; the images are
640x480 photos-like arrays (COCO's common size). Each
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
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def peak_mib() -> float:
    """VmHWM of /proc/self/status: the peak resident memory since the last reset."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def arrays(raw) -> list[np.ndarray]:
    """The float arrays of a network's raw output (a tensor, or a dataclass / dict / list of them)."""
    if dataclasses.is_dataclass(raw):
        raw = [getattr(raw, f.name) for f in dataclasses.fields(raw)]
    if isinstance(raw, dict):
        raw = list(raw.values())
    if isinstance(raw, list | tuple):
        return [a for r in raw for a in arrays(r)]
    if isinstance(raw, torch.Tensor):
        raw = raw.detach().float().cpu().numpy()
    return [raw.astype(np.float64)] if isinstance(raw, np.ndarray) and raw.dtype.kind == "f" else []


def relative_change(raw, reference) -> str:
    """||raw - reference|| / ||reference|| over the output arrays of equal shape; how many
    differ in shape (a detector keeping another number of boxes) is said beside it."""
    pairs = list(zip(arrays(raw), arrays(reference)))
    same = [(a, b) for a, b in pairs if a.shape == b.shape]
    if not same:
        return "no array of equal shape"
    error = sum(np.square(a - b).sum() for a, b in same) ** 0.5 / sum(np.square(b).sum() for _, b in same) ** 0.5
    return f"{error:.2%}" + (f" ({len(pairs) - len(same)} of {len(pairs)} reshaped)" if len(same) < len(pairs) else "")


def measure(expert: str, precision: str, images: int, weights: Path) -> dict:
    """Runs in a child process: one expert, one precision, its weights already on disk."""
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
        return raw, network.to_label(raw, image.size, **inputs)

    raw, label = one(precision)  # also the warm-up
    start = time.perf_counter()
    for _ in range(images):
        one(precision)
    seconds = time.perf_counter() - start
    peak = peak_mib()
    # How far the label moves from the float32 one: grey levels for dense maps, pixels for id maps;
    # and the network's own outputs (an id map of synthetic weights can be one class everywhere).
    change = output_change = ""
    if precision != "no":
        raw_float, label_float = one("no")
        a = np.asarray(label.ids if hasattr(label, "ids") else label, dtype=np.float32)
        b = np.asarray(label_float.ids if hasattr(label_float, "ids") else label_float, dtype=np.float32)
        painted = network.expert.kind.painted
        change = f"{(a != b).mean():.2%} px" if painted else f"{np.abs(a - b).mean():.2f} levels"
        output_change = relative_change(raw, raw_float)
    shape = tuple(network.preprocess(image).shape[1:])
    return {
        "expert": expert,
        "precision": precision,
        "input": f"{shape[1]}x{shape[0]}",
        "images/s": images / seconds if images else float("nan"),  # --images 0: the drift alone
        "peak MiB": peak,
        "vs float32": change,
        "outputs vs float32": output_change,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    from common.modalities import EXPERTS, label_networks

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", default=",".join(label_networks()))
    # bf16 / fp16 run fast only where the CPU computes them (AMX / AVX-512-BF16); on AVX2 many times slower.
    p.add_argument("--precisions", default="no", help="comma-separated: no (float32), bf16, fp16")
    p.add_argument("--images", type=int, default=3)
    p.add_argument(
        "--weights",
        type=Path,
        help="a folder of the official weight files by their official names (download_checkpoints.py --experts) "
        "instead of synthetic ones",
    )
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
            if args.weights:
                weights = args.weights / Path(EXPERTS[expert].weights).name
                if not weights.is_file():
                    raise FileNotFoundError(f"{weights}: no official {expert} weights there")
            else:  # written here, so the child's peak is the network's alone
                weights = write_official(expert, Path(tmp))
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
    source = f"weights from {args.weights}" if args.weights else "synthetic weights"
    print(f"\nexpert label networks, {torch.get_num_threads()} CPU threads, {source}, 640x480 images")
    print(
        f"{'expert':<14} {'precision':<9} {'input':>9} {'images/s':>9} {'peak MiB':>9} {'vs float32':>12} "
        f"{'outputs vs float32':>20}"
    )
    for r in rows:
        print(
            f"{r['expert']:<14} {r['precision']:<9} {r['input']:>9} {r['images/s']:>9.3f} {r['peak MiB']:>9.0f} "
            f"{r['vs float32']:>12} {r['outputs vs float32']:>20}"
        )
    return rows


if __name__ == "__main__":
    main()
