"""OCR words: a grey PNG of word ids (255 = none) and a word record beside it,
{word id: {"text", "features" (64,)}}, each word painted with its own text
feature. Records are read as `.safetensors`, `.json` (ours) or `.pt` (official,
loaded weights-only) and written as `.json` or `.safetensors`, never pickled.
In memory: `Words(ids, words)`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from common.files import CheckpointError, atomic_write, load_safetensors, load_torch
from common.labels.base import NONE_ID, LabelKind, SampleError, check_ids_array, present_ids, read_ids, save_png

RECORD_SUFFIXES = (".safetensors", ".json", ".pt")


@dataclass
class Words:
    ids: np.ndarray  # (H, W) uint8, 255 = none
    words: dict[int, dict]  # word id -> {"text": str, "features": (64,)}


def _read_json(path: Path):
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise SampleError(f"{path}: not valid JSON ({e})") from e


def read_ocr_record(stem: Path) -> dict[int, dict] | None:
    """The word record next to an OCR id map: {word id: {"text", "features" (64,)}}.
    Official records (`.pt`) are loaded with weights_only=True: tensors, ints
    and strings only, no code. None when there is no record (no words found)."""
    for suffix in RECORD_SUFFIXES:
        path = Path(stem).with_suffix(suffix)
        if path.is_file() and path.stat().st_size > 0:
            break
    else:
        return None
    try:
        if suffix == ".pt":
            raw = load_torch(path, "an official OCR word record (weights-only: tensors, numbers, strings)")
        elif suffix == ".json":
            raw = _read_json(path)
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


class OcrWords(LabelKind):
    name = "ocr"
    fill = NONE_ID
    painted = True
    stem_upsample = 4
    sidecars = RECORD_SUFFIXES

    def read(self, path: Path, size, expert, spaces):
        """No word record means no words were found: the map is all background (as officially)."""
        ids = read_ids(path, size)
        if ids is None:
            return None, None
        record = read_ocr_record(path)
        if record is None:
            return self.empty(size, expert, spaces)
        table = spaces.background.expand(256, -1).clone()
        for word in present_ids(ids):
            if word not in record:
                raise SampleError(f"{path}: word {word} has no record next to it")
            table[word] = record[word]["features"]
        return Image.fromarray(ids, "L"), table

    def empty(self, size, expert, spaces):
        return Image.new("L", size, NONE_ID), spaces.background.expand(256, -1)

    def found_nothing(self, label: Words) -> bool:
        return not label.words

    def write(self, path: Path, label: Words) -> None:
        """The record first, the PNG last: a PNG on disk means the label is complete.
        An image without words gets an all-255 map and no record."""
        ids = check_ids_array(label.ids, path)
        unnamed = sorted(set(present_ids(ids)) - {int(i) for i in label.words})
        if unnamed:
            raise ValueError(f"{path}: word ids {unnamed} are in the map but not in the word record")
        if label.words:
            write_ocr_record(path.with_suffix(".json"), label.words)
        save_png(path, Image.fromarray(ids, "L"))
