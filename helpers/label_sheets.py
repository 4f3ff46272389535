"""Label sheets: one picture per image with the photo and every expert's label side by side.

What the official `demo_vis.py` drew, made readable and robust: depth and edge
colour-mapped, normals as RGB, segmentation in a fixed palette with a legend of
the class names present (largest area first), detection and OCR as boxes with
the class name or the recognised text at each box. A missing label is a panel
saying so, a label that cannot be read one saying that (and the log names the
file): one bad file never costs the sheet.

Labels are read from the official layout through the label kinds
(common/labels): dense maps as the kind reads them, id maps raw with their
sidecars (instance classes, OCR word records).
"""

from __future__ import annotations

import colorsys
import functools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import find_objects

from common.files import atomic_write
from common.label_space import DEFAULT_PATH
from common.labels import NONE_ID, SampleError, read_ocr_record
from common.labels.base import read_ids
from common.modalities import EXPERTS

log = logging.getLogger(__name__)

PANEL_HEIGHT = 320  # px of every panel's picture; wide images are capped at twice that in width
MIN_CELL_WIDTH = 160  # room for a title and a legend beside a narrow picture
COLUMNS = 4
FONT_SIZE = 14
PAD = 8
SWATCH = 12  # legend swatch side, px
LINE = FONT_SIZE + 6  # legend and title line height
WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (225, 225, 225)
# Single-channel dense maps, per expert. Depth labels are inverse depth (bright = near),
# edge labels dark edges on white; both are min-max stretched per image, as the model sees them.
COLORMAPS = {"depth": "magma", "edge": "gray"}
DEFAULT_COLORMAP = "gray"
# What an id map without any id means, per label kind.
NOTHING_FOUND = {"class_map": "no class found", "instance": "no object found", "ocr": "no text found"}
NO_LABEL, UNREADABLE = "no label", "unreadable label"


@functools.cache
def font() -> ImageFont.ImageFont:
    """DejaVu Sans (shipped with matplotlib: Latin, Greek and Cyrillic words render);
    Pillow's own font where it is missing."""
    path = Path(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
    if path.is_file():
        return ImageFont.truetype(str(path), FONT_SIZE)
    return ImageFont.load_default(size=FONT_SIZE)


@functools.cache
def class_names(folder: str | None = None) -> dict[str, list[str]]:
    """Class names of the label spaces in `folder` (a model's `label_space_path`;
    default: the shipped official ones), {space: [name per class id]}."""
    return json.loads((Path(folder or DEFAULT_PATH) / "label_names.json").read_text(encoding="utf-8"))


def palette_colour(i: int) -> tuple[int, int, int]:
    """A fixed colour per id: hues a golden-ratio step apart, so neighbouring ids differ;
    saturated enough never to be grey (grey is text) nor black (black is none)."""
    hue = (i * 0.6180339887) % 1.0
    sat = (0.95, 0.6)[i % 2]
    val = (0.95, 0.75, 0.85)[i % 3]
    return tuple(round(c * 255) for c in colorsys.hsv_to_rgb(hue, sat, val))


@functools.cache
def _lut(name: str) -> np.ndarray:
    """A matplotlib colormap as a (256, 3) uint8 lookup table."""
    return (matplotlib.colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)


@dataclass
class Panel:
    title: str
    picture: Image.Image  # RGB at the panel size
    legend: list[tuple[tuple[int, int, int], str]] = field(default_factory=list)


def _message(picture: Image.Image, text: str) -> Image.Image:
    """`text` on a white tag in the middle of the picture."""
    out = picture.copy()
    draw = ImageDraw.Draw(out)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font())
    x = (out.width - (right - left)) // 2 - left
    y = (out.height - (bottom - top)) // 2 - top
    draw.rectangle([x + left - 4, y + top - 3, x + right + 3, y + bottom + 2], fill=WHITE, outline=BLACK)
    draw.text((x, y), text, fill=BLACK, font=font())
    return out


def _dense(name: str, path: Path, photo: Image.Image) -> Panel:
    expert = EXPERTS[name]
    label, _ = expert.kind.read(path, photo.size, expert, None)
    if label.mode == "RGB":
        return Panel(name, label)
    x = np.asarray(label, dtype=np.float32)
    lo, hi = float(x.min()), float(x.max())
    index = np.round((x - lo) * 255 / (hi - lo)).astype(np.uint8) if hi > lo else np.zeros(x.shape, np.uint8)
    return Panel(name, Image.fromarray(_lut(COLORMAPS.get(name, DEFAULT_COLORMAP))[index], "RGB"))


