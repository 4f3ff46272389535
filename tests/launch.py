"""Launching real multi-process runs the way users do (torchrun, `accelerate launch`,
two "machines" on 127.0.0.1; gloo on CPU), for tests/test_distributed*.py."""

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "distributed_worker.py"
EXPERTS = ["depth", "seg_coco", "obj_detection", "ocr_detection"]
GLOBAL_BATCH = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    return os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def launchers(kind: str, nproc: int) -> list[list[str]]:
    """The README's launch commands on this machine's CPU: one per machine
    ("machines": two one-process machines, both at 127.0.0.1)."""
    port = str(free_port())
    py = [sys.executable, "-m"]
    if kind == "torchrun":
        return [py + ["torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", port]]
    at = ["--main_process_ip", "127.0.0.1", "--main_process_port", port]
    if kind == "accelerate":
        config = ROOT / "configs" / "accelerate" / "multi_process.yaml"
        return [py + ["accelerate.commands.launch", "--config_file", str(config), "--num_processes", str(nproc), *at]]
    assert kind == "machines"
    multi = ["accelerate.commands.launch", "--multi_gpu", "--num_machines", "2", "--num_processes", str(nproc)]
    return [py + multi + ["--machine_rank", str(rank), *at] for rank in range(2)]


def launch(kind: str, nproc: int, *cmd) -> str:
    """Run to the end; returns the first machine's log."""
    procs = [
        subprocess.Popen(
            [*launcher, *map(str, cmd)], env=env(), cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL
        )
        for launcher in launchers(kind, nproc)
    ]
    logs = [p.communicate(timeout=600)[1].decode() for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return logs[0]


def run_args(recipe, exp: str, *extra) -> list[str]:
    return ["--config", str(recipe[0]), "--target_dataset", "", "--exp_name", exp, *extra]


def two_process_sets() -> list[str]:
    """Two processes of half the batch: the same global batch."""
    return ["--set", f"batch_size_train={GLOBAL_BATCH // 2}"]
