"""Text normalisation and the special tokens: the one place that defines both.

Captions are stored clean and without start/end words (captions.csv); the tokenizer adds the
special tokens as ids, never as literal words, so "startseq" can never leak into a score.
"""

from __future__ import annotations

import re

PAD, UNK, START, END = "<pad>", "<unk>", "<start>", "<end>"
SPECIAL_TOKENS = (PAD, UNK, START, END)  # their ids are their positions: 0, 1, 2, 3
PAD_ID, UNK_ID, START_ID, END_ID = range(4)

_NOT_LETTER = re.compile(r"[^a-z ]+")
_SPACES = re.compile(r" +")


def normalize(caption: str) -> str:
    """The reference approach's cleaning: lower case, letters and spaces only, spaces collapsed.

    Non-letters are removed (not replaced), exactly as the notebook did: "dog's" -> "dogs".
    Tabs and newlines count as spaces.
    """
    text = caption.lower().replace("\t", " ").replace("\n", " ")
    text = _NOT_LETTER.sub("", text)
    return _SPACES.sub(" ", text).strip()
