"""Real multi-process runs, launched the way users launch them (torchrun and
`accelerate launch`, gloo on CPU): data parallelism and FSDP2 sharding train
the same model a single process trains on the same global batch."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.utils import set_seed
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train_caption
from helpers import distributed
from helpers.config import load_config
from model import PrismerCaption
from tests.conftest import tiny_size
from tests.dataset_builders import coco_world
from tests.test_train import write_caption_gt

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "distributed_worker.py"
EXPERTS = ["depth", "seg_coco", "obj_detection", "ocr_detection"]
GLOBAL_BATCH = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    return os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def launchers(kind: str, nproc: int) -> list[list[str]]:
    """The README's launch commands on this machine's CPU: one per machine
    ("machines": two one-process machines, both at 127.0.0.1)."""
    port = str(free_port())
    py = [sys.executable, "-m"]
    if kind == "torchrun":
        return [py + ["torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", port]]
    at = ["--main_process_ip", "127.0.0.1", "--main_process_port", port]
    if kind == "accelerate":
        config = ROOT / "configs" / "accelerate" / "multi_process.yaml"
        return [py + ["accelerate.commands.launch", "--config_file", str(config), "--num_processes", str(nproc), *at]]
    assert kind == "machines"
    multi = ["accelerate.commands.launch", "--multi_gpu", "--num_machines", "2", "--num_processes", str(nproc)]
    return [py + multi + ["--machine_rank", str(rank), *at] for rank in range(2)]


def launch(kind: str, nproc: int, *cmd) -> str:
    """Run to the end; returns the first machine's log."""
    procs = [
        subprocess.Popen(
            [*launcher, *map(str, cmd)], env=env(), cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL
        )
        for launcher in launchers(kind, nproc)
    ]
    logs = [p.communicate(timeout=600)[1].decode() for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return logs[0]


@pytest.fixture(scope="module")
def tok_dir(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tokenizer, tok_dir):
    """A tiny Prismer on 16 images without dropout, so that one process and
    two see exactly the same function of the same global batch."""
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


def run_args(recipe, exp: str, *extra) -> list[str]:
    return ["--config", str(recipe[0]), "--target_dataset", "", "--exp_name", exp, *extra]


def two_process_sets() -> list[str]:
    """Two processes of half the batch: the same global batch."""
    return ["--set", f"batch_size_train={GLOBAL_BATCH // 2}"]


def loss_curve(run: Path) -> list[float]:
    events = EventAccumulator(str(next((run / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    return [e.value for e in events.Scalars("train/loss")]


@pytest.fixture(scope="module")
def single(recipe):
    """The one-process reference run and the weights it started from."""
    train_caption.main(run_args(recipe, "single"))
    set_seed(42)  # what the engine does before building the model
    init = PrismerCaption(load_config(recipe[0]).model_config()).state_dict()
    return recipe[1] / "caption_single", init


@pytest.mark.parametrize(
    "kind,flags",
    [
        ("torchrun", []),
        ("accelerate", []),
        ("machines", []),
        ("accelerate", ["--shard_grad_op"]),
        ("torchrun", ["--full_shard"]),
    ],
    ids=["ddp-torchrun", "ddp-accelerate", "ddp-two-machines", "fsdp2-zero2-accelerate", "fsdp2-zero3-torchrun"],
)
def test_two_processes_train_the_model_one_process_trains(recipe, single, kind, flags):
    ref_run, init = single
    name = "two_" + "_".join([kind, *flags]).replace("-", "")
    log = launch(kind, 2, ROOT / "train_caption.py", *run_args(recipe, name, *two_process_sets(), *flags))
    assert "training on 2 process(es): global batch 4 (2 per process" in log
    run = recipe[1] / f"caption_{name}"
    sharding = {"--shard_grad_op": "shard_grad_op", "--full_shard": "full_shard"}.get(next(iter(flags), ""), "none")
    assert json.loads((run / "config.json").read_text())["sharding"] == sharding

    ref, curve = loss_curve(ref_run), loss_curve(run)
    assert len(curve) == len(ref) == 12  # 16 images, global batch 4, 3 epochs
    torch.testing.assert_close(torch.tensor(curve), torch.tensor(ref), rtol=2e-3, atol=0)
    assert sum(curve[-3:]) < 0.9 * sum(curve[:3]), curve  # it learned

    final = load_file(run / "final" / "model.safetensors")
    assert final.keys() == init.keys()  # no wrapper prefixes, every official key
    model = PrismerCaption.from_pretrained(run / "final")
    for key, param in model.named_parameters():  # every trainable weight moved, every frozen one stayed
        assert torch.equal(final[key], init[key]) != param.requires_grad, key

    # The same function as the one-process model (weights differ a little where the
    # expert stems' batch norm sees each process's half batch, as officially).
    experts, captions = next(iter(train_batches(recipe)))
    reference = PrismerCaption.from_pretrained(ref_run / "final").eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(experts, captions), reference(experts, captions), rtol=1e-2, atol=0)
    for folder in ("final", "best"):
        generated = PrismerCaption.from_pretrained(run / folder).eval().generate(experts, max_length=8, min_length=2)
        assert len(generated) == GLOBAL_BATCH and all(isinstance(c, str) and c for c in generated)


CPU_AVX2 = distributed.Hardware("AMD EPYC (no AMX / AVX-512-BF16; torch kernels AVX2)", gpu=False, bf16_fast=False)
CPU_AMX = distributed.Hardware("Intel Xeon (amx_bf16, avx512_bf16; torch kernels AVX512)", gpu=False, bf16_fast=True)
GPU_VOLTA = distributed.Hardware("Tesla V100 (compute capability 7.0)", gpu=True, bf16_fast=False)
GPU_HOPPER = distributed.Hardware("H100 (compute capability 9.0)", gpu=True, bf16_fast=True)


@pytest.mark.parametrize("hw", [CPU_AVX2, CPU_AMX, GPU_VOLTA, GPU_HOPPER], ids=["avx2", "amx", "volta", "hopper"])
def test_precision_follows_the_hardware_is_decided_once_and_the_decision_stands(hw):
    auto = "bf16" if hw.bf16_fast else "fp16" if hw.gpu else "no"
    for requested, sharding, decided in [
        ("auto", "none", auto),
        ("auto", "full_shard", "bf16" if hw.gpu or hw.bf16_fast else "no"),  # FSDP2 has no fp16 grad scaler
        ("fp16", "none", "fp16" if hw.gpu else "no"),  # fp16 needs a GPU
        ("bf16", "full_shard", "bf16"),
        ("no", "shard_grad_op", "no"),
    ]:
        assert distributed.resolve_precision(requested, sharding, hw) == decided
        assert distributed.resolve_precision(decided, sharding, hw) == decided  # deciding again changes nothing
    if hw.gpu:
        with pytest.raises(ValueError, match="bf16 or no, not fp16"):
            distributed.resolve_precision("fp16", "full_shard", hw)
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        distributed.resolve_precision("fp8", "none", hw)


def test_bf16_on_a_cpu_without_fast_bf16_warns_with_its_measured_cost(caplog):
    distributed._warn_slow_bf16.cache_clear()
    with caplog.at_level(logging.WARNING, logger="helpers.distributed"):
        assert distributed.resolve_precision("bf16", "none", CPU_AVX2) == "bf16"  # asked for: kept, with a warning
        distributed.resolve_precision("bf16", "none", CPU_AVX2)
    warnings = [r.getMessage() for r in caplog.records if "bf16 asked for" in r.getMessage()]
    assert len(warnings) == 1, "warned once per process"
    assert "AMD EPYC" in warnings[0] and "GFLOP/s" in warnings[0] and "mixed_precision: no" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="helpers.distributed"):
        distributed.resolve_precision("bf16", "none", CPU_AMX)
    assert not caplog.records


def test_this_machine_is_described():
    hw = distributed.hardware()
    assert hw.gpu == torch.cuda.is_available() and hw.description
    if not hw.gpu and Path("/proc/cpuinfo").exists():
        flags = Path("/proc/cpuinfo").read_text()
        assert hw.bf16_fast == ("amx_bf16" in flags or "avx512_bf16" in flags)


def train_batches(recipe):
    from dataset import create_dataset, create_loader

    train, _ = create_dataset("caption", load_config(recipe[0]))
    return create_loader(train, GLOBAL_BATCH, 0, True, collate_fn=train.collate)


@pytest.mark.parametrize("sharded", [False, True], ids=["ddp", "fsdp2"])
def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path, tok_dir, sharded):
    launch("torchrun", 2, WORKER, "nan_on_one_rank", tmp_path, tok_dir, int(sharded))
    result = json.loads((tmp_path / "nan_ok.json").read_text())
    assert result == {"skipped": [True, True], "unchanged_by_skip": True, "trained_after": True, "replicas_agree": True}


def test_two_processes_average_to_the_gradients_of_the_double_batch(tmp_path, tok_dir):
    launch("torchrun", 1, WORKER, "ddp_grads", tmp_path, tok_dir)
    launch("torchrun", 2, WORKER, "ddp_grads", tmp_path, tok_dir)
    one, two = torch.load(tmp_path / "grads_1.pt"), torch.load(tmp_path / "grads_2.pt")
    assert one.keys() == two.keys() and len(one) > 50
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fsdp2_full_state_dict_loads_into_an_unsharded_model(tmp_path, tok_dir):
    launch("torchrun", 2, WORKER, "fsdp_roundtrip", tmp_path, tok_dir)
    assert (tmp_path / "fsdp_ok").read_text() == "ok"


def test_sharded_run_resumes_with_the_step_count_it_stopped_at(recipe):
    base = run_args(recipe, "fsdp_resume", *two_process_sets(), "--full_shard")
    launch("torchrun", 2, ROOT / "train_caption.py", *base, "--set", "max_epoch=1")
    launch("torchrun", 2, ROOT / "train_caption.py", *base, "--set", "max_epoch=2", "--from_checkpoint")
    run = recipe[1] / "caption_fsdp_resume"
    progress = json.loads(sorted((run / "checkpoints").glob("step_*"))[-1].joinpath("progress.json").read_text())
    assert (progress["epoch"], progress["step"]) == (2, 8)
    results = json.loads((run / "caption_results_coco.json").read_text())
    assert sorted(r["image_id"] for r in results) == [0, 1]


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[1][0] != "Z"


@pytest.mark.parametrize(
    "kind,sig", [("torchrun", signal.SIGINT), ("accelerate", signal.SIGTERM), ("torchrun", signal.SIGKILL)]
)
def test_stopping_the_launcher_stops_every_worker_and_the_run_resumes(recipe, kind, sig):
    """Ctrl-C or a kill of the launcher must not leave workers training on
    (a SIGKILL'd launcher cannot forward anything: the workers notice on their own)."""
    name = f"stop_{kind}_{sig.name}"
    cmd = launchers(kind, 2)[0] + [
        str(ROOT / "train_caption.py"),
        *run_args(recipe, name, *two_process_sets(), "--set", "max_epoch=50", "--set", "save_every_steps=1"),
    ]
    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = recipe[1] / f"caption_{name}" / "checkpoints"
    deadline = time.monotonic() + 180
    while not list(ckpts.glob("step_*/progress.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be stopped"
        time.sleep(0.1)
    workers = [w for c in children(proc.pid) for w in [c, *children(c)]]
    assert workers
    proc.send_signal(sig)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 60
    while any(alive(w) for w in workers):
        assert time.monotonic() < deadline, f"workers still running after the launcher got {sig.name}"
        time.sleep(0.2)

    latest = sorted(ckpts.glob("step_*"))[-1]
    step = json.loads((latest / "progress.json").read_text())["step"]
    launch(
        "torchrun",
        2,
        ROOT / "train_caption.py",
        *run_args(recipe, name, *two_process_sets(), "--from_checkpoint", "--set", f"max_train_steps={step + 1}"),
    )
    assert json.loads((sorted(ckpts.glob("step_*"))[-1] / "progress.json").read_text())["step"] == step + 1
