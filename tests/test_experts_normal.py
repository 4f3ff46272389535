"""The normal expert (NLL-AngMF) computes what the official network computes (tests/fixtures/experts)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from common.files import CheckpointError
from experts import normal
from tests.conftest import FIXTURES, synthetic_weights

OUTPUTS = ["out_res8", "out_res4", "out_res2", "out_res1"]


@pytest.fixture(scope="module")
def layout():
    return json.loads((FIXTURES / "experts" / "layout_normal.json").read_text())


@pytest.fixture(scope="module")
def fresh_state():
    return normal.NNET().state_dict()


@pytest.fixture(scope="module")
def weights(fresh_state):
    return synthetic_weights(fresh_state)


@pytest.fixture(scope="module")
def generator():
    return normal.Generator("normal")


@pytest.fixture(scope="module")
def model(weights, generator, tmp_path_factory):
    """Loaded from the official file format: the state dict under 'model', every key prefixed 'module.' (DDP)."""
    path = tmp_path_factory.mktemp("normal") / "scannet.pt"
    torch.save({"model": {f"module.{k}": v for k, v in weights.items()}, "iter": 1}, path)
    loaded = generator.load(path)
    path.unlink()  # 290 MB
    return loaded


def test_keys_and_shapes_are_the_official_files(layout, fresh_state):
    assert {k: list(v.shape) for k, v in fresh_state.items()} == layout
    assert list(fresh_state) == list(layout)  # same order too: no classifier, nothing extra


@torch.no_grad()
def test_outputs_match_the_official_network(model, generator):
    ref = load_file(FIXTURES / "experts" / "parity_normal.safetensors")
    outs = model(ref["input"])
    for name, out in zip(OUTPUTS, outs):
        want = ref[f"output.{name}"]
        assert out.shape == want.shape, name
        assert ((out - want).norm() / want.norm()).item() < 1e-5, name
    (normal_3HW,) = generator.predict(model, ref["input"])
    assert torch.allclose(normal_3HW, ref["output.out_res1"][0, :3], atol=1e-5)


@torch.no_grad()
def test_chunked_batches_give_the_official_outputs(model, monkeypatch):
    """The refiners run image by image over MLP_CHUNK pixels, maps resized INTERP_CHUNK channels at a
    time: uneven chunks in a batch of two still give the official network's outputs."""
    monkeypatch.setattr(normal, "MLP_CHUNK", 1000)
    monkeypatch.setattr(normal, "INTERP_CHUNK", 7)
    ref = load_file(FIXTURES / "experts" / "parity_normal.safetensors")
    x = ref["input"]
    outs = model(torch.cat([x.flip(3), x]))
    for name, out in zip(OUTPUTS, outs):
        want = ref[f"output.{name}"]
        assert ((out[1:] - want).norm() / want.norm()).item() < 1e-5, name


def test_a_file_without_the_prefix_loads_the_same(model, weights, generator, tmp_path):
    path = tmp_path / "scannet.pt"
    torch.save({"model": weights}, path)
    state = generator.load(path).state_dict()
    path.unlink()
    reference = model.state_dict()
    assert list(state) == list(reference)
    assert all(torch.equal(state[k], reference[k]) for k in state)


def test_a_file_with_a_classifier_is_refused(weights, generator, tmp_path):
    """Strict: the official encoder has no classifier (timm's would add classifier.weight/bias)."""
    path = tmp_path / "scannet.pt"
    extra = {"encoder.original_model.classifier.weight": torch.zeros(1000, 2048)}
    torch.save({"model": {f"module.{k}": v for k, v in {**weights, **extra}.items()}}, path)
    with pytest.raises(CheckpointError, match="1 unexpected keys: encoder.original_model.classifier.weight"):
        generator.load(path)
    path.unlink()


