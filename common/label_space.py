"""Label spaces: the 64-d CLIP text features that id maps are painted with.

Two on-disk forms are read:
- the official files from GitHub NVlabs/prismer, `dataset/{coco,ade,detection}_features.pt`
  (a dict with `features`) and `dataset/background_features.pt` (a tensor),
  loaded with `torch.load(weights_only=True)` so a tampered file cannot run code;
- one `label_features.safetensors` holding `<space>.features` and `background.features`.

Each space becomes a (classes + 1, 64) table whose last row is the background
feature, used for label value 255 ("no class"). A file that is not what it
should be raises CheckpointError naming it.

The same file holds the PCA that reduces a 768-d CLIP ViT-L/14 text embedding
to these 64 dimensions (`load_clip_pca`), which the OCR expert applies to the
words it reads. The official features ship in `common/label_spaces/`: the
datasets paint with them and the OCR expert writes in their space, so they sit
on the ground floor.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from common.files import CheckpointError, load_safetensors, load_torch

SPACES = ("coco", "ade", "detection")
FEATURE_DIM = 64
SAFETENSORS_NAME = "label_features.safetensors"
# The official label spaces, shipped with the package (converted from the official
# repo's dataset/*_features.pt) so a config without `label_space_path` paints real CLIP features.
DEFAULT_PATH = Path(__file__).resolve().parent / "label_spaces"


@dataclass(frozen=True)
class LabelSpaces:
    """Per-space (classes + 1, 64) float32 tables, last row = background."""

    tables: dict[str, torch.Tensor]
    background: torch.Tensor
    # Per space a (256, 64) table indexed directly by an 8-bit label value: class
    # ids take their class feature, 255 (and, after validation never used, the
    # other values above the class count) take the background row.
    id_tables: dict[str, torch.Tensor]

    def num_classes(self, space: str) -> int:
        return self.tables[space].shape[0] - 1


OFFICIAL = "an official label-space file of tensors"


def _describe(x) -> str:
    return f"of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else f"a {type(x).__name__}"


def _check(name: str, x, source: Path) -> torch.Tensor:
    if not (isinstance(x, torch.Tensor) and x.ndim == 2 and x.shape[1] == FEATURE_DIM):
        raise CheckpointError(f"{source}: {name} features are {_describe(x)}, expected (classes, {FEATURE_DIM})")
    return x.float()


def _background(x, source: Path) -> torch.Tensor:
    if not (isinstance(x, torch.Tensor) and x.numel() == FEATURE_DIM):
        raise CheckpointError(f"{source}: background feature is {_describe(x)}, expected ({FEATURE_DIM},)")
    return x.float().reshape(-1)


def _tables(features: dict[str, torch.Tensor], background: torch.Tensor) -> LabelSpaces:
    tables = {s: torch.cat([features[s], background[None]]) for s in SPACES}
    id_tables = {s: t[torch.arange(256).clamp(max=t.shape[0] - 1)] for s, t in tables.items()}
    return LabelSpaces(tables=tables, background=background, id_tables=id_tables)


def _load_safetensors(path: Path) -> LabelSpaces:
    data = load_safetensors(path)
    missing = [f"{s}.features" for s in (*SPACES, "background") if f"{s}.features" not in data]
    if missing:
        raise CheckpointError(f"{path}: lacks {', '.join(missing)}, expected label-space features")
    features = {s: _check(s, data[f"{s}.features"], path) for s in SPACES}
    return _tables(features, _background(data["background.features"], path))


def _load_official(folder: Path) -> LabelSpaces:
    """`{space}_features.pt`: a dict with `features` (or a bare tensor); `background_features.pt`: a tensor."""
    features = {}
    for space in SPACES:
        path = folder / f"{space}_features.pt"
        obj = load_torch(path, OFFICIAL)
        features[space] = _check(space, obj.get("features") if isinstance(obj, dict) else obj, path)
    path = folder / "background_features.pt"
    return _tables(features, _background(load_torch(path, OFFICIAL), path))


@functools.lru_cache(maxsize=4)
def load_label_spaces(path: str | Path | None = None) -> LabelSpaces:
    """Read the label-space features from `path`: a `.safetensors` file, or a
    folder holding `label_features.safetensors` or the official `*_features.pt`
    files. Default: the copy shipped in `common/label_spaces/`."""
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


@functools.lru_cache(maxsize=4)
def load_clip_pca(path: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(components (64, 768), mean (768,)) of the official PCA: a word's 64-d feature
    is `(e - mean) @ components.T` for its 768-d CLIP text embedding `e` (no whitening).
    From `label_features.safetensors` (a file or the folder holding it; default: the shipped copy)."""
    path = Path(path) if path is not None else DEFAULT_PATH
    path = path / SAFETENSORS_NAME if path.is_dir() else path
    data = load_safetensors(path)
    if "clip_pca.components" not in data or "clip_pca.mean" not in data:
        raise CheckpointError(f"{path}: lacks clip_pca.components / clip_pca.mean, the OCR word features' PCA")
    components, mean = data["clip_pca.components"].float(), data["clip_pca.mean"].float()
    if components.shape != (FEATURE_DIM, 768) or mean.shape != (768,):
        raise CheckpointError(
            f"{path}: clip_pca is {tuple(components.shape)} / {tuple(mean.shape)}, "
            f"expected ({FEATURE_DIM}, 768) / (768,)"
        )
    return components, mean
