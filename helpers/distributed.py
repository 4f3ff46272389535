"""Everything about processes, precision and sharding, in one place: the
precision a run gets is decided here (`resolve_precision`), the engine and
generate_experts.py ask for an Accelerator (processes, DDP, autocast,
trackers), and sharded runs (`sharding` shard_grad_op / full_shard) get the
model sharded here with FSDP2."""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
from torch import nn

log = logging.getLogger(__name__)

# A run's `mixed_precision` and `sharding` keys (helpers.config.RunConfig).
PRECISIONS = ("auto", "no", "fp16", "bf16")
SHARDINGS = ("none", "shard_grad_op", "full_shard")  # FSDP2: ZeRO-2, ZeRO-3
PRECISION_NAMES = {"no": "float32", "fp16": "fp16 mixed (float32 weights)", "bf16": "bf16 mixed (float32 weights)"}

# FSDP2 units: ViT block halves' owner, adaptors, resampler blocks, decoder
# layers. Prismer runs some blocks in halves (attention, then an adaptor, then
# the MLP), so those methods must unshard parameters like forward does.
SHARD_UNITS = {
    "ResidualAttentionBlock": ("attention", "feed_forward"),
    "Adaptor": (),
    "PerceiverAttentionBlock": (),
    "TextLayer": ("attend", "feed_forward"),
    "CrossAttention": ("attend",),
}


def stop_with_launcher() -> None:
    """Under a launcher (torchrun, `accelerate launch`), ask Linux to send this
    worker SIGTERM when the launcher dies: a launcher killed outright forwards
    nothing, and its workers would train on unseen. Plain `python train_*.py`
    runs are left alone (so `nohup` still outlives the shell)."""
    launched = "TORCHELASTIC_RUN_ID" in os.environ or "ACCELERATE_USE_CPU" in os.environ
    if not launched or not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, signal.SIGTERM) != 0:
        log.warning("could not tie this worker to its launcher (prctl errno %d)", ctypes.get_errno())


@dataclass(frozen=True)
class Hardware:
    """What this process computes on, and whether bf16 is fast there."""

    description: str
    gpu: bool
    bf16_fast: bool


