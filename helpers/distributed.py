"""Everything about processes, precision and sharding, in one place: the
engine asks for an Accelerator (processes, DDP, autocast, trackers) and, for
--shard_grad_op / --full_shard, gets the model sharded here with FSDP2."""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import signal
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
from torch import nn

log = logging.getLogger(__name__)

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


def make_accelerator(
    mixed_precision: str, grad_accum_steps: int, project_dir: str, tracker: str | None, sharded: bool = False
) -> Accelerator:
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        log.warning("fp16 needs a GPU; running in full precision")
        mixed_precision = "no"
    if sharded and mixed_precision == "fp16":
        raise ValueError("FSDP runs here take --mixed_precision bf16 or no (fp16 would need a sharded grad scaler)")
    log_with = None
    if tracker == "tensorboard" and importlib.util.find_spec("tensorboard"):
        log_with = "tensorboard"
    elif tracker == "wandb":
        if not importlib.util.find_spec("wandb"):
            raise ValueError("tracker wandb asked for but wandb is not installed (pip install wandb)")
        log_with = "wandb"
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # several CPU processes then talk over gloo
        # Sharded runs cast parameters inside FSDP (MixedPrecisionPolicy) instead of autocasting.
        mixed_precision="no" if sharded else mixed_precision,
        gradient_accumulation_steps=grad_accum_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=project_dir, logging_dir=f"{project_dir}/logs"),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def shard_model(model: nn.Module, accelerator: Accelerator, full_shard: bool, mixed_precision: str) -> nn.Module:
    """FSDP2 `fully_shard` on every unit, each part, then the whole model.

    full_shard (ZeRO-3) frees gathered parameters after forward; otherwise
    (ZeRO-2) they stay gathered until backward. Frozen parameters shard like
    the rest: FSDP2 handles mixed requires_grad per parameter."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    dtype = {"bf16": torch.bfloat16}.get(mixed_precision)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    kw = {"mesh": mesh, "reshard_after_forward": full_shard, "mp_policy": policy}
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
