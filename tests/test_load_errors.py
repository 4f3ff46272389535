"""Every loader of weights or state refuses a bad file with one line that names it
and says what was expected, never advising `weights_only=False`, never running a pickle's code."""

import io
import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from common.files import CheckpointError
from common.label_space import SPACES
from common.weights import read_state_dict
from dataset import SampleError, load_label_spaces, read_ocr_record
from experts import edge
from helpers import checkpoint
from model import PrismerCaption, convert
from model.tokenizer import load_tokenizer
from tests.conftest import tiny_size

TORCH_GARBAGE = ["random", "empty", "truncated_torch", "evil_pickle", "evil_torch"]
SAFETENSORS_GARBAGE = ["random", "empty", "truncated_safetensors"]
JSON_GARBAGE = ["random", "empty", "not_json", "json_list"]


class Evil:
    """Unpickling it would write the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pickle ran')",))


def write_garbage(path, kind):
    """A file of `kind` at `path`; returns the marker that only running its code would create."""
    marker = path.parent / f"{path.name}.ran"
    if kind == "random":
        data = os.urandom(4096)
    elif kind == "empty":
        data = b""
    elif kind == "truncated_torch":
        buf = io.BytesIO()
        torch.save({"w": torch.ones(1000)}, buf)
        data = buf.getvalue()[:2000]
    elif kind == "truncated_safetensors":
        buf_path = path.with_name(path.name + ".full")
        save_file({"w": torch.ones(1000)}, buf_path)
        data = buf_path.read_bytes()[:-100]
    elif kind == "evil_pickle":
        data = pickle.dumps({"w": Evil(marker)}, protocol=2)
    elif kind == "evil_torch":
        buf = io.BytesIO()
        torch.save({"w": Evil(marker)}, buf)
        data = buf.getvalue()
    elif kind == "not_json":
        data = b'{"prismer_model": "prismer_base",,'
    elif kind == "json_list":
        data = b"[1, 2, 3]"
    else:
        raise AssertionError(kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return marker


def check_message(err, path, marker=None):
    message = str(err.value)
    assert str(path) in message, message
    assert "\n" not in message, message
    assert "weights_only" not in message, message
    assert marker is None or not marker.exists(), "the pickle's code ran"


# ---------------------------------------------------------------- model weights


@pytest.mark.parametrize("kind", TORCH_GARBAGE)
def test_official_checkpoint(tmp_path, kind):
    path = tmp_path / "pytorch_model.bin"
    marker = write_garbage(path, kind)
    with pytest.raises(CheckpointError, match="expected|not a weights-only torch checkpoint") as err:
        read_state_dict(path)
    check_message(err, path, marker)


@pytest.mark.parametrize("kind", SAFETENSORS_GARBAGE)
def test_safetensors_weights(tmp_path, kind):
    path = tmp_path / "model.safetensors"
    write_garbage(path, kind)
    with pytest.raises(CheckpointError, match="not a safetensors file") as err:
        read_state_dict(tmp_path)
    check_message(err, path)


def test_official_checkpoint_of_something_else(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save([torch.ones(2)], path)
    with pytest.raises(CheckpointError, match="holds a list, expected a state dict of tensors") as err:
        read_state_dict(path)
    check_message(err, path)
    torch.save({"w": torch.ones(2), "step": [1, 2]}, path)
    with pytest.raises(CheckpointError, match="'step' is not a tensor, expected a state dict of tensors") as err:
        read_state_dict(path)
    check_message(err, path)
    torch.save({"some.weight": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="expected a Prismer checkpoint") as err:
        PrismerCaption.from_official("caption_prismerz_base", path=path)
    check_message(err, path)


def tiny_model(tokenizer, **kw):
    cfg = {"prismer_model": tiny_size(len(tokenizer)), "image_resolution": 64, "pretrained": False}
    return PrismerCaption(cfg | kw, tokenizer=tokenizer)


@pytest.mark.parametrize("kind", ["random", "evil_torch"])
def test_clip_and_roberta_weights(tokenizer, tmp_path, kind):
    model = tiny_model(tokenizer)
    path = tmp_path / "pytorch_model.bin"
    marker = write_garbage(path, kind)
    with pytest.raises(CheckpointError) as err:
        convert.load_clip(model.expert_encoder, str(path))
    check_message(err, path, marker)
    with pytest.raises(CheckpointError) as err:
        convert.load_roberta(model.text_decoder, str(tmp_path))  # a folder: the error names the file in it
    check_message(err, path, marker)


def test_weights_of_another_model_name_the_file_and_keys(tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    path = tmp_path / "pytorch_model.bin"
    torch.save({"encoder.layers.0.weight": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="unknown RoBERTa key 'encoder.layers.0.weight'") as err:
        convert.load_roberta(model.text_decoder, str(path))
    check_message(err, path)
    torch.save({"visual.conv1.weight": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="does not fit the model: .*missing keys") as err:
        model.load_official(path)
    check_message(err, path)


# ------------------------------------------------------- our own model folders


@pytest.fixture
def saved(tokenizer, tmp_path):
    folder = tmp_path / "saved"
    tiny_model(tokenizer).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", SAFETENSORS_GARBAGE)
def test_from_pretrained_weights(tokenizer, saved, kind):
    path = saved / "model.safetensors"
    write_garbage(path, kind)
    with pytest.raises(CheckpointError, match="not a safetensors file") as err:
        PrismerCaption.from_pretrained(saved, tokenizer=tokenizer)
    check_message(err, path)


@pytest.mark.parametrize("kind", JSON_GARBAGE)
def test_from_pretrained_config_that_is_not_a_json_object(tokenizer, saved, kind):
    path = saved / "config.json"
    write_garbage(path, kind)
    with pytest.raises(CheckpointError, match="expected a model config") as err:
        PrismerCaption.from_pretrained(saved, tokenizer=tokenizer)
    check_message(err, path)


def test_from_pretrained_config_without_its_keys(tokenizer, saved):
    path = saved / "config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in cfg.items() if k != "prismer_model"}))
    with pytest.raises(CheckpointError, match="prismer_model") as err:
        PrismerCaption.from_pretrained(saved, tokenizer=tokenizer)
    check_message(err, path)
    path.write_text(json.dumps(cfg | {"colour": "blue"}))
    with pytest.raises(CheckpointError, match="colour") as err:
        PrismerCaption.from_pretrained(saved, tokenizer=tokenizer)
    check_message(err, path)


# ------------------------------------------------------------ training state


@pytest.fixture
def training_state(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(nn.Linear(3, 2), torch.optim.AdamW(nn.Linear(3, 2).parameters()))
    progress = {"epoch": 1, "batch": 2, "step": 3, "best": None, "skipped_nan": 0}
    path = checkpoint.save(accelerator, tmp_path / "checkpoints", progress, keep_last=1)
    assert checkpoint.load(accelerator, path) == progress
    return accelerator, path, model, optimizer


@pytest.mark.parametrize(
    "name,kind",
    [("model.safetensors", k) for k in SAFETENSORS_GARBAGE] + [("optimizer.bin", k) for k in TORCH_GARBAGE],
)
def test_training_state_accelerate_files(training_state, name, kind):
    accelerator, path, _, _ = training_state
    marker = write_garbage(path / name, kind)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(accelerator, path)
    check_message(err, path / name, marker)


def test_training_state_of_another_model(training_state):
    accelerator, path, _, _ = training_state
    save_file({"weight": torch.ones(5, 3), "bias": torch.ones(5)}, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="training state does not fit this run .*size mismatch") as err:
        checkpoint.load(accelerator, path)
    check_message(err, path)


@pytest.mark.parametrize("kind", JSON_GARBAGE)
def test_training_progress(training_state, kind):
    accelerator, path, _, _ = training_state
    write_garbage(path / checkpoint.PROGRESS, kind)
    with pytest.raises(CheckpointError, match="expected training progress with epoch, batch, step") as err:
        checkpoint.load(accelerator, path)
    check_message(err, path / checkpoint.PROGRESS)


def test_training_progress_without_its_position(training_state):
    accelerator, path, _, _ = training_state
    (path / checkpoint.PROGRESS).write_text(json.dumps({"epoch": 1, "step": "3"}))
    with pytest.raises(CheckpointError, match="batch, step missing or not integers") as err:
        checkpoint.load(accelerator, path)
    check_message(err, path / checkpoint.PROGRESS)


@pytest.mark.parametrize(
    "name,kind",
    [(checkpoint.SHARDED_MODEL, k) for k in SAFETENSORS_GARBAGE]
    + [(checkpoint.SHARDED_OPTIM, k) for k in TORCH_GARBAGE],
)
def test_training_state_of_sharded_runs(training_state, monkeypatch, name, kind):
    accelerator, path, model, optimizer = training_state
    # Gathered files of a sharded run; applying them needs a process group, which is not under test here.
    save_file({"weight": torch.ones(2, 3)}, path / checkpoint.SHARDED_MODEL)
    torch.save({"state": {}, "param_groups": []}, path / checkpoint.SHARDED_OPTIM)
    monkeypatch.setattr(checkpoint.distributed, "load_full_state_dict", lambda model, state: None)
    marker = write_garbage(path / name, kind)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(accelerator, path, model, optimizer)
    check_message(err, path / name, marker)


# ------------------------------------------------------------------ tokenizer


@pytest.mark.parametrize(
    "name,kind,drop",
    [
        ("tokenizer.json", "random", None),
        ("tokenizer.json", "json_list", None),
        ("vocab.json", "not_json", "tokenizer.json"),
        ("merges.txt", "random", "tokenizer.json"),
        ("tokenizer_config.json", "empty", None),
    ],
)
def test_tokenizer_files(tokenizer, tmp_path, name, kind, drop):
    shutil.copytree(tokenizer.name_or_path, tmp_path, dirs_exist_ok=True)  # vocab.json and merges.txt too
    if drop:
        (tmp_path / drop).unlink()
    write_garbage(tmp_path / name, kind)
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(str(tmp_path))
    check_message(err, tmp_path / name)


def test_tokenizer_folder_without_its_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json, nor vocab.json and merges.txt"):
        load_tokenizer(str(tmp_path))


# --------------------------------------------------------------- label spaces


@pytest.mark.parametrize("kind", SAFETENSORS_GARBAGE)
def test_label_space_safetensors(tmp_path, kind):
    path = tmp_path / "label_features.safetensors"
    write_garbage(path, kind)
    with pytest.raises(CheckpointError, match="not a safetensors file") as err:
        load_label_spaces(tmp_path)
    check_message(err, path)


@pytest.mark.parametrize("kind", TORCH_GARBAGE)
def test_official_label_space_files(tmp_path, kind):
    for space in SPACES:
        torch.save({"features": torch.zeros(3, 64)}, tmp_path / f"{space}_features.pt")
    torch.save(torch.zeros(64), tmp_path / "background_features.pt")
    path = tmp_path / "ade_features.pt"
    marker = write_garbage(path, kind)
    with pytest.raises(CheckpointError, match="not an official label-space file of tensors") as err:
        load_label_spaces(tmp_path)
    check_message(err, path, marker)


def test_label_space_tensors_of_the_wrong_form(tmp_path):
    path = tmp_path / "label_features.safetensors"
    features = {f"{s}.features": torch.zeros(3, 64) for s in SPACES}
    save_file(features, path)
    with pytest.raises(CheckpointError, match="lacks background.features") as err:
        load_label_spaces(path)
    check_message(err, path)
    save_file(features | {"coco.features": torch.zeros(3, 32), "background.features": torch.zeros(64)}, path)
    with pytest.raises(CheckpointError, match=r"coco features are of shape \(3, 32\), expected \(classes, 64\)") as err:
        load_label_spaces(path)
    check_message(err, path)


# ---------------------------------------------------------------- expert weights


@pytest.mark.parametrize("kind", TORCH_GARBAGE)
def test_edge_weights(tmp_path, kind):
    path = tmp_path / "10_model.pth"
    marker = write_garbage(path, kind)
    with pytest.raises(CheckpointError) as err:
        edge.Generator("edge").load(path)
    check_message(err, path, marker)


def test_edge_weights_of_another_network(tmp_path):
    path = tmp_path / "10_model.pth"
    state = edge.DexiNed().state_dict()
    state.pop("block_1.conv1.weight")
    state["block_1.conv1.bias"] = torch.zeros(3)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="1 missing keys: block_1.conv1.weight; 1 wrong shapes") as err:
        edge.Generator("edge").load(path)
    check_message(err, path)


# ------------------------------------------------------------------- OCR labels


@pytest.mark.parametrize("kind", SAFETENSORS_GARBAGE[:1] + SAFETENSORS_GARBAGE[2:])
def test_ocr_record_safetensors_is_a_skipped_sample(tmp_path, kind):
    """Not a crashed worker: a bad label is a SampleError, skipped and counted."""
    path = tmp_path / "img.safetensors"
    write_garbage(path, kind)
    with pytest.raises(SampleError, match="not a safetensors file") as err:
        read_ocr_record(tmp_path / "img.png")
    check_message(err, path)
