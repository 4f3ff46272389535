"""download_checkpoints.py run as users run it (a subprocess) against a fake
Hugging Face hub on 127.0.0.1 (HF_ENDPOINT) that answers the requests
huggingface_hub's hf_hub_download makes: HEAD, then GET, on
/{repo}/resolve/{revision}/{file}, with the ETag, X-Repo-Commit and
Content-Length headers the hub sends. The answer list is a plain URL on the
same server. Nothing is mocked: the real client downloads real bytes."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import unquote

import pytest

import download_checkpoints as dc

ROOT = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"
ANSWERS = json.dumps([f"a{i:04d}" for i in range(3128)]).encode()  # 3128 * 7 + 3127 * 2 + 2 = 28,152 bytes
CHECKPOINT = bytes(range(256)) * 10  # 2,560 bytes
EXPERT_BYTES = {e: f"official {file} bytes".encode() for e, file in dc.EXPERT_FILES.items()}


class FakeHub(http.server.ThreadingHTTPServer):
    def __init__(self, files: dict[str, bytes]):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files, self.requests = files, []
        self.url = f"http://127.0.0.1:{self.server_port}"

    def file_requests(self) -> list[tuple[str, str]]:
        """Requests for files (huggingface_hub also asks /api/ for its own telemetry)."""
        return [(method, path) for method, path in self.requests if not path.startswith("/api/")]


class Handler(http.server.BaseHTTPRequestHandler):
    """`/{owner}/{name}/resolve/{revision}/{path}` and plain `/{path}`: 200 with the
    hub's headers, or 404 with the hub's error code."""

    def _answer(self, body: bool) -> None:
        self.server.requests.append((self.command, self.path))
        parts = unquote(self.path).lstrip("/").split("/")
        key = "/".join(parts[:2] + parts[4:]) if parts[2:3] == ["resolve"] else "/".join(parts)
        data = self.server.files.get(key)
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub():
    files = {"shikunl/prismer/caption_prismer_base/pytorch_model.bin": CHECKPOINT}
    files |= {f"shikunl/prismer/expert_weights/{f}": EXPERT_BYTES[e] for e, f in dc.EXPERT_FILES.items()}
    files |= {f"{repo}/{f}": f"{repo} {f}".encode() for repo in dc.ROBERTA for f in ("vocab.json", "merges.txt")}
    files |= {f"{repo}/tokenizer.json": b"{}" for repo in dc.ROBERTA}
    files |= {"vqa/answer_list.json": ANSWERS, "vqa/short_list.json": json.dumps(["yes", "no"]).encode()}
    server = FakeHub(files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def run(tmp_path: Path, endpoint: str, *args: str) -> subprocess.CompletedProcess:
    """The script with its destinations under tmp_path and its own Hugging Face cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    places = ["--out", str(tmp_path / "ckpt"), "--experts_dir", str(tmp_path / "experts")]
    places += ["--vqa_data", str(tmp_path / "vqa")]
    return subprocess.run(
        [sys.executable, str(ROOT / "download_checkpoints.py"), *args, *places],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_every_group_lands_at_its_destination_and_a_rerun_skips_it(tmp_path, hub):
    stale = tmp_path / "experts" / ".scannet.pt.x1y2z3.part"  # what a killed run leaves
    stale.parent.mkdir()
    stale.write_bytes(b"half a fi")
    args = ["caption_prismer_base", "--experts", "--tokenizers", "--answer_list"]
    args += ["--answer_list_url", f"{hub.url}/vqa/answer_list.json"]
    first = run(tmp_path, hub.url, *args)
    assert first.returncode == 0, first.stderr

    checkpoint = tmp_path / "ckpt" / "caption_prismer_base" / "pytorch_model.bin"
    assert checkpoint.read_bytes() == CHECKPOINT
    assert checkpoint.stat().st_nlink == 2  # a hard link to the cached blob, not a second copy
    for expert, file in dc.EXPERT_FILES.items():
        assert (tmp_path / "experts" / file).read_bytes() == EXPERT_BYTES[expert]
    assert (tmp_path / "vqa" / "answer_list.json").read_bytes() == ANSWERS
    snapshot = tmp_path / "hf" / "hub" / "models--FacebookAI--roberta-large" / "snapshots" / COMMIT
    assert (snapshot / "merges.txt").read_text() == "FacebookAI/roberta-large merges.txt"
    assert not list(tmp_path.rglob("*.part")) and not list(tmp_path.rglob("*.incomplete"))
    gets = [path for method, path in hub.file_requests() if method == "GET"]
    assert len(gets) == len(set(gets)) == 1 + 7 + 1 + 6  # each file fetched once

    seen = len(hub.file_requests())
    second = run(tmp_path, hub.url, *args)
    assert second.returncode == 0, second.stderr
    assert len(hub.file_requests()) == seen  # present files are not even asked about
    assert second.stderr.count("already at") == 15


def test_offline_names_every_missing_file_and_its_place_at_once(tmp_path):
    present = tmp_path / "experts" / "10_model.pth"
    present.parent.mkdir()
    present.write_bytes(b"edge weights")
    start = time.perf_counter()
    args = ["--experts", "--answer_list", "--answer_list_url", "http://127.0.0.1:9/vqa/answer_list.json"]
    result = run(tmp_path, "http://127.0.0.1:9", *args)  # nothing listens on port 9
    assert result.returncode == 1 and time.perf_counter() - start < 20
    lines = result.stderr.splitlines()
    assert lines[0].startswith("offline (cannot reach 127.0.0.1:9") and "nothing fetched" in lines[0]
    expected = [
        f"shikunl/prismer expert_weights/{file} -> {tmp_path / 'experts' / file}"
        for file in dc.EXPERT_FILES.values()
        if file != "10_model.pth"
    ]
    expected.append(f"http://127.0.0.1:9/vqa/answer_list.json -> {tmp_path / 'vqa' / 'answer_list.json'}")
    assert lines[1:] == expected
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["10_model.pth"]


def test_list_shows_hub_sizes_online_and_unknown_offline(tmp_path, hub):
    (tmp_path / "experts").mkdir()
    (tmp_path / "experts" / "scannet.pt").write_bytes(b"x" * 1234)
    args = ["--list", "--checkpoints", "caption_prismer_base", "--experts", "normal", "--answer_list"]
    url = f"{hub.url}/vqa/answer_list.json"
    online = run(tmp_path, hub.url, *args, "--answer_list_url", url)
    assert online.returncode == 0, online.stderr
    rows = [line.split() for line in online.stdout.splitlines()[1:]]
    assert rows[0] == ["checkpoints", "caption_prismer_base", "2.6", "kB", "missing"] + [
        str(tmp_path / "ckpt" / "caption_prismer_base" / "pytorch_model.bin")
    ]
    assert rows[1] == ["experts", "normal", "1.2", "kB", "present", str(tmp_path / "experts" / "scannet.pt")]
    assert rows[2][2:] == ["28.2", "kB", "missing", str(tmp_path / "vqa" / "answer_list.json")]
    assert rows[3][0] == "shipped" and rows[3][-1].endswith("common/label_spaces/label_features.safetensors")
    assert not any(method == "GET" for method, _ in hub.file_requests())  # sizes from HEAD only

    offline = run(tmp_path, "http://127.0.0.1:9", *args, "--answer_list_url", "http://127.0.0.1:9/a.json")
    sizes = [line.split()[2] for line in offline.stdout.splitlines()[1:4]]
    assert offline.returncode == 0 and sizes == ["unknown", "1.2", "unknown"]
    assert not (tmp_path / "ckpt").exists()


def test_an_answer_list_that_is_not_the_official_one_is_not_installed(tmp_path, hub):
    result = run(tmp_path, hub.url, "--answer_list", "--answer_list_url", f"{hub.url}/vqa/short_list.json")
    assert result.returncode == 1 and "2 answers, expected the official 3128" in result.stderr
    assert list((tmp_path / "vqa").iterdir()) == []


def test_the_lists_match_the_expert_registry_and_model_sizes():
    from common.modalities import EXPERTS
    from model.config import model_sizes

    registered = {e.name: e.weights for e in EXPERTS.values() if e.weights}
    assert registered == {e: f"expert_weights/{dc.EXPERT_FILES[e]}" for e in registered}
    assert len(dc.EXPERT_FILES) == 7 and len(dc.CHECKPOINTS) == 12
    sizes = model_sizes()
    assert dc.CLIP_VISION == (sizes["base"]["clip"], sizes["large"]["clip"])
    assert dc.ROBERTA == (sizes["base"]["roberta_name"], sizes["large"]["roberta_name"])
