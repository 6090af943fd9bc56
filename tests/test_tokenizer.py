import os
from pathlib import Path

import pytest
from tinydata import fixture_captions, write_captions

from captioner.errors import CaptionerError
from captioner.io import read_json
from captioner.text import END_ID, PAD_ID, SPECIAL_TOKENS, START_ID, UNK_ID, normalize
from captioner.tokenizer import Vocabulary, build_vocab

SIZES = {"train": 40, "dev": 10, "test": 5}


@pytest.fixture(scope="module")
def real_captions(flickr8k_fixtures: Path) -> list[str]:
    """Clean captions of the first 200 images of the real Flickr8k token file."""
    by_image = fixture_captions(flickr8k_fixtures)
    return [normalize(raw) for name in list(by_image)[:200] for raw in by_image[name]]


def test_encode_decode_round_trips_on_real_captions(real_captions):
    vocab = Vocabulary.from_captions(real_captions, min_count=1)
    assert vocab.tokens[:4] == SPECIAL_TOKENS
    assert vocab.max_length == max(len(c.split()) for c in real_captions)
    for caption in real_captions:
        ids = vocab.encode(caption)
        assert min(ids) > END_ID  # only word ids: start/end are added by the data pipeline
        assert vocab.decode(ids) == caption


def test_decoding_stops_at_the_end_token(real_captions):
    vocab = Vocabulary.from_captions(real_captions, min_count=1)
    first, second = real_captions[0], real_captions[1]
    ids = [START_ID, *vocab.encode(first), END_ID, *vocab.encode(second), PAD_ID]
    assert vocab.decode(ids) == first
    assert vocab.decode([END_ID, *vocab.encode(second)]) == ""


def test_min_count_maps_rare_words_to_unknown(real_captions):
    full = Vocabulary.from_captions(real_captions, min_count=1)
    pruned = Vocabulary.from_captions(real_captions, min_count=5)
    assert 4 < pruned.size < full.size
    assert all(count >= 5 for count in pruned.counts[4:])
    assert list(pruned.counts[4:]) == sorted(pruned.counts[4:], reverse=True)  # by frequency
    rare = next(t for t, c in zip(full.tokens, full.counts, strict=True) if 0 < c < 5)
    assert UNK_ID in pruned.encode(f"a {rare} dog")
    assert pruned.decode(pruned.encode(f"a {rare} dog")) == "a dog"


def test_length_cap_and_percentile(real_captions):
    capped = Vocabulary.from_captions(real_captions, max_length=6)
    assert capped.max_length == 6
    assert max(len(capped.encode(c)) for c in real_captions) == 6
    lengths = sorted(len(c.split()) for c in real_captions)
    median = Vocabulary.from_captions(real_captions, length_percentile=50)
    assert median.max_length == lengths[len(lengths) // 2]


def test_build_vocab_uses_train_split_only_and_is_reused(tiny_config, flickr8k_like, capsys):
    cfg = tiny_config("mini", **{"tokenizer.min_count": 1})
    frame = write_captions(cfg, flickr8k_like, SIZES)
    path = build_vocab(cfg)
    assert path == cfg.vocab_json
    vocab = Vocabulary.load(path)
    train_words = {w for c in frame.loc[frame.split == "train", "caption"] for w in c.split()}
    assert set(vocab.tokens[4:]) == train_words  # dev/test-only words are not in it
    data = read_json(path)
    assert data["size"] == vocab.size and data["settings"]["min_count"] == 1
    assert len(data["settings"]["captions_sha256"]) == 64

    mtime = os.stat(path).st_mtime_ns
    capsys.readouterr()
    assert build_vocab(cfg) == path
    assert "reusing" in capsys.readouterr().err and os.stat(path).st_mtime_ns == mtime

    frequent = tiny_config("mini", **{"tokenizer.min_count": 100})  # another setting
    assert Vocabulary.load(build_vocab(frequent)).size < vocab.size
    write_captions(cfg, flickr8k_like, {**SIZES, "train": 1})  # the captions changed
    assert Vocabulary.load(build_vocab(cfg)).size < vocab.size


def test_build_vocab_errors_are_one_line(tiny_config, flickr8k_like, tmp_path):
    cfg = tiny_config("mini")
    with pytest.raises(CaptionerError, match="captions.csv: not found; run `captioner clean"):
        build_vocab(cfg)
    write_captions(cfg, flickr8k_like, {"dev": 3})
    with pytest.raises(CaptionerError, match="no captions in the train split"):
        build_vocab(cfg)
    broken = tmp_path / "vocab.json"
    broken.write_text('{"tokens": ["<pad>"]}')
    with pytest.raises(CaptionerError, match="vocab.json: not a captioner vocabulary"):
        Vocabulary.load(broken)
