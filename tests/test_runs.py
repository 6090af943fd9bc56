"""`captioner runs`: one row per run directory; broken and unfinished runs are listed, not fatal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from captioner import runs
from captioner.cli import main
from captioner.errors import CaptionerError
from captioner.io import write_json


def evaluation(split: str, beam: int, bleu4: float, cider_d: float, created: str) -> dict:
    """metrics.json as `captioner evaluate` writes it (the fields a listing reads)."""
    return {
        "split": split,
        "images": 6,
        "decoding": {"beam": beam, "length_penalty": 0.0, "no_repeat_ngram": 0, "max_length": 0},
        "metrics": {"bleu1": 0.5, "bleu4": bleu4, "cider_d": cider_d, "rouge_l": 0.4},
        "created": created,
    }


def make_run(root: Path, name: str, cfg, state: dict | None, model: bool = True) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    write_json(run_dir / "config.json", cfg.to_dict())
    if state is not None:
        write_json(run_dir / "state.json", state)
    if model:
        (run_dir / "model.keras").write_bytes(b"weights")
    return run_dir


@pytest.fixture
def runs_dir(tmp_path, tiny_config) -> Path:
    """A finished and evaluated run, an unfinished one, one with a corrupt config.json, a run
    missing its model, a run of another decoder, and folders and files that are no runs."""
    root = tmp_path / "runs"
    cfg = tiny_config("flickr8k", **{"features.encoder": "resnet50", "train.epochs": 12})
    done = {"epoch": 9, "epochs": 12, "finished": True, "best_val_loss": 2.71828, "best_epoch": 6}
    finished = make_run(root, "b-finished", cfg, done)
    write_json(finished / "metrics.json", evaluation("test", 3, 0.2345, 0.6789, "2026-12-01T10:00"))
    write_json(
        finished / "metrics-dev-beam1.json", evaluation("dev", 1, 0.1987, 0.5, "2026-12-01T09:00")
    )
    (finished / "metrics-broken.json").write_text("{not json")  # skipped, not fatal

    training = {"epoch": 2, "epochs": 12, "finished": False, "best_val_loss": 3.5}
    make_run(root, "a-unfinished", cfg, training, model=False)
    corrupt = make_run(root, "c-corrupt", cfg, done)
    (corrupt / "config.json").write_text('{"data": {"dataset": "flick')
    make_run(root, "d-no-model", cfg, done, model=False)
    other = tiny_config("demo")
    config = other.to_dict()
    config["model"]["decoder"] = "attention"  # a decoder named in the config is shown as such
    evaluated = make_run(root, "e-attention", other, {**done, "best_val_loss": 1.5})
    write_json(evaluated / "config.json", config)
    write_json(evaluated / "metrics.json", evaluation("test", 3, 0.4, 0.9, "2026-12-02T10:00"))
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("compare runs")
    (root / "README.md").write_text("my runs\n")
    return root


def test_read_run_summarises_each_kind_of_run(runs_dir):
    finished = runs.read_run(runs_dir / "b-finished")
    assert (finished.status, finished.dataset, finished.encoder) == (
        "finished",
        "flickr8k",
        "resnet50",
    )
    assert finished.decoder == "merge"  # no model.decoder in the config: the merge model
    assert (finished.epoch, finished.epochs, finished.best_dev_loss) == (9, 12, 2.71828)
    assert [(e.split, e.beam, e.bleu4, e.cider_d) for e in finished.evaluations] == [
        ("dev", 1, 0.1987, 0.5),
        ("test", 3, 0.2345, 0.6789),
    ]
    unfinished = runs.read_run(runs_dir / "a-unfinished")
    assert (unfinished.status, unfinished.epoch, unfinished.problem) == ("unfinished", 2, "")
    corrupt = runs.read_run(runs_dir / "c-corrupt")
    assert corrupt.status == "broken" and "config.json unreadable" in corrupt.problem
    assert corrupt.epoch == 9  # what can be read is still shown
    no_model = runs.read_run(runs_dir / "d-no-model")
    assert (no_model.status, no_model.problem) == ("broken", "model.keras missing")
    assert runs.read_run(runs_dir / "e-attention").decoder == "attention"
    assert not runs.is_run_dir(runs_dir / "notes")


def test_cli_table_one_row_per_run(runs_dir):
    result = CliRunner().invoke(main, ["runs", "--runs-dir", str(runs_dir)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == list(runs.COLUMNS)
    names = [line.split()[0] for line in lines[1:]]
    assert names == ["a-unfinished", "b-finished", "c-corrupt", "d-no-model", "e-attention"]
    row = dict(zip(names, lines[1:], strict=True))
    assert "flickr8k" in row["b-finished"] and "resnet50" in row["b-finished"]
    assert " 9/12 " in row["b-finished"] and "2.7183" in row["b-finished"]
    assert "test beam 3: BLEU-4 0.234 CIDEr-D 0.679" in row["b-finished"]
    assert "dev beam 1: BLEU-4 0.199 CIDEr-D 0.500" in row["b-finished"]
    assert " 2/12 " in row["a-unfinished"] and "unfinished" in row["a-unfinished"]
    assert "broken (config.json unreadable" in row["c-corrupt"]
    assert "notes" not in result.stdout and "README" not in result.stdout


def test_cli_json_and_sort(runs_dir):
    result = CliRunner().invoke(main, ["runs", "--runs-dir", str(runs_dir), "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    by_name = {row["name"]: row for row in listed}
    assert by_name["b-finished"]["finished"] and not by_name["a-unfinished"]["finished"]
    assert by_name["b-finished"]["evaluations"][1] == {
        "split": "test",
        "beam": 3,
        "bleu4": 0.2345,
        "cider_d": 0.6789,
        "file": "metrics.json",
        "created": "2026-12-01T10:00",
        "images": 6,
        "scores": {"bleu1": 0.5, "bleu4": 0.2345, "cider_d": 0.6789, "rouge_l": 0.4},
    }
    assert by_name["c-corrupt"]["status"] == "broken" and by_name["c-corrupt"]["problem"]

    def order(column: str) -> list[str]:
        args = ["runs", "--runs-dir", str(runs_dir), "--json", "--sort", column]
        return [row["name"] for row in json.loads(CliRunner().invoke(main, args).stdout)]

    assert order("bleu4")[:2] == ["e-attention", "b-finished"]  # best first, unscored last
    assert order("best_dev_loss")[:3] == ["e-attention", "b-finished", "c-corrupt"]
    assert order("status")[0] in {"c-corrupt", "d-no-model"}  # broken < finished < unfinished


def test_cli_errors_and_empty_folder(tmp_path):
    missing = CliRunner().invoke(main, ["runs", "--runs-dir", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1
    assert missing.output.strip() == (
        f"Error: {tmp_path / 'nowhere'}: no such folder; train a run with `captioner train` "
        "or pass --runs-dir"
    )
    bad_sort = CliRunner().invoke(main, ["runs", "--runs-dir", str(tmp_path), "--sort", "speed"])
    assert bad_sort.exit_code == 2 and "speed" in bad_sort.output
    empty = CliRunner().invoke(main, ["runs", "--runs-dir", str(tmp_path)])
    assert empty.exit_code == 0 and empty.stdout == "" and "no runs in" in empty.stderr
    with pytest.raises(CaptionerError, match="unknown column"):
        runs.list_runs(tmp_path, sort="speed")


def test_runs_help_has_an_example():
    result = CliRunner().invoke(main, ["runs", "--help"])
    assert result.exit_code == 0 and "captioner runs --sort bleu4" in result.output


def test_demo_summary_paragraph(runs_dir):
    """`make demo` ends with scripts/demo_summary.py: where the run is, scores, caption, next."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from demo_summary import summary

    run = runs_dir / "b-finished"
    text = summary(run, "data/x.jpg\tb-finished\ta red circle on the left\n", seconds=201)
    assert "\n" not in text and text.startswith(f"The demo run is in {run}/ (finished, 9/12")
    assert "On the test split (6 images, beam 3) it scores BLEU-4 0.23, CIDEr-D 0.68." in text
    assert 'The held-out image data/x.jpg was captioned "a red circle on the left".' in text
    assert "make demo took 3 min 21 s" in text and f"cat {run}/README.md" in text
    assert "captioner runs" in text and "tensorboard --logdir runs" in text
