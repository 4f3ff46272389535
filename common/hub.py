"""Fetching pretrained files from the Hugging Face hub, failing fast offline.

huggingface_hub retries a dead connection for about 20 s before it gives
up; a quick probe of the endpoint turns that into an immediate, actionable
error (what to fetch, where to put it).
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import constants, hf_hub_download

# The hub repo of the official Prismer checkpoints and expert weights.
OFFICIAL_REPO = "shikunl/prismer"


class DownloadError(RuntimeError):
    pass


def _hub_reachable(timeout: float = 3.0) -> str | None:
    """None if the hub endpoint accepts a connection, else the reason."""
    return reachable(os.environ.get("HF_ENDPOINT", constants.ENDPOINT), timeout)


def reachable(address: str, timeout: float = 3.0) -> str | None:
    """None if the host of URL `address` accepts a connection, else the reason."""
    url = urlparse(address)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"cannot reach {host}:{port} ({e})"


def hub_file(repo_id: str, filename: str, what: str) -> Path:
    """Local path of `filename` in hub repo `repo_id`: from the local cache,
    else downloaded. `what` names the file for the error message."""
    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True))
    except Exception:  # not cached: go to the network below
        pass
    reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _hub_reachable()
    if reason is None:
        try:
            return Path(hf_hub_download(repo_id, filename))
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
    raise DownloadError(
        f"could not fetch {what} ({filename} from hub repo {repo_id}): {reason}.\n"
        f"On a machine with network access run `hf download {repo_id} {filename}` (or "
        f"`python download_checkpoints.py`), then copy the file here and pass its local path, or copy the "
        f"Hugging Face cache ({constants.HF_HUB_CACHE})."
    )


def hub_first_file(repo_id: str, filenames: list[str], what: str) -> Path:
    """The first of several alternative files (e.g. safetensors, then .bin) that exists."""
    errors = []
    for name in filenames:
        try:
            return hub_file(repo_id, name, what)
        except DownloadError as e:
            errors.append(str(e))
            if "cannot reach" in str(e) or "HF_HUB_OFFLINE" in str(e):
                break
    raise DownloadError(errors[-1])


def is_hub_id(name: str, file_suffixes: tuple[str, ...] | None = None) -> bool:
    """`owner/name` as a hub repo id, not a local file's name: with `file_suffixes`, a name
    ending in one of them is a file; without, a name with any suffix is."""
    suffix = Path(name).suffix
    is_file_name = suffix in file_suffixes if file_suffixes is not None else bool(suffix)
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not is_file_name
