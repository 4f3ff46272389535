"""Real multi-process runs (torchrun, gloo on CPU): data parallelism and FSDP2 sharding."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import PrismerCaption
from tests.test_train import recipe  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "distributed_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *cmd) -> None:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    full = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        *map(str, cmd),
    ]
    done = subprocess.run(full, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture
def tok_dir(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def test_two_processes_average_to_the_gradients_of_the_double_batch(tmp_path, tok_dir):
    torchrun(1, WORKER, "ddp_grads", tmp_path, tok_dir)
    torchrun(2, WORKER, "ddp_grads", tmp_path, tok_dir)
    one, two = torch.load(tmp_path / "grads_1.pt"), torch.load(tmp_path / "grads_2.pt")
    assert one.keys() == two.keys() and len(one) > 50
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fsdp2_full_state_dict_loads_into_an_unsharded_model(tmp_path, tok_dir):
    torchrun(2, WORKER, "fsdp_roundtrip", tmp_path, tok_dir)
    assert (tmp_path / "fsdp_ok").read_text() == "ok"


def test_sharded_training_run_saves_resumes_and_exports(recipe):  # noqa: F811
    path, out = recipe
    base = ["--config", path, "--target_dataset", "", "--exp_name", "fsdp", "--full_shard"]
    torchrun(2, ROOT / "train_caption.py", *base, "--set", "max_epoch=1")
    torchrun(2, ROOT / "train_caption.py", *base, "--set", "max_epoch=2", "--from_checkpoint")
    run = out / "caption_fsdp"
    progress = json.loads(sorted((run / "checkpoints").glob("step_*"))[-1].joinpath("progress.json").read_text())
    assert (progress["epoch"], progress["step"]) == (2, 4)  # 8 images, 2 ranks x batch 2: 2 steps an epoch
    model = PrismerCaption.from_pretrained(run / "final")
    assert model.config.experts == ["depth", "seg_coco", "obj_detection", "ocr_detection"]
    results = json.loads((run / "caption_results_coco.json").read_text())
    assert sorted(r["image_id"] for r in results) == [0, 1]