def test_preprocessing_is_imagenet_normalised_rgb_at_480(generator):
    image = Image.fromarray(np.full((60, 90, 3), (255, 0, 128), np.uint8))
    x = generator.preprocess(image)
    assert x.shape == (3, 480, 480)
    want_rgb = torch.tensor([(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225])
    assert torch.allclose(x, want_rgb.view(3, 1, 1).expand(3, 480, 480), atol=1e-6)


def test_preprocessing_resizes_bilinearly(generator):
    """A 2 x 1 image [black, white] stretched to 480 wide: PIL's bilinear filter puts output column
    x at input coordinate (x + 0.5) * 2 / 480 - 0.5, clamped: 0 up to column 119, then a linear ramp,
    255 from column 360 (nearest would jump from 0 to 255 at 240; bicubic gives ~40 at 180, not 64)."""
    image = Image.fromarray(np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8))
    red = generator.preprocess(image)[0, 0] * 0.229 + 0.485  # back to [0, 1]
    got = (red * 255).round()
    for col, want in {0: 0, 119: 0, 180: 64.3, 239: 126.9, 240: 128.1, 300: 191.8, 360: 255, 479: 255}.items():
        assert abs(got[col].item() - want) <= 1, col
    assert torch.equal(red, generator.preprocess(image)[0, -1] * 0.229 + 0.485)  # every row the same


def test_label_is_the_official_formula_worked_by_hand(generator):
    """NOTES.md: ((n + 1) / 2) clipped to [0, 1], resized bilinearly with align_corners=True, x255, truncated."""
    n = torch.tensor(
        [
            [[-1.0, 1.0], [-1.0, 1.0]],
            [[-3.0, 0.5], [1.0, 2.0]],  # clipped to 0 and 1: -3 -> 0, 2 -> 1 (unclipped they would wrap in uint8)
            [[0.0, 0.0], [0.0, 0.0]],
        ]
    )
    # 2 x 2 -> 3 x 3 with align_corners=True: corners kept, edge midpoints the mean of two, the centre of four.
    # R: rows [0, 0.5, 1] x 255 = [0, 127.5, 255] -> truncated [0, 127, 255] (rounding would give 128)
    # G: [0, .75; 1, 1] -> rows [0, .375, .75], [.5, .6875, .875], [1, 1, 1]
    #    x 255 = [0, 95.625, 191.25], [127.5, 175.3125, 223.125], [255, 255, 255]
    # B: 0.5 x 255 = 127.5 -> 127
    red = [[0, 127, 255]] * 3
    green = [[0, 95, 191], [127, 175, 223], [255, 255, 255]]
    blue = [[127] * 3] * 3
    label = generator.to_label(n, (3, 3))
    assert label.mode == "RGB" and label.size == (3, 3)
    assert np.array_equal(np.asarray(label), np.stack([red, green, blue], axis=-1).astype(np.uint8))


def test_label_size_is_width_height_with_corners_aligned(generator):
    """2 x 2 -> W 4, H 2. Along x the R ramp 0 -> 0.75 (n = -1 -> 0.5) sampled at 0, 1/3, 2/3, 1 (corners
    aligned): 0, 0.25, 0.5, 0.75 -> x255 = 0, 63.75, 127.5, 191.25 -> 0, 63, 127, 191. (Half-pixel
    centres would sample at -0.25, 0.25, 0.75, 1.25 -> 0, 0.1875, 0.5625, 0.75 -> 0, 47, 143, 191.)"""
    n = torch.zeros(3, 2, 2)
    n[0] = torch.tensor([[-1.0, 0.5], [-1.0, 0.5]])
    a = np.asarray(generator.to_label(n, (4, 2)))
    assert a.shape == (2, 4, 3)
    assert np.array_equal(a[..., 0], [[0, 63, 127, 191]] * 2)
    assert (a[..., 1:] == 127).all()


@torch.no_grad()
def test_a_640x480_photo_gives_a_640x480_rgb_label(model, generator):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    x = generator.preprocess(image)
    assert x.shape == (3, 480, 480)
    (raw,) = generator.predict(model, x[None])
    assert raw.shape == (3, 480, 480)
    assert torch.allclose(raw.norm(dim=0), torch.ones(480, 480), atol=1e-5)  # unit normals
    label = generator.to_label(raw, image.size)
    assert label.mode == "RGB" and label.size == (640, 480)
