"""The depth expert (DPT-Hybrid) computes what the official network computes (tests/fixtures/experts),
reads the official and the Hugging Face weight formats, and makes labels as the official script does."""

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from torch import nn
from transformers import DPTConfig, DPTForDepthEstimation

from common.files import CheckpointError
from common.hub import DownloadError
from experts import depth
from tests.conftest import FIXTURES, synthetic_weights

# Float32 rounding alone moves this network's output by ~3e-5 (relative) with these
# weights: this code in float32 vs float64 differs by 3.3e-5, the reference vs this code
# in float64 by 2.5e-5. Slips this still catches: LayerNorm eps 1e-5 (5e-4), StdConv
# eps 1e-6 (9e-4), position embedding resized with align_corners=True (6e-4), a tapped
# block off by one (0.45).
TOL = 1e-4
TINY = depth.DPTSizes(
    stem=16,
    stages=(1, 1, 1),
    stage_channels=(32, 64, 64),
    groups=4,
    dim=32,
    depth=3,
    heads=2,
    mlp=64,
    grid=4,
    taps=(1, 2),
    features=16,
)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


@pytest.fixture(scope="module")
def layout() -> dict:
    return json.loads((FIXTURES / "experts" / "layout_depth.json").read_text())


@pytest.fixture(scope="module")
def reference() -> dict:
    return load_file(FIXTURES / "experts" / "parity_depth.safetensors")


@pytest.fixture(scope="module")
def official_weights(layout) -> dict:
    """The reference's weights, made from the official layout alone (not from the module)."""
    return synthetic_weights({k: torch.empty(shape) for k, shape in layout.items()})


def hf_weights(official: dict, hf_keys) -> dict:
    """The official tensors under transformers' names (a block's qkv cut into query, key, value)."""
    out = {}
    for key in hf_keys:
        value = official[depth.official_key(key)]
        part = [i for i, name in enumerate(depth.QKV) if f".attention.attention.{name}." in key]
        out[key] = value.chunk(3)[part[0]].clone() if part else value
    return out


def test_keys_and_shapes_are_the_official_files(layout):
    with torch.device("meta"):
        state = depth.DPTHybrid().state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == layout


@torch.no_grad()
def test_official_file_gives_the_official_outputs(tmp_path, official_weights, reference):
    path = tmp_path / "dpt_hybrid-midas-501f0c75.pt"
    torch.save(official_weights, path)  # the released format: a flat state_dict
    out = depth.Generator("depth").load(path)(reference["input"])
    assert out.shape == reference["output.depth"].shape
    assert relative_error(out, reference["output.depth"]) < TOL


def test_official_loader_takes_exactly_the_official_keys(tmp_path, official_weights):
    state = dict(official_weights)
    del state["pretrained.model.head.weight"]  # unused by the output, but part of the file
    state["scratch.refinenet5.out_conv.bias"] = torch.zeros(256)
    state["pretrained.model.pos_embed"] = torch.zeros(1, 901, 768)
    path = tmp_path / "trained.pt"
    torch.save({"model": state, "optimizer": {}}, path)  # a training checkpoint: weights under 'model'
    with pytest.raises(CheckpointError) as error:
        depth.load_official(path)
    for name in ("missing keys: pretrained.model.head.weight", "unexpected keys: scratch.refinenet5", "pos_embed"):
        assert name in str(error.value)


def test_hf_names_cover_the_official_layout(layout):
    with torch.device("meta"):
        hf = DPTForDepthEstimation(depth.hf_config(depth.DPTSizes()))
    renamed = depth.hf_to_official(hf.state_dict(), "hf")
    assert {k: list(v.shape) for k, v in renamed.items()} == {
        k: shape for k, shape in layout.items() if k not in depth.HF_MISSING
    }
    with pytest.raises(CheckpointError, match="dpt.pooler.dense.weight"):
        depth.hf_to_official({**hf.state_dict(), "dpt.pooler.dense.weight": torch.zeros(1)}, "hf")


def test_hf_configs_of_other_dpt_networks_are_refused():
    with pytest.raises(CheckpointError, match="not a DPT-Hybrid config"):
        depth.config_from_hf(DPTConfig(), "dpt-large")  # the ViT-only DPT
    ade = depth.hf_config(depth.DPTSizes())
    ade.use_batch_norm_in_fusion_residual = True  # as the segmentation DPT-Hybrid's
    with pytest.raises(CheckpointError, match="use_batch_norm_in_fusion_residual=True"):
        depth.config_from_hf(ade, "dpt-hybrid-ade")
    assert depth.config_from_hf(depth.hf_config(TINY), "tiny") == TINY


