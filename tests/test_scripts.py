"""Entry-point scripts, called as users call them (main(argv))."""

import pytest

import download_checkpoints
from common.hub import DownloadError


def test_download_rejects_unknown_names():
    with pytest.raises(SystemExit):
        download_checkpoints.main(["caption_prismer_tiny"])


def test_download_offline_says_what_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(DownloadError, match="vqa_prismerz_large/pytorch_model.bin"):
        download_checkpoints.main(["vqa_prismerz_large", "--out", str(tmp_path)])
    assert not any(tmp_path.rglob("*.part"))


def test_download_keeps_existing_files(tmp_path):
    target = tmp_path / "caption_prismer_base" / "pytorch_model.bin"
    target.parent.mkdir()
    target.write_bytes(b"x")
    assert download_checkpoints.main(["caption_prismer_base", "--out", str(tmp_path)]) == [target]
