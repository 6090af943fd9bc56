"""Feature cache: decoding equals keras load_img, VGG16 equals the reference loop, bad input is
listed not fatal, a killed run resumes to the same array, shards merge to the unsharded cache."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from captioner import encoders, features
from captioner.errors import CaptionerError
from captioner.feature_cache import load_cache

SMALL = "mobilenetv3small"  # ~0.1 GFLOP per image: for tests of the cache machinery


def fixture_images(fixtures: Path, count: int) -> list[Path]:
    return sorted((fixtures / "Flicker8k_Dataset").glob("*.jpg"))[:count]


def write_bad_files(folder: Path, source: Path) -> dict[str, str]:
    """Broken and unusual image files made from one real photo; {name: "ok" | reason part}."""
    photo = Image.open(source)
    data = source.read_bytes()
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "text.jpg").write_text("this is a caption file, not a photo\n")
    photo.convert("CMYK").save(folder / "cmyk.jpg")
    photo.convert("L").save(folder / "grey.png")
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE)
    palette.save(folder / "palette.png", transparency=0)
    photo.convert("RGBA").save(folder / "alpha.png")
    grey = np.asarray(photo.convert("L"), np.uint16) * 257  # the same picture in 16 bits
    Image.fromarray(grey).save(folder / "sixteen.png")
    return {
        "zero.jpg": "empty",
        "truncated.jpg": "cannot decode",
        "text.jpg": "not an image",
        "cmyk.jpg": "ok",
        "grey.png": "ok",
        "palette.png": "ok",
        "alpha.png": "ok",
        "sixteen.png": "ok",
    }


def write_dataset(cfg, names: list[str], images_dir: Path) -> None:
    """captions.csv + captions.json as `captioner clean` writes them, one caption per image."""
    cfg.dataset_dir.mkdir(parents=True, exist_ok=True)
    rows = [(name, "train", "a dog runs", "A dog runs.") for name in names]
    pd.DataFrame(rows, columns=["image", "split", "caption", "raw"]).to_csv(
        cfg.captions_csv, index=False
    )
    meta = {
        "format": "csv",
        "split": "random",
        "seed": 0,
        "images_dir": str(images_dir),
        "counts": {"captions": len(rows)},
    }
    cfg.captions_csv.with_name("captions.json").write_text(json.dumps(meta))


def copy_images(paths: list[Path], folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for path in paths:
        shutil.copy(path, folder / path.name)
    return [path.name for path in paths]


# --- decoding ------------------------------------------------------------------------------------
def test_load_image_equals_keras_load_img(flickr8k_like, tmp_path):
    import keras

    from captioner.images import load_image

    photos = fixture_images(flickr8k_like, 3)
    expected = write_bad_files(tmp_path, photos[0])
    convertible = [
        tmp_path / name for name, how in expected.items() if how == "ok" and name != "sixteen.png"
    ]
    for path in photos + convertible:
        reference = np.asarray(keras.utils.load_img(path, target_size=(224, 224)))
        ours = load_image(path)
        assert ours.shape == (224, 224, 3) and ours.dtype == np.uint8
        np.testing.assert_array_equal(ours, reference, err_msg=path.name)


def test_16_bit_image_is_scaled_not_clipped(flickr8k_like, tmp_path):
    from captioner.images import load_image

    write_bad_files(tmp_path, fixture_images(flickr8k_like, 1)[0])
    # Pillow's own convert("RGB") clips 16-bit values to 255; ours keeps the picture.
    np.testing.assert_array_equal(
        load_image(tmp_path / "sixteen.png"), load_image(tmp_path / "grey.png")
    )


# captioner.images silences this warning (it raises BadImage instead); pytest re-enables it
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_files_raise_bad_image_with_reason(flickr8k_like, tmp_path, monkeypatch):
    from captioner.images import BadImage, load_image

    expected = write_bad_files(tmp_path, fixture_images(flickr8k_like, 1)[0])
    expected["absent.jpg"] = "missing"
    for name, reason in expected.items():
        if reason != "ok":
            with pytest.raises(BadImage, match=reason):
                load_image(tmp_path / name)
    Image.new("RGB", (60, 50)).save(tmp_path / "huge.png")  # 3,000 pixels
    for limit in (2000, 1000):  # Pillow warns over 1x its limit and refuses over 2x
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(BadImage, match="too large"):
            load_image(tmp_path / "huge.png")


# --- encoders and the cache (the mobilenet tests share one built encoder: see build_encoder) ----
def test_weights_from_file_missing_file_and_failed_download(tmp_path, monkeypatch):
    from keras.src.utils import file_utils

    random = encoders.build_encoder(SMALL, "none", precision="float32", seed=0)
    random.model.save_weights(tmp_path / "small.weights.h5")
    loaded = encoders.build_encoder(SMALL, str(tmp_path / "small.weights.h5"), "float32", seed=9)
    assert loaded is not random and loaded.weights == str(tmp_path / "small.weights.h5")
    for ours, theirs in zip(loaded.model.weights, random.model.weights, strict=True):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy(), err_msg=ours.path)

    with pytest.raises(CaptionerError, match="weights file not found"):
        encoders.build_encoder(SMALL, str(tmp_path / "nope.h5"))

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/x: None -- offline")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(CaptionerError, match=r"could not download .* pass --weights PATH"):
        encoders.build_encoder(SMALL, "imagenet")
    with pytest.raises(CaptionerError, match="unknown encoder"):
        encoders.build_encoder("vgg17", "none")


def test_extract_lists_bad_images_and_reuses_finished_cache(
    flickr8k_like, tiny_config, tmp_path, capsys
):
    folder = tmp_path / "images"
    photos = copy_images(fixture_images(flickr8k_like, 4), folder)
    expected = write_bad_files(folder, folder / photos[0])
    names = photos[:2] + list(expected) + ["absent.jpg"] + photos[2:]
    cfg = tiny_config(
        "mine",
        **{
            "features.encoder": SMALL,
            "features.weights": "none",
            "features.chunk_size": 3,
            "features.batch_size": 2,
            "features.precision": "float32",
        },
    )
    write_dataset(cfg, names, folder)

    out = features.extract(cfg)
    cache = load_cache(out)
    good = [n for n in names if n in photos or expected.get(n) == "ok"]
    assert out == cfg.features_dir and cache.ids == good and cache.row[good[2]] == 2
    assert cache.features.shape == (len(good), 576) and cache.features.dtype == np.float32
    bad = dict(line.split("\t") for line in (out / "bad_images.txt").read_text().splitlines())
    assert sorted(bad) == sorted(["zero.jpg", "truncated.jpg", "text.jpg", "absent.jpg"])
    for name, reason in bad.items():
        assert expected.get(name, "missing") in reason
    meta = cache.meta
    assert (meta["count"], meta["bad"], meta["missing"], meta["dim"]) == (len(good), 3, 1, 576)
    assert (meta["precision"], meta["weights"], meta["seed"]) == ("float32", "none", 0)
    assert not (out / "chunks").exists()

    # Each row is the feature of its own image, whatever batch it was computed in.
    encoder = encoders.build_encoder(SMALL, "none", precision="float32", seed=0)
    alone, _, _ = encoder.encode_files([folder / good[-1], folder / "grey.png"], batch_size=1)
    np.testing.assert_allclose(cache.features[[-1, good.index("grey.png")]], alone, rtol=1e-5)
    # without tf.data's autotuner, whose sleeping thread held the end of a long run (tfdata.py)
    assert encoder._dataset([[str(folder / "grey.png")]], 1).options().autotune.enabled is False

    stamp = (out / "features.npy").stat().st_mtime_ns
    capsys.readouterr()
    assert features.extract(cfg) == out
    assert "reusing" in capsys.readouterr().err
    assert (out / "features.npy").stat().st_mtime_ns == stamp
    from captioner.config import replace

    with pytest.raises(CaptionerError, match="dtype='float32', not 'float16'"):
        features.extract(replace(cfg, **{"features.dtype": "float16"}))


@pytest.mark.slow
def test_merged_shards_equal_unsharded_run(flickr8k_like, tiny_config, tmp_path):
    folder = flickr8k_like / "Flicker8k_Dataset"
    names = [p.name for p in fixture_images(flickr8k_like, 9)]
    names.insert(4, "absent.jpg")
    settings = {  # VGG16's 2x2x512 grids of 32-pixel images: float16 by default
        "features.weights": "none",
        "features.chunk_size": 2,
        "features.batch_size": 2,
        "features.layout": "grid",
        "features.image_size": 32,
    }
    whole = tiny_config("mine", **settings)
    write_dataset(whole, names, folder)
    expected = load_cache(features.extract(whole))

    sharded = tiny_config("mine", **settings, **{"data.data_dir": str(tmp_path / "sharded")})
    write_dataset(sharded, names, folder)
    for index in (0, 2):  # 5 chunks in 3 shards: 2 + 2 + 1
        path = features.extract(
            tiny_config(
                "mine",
                **settings,
                **{"data.data_dir": str(tmp_path / "sharded"), "features.shard": f"{index}/3"},
            )
        )
        assert path == sharded.features_dir / "shards" / f"{index}-of-3"
    with pytest.raises(CaptionerError, match=r"shard 1/3 is not finished"):
        features.merge_shards(sharded)
    features.extract(
        tiny_config(
            "mine",
            **settings,
            **{"data.data_dir": str(tmp_path / "sharded"), "features.shard": "1/3"},
        )
    )

    merged = load_cache(features.merge_shards(sharded))
    assert load_cache(sharded.features_dir / "shards" / "2-of-3").ids == names[-2:]
    assert merged.ids == expected.ids and merged.features.dtype == np.float16
    assert merged.features.shape[1:] == (2, 2, 512) and merged.meta["grid"] == [2, 2]
    assert np.count_nonzero(merged.features) > merged.features.size // 4  # real values
    np.testing.assert_array_equal(merged.features, expected.features)
    assert (merged.path / "bad_images.txt").read_text() == (
        expected.path / "bad_images.txt"
    ).read_text()
    assert merged.meta["missing"] == 1 and merged.meta["merged_shards"] == 3


def test_bad_shard_spec_is_one_line_error(tiny_config):
    with pytest.raises(CaptionerError, match="'features.shard' must be I/N with 0 <= I < N"):
        tiny_config("mine", **{"features.shard": "3/3"})


def test_load_cache_accepts_drop_in_and_rejects_broken(tmp_path):
    folder = tmp_path / "features" / "clip"
    with pytest.raises(CaptionerError, match="no feature cache"):
        load_cache(folder)
    (folder / "chunks").mkdir(parents=True)
    with pytest.raises(CaptionerError, match="unfinished feature cache"):
        load_cache(folder)

    vectors = np.arange(21, dtype=np.float32).reshape(3, 7)  # any model, any dimension
    np.save(folder / "features.npy", vectors)
    (folder / "ids.txt").write_text("a.jpg\nb.jpg\nc.jpg\n")
    (folder / "meta.json").write_text(json.dumps({"encoder": "clip", "dim": 7, "count": 3}))
    cache = load_cache(folder)
    np.testing.assert_array_equal(cache.features[cache.row["b.jpg"]], vectors[1])

    (folder / "ids.txt").write_text("a.jpg\nb.jpg\n")
    with pytest.raises(CaptionerError, match="ids.txt has 2 lines"):
        load_cache(folder)
    (folder / "ids.txt").write_text("a.jpg\nb.jpg\nc.jpg\n")
    data = (folder / "features.npy").read_bytes()
    (folder / "features.npy").write_bytes(data[: len(data) - 20])
    with pytest.raises(CaptionerError, match="unreadable cache"):
        load_cache(folder)


@pytest.mark.slow
def test_vgg16_equals_reference_loop_and_bfloat16_is_close(flickr8k_like):
    import keras

    from captioner import reference

    paths = [str(p) for p in fixture_images(flickr8k_like, 4)]
    encoder = encoders.build_encoder("vgg16", "none", precision="float32", seed=3)
    ours, ok, failures = encoder.encode_files(paths, batch_size=4)
    assert ok == paths and failures == [] and ours.shape == (4, 4096) and ours.dtype == np.float32
    assert np.ptp(ours, axis=0).max() > 0  # the rows differ: a real feature, not a constant

    keras.utils.set_random_seed(3)  # what weights="none" means: random, seeded
    model = reference.reference_vgg16(weights=None)
    expected = reference.reference_features(model, paths)
    for row, path in zip(ours, paths, strict=True):
        reference_row = expected[Path(path).stem][0]
        np.testing.assert_allclose(row, reference_row, rtol=1e-4, atol=1e-4 * np.abs(row).max())

    fast = encoders.build_encoder("vgg16", "none", precision="bfloat16", seed=3)
    half, _, _ = fast.encode_files(paths, batch_size=4)
    assert half.dtype == np.float32 and fast.precision == "bfloat16"
    cosine = (half * ours).sum(1) / np.linalg.norm(half, axis=1) / np.linalg.norm(ours, axis=1)
    assert cosine.min() > 0.999


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["pooled", "grid"])
def test_killed_run_resumes_to_the_same_array(flickr8k_like, tiny_config, tmp_path, layout):
    names = [p.name for p in fixture_images(flickr8k_like, 12)]
    # seed 3 and auto precision: the in-process run reuses the encoder built by the test above
    settings = {
        "features.weights": "none",
        "features.chunk_size": 2,
        "features.batch_size": 2,
        "features.layout": layout,  # grid: VGG16's block5_conv3 (14x14x512 float16)
        "seed": 3,
    }
    killed = tiny_config("mine", **settings, **{"data.data_dir": str(tmp_path / "killed")})
    write_dataset(killed, names, flickr8k_like / "Flicker8k_Dataset")
    command = [
        sys.executable,
        "-m",
        "captioner.cli",
        "features",
        "--dataset",
        "mine",
        "--data-dir",
        str(tmp_path / "killed"),
        "--weights",
        "none",
        "--batch-size",
        "2",
        "--set",
        "features.chunk_size=2",
        "--seed",
        "3",
        *(["--grid"] if layout == "grid" else []),
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    chunks = killed.features_dir / "chunks"

    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 180
    while not (chunks / "00000.json").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no chunk written in 180 s"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (killed.features_dir / "meta.json").exists()
    assert 1 <= len(list(chunks.glob("*.json"))) - 1 < 6  # plan.json + finished chunks

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr

    whole = tiny_config("mine", **settings)
    write_dataset(whole, names, flickr8k_like / "Flicker8k_Dataset")
    expected = load_cache(features.extract(whole))
    result = load_cache(killed.features_dir)
    assert result.ids == expected.ids == names and result.layout == layout
    assert result.features.shape[1:] == ((14, 14, 512) if layout == "grid" else (4096,))
    np.testing.assert_array_equal(result.features, expected.features)


@pytest.mark.parametrize("isa", ["AVX2", "avx512_core", "AVX512_CORE_VNNI"])
def test_auto_precision_is_float32_when_onednn_is_capped_below_bfloat16(isa, monkeypatch):
    # emulating an older CPU (ONEDNN_MAX_CPU_ISA) on one with AMX: bfloat16 would be emulated too
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
    assert encoders.resolve_precision("auto") == "float32"
    assert encoders.resolve_precision("bfloat16") == "bfloat16"  # asked for: kept
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.is_file() else ""
    has_bf16 = "amx_bf16" in flags or "avx512_bf16" in flags
    assert encoders.resolve_precision("auto") == ("bfloat16" if has_bf16 else "float32")
