"""`captioner caption`: latest run, folders, bad files, several models, and the Python API."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from test_evaluate import ENCODER, write_run

from captioner import caption
from captioner.errors import CaptionerError
from captioner.io import write_json


def fake_run(runs_dir: Path, name: str, finished: bool, mtime: float) -> Path:
    run_dir = runs_dir / name
    run_dir.mkdir(parents=True)
    (run_dir / "model.keras").write_bytes(b"")
    write_json(run_dir / "state.json", {"epoch": 2, "epochs": 2, "finished": finished})
    os.utime(run_dir / "state.json", (mtime, mtime))
    return run_dir


def test_latest_run_is_the_newest_finished_one(tmp_path):
    with pytest.raises(CaptionerError, match="no finished run found; train one with `captioner"):
        caption.latest_run(tmp_path / "runs")
    runs = tmp_path / "runs"
    fake_run(runs, "old", finished=True, mtime=1_000)
    newest = fake_run(runs, "new", finished=True, mtime=2_000)
    fake_run(runs, "training", finished=False, mtime=3_000)
    (fake_run(runs, "damaged", finished=True, mtime=4_000) / "state.json").write_text("{")
    assert caption.latest_run(runs) == newest


def test_folders_expand_to_their_images(tmp_path):
    for name in ("b.JPG", "a.png", "notes.txt", ".hidden.jpg"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    missing = str(tmp_path / "missing.jpg")
    paths, failures = caption.expand_images(
        [tmp_path, missing, tmp_path / "a.png", tmp_path / "sub"]
    )
    assert paths == [str(tmp_path / "a.png"), str(tmp_path / "b.JPG"), missing]
    assert failures == [(str(tmp_path / "sub"), pytest.approx(failures[0][1]))]
    assert failures[0][1].startswith("no image files (.bmp, .gif, .jpeg, .jpg")


@pytest.mark.slow
def test_caption_command_and_api(tmp_path, tiny_config, flickr8k_like, capsys, monkeypatch):
    from captioner import encoders, evaluate

    images = sorted((flickr8k_like / "Flicker8k_Dataset").glob("*.jpg"))[:24]  # as write_run
    encoder = encoders.build_encoder(ENCODER, "none", "float32", seed=0)
    cached, ok, failures = encoder.encode_files(images, batch_size=8)
    assert len(ok) == 24 and not failures
    run_dir, cfg = write_run(tmp_path, tiny_config, flickr8k_like, features=cached)
    second = run_dir.with_name("second")
    shutil.copytree(run_dir, second)

    # The run's own encoder turns a new image into the features it was trained on: captions of
    # the test images equal those evaluate made from the feature cache.
    run = caption.load_run(run_dir)
    metrics_path = evaluate.evaluate(run_dir, beam=1, with_meteor=False)
    assert metrics_path == run_dir / "metrics-test-beam1.json"
    predictions = pd.read_csv(run_dir / "predictions-test-beam1.csv", keep_default_na=False)
    test_paths = [str(images[0].parent / name) for name in predictions["image"]]
    captioned, failures = run.caption_files(test_paths, run.decode_settings(1))
    assert failures == [] and [c for _, c in captioned] == list(predictions["caption"])
    capsys.readouterr()

    # Plain `captioner caption a.jpg b.jpg bad.jpg missing.jpg` with the latest run.
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not an image")
    args = [str(images[0]), str(images[1]), str(not_image), str(tmp_path / "missing.jpg")]
    os.utime(run_dir / "state.json", (4e9, 4e9))  # the newest finished run
    assert caption.caption_command(args, [], runs_dir=run_dir.parent, beam=1) == 2
    out, err = capsys.readouterr()
    assert f"using the latest finished run {run_dir}" in err
    assert f"{not_image}: not an image" in err and "missing.jpg: missing" in err
    lines = [line.split("\t") for line in out.splitlines()]
    assert [(p, m) for p, m, _ in lines] == [(str(images[0]), "tiny"), (str(images[1]), "tiny")]
    assert all(c for _, _, c in lines)

    # A folder, two models, JSON lines; the encoder is built once for both runs.
    folder = tmp_path / "photos"
    folder.mkdir()
    for image in images[:3]:
        shutil.copy(image, folder)
    encoders._build.cache_clear()
    assert (
        caption.caption_command([str(folder)], [str(run_dir), str(second)], beam=1, as_json=True)
        == 0
    )
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert encoders._build.cache_info().misses == 1 and len(records) == 6
    assert {r["model"] for r in records} == {"tiny", "second"}
    assert records[0]["image"] == records[1]["image"] == str(folder / images[0].name)
    assert records[0]["caption"] == records[1]["caption"]  # same weights, same caption


def test_bad_runs_are_reported_in_one_line(tmp_path):
    with pytest.raises(CaptionerError, match="no config.json, not a finished training run"):
        caption.caption_command(["x.jpg"], [str(tmp_path)])


@pytest.mark.slow
def test_train_evaluate_caption_through_the_cli(tmp_path, monkeypatch):
    """The whole path a user takes, on a tiny demo dataset: train, evaluate, caption."""
    from click.testing import CliRunner

    from captioner import metrics
    from captioner.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)  # METEOR: slow, not needed
    runner = CliRunner()
    tiny = [
        "--dataset",
        "demo",
        "--data-dir",
        "data",
        "--set",
        "demo.train_images=24",
        "--set",
        "demo.dev_images=6",
        "--set",
        "demo.test_images=6",
        "--set",
        "features.encoder=mobilenetv3small",
        "--set",
        "train.epochs=1",
    ]
    result = runner.invoke(main, ["train", *tiny, "--name", "tiny"])
    assert result.exit_code == 0, result.output
    card = Path("runs/tiny/README.md").read_text()  # the model card of a finished run
    assert "| dataset | demo, split official |" in card and "Not evaluated yet" in card
    assert "| encoder | mobilenetv3small (weights none), 576-d features" in card

    result = runner.invoke(main, ["evaluate", "--run", "runs/tiny", "--split", "test"])
    assert result.exit_code == 0, result.output
    card = Path("runs/tiny/README.md").read_text()  # rewritten with the evaluation
    bleu4 = json.loads(Path("runs/tiny/metrics-test-beam3.json").read_text())["metrics"]["bleu4"]
    assert "Not evaluated yet" not in card and "| test | 3 | 6 | " in card
    assert f" {bleu4:.3f} " in card and "## Sample captions" in card
    assert "captioner caption photo.jpg --model runs/tiny" in card
    listed = runner.invoke(main, ["runs", "--json"])
    assert listed.exit_code == 0, listed.output
    (row,) = json.loads(listed.stdout)
    assert (row["name"], row["status"], row["epoch"], row["epochs"]) == ("tiny", "finished", 1, 1)
    assert [(e["split"], e["beam"], e["bleu4"]) for e in row["evaluations"]] == [("test", 3, bleu4)]
    assert "runs/tiny: split test, 6 images, beam 3" in result.stdout
    assert "note: METEOR skipped: no `java` on PATH" in result.stdout
    assert result.stdout.strip().endswith("runs/tiny/metrics-test-beam3.json")
    predictions = pd.read_csv("runs/tiny/predictions-test-beam3.csv", keep_default_na=False)
    assert len(predictions) == 6

    image = f"data/demo/raw/Flicker8k_Dataset/{predictions['image'][0]}"
    result = runner.invoke(main, ["caption", image, "missing.jpg"])
    assert result.exit_code == 1
    assert result.stdout.startswith(f"{image}\ttiny\t") and len(result.stdout.splitlines()) == 1
    assert "using the latest finished run runs/tiny" in result.stderr
    assert "missing.jpg: missing: no such file" in result.stderr


@pytest.mark.slow
def test_a_folder_streams_chunk_by_chunk_with_progress_on_stderr(
    tmp_path, tiny_config, flickr8k_like, monkeypatch
):
    """Each chunk's captions reach stdout (flushed) before the next chunk is encoded; stdout
    holds nothing but results, the progress bar and failures go to stderr."""
    import io
    import sys

    run_dir, _ = write_run(tmp_path, tiny_config, flickr8k_like)
    folder = tmp_path / "photos"
    folder.mkdir()
    copy = sorted((flickr8k_like / "Flicker8k_Dataset").glob("*.jpg"))[:9]
    for image in copy:
        shutil.copy(image, folder)
    (folder / "broken.jpg").write_text("not an image")  # sorted first: in the first chunk
    monkeypatch.setattr(caption, "STREAM_CHUNK", 4)

    encoded: list[int] = []  # images encoded so far, one entry per encode call
    run = caption.load_run(run_dir)
    encode_files = run.encoder.encode_files

    def counting(paths, batch_size=16):
        encoded.append(len(paths))
        return encode_files(paths, batch_size=batch_size)

    monkeypatch.setattr(run.encoder, "encode_files", counting)
    monkeypatch.setattr(caption, "load_run", lambda *a, **k: run)

    class Recorder(io.StringIO):
        """stdout that notes, at each flush, how many images had been encoded."""

        def __init__(self):
            super().__init__()
            self.flushes: list[tuple[int, int]] = []  # (encode calls so far, lines so far)

        def flush(self):
            self.flushes.append((len(encoded), self.getvalue().count("\n")))

    stdout, stderr = Recorder(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", stderr)
    assert caption.caption_command([str(folder)], [str(run_dir)], beam=1) == 1

    # 10 files in chunks of 4 (the broken one fails): 3, 7, 9 lines, each flushed when done
    assert encoded == [4, 4, 2]
    assert [f for f in stdout.flushes if f[1]] == [(1, 3), (2, 7), (3, 9)]
    lines = [line.split("\t") for line in stdout.getvalue().splitlines()]
    assert [path for path, _, _ in lines] == [str(folder / p.name) for p in copy]
    assert all(model == "tiny" and text for _, model, text in lines)
    err = stderr.getvalue()
    assert "captioning" in err and "10/10" in err  # the tqdm bar
    assert f"{folder / 'broken.jpg'}: not an image" in err
