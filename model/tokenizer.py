"""RoBERTa's byte-level BPE tokenizer, from a hub id or a local folder."""

from __future__ import annotations

from pathlib import Path

from transformers import RobertaTokenizerFast

from helpers.hub import DownloadError, hub_file


def load_tokenizer(name_or_path: str) -> RobertaTokenizerFast:
    if Path(name_or_path).is_dir():
        return RobertaTokenizerFast.from_pretrained(name_or_path)
    # Fetch the files ourselves so that an offline machine gets a clear error.
    what = f"the {name_or_path} tokenizer"
    folder = hub_file(name_or_path, "vocab.json", what).parent
    hub_file(name_or_path, "merges.txt", what)
    for optional in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        try:
            hub_file(name_or_path, optional, what)
        except DownloadError:
            pass
    return RobertaTokenizerFast.from_pretrained(str(folder))


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
