"""Extracting grid caches: every encoder's last convolutional map, in its own cache folder, with
bad images listed like the pooled cache's; the mean over its regions is the pooled vector; the
pipeline extracts a grid when asked, and the run's encoder captions new images from a grid.
(Resume after kill -9: test_features.test_killed_run_resumes_to_the_same_array[grid].)"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from test_features import SMALL, copy_images, fixture_images, write_bad_files, write_dataset

from captioner import encoders, features, models
from captioner.cli import main
from captioner.config import load_config, replace
from captioner.errors import CaptionerError
from captioner.feature_cache import for_decoder, load_cache
from captioner.images import load_image
from captioner.io import read_json
from captioner.limits import DECODER_FEATURES


def test_each_decoder_module_declares_what_config_expects_of_it():
    assert DECODER_FEATURES == {name: models.features_of(name) for name in models.DECODERS}


def test_cache_folders_are_named_after_their_settings(tiny_config):
    def folder(**dotted) -> str:
        return tiny_config("flickr8k", **dotted).features_dir.name

    assert folder() == "vgg16" and folder(**{"features.layout": "grid"}) == "vgg16-grid"
    grid7 = {"features.layout": "grid", "features.grid_size": 7}
    assert folder(**grid7) == "vgg16-grid7x7" and folder(**{"features.grid_size": 7}) == "vgg16"
    small = {"features.layout": "grid", "features.image_size": 112, "features.encoder": "resnet50"}
    assert folder(**small) == "resnet50-112px-grid"
    # any other name is a cache folder of one's own (a dropped-in grid), whatever the layout
    assert folder(**{"features.encoder": "clip-grid", "features.layout": "grid"}) == "clip-grid"
    for name, takes in DECODER_FEATURES.items():  # "auto": what the decoder takes
        expected = "vgg16-grid" if takes == "grid" else "vgg16"
        assert folder(**{"model.decoder": name}) == expected


def test_grid_cache_lists_bad_images_and_its_mean_is_the_pooled_vector(
    flickr8k_like, tiny_config, tmp_path
):
    """MobileNetV3Small's pooled vector is the global average of its last map: the merge
    model's view of a grid cache (the mean over regions) is the pooled cache."""
    folder = tmp_path / "images"
    photos = copy_images(fixture_images(flickr8k_like, 3), folder)
    expected = write_bad_files(folder, folder / photos[0])
    names = photos[:1] + list(expected) + ["absent.jpg"] + photos[1:]
    settings = {
        "features.encoder": SMALL,
        "features.weights": "none",
        "features.chunk_size": 4,
        "features.batch_size": 3,
        "features.precision": "float32",
    }
    pooled_cfg = tiny_config("mine", **settings)
    write_dataset(pooled_cfg, names, folder)
    grid_cfg = replace(pooled_cfg, **{"features.layout": "grid"})
    # float16, the grids' default, cannot hold random-weight MobileNet's tiny (~1e-9) values
    with pytest.raises(CaptionerError, match="features.dtype float16 cannot hold these"):
        features.extract(grid_cfg)
    grid_cfg = replace(grid_cfg, **{"features.dtype": "float32"})

    out = features.extract(grid_cfg)
    assert out == grid_cfg.features_dir == out.with_name(f"{SMALL}-grid")
    grid, pooled = load_cache(out), load_cache(features.extract(pooled_cfg))
    good = [n for n in names if n in photos or expected.get(n) == "ok"]
    assert grid.ids == pooled.ids == good and not (out / "chunks").exists()
    assert grid.features.shape == (len(good), 7, 7, 576)
    meta = grid.meta
    assert (meta["layout"], meta["grid"], meta["dim"]) == ("grid", [7, 7], 576)
    assert (meta["bad"], meta["missing"], meta["input_size"]) == (3, 1, [224, 224])
    assert (out / "bad_images.txt").read_text() == (pooled.path / "bad_images.txt").read_text()
    assert pooled.meta["layout"] == "pooled"

    mean = grid.rows(range(len(good)), "pooled", "merge")  # (n, 576)
    np.testing.assert_allclose(mean, pooled.features, rtol=1e-4, atol=1e-6 * mean.std())
    assert np.ptp(grid.features[0].astype(np.float32), axis=(0, 1)).max() > 0  # regions differ
    assert features.extract(grid_cfg) == out  # finished: reused


def test_cache_made_with_another_grid_size_is_refused_not_recomputed(tiny_config, tmp_path):
    """A grid_size is part of a cache's settings (and its folder name); a cache found in a
    folder under another grid_size is an error, never silently replaced."""
    cfg = tiny_config("mine", **{"features.layout": "grid", "features.grid_size": 7})
    cfg.features_dir.mkdir(parents=True)
    meta = {"encoder": "vgg16", "dim": 2, "count": 1, "layout": "grid", "grid": [1, 1]}
    np.save(cfg.features_dir / "features.npy", np.zeros((1, 1, 1, 2), np.float16))
    (cfg.features_dir / "ids.txt").write_text("a.jpg\n")
    (cfg.features_dir / "meta.json").write_text(json.dumps({**meta, "grid_size": 1}))
    write_dataset(cfg, ["a.jpg"], tmp_path)
    with pytest.raises(CaptionerError, match="grid_size=1, not 7"):
        features.extract(cfg)


