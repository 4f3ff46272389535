"""Full-size models have exactly the official checkpoint layout (built on the meta device)."""

import json

import pytest
import torch

from model import PrismerCaption
from model.convert import official_config
from tests.conftest import FIXTURES


@pytest.fixture(scope="module")
def layout():
    return json.loads((FIXTURES / "parity" / "official_layout.json").read_text())


def build_meta(name: str, freeze: str = "none"):
    cfg = official_config(f"pretrain_{name}") | {"freeze": freeze}
    with torch.device("meta"):
        return PrismerCaption(cfg)


@pytest.mark.parametrize("name", ["prismer_base", "prismerz_base", "prismer_large", "prismerz_large"])
def test_state_dict_equals_official_layout(layout, name):
    model = build_meta(name)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    official = layout[name]["state_dict"]
    assert sorted(set(official) - set(ours)) == []
    assert sorted(set(ours) - set(official)) == []
    assert ours == official
    assert sum(p.numel() for p in model.parameters()) == layout[name]["total_params"]


@pytest.mark.parametrize("name", ["prismer_base", "prismerz_base", "prismer_large", "prismerz_large"])
def test_trainable_params_under_freeze_lang_vision(layout, name):
    model = build_meta(name, "freeze_lang_vision")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == layout[name]["trainable_params_freeze_lang_vision"]


def test_huge_size_builds_with_wider_vision_than_text():
    with torch.device("meta"):
        model = PrismerCaption(
            {"prismer_model": "prismer_huge", "experts": ["depth"], "image_resolution": 224, "pretrained": False}
        )
    assert model.expert_encoder.positional_embedding.shape == (256, 1280)
    cross_key = model.text_decoder.roberta.encoder.layer[0][1].self.key
    assert (cross_key.in_features, cross_key.out_features) == (1280, 1024)
