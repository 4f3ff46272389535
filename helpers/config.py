"""Typed run configs: YAML recipes plus keys set from Python or by `--set key=value`.

Every key is a dataclass field; an unknown key or a value of the wrong type
is an error that names the key and the file before anything is loaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.config import from_mapping
from common.modalities import PRISMER_EXPERTS
from dataset.config import DataConfig
from helpers.distributed import PRECISIONS, SHARDINGS
from model.config import ModelConfig


@dataclass
class RunConfig(ModelConfig, DataConfig):
    """A run's keys: the model's (ModelConfig, validated first), the data's
    (DataConfig, which the datasets receive) and these."""

    prismer_model: str | dict = "prismer_base"
    experts: list[str] = field(default_factory=lambda: list(PRISMER_EXPERTS))
    gt_file: str | None = None  # caption ground truth; default per dataset in data_path
    num_workers: int = 4
    # optimisation
    batch_size_train: int = 8
    batch_size_test: int = 8
    init_lr: float = 5e-5
    min_lr: float = 0.0
    warmup_lr: float = 1e-6
    warmup_steps: int = 0
    schedule: str = "cosine_step"  # cosine_step | cosine_epoch
    weight_decay: float = 0.05
    max_epoch: int = 3
    grad_accum_steps: int = 1
    grad_clip: float | None = None
    max_nan_steps: int = 5  # consecutive non-finite losses before the run stops
    # inference
    inference: str = "rank"  # VQA: rank | generate
    k_test: int = 16
    num_beams: int = 3
    max_length: int = 20
    min_length: int = 8
    # run
    init_checkpoint: str | None = None  # weights to start from (ours or official)
    output_dir: str = "outputs"
    save_every_steps: int = 0  # 0: once per epoch
    eval_every_epochs: int = 1  # 0: only after the last epoch
    keep_last: int = 2
    log_every_steps: int = 10
    tracker: str | None = "tensorboard"  # tensorboard | wandb | None
    max_train_steps: int = 0  # 0: no limit (for smoke runs)
    # processes; the run's config.json records the precision helpers.distributed decided for `auto`
    mixed_precision: str = "auto"  # auto (helpers.distributed.resolve_precision) | no | fp16 | bf16
    sharding: str = "none"  # none | shard_grad_op (FSDP2, ZeRO-2) | full_shard (ZeRO-3)

    def __post_init__(self):
        ModelConfig.__post_init__(self)
        DataConfig.__post_init__(self)
        if self.schedule not in ("cosine_step", "cosine_epoch"):
            raise ValueError(f"schedule must be cosine_step or cosine_epoch, not {self.schedule!r}")
        if self.inference not in ("rank", "generate"):
            raise ValueError(f"inference must be rank or generate, not {self.inference!r}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {PRECISIONS}, not {self.mixed_precision!r}")
        if self.sharding not in SHARDINGS:
            raise ValueError(f"sharding must be one of {SHARDINGS}, not {self.sharding!r}")
        if self.eval_every_epochs < 0:
            raise ValueError(
                f"eval_every_epochs must be >= 0 (0: only after the last epoch), not {self.eval_every_epochs}"
            )

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(dataclasses.asdict(self), strict=False)


def build_config(values: dict, where: str) -> RunConfig:
    return from_mapping(RunConfig, values, where)


def load_config(
    path: str | Path, section: str | None = None, overrides: list[str] = (), values: Mapping[str, Any] | None = None
) -> RunConfig:
    """A recipe file (optionally one section of it, e.g. `coco` in caption.yaml), then
    `values` (keys set from Python), then `overrides` (a command line's `key=value`
    strings, values read as YAML): later ones win, and all are checked alike."""
    path = Path(path)
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    where = str(path)
    if section:
        if section not in data:
            raise ValueError(f"{path} has no section {section!r}; sections: {sorted(data)}")
        data, where = data[section], f"{path} [{section}]"
    data = dict(data) | dict(values or {})
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        data[key.strip()] = yaml.safe_load(raw)
    return build_config(data, where)


# What a checkpoint fixes about the model it holds; resolution and freezing stay the recipe's.
ARCHITECTURE_KEYS = ("prismer_model", "experts", "tokenizer")


def adopt_checkpoint_model(cfg: RunConfig, explicit: set[str]) -> tuple[RunConfig, dict]:
    """Take the architecture of `init_checkpoint` (our folder's config.json, or
    an official name's) over the recipe's, except keys the user set explicitly.
    Returns the new config and what was taken."""
    from common.files import load_json
    from model.convert import OFFICIAL_NAME, official_config
    from model.prismer import CONFIG_FILE

    source = Path(cfg.init_checkpoint)
    if (source / CONFIG_FILE).is_file():
        model = load_json(source / CONFIG_FILE, "a model config")
    elif not source.exists() and OFFICIAL_NAME.match(cfg.init_checkpoint):
        model = official_config(cfg.init_checkpoint)
    else:  # an official-layout file: its architecture must match the recipe's
        return cfg, {}
    current = cfg.to_dict()
    taken = {k: model[k] for k in ARCHITECTURE_KEYS if k in model and k not in explicit and model[k] != current.get(k)}
    if not taken:
        return cfg, {}
    return build_config(current | taken, f"{cfg.init_checkpoint} (init_checkpoint)"), taken
