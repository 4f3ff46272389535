"""Real multi-process runs, launched the way users launch them (torchrun and
`accelerate launch`, gloo on CPU): data parallelism and FSDP2 sharding train
the same model a single process trains on the same global batch."""

import json
import logging
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train_caption
from helpers import distributed
from helpers.config import load_config
from model import PrismerCaption
from tests.launch import GLOBAL_BATCH, ROOT, WORKER, launch, run_args, two_process_sets


def loss_curve(run: Path) -> list[float]:
    events = EventAccumulator(str(next((run / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    return [e.value for e in events.Scalars("train/loss")]


@pytest.fixture(scope="module")
def single(dist_recipe):
    """The one-process reference run and the weights it started from."""
    train_caption.main(run_args(dist_recipe, "single"))
    set_seed(42)  # what the engine does before building the model
    init = PrismerCaption(load_config(dist_recipe[0]).model_config()).state_dict()
    return dist_recipe[1] / "caption_single", init


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
def test_two_processes_train_the_model_one_process_trains(dist_recipe, single, kind, flags):
    ref_run, init = single
    name = "two_" + "_".join([kind, *flags]).replace("-", "")
    log = launch(kind, 2, ROOT / "train_caption.py", *run_args(dist_recipe, name, *two_process_sets(), *flags))
    assert "training on 2 process(es): global batch 4 (2 per process" in log
    run = dist_recipe[1] / f"caption_{name}"
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
    experts, captions = next(iter(train_batches(dist_recipe)))
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


def train_batches(dist_recipe):
    from dataset import create_dataset, create_loader

    train, _ = create_dataset("caption", load_config(dist_recipe[0]))
    return create_loader(train, GLOBAL_BATCH, 0, True, collate_fn=train.collate)


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
