from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A file under ../shared/, or skip the test saying what is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference data {path} is absent (../shared/ beside the checkout holds it)")
    return path


CORPUS = [
    "a red cube on the floor next to a wall",
    "two blue spheres and a green cone",
    "a picture of a small yellow cylinder behind a large red cube",
    "what colour is the cube?",
    "how many spheres are there?",
    "is the cone closer than the sphere?",
    "yes",
    "no",
    "three",
    "the sign says stop",
]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A real RoBERTa-style byte-level BPE, trained here (no download)."""
    from model.tokenizer import train_tokenizer

    return train_tokenizer(CORPUS * 5, 400, tmp_path_factory.mktemp("tokenizer"))


def tiny_size(vocab_size: int = 400, width: int = 64, layers: int = 2) -> dict:
    """An inline model size (the form of ../shared/parity/spec.json)."""
    return {
        "vision": {"width": width, "layers": layers, "patch_size": 16},
        "roberta": {
            "hidden_size": width,
            "vision_hidden_size": width,
            "intermediate_size": 2 * width,
            "num_attention_heads": 4,
            "num_hidden_layers": layers,
            "max_position_embeddings": 66,
            "vocab_size": vocab_size,
            "pad_token_id": 1,
            "bos_token_id": 0,
            "eos_token_id": 2,
            "type_vocab_size": 1,
            "is_decoder": True,
        },
    }


def random_experts(experts, batch: int, image_resolution: int, label_resolution: int = 64, seed: int = 0) -> dict:
    """Model inputs in the form the datasets hand over."""
    import torch

    from common.modalities import EXPERTS

    g = torch.Generator().manual_seed(seed)
    out = {"rgb": torch.randn(batch, 3, image_resolution, image_resolution, generator=g)}
    for name in experts:
        e = EXPERTS[name]
        x = torch.randn(batch, e.channels, label_resolution, label_resolution, generator=g)
        if e.kind == "instance":
            inst = torch.randint(0, 4, (batch, 1, label_resolution, label_resolution), generator=g)
            x = {"label": x, "instance": inst.masked_fill(inst == 3, 255)}
        out[name] = x
    return out
