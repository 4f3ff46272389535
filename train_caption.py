"""Train or evaluate Prismer: caption (`accelerate launch train_caption.py --config configs/caption.yaml ...`)."""

from __future__ import annotations

from helpers.engine import cli, from_argv, run
from helpers.tasks import CAPTION


def main(argv: list[str] | None = None) -> dict:
    cfg, options = from_argv(argv, __doc__, default_config="configs/caption.yaml", default_section="coco")
    return run(CAPTION, cfg, options)


if __name__ == "__main__":
    cli(main)
