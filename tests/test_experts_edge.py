"""The edge expert (DexiNed) computes what the official network computes (tests/fixtures/experts)."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from experts import edge
from tests.conftest import FIXTURES, synthetic_weights


@pytest.fixture(scope="module")
def layout():
    return json.loads((FIXTURES / "experts" / "layout_edge.json").read_text())


def test_keys_and_shapes_are_the_official_files(layout):
    state = edge.DexiNed().state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == layout


@torch.no_grad()
def test_outputs_match_the_official_network(tmp_path):
    ref = load_file(FIXTURES / "experts" / "parity_edge.safetensors")
    path = tmp_path / "10_model.pth"
    torch.save(synthetic_weights(edge.DexiNed().state_dict()), path)  # the official file format: a flat state_dict
    outs = edge.Generator("edge").load(path)(ref["input"])
    names = [f"out_{i}" for i in range(1, 7)] + ["fused"]
    for name, out in zip(names, outs):
        want = ref[f"output.{name}"]
        assert out.shape == want.shape, name
        assert ((out - want).norm() / want.norm()).item() < 1e-5, name


def test_preprocessing_is_bgr_times_255_without_the_mean():
    image = Image.fromarray(np.full((60, 90, 3), (255, 0, 128), np.uint8))
    x = edge.Generator("edge").preprocess(image)
    assert x.shape == (3, 480, 480)
    want_bgr = [(128 / 255 - 0.406) * 255, (0 - 0.456) * 255, (1 - 0.485) * 255]
    assert torch.allclose(x.mean((1, 2)), torch.tensor(want_bgr), atol=1e-3)


def test_label_is_the_official_formula_worked_by_hand():
    """NOTES.md: sigmoid, per-image min-max to 0..255, truncated to uint8, inverted."""
    logits = torch.tensor([[[-20.0, -math.log(7)], [-math.log(3), 0.0]]])
    # sigmoid: ~0, 1/8, 1/4, 1/2; (p - min) * 255 / (max - min): 0, 63.75, 127.5, 255;
    # truncated: 0, 63, 127, 255 (rounded: 64, 128); inverted:
    want = np.array([[255, 192], [128, 0]], np.uint8)
    assert np.array_equal(np.asarray(edge.Generator("edge").to_label(logits, (2, 2))), want)


def test_label_has_dark_edges_on_white_at_the_original_size():
    logits = torch.full((1, 32, 32), -5.0)
    logits[0, :, 16] = 5.0  # a vertical edge
    label = edge.Generator("edge").to_label(logits, (64, 48))
    assert label.mode == "L" and label.size == (64, 48)
    a = np.asarray(label)
    assert a[:, 32].max() < 128 and a[:, 5].min() == 255
