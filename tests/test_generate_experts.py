"""generate_experts.py end to end: real image files, a weight file in the official
format, labels the datasets read back, resume, corrupt input, offline weights."""

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import generate_experts
from common.hub import DownloadError
from dataset.datasets import make_reader
from dataset.lists import ConfigError
from experts import edge, generator_network

ROOT = Path(__file__).resolve().parent.parent
IMAGES = {"a.jpg": (48, 64, 32), "b.jpg": (40, 40, 10), "sub/c.jpg": (48, 64, 12)}  # height, width, blue from column


def known_network() -> dict:
    """DexiNed weights under which the fused output is the blue input channel through
    a relu (at stride 2, upsampled back), so an image's label is known by hand:
    black is -103.5 -> 0 -> sigmoid 1/2, pure blue +151 -> sigmoid 1; min-max and
    inverted: white (255) where the image is black, dark (0) where it is blue."""
    state = {k: torch.zeros_like(v) for k, v in edge.DexiNed().state_dict().items()}
    for bn in ("block_1.bn1", "block_1.bn2"):
        state[f"{bn}.weight"] += 1
        state[f"{bn}.running_var"] += 1
    for conv in ("block_1.conv1", "block_1.conv2"):
        state[f"{conv}.weight"][0, 0, 1, 1] = 1  # channel 0 (blue, after the BGR flip), centre tap
    state["up_block_1.features.0.weight"][0, 0] = 1
    state["up_block_1.features.2.weight"][:] = 1  # back to full size, nearest
    state["block_cat.conv.weight"][0, 0] = 1  # the fused map is the first side output
    return state


@pytest.fixture
def folder(tmp_path):
    """Three real JPEGs (two sizes, one in a subfolder; black, blue from a different
    column in each), one corrupt file, and a weight file in the official format."""
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    for name, (h, w, x) in IMAGES.items():
        img = np.zeros((h, w, 3), np.uint8)
        img[:, x:] = (0, 0, 255)
        Image.fromarray(img).save(root / name)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 this is no jpeg")
    weights = tmp_path / "10_model.pth"
    torch.save(known_network(), weights)  # the official format: a flat state_dict
    return root, weights


def run(folder, save, *extra):
    root, weights = folder
    argv = ["--expert", "edge", "--data_path", str(root), "--save_path", str(save), "--num_workers", "0"]
    return generate_experts.main([*argv, "--weights", str(weights), *extra])["edge"]


def counts(totals: dict) -> dict:
    """The image counts of one expert's summary (not its speed or memory)."""
    return {k: v for k, v in totals.items() if k not in ("images/s", "peak MiB")}


def test_labels_are_written_where_the_datasets_read_them(folder, tmp_path):
    save = tmp_path / "labels"
    assert counts(run(folder, save)) == {
        "images": 4,
        "already done": 0,
        "written": 3,
        "found nothing": 0,
        "corrupt (skipped)": 1,
        "name taken (skipped)": 0,
        "input label missing (skipped)": 0,
    }
    for name, (h, w, x) in IMAGES.items():
        with Image.open(save / "edge" / "imgs" / name.replace(".jpg", ".png")) as label:
            assert label.mode == "L" and label.size == (w, h)
            a = np.asarray(label)
        # Its own image's label (see known_network); columns x - 1 and x blend.
        assert (a == a[:1]).all() and (a[:, : x - 1] == 255).all() and (a[:, x + 1 :] == 0).all(), name
    assert not list(save.rglob("*.tmp"))
    umask = os.umask(0)
    os.umask(umask)
    assert (save / "edge" / "imgs" / "a.png").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    reader = make_reader(
        {
            "data_path": str(folder[0].parent),
            "image_resolution": 32,
            "label_resolution": 32,
            "experts": ["edge"],
            "label_path": str(save),
        },
        train=False,
    )
    sample = reader("imgs", "sub/c.jpg", random.Random(0))
    assert sample["edge"].shape == (1, 32, 32) and sample["edge"].std() > 0


def test_a_second_run_only_does_what_is_missing(folder, tmp_path):
    save = tmp_path / "labels"
    run(folder, save)
    done = save / "edge" / "imgs" / "a.png"
    before = done.stat().st_mtime_ns
    (save / "edge" / "imgs" / "b.png").unlink()  # as if the run had stopped before it
    assert counts(run(folder, save)) == {
        "images": 4,
        "already done": 2,
        "written": 1,
        "found nothing": 0,
        "corrupt (skipped)": 1,
        "name taken (skipped)": 0,
        "input label missing (skipped)": 0,
    }
    assert done.stat().st_mtime_ns == before