def _class_map(name: str, path: Path, photo: Image.Image, names: dict) -> Panel:
    ids = read_ids(path, photo.size)
    space = names[EXPERTS[name].label_space]
    area = np.bincount(ids.ravel(), minlength=256)
    present = [int(i) for i in np.argsort(-area[:NONE_ID], kind="stable") if area[i]]
    outside = [i for i in present if i >= len(space)]
    if outside:
        raise SampleError(f"{path}: class id {outside[0]} is outside the label space of {len(space)} classes")
    lut = np.zeros((256, 3), np.uint8)
    for i in present:
        lut[i] = palette_colour(i)
    picture = Image.fromarray(lut[ids], "RGB")
    if not present:
        return Panel(name, _message(picture, NOTHING_FOUND["class_map"]))
    return Panel(name, picture, [(palette_colour(i), space[i]) for i in present])


def _boxes(photo: Image.Image, ids: np.ndarray, texts: dict[int, str]) -> Image.Image:
    """The photo dimmed, each id's pixels tinted with its colour, its bounding box
    outlined in that colour and its text on a white tag at the box's top left."""
    colours = np.zeros((256, 3), np.uint8)
    for i in texts:
        colours[i] = palette_colour(i)
    dim = np.asarray(photo, dtype=np.float32) * 0.5
    tinted = np.where((ids != NONE_ID)[..., None], 0.5 * dim + 0.5 * colours[ids], dim)
    out = Image.fromarray(tinted.round().astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(out)
    boxes = find_objects(ids.astype(np.int32) + 1, max_label=NONE_ID)  # slot i: id i
    for i in texts:
        rows, cols = boxes[i]
        draw.rectangle([cols.start, rows.start, cols.stop - 1, rows.stop - 1], outline=palette_colour(i), width=2)
    for i, text in texts.items():
        rows, cols = boxes[i]
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font())
        w, h = right - left + 6, bottom - top + 4
        x = min(max(cols.start, 0), max(out.width - w, 0))
        y = rows.start - h if rows.start >= h else rows.start
        draw.rectangle([x, y, x + w - 1, y + h - 1], fill=WHITE, outline=palette_colour(i))
        draw.text((x + 3 - left, y + 2 - top), text, fill=BLACK, font=font())
    return out


def _instances(name: str, path: Path, photo: Image.Image, names: dict) -> Panel:
    ids = read_ids(path, photo.size)
    present = [int(i) for i in np.unique(ids) if i != NONE_ID]
    if not present:
        return Panel(name, _message(_boxes(photo, ids, {}), NOTHING_FOUND["instance"]))
    json_path = path.with_suffix(".json")
    classes = json.loads(json_path.read_text(encoding="utf-8")) if json_path.is_file() else {}
    space = names[EXPERTS[name].label_space]
    texts = {}
    for i in present:
        cls = classes.get(str(i)) if isinstance(classes, dict) else None
        if not isinstance(cls, int) or not 0 <= cls < len(space):
            raise SampleError(f"{json_path}: instance {i} has class {cls!r}, not one of the {len(space)} classes")
        texts[i] = space[cls]
    return Panel(name, _boxes(photo, ids, texts))


def _words(name: str, path: Path, photo: Image.Image, names: dict) -> Panel:
    """No word record means no words were found (as officially)."""
    ids = read_ids(path, photo.size)
    record = read_ocr_record(path) or {}
    present = [int(i) for i in np.unique(ids) if i != NONE_ID] if record else []
    missing = [i for i in present if i not in record]
    if missing:
        raise SampleError(f"{path}: word {missing[0]} has no record next to it")
    if not present:
        return Panel(name, _message(_boxes(photo, np.full_like(ids, NONE_ID), {}), NOTHING_FOUND["ocr"]))
    return Panel(name, _boxes(photo, ids, {i: record[i]["text"] for i in present}))


_DRAW = {"class_map": _class_map, "instance": _instances, "ocr": _words}


def _panel(name: str, path: Path | None, photo: Image.Image, names: dict) -> Panel:
    kind = EXPERTS[name].kind
    if path is None or not kind.exists(path) or path.stat().st_size == 0:
        return Panel(name, _message(Image.new("RGB", photo.size, GREY), NO_LABEL))
    try:
        if kind.name == "dense":
            return _dense(name, path, photo)
        return _DRAW[kind.name](name, path, photo, names)
    except (OSError, ValueError) as e:  # SampleError and JSON errors are ValueErrors
        log.warning("label sheet: %s label %s cannot be read (%s)", name, path, e)
        return Panel(name, _message(Image.new("RGB", photo.size, GREY), UNREADABLE))


