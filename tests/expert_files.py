"""Weight files in each expert's official format, with the synthetic weights of
tests/fixtures (regenerated, never stored), built from the official layouts alone:
what a user downloads, for the end-to-end tests and benchmarks/experts.py."""

from __future__ import annotations

import json
import pickle
import string
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


CHARSET = [c for c in string.printable if c.strip()]


def write_tiny_clip(folder: Path) -> dict[str, int]:
    """A tiny CLIP (text + vision, as the hub folder holds) saved in `folder`, with a
    character-level BPE tokenizer: each character a token, the last one of a word with
    `</w>`; end-of-text is the highest id. Returns the vocabulary."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig

    vocab = {c: i for i, c in enumerate(CHARSET)}
    vocab |= {c + "</w>": len(CHARSET) + i for i, c in enumerate(CHARSET)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    text = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=768,
        bos_token_id=vocab["<|startoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        eos_token_id=2,  # as openai/clip-vit-large-patch14's config: end-of-text found by argmax of the ids
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16
    )
    torch.manual_seed(0)
    CLIPModel(
        CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=768)
    ).save_pretrained(folder)
    return vocab
