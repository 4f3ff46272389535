"""Weight files into state dicts, and state dicts into modules, with errors
that name the file and the keys: shared by the model's checkpoints and the
expert networks' official weights."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from common.files import CheckpointError, load_safetensors, load_torch

WEIGHT_FILES = ["model.safetensors", "pytorch_model.bin"]


def weights_file(path: str | os.PathLike) -> Path:
    """`path`, or the weights file in the folder `path` (so that errors name the file)."""
    path = Path(path)
    if path.is_dir():
        found = [path / f for f in WEIGHT_FILES if (path / f).exists()]
        if not found:
            raise FileNotFoundError(f"no {' or '.join(WEIGHT_FILES)} in {path}")
        path = found[0]
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file (or folder), never unpickling arbitrary objects."""
    path = weights_file(path)
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    obj = load_torch(path, "a weights-only torch checkpoint")
    for key in ("model", "state_dict", "module"):  # training-state wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a state dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: {bad[0]!r} is not a tensor, expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_checked(module: nn.Module, state: dict[str, torch.Tensor], source: str, allow_missing: Callable | None = None):
    """load_state_dict with errors that name the offending keys and shapes.

    allow_missing(key) -> True for keys the source is not expected to have
    (new parts that keep their initialisation)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not (allow_missing and allow_missing(k))]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    problems = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if items:
            shown = ", ".join(items[:12]) + (f", ... and {len(items) - 12} more" if len(items) > 12 else "")
            problems.append(f"{len(items)} {title}: {shown}")
    if problems:
        raise CheckpointError(f"checkpoint {source} does not fit the model: " + "; ".join(problems))
    module.load_state_dict(state, strict=False)
