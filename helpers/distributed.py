"""Everything about processes, precision and sharding, in one place: the
engine asks for an Accelerator and gets DDP, mixed precision or FSDP2."""

from __future__ import annotations

import importlib.util
import logging

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

log = logging.getLogger(__name__)

# Sharding units for FSDP2: a ViT block, a resampler block, a decoder layer.
FSDP_UNITS = ["ResidualAttentionBlock", "Adaptor", "PerceiverAttentionBlock", "TextLayer", "CrossAttention"]


def make_accelerator(
    mixed_precision: str,
    grad_accum_steps: int,
    project_dir: str,
    tracker: str | None,
    shard_grad_op: bool = False,
    full_shard: bool = False,
) -> Accelerator:
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        log.warning("fp16 needs a GPU; running in full precision")
        mixed_precision = "no"
    fsdp = None
    if shard_grad_op or full_shard:
        if shard_grad_op and full_shard:
            raise ValueError("choose one of --shard_grad_op and --full_shard")
        # ZeRO-3 re-shards parameters after each forward; ZeRO-2 keeps them gathered until backward.
        fsdp = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            reshard_after_forward=full_shard,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=FSDP_UNITS,
            state_dict_type="FULL_STATE_DICT",
        )
    log_with = None
    if tracker == "tensorboard" and importlib.util.find_spec("tensorboard"):
        log_with = "tensorboard"
    elif tracker == "wandb":
        if not importlib.util.find_spec("wandb"):
            raise ValueError("tracker wandb asked for but wandb is not installed (pip install wandb)")
        log_with = "wandb"
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # several CPU processes then talk over gloo
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum_steps,
        fsdp_plugin=fsdp,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=project_dir, logging_dir=f"{project_dir}/logs"),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
