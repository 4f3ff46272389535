"""RoBERTa's tokenizer from a local folder or a hub id (which fails fast offline)."""

import pytest

from common.hub import DownloadError
from model.tokenizer import load_tokenizer


def test_local_folder_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))
    text = "a picture of a small yellow cylinder"
    assert again(text).input_ids == tokenizer(text).input_ids
    assert (again.bos_token_id, again.pad_token_id, again.eos_token_id) == (0, 1, 2)
    assert again.decode(again(text).input_ids, skip_special_tokens=True) == text


def test_hub_id_offline_names_the_files(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(DownloadError, match=r"vocab.json from hub repo FacebookAI/roberta-base") as err:
        load_tokenizer("FacebookAI/roberta-base")
    # what to run, and the key that points at a local copy instead
    assert "download_checkpoints.py --tokenizers" in str(err.value) and "--set tokenizer=DIR" in str(err.value)
