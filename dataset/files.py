"""Reading images, expert label files and OCR word records from disk.

Layout (official): image `<data_path>/<dataset>/<image>`, label
`<label_path>/<expert>/<dataset>/<image with .png>`, plus `.json` (detection:
instance id -> class id) and an OCR word record (`.pt` official,
`.json`/`.safetensors` ours). A missing or empty label file means the expert
found nothing.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile
from safetensors import safe_open
from safetensors.torch import save_file

from common.files import CheckpointError, atomic_write, load_safetensors, load_torch

# A truncated file must fail, not decode to grey; the sample is then skipped.
ImageFile.LOAD_TRUNCATED_IMAGES = False

OCR_SUFFIXES = (".safetensors", ".json", ".pt")


class SampleError(ValueError):
    """One sample cannot be used (its message names the file); it is skipped and counted."""


# Exceptions that mean "this sample's files are unusable", never a bug in our code.
READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def label_file(label_path: str | Path, expert: str, dataset: str, image: str) -> Path:
    """`<label_path>/<expert>/<dataset>/<image with .png>` (official layout)."""
    return Path(label_path, expert, dataset, os.path.splitext(image)[0] + ".png")


def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit grey images keep their top 8 bits (a plain convert would clip
    everything above 255 to white)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        x = np.asarray(img, dtype=np.int64)
        shift = 8 if x.max(initial=0) > 255 or img.mode.startswith("I;16") else 0
        return Image.fromarray((x >> shift).clip(0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        x = np.asarray(img, dtype=np.float32)
        return Image.fromarray(x.clip(0, 255).astype(np.uint8), "L")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (grey, 16-bit, palette with transparency, CMYK, RGBA) to 8-bit RGB."""
    img = _to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def read_image(path: str | Path | bytes, min_side: int | None = None) -> Image.Image:
    """Decode fully now so a truncated or empty file raises here, inside the
    sample's error handling. With `min_side`, a JPEG much larger than needed
    is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) keeping its
    shorter side >= min_side: web images are often several times the 224 px
    of pre-training, and decoding dominates the pipeline."""
    if isinstance(path, bytes):
        path = io.BytesIO(path)
    with Image.open(path) as img:
        if min_side is not None and img.format == "JPEG":
            k = min_side / min(img.size)
            if k < 0.5:
                img.draft(img.mode, (math.ceil(img.width * k), math.ceil(img.height * k)))
        img.load()
        return to_rgb(img)


def read_dense(path: Path, mode: str, size: tuple[int, int]) -> Image.Image | None:
    """An 8-bit grey ('L') or RGB label at the image's size; None when the
    expert found nothing (file missing or empty)."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with Image.open(path) as img:
        img.load()
        img = _to_8bit(img)
        img = img.convert(mode) if img.mode != mode else img
    return img if img.size == size else img.resize(size, Image.NEAREST)


def read_ids(path: Path, size: tuple[int, int]) -> np.ndarray | None:
    """An id map (H, W) uint8 with 255 = none; None when the expert found nothing.
    Palette and 16-bit PNGs are read as raw values (converting them to grey
    would turn ids into luminances); ids above 255 are an error."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with Image.open(path) as img:
        img.load()
        if img.mode in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
            ids = np.asarray(img)
            if ids.ndim != 2:
                raise SampleError(f"{path}: id map has shape {ids.shape}, expected (H, W)")
            if ids.dtype != np.uint8:
                if ids.max(initial=0) > 255 or ids.min(initial=0) < 0:
                    raise SampleError(f"{path}: id {int(ids.max())} does not fit 8 bits (255 = none)")
                ids = ids.astype(np.uint8)
        else:
            ids = np.asarray(img.convert("L"))
    if (ids.shape[1], ids.shape[0]) != size:
        ids = np.asarray(Image.fromarray(ids).resize(size, Image.NEAREST))
    return ids


def check_ids(ids: np.ndarray, num_classes: int, path: Path) -> None:
    """Every value must be a class of the label space or 255."""
    counts = np.bincount(ids.ravel(), minlength=256)
    bad = np.flatnonzero(counts[num_classes:255])
    if bad.size:
        first = int(bad[0]) + num_classes
        raise SampleError(f"{path}: class id {first} is outside the label space of {num_classes} classes")


def read_json(path: Path):
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise SampleError(f"{path}: not valid JSON ({e})") from e


def read_ocr_record(stem: Path) -> dict[int, dict] | None:
    """The word record next to an OCR id map: {word id: {"text", "features" (64,)}}.
    Official records (`.pt`) are loaded with weights_only=True: tensors, ints
    and strings only, no code. None when there is no record (no words found)."""
    for suffix in OCR_SUFFIXES:
        path = stem.with_suffix(suffix)
        if path.is_file() and path.stat().st_size > 0:
            break
    else:
        return None
    try:
        if suffix == ".pt":
            raw = load_torch(path, "an official OCR word record (weights-only: tensors, numbers, strings)")
        elif suffix == ".json":
            raw = read_json(path)
        else:
            tensors = load_safetensors(path)
            with safe_open(str(path), "pt") as f:  # texts live in the header metadata
                texts = json.loads((f.metadata() or {}).get("texts", "[]"))
            rows = zip(tensors["ids"], tensors["features"], texts)
            raw = {int(i): {"features": feat, "text": text} for i, feat, text in rows}
    except CheckpointError as e:
        raise SampleError(str(e)) from e
    if not isinstance(raw, dict):
        raise SampleError(f"{path}: OCR record is {type(raw).__name__}, expected a dict of word id -> record")
    out = {}
    for key, rec in raw.items():
        try:
            features = torch.as_tensor(rec["features"], dtype=torch.float32).reshape(-1)
            word = int(key)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise SampleError(f"{path}: word {key!r} is not {{'features': 64 numbers, 'text': str}} ({e})") from e
        if features.shape != (64,):
            raise SampleError(f"{path}: word {key} has a feature of shape {tuple(features.shape)}, expected (64,)")
        out[word] = {"features": features, "text": str(rec.get("text", ""))}
    return out


def write_ocr_record(path: str | Path, words: dict[int, dict]) -> None:
    """Write {word id: {"text", "features" (64,)}} as `.json` or `.safetensors`
    (by the suffix of `path`), atomically; never as a pickle."""
    path = Path(path)
    ids = sorted(int(i) for i in words)
    if path.suffix == ".json":
        payload = {
            str(i): {"text": words[i]["text"], "features": torch.as_tensor(words[i]["features"]).tolist()} for i in ids
        }

        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(payload, f)

    elif path.suffix == ".safetensors":
        feats = [torch.as_tensor(words[i]["features"], dtype=torch.float32).reshape(64) for i in ids]
        tensors = {
            "ids": torch.tensor(ids, dtype=torch.int64),
            "features": torch.stack(feats) if feats else torch.zeros(0, 64),
        }
        meta = {"texts": json.dumps([words[i]["text"] for i in ids])}

        def write(tmp):
            save_file(tensors, tmp, metadata=meta)

    else:
        raise ValueError(f"{path}: OCR records are written as .json or .safetensors")
    atomic_write(path, write)
