"""Train or evaluate Prismer: vqa (`accelerate launch train_vqa.py --config configs/vqa.yaml ...`)."""

from __future__ import annotations

from helpers.engine import cli, run
from helpers.tasks import VQA


def main(argv: list[str] | None = None) -> dict:
    return run(VQA, argv, description=__doc__, default_config="configs/vqa.yaml", default_section=None)


if __name__ == "__main__":
    cli(main)
