"""Training-state checkpoints that a crash cannot corrupt.

Each checkpoint is a folder `step_XXXXXXXX` written as `.step_XXXXXXXX.tmp`
and renamed once complete (a rename is atomic), holding accelerate's state
(model, optimizer, RNG states) and `progress.json` (epoch, step, metric).
A folder without progress.json, or a leftover .tmp, is never loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from accelerate import Accelerator

PROGRESS = "progress.json"


def save(accelerator: Accelerator, folder: Path, progress: dict, keep_last: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    name = f"step_{progress['step']:08d}"
    tmp, final = folder / f".{name}.tmp", folder / name
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
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


def load(accelerator: Accelerator, path: Path) -> dict:
    accelerator.load_state(str(path))
    return json.loads((path / PROGRESS).read_text())


def save_best(model, folder: Path) -> None:
    """Replace `folder` with the model's safetensors checkpoint in one rename."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
