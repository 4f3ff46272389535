"""Per-core throughput of the training input pipeline at 480 px.

Builds a small COCO-like dataset in a temp folder (640x480 JPEGs, labels of
all six Prismer experts at the same size), then times, in one process with
one torch thread, reading + train transform (+ painting) per sample:

    python benchmarks/data.py [--samples 60]

Where to paint (the decision recorded in dataset/sample.py), measured on
this project's 2-core CPU machine (one core per row, batch of 16):

    model                 painting        samples/s/core  MB/sample  collate 16 (ms)
    PrismerZ              nothing to paint          67.4       2.76               66
    Prismer (6 experts)   worker paints             26.4      42.70             1488
    Prismer (6 experts)   ship uint8 ids            33.8       4.12               66

Painting in the worker costs ~25% of its throughput, makes each sample 10x
larger (three 12.8 MB float maps instead of uint8 ids + a 64 KB table) and
the collate into shared memory then costs ~93 ms per sample instead of ~4,
before pinning and the host-to-device copy of those bytes. On a GPU the
gather writes the same bytes at HBM speed: ~1.2 GB for a batch of 32 with
three painted experts, about a millisecond at 2 TB/s (an estimate; no GPU
was at hand to time it). So workers ship ids and `paint` runs on
the device (create_loader(..., device=...)); without a device (CPU-only use)
it runs in the workers.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.labels import Instances, Words, label_file  # noqa: E402
from common.modalities import EXPERTS, PRISMER_EXPERTS  # noqa: E402
from dataset import create_dataset, paint  # noqa: E402


def build(root: Path, n: int) -> dict:
    """n images of 640x480 with smooth content plus noise (JPEG ~ photo size),
    and a label of every Prismer expert for each."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640]
    entries = []
    for i in range(n):
        base = (np.sin(xx / (20 + i)) * 60 + np.cos(yy / 15) * 60 + 128)[..., None] + rng.normal(0, 12, (480, 640, 3))
        name = f"train2014/{i:06d}.jpg"
        path = root / "data" / "vqav2" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        entries.append({"image": name, "caption": "a benchmark image with some words in its caption"})
        blocks = (yy // 60 * 11 + xx // 80).astype(np.uint8)
        labels = {
            "depth": Image.fromarray((yy * 255 // 480).astype(np.uint8)),
            "edge": Image.fromarray((yy * 255 // 480).astype(np.uint8)),
            "normal": Image.fromarray(np.stack([(xx % 256), (yy % 256), np.full_like(xx, 128)], -1).astype(np.uint8)),
            "seg_coco": (blocks % 133).astype(np.uint8),
            "obj_detection": Instances(
                np.where(blocks % 5 == 0, blocks % 20, 255).astype(np.uint8), {k: k * 7 for k in range(20)}
            ),
            "ocr_detection": Words(
                np.where(blocks % 9 == 0, blocks % 4, 255).astype(np.uint8),
                {k: {"text": f"w{k}", "features": torch.randn(64)} for k in range(4)},
            ),
        }
        for expert in PRISMER_EXPERTS:
            EXPERTS[expert].kind.write(label_file(root / "labels", expert, "vqav2", name), labels[expert])
    (root / "data" / "coco_karpathy_train.json").write_text(json.dumps(entries))
    (root / "data" / "coco_karpathy_test.json").write_text(json.dumps(entries[:1]))
    return {
        "dataset": "coco",
        "data_path": str(root / "data"),
        "label_path": str(root / "labels"),
        "image_resolution": 480,
    }


def nbytes(x) -> int:
    if isinstance(x, dict):
        return sum(nbytes(v) for v in x.values())
    return x.numel() * x.element_size()


def measure(dataset, samples: int, painted: bool, batch: int) -> tuple[float, float, float]:
    """(samples/s, MB shipped per sample, ms to collate a batch into shared
    memory as a DataLoader worker does)."""
    dataset[0]
    shipped, kept, start = 0, [], time.perf_counter()
    for i in range(samples):
        dataset.set_epoch(i // len(dataset))
        experts, _ = dataset[i % len(dataset)]
        if painted:
            experts = paint(dataset.collate([(experts, "")])[0])
        shipped += nbytes(experts)
        if len(kept) < batch:
            kept.append((experts, ""))
    rate = samples / (time.perf_counter() - start)
    start = time.perf_counter()
    collated = dataset.collate(kept)[0]
    for x in (v for e in collated.values() for v in (e.values() if isinstance(e, dict) else [e])):
        x.share_memory_()
    return rate, shipped / samples / 1e6, (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--batch", type=int, default=16, help="samples per collated batch")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        config = build(Path(tmp), args.images)
        rows = []
        for model, experts in (("PrismerZ", ["none"]), ("Prismer (6 experts)", list(PRISMER_EXPERTS))):
            train, _ = create_dataset("caption", {**config, "experts": experts})
            if experts == ["none"]:
                modes = [("nothing to paint", False)]
            else:
                modes = [("worker paints", True), ("ship uint8 ids", False)]
            for mode, painted in modes:
                rows.append((model, mode, *measure(train, args.samples, painted, args.batch)))
    print(f"{'model':<22}{'painting':<18}{'samples/s/core':>16}{'MB/sample':>12}{f'collate {args.batch} (ms)':>18}")
    for model, mode, rate, mb, ms in rows:
        print(f"{model:<22}{mode:<18}{rate:>16.1f}{mb:>12.2f}{ms:>18.0f}")


if __name__ == "__main__":
    main()
