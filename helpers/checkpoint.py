"""Training-state checkpoints that a crash cannot corrupt.

Each checkpoint is a folder `step_XXXXXXXX` written as `.step_XXXXXXXX.tmp`
and renamed once complete (a rename is atomic), holding accelerate's state
(model, optimizer, RNG states) and `progress.json` (epoch, step, metric).
A folder without progress.json, or a leftover .tmp, is never loaded; a file
in it that cannot be read raises CheckpointError naming that file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from common.files import CheckpointError, load_json, load_safetensors, load_torch, reason
from helpers import distributed

PROGRESS = "progress.json"
# Where a resumed run starts; the engine reads these from progress.json.
POSITION = ("epoch", "batch", "step")
# Sharded (FSDP2) runs keep model and optimizer here, gathered in full, so a
# checkpoint loads whatever the number of processes.
SHARDED_MODEL, SHARDED_OPTIM = "model_full.safetensors", "optimizer_full.pt"


def save(accelerator: Accelerator, folder: Path, progress: dict, keep_last: int, model=None, optimizer=None) -> Path:
    """All ranks call this. `model`/`optimizer` are given for sharded runs only
    (accelerate saves prepared ones itself)."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"step_{progress['step']:08d}"
    tmp, final = folder / f".{name}.tmp", folder / name
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if model is not None:
        weights = distributed.full_state_dict(model)
        optim = distributed.full_optimizer_state(model, optimizer)
        if accelerator.is_main_process:
            save_file({k: v.contiguous().clone() for k, v in weights.items()}, tmp / SHARDED_MODEL)
            torch.save(optim, tmp / SHARDED_OPTIM)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / PROGRESS).write_text(json.dumps(progress))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete(folder)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def complete(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step_*") if (p / PROGRESS).exists())


def resolve(spec: str, folder: Path) -> Path | None:
    """`latest` (the newest complete checkpoint of this run) or a path."""
    if spec == "latest":
        found = complete(folder)
        return found[-1] if found else None
    path = Path(spec)
    if not (path / PROGRESS).exists():
        raise FileNotFoundError(f"{path} is not a complete training checkpoint (no {PROGRESS})")
    return path


def load(accelerator: Accelerator, path: Path, model=None, optimizer=None) -> dict:
    progress = _read_progress(path / PROGRESS)  # first: it is small, the rest may be gigabytes
    try:
        accelerator.load_state(str(path))
    except Exception as e:
        raise CheckpointError(_unreadable(path) or f"{path}: training state does not fit this run ({reason(e)})") from e
    if model is not None:
        if not (path / SHARDED_MODEL).exists():
            raise FileNotFoundError(f"{path} was not written by a sharded run; resume it without sharding flags")
        main = accelerator.is_main_process
        distributed.load_full_state_dict(model, load_safetensors(path / SHARDED_MODEL) if main else {})
        optim = load_torch(path / SHARDED_OPTIM, "a weights-only optimizer state") if main else {}
        distributed.load_full_optimizer_state(model, optimizer, optim)
    return progress


def _read_progress(path: Path) -> dict:
    what = f"training progress with {', '.join(POSITION)}"
    progress = load_json(path, what)
    bad = [k for k in POSITION if not isinstance(progress.get(k), int)]
    if bad:
        raise CheckpointError(f"{path}: {', '.join(bad)} missing or not integers, expected {what}")
    return progress


def _unreadable(folder: Path) -> str | None:
    """After accelerate failed to load `folder`: the first of its files that does
    not read as what it should be, and why (accelerate's errors name no file).
    Random states are not checked: accelerate ignores them when they do not load."""
    for file in sorted(folder.iterdir()):
        try:
            if file.suffix == ".safetensors":
                load_safetensors(file)
            elif file.suffix in (".bin", ".pt"):
                load_torch(file)
        except (CheckpointError, OSError) as e:
            return str(e)
    return None


def save_model(accelerator: Accelerator, model, folder: Path) -> None:
    """Replace `folder` with the model's safetensors checkpoint in one rename.
    All ranks call this (gathering a sharded model is collective)."""
    model = accelerator.unwrap_model(model)  # DDP's `module.` prefix must not reach the saved keys
    weights = distributed.full_state_dict(model)
    if not accelerator.is_main_process:
        return
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, state_dict=weights)
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
