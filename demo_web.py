"""A web page to try Prismer on one photo: its experts' labels, a caption and an answer.

    python demo_web.py --model caption_prismer_base --vqa_model vqa_prismer_base   # http://127.0.0.1:7860
    python demo_web.py --model outputs/caption_world/final --model caption_prismerz_base

Upload a photo or pick a sample (helpers/images), choose one of the `--model`s,
optionally type a question (needs `--vqa_model`). The experts the model reads
run on the photo first (progress shown), then the label sheet, the caption and
the answer appear. CPU only; no telemetry and no share link (nothing leaves the machine).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from helpers.demo import Describer, describe_photo, load_model
from helpers.engine import cli
from helpers.labelling import LabelOptions, parse_network_options
from model import PrismerCaption, PrismerVQA

log = logging.getLogger("demo_web")
SAMPLES = Path(__file__).resolve().parent / "helpers" / "images"


def build_app(args):
    """The gradio Blocks page; models are kept once loaded."""
    import gradio as gr

    networks = parse_network_options(args.network_option)
    options = LabelOptions(args.expert_weights, num_workers=0, network_options=networks)
    answerer = load_model(args.vqa_model, PrismerVQA, args.vqa_model_file) if args.vqa_model else None
    # The default model now, so that a missing file is said at start; the others on first use.
    first = args.model[0]
    describers = {first: Describer(load_model(first, PrismerCaption), first, answerer, args.vqa_model)}

    # gradio finds the progress bar to drive by this default argument.
    def run(photo, source: str, question: str, progress=gr.Progress()):  # noqa: B008
        if photo is None:
            raise gr.Error("upload a photo or pick a sample first")
        if question.strip() and answerer is None:
            raise gr.Error("a question needs a VQA model: start the page with --vqa_model")
        if source not in describers:
            progress(0, desc=f"loading {source}")
            describers[source] = Describer(load_model(source, PrismerCaption), source, answerer, args.vqa_model)
        done = describe_photo(
            describers[source], photo, options, question.strip() or None, lambda f, text: progress(f, desc=text)
        )
        return done["sheet"], done["caption"], done["answer"] or ""

    with gr.Blocks(title="Prismer demo", analytics_enabled=False) as app:
        gr.Markdown("# Prismer demo\nA photo, the labels its experts see, a caption and an answer.")
        with gr.Row():
            with gr.Column():
                photo = gr.Image(type="pil", label="Photo", sources=["upload"], elem_id="photo")
                model = gr.Dropdown(args.model, value=args.model[0], label="Model", elem_id="model")
                question = gr.Textbox(
                    label="Question" if answerer else "Question (start with --vqa_model to ask one)",
                    interactive=answerer is not None,
                    elem_id="question",
                )
                button = gr.Button("Caption", variant="primary", elem_id="run")
                gr.Examples(sorted(str(p) for p in SAMPLES.glob("*.jpg")), inputs=photo, label="Samples")
            with gr.Column():
                sheet = gr.Image(type="pil", label="Expert labels", interactive=False, elem_id="sheet")
                caption = gr.Textbox(label="Caption", interactive=False, elem_id="caption")
                answer = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
        button.click(run, [photo, model, question], [sheet, caption, answer])
    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", action="append", help="official caption checkpoint name or our folder (repeatable; first: default)"
    )
    p.add_argument("--vqa_model", help="official VQA checkpoint name or our folder (enables the question box)")
    p.add_argument("--vqa_model_file", help="local copy of the official file named by --vqa_model")
    p.add_argument("--expert_weights", help="folder of the official expert weight files (default: the hub)")
    p.add_argument(
        "--network_option", action="append", default=[], metavar="EXPERT.KEY=VALUE", help="as in generate_experts.py"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    args = p.parse_args(argv)
    args.model = args.model or ["caption_prismer_base"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Read by gradio and huggingface_hub at import: no usage reports, no version check.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    app = build_app(args)
    app.queue().launch(
        server_name=args.host,
        server_port=args.port,
        share=False,
        ssr_mode=False,
        mcp_server=False,
        allowed_paths=[str(SAMPLES)],
    )


if __name__ == "__main__":
    cli(main)
