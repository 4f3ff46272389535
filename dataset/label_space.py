"""Label spaces: the 64-d CLIP text features that id maps are painted with.

Two on-disk forms are read:
- the official files from GitHub NVlabs/prismer, `dataset/{coco,ade,detection}_features.pt`
  (a dict with `features`) and `dataset/background_features.pt` (a tensor),
  loaded with `torch.load(weights_only=True)` so a tampered file cannot run code;
- one `label_features.safetensors` holding `<space>.features` and `background.features`.

Each space becomes a (classes + 1, 64) table whose last row is the background
feature, used for label value 255 ("no class").
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

SPACES = ("coco", "ade", "detection")
FEATURE_DIM = 64
NONE_ID = 255
SAFETENSORS_NAME = "label_features.safetensors"
# The official label spaces, shipped with the package (converted from the official
# repo's dataset/*_features.pt) so a config without `label_space_path` paints real CLIP features.
DEFAULT_PATH = Path(__file__).resolve().parent / "label_spaces"


@dataclass(frozen=True)
class LabelSpaces:
    """Per-space (classes + 1, 64) float32 tables, last row = background."""

    tables: dict[str, torch.Tensor]
    background: torch.Tensor

    def num_classes(self, space: str) -> int:
        return self.tables[space].shape[0] - 1

    def id_table(self, space: str) -> torch.Tensor:
        """(256, 64) table indexed directly by an 8-bit label value: class ids
        take their class feature, 255 (and, after validation never used, the
        other values above the class count) take the background row."""
        table = self.tables[space]
        rows = torch.arange(256).clamp(max=table.shape[0] - 1)
        return table[rows]


def _check(name: str, x: torch.Tensor, source: Path) -> torch.Tensor:
    if x.ndim != 2 or x.shape[1] != FEATURE_DIM:
        raise ValueError(f"{source}: {name} features have shape {tuple(x.shape)}, expected (classes, {FEATURE_DIM})")
    return x.float()


def _tables(features: dict[str, torch.Tensor], background: torch.Tensor, source: Path) -> LabelSpaces:
    background = background.float().reshape(-1)
    if background.shape != (FEATURE_DIM,):
        raise ValueError(f"{source}: background feature has shape {tuple(background.shape)}, expected ({FEATURE_DIM},)")
    tables = {s: torch.cat([_check(s, features[s], source), background[None]]) for s in SPACES}
    return LabelSpaces(tables=tables, background=background)


def _load_safetensors(path: Path) -> LabelSpaces:
    data = load_file(str(path))
    missing = [f"{s}.features" for s in (*SPACES, "background") if f"{s}.features" not in data]
    if missing:
        raise ValueError(f"{path} lacks {missing}")
    return _tables({s: data[f"{s}.features"] for s in SPACES}, data["background.features"], path)


def _load_official(folder: Path) -> LabelSpaces:
    features = {}
    for space in SPACES:
        obj = torch.load(folder / f"{space}_features.pt", map_location="cpu", weights_only=True)
        features[space] = obj["features"] if isinstance(obj, dict) else obj
    background = torch.load(folder / "background_features.pt", map_location="cpu", weights_only=True)
    return _tables(features, background, folder)


@functools.lru_cache(maxsize=4)
def load_label_spaces(path: str | Path | None = None) -> LabelSpaces:
    """Read the label-space features from `path`: a `.safetensors` file, or a
    folder holding `label_features.safetensors` or the official `*_features.pt`
    files. Default: the copy shipped in `dataset/label_spaces/`."""
    path = Path(path) if path is not None else DEFAULT_PATH
    if path.is_file():
        return _load_safetensors(path)
    if (path / SAFETENSORS_NAME).is_file():
        return _load_safetensors(path / SAFETENSORS_NAME)
    official = [path / f"{s}_features.pt" for s in (*SPACES, "background")]
    if all(p.is_file() for p in official):
        return _load_official(path)
    raise FileNotFoundError(
        f"no label-space features in {path}: expected {SAFETENSORS_NAME} or the official "
        f"{', '.join(p.name for p in official)} (from github.com/NVlabs/prismer, folder dataset/); "
        "set `label_space_path` in the config to where they are"
    )
