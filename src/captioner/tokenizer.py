"""The vocabulary stage: word ids from the training split, saved as vocab.json.

Ids 0-3 are the special tokens of text.py; words follow by descending training count (ties by
first appearance), so id order is stable and readable. Words rarer than `min_count` map to <unk>.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from captioner.captions import read_split
from captioner.config import Config
from captioner.errors import CaptionerError
from captioner.io import file_sha256, log, read_json, write_json
from captioner.text import END_ID, PAD_ID, SPECIAL_TOKENS, START_ID, UNK_ID

VOCAB_FORMAT = 1


@dataclass(frozen=True)
class Vocabulary:
    tokens: tuple[str, ...]  # index -> token; tokens[:4] are the special tokens
    counts: tuple[int, ...]  # training count of each token (0 for special tokens)
    max_length: int  # longest caption in words that training and decoding use
    settings: dict

    def __post_init__(self) -> None:
        if tuple(self.tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise CaptionerError(f"vocabulary must start with the special tokens {SPECIAL_TOKENS}")
        object.__setattr__(self, "_index", {t: i for i, t in enumerate(self.tokens)})

    @property
    def size(self) -> int:
        return len(self.tokens)

    @classmethod
    def from_captions(
        cls,
        captions: Iterable[str],
        min_count: int = 1,
        max_length: int = 0,
        length_percentile: float = 100.0,
    ) -> Vocabulary:
        """Count words of clean captions; cap lengths at a percentile and/or `max_length`."""
        counter: Counter[str] = Counter()
        lengths = []
        for caption in captions:
            words = caption.split()
            counter.update(words)
            lengths.append(len(words))
        if not lengths:
            raise CaptionerError("no training captions to build a vocabulary from")
        kept = [
            (w, c) for w, c in counter.most_common() if c >= min_count and w not in SPECIAL_TOKENS
        ]
        if not kept:  # every caption would decode to ""
            top = max(counter.values(), default=0)
            raise CaptionerError(
                f"tokenizer.min_count={min_count} keeps no word (the most frequent training word "
                f"is seen {top} times in {len(lengths)} captions); lower --min-count"
            )
        longest = int(np.ceil(np.percentile(lengths, length_percentile)))
        if max_length > 0:
            longest = min(longest, max_length)
        settings = {
            "min_count": min_count,
            "max_length": max_length,
            "length_percentile": length_percentile,
            "format": VOCAB_FORMAT,
        }
        return cls(
            tokens=SPECIAL_TOKENS + tuple(w for w, _ in kept),
            counts=(0,) * len(SPECIAL_TOKENS) + tuple(c for _, c in kept),
            max_length=max(1, longest),
            settings=settings,
        )

    def encode(self, caption: str) -> list[int]:
        """Word ids of a clean caption, truncated to max_length, without start/end."""
        index = self._index  # type: ignore[attr-defined]
        return [index.get(w, UNK_ID) for w in caption.split()[: self.max_length]]

    def decode(self, ids: Sequence[int]) -> str:
        """Words up to the first <end>; padding, <start> and <unk> are dropped."""
        words = []
        for i in ids:
            i = int(i)
            if i == END_ID:
                break
            if i in (PAD_ID, START_ID, UNK_ID):
                continue
            words.append(self.tokens[i])
        return " ".join(words)

    def to_json(self) -> dict:
        return {
            "format": VOCAB_FORMAT,
            "size": self.size,
            "max_length": self.max_length,
            "settings": self.settings,
            "tokens": list(self.tokens),
            "counts": list(self.counts),
        }

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        data = read_json(path)
        try:
            vocab = cls(
                tokens=tuple(data["tokens"]),
                counts=tuple(data["counts"]),
                max_length=int(data["max_length"]),
                settings=dict(data["settings"]),
            )
        except (KeyError, TypeError) as error:
            raise CaptionerError(f"{path}: not a captioner vocabulary ({error})") from None
        if vocab.size == len(SPECIAL_TOKENS):  # made before empty vocabularies were refused
            raise CaptionerError(
                f"{path}: a vocabulary without words; rebuild it with a lower --min-count"
            )
        return vocab


def build_vocab(cfg: Config) -> Path:
    """The tokenizer stage: train-split captions of cfg.captions_csv -> cfg.vocab_json.

    Reused while the settings and the captions it came from (their sha256) are unchanged.
    """
    if not cfg.captions_csv.is_file():
        raise CaptionerError(f"{cfg.captions_csv}: not found; run `captioner clean` first")
    tok = cfg.tokenizer
    settings = {
        "min_count": tok.min_count,
        "max_length": tok.max_length,
        "length_percentile": tok.length_percentile,
        "format": VOCAB_FORMAT,
        "captions_sha256": file_sha256(cfg.captions_csv),
    }
    if cfg.vocab_json.is_file():
        try:
            if Vocabulary.load(cfg.vocab_json).settings == settings:
                log(f"reusing {cfg.vocab_json}")
                return cfg.vocab_json
        except CaptionerError as error:
            log(f"rebuilding: {error}")
    captions = read_split(cfg, "train")["caption"]
    if captions.empty:
        raise CaptionerError(
            f"{cfg.captions_csv}: no captions in the train split; "
            "run `captioner clean` with another --split"
        )
    vocab = Vocabulary.from_captions(captions, tok.min_count, tok.max_length, tok.length_percentile)
    vocab = dataclasses.replace(vocab, settings=settings)
    write_json(cfg.vocab_json, vocab.to_json())
    log(
        f"vocabulary: {vocab.size} tokens (words seen >= {tok.min_count} times in "
        f"{len(captions)} training captions), max_length {vocab.max_length}"
    )
    return cfg.vocab_json
