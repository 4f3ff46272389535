import math
import os
from pathlib import Path

import pytest
import torch
import yaml

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# pytest-xdist runs the files in parallel workers (pyproject addopts): the cores are
# shared out among them, in this process and the processes a test launches, since
# more compute threads than cores make every worker many times slower.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    THREADS = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    torch.set_num_threads(THREADS)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A skipped test fails the run, unless it is marked gpu: data or a tool gone
    missing must not pass for green."""
    return fail_if_skipped((yield), allowed=item.get_closest_marker("gpu") is not None)


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """A module that skips itself (e.g. pytest.importorskip) fails the run too."""
    return fail_if_skipped((yield), allowed=False)


def fail_if_skipped(report, allowed: bool):
    if report.skipped and not allowed and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"only tests marked gpu may skip ({report.longrepr[-1]})"
    return report


def synthetic_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights the reference outputs in fixtures/ were computed with, regenerated
    (not stored) by the rule in fixtures/README.md: one generator per key, seeded by
    its index among all keys in sorted order; integer buffers count and stay as they are."""
    out = {}
    for i, key in enumerate(sorted(state_dict)):
        t, shape = state_dict[key], tuple(state_dict[key].shape)
        g = torch.Generator().manual_seed(1000 + i)
        if not t.is_floating_point():
            out[key] = t
        elif key.endswith("running_var"):
            out[key] = 1 + 0.5 * torch.rand(shape, generator=g)
        elif key.endswith("running_mean"):
            out[key] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            out[key] = (1 if key.endswith("weight") else 0) + 0.1 * torch.randn(shape, generator=g)
        else:
            out[key] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    return out


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
    """An inline model size (the form of fixtures/parity/spec.json)."""
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
    from common.modalities import EXPERTS

    g = torch.Generator().manual_seed(seed)
    out = {"rgb": torch.randn(batch, 3, image_resolution, image_resolution, generator=g)}
    for name in experts:
        e = EXPERTS[name]
        x = torch.randn(batch, e.channels, label_resolution, label_resolution, generator=g)
        if e.kind.instances:
            inst = torch.randint(0, 4, (batch, 1, label_resolution, label_resolution), generator=g)
            x = {"label": x, "instance": inst.masked_fill(inst == 3, 255)}
        out[name] = x
    return out


@pytest.fixture(scope="module")
def tok_dir(tokenizer, tmp_path_factory):
    """The test tokenizer saved where a launched process can load it."""
    path = tmp_path_factory.mktemp("tok")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dist_recipe(tmp_path_factory, tokenizer, tok_dir):
    """(recipe file, output folder) of a tiny Prismer on 16 images without dropout, so
    that one process and two see exactly the same function of the same global batch."""
    from tests.dataset_builders import coco_world
    from tests.launch import EXPERTS, GLOBAL_BATCH
    from tests.test_train import write_caption_gt

    root = tmp_path_factory.mktemp("dist")
    cfg = coco_world(root / "world", n=16, experts=EXPERTS)
    size = tiny_size(len(tokenizer))
    size["roberta"] |= {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    cfg |= {
        "prismer_model": size,
        "tokenizer": str(tok_dir),
        "pretrained": False,
        "freeze": "freeze_vision",
        "batch_size_train": GLOBAL_BATCH,
        "batch_size_test": 2,
        "num_workers": 0,
        "max_epoch": 3,
        "output_dir": str(root / "out"),
        "tracker": "tensorboard",
        "log_every_steps": 1,
        "eval_every_epochs": 0,  # only after the last epoch, which writes `best/`
        "init_lr": 1e-3,
        "max_length": 8,
        "min_length": 2,
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    write_caption_gt((path, root / "out"))  # scored evaluation: `best/` is written
    return path, root / "out"
