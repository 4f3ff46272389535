"""Fetch the official Prismer checkpoints (Hugging Face repo shikunl/prismer).

    python download_checkpoints.py caption_prismer_base vqa_prismerz_large --out checkpoints
    python download_checkpoints.py --all

Each lands as <out>/<name>/pytorch_model.bin, ready for
`PrismerCaption.from_official(name, path=...)` or `--from_checkpoint`.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

from common.hub import DownloadError, hub_file
from model.convert import OFFICIAL_REPO

log = logging.getLogger("download_checkpoints")
NAMES = [
    f"{task}_{variant}_{size}"
    for task in ("pretrain", "caption", "vqa")
    for variant in ("prismer", "prismerz")
    for size in ("base", "large")
]


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help=f"checkpoints to fetch: {', '.join(NAMES)}")
    p.add_argument("--all", action="store_true", help="fetch all 12 checkpoints")
    p.add_argument("--out", default="checkpoints", help="destination folder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = NAMES if args.all else args.names
    unknown = [n for n in names if n not in NAMES]
    if unknown or not names:
        p.error(
            f"unknown checkpoint name(s) {unknown}; choose from {', '.join(NAMES)}"
            if unknown
            else "name at least one checkpoint, or --all"
        )
    done = []
    for name in names:
        target = Path(args.out) / name / "pytorch_model.bin"
        if target.exists():
            log.info("%s: already at %s", name, target)
            done.append(target)
            continue
        src = hub_file(OFFICIAL_REPO, f"{name}/pytorch_model.bin", f"the official {name} checkpoint")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, target)
        log.info("%s: %s", name, target)
        done.append(target)
    return done


if __name__ == "__main__":
    try:
        main()
    except DownloadError as e:
        sys.exit(str(e))
