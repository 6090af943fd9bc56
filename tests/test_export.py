"""`captioner export`: a SavedModel and TFLite models that caption like `captioner caption`.

The image decoding of the exported graph is checked against Pillow's on many kinds of file,
and bad runs are refused (fast). The rest trains one small demo-like run per decoder (synthetic
images, ResNet50 with random weights: its features are of ImageNet features' size, O(1);
MobileNetV3's random ones, ~1e-10, are below float16's range) and exports it once per format:
slow, a few minutes on 2 cores. The merge run takes pooled features of 224-pixel images; the
attention run a 3x3 grid of 96-pixel ones (features.image_size), which the exported encoder
must make alike.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from captioner.cli import main
from captioner.images import load_image
from captioner.io import write_json
from captioner.models import DECODERS

README = Path(__file__).resolve().parents[1] / "README.md"
TRAIN = {
    "demo.train_images": 150,
    "demo.dev_images": 15,
    "demo.test_images": 30,
    "demo.image_size": 48,
    "features.precision": "float32",
    "model.units": 96,
    "model.embed_dim": 48,
    "train.patience": 0,
    # real data's decoding defaults: the length penalty and n-gram blocking are in the graph too
    "decode.length_penalty": 0.7,
    "decode.no_repeat_ngram": 3,
}
# per decoder: the attention run's grid comes from images of another size than the encoder's own
DECODER_SETTINGS = {
    "merge": {},
    "attention": {"features.image_size": 96, "model.attention_units": 32},
}


# --- image decoding: the graph's pixels are Pillow's --------------------------------------------
def image_files(rng: np.random.Generator) -> dict[str, bytes]:
    """Files of every kind the graph decodes, of odd sizes, with 4:2:0 chroma and without."""
    smooth = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).resize((301, 203))
    noisy = Image.fromarray(rng.integers(0, 256, (120, 90, 3), dtype=np.uint8))
    frames = [
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).convert("P")
        for _ in range(3)
    ]
    savers = {
        "jpeg 4:2:0": lambda out: smooth.save(out, "JPEG", quality=85),
        "jpeg 4:4:4": lambda out: noisy.save(out, "JPEG", quality=95, subsampling=0),
        "jpeg progressive": lambda out: smooth.save(out, "JPEG", progressive=True),
        "jpeg greyscale": lambda out: smooth.convert("L").save(out, "JPEG"),
        "jpeg cmyk": lambda out: noisy.convert("CMYK").save(out, "JPEG"),
        "png rgba": lambda out: noisy.convert("RGBA").save(out, "PNG"),
        "png palette": lambda out: smooth.convert("P").save(out, "PNG"),
        "png 16-bit": lambda out: Image.fromarray(
            rng.integers(0, 65536, (50, 70)).astype(np.uint16)
        ).save(out, "PNG"),
        "gif animated": lambda out: frames[0].save(
            out, "GIF", save_all=True, append_images=frames[1:]
        ),
        "bmp": lambda out: noisy.save(out, "BMP"),
        "already 224": lambda out: noisy.resize((224, 224)).save(out, "JPEG"),
        "640 x 128": lambda out: smooth.resize((640, 128)).save(out, "JPEG"),
    }
    files = {}
    for kind, save in savers.items():
        buffer = io.BytesIO()
        save(buffer)
        files[kind] = buffer.getvalue()
    return files


def test_graph_decoding_equals_the_pillow_decoding_of_training(tmp_path):
    import tensorflow as tf

    from captioner.export_graph import decode_image_bytes, resize

    decode = tf.function(lambda data: resize(decode_image_bytes(data), 224))
    for kind, data in image_files(np.random.default_rng(0)).items():
        path = tmp_path / "image"
        path.write_bytes(data)
        np.testing.assert_array_equal(decode(tf.constant(data)).numpy(), load_image(path), kind)


def test_resizing_takes_the_pixels_pillow_takes_at_every_size():
    """Pillow's nearest neighbour sums float64 steps: at sizes divisible by 64 (128, 640, ...)
    it takes other pixels than floor((x + 0.5) * n / 224), which TensorFlow's resize takes."""
    import tensorflow as tf

    from captioner.export_graph import resize

    graph_resize = tf.function(
        lambda image: resize(image, 224), input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)]
    )
    # every size up to 700, the multiples of 64 up to 4096 and their neighbours
    sizes = [*range(1, 700), *(n + d for n in range(704, 4097, 64) for d in (-1, 0, 1))]
    for size in sizes:
        where = np.arange(size)
        line = np.stack([where % 256, where // 256, np.zeros(size)], axis=-1).astype(np.uint8)
        for image in (line[:, None], line[None]):  # each pixel says where it is: (n, 1), (1, n)
            pillow = np.asarray(Image.fromarray(image).resize((224, 224), Image.NEAREST))
            np.testing.assert_array_equal(graph_resize(image).numpy(), pillow, image.shape)


# --- bad input: one line, before any TensorFlow work --------------------------------------------
def fake_run(tmp_path: Path, tiny_config, finished: bool, meta: dict) -> Path:
    run_dir = tmp_path / "runs" / "fake"
    run_dir.mkdir(parents=True)
    write_json(run_dir / "config.json", tiny_config().to_dict())
    write_json(run_dir / "state.json", {"epoch": 1, "epochs": 3, "finished": finished})
    write_json(run_dir / "features_meta.json", meta)
    (run_dir / "model.keras").write_bytes(b"")
    return run_dir


def refused(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    return result.output


def test_bad_runs_and_options_are_one_line(tmp_path, tiny_config):
    out = str(tmp_path / "out")
    assert "no such run directory" in refused(["export", "--run", str(tmp_path / "no"), out])
    registered = {"encoder": "resnet50", "weights": "none", "dim": 2048}
    unfinished = fake_run(tmp_path / "a", tiny_config, finished=False, meta=registered)
    message = refused(["export", "--run", str(unfinished), out])
    assert "training not finished (1/3 epochs)" in message and "--resume" in message
    dropped = fake_run(tmp_path / "b", tiny_config, False, {"encoder": "clip", "dim": 512})
    write_json(dropped / "state.json", {"epoch": 3, "epochs": 3, "finished": True})
    assert "trained on dropped-in features" in refused(["export", "--run", str(dropped), out])
    hand_made = {"encoder": "resnet50", "weights": "hand-made", "dim": 2048}  # tinydata's kind
    write_json(dropped / "features_meta.json", hand_made)
    assert "cannot be exported" in refused(["export", "--run", str(dropped), out])
    Path(out).mkdir()
    assert "exists" in refused(["export", "--run", str(dropped), out])
    bad = refused(["export", "--run", str(dropped), "--quantize", "float16", out + "2"])
    assert "only for --format tflite" in bad
    assert not list(tmp_path.glob(".out*")) and not Path(out + "2").exists()


def test_tflite_gets_a_float32_decoder_and_a_float16_warning_for_tiny_weights(capsys):
    import keras

    from captioner import export
    from captioner.config import ModelConfig
    from captioner.decode import MASK_WARNING
    from captioner.models import decoder_for
    from captioner.models.merge import build_model

    model = build_model(8, 20, ModelConfig(embed_dim=8, units=8), precision="bfloat16")
    export._in_float32(model)
    assert {layer.compute_dtype for layer in model.layers} == {"float32"}
    decoder = decoder_for(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", MASK_WARNING)
        hidden, _, _ = decoder.step(np.array([2, 2]), decoder.start(np.zeros((2, 8), np.float32)))
    assert hidden.dtype == "float32"

    tiny = keras.Variable(np.full(576, 1e-10, np.float32), name="variance")
    normal = keras.Variable(np.full(576, 0.05, np.float32), name="kernel")
    graph = SimpleNamespace(
        encoder=SimpleNamespace(model=SimpleNamespace(weights=[normal])),
        model=SimpleNamespace(weights=[tiny]),
    )
    export._check_float16(graph)
    warning = capsys.readouterr().err
    assert "float16 cannot hold variance" in warning and "kernel" not in warning


# --- one trained run per decoder, exported -------------------------------------------------------
def train_tiny(root: Path, decoder: str, settings: dict) -> Path:
    """`captioner train` of a demo-like run of `decoder` under root; -> its run directory."""
    settings = {**TRAIN, **settings, "model.decoder": decoder}
    sets = [item for key, value in settings.items() for item in ("--set", f"{key}={value}")]
    common = ["--dataset", "demo", "--data-dir", str(root / "data")]
    train = CliRunner().invoke(
        main,
        ["train", *common, *sets, "--set", f"train.runs_dir={root / 'runs'}"]
        + ["--encoder", "resnet50", "--weights", "none", "--epochs", "12", "--name", "tiny"],
    )
    assert train.exit_code == 0, train.output
    return root / "runs" / "tiny"


def export_command(run: Path, fmt: str, out: Path) -> None:
    result = CliRunner().invoke(main, ["export", "--run", str(run), "--format", fmt, str(out)])
    assert result.exit_code == 0, result.output


def test_image_paths(root: Path) -> list[Path]:
    """The demo's test images, then two of them as other files: a PNG with alpha and a
    greyscale JPEG of 128 x 64 pixels (sizes where Pillow's resizing takes other pixels than
    the textbook rule)."""
    names = (root / "data/demo/raw/Flickr8k_text/Flickr_8k.testImages.txt").read_text().split()
    paths = [root / "data/demo/raw/Flicker8k_Dataset" / name for name in sorted(names)]
    Image.open(paths[0]).convert("RGBA").save(root / "first.png")
    Image.open(paths[1]).convert("L").resize((128, 64)).save(root / "second.jpg")
    return paths + [root / "first.png", root / "second.jpg"]


test_image_paths.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module", params=sorted(DECODERS))
def trained(request, tmp_path_factory) -> dict:
    """A finished demo-like run of each decoder, its SavedModel and float32 TFLite model
    (through the CLI), and `captioner caption`'s captions of its test images (and of two
    re-encoded ones)."""
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    run = train_tiny(root, request.param, DECODER_SETTINGS[request.param])
    meta = json.loads((run / "features_meta.json").read_text())
    if request.param == "attention":
        assert (meta["layout"], meta["grid"], meta["input_size"]) == ("grid", [3, 3], [96, 96])
    paths = test_image_paths(root)
    captions = {beam: caption_command(run, paths, beam) for beam in (None, 1)}
    export_command(run, "saved_model", root / "saved")
    export_command(run, "tflite", root / "model.tflite")
    size = meta.get("input_size", [224])[0]  # the pixels TFLite takes
    return {
        "decoder": request.param,
        "root": root,
        "run": run,
        "paths": paths,
        "captions": captions,
        "size": size,
    }


def caption_command(run: Path, paths: list[Path], beam: int | None) -> list[str]:
    """`captioner caption --json` with the run's settings (or --beam)."""
    args = ["caption", *map(str, paths), "--model", str(run), "--json"]
    result = CliRunner().invoke(main, args + (["--beam", str(beam)] if beam else []))
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["image"] for line in lines] == list(map(str, paths))
    return [line["caption"] for line in lines]


CLEAN_PROCESS = """
import json, sys
sys.path.append(sys.argv[1])  # TensorFlow's site-packages, without its .pth files
try:
    import captioner
except ImportError:
    pass
else:
    sys.exit("captioner is importable")
import tensorflow as tf
model = tf.saved_model.load(sys.argv[2])
data = tf.constant([open(path, "rb").read() for path in sys.argv[3:]])
default = model.signatures["serving_default"](image_bytes=data)
greedy = model.signatures["caption_with_beam"](image_bytes=data, beam=tf.constant(1))
try:
    model.signatures["caption_with_beam"](image_bytes=data, beam=tf.constant(0))
    refused = ""
except tf.errors.InvalidArgumentError as error:
    refused = error.message
print(json.dumps({
    "default": [c.decode() for c in default["caption"].numpy()],
    "greedy": [c.decode() for c in greedy["caption"].numpy()],
    "log_probabilities": default["log_prob"].numpy().tolist(),
    "refused": refused,
}))
"""


@pytest.mark.slow
def test_saved_model_captions_like_captioner_caption_in_a_process_without_captioner(trained):
    # -I -S: no user site, no PYTHONPATH, no .pth files (the editable install of captioner)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    site = sysconfig.get_paths()["purelib"]
    args = [str(trained["root"] / "saved"), *map(str, trained["paths"])]
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", CLEAN_PROCESS, site, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=trained["root"],
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["default"] == trained["captions"][None]  # the run's beam width
    assert out["greedy"] == trained["captions"][1]
    assert len(set(out["default"])) > 3  # the captions differ between images
    assert all(-30 < value < 0 for value in out["log_probabilities"])
    assert "beam must be at least 1" in out["refused"]


def exported_and_served(run: Path, saved: Path, paths: list[Path]) -> tuple[list, list]:
    """[(caption, log_prob)] per image from the SavedModel (loaded here) and from `captioner
    serve`'s model (serving.ServedModel, without HTTP), each with the run's settings."""
    import tensorflow as tf

    from captioner.serving import ServedModel

    data = [path.read_bytes() for path in paths]
    out = tf.saved_model.load(str(saved)).signatures["serving_default"](
        image_bytes=tf.constant(data)
    )
    captions = [caption.decode() for caption in out["caption"].numpy()]
    exported = list(zip(captions, out["log_prob"].numpy(), strict=True))
    served = ServedModel.load(run)
    instances = [served.image(item, str(path)) for item, path in zip(data, paths, strict=True)]
    return exported, served.caption(instances)


def assert_alike(exported: list, served: list, captions: list[str]) -> None:
    """The same captions as `captioner caption`, and the same log-probabilities."""
    assert [caption for caption, _ in exported] == [caption for caption, _ in served] == captions
    np.testing.assert_allclose(
        [value for _, value in exported], [value for _, value in served], rtol=1e-3, atol=1e-3
    )


@pytest.mark.slow
def test_the_export_and_captioner_serve_answer_alike(trained):
    """A client can move from `captioner serve` to TF Serving running the export: the outputs
    have the same names (signature.py) and values, the log-probability under the model even
    with n-gram blocking (TRAIN blocks 3-grams)."""
    run, saved = trained["run"], trained["root"] / "saved"
    exported, served = exported_and_served(run, saved, trained["paths"])
    assert_alike(exported, served, trained["captions"][None])


@pytest.mark.slow
def test_a_run_on_dropped_in_features_exports_its_decoder_alone(trained, tmp_path):
    """--input features: the decoder alone, fed the features, writes `captioner caption`'s
    captions, as a SavedModel and as TFLite. For a run whose features were dropped in (here:
    the trained run, told so) it is the only export."""
    import shutil

    import tensorflow as tf

    from captioner.feature_cache import for_decoder
    from captioner.loaded_run import load_run
    from captioner.models import features_of

    run = tmp_path / "dropped"
    shutil.copytree(trained["run"], run)
    meta = json.loads((run / "features_meta.json").read_text())
    write_json(run / "features_meta.json", {**meta, "encoder": "mine", "weights": "mine.h5"})
    assert "--input features" in refused(["export", "--run", str(run), str(tmp_path / "no")])
    for fmt, out in (("saved_model", "saved"), ("tflite", "decoder.tflite")):
        args = ["export", "--run", str(run), "--input", "features", "--format", fmt]
        result = CliRunner().invoke(main, [*args, str(tmp_path / out)])
        assert result.exit_code == 0, result.output

    decoder, paths, expected = trained["decoder"], trained["paths"], trained["captions"]
    features, ok_paths, _ = load_run(trained["run"]).encode_files(paths)
    assert ok_paths == list(map(str, paths))
    features = for_decoder(features, features_of(decoder), decoder).astype(np.float32)
    saved = tf.saved_model.load(str(tmp_path / "saved"))
    default = saved.signatures["serving_default"](features=tf.constant(features))
    assert [c.decode() for c in default["caption"].numpy()] == expected[None]
    beam = tf.constant(1)
    greedy = saved.signatures["caption_with_beam"](features=tf.constant(features), beam=beam)
    assert [c.decode() for c in greedy["caption"].numpy()] == expected[1]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        interpreter = tf.lite.Interpreter(model_path=str(tmp_path / "decoder.tflite"))
    runner = interpreter.get_signature_runner("serving_default")
    assert list(runner.get_input_details()["features"]["shape"][1:]) == list(features.shape[1:])
    words = [runner(features=row[None])["words"][0] for row in features]
    assert [" ".join(w.decode() for w in row if w) for row in words] == expected[None]


@pytest.mark.slow
def test_a_merge_run_on_a_grid_exports_and_serves_the_grids_mean(tmp_path):
    """A merge model trained on a grid cache takes each image's mean over the regions
    (feature_cache.for_decoder): the exported graph and `captioner serve` pool alike."""
    grid = {"features.layout": "grid", "features.image_size": 96}
    run = train_tiny(tmp_path, "merge", grid)
    assert json.loads((run / "features_meta.json").read_text())["grid"] == [3, 3]
    paths = test_image_paths(tmp_path)[-6:]
    export_command(run, "saved_model", tmp_path / "saved")
    exported, served = exported_and_served(run, tmp_path / "saved", paths)
    assert_alike(exported, served, caption_command(run, paths, None))
    assert len({caption for caption, _ in exported}) > 1


@pytest.mark.slow
def test_saved_model_stores_each_weight_once(trained):
    import keras

    from captioner.models import load_saved

    encoder = keras.applications.ResNet50(weights=None, include_top=False, pooling="avg")
    decoder = load_saved(trained["run"] / "model.keras", "")
    weights = (encoder.count_params() + decoder.count_params()) * 4  # float32 bytes
    stored = sum(p.stat().st_size for p in (trained["root"] / "saved/variables").iterdir())
    assert 0.98 * weights < stored < 1.02 * weights  # not twice, as tracking the models gave


def signature_blocks(text: str) -> dict[str, list[str]]:
    """{signature: its lines as `saved_model_cli show` prints them, without `name:` lines}."""
    blocks = re.findall(r"--signature_def (\w+)\n(.*?)Method name is", text, re.DOTALL)
    return {
        name: [line for line in body.splitlines() if "name:" not in line and line.strip()]
        for name, body in blocks
    }


SAVED_MODEL_CLI = """
import sys
from tensorflow.python.tools import saved_model_cli

folder = sys.argv[1]
for name in sys.argv[2:]:  # `saved_model_cli show` once per signature, TensorFlow loaded once
    sys.argv = ["saved_model_cli", "show", "--dir", folder, "--tag_set", "serve"]
    sys.argv += ["--signature_def", name]
    print("--signature_def", name, flush=True)
    try:
        saved_model_cli.main()
    except SystemExit as end:
        assert not end.code, end.code
"""


@pytest.mark.slow
def test_saved_model_cli_shows_the_signatures_the_readme_documents(trained):
    documented = signature_blocks(README.read_text(encoding="utf-8"))
    assert set(documented) == {"serving_default", "caption_with_beam"}
    shown = subprocess.run(
        [sys.executable, "-c", SAVED_MODEL_CLI, str(trained["root"] / "saved"), *documented],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert signature_blocks(shown.stdout) == documented


def tflite_captions(
    model: Path | bytes, paths: list[Path], beam: int | None, size: int
) -> list[str]:
    """Captions of a TFLite model, fed each image's pixels as training read them (Pillow, at the
    run's image size)."""
    import tensorflow as tf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        if isinstance(model, bytes):
            interpreter = tf.lite.Interpreter(model_content=model)
        else:
            interpreter = tf.lite.Interpreter(model_path=str(model))
    runner = interpreter.get_signature_runner("caption_with_beam" if beam else "serving_default")
    assert list(runner.get_input_details()["pixels"]["shape"][1:]) == [size, size, 3]
    captions = []
    for path in paths:
        pixels = load_image(path, size)[None]  # (1, S, S, 3)
        out = runner(pixels=pixels, **({"beam": np.array(beam, np.int32)} if beam else {}))
        captions.append(" ".join(word.decode() for word in out["words"][0] if word))
    return captions


@pytest.mark.slow
def test_tflite_float32_captions_like_captioner_caption(trained):
    model = trained["root"] / "model.tflite"
    size = trained["size"]
    assert tflite_captions(model, trained["paths"], None, size) == trained["captions"][None]
    assert tflite_captions(model, trained["paths"], 1, size) == trained["captions"][1]


@pytest.mark.slow
def test_quantized_tflite_agrees_on_most_greedy_captions(trained, tmp_path):
    from captioner import export

    if trained["decoder"] != "merge":  # each conversion costs half a minute on 2 cores
        pytest.skip("quantization treats every decoder's weights alike: checked on merge's")

    graph = export.caption_graph(trained["run"], "tflite", beam=1)  # greedy by default
    source = export.tflite_source(graph, tmp_path / "source")
    paths, expected = trained["paths"][:-2], trained["captions"][1][:-2]  # the test split
    float32 = Path(trained["root"] / "model.tflite").stat().st_size
    agreement = {}
    for quantize, size in (("float16", 0.5), ("dynamic", 0.25)):
        model = export.convert_tflite(source, quantize)
        assert len(model) < size * float32 * 1.05  # weights of 2 and 1 bytes instead of 4
        captions = tflite_captions(model, paths, None, trained["size"])
        agreement[quantize] = np.mean([a == b for a, b in zip(captions, expected, strict=True)])
    assert agreement["float16"] >= 0.9, agreement
    # Dynamic-range quantization (int8 products) falls short of the 90% on encoders
    # with random weights; README, "Use your model elsewhere", gives the demo's figures.
    assert agreement["dynamic"] >= 0.6, agreement
