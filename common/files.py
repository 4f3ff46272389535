"""Reading and writing files: writes a crash never leaves half of, and reads of
weight and state files whose errors name the file, in one line.

Why the readers: torch and safetensors report a bad file over many lines
without its name, and torch advises re-loading with `weights_only=False`,
which would run whatever code a downloaded pickle holds.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file


class CheckpointError(ValueError):
    """A weights or state file (checkpoint, label spaces, tokenizer, training
    state) that is not what it should be; the message names it, in one line."""


def atomic_write(path: Path, write) -> None:
    """`write(tmp_path)` into a temporary file beside `path`, then rename: a
    reader (or a resumed run) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; a label tree is often shared
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def reason(e: BaseException) -> str:
    """A library's error as its first sentence, on one line. Of torch's weights-only
    refusal only the refused item is kept: its advice to load with weights_only=False
    is wrong here."""
    text = str(e)
    refused = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
    if refused:
        text = refused[1]
    sentence = re.split(r"(?<=\.) (?=[A-Z])", " ".join(text.split()), maxsplit=1)[0].rstrip(".")
    return sentence or ("the file ends early" if isinstance(e, EOFError) else type(e).__name__)


def load_torch(path: str | os.PathLike, what: str = "a weights-only torch file"):
    """torch.load with weights_only=True (tensors and plain containers, never code);
    a file that is not one raises CheckpointError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # missing or unreadable: the OS error already names the file
    except Exception as e:
        raise CheckpointError(f"{path}: not {what} ({reason(e)})") from e


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a file that is not one raises CheckpointError."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError: header too large / too small / incomplete
        raise CheckpointError(f"{path}: not a safetensors file ({reason(e)})") from e


def load_json(path: str | os.PathLike, what: str = "a JSON object"):
    """A JSON object from `path`; anything else raises CheckpointError saying `what` was expected."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not JSON, expected {what} ({reason(e)})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(obj).__name__}, expected {what}")
    return obj
