"""The model card (README.md of a run): made from the run's files, rewritten per evaluation."""

from __future__ import annotations

from test_runs import evaluation, make_run

from captioner.card import write_card
from captioner.io import write_json


def test_card_shows_the_run_and_every_evaluation_and_is_rewritten(tmp_path, tiny_config):
    cfg = tiny_config("flickr8k", **{"features.encoder": "resnet50", "model.units": 512})
    state = {"epoch": 7, "epochs": 20, "finished": True, "best_val_loss": 2.5, "best_epoch": 4}
    run_dir = make_run(tmp_path / "runs", "f8k", cfg, state)
    write_json(
        run_dir / "vocab.json", {"size": 2990, "max_length": 34, "settings": {"min_count": 5}}
    )
    write_json(
        run_dir / "features_meta.json",
        {"encoder": "resnet50", "weights": "imagenet", "dim": 2048, "precision": "float32"},
    )
    machine = {"cpu": "AMD EPYC 7B13", "cores": 2, "cpu_flags": ["avx2"], "gpus": []}
    write_json(run_dir / "training.json", {"seconds": 754.2, "epochs_timed": 7, "machine": machine})

    card = write_card(run_dir).read_text()
    assert card.startswith("# Model card: f8k\n")
    assert "| dataset | flickr8k, split official |" in card
    assert "| encoder | resnet50 (weights imagenet), 2048-d features, float32 |" in card
    assert "| decoder | merge: LSTM 512 units, embedding 256, dropout 0.4 |" in card
    assert "2990 tokens (words seen at least 5 times in training), captions up to 34 words" in card
    assert "7 of 20 epochs, best dev loss 2.5000 at epoch 4" in card
    assert "12 min 34 s over 7 epochs on AMD EPYC 7B13 (2 cores; avx2), no GPU" in card
    assert "Not evaluated yet" in card and "## Sample captions" not in card
    assert f"captioner caption photo.jpg --model {run_dir}" in card and "## Export" in card
    assert f"captioner export --run {run_dir} exported/{run_dir.name}" in card

    write_json(run_dir / "metrics.json", evaluation("test", 3, 0.2345, 0.6789, "2026-12-01T10:00"))
    (run_dir / "predictions.csv").write_text(
        'image,caption,references\na.jpg,a dog runs,"a dog runs on grass | a brown dog"\n'
        "b.jpg,,a cat | a kitten\n"
    )
    card = write_card(run_dir).read_text()
    assert "Not evaluated yet" not in card
    assert "| test | 3 | 6 | 0.500 | 0.234 | 0.679 | 0.400 | - | 2026-12-01T10:00 |" in card
    assert "| a.jpg | a dog runs | a dog runs on grass |" in card
    assert "| b.jpg | (empty) | a cat |" in card

    write_json(run_dir / "metrics-dev.json", evaluation("dev", 1, 0.3, 0.8, "2026-12-02T10:00"))
    rows = [line for line in write_card(run_dir).read_text().splitlines() if "| 2026-12" in line]
    assert [row.split(" | ")[0] for row in rows] == ["| test", "| dev"]  # oldest first


def test_card_of_a_damaged_run_is_still_written(tmp_path, tiny_config):
    run_dir = make_run(tmp_path / "runs", "broken", tiny_config(), None, model=False)
    (run_dir / "config.json").write_text("{")
    card = write_card(run_dir).read_text()
    assert "| status | broken (config.json unreadable" in card
    assert "| time | not recorded |" in card
