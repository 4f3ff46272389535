"""What demo.py and demo_web.py share: loading a model by name or folder, the
settings it captions with, and captioning / answering photos with their labels."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from common.labels import label_file
from helpers.label_sheets import class_names, label_sheet
from helpers.labelling import LabelOptions, in_dependency_order, make_labels
from helpers.processor import PrismerProcessor
from model import PrismerCaption, PrismerVQA
from model.convert import OFFICIAL_NAME
from model.prismer import CONFIG_FILE


def load_model(source: str, cls, model_file: str | None = None):
    """An official name (`caption_prismer_base`) or one of our checkpoint folders."""
    task = "caption" if cls is PrismerCaption else "vqa"
    name = OFFICIAL_NAME.match(source)
    if name and not Path(source).exists():
        if name[1] != task:
            raise ValueError(f"{source} is a {name[1]} checkpoint; this needs a {task} one (e.g. {task}_prismer_base)")
        return cls.from_official(source, path=model_file)
    if (Path(source) / CONFIG_FILE).is_file():
        return cls.from_pretrained(source)
    raise FileNotFoundError(
        f"model {source}: neither an official name ({{caption,vqa}}_{{prismer,prismerz}}_{{base,large}}) "
        f"nor a folder with {CONFIG_FILE} (a training run's final/)"
    )


# What the official caption fine-tuning used (configs/caption.yaml); a run of ours records its own.
CAPTION_SETTINGS = {"prefix": "A picture of", "num_beams": 3, "max_length": 20, "min_length": 8}
# What the datasets read the labels with (the defaults: the official label spaces at 224 px).
LABEL_SETTINGS = {"label_resolution": 224, "label_space_path": None}


def run_settings(source: str) -> dict:
    """Labels as the model was trained with them (resolution, label spaces) and its caption
    settings: a run's config.json beside its final/ folder says them; official models use the official ones."""
    config = Path(source).parent / "config.json"
    recorded = json.loads(config.read_text()) if config.is_file() else {}
    return {k: recorded.get(k, v) for k, v in (CAPTION_SETTINGS | LABEL_SETTINGS).items()}


def _labels(settings: dict) -> dict:
    return {k: settings[k] for k in LABEL_SETTINGS}


class Describer:
    """A caption model and, optionally, a VQA model, each with the label resolution
    and caption settings it was trained with. Photos come with, per photo, each
    expert's label file (a missing one reads as "the expert found nothing")."""

    def __init__(self, captioner: PrismerCaption, source: str, answerer: PrismerVQA | None = None, vqa_source=None):
        self.captioner = captioner.eval()
        self.answerer = answerer.eval() if answerer is not None else None
        settings = run_settings(source)
        self.caption_settings = {k: v for k, v in settings.items() if k in CAPTION_SETTINGS}
        self.processors = {captioner: PrismerProcessor.for_model(captioner, **_labels(settings))}
        if answerer is not None:
            self.processors[answerer] = PrismerProcessor.for_model(answerer, **_labels(run_settings(vqa_source)))
        self.experts = sorted(set(captioner.config.experts) | set(answerer.config.experts if answerer else []))
        # Label sheets name classes in the caption model's label spaces (the world's, for a world model).
        self.class_names = class_names(settings["label_space_path"])

    def _inputs(self, model, photos: Sequence[Image.Image], files: Sequence[dict[str, Path]]) -> dict:
        return self.processors[model](photos, [{e: f[e] for e in model.config.experts} for f in files])

    @torch.no_grad()
    def caption(self, photos: Sequence[Image.Image], files: Sequence[dict[str, Path]]) -> list[str]:
        return self.captioner.generate(self._inputs(self.captioner, photos, files), **self.caption_settings)

    @torch.no_grad()
    def answer(self, photos: Sequence[Image.Image], files: Sequence[dict[str, Path]], question: str) -> list[str]:
        if self.answerer is None:
            raise ValueError("a question needs a VQA model (--vqa_model): a caption model does not answer questions")
        return self.answerer.generate(self._inputs(self.answerer, photos, files), [question] * len(photos))


def describe_photo(
    describer: Describer,
    photo: Image.Image,
    options: LabelOptions,
    question: str | None = None,
    progress: Callable[[float, str], None] = lambda fraction, text: None,
) -> dict:
    """One photo's caption, answer (with `question`) and label sheet (a PIL image, None
    for a model without experts). Its labels are made in a temporary folder, one
    expert at a time in dependency order; `progress(fraction done, what now)` is told as they go."""
    experts = in_dependency_order(describer.experts)
    with tempfile.TemporaryDirectory(prefix="prismer-demo-") as tmp:
        images, labels = Path(tmp, "photo"), Path(tmp, "labels")
        images.mkdir()
        photo = photo.convert("RGB")
        photo.save(images / "photo.png")
        for i, expert in enumerate(experts):
            progress(i / (len(experts) + 1), f"expert {i + 1}/{len(experts)}: {expert}")
            make_labels([expert], images, labels, options)
        files = {e: label_file(labels, e, images.name, "photo.png") for e in experts}
        progress(len(experts) / (len(experts) + 1), "captioning")
        result = {"caption": describer.caption([photo], [files])[0], "answer": None, "sheet": None}
        if question:
            result["answer"] = describer.answer([photo], [files], question)[0]
        if experts:
            found = {e: f if f.is_file() else None for e, f in files.items()}
            result["sheet"] = label_sheet(photo, found, names=describer.class_names)
    return result