def test_missing_weights_offline_fail_fast_naming_the_file(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))  # nothing cached
    root, _ = folder
    argv = ["--expert", "edge", "--data_path", str(root), "--save_path", str(tmp_path / "l"), "--num_workers", "0"]
    with pytest.raises(DownloadError, match="10_model.pth"):
        generate_experts.main(argv)


def test_two_processes_share_the_images(folder, tmp_path):
    root, weights = folder
    save = tmp_path / "labels"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # a free port
    cmd += [str(ROOT / "generate_experts.py")]
    cmd += ["--expert", "edge", "--data_path", str(root), "--save_path", str(save), "--weights", str(weights)]

    def launch() -> list[list[str]]:
        done = subprocess.run([*cmd, "--num_workers", "1"], env=env, cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        keys = ("already", "written", "corrupt")
        return [line.split() for line in done.stdout.splitlines() if line.strip().startswith(keys)]

    # Summed over both processes, printed once.
    assert launch() == [["already", "done", "0"], ["written", "3"], ["corrupt", "(skipped)", "1"]]
    assert sorted(p.relative_to(save).as_posix() for p in save.rglob("*.png")) == [
        "edge/imgs/a.png",
        "edge/imgs/b.png",
        "edge/imgs/sub/c.png",
    ]
    (save / "edge" / "imgs" / "b.png").unlink()  # now one process has nothing to do
    assert launch() == [["already", "done", "2"], ["written", "1"], ["corrupt", "(skipped)", "1"]]
    assert (save / "edge" / "imgs" / "b.png").is_file()


def test_a_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    argv = ["--expert", "edge", "--data_path", str(tmp_path / "empty"), "--save_path", str(tmp_path / "l")]
    with pytest.raises(ConfigError, match="no .jpg"):
        generate_experts.main(argv)


def test_an_expert_without_a_network_says_which_exist():
    with pytest.raises(NotImplementedError, match="no label network for 'rgb'; label networks: depth, normal, edge"):
        generator_network("rgb")


def test_two_images_claiming_one_label_file_are_reported_not_overwritten(folder, tmp_path, caplog):
    """pet.jpg and pet.png map to the same pet.png label (official layout): the first
    in sorted order keeps it, the other is skipped and counted, never written over it."""
    root, weights = folder
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(root / "b.png")  # b.jpg is blue from column 10
    save = tmp_path / "labels"
    totals = run(folder, save)
    assert counts(totals)["written"] == 3 and counts(totals)["name taken (skipped)"] == 1
    assert "b.png: its label" in caplog.text and "b.jpg's" in caplog.text
    a = np.asarray(Image.open(save / "edge" / "imgs" / "b.png"))
    assert (a[:, 12:] == 0).all()  # b.jpg's label (blue from column 10), not the black b.png's (all white)


def test_weights_from_a_folder_of_official_files(folder, tmp_path):
    root, weights = folder
    official = tmp_path / "expert_weights"
    official.mkdir()
    weights.rename(official / "10_model.pth")
    argv = ["--expert", "edge", "--data_path", str(root), "--save_path", str(tmp_path / "l"), "--num_workers", "0"]
    assert generate_experts.main([*argv, "--weights", str(official)])["edge"]["written"] == 3


def test_a_killed_run_resumes_without_partial_files(folder, tmp_path):
    """SIGKILL mid-run (no handler runs), then the same command: every label is
    complete, the ones written before the kill are kept, no temporary file is left."""
    root, weights = folder
    for i in range(5):
        Image.fromarray(np.full((64, 64, 3), (0, 0, 20 * i), np.uint8)).save(root / f"more_{i:02d}.jpg")
    save = tmp_path / "labels"
    out = save / "edge" / "imgs"
    cmd = [sys.executable, str(ROOT / "generate_experts.py"), "--expert", "edge", "--data_path", str(root)]
    cmd += ["--save_path", str(save), "--weights", str(weights), "--batch_size", "1", "--num_workers", "0"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(list(out.glob("*.png"))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert 2 <= len(before) < 8, "the run was not stopped midway"
    (out / ".more_04.png.abc.tmp").write_bytes(b"half a png")  # as a kill during a write leaves it
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    labels = sorted(out.rglob("*.png"))
    assert len(labels) == 8 and not list(save.rglob("*.tmp"))
    for p in labels:
        with Image.open(p) as img:
            img.load()  # a truncated PNG would raise
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png") if p.name in before} == before