def _cpu_facts() -> tuple[str, set[str]]:
    """The CPU's model name and feature flags (Linux /proc/cpuinfo; elsewhere the platform's name, no flags)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), set()
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    return name or platform.machine(), set(flags)


@functools.cache
def hardware() -> Hardware:
    """bf16 is fast on GPUs of compute capability 8.0 and later (Ampere on) and
    on CPUs with AMX or AVX-512-BF16; elsewhere it is emulated: on an AVX2-only
    CPU a bf16 matmul measured ~100x slower than float32."""
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return Hardware(f"{torch.cuda.get_device_name()} (compute capability {major}.{minor})", True, major >= 8)
    name, flags = _cpu_facts()
    fast = sorted({"amx_bf16", "avx512_bf16"} & flags)
    kernels = torch.backends.cpu.get_cpu_capability()
    return Hardware(
        f"{name} ({', '.join(fast) or 'no AMX / AVX-512-BF16'}; torch kernels {kernels})", False, bool(fast)
    )


def matmul_gflops(dtype: torch.dtype, target_s: float = 0.05) -> float:
    """GFLOP/s of a square CPU matmul grown until one takes `target_s` (a slow dtype stays small)."""
    n = 128
    while True:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up
        t0 = time.perf_counter()
        a @ b
        seconds = time.perf_counter() - t0
        if seconds >= target_s or n >= 4096:
            return 2 * n**3 / seconds / 1e9
        n *= 2


@functools.cache
def _warn_slow_bf16(hw: Hardware) -> None:
    """Once per process: bf16 asked for where it is emulated, with its cost measured here."""
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    log.warning(
        "bf16 asked for on %s: a bf16 matmul runs at %.1f GFLOP/s here against %.0f in float32 (measured now); "
        "mixed_precision: no will train much faster on this CPU",
        hw.description,
        bf16,
        fp32,
    )


def resolve_precision(requested: str, sharding: str = "none", hw: Hardware | None = None) -> str:
    """The precision a run gets, decided once. `auto` follows the hardware:
    bf16 where it is fast (Ampere+ GPUs, AMX / AVX-512-BF16 CPUs), else fp16 on
    an older GPU (bf16 for a sharded run, which has no fp16 grad scaler) and
    full precision (`no`) on other CPUs; fp16 without a GPU falls back to full
    precision. Deciding a decided value again gives it back unchanged."""
    if requested not in PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {PRECISIONS}, not {requested!r}")
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, not {sharding!r}")
    hw = hw or hardware()
    if requested == "auto":
        if hw.bf16_fast:
            requested = "bf16"
        elif hw.gpu:
            requested = "fp16" if sharding == "none" else "bf16"
        else:
            requested = "no"
    if requested == "fp16" and not hw.gpu:
        log.warning("fp16 needs a GPU; running in full precision")
        requested = "no"
    if requested == "bf16" and not hw.bf16_fast and not hw.gpu:
        _warn_slow_bf16(hw)
    if sharding != "none" and requested == "fp16":
        raise ValueError(
            f"sharding {sharding} takes mixed_precision bf16 or no, not fp16: fp16 would need a sharded grad scaler"
        )
    return requested


def make_accelerator(
    mixed_precision: str = "no",
    grad_accum_steps: int = 1,
    project_dir: str | None = None,
    tracker: str | None = None,
    sharding: str = "none",
) -> Accelerator:
    """The processes' Accelerator (DDP, autocast, trackers) at the precision
    `resolve_precision` decides; a sharded run's precision is applied by shard_model."""
    mixed_precision = resolve_precision(mixed_precision, sharding)
    log.info("computing on %s; precision %s", hardware().description, PRECISION_NAMES[mixed_precision])
    log_with = None
    if tracker == "tensorboard" and importlib.util.find_spec("tensorboard"):
        log_with = "tensorboard"
    elif tracker == "wandb":
        if not importlib.util.find_spec("wandb"):
            raise ValueError("tracker wandb asked for but wandb is not installed (pip install wandb)")
        log_with = "wandb"
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # several CPU processes then talk over gloo
        # Sharded runs cast parameters inside FSDP (MixedPrecisionPolicy, shard_model) instead of autocasting;
        # otherwise accelerate autocasts the prepared model's forward, and nothing else needs to.
        mixed_precision="no" if sharding != "none" else mixed_precision,
        gradient_accumulation_steps=grad_accum_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(
            project_dir=project_dir, logging_dir=f"{project_dir}/logs" if project_dir else None
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def shard_model(model: nn.Module, accelerator: Accelerator, sharding: str, mixed_precision: str) -> nn.Module:
    """FSDP2 `fully_shard` on every unit, each part, then the whole model.

    full_shard (ZeRO-3) frees gathered parameters after forward; shard_grad_op
    (ZeRO-2) keeps them gathered until backward. Frozen parameters shard like
    the rest: FSDP2 handles mixed requires_grad per parameter."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    dtype = {"bf16": torch.bfloat16}.get(resolve_precision(mixed_precision, sharding))
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    kw = {"mesh": mesh, "reshard_after_forward": sharding == "full_shard", "mp_policy": policy}
    for module in list(model.modules()):
        methods = SHARD_UNITS.get(type(module).__name__)
        if methods is not None:
            fully_shard(module, **kw)
            for name in methods:
                register_fsdp_forward_method(module, name)
    fully_shard(model.expert_encoder, **kw)
    fully_shard(model.text_decoder, **kw)
    fully_shard(model, **kw)
    return model.to(accelerator.device)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU (on rank 0; a collective call for sharded models)."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: nn.Module, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def full_optimizer_state(model: nn.Module, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )
