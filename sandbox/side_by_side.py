"""Independent training runs side by side, each in a process of its own with a
share of the threads and its output in a log file of its own.

The sandbox's models are small enough that a second thread speeds a step up only
1.3x (matrices of width 128 leave the matmul kernels waiting on per-op overhead),
so on 2 cores two one-thread runs get through 1.5x the work of one two-thread run.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any


def _logged(fn: Callable[[], Any], log_file: Path, threads: int) -> Any:
    """In the worker: this task's thread count, stdout and stderr (progress bars, logs) into `log_file`."""
    import torch

    torch.set_num_threads(threads)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    with open(log_file, "w") as f:  # the descriptors stay open on the file after `f` closes
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return fn()


class SideBySide:
    """A pool of `workers` spawned processes running `threads` threads each. On an
    error in the block the workers are stopped, not waited for (a run takes minutes)."""

    def __init__(self, workers: int, threads: int = 1):
        self.threads = threads
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

    def submit(self, fn: Callable[[], Any], log_file: Path) -> Future:
        """Runs `fn` (picklable: a module-level function or a partial of one) in a worker."""
        return self.pool.submit(partial(_logged, fn, Path(log_file), self.threads))

    def __enter__(self) -> SideBySide:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if error is not None:
            for child in multiprocessing.active_children():
                child.terminate()
        self.pool.shutdown(wait=error is None, cancel_futures=error is not None)
