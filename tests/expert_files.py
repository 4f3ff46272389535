"""Weight files in each expert's official format, with the synthetic weights of
tests/fixtures (regenerated, never stored), built from the official layouts alone:
what a user downloads, for the end-to-end tests and benchmarks/experts.py."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from common.modalities import EXPERTS
from tests.conftest import FIXTURES, synthetic_weights

# An integer buffer is recorded with shape [] in a layout; its real shape where that is not a scalar.
INT_SHAPES = {"relative_position_index": (144, 144)}


def official_state(expert: str) -> dict[str, torch.Tensor]:
    """The official weight file's state dict with synthetic weights."""
    layout = json.loads((FIXTURES / "experts" / f"layout_{expert}.json").read_text())
    template = {}
    for key, shape in layout.items():
        name = key.rsplit(".", 1)[-1]
        if shape == [] or name in INT_SHAPES:
            template[key] = torch.zeros(INT_SHAPES.get(name, ()), dtype=torch.int64)
        else:
            template[key] = torch.empty(shape, device="meta")
    return synthetic_weights(template)


def write_official(expert: str, folder: Path) -> Path:
    """`folder/<official file name>` in the format the official code reads."""
    path = Path(folder) / Path(EXPERTS[expert].weights).name
    state = official_state(expert)
    if path.suffix == ".pkl":  # detectron2 model zoo: {'model': name -> numpy array, '__author__': ...}
        with open(path, "wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "synthetic"}, f, protocol=4)
    elif expert == "normal":  # a DDP training checkpoint: {'model': {'module.' + key: tensor}}
        torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, path)
    else:  # a flat state_dict
        torch.save(state, path)
    return path
