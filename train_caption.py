"""Train or evaluate Prismer: caption (`accelerate launch train_caption.py --config configs/caption.yaml ...`)."""

from __future__ import annotations

from helpers.engine import cli, run
from helpers.tasks import CAPTION


def main(argv: list[str] | None = None) -> dict:
    return run(CAPTION, argv, description=__doc__, default_config="configs/caption.yaml", default_section="coco")


if __name__ == "__main__":
    cli(main)