@torch.no_grad()
def test_hf_folder_computes_what_transformers_computes(tmp_path):
    """Transformers' own DPT-Hybrid runs at its config's size only; at that size the
    same weights read through the rename table give the same depth."""
    hf = DPTForDepthEstimation(depth.hf_config(TINY)).eval()
    hf.load_state_dict(synthetic_weights(hf.state_dict()))
    hf.save_pretrained(tmp_path)
    x = torch.rand((2, 3, 64, 64), generator=torch.Generator().manual_seed(0)) * 2 - 1
    want = hf(pixel_values=x).predicted_depth
    assert relative_error(depth.Generator("depth").load(tmp_path)(x), want) < 1e-5


@torch.no_grad()
def test_hf_folder_of_the_official_weights_gives_the_official_outputs(tmp_path, official_weights, reference):
    with torch.device("meta"):
        hf = DPTForDepthEstimation(depth.hf_config(depth.DPTSizes()))
    hf.load_state_dict(hf_weights(official_weights, hf.state_dict()), strict=True, assign=True)
    hf.config.layer_norm_eps = 1e-12  # as Intel/dpt-hybrid-midas says; the official network's 1e-6 is kept
    hf.save_pretrained(tmp_path)
    model = depth.Generator("depth").load(tmp_path)
    assert {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)} == {1e-6}
    assert relative_error(model(reference["input"]), reference["output.depth"]) < TOL


def test_hub_id_fails_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))  # nothing cached
    start = time.monotonic()
    with pytest.raises(DownloadError, match="Intel/dpt-hybrid-midas"):
        depth.Generator("depth").load(depth.HF_ID)
    assert time.monotonic() - start < 10
    with pytest.raises(FileNotFoundError):
        depth.Generator("depth").load(tmp_path / "dpt_hybrid-midas-501f0c75.pt")


def test_preprocessing_is_a_480_resize_then_2x_minus_1():
    generator = depth.Generator("depth")
    x = generator.preprocess(Image.fromarray(np.full((37, 91, 3), (255, 0, 128), np.uint8)))
    assert x.shape == (3, 480, 480)
    want = torch.tensor([1.0, -1.0, 2 * 128 / 255 - 1]).view(3, 1, 1).expand(3, 480, 480)
    assert torch.allclose(x, want, atol=1e-6)
    rgb = np.random.default_rng(0).integers(0, 256, (480, 480, 3), dtype=np.uint8)
    x = generator.preprocess(Image.fromarray(rgb))  # already 480 x 480: nothing resampled
    assert torch.allclose(x, torch.from_numpy(rgb).permute(2, 0, 1) / 127.5 - 1, atol=1e-6)


def test_label_is_the_official_formula_worked_by_hand():
    generator = depth.Generator("depth")
    raw = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    # min-max: 0, 1/4, 1/2, 1; x255: 0, 63.75, 127.5, 255; truncated (rounded would be 64, 128):
    label = generator.to_label(raw, (2, 2))
    assert label.mode == "L" and np.array_equal(np.asarray(label), [[0, 63], [127, 255]])
    # To (W, H) = (5, 2), bilinear with align_corners=True (columns 0, 1/4, 1/2, 3/4, 1 of the way;
    # align_corners=False would sample 0, 0.1, 0.5, 0.9, 1): top 0, 1/16, 1/8, 3/16, 1/4 of 255,
    # bottom 1/2, 5/8, 3/4, 7/8, 1 of 255; truncated. From float16, as autocast hands it over.
    label = generator.to_label(raw.half(), (5, 2))
    assert label.size == (5, 2)
    assert np.array_equal(np.asarray(label), [[0, 15, 31, 47, 63], [127, 159, 191, 223, 255]])


def test_constant_map_gives_a_black_label_not_nan():
    """The official formula divides by zero here; Pillow writes its NaN as 0."""
    label = depth.Generator("depth").to_label(torch.full((4, 6), 3.0), (7, 5))
    assert label.size == (7, 5) and not np.asarray(label).any()


@torch.no_grad()
def test_tiny_network_labels_a_real_image_at_its_original_size(tmp_path):
    image = Image.new("RGB", (101, 67), (40, 90, 160))
    ImageDraw.Draw(image).ellipse((20, 10, 70, 60), fill=(230, 200, 20))
    image.save(tmp_path / "odd.jpg")
    generator = depth.Generator("depth")
    model = depth.DPTHybrid(TINY).eval()
    model.load_state_dict(synthetic_weights(model.state_dict()))
    x = torch.stack([generator.preprocess(Image.open(tmp_path / "odd.jpg"))] * 2)
    raws = generator.predict(model, x)
    assert len(raws) == 2 and raws[0].shape == (480, 480)
    label = generator.to_label(raws[0], image.size)
    assert label.mode == "L" and label.size == (101, 67)
    assert np.asarray(label).std() > 0
