"""Runs side by side (sandbox.side_by_side): each task's output lands in its own log
file, results come back, and an error in the caller stops the workers at once."""

import multiprocessing
import time
from functools import partial

import pytest

from sandbox.side_by_side import SideBySide


def test_each_task_logs_to_its_file_and_returns_its_result(tmp_path):
    with SideBySide(workers=2) as pool:
        done = [pool.submit(partial(print, f"task {i}"), tmp_path / f"{i}" / "train.log") for i in range(3)]
        assert [d.result() for d in done] == [None] * 3
    for i in range(3):
        assert (tmp_path / f"{i}" / "train.log").read_text() == f"task {i}\n"


def test_an_error_beside_the_workers_stops_them_instead_of_waiting(tmp_path):
    with pytest.raises(RuntimeError, match="caption run failed"):
        with SideBySide(workers=1) as pool:
            pool.submit(partial(time.sleep, 120), tmp_path / "sleep.log")
            while not (tmp_path / "sleep.log").exists():  # the worker has started the task
                time.sleep(0.1)
            workers = multiprocessing.active_children()
            raise RuntimeError("caption run failed")
    assert workers
    deadline = time.monotonic() + 20
    while any(w.is_alive() for w in workers):
        assert time.monotonic() < deadline, "a worker still runs its task after the caller failed"
        time.sleep(0.1)
