"""Caption (and question) a folder of photos with Prismer in one command.

    python demo.py --images helpers/images                          # caption_prismer_base, fetched
    python demo.py --images photos --model outputs/caption_world/final   # the quickstart's model
    python demo.py --images photos --question "what is in the picture?" --vqa_model vqa_prismer_base

For each photo the experts the model reads are run first (their labels go to
`--labels`, official layout `helpers/labels/<expert>/<folder>/<photo>.png`;
labels already there are reused, one expert in memory at a time), then the
model captions it and, with `--question`, a VQA model answers. Output, written
as a whole or not at all: `<out>/results.json`, `<out>/index.html` and a label
sheet per photo (`<out>/sheets/`: the photo and every expert's label side by side).
A model is an official name (fetched from the hub, or `--model_file` for a
local copy of its pytorch_model.bin) or a folder saved by this project
(`final/` of a training run).
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from common.labels import label_file
from dataset.datasets import list_images
from dataset.files import READ_ERRORS, read_image
from helpers.demo import Describer, load_model
from helpers.engine import cli
from helpers.label_sheets import save_label_sheet
from helpers.labelling import LabelOptions, make_labels, parse_network_options
from model import PrismerCaption, PrismerVQA

log = logging.getLogger("demo")


def write_page(folder: Path, results: list[dict]) -> None:
    rows = []
    for r in results:
        answers = "".join(
            f"<p><b>Q:</b> {html.escape(q)}<br><b>A:</b> {html.escape(a)}</p>" for q, a in r.get("answers", {}).items()
        )
        sheet = f'<p><a href="{html.escape(r["label_sheet"])}">expert labels</a></p>' if "label_sheet" in r else ""
        rows.append(
            f'<div class="photo"><img src="{html.escape(r["thumbnail"])}" alt="{html.escape(r["image"])}">'
            f"<h3>{html.escape(r['image'])}</h3><p>{html.escape(r['caption'])}</p>{answers}{sheet}</div>"
        )
    page = (
        '<!doctype html><html><head><meta charset="utf-8"><title>Prismer demo</title>'
        "<style>body{font-family:sans-serif}.photo{display:inline-block;width:340px;vertical-align:top;margin:8px}"
        "img{max-width:320px}</style></head><body><h1>Prismer demo</h1>" + "".join(rows) + "</body></html>"
    )
    (folder / "index.html").write_text(page, encoding="utf-8")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default="helpers/images", help="folder of photos (searched recursively)")
    p.add_argument("--labels", default="helpers/labels", help="where expert labels are written and reused")
    p.add_argument("--model", default="caption_prismer_base", help="official caption checkpoint name or our folder")
    p.add_argument("--model_file", help="local copy of the official checkpoint file named by --model")
    p.add_argument("--question", action="append", default=[], help="a question for every photo (repeatable)")
    p.add_argument("--vqa_model", help="official VQA checkpoint name or our folder (needed by --question)")
    p.add_argument("--vqa_model_file", help="local copy of the official file named by --vqa_model")
    p.add_argument("--expert_weights", help="folder of the official expert weight files (default: the hub)")
    p.add_argument(
        "--network_option", action="append", default=[], metavar="EXPERT.KEY=VALUE", help="as in generate_experts.py"
    )
    p.add_argument("--out", default="demo_output", help="results folder (replaced as a whole)")
    p.add_argument("--batch_size", type=int, default=4)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.question and not args.vqa_model:
        raise ValueError(
            "--question needs --vqa_model (a caption model does not answer questions), e.g. vqa_prismer_base"
        )

    images, labels = Path(args.images), Path(args.labels)
    paths = list_images(images, "--images", exclude=labels)
    captioner = load_model(args.model, PrismerCaption, args.model_file).eval()
    answerer = load_model(args.vqa_model, PrismerVQA, args.vqa_model_file).eval() if args.vqa_model else None
    experts = sorted(set(captioner.config.experts) | set(answerer.config.experts if answerer else []))
    if experts:
        options = parse_network_options(args.network_option)
        make_labels(experts, images, labels, LabelOptions(args.expert_weights, num_workers=0, network_options=options))

    describer = Describer(captioner, args.model, answerer, args.vqa_model)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    results = []
    try:
        # A batch of photos in memory at a time: a folder may hold thousands of large ones.
        for start in range(0, len(paths), args.batch_size):
            photos, batch = [], []
            for path in paths[start : start + args.batch_size]:
                try:
                    photos.append(read_image(path))
                    batch.append({"image": path.relative_to(images).as_posix()})
                except READ_ERRORS as e:
                    log.warning("%s: unreadable image, skipped (%s: %s)", path, type(e).__name__, e)
            if not photos:
                continue
            files = [{e: label_file(labels, e, images.name, r["image"]) for e in experts} for r in batch]
            for r, text in zip(batch, describer.caption(photos, files)):
                r["caption"] = text
            for question in args.question:
                for r, answer in zip(batch, describer.answer(photos, files, question)):
                    r.setdefault("answers", {})[question] = answer
            for r, photo, found in zip(batch, photos, files):
                thumb = Path("photos") / (r["image"] + ".jpg")
                (tmp / thumb).parent.mkdir(parents=True, exist_ok=True)
                small = photo.copy()
                small.thumbnail((640, 640))
                small.save(tmp / thumb, quality=90)
                r["thumbnail"] = thumb.as_posix()
                if experts:  # every expert's label beside the photo
                    sheet = Path("sheets") / (r["image"] + ".png")
                    (tmp / sheet).parent.mkdir(parents=True, exist_ok=True)
                    labels_found = {e: f if f.is_file() else None for e, f in found.items()}
                    save_label_sheet(photo, labels_found, tmp / sheet, names=describer.class_names)
                    r["label_sheet"] = sheet.as_posix()
            results += batch
        (tmp / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
        write_page(tmp, results)
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    skipped = len(paths) - len(results)
    print(f"\n{len(results)} captions ({skipped} unreadable photo(s) skipped): {out}/results.json, {out}/index.html")
    return {"results": results, "skipped": skipped, "out": out}


if __name__ == "__main__":
    cli(main)
