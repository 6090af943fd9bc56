import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from tinydata import write_dataset

from captioner import distribute, pipeline, run_data, rundir, train
from captioner.cli import main
from captioner.config import from_dict, load_config
from captioner.errors import CaptionerError
from captioner.io import read_json
from captioner.tokenizer import Vocabulary

SIZES = {"train": 40, "dev": 10}
TINY = {
    "model.units": 16,
    "model.embed_dim": 8,
    "model.dropout": 0.0,
    "train.epochs": 2,
    "train.learning_rate": 0.01,
    "train.batch_size": 16,
    "tokenizer.min_count": 2,
    "train.patience": 0,
}
CLI_TINY = [f"--set={key}={value}" for key, value in TINY.items() if key != "train.epochs"]


def mini_config(root: Path, **dotted):
    """A config for dataset "mini" (no download URLs) rooted in `root`."""
    flags = {"data.data_dir": str(root / "data"), "train.runs_dir": str(root / "runs"), **TINY}
    return load_config(None, (), dataset="mini", **{**flags, **dotted})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, flickr8k_like):
    """One tiny run on a hand-made 7-dim feature cache (the last image has no feature row)."""
    root = tmp_path_factory.mktemp("train")
    cfg = mini_config(root, **{"train.name": "a", "features.encoder": "handmade"})
    write_dataset(cfg, flickr8k_like, SIZES, dim=7, drop=1)
    return cfg, train.train(cfg)


def history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow  # trains the `trained` fixture's run
def test_run_directory_holds_everything_later_stages_need(trained):
    cfg, run_dir = trained
    assert run_dir == Path(cfg.train.runs_dir) / "a"
    assert from_dict(read_json(run_dir / "config.json")) == cfg
    assert read_json(run_dir / "features_meta.json") == read_json(cfg.features_dir / "meta.json")
    assert read_json(run_dir / "vocab.json") == read_json(cfg.vocab_json)
    assert read_json(run_dir / "data.json") == run_data.describe(cfg)  # the data it trained on
    versions = read_json(run_dir / "versions.json")
    assert versions["tensorflow"] == tf.__version__ and "git_commit" in versions
    state = read_json(run_dir / "state.json")
    assert state["finished"] and state["epoch"] == state["epochs"] == 2
    rows = history(run_dir)
    assert list(rows[0]) == ["epoch", "loss", "val_loss"]
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[1]["loss"]) < float(rows[0]["loss"])  # it learns
    assert state["best_val_loss"] == min(float(r["val_loss"]) for r in rows)

    model = keras.saving.load_model(run_dir / "model.keras", safe_mode=True)
    vocab = Vocabulary.load(run_dir / "vocab.json")
    logits = model({"features": np.zeros((3, 7), np.float32), "tokens": np.ones((3, 5), np.int32)})
    assert tuple(logits.shape) == (3, 5, vocab.size)


def event_values(folder: Path) -> dict[str, list]:
    """{tag: [(step, value)]} of every TensorBoard event file in folder (scalars as floats,
    text as str)."""
    from tensorflow.core.util import event_pb2

    found: dict[str, list] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                array = tf.make_ndarray(value.tensor)
                item = array.item() if array.size == 1 else array.tolist()
                item = item.decode() if isinstance(item, bytes) else item
                found.setdefault(value.tag, []).append((event.step, item))
    return found


@pytest.mark.slow  # trains the `trained` fixture's run
def test_training_writes_tensorboard_logs_its_time_and_a_model_card(trained):
    cfg, run_dir = trained
    train_logs = event_values(run_dir / "logs" / "train")
    dev_logs = event_values(run_dir / "logs" / "validation")
    rows = history(run_dir)
    assert [step for step, _ in train_logs["epoch_loss"]] == [0, 1]
    assert [v for _, v in train_logs["epoch_loss"]] == pytest.approx(
        [float(r["loss"]) for r in rows], rel=1e-5
    )
    assert [v for _, v in dev_logs["epoch_loss"]] == pytest.approx(
        [float(r["val_loss"]) for r in rows], rel=1e-5
    )
    assert [v for _, v in train_logs["epoch_learning_rate"]] == pytest.approx([0.01, 0.01])
    (step, table), *_ = dev_logs["dev_captions"]
    assert step == 0 and len(dev_logs["dev_captions"]) == 2
    assert table.startswith("| image | greedy caption | a reference |")
    assert len(table.splitlines()) == 2 + 3  # header, rule, three dev images
    for tag in ("epoch_bleu4", "epoch_cider_d"):  # dev scores (tests/test_monitor.py: values)
        assert [step for step, _ in dev_logs[tag]] == [0, 1]

    timing = read_json(run_dir / "training.json")
    assert timing["epochs_timed"] == 2 and timing["seconds"] > 0
    assert timing["machine"]["cores"] == os.cpu_count() and "cpu" in timing["machine"]
    card = (run_dir / "README.md").read_text()
    assert card.startswith("# Model card: a\n") and "Not evaluated yet" in card
    assert "| time | " in card and "over 2 epochs on" in card


