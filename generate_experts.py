"""Expert labels for a folder of images, written where the datasets read them.

    python generate_experts.py --expert edge --data_path data/vqav2 --save_path labels
    accelerate launch generate_experts.py ...   # several GPUs share the images

Every image under `data_path` (recursively) gets `<save_path>/<expert>/<data_path's
folder name>/<relative path>.png` (the official layout, e.g. labels/edge/vqav2/
train2014/x.png for data/vqav2/train2014/x.jpg). Labels already written
are skipped, so an interrupted run picks up where it stopped; each file is
written atomically. A corrupt image is reported, counted and skipped.
Networks implemented so far: edge (DexiNed). Weights: `--weights` (a local
file) or the official file from the hub (`shikunl/prismer`, `expert_weights/`).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from common.files import atomic_write
from common.hub import hub_file
from common.modalities import EXPERTS, label_networks
from dataset.datasets import list_images
from dataset.files import READ_ERRORS, label_file, read_image
from experts import generator_network
from helpers.distributed import PRECISIONS, make_accelerator, stop_with_launcher
from model.convert import OFFICIAL_REPO

log = logging.getLogger("generate_experts")


class Images(torch.utils.data.Dataset):
    """(input tensor, original (W, H), index); a corrupt file yields its error instead."""

    def __init__(self, paths: list[Path], preprocess):
        self.paths, self.preprocess = paths, preprocess  # a function, not the module: workers pickle it

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img = read_image(self.paths[i])
            return self.preprocess(img), img.size, i
        except READ_ERRORS as e:
            return f"{type(e).__name__}: {e}", None, i


def collate(samples: list) -> tuple[torch.Tensor | None, list, list]:
    good = [s for s in samples if s[1] is not None]
    x = torch.stack([s[0] for s in good]) if good else None
    return x, [(s[1], s[2]) for s in good], [(s[0], s[2]) for s in samples if s[1] is None]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--expert", required=True, choices=label_networks())
    p.add_argument("--data_path", required=True, help="folder of images (searched recursively)")
    p.add_argument("--save_path", required=True, help="label root (the datasets' label_path)")
    p.add_argument("--weights", help="local weight file (default: the official one from the hub)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--mixed_precision", default="no", choices=PRECISIONS, help="the official labels used fp16 (GPU)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    stop_with_launcher()

    t0 = time.perf_counter()
    root, save = Path(args.data_path), Path(args.save_path)
    network = generator_network(args.expert)
    paths = list_images(root, "--data_path", exclude=save)  # labels written inside are not images
    out = {q: label_file(save, args.expert, root.name, q.relative_to(root).as_posix()) for q in paths}
    accelerator = make_accelerator(args.mixed_precision)
    # Split the listing, not what is left: processes that check the disk at
    # different moments would otherwise disagree about who does which image.
    share = paths[accelerator.process_index :: accelerator.num_processes]
    mine = [q for q in share if not out[q].is_file()]
    counts = {"already done": len(share) - len(mine), "written": 0, "corrupt (skipped)": 0}
    if mine:
        weights = args.weights or hub_file(
            OFFICIAL_REPO, EXPERTS[args.expert].weights, f"the {args.expert} expert's weights"
        )
        model = network.load(weights).to(accelerator.device)
        loader = torch.utils.data.DataLoader(
            Images(mine, network.preprocess), args.batch_size, num_workers=args.num_workers, collate_fn=collate
        )
        bar = tqdm(loader, desc=args.expert, unit="batch", disable=not accelerator.is_local_main_process)
        for x_B3HW, good, bad in bar:
            for message, i in bad:
                log.warning("%s: unreadable image, skipped (%s)", mine[i], message)
            counts["corrupt (skipped)"] += len(bad)
            if x_B3HW is None:
                continue
            with torch.no_grad(), accelerator.autocast():
                fused_B1HW = model(x_B3HW.to(accelerator.device))[-1]
            for (size, i), fused_1HW in zip(good, fused_B1HW):
                label = network.to_label(fused_1HW, size)
                atomic_write(out[mine[i]], lambda tmp, label=label: label.save(tmp, format="PNG"))
            counts["written"] += len(good)
    summed = accelerator.reduce(torch.tensor(list(counts.values()), device=accelerator.device), "sum").tolist()
    totals = {"images": len(paths), **dict(zip(counts, summed))}
    if accelerator.is_main_process:
        print(f"\n{args.expert} labels under {Path(args.save_path) / args.expert / root.name}")
        for key, value in totals.items():
            print(f"  {key:<18} {value}")
        print(f"  {'seconds':<18} {time.perf_counter() - t0:.1f}")
    return totals


if __name__ == "__main__":
    main()
