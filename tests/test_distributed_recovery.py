"""Real multi-process runs that go wrong, launched the way users launch them:
a non-finite loss on one rank, a sharded run stopped and resumed, a launcher
stopped by Ctrl-C, SIGTERM or SIGKILL."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.launch import ROOT, WORKER, env, launch, launchers, run_args, two_process_sets


@pytest.mark.parametrize("sharded", [False, True], ids=["ddp", "fsdp2"])
def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path, tok_dir, sharded):
    launch("torchrun", 2, WORKER, "nan_on_one_rank", tmp_path, tok_dir, int(sharded))
    result = json.loads((tmp_path / "nan_ok.json").read_text())
    assert result == {"skipped": [True, True], "unchanged_by_skip": True, "trained_after": True, "replicas_agree": True}


def test_sharded_run_resumes_with_the_step_count_it_stopped_at(dist_recipe):
    base = run_args(dist_recipe, "fsdp_resume", *two_process_sets(), "--full_shard")
    launch("torchrun", 2, ROOT / "train_caption.py", *base, "--set", "max_epoch=1")
    launch("torchrun", 2, ROOT / "train_caption.py", *base, "--set", "max_epoch=2", "--from_checkpoint")
    run = dist_recipe[1] / "caption_fsdp_resume"
    progress = json.loads(sorted((run / "checkpoints").glob("step_*"))[-1].joinpath("progress.json").read_text())
    assert (progress["epoch"], progress["step"]) == (2, 8)
    results = json.loads((run / "caption_results_coco.json").read_text())
    assert sorted(r["image_id"] for r in results) == [0, 1]


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[1][0] != "Z"


@pytest.mark.parametrize(
    "kind,sig", [("torchrun", signal.SIGINT), ("accelerate", signal.SIGTERM), ("torchrun", signal.SIGKILL)]
)
def test_stopping_the_launcher_stops_every_worker_and_the_run_resumes(dist_recipe, kind, sig):
    """Ctrl-C or a kill of the launcher must not leave workers training on
    (a SIGKILL'd launcher cannot forward anything: the workers notice on their own)."""
    name = f"stop_{kind}_{sig.name}"
    cmd = launchers(kind, 2)[0] + [
        str(ROOT / "train_caption.py"),
        *run_args(dist_recipe, name, *two_process_sets(), "--set", "max_epoch=50", "--set", "save_every_steps=1"),
    ]
    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = dist_recipe[1] / f"caption_{name}" / "checkpoints"
    deadline = time.monotonic() + 180
    while not list(ckpts.glob("step_*/progress.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be stopped"
        time.sleep(0.1)
    workers = [w for c in children(proc.pid) for w in [c, *children(c)]]
    assert workers
    proc.send_signal(sig)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 60
    while any(alive(w) for w in workers):
        assert time.monotonic() < deadline, f"workers still running after the launcher got {sig.name}"
        time.sleep(0.2)

    latest = sorted(ckpts.glob("step_*"))[-1]
    step = json.loads((latest / "progress.json").read_text())["step"]
    launch(
        "torchrun",
        2,
        ROOT / "train_caption.py",
        *run_args(dist_recipe, name, *two_process_sets(), "--from_checkpoint", "--set", f"max_train_steps={step + 1}"),
    )
    assert json.loads((sorted(ckpts.glob("step_*"))[-1] / "progress.json").read_text())["step"] == step + 1
