"""Fetch every file the official Prismer pipeline needs, each to where this project reads it.

    python download_checkpoints.py --list                   # every item: size, destination, present or not
    python download_checkpoints.py caption_prismer_base     # one checkpoint (same as --checkpoints NAME)
    python download_checkpoints.py --checkpoints vqa_prismer_base vqa_prismer_large --experts depth edge
    python download_checkpoints.py --experts --answer_list --tokenizers
    python download_checkpoints.py --all

Groups: the 12 official checkpoints (hub repo shikunl/prismer, to
<out>/<name>/pytorch_model.bin), the 7 official expert weight files (its
folder expert_weights/, to <experts_dir>/<file>), the VQA answer list (to
<vqa_data>/answer_list.json), the RoBERTa tokenizers, the CLIP ViT-L/14 text
encoder the OCR expert embeds words with, and the CLIP and RoBERTa backbones
pre-training starts from (these three into the Hugging Face cache, where the
model finds them by hub id). The label spaces and the CLIP PCA ship in
common/label_spaces/.

Hub files go through the Hugging Face cache (downloaded there atomically by
huggingface_hub) and are hard-linked (else copied) to their destination under
a temporary name, then renamed; the answer list is checked (a JSON list of
the 3,128 official answers) before it is renamed into place. A file already
at its destination is skipped, so a stopped run resumes. Offline, nothing is
fetched: the script stops at once naming every missing file and where it goes.

Deliberately free of torch, so that it starts in a moment.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url

from common.hub import OFFICIAL_REPO, DownloadError, hub_first_file, reachable

log = logging.getLogger("download_checkpoints")

CHECKPOINTS = [
    f"{task}_{variant}_{size}"
    for task in ("pretrain", "caption", "vqa")
    for variant in ("prismer", "prismerz")
    for size in ("base", "large")
]
# Expert -> its official weight file in OFFICIAL_REPO/expert_weights (the names of
# common/modalities.py `weights`, and those of the experts not generated here yet).
EXPERT_FILES = {
    "depth": "dpt_hybrid-midas-501f0c75.pt",
    "normal": "scannet.pt",
    "seg_coco": "model_final_f07440.pkl",
    "seg_ade": "model_final_e0c58e.pkl",
    "obj_detection": "Unified_learned_OCIM_RS200_6x+2x.pth",
    "ocr_detection": "icdar2015_hourglass88.pth",
    "edge": "10_model.pth",
}
# The official project hosts answer_list.json in its VQAv2 Dropbox folder (NVlabs/prismer
# issue 19), a folder link with no per-file address; its maintainer says the list is
# BLIP's, which BLIP's code downloads from this address.
ANSWER_LIST_URL = "https://storage.googleapis.com/sfr-vision-language-research/datasets/answer_list.json"
ANSWER_COUNT = 3128
WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # alternatives, in the order the model looks for them
# The sizes' pretrained sources (model/sizes.yaml `clip`, `roberta_name`) for base and large.
ROBERTA = ("FacebookAI/roberta-base", "FacebookAI/roberta-large")
CLIP_VISION = ("openai/clip-vit-base-patch16", "openai/clip-vit-large-patch14-336")
# The HF conversion of the ViT-L/14 that the official OCR labels were embedded with (OpenAI's clip package).
CLIP_TEXT = "openai/clip-vit-large-patch14"
SHIPPED = Path(__file__).resolve().parent / "common" / "label_spaces" / "label_features.safetensors"
ROW = "{:<12} {:<50} {:>9}  {:<7}  {}"


@dataclass(frozen=True)
class Item:
    group: str
    name: str
    source: str  # a hub repo id, or a URL
    files: tuple[str, ...] = ()  # hub files, alternatives in order of preference; empty for a URL
    dest: Path | None = None  # None: the Hugging Face cache

    @property
    def is_hub(self) -> bool:
        return bool(self.files)

    def where(self) -> str:
        return str(self.dest) if self.dest else f"Hugging Face cache ({constants.HF_HUB_CACHE})"

    def what(self) -> str:
        return f"{self.source} {' or '.join(self.files)}" if self.is_hub else self.source

    @property
    def host(self) -> str:
        return urlparse(constants.ENDPOINT if self.is_hub else self.source).netloc


def items(args) -> list[Item]:
    """Every item of the chosen groups (all of them for --all)."""
    out = []
    checkpoints = CHECKPOINTS if args.all or args.checkpoints == [] else args.names + (args.checkpoints or [])
    for name in dict.fromkeys(checkpoints):
        file = f"{name}/pytorch_model.bin"
        out.append(Item("checkpoints", name, OFFICIAL_REPO, (file,), args.out / file))
    for expert in EXPERT_FILES if args.all or args.experts == [] else dict.fromkeys(args.experts or []):
        file = EXPERT_FILES[expert]
        out.append(Item("experts", expert, OFFICIAL_REPO, (f"expert_weights/{file}",), args.experts_dir / file))
    if args.all or args.answer_list:
        dest = args.vqa_data / "answer_list.json"
        out.append(Item("answer_list", "vqav2_answer_list", args.answer_list_url, dest=dest))
    hub_files = []  # (group, repo, what, alternatives)
    if args.all or args.tokenizers:
        hub_files += [
            ("tokenizers", r, f, (f,)) for r in ROBERTA for f in ("vocab.json", "merges.txt", "tokenizer.json")
        ]
    if args.all or args.clip_text:
        hub_files += [("clip_text", CLIP_TEXT, f, (f,)) for f in ("config.json", "vocab.json", "merges.txt")]
        hub_files.append(("clip_text", CLIP_TEXT, "weights", WEIGHTS))
    if args.all or args.backbones:
        hub_files += [("backbones", repo, "weights", WEIGHTS) for repo in CLIP_VISION + ROBERTA]
    out += [Item(group, f"{repo} {what}", repo, files) for group, repo, what, files in hub_files]
    return out


def cached(item: Item) -> Path | None:
    """The item's file in the Hugging Face cache, if there."""
    for file in item.files:
        try:
            return Path(hf_hub_download(item.source, file, local_files_only=True))
        except Exception:  # not cached
            continue
    return None


