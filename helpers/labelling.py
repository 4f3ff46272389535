"""Expert labels for a folder of images: the driver of the label networks
(experts/network.py's protocol) that generate_experts.py and demo.py run.

Every image under the data path (recursively) gets `<save_path>/<expert>/<data
path's folder name>/<relative path>.png` (the official layout) plus the
sidecar files of the expert's label kind. Labels already written are skipped,
so an interrupted run picks up where it stopped; each file is written
atomically. A corrupt image is reported, counted and skipped; so is an image
whose label file another image already claims (`pet.jpg` and `pet.png`), and
one whose input label (detection reads depth) is missing. Processes share one
sorted listing.
"""

from __future__ import annotations

import argparse
import logging
import resource
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from common.hub import hub_file
from common.labels import label_file
from common.modalities import EXPERTS, label_networks
from dataset.datasets import list_images
from dataset.files import READ_ERRORS, read_image
from experts import generator_class, generator_network
from helpers.distributed import make_accelerator
from model.convert import OFFICIAL_REPO

log = logging.getLogger(__name__)

COUNTS = (
    "already done",
    "written",
    "found nothing",
    "corrupt (skipped)",
    "name taken (skipped)",
    "input label missing (skipped)",
)


class Images(torch.utils.data.Dataset):
    """(input tensor, original (W, H), index); a corrupt file yields its error instead."""

    def __init__(self, paths: list[Path], preprocess):
        self.paths, self.preprocess = paths, preprocess  # a bound method: workers pickle it

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img = read_image(self.paths[i])
            return self.preprocess(img), img.size, i
        except READ_ERRORS as e:
            return f"{type(e).__name__}: {e}", None, i


