from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from tinydata import write_dataset

from captioner import data
from captioner.captions import read_split
from captioner.text import END_ID, START_ID
from captioner.tokenizer import Vocabulary


@pytest.fixture
def memmap(tmp_path: Path) -> np.ndarray:
    """A (30, 5) float16 feature file opened as a memmap, like a feature cache."""
    values = np.random.default_rng(1).normal(size=(30, 5)).astype(np.float16)
    np.save(tmp_path / "features.npy", values)
    return np.load(tmp_path / "features.npy", mmap_mode="r", allow_pickle=False)


def random_captions(count: int, seed: int = 0) -> tuple[np.ndarray, list[list[int]]]:
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 30, size=count)
    captions = [rng.integers(4, 50, size=rng.integers(1, 15)).tolist() for _ in range(count)]
    return rows, captions


def unbatch(dataset) -> list[tuple[tuple, tuple, tuple]]:
    """Every (features, tokens, targets) example of a dataset, padding removed."""
    examples = []
    for inputs, targets in dataset:
        for feats, tokens, target in zip(
            inputs["features"].numpy(), inputs["tokens"].numpy(), targets.numpy(), strict=True
        ):
            length = int((target != 0).sum())
            assert (tokens[length:] == 0).all() and (target[length:] == 0).all()
            examples.append((tuple(feats), tuple(tokens[:length]), tuple(target[:length])))
    return examples


@pytest.mark.parametrize("bucket", [True, False])
def test_make_dataset_yields_every_caption_once_with_its_features(memmap, bucket):
    rows, captions = random_captions(50)
    dataset = data.make_dataset(
        memmap, rows, captions, batch_size=8, shuffle=True, seed=3, bucket=bucket
    )
    expected = Counter(
        (tuple(np.asarray(memmap[row], np.float32)), (START_ID, *caption), (*caption, END_ID))
        for row, caption in zip(rows, captions, strict=True)
    )
    assert Counter(unbatch(dataset)) == expected
    for inputs, targets in dataset.take(3):
        assert inputs["features"].dtype.name == "float32" and inputs["tokens"].dtype.name == "int32"
        assert inputs["features"].shape[1] == 5 and targets.shape == inputs["tokens"].shape
        assert targets.shape[0] <= 8
        # padded to the batch's longest caption, not to a global maximum
        assert (targets.numpy()[:, -1] != 0).any()
    # without tf.data's autotuner, whose sleeping thread held each epoch's end (tfdata.py)
    assert dataset.options().autotune.enabled is False


def test_bucketing_computes_less_padding(memmap):
    rows, captions = random_captions(400)

    def padded_tokens(bucket: bool) -> int:
        dataset = data.make_dataset(memmap, rows, captions, 16, shuffle=True, seed=0, bucket=bucket)
        return sum(int(np.prod(targets.shape)) for _, targets in dataset)

    assert padded_tokens(True) < 0.8 * padded_tokens(False)


def test_shuffle_is_seeded_and_reshuffles_each_epoch(memmap):
    rows, captions = random_captions(60)

    def order(seed: int, epochs: int = 1) -> list:
        dataset = data.make_dataset(
            memmap, rows, captions, 60, shuffle=True, seed=seed, bucket=False
        )
        return [targets.numpy().tolist() for _ in range(epochs) for _, targets in dataset]

    assert order(5) == order(5)
    assert order(5) != order(6)
    first, second = order(5, epochs=2)
    assert first != second
    unshuffled = data.make_dataset(memmap, rows, captions, 60, shuffle=False, seed=0, bucket=False)
    targets = next(iter(unshuffled))[1].numpy()
    assert [list(t[t != 0][:-1]) for t in targets] == captions


def test_feature_stats_in_chunks_match_numpy(memmap):
    rows = np.array([3, 3, 7, 12, 29, 0, 7])
    mean, variance = data.feature_stats(memmap, rows, chunk_size=2)
    unique = np.asarray(memmap[np.unique(rows)], np.float64)
    np.testing.assert_allclose(mean, unique.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(variance, unique.var(axis=0), rtol=1e-4, atol=1e-6)
    assert mean.dtype == np.float32 and mean.shape == (5,)


def test_feature_stats_floor_dead_dimensions():
    """A dimension that is zero on every training image must not explode on another image."""
    rng = np.random.default_rng(0)
    features = rng.random((10, 4)).astype(np.float32)
    features[:, 2] = 0.0  # dead on all training rows
    mean, variance = data.feature_stats(features, np.arange(10))
    expected = data.VARIANCE_FLOOR * features.astype(np.float64).var(axis=0).mean()
    assert variance[2] == pytest.approx(expected, rel=1e-4)
    standardised = (0.5 - mean[2]) / np.sqrt(variance[2])  # the unit fires on a new image
    assert standardised < 100


def test_encode_split_skips_captions_without_features(tiny_config, flickr8k_like, capsys):
    cfg = tiny_config("mini")
    frame = write_dataset(cfg, flickr8k_like, {"train": 6, "dev": 2}, dim=7, drop=2)
    vocab = Vocabulary.from_captions(frame["caption"], min_count=1)
    ids = (cfg.features_dir / "ids.txt").read_text().split()
    train = read_split(cfg, "train")
    assert len(train) == 30 and set(train["image"]) <= set(frame["image"])
    rows, captions = data.encode_split(
        read_split(cfg, "dev"), vocab, {name: i for i, name in enumerate(ids)}, "dev"
    )
    assert len(captions) == 0 and rows.shape == (0,)  # both dev images were dropped
    err = capsys.readouterr().err
    assert "dev: skipped 10 captions of 2 images that have no feature row" in err
    rows, captions = data.encode_split(
        train, vocab, {name: i for i, name in enumerate(ids)}, "train"
    )
    assert len(captions) == 30 and rows.max() < len(ids)
    assert [vocab.decode(c) for c in captions] == list(train["caption"])