def present(item: Item) -> Path | None:
    if item.dest is not None:
        return item.dest if item.dest.is_file() else None
    return cached(item)


def offline_reasons(selected: list[Item]) -> dict[str, str | None]:
    """Host -> why it cannot be reached now (None: it can), one probe per host."""
    out = {}
    for item in selected:
        if item.host not in out:
            hub_off = item.is_hub and constants.HF_HUB_OFFLINE
            out[item.host] = (
                "HF_HUB_OFFLINE is set" if hub_off else reachable(constants.ENDPOINT if item.is_hub else item.source)
            )
    return out


def size_of(item: Item, online: bool) -> int | None:
    """Bytes: on disk when present, else the hub's metadata (a HEAD request) when online, else None."""
    path = present(item)
    if path is not None:
        return path.stat().st_size
    if not online:
        return None
    if not item.is_hub:
        try:
            with urllib.request.urlopen(urllib.request.Request(item.source, method="HEAD"), timeout=10) as response:
                length = response.headers.get("Content-Length")
        except OSError:  # URLError, HTTPError, timeouts: size unknown
            return None
        return int(length) if length else None
    for file in item.files:
        try:
            return get_hf_file_metadata(hf_hub_url(item.source, file)).size
        except Exception:  # try the alternative
            continue
    return None


def human(size: int | None) -> str:
    if size is None:
        return "unknown"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def show(selected: list[Item]) -> None:
    """One line per item: group, name, size, present or missing, destination."""
    offline = offline_reasons(selected)
    print("sizes: of the file on disk when present, else from the hub's metadata (online), else unknown")
    for item in selected:
        size = human(size_of(item, offline[item.host] is None))
        print(ROW.format(item.group, item.name, size, "present" if present(item) else "missing", item.where()))
    size = human(SHIPPED.stat().st_size) if SHIPPED.is_file() else "unknown"
    print(ROW.format("shipped", "label spaces (coco, ade, detection) + CLIP PCA", size, "in repo", SHIPPED))