def parse_experts(value: str) -> list[str]:
    """`all` or a comma-separated list of experts that have a label network."""
    known = label_networks()
    names = known if value == "all" else [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown expert(s) {unknown or value!r}; label networks: {', '.join(known)}")
    return names


def parse_network_options(items: list[str]) -> dict[str, dict[str, str]]:
    """`EXPERT.KEY=VALUE` strings to {expert: {key: value}}."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        target, sep, value = item.partition("=")
        expert, dot, key = target.partition(".")
        if not (sep and dot and key) or expert not in label_networks():
            raise ValueError(f"network option {item!r} is not EXPERT.KEY=VALUE with EXPERT one of {label_networks()}")
        out.setdefault(expert, {})[key] = value
    return out


def in_dependency_order(names: list[str]) -> list[str]:
    """`names` with every expert after the experts whose labels it reads."""
    ordered: list[str] = []

    def visit(name: str) -> None:
        if name not in ordered:
            for needed in generator_class(name).uses_labels:
                if needed in names:
                    visit(needed)
            ordered.append(name)

    for name in names:
        visit(name)
    return ordered


def weights_for(expert: str, weights: str | None, several: bool) -> str | Path:
    """`--weights` as the expert's file, the official file name inside a `--weights`
    folder, or the official file from the hub."""
    official = EXPERTS[expert].weights
    if weights is None:
        return hub_file(OFFICIAL_REPO, official, f"the {expert} expert's weights")
    path = Path(weights)
    if path.is_dir() and (path / Path(official).name).is_file():
        return path / Path(official).name
    if several:
        raise FileNotFoundError(f"--weights {weights}: no {Path(official).name} ({expert}) in this folder")
    return weights


def claimed_once(paths: list[Path], out: dict[Path, Path]) -> tuple[list[Path], list[Path]]:
    """Images whose label file no earlier image (in sorted order) maps to, and the rest."""
    owner: dict[Path, Path] = {}
    keep, taken = [], []
    for p in paths:
        if out[p] in owner:
            log.warning("%s: its label %s is %s's; skipped (rename one of them)", p, out[p], owner[out[p]])
            taken.append(p)
        else:
            owner[out[p]] = p
            keep.append(p)
    return keep, taken


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux: the process's peak


@dataclass
class LabelOptions:
    weights: str | None = None  # a weight file (one expert) or a folder of official files; None: the hub
    batch_size: int = 8
    num_workers: int = 2
    mixed_precision: str = "no"
    # Per expert, keyword options of its network (e.g. {"ocr_detection": {"clip": "path/to/clip"}}).
    network_options: dict[str, dict[str, str]] = field(default_factory=dict)


def generate(expert: str, opts: LabelOptions, accelerator, paths: list[Path], root: Path, save: Path, several: bool):
    """One expert's labels for this process's share of `paths`; its counts (not yet summed)."""
    network = generator_network(expert, **opts.network_options.get(expert, {}))
    kind = EXPERTS[expert].kind
    out = {q: label_file(save, expert, root.name, q.relative_to(root).as_posix()) for q in paths}
    paths, taken = claimed_once(paths, out)
    if accelerator.is_main_process:  # left by a killed run; never renamed into place
        for stale in (save / expert / root.name).rglob(".*.tmp"):
            stale.unlink()
    accelerator.wait_for_everyone()
    # Split the listing, not what is left: processes that check the disk at
    # different moments would otherwise disagree about who does which image.
    share = paths[accelerator.process_index :: accelerator.num_processes]
    mine = [q for q in share if not kind.exists(out[q])]
    counts = dict.fromkeys(COUNTS, 0)
    counts["already done"] = len(share) - len(mine)
    # Labels of other experts this one reads (detection: depth), per image.
    inputs = {
        q: {n: label_file(save, n, root.name, q.relative_to(root).as_posix()) for n in network.uses_labels}
        for q in mine
    }
    counts["name taken (skipped)"] = len(taken[accelerator.process_index :: accelerator.num_processes])
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    t0 = time.perf_counter()
    if mine:
        model = network.load(weights_for(expert, opts.weights, several)).to(accelerator.device)
        loader = torch.utils.data.DataLoader(
            Images(mine, network.preprocess), batch_size=None, num_workers=opts.num_workers
        )
        # Inputs wait in a bucket per shape: a batch only ever holds equal shapes,
        # so no image is padded for another and a label never depends on its batch.
        buckets: dict[tuple, list] = defaultdict(list)

        def run(batch: list) -> None:
            x_BCHW = torch.stack([x for x, _, _ in batch]).to(accelerator.device)
            with torch.no_grad(), accelerator.autocast():
                raws = network.predict(model, x_BCHW)
            for (_, size, i), raw in zip(batch, raws):
                label = network.to_label(raw, size, **inputs[mine[i]])
                kind.write(out[mine[i]], label)
                counts["found nothing"] += kind.found_nothing(label)
            counts["written"] += len(batch)
            bar.update(len(batch))

        bar = tqdm(total=len(mine), desc=expert, unit="img", disable=not accelerator.is_local_main_process)
        for x_CHW, size, i in loader:
            if size is None:
                log.warning("%s: unreadable image, skipped (%s)", mine[i], x_CHW)
                counts["corrupt (skipped)"] += 1
                bar.update(1)
                continue
            missing = [n for n, path in inputs[mine[i]].items() if not EXPERTS[n].kind.exists(path)]
            if missing:
                where = inputs[mine[i]][missing[0]]
                log.warning("%s: no %s label at %s, skipped (make it first)", mine[i], missing[0], where)
                counts["input label missing (skipped)"] += 1
                bar.update(1)
                continue
            bucket = buckets[tuple(x_CHW.shape)]
            bucket.append((x_CHW, size, i))
            if len(bucket) == opts.batch_size:
                run(buckets.pop(tuple(x_CHW.shape)))
        for batch in buckets.values():
            run(batch)
        bar.close()
    seconds = time.perf_counter() - t0
    counts["seconds"] = seconds
    counts["peak MiB"] = peak_memory_mb(accelerator.device)
    return counts


def summarise(expert: str, counts: dict, accelerator, images: int) -> dict:
    """Counts summed over processes (seconds and memory: the largest)."""
    device = accelerator.device
    summed = accelerator.reduce(torch.tensor([float(counts[k]) for k in COUNTS], device=device), "sum")
    # accelerate's reduce only sums or averages: gather for the maximum.
    slowest = accelerator.gather(torch.tensor([[counts["seconds"], counts["peak MiB"]]], device=device)).amax(0)
    totals = {"images": images, **{k: int(v) for k, v in zip(COUNTS, summed.tolist())}}
    totals["images/s"] = totals["written"] / slowest[0].item() if slowest[0] > 0 else 0.0
    totals["peak MiB"] = round(slowest[1].item())
    return totals


def make_labels(experts: list[str], data_path: str | Path, save_path: str | Path, opts: LabelOptions) -> dict:
    """Labels of `experts` for every image under `data_path`, in the official layout
    under `save_path`; per expert its counts summed over processes, also printed
    as a table by the main process."""
    root, save = Path(data_path), Path(save_path)
    paths = list_images(root, "--data_path", exclude=save)  # labels written inside are not images
    accelerator = make_accelerator(opts.mixed_precision)
    totals = {}
    for expert in in_dependency_order(experts):
        counts = generate(expert, opts, accelerator, paths, root, save, several=len(experts) > 1)
        totals[expert] = summarise(expert, counts, accelerator, len(paths))
    if accelerator.is_main_process:
        print_table(totals, save)
    return totals


def print_table(totals: dict[str, dict], where: Path) -> None:
    keys = ["images", *COUNTS, "images/s", "peak MiB"]
    width = max(len(k) for k in keys)
    names = list(totals)
    print(f"\nlabels under {where}/<expert>")
    print(f"  {'':<{width}} " + " ".join(f"{n:>14}" for n in names))
    for k in keys:
        cells = [totals[n][k] for n in names]
        print(f"  {k:<{width}} " + " ".join(f"{c:>14.2f}" if isinstance(c, float) else f"{c:>14}" for c in cells))
