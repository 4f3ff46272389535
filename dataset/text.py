"""Caption and question cleaning, as the official Prismer data pipeline does it.

The tokenizer is the model's concern; these functions only normalise raw
annotation text (the caption dataset cleans "prefix + caption" as one string).
"""

from __future__ import annotations

import re

# The characters the official pipeline replaces by spaces.
_PUNCTUATION = re.compile(r"[.!\"()*#:;~]")
_SPACES = re.compile(r"\s+")
MAX_WORDS = 30


def _clean(text: str, max_words: int) -> str:
    text = _PUNCTUATION.sub(" ", text.strip().capitalize())
    words = _SPACES.sub(" ", text).strip().split(" ")
    return " ".join(words[:max_words])


def pre_caption(caption: str, max_words: int = MAX_WORDS) -> str:
    """Capitalise the first letter (lower-casing the rest, as the official code
    does), strip the listed punctuation, collapse whitespace, keep at most
    `max_words` words."""
    return _clean(caption, max_words)


def pre_question(question: str, max_words: int = MAX_WORDS) -> str:
    """Clean like a caption, then make sure the question ends with '?'."""
    question = _clean(question, max_words)
    return question if question.endswith("?") else question + "?"
