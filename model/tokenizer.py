"""RoBERTa's byte-level BPE tokenizer, from a hub id or a local folder."""

from __future__ import annotations

from pathlib import Path

from transformers import RobertaTokenizerFast

from common.files import CheckpointError, load_json, reason
from common.hub import DownloadError, hub_file

# The JSON files a tokenizer folder may hold, each an object.
JSON_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def load_tokenizer(name_or_path: str) -> RobertaTokenizerFast:
    if Path(name_or_path).is_dir():
        return _from_folder(Path(name_or_path))
    # Fetch the files ourselves so that an offline machine gets a clear error.
    what = f"the {name_or_path} tokenizer"
    try:
        folder = hub_file(name_or_path, "vocab.json", what).parent
        hub_file(name_or_path, "merges.txt", what)
    except DownloadError as e:
        raise DownloadError(
            f"{e}\n`python download_checkpoints.py --tokenizers` fetches it; or set the config key `tokenizer` "
            "(`--set tokenizer=DIR`, or `tokenizer=` in from_official / from_pretrained) to a local copy's folder."
        ) from e
    for optional in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        try:
            hub_file(name_or_path, optional, what)
        except DownloadError:
            pass
    return _from_folder(folder)


def _from_folder(folder: Path) -> RobertaTokenizerFast:
    """A byte-level BPE from `folder`; a missing or unreadable file raises an error naming it
    (an empty folder would otherwise give a five-token tokenizer)."""
    merges = folder / "merges.txt"
    if not (folder / "tokenizer.json").is_file() and not ((folder / "vocab.json").is_file() and merges.is_file()):
        raise FileNotFoundError(f"{folder}: no tokenizer.json, nor vocab.json and merges.txt: not a RoBERTa tokenizer")
    try:
        return RobertaTokenizerFast.from_pretrained(str(folder))
    except Exception as e:  # the tokenizers library's errors name no file: find it
        for name in JSON_FILES:
            if (folder / name).is_file():
                load_json(folder / name, "a tokenizer file (JSON object)")
        try:
            if merges.is_file():
                merges.read_text(encoding="utf-8")
        except UnicodeDecodeError as bad:
            raise CheckpointError(f"{merges}: not text, expected BPE merges ({reason(bad)})") from e
        raise CheckpointError(f"{folder}: not a RoBERTa byte-level BPE tokenizer ({reason(e)})") from e


def train_tokenizer(texts, vocab_size: int, folder: str | Path) -> RobertaTokenizerFast:
    """A RoBERTa-style byte-level BPE trained on `texts` and saved to `folder`
    (for from-scratch models on small text worlds; no download needed).
    Special ids match RoBERTa's: <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4."""
    from tokenizers import ByteLevelBPETokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    )
    bpe.save_model(str(folder))
    tokenizer = RobertaTokenizerFast.from_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return tokenizer
