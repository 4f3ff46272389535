"""Expert labels for a folder of images, written where the datasets read them.

    python generate_experts.py --expert edge --data_path data/vqav2 --save_path labels
    python generate_experts.py --expert all --data_path data/vqav2 --save_path labels --weights expert_weights
    accelerate launch generate_experts.py ...   # several GPUs share the images

Every image under `data_path` (recursively) gets `<save_path>/<expert>/<data_path's
folder name>/<relative path>.png` (the official layout, e.g. labels/edge/vqav2/
train2014/x.png for data/vqav2/train2014/x.jpg), plus the sidecar files of the
expert's label kind. Labels already written are skipped, so an interrupted run
picks up where it stopped; each file is written atomically. A corrupt image is
reported, counted and skipped; so is an image whose label file another image
already claims (`pet.jpg` and `pet.png`). Weights: `--weights` (the weight
file of a single expert, or a folder holding the official files by their
official names) or the official file from the hub (`shikunl/prismer`,
`expert_weights/`). Each expert's network is one module under experts/,
driven through the protocol in experts/network.py.
"""

from __future__ import annotations

import argparse
import logging

from common.modalities import label_networks
from helpers.distributed import PRECISIONS, stop_with_launcher
from helpers.engine import cli
from helpers.labelling import LabelOptions, make_labels, parse_experts, parse_network_options


def main(argv: list[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--expert", required=True, type=parse_experts, help=f"'all' or some of: {','.join(label_networks())}"
    )
    p.add_argument("--data_path", required=True, help="folder of images (searched recursively)")
    p.add_argument("--save_path", required=True, help="label root (the datasets' label_path)")
    p.add_argument("--weights", help="a weight file (one expert) or a folder of official weight files")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--mixed_precision", default="no", choices=PRECISIONS, help="the official labels used fp16 (GPU)")
    p.add_argument(
        "--network_option",
        action="append",
        default=[],
        metavar="EXPERT.KEY=VALUE",
        help="an option of one expert's network, e.g. ocr_detection.clip=DIR (a local CLIP text encoder), "
        "ocr_detection.lexicon=GenericVocabulary.txt",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    stop_with_launcher()

    opts = LabelOptions(
        args.weights,
        args.batch_size,
        args.num_workers,
        args.mixed_precision,
        parse_network_options(args.network_option),
    )
    return make_labels(args.expert, args.data_path, args.save_path, opts)


if __name__ == "__main__":
    cli(main)