@pytest.mark.slow  # trains the `trained` fixture's run
def test_same_seed_gives_the_same_history(trained, capsys):
    cfg, run_dir = trained
    again = train.train(
        mini_config(
            Path(cfg.data.data_dir).parent, **{"train.name": "b", "features.encoder": "handmade"}
        )
    )
    assert (again / "history.csv").read_text() == (run_dir / "history.csv").read_text()
    err = capsys.readouterr().err
    assert "dev: skipped 5 captions of 1 images that have no feature row" in err
    assert "reusing" in err and "features 7-d" in err


@pytest.mark.slow  # trains the `trained` fixture's run
def test_existing_run_is_never_overwritten(trained):
    cfg, run_dir = trained
    before = (run_dir / "history.csv").read_text()
    result = CliRunner().invoke(main, run_args(cfg, "a"))
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: {run_dir}: a run of this name exists; add --resume "
        "to continue it, or choose another --name"
    )
    assert train.train(cfg, resume=True) == run_dir  # finished: nothing to do
    with pytest.raises(CaptionerError, match="the run has model.units=16, this command 32"):
        train.train(
            mini_config(
                Path(cfg.data.data_dir).parent,
                **{"train.name": "a", "features.encoder": "handmade", "model.units": 32},
            ),
            resume=True,
        )
    with pytest.raises(CaptionerError, match="no such run to resume"):
        train.train(
            mini_config(
                Path(cfg.data.data_dir).parent,
                **{"train.name": "nope", "features.encoder": "handmade"},
            ),
            resume=True,
        )
    assert (run_dir / "history.csv").read_text() == before


@pytest.mark.slow  # trains beside the `trained` fixture's run
def test_resume_with_more_epochs_trains_a_finished_run_further(trained, capsys):
    cfg, full_run = trained  # 2 epochs in one go
    root = Path(cfg.data.data_dir).parent
    settings = {"train.name": "short", "features.encoder": "handmade"}
    run_dir = train.train(mini_config(root, **settings, **{"train.epochs": 1}))
    assert read_json(run_dir / "state.json")["finished"]

    assert train.train(mini_config(root, **settings), resume=True) == run_dir  # to 2 epochs
    with pytest.raises(CaptionerError, match="2 epochs are done; train.epochs=1 is fewer"):
        train.train(mini_config(root, **settings, **{"train.epochs": 1}), resume=True)
    state = read_json(run_dir / "state.json")
    assert state["finished"] and state["epoch"] == state["epochs"] == 2
    assert read_json(run_dir / "config.json")["train"]["epochs"] == 2
    rows, full = history(run_dir), history(full_run)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert rows[0] == full[0]  # the same seed: the same first epoch
    assert float(rows[1]["loss"]) < float(rows[0]["loss"])  # the second epoch went on learning
    assert "train.epochs 1 -> 2" in capsys.readouterr().err


def test_early_stopping_best_model_and_checkpoint_pruning(tmp_path):
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer="adam", loss="mse")
    state = rundir.initial_state(mini_config(tmp_path, **{"train.epochs": 9}))
    callback = train.RunCheckpoint(tmp_path, state, patience=2)
    callback.set_model(model)
    for epoch, val_loss in enumerate([3.0, 2.0, 2.5, 2.1]):
        model.layers[-1].bias.assign([float(epoch)])  # tells the saved epochs apart
        callback.on_epoch_end(epoch, {"loss": 1.0, "val_loss": val_loss})
    assert model.stop_training and state["finished"] and state["wait"] == 2
    assert state["best_epoch"] == 2 and state["best_val_loss"] == 2.0
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["epoch-0002.keras", "epoch-0004.keras"]
    best = keras.saving.load_model(tmp_path / "model.keras", compile=False)
    assert float(best.layers[-1].bias.numpy()[0]) == 1.0
    assert read_json(tmp_path / "state.json") == state
    assert [r["val_loss"] for r in history(tmp_path)] == ["3.0", "2.0", "2.5", "2.1"]


def test_learning_rate_decays_after_an_epoch_without_improvement_and_is_checkpointed(tmp_path):
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    state = rundir.initial_state(mini_config(tmp_path, **{"train.epochs": 9}))
    callback = train.RunCheckpoint(tmp_path, state, patience=0, lr_decay=0.5)
    callback.set_model(model)
    for epoch, val_loss in enumerate([3.0, 2.0, 2.5, 2.6, 1.0]):
        callback.on_epoch_end(epoch, {"loss": 1.0, "val_loss": val_loss})
    rates = [row["learning_rate"] for row in state["history"]]  # the rate each epoch trained at
    assert rates == pytest.approx([0.01, 0.01, 0.01, 0.005, 0.0025])
    assert float(model.optimizer.learning_rate) == pytest.approx(0.0025)  # 1.0 improved: kept
    saved = keras.saving.load_model(tmp_path / state["checkpoint"], compile=True)
    assert float(saved.optimizer.learning_rate) == pytest.approx(0.0025)  # a resume goes on here


