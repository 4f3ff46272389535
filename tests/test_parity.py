"""Our model computes what the official Prismer computes (tests/fixtures/parity)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from model import PrismerCaption
from tests.conftest import FIXTURES, synthetic_weights

# The official decoder ties each of these to its source: the name's own draw is
# discarded (its index still counts in the rule) and it holds the source's value.
TIED = {
    "text_decoder.lm_head.decoder.weight": "text_decoder.roberta.embeddings.word_embeddings.weight",
    "text_decoder.lm_head.decoder.bias": "text_decoder.lm_head.bias",
}


def official_weights(model) -> dict:
    """The weights the official model ran with: the rule, its ties, and every
    instance-embedding row equal (so the row drawn per instance cannot matter)."""
    weights = synthetic_weights(model.state_dict())
    for name, source in TIED.items():
        weights[name] = weights[source]
    if (key := "expert_encoder.instance_embedding") in weights:
        weights[key] = weights[key][:1].expand_as(weights[key])
    return weights


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(params=["prismer_tiny", "prismerz_tiny"])
def case(request):
    spec = json.loads((FIXTURES / "parity" / "spec.json").read_text())
    tensors = load_file(FIXTURES / "parity" / f"{request.param}.safetensors")
    experts = spec["cases"][request.param]["experts"]
    size = {"vision": {k: spec["vision"][k] for k in ("width", "layers", "patch_size")}, "roberta": spec["roberta"]}
    model = PrismerCaption(
        {
            "prismer_model": size,
            "experts": experts,
            "image_resolution": spec["vision"]["image_resolution"],
            "pretrained": False,
        }
    ).eval()
    keys = spec["cases"][request.param]["keys"]
    assert set(model.state_dict()) == set(keys), "state_dict keys differ from the official model's"
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == keys
    model.load_state_dict(official_weights(model))
    inputs = {k.removeprefix("input."): v for k, v in tensors.items() if k.startswith("input.")}
    experts_in = {"rgb": inputs["rgb"]}
    for e in experts:
        experts_in[e] = (
            {"label": inputs["obj_detection.label"], "instance": inputs["obj_detection.instance"]}
            if e == "obj_detection"
            else inputs[e]
        )
    return (
        model,
        experts_in,
        inputs,
        {k.removeprefix("output."): v for k, v in tensors.items() if k.startswith("output.")},
    )


@torch.no_grad()
def test_encoder_logits_and_loss_match_official(case):
    model, experts, inputs, out = case
    hidden = model.expert_encoder(experts)
    assert hidden.shape == out["encoder_hidden_states"].shape
    assert rel(hidden, out["encoder_hidden_states"]) < 1e-4
    dec = model.text_decoder(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        encoder_hidden_states=hidden,
        labels=inputs["labels"],
    )
    assert rel(dec.logits, out["logits"]) < 1e-4
    assert rel(dec.loss, out["loss_per_sample"]) < 1e-4


@pytest.mark.parametrize("use_cache", [False, True])
@pytest.mark.parametrize("mode,beams", [("greedy", 1), ("beam3", 3)])
@torch.no_grad()
def test_generation_matches_official_token_for_token(case, use_cache, mode, beams):
    model, experts, inputs, out = case
    prompt = inputs["input_ids"][:, :2]
    ids = model.text_decoder.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        encoder_hidden_states=model.expert_encoder(experts),
        num_beams=beams,
        max_length=20,
        min_length=8,
        do_sample=False,
        use_cache=use_cache,
    )
    assert torch.equal(ids, out[f"generate_{mode}"])
