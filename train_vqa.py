"""Train or evaluate Prismer: vqa (`accelerate launch train_vqa.py --config configs/vqa.yaml ...`)."""

from __future__ import annotations

from helpers.engine import cli, from_argv, run
from helpers.tasks import VQA


def main(argv: list[str] | None = None) -> dict:
    cfg, options = from_argv(argv, __doc__, default_config="configs/vqa.yaml", default_section=None)
    return run(VQA, cfg, options)


if __name__ == "__main__":
    cli(main)