def install(dest: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` a temporary file beside `dest`, then rename it into place:
    `dest` exists only whole; a failed write leaves nothing behind."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob(f".{dest.name}.*.part"):  # left by a killed run
        stale.unlink()
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, dest)
    except BaseException:
        os.unlink(tmp)
        raise


def link_or_copy(src: Path, tmp: Path) -> None:
    """A hard link to the cached blob (no second copy of a multi-GB file), else a copy."""
    tmp.unlink()
    try:
        os.link(src.resolve(), tmp)
    except OSError:
        shutil.copyfile(src, tmp)


def check_answer_list(path: Path) -> None:
    try:
        answers = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not JSON ({e})") from e
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise ValueError("not a JSON list of answers")
    if len(answers) != ANSWER_COUNT:
        raise ValueError(f"{len(answers)} answers, expected the official {ANSWER_COUNT}")


def fetch(item: Item) -> Path:
    if item.is_hub:
        src = hub_first_file(item.source, list(item.files), f"{item.group} {item.name}")
        if item.dest is None:
            return src
        install(item.dest, lambda tmp: link_or_copy(src, tmp))
        return item.dest

    def download(tmp: Path) -> None:
        with urllib.request.urlopen(item.source, timeout=60) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)
        check_answer_list(tmp)

    try:
        install(item.dest, download)
    except (OSError, ValueError) as e:
        raise DownloadError(f"{item.name} from {item.source}: {e}") from e
    return item.dest


def parse(argv):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("names", nargs="*", help="checkpoints to fetch (as --checkpoints NAME ...)")
    p.add_argument(
        "--checkpoints",
        nargs="*",
        metavar="NAME",
        help=f"official checkpoints, none named: all 12 ({', '.join(CHECKPOINTS)})",
    )
    p.add_argument(
        "--experts",
        nargs="*",
        metavar="EXPERT",
        help=f"official expert weights, none named: all 7 ({', '.join(EXPERT_FILES)})",
    )
    p.add_argument("--answer_list", action="store_true", help="the VQAv2 answer list (3,128 answers)")
    p.add_argument("--tokenizers", action="store_true", help=f"RoBERTa tokenizer files ({', '.join(ROBERTA)})")
    p.add_argument(
        "--clip_text", action="store_true", help=f"the OCR expert's CLIP text encoder and tokenizer ({CLIP_TEXT})"
    )
    p.add_argument("--backbones", action="store_true", help="CLIP and RoBERTa weights pre-training starts from")
    p.add_argument("--all", action="store_true", help="every group")
    p.add_argument(
        "--list",
        action="store_true",
        help="show the chosen items (all when none chosen): size, destination; fetch nothing",
    )
    p.add_argument("--out", type=Path, default=Path("checkpoints"), help="checkpoint folder")
    p.add_argument("--experts_dir", type=Path, default=Path("expert_weights"), help="for generate_experts.py --weights")
    p.add_argument("--vqa_data", type=Path, default=Path("data/dataset_vqa"), help="the VQA data_path")
    p.add_argument("--answer_list_url", default=ANSWER_LIST_URL)
    args = p.parse_args(argv)
    bad = [n for n in args.names + (args.checkpoints or []) if n not in CHECKPOINTS]
    bad += [e for e in args.experts or [] if e not in EXPERT_FILES]
    if bad:
        p.error(f"unknown name(s) {bad}; checkpoints: {', '.join(CHECKPOINTS)}; experts: {', '.join(EXPERT_FILES)}")
    chosen = args.names or args.checkpoints is not None or args.experts is not None
    chosen = chosen or args.all or args.answer_list or args.tokenizers or args.clip_text or args.backbones
    if not chosen and not args.list:
        p.error("name a checkpoint or a group (--checkpoints, --experts, ...), or --all, or --list")
    if not chosen:
        args.all = True
    return args


def main(argv: list[str] | None = None) -> list[Path]:
    """The destination of every chosen item, each fetched unless present."""
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    selected = items(args)
    if args.list:
        show(selected)
        return []
    # Missing: neither at its destination nor in the cache (a cached hub file is linked offline too).
    missing = [item for item in selected if present(item) is None and not (item.is_hub and cached(item))]
    reasons = offline_reasons(missing)
    unreachable = [item for item in missing if reasons[item.host]]
    if unreachable:
        lines = [f"{item.what()} -> {item.where()}" for item in unreachable]
        why = "; ".join(dict.fromkeys(r for r in reasons.values() if r))
        raise DownloadError(
            f"offline ({why}): nothing fetched. Fetch these {len(lines)} files on a machine with network access "
            "(this command there), then put each where shown (for the Hugging Face cache: copy that machine's cache "
            "folder, or point HF_HOME at a copy):\n" + "\n".join(lines)
        )
    done = []
    for item in selected:
        path = present(item)
        if path is not None:
            log.info("%s %s: already at %s", item.group, item.name, path)
        else:
            path = fetch(item)
            log.info("%s %s: %s", item.group, item.name, path)
        done.append(path)
    return done


if __name__ == "__main__":
    try:
        main()
    except DownloadError as e:
        sys.exit(str(e))