@pytest.mark.parametrize(
    "tf_config, chief",
    [
        (None, True),
        ({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}}, True),
        ({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}, False),
        (
            {
                "cluster": {"chief": ["c:0"], "worker": ["a:1"]},
                "task": {"type": "worker", "index": 0},
            },
            False,
        ),
        (
            {
                "cluster": {"chief": ["c:0"], "worker": ["a:1"]},
                "task": {"type": "chief", "index": 0},
            },
            True,
        ),
    ],
)
def test_only_the_chief_writes_the_run(monkeypatch, tf_config, chief):
    monkeypatch.setenv("TF_CONFIG", json.dumps(tf_config) if tf_config else "")
    assert distribute.is_chief("multiworker") is chief
    assert distribute.is_chief("mirrored")


def test_unknown_strategy_and_missing_tf_config_are_one_line_errors(monkeypatch):
    with pytest.raises(CaptionerError, match="train.strategy must be one of"):
        distribute.make_strategy("tpu")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(CaptionerError, match="TF_CONFIG"):
        distribute.make_strategy("multiworker")


# --- subprocess tests: kill -9 and resume, tf.distribute ------------------------------------------
def captioner_cli(*args: str, env: dict | None = None, code: str = "") -> subprocess.Popen:
    """`python -m captioner.cli ARGS` (or `python -c CODE ARGS`), TF_CONFIG only from `env`."""
    command = [sys.executable, *(["-c", code] if code else ["-m", "captioner.cli"]), *args]
    environment = {key: value for key, value in os.environ.items() if key != "TF_CONFIG"}
    environment.update({"TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})})
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment
    )


@pytest.mark.slow
@pytest.mark.parametrize("decoder", ["merge", "attention"])
def test_resume_after_kill_9_continues_to_the_configured_epochs(tmp_path, flickr8k_like, decoder):
    cfg = mini_config(tmp_path, **{"features.encoder": "handmade"})
    write_dataset(cfg, flickr8k_like, SIZES, dim=7, grid=(2, 3) if decoder == "attention" else None)
    args = [*run_args(cfg, "k", epochs=4), "--decoder", decoder]
    run_dir = Path(cfg.train.runs_dir) / "k"
    process = captioner_cli(*args)
    deadline = time.monotonic() + 120
    while not (run_dir / "history.csv").exists() or not history(run_dir):  # epoch 1 committed
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = history(run_dir)
    assert 1 <= len(before) < 4

    resumed = captioner_cli(*args, "--resume")
    out, err = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, err
    assert out.strip() == str(run_dir)
    after = history(run_dir)
    assert [int(r["epoch"]) for r in after] == [1, 2, 3, 4]
    assert after[: len(before)] == before  # the history continues, it does not restart
    assert f"{len(before)}/4 epochs done" in err
    assert read_json(run_dir / "state.json")["finished"]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def last_losses(stderr: str) -> tuple[float, float]:
    """(loss, val_loss) of the last epoch in a Keras progress log."""
    found = re.findall(r"loss: ([0-9.]+) - val_loss: ([0-9.]+)", stderr)
    assert found, stderr[-2000:]
    return float(found[-1][0]), float(found[-1][1])


def run_args(cfg, name: str, epochs: int = 1) -> list[str]:
    """CLI arguments of a tiny run on the hand-made cache; with 1 epoch they repeat the
    `trained` fixture's run under another name."""
    return [
        "train",
        "--dataset",
        "mini",
        "--data-dir",
        cfg.data.data_dir,
        "--set",
        f"train.runs_dir={cfg.train.runs_dir}",
        "--encoder",
        "handmade",
        "--name",
        name,
        "--epochs",
        str(epochs),
        *CLI_TINY,
    ]


MIRRORED = """import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from captioner.cli import main
main(sys.argv[1:])
"""


def epoch_losses(run_dir: Path, epoch: int) -> tuple[float, float]:
    """(loss, val_loss) of one epoch of a run, from its history.csv."""
    row = history(run_dir)[epoch - 1]
    return float(row["loss"]), float(row["val_loss"])


@pytest.mark.slow
def test_mirrored_over_two_cpus_reaches_the_single_device_loss(trained):
    cfg, _ = trained
    mirrored = captioner_cli(*run_args(cfg, "m"), "--strategy", "mirrored", code=MIRRORED)
    out, err = mirrored.communicate(timeout=300)
    assert mirrored.returncode == 0, err[-2000:]
    assert "2 replica(s)" in err
    assert last_losses(err) == pytest.approx(epoch_losses(trained[1], 1), rel=0.02)
    assert epoch_losses(Path(out.strip()), 1) == pytest.approx(last_losses(err), abs=1e-4)


@pytest.mark.slow
def test_two_local_workers_reach_the_single_device_loss(trained):
    cfg, _ = trained
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    workers = [
        captioner_cli(
            *run_args(cfg, "mw"),
            "--strategy",
            "multiworker",
            env={
                "TF_CONFIG": json.dumps(
                    {"cluster": cluster, "task": {"type": "worker", "index": i}}
                )
            },
        )
        for i in range(2)
    ]
    outputs = [worker.communicate(timeout=300) for worker in workers]
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err[-2000:]
        assert "2 replica(s)" in err
        assert last_losses(err) == pytest.approx(epoch_losses(trained[1], 1), rel=0.02)
    run_dir = Path(cfg.train.runs_dir) / "mw"
    assert outputs[0][0].strip() == outputs[1][0].strip() == str(run_dir)
    assert len(history(run_dir)) == 1  # written by the chief
    assert epoch_losses(run_dir, 1) == pytest.approx(last_losses(outputs[1][1]), abs=1e-4)
    train_logs = event_values(run_dir / "logs" / "train")  # TensorBoard, from the chief only
    dev_logs = event_values(run_dir / "logs" / "validation")
    assert [v for _, v in train_logs["epoch_loss"]] == pytest.approx([epoch_losses(run_dir, 1)[0]])
    assert [v for _, v in dev_logs["epoch_loss"]] == pytest.approx([epoch_losses(run_dir, 1)[1]])
    assert [step for step, _ in dev_logs["epoch_bleu4"]] == [0]
    assert len(list((run_dir / "logs" / "train").glob("events.out.tfevents.*"))) == 1


@pytest.mark.slow
def test_cli_train_runs_every_missing_stage_on_a_tiny_demo_dataset(tmp_path, capsys):
    args = [
        "train",
        "--dataset",
        "demo",
        "--data-dir",
        str(tmp_path / "data"),
        "--set",
        f"train.runs_dir={tmp_path / 'runs'}",
        "--encoder",
        "mobilenetv3small",
        "--weights",
        "none",
        "--epochs",
        "2",
        "--set",
        "demo.train_images=40",
        "--set",
        "demo.dev_images=10",
        "--set",
        "demo.test_images=5",
        "--set",
        "demo.image_size=64",
        *CLI_TINY,
    ]
    first = CliRunner().invoke(main, [*args, "--name", "demo1"])
    assert first.exit_code == 0, first.output
    run_dir = tmp_path / "runs" / "demo1"
    assert first.stdout.strip() == str(run_dir)
    dataset = tmp_path / "data" / "demo"
    features = "features/mobilenetv3small-112px"  # configs/demo.toml: images of 112 pixels
    meta = read_json(dataset / features / "meta.json")
    assert meta["count"] == 55 and read_json(run_dir / "features_meta.json") == meta
    assert [int(r["epoch"]) for r in history(run_dir)] == [1, 2]
    assert read_json(run_dir / "state.json")["finished"]

    cfg = from_dict(read_json(run_dir / "config.json"))
    capsys.readouterr()
    assert pipeline.prepare(cfg)["features"] == dataset / features
    err = capsys.readouterr().err
    for output in ("captions.csv", features, "vocab.json"):
        assert f"reusing {dataset / output}" in err  # every stage's output is reused


def test_a_run_saved_before_model_decoder_existed_resumes_as_a_merge_run(tmp_path):
    """config.json of runs made before model.decoder has no such key: read as "merge", and a
    --resume with the default decoder is not refused as a change of settings."""
    from captioner.io import write_json
    from captioner.runs import read_run

    cfg = mini_config(tmp_path)
    run_dir, features = tmp_path / "old", tmp_path / "features"
    run_dir.mkdir()
    features.mkdir()
    saved = cfg.to_dict()
    del saved["model"]["decoder"]
    write_json(run_dir / "config.json", saved)
    for path in (run_dir / "vocab.json", run_dir / "features_meta.json", features / "meta.json"):
        write_json(path, {"dim": 7})
    rundir._check_resumable(run_dir, cfg, {"vocab": run_dir / "vocab.json", "features": features})
    assert rundir.read_config(run_dir).model.decoder == "merge"
    assert read_run(run_dir).decoder == "merge"
    other = mini_config(tmp_path, **{"model.units": 99})
    with pytest.raises(CaptionerError, match="model.units"):
        rundir._check_resumable(
            run_dir, other, {"vocab": run_dir / "vocab.json", "features": features}
        )
