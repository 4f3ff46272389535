"""Train or evaluate Prismer: pretrain (`accelerate launch train_pretrain.py --config configs/pretrain.yaml ...`)."""

from __future__ import annotations

from helpers.engine import cli, from_argv, run
from helpers.tasks import PRETRAIN


def main(argv: list[str] | None = None) -> dict:
    cfg, options = from_argv(argv, __doc__, default_config="configs/pretrain.yaml", default_section=None)
    return run(PRETRAIN, cfg, options)


if __name__ == "__main__":
    cli(main)