def _legend_lines(legend, width: int) -> list[list[tuple[int, tuple[int, int, int], str]]]:
    """Entries (x, colour, name) flowed into lines of `width` px; names cut to fit."""
    lines: list[list] = [[]]
    x = 0
    for colour, text in legend:
        while len(text) > 1 and SWATCH + 4 + font().getlength(text) > width:
            text = text[:-2] + "…"
        entry = SWATCH + 4 + round(font().getlength(text)) + 10
        if x and x + entry > width:
            lines.append([])
            x = 0
        lines[-1].append((x, colour, text))
        x += entry
    return lines if legend else []


def _panel_size(size: tuple[int, int], height: int) -> tuple[int, int]:
    w, h = size
    scale = min(height / h, 2 * height / w)
    return max(1, round(w * scale)), max(1, round(h * scale))


def label_sheet(
    image: Image.Image,
    labels: dict[str, Path | None],
    names: dict | None = None,
    height: int = PANEL_HEIGHT,
    columns: int = COLUMNS,
) -> Image.Image:
    """The photo and each expert's label (`labels`: expert name -> label PNG in the
    official layout, sidecars beside it, or None for none) on one RGB sheet, `columns` panels a row,
    each `height` px high with its title above and its legend below. `names`: class
    names per label space (default: the shipped official ones; see `class_names`).

    `sheet.info["panels"]` holds each panel's picture box (left, top, right, bottom)
    and `sheet.info["legends"]` the box below it where its legend is, by title."""
    unknown = [n for n in labels if n not in EXPERTS or EXPERTS[n].kind is None]
    if unknown:
        known = ", ".join(n for n, e in EXPERTS.items() if e.kind is not None)
        raise ValueError(f"no label kind for {unknown}; experts with labels: {known}")
    names = class_names() if names is None else names
    rgb = image.convert("RGB")
    photo = rgb.resize(_panel_size(rgb.size, height), Image.BICUBIC)
    panels = [Panel("photo", photo)] + [_panel(n, p and Path(p), photo, names) for n, p in labels.items()]

    cell_w = max(photo.width, MIN_CELL_WIDTH)
    legends = [_legend_lines(p.legend, cell_w) for p in panels]
    rows = [range(r, min(r + columns, len(panels))) for r in range(0, len(panels), columns)]
    row_h = [LINE + photo.height + max((len(legends[i]) * LINE for i in row), default=0) for row in rows]
    width = PAD + min(columns, len(panels)) * (cell_w + PAD)
    sheet = Image.new("RGB", (width, PAD + sum(h + PAD for h in row_h)), WHITE)
    draw = ImageDraw.Draw(sheet)
    boxes, legend_boxes = {}, {}
    top = PAD
    for row, h in zip(rows, row_h):
        for col, i in enumerate(row):
            panel, left = panels[i], PAD + col * (cell_w + PAD)
            draw.text((left + cell_w // 2, top + LINE // 2), panel.title, fill=BLACK, font=font(), anchor="mm")
            x = left + (cell_w - photo.width) // 2
            sheet.paste(panel.picture, (x, top + LINE))
            boxes[panel.title] = (x, top + LINE, x + photo.width, top + LINE + photo.height)
            legend_top = top + LINE + photo.height
            legend_boxes[panel.title] = (left, legend_top, left + cell_w, top + h)
            for n, line in enumerate(legends[i]):
                y = legend_top + n * LINE + (LINE - SWATCH) // 2
                for dx, colour, text in line:
                    draw.rectangle([left + dx, y, left + dx + SWATCH - 1, y + SWATCH - 1], fill=colour)
                    draw.text((left + dx + SWATCH + 4, y + SWATCH // 2), text, fill=BLACK, font=font(), anchor="lm")
        top += h + PAD
    sheet.info["panels"], sheet.info["legends"] = boxes, legend_boxes
    return sheet


def save_label_sheet(
    image: Image.Image, labels: dict[str, Path | None], path: str | os.PathLike, **kwargs
) -> Image.Image:
    """`label_sheet(image, labels, **kwargs)` written as a PNG atomically; returns the sheet."""
    sheet = label_sheet(image, labels, **kwargs)
    atomic_write(Path(path), lambda tmp: sheet.save(tmp, format="PNG"))
    return sheet