def test_vgg16_grid_is_block5_conv3_and_grid_size_averages_it(flickr8k_like):
    import keras

    paths = [str(p) for p in fixture_images(flickr8k_like, 2)]
    native = encoders.build_encoder("vgg16", "none", "float32", 0, layout="grid", image_size=64)
    rows, ok, _ = native.encode_files(paths, batch_size=2)
    assert ok == paths and rows.shape == (2, 4, 4, 512) and native.grid == (4, 4)  # stride 16

    keras.utils.set_random_seed(0)  # what weights "none" with seed 0 means
    trunk = keras.applications.VGG16(weights=None, include_top=False, input_shape=(64, 64, 3))
    cut = keras.Model(trunk.inputs, trunk.get_layer("block5_conv3").output)
    pixels = np.stack([load_image(p, 64) for p in paths]).astype(np.float32)
    reference = cut.predict(keras.applications.vgg16.preprocess_input(pixels), verbose=0)
    np.testing.assert_allclose(rows, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())

    pooled = encoders.build_encoder(
        "vgg16", "none", "float32", 0, layout="grid", grid_size=2, image_size=64
    )
    halves, _, _ = pooled.encode_files(paths, batch_size=2)
    blocks = rows.reshape(2, 2, 2, 2, 2, 512).mean(axis=(2, 4))  # each 2x2 block of regions
    assert halves.shape == (2, 2, 2, 512)
    np.testing.assert_allclose(halves, blocks, rtol=1e-5, atol=1e-5 * np.abs(blocks).max())
    np.testing.assert_allclose(
        for_decoder(halves, "pooled", "merge"), for_decoder(rows, "pooled", "merge"), rtol=1e-4
    )

    with pytest.raises(CaptionerError, match="does not divide vgg16's 4x4 grid at 64 pixels"):
        encoders.build_encoder(
            "vgg16", "none", "float32", 0, layout="grid", grid_size=3, image_size=64
        )
    # fc2 at another size: random weights only (the first dense layer is sized for the map)
    fc2 = encoders.build_encoder("vgg16", "none", "float32", 0, image_size=64)
    assert fc2.row_shape == (4096,) and fc2.encode_files(paths[:1])[0].shape == (1, 4096)
    with pytest.raises(CaptionerError, match="trained fc2 needs 224x224 images, not 64"):
        encoders.build_encoder("vgg16", "imagenet", "float32", 0, image_size=64)


@pytest.mark.slow  # extracts, trains and evaluates a tiny demo run (~1 min)
def test_a_grid_run_trains_from_scratch_and_captions_new_images_through_a_grid(tmp_path):
    """`captioner train --set features.layout=grid` extracts features/<encoder>-grid/ itself;
    the merge model trains on its mean over regions; the run's encoder, rebuilt for new images,
    gives the same grid, so captions of the test images equal those evaluate made from the
    cache."""
    from captioner.loaded_run import load_run

    data, runs = tmp_path / "data", tmp_path / "runs"
    settings = {
        "demo.train_images": 40,
        "demo.dev_images": 10,
        "demo.test_images": 6,
        "demo.image_size": 64,
        "features.layout": "grid",
        "features.image_size": 0,  # the encoder's own 224 (configs/demo.toml says 112)
        "features.precision": "float32",
        "features.dtype": "float32",  # the cache's rows equal the encoder's: the same captions
        "model.units": 16,
        "model.embed_dim": 8,
        "tokenizer.min_count": 2,
        "train.runs_dir": runs,
    }
    result = CliRunner().invoke(
        main,
        ["train", "--dataset", "demo", "--data-dir", str(data), "--encoder", SMALL]
        + ["--weights", "none", "--epochs", "1", "--name", "g"]
        + [f"--set={key}={value}" for key, value in settings.items()],
    )
    assert result.exit_code == 0, result.output
    assert "features 7x7 grid of 576-d" in result.stderr
    cache = load_cache(data / "demo" / "features" / f"{SMALL}-grid")
    assert cache.features.shape == (56, 7, 7, 576)
    assert read_json(runs / "g" / "features_meta.json") == cache.meta
    card = (runs / "g" / "README.md").read_text()
    assert "7x7 grid of 576-d features (224x224 images)" in card

    run = load_run(runs / "g")
    assert (run.encoder.layout, run.encoder.row_shape) == ("grid", (7, 7, 576))
    scored = CliRunner().invoke(main, ["evaluate", "--run", str(runs / "g"), "--beam", "1"])
    assert scored.exit_code == 0, scored.output
    predictions = pd.read_csv(next((runs / "g").glob("predictions-test-*.csv")), dtype=str)
    images = data / "demo" / "raw" / "Flicker8k_Dataset"
    captioned, failures = run.caption_files(
        [str(images / name) for name in predictions["image"]], run.decode_settings(1)
    )
    assert not failures and [c for _, c in captioned] == list(predictions["caption"].fillna(""))


def grid_decoders() -> list[str]:
    return [name for name, takes in DECODER_FEATURES.items() if takes == "grid"]


@pytest.mark.parametrize("decoder", grid_decoders())
def test_a_grid_decoder_on_a_pooled_cache_is_one_line(tmp_path, flickr8k_like, decoder):
    """A pooled cache of one's own (features/flat/) given to a decoder that takes grids: one
    line naming the cache and the fix, before a run directory is made."""
    from tinydata import write_dataset as write_tiny

    cfg = load_config(
        None,
        (),
        dataset="mini",
        **{"data.data_dir": str(tmp_path / "data"), "features.encoder": "flat"},
    )
    write_tiny(cfg, flickr8k_like, {"train": 10, "dev": 4}, dim=7)
    result = CliRunner().invoke(
        main,
        ["train", "--dataset", "mini", "--data-dir", str(tmp_path / "data"), "--encoder", "flat"]
        + ["--decoder", decoder, "--set", f"train.runs_dir={tmp_path / 'runs'}"],
    )
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        f"Error: {cfg.features_dir}: pooled features; decoder {decoder} needs a grid cache: "
        "run `captioner features --grid`"
    )
    assert not (tmp_path / "runs").exists()
