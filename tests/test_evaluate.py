"""Metrics (checked against pycocoevalcap on real Flickr8k captions) and the evaluate stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from captioner import metrics
from captioner.errors import CaptionerError
from captioner.text import normalize

ENCODER, DIM = "mobilenetv3small", 576  # the run's recorded encoder (see encoders.build_encoder)


def fixture_captions(fixtures: Path, images: int | None = None) -> dict[str, list[str]]:
    """{image: its 5 clean captions} from the real Flickr8k.token.txt, in file order."""
    captions: dict[str, list[str]] = {}
    token_file = fixtures / "Flickr8k_text" / "Flickr8k.token.txt"
    for line in token_file.read_text(encoding="utf-8").splitlines():
        name, caption = line.split("\t", 1)
        image = name.split("#")[0]
        if image not in captions and images is not None and len(captions) == images:
            break
        captions.setdefault(image, []).append(normalize(caption))
    return captions


def perturbed(captions: dict[str, list[str]], seed: int = 0) -> tuple[list[str], list[list[str]]]:
    """Hypotheses: caption 0 of each image, with a word dropped, swapped or borrowed from another
    image (every 7th image gets another image's caption); references: the other captions."""
    rng = np.random.default_rng(seed)
    values = list(captions.values())
    hypotheses, references = [], []
    for index, caps in enumerate(values):
        words = caps[0].split()
        kind = index % 7
        if kind == 6:
            words = values[(index + 3) % len(values)][0].split()
        elif kind in (1, 4) and len(words) > 2:
            del words[rng.integers(len(words))]
        elif kind in (2, 5) and len(words) > 2:
            i = rng.integers(len(words) - 1)
            words[i], words[i + 1] = words[i + 1], words[i]
        elif kind == 3:
            borrowed = values[(index + 1) % len(values)][1].split()
            words[rng.integers(len(words))] = rng.choice(borrowed)
        hypotheses.append(" ".join(words))
        references.append(caps[1:])
    return hypotheses, references


def test_metrics_equal_pycocoevalcap_on_real_captions(flickr8k_fixtures):
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    hypotheses, references = perturbed(fixture_captions(flickr8k_fixtures, images=300))
    gts = {i: refs for i, refs in enumerate(references)}
    res = {i: [hyp] for i, hyp in enumerate(hypotheses)}
    coco_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    ours = metrics.bleu(hypotheses, references)
    assert 0.1 < ours["bleu4"] < ours["bleu1"] < 1.0  # a realistic, imperfect set
    for n in range(1, 5):
        assert ours[f"bleu{n}"] == pytest.approx(coco_bleu[n - 1], abs=0.005)
    coco_cider, _ = Cider().compute_score(gts, res)
    assert metrics.cider_d(hypotheses, references) == pytest.approx(coco_cider, abs=1e-6)
    coco_rouge, _ = Rouge().compute_score(gts, res)
    assert metrics.rouge_l(hypotheses, references) == pytest.approx(coco_rouge, abs=1e-9)


def test_metrics_by_hand():
    perfect = metrics.bleu(["a dog runs on the grass"], [["a dog runs on the grass"]])
    assert perfect == {"bleu1": 1.0, "bleu2": 1.0, "bleu3": 1.0, "bleu4": 1.0}
    # LCS("a b c d", "a c d e f") = 3: precision 3/4, recall 3/5, F with beta = 1.2
    expected = (1 + 1.44) * 0.75 * 0.6 / (0.6 + 1.44 * 0.75)
    assert metrics.rouge_l(["a b c d"], [["x y", "a c d e f"]]) == pytest.approx(expected)
    assert metrics.rouge_l([""], [["a dog"]]) == 0.0
    assert metrics.cider_d(["cat sits"], [["a dog runs"]]) == 0.0
    # Counting the start/end words inflates BLEU for any imperfect caption.
    hyps, refs = ["a dog in grass"], [["a brown dog runs in the grass"]]
    assert metrics.bleu_reference_style(hyps, refs)["bleu2"] > metrics.bleu(hyps, refs)["bleu2"]


def test_meteor_is_skipped_with_a_note_without_java(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    scores, notes = metrics.score_all(["a dog"], [["a dog runs"]])
    assert "meteor" not in scores and notes == ["METEOR skipped: no `java` on PATH"]


def test_meteor_jar_dying_is_a_note_not_a_hang(monkeypatch):
    """The METEOR jar exits at once (e.g. the JVM cannot start): skipped with a note."""
    import subprocess
    import threading

    meteor_module = pytest.importorskip("pycocoevalcap.meteor.meteor")

    def dead_jar(self):
        self.meteor_p = subprocess.Popen(
            ["true"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.lock = threading.Lock()

    monkeypatch.setattr(meteor_module.Meteor, "__init__", dead_jar)
    monkeypatch.setattr(metrics.shutil, "which", lambda name: "/usr/bin/java")
    score, note = metrics.meteor(["a dog"], [["a dog runs"]])
    assert score is None and note.startswith("METEOR skipped: the METEOR jar failed")


@pytest.mark.slow
def test_meteor_with_java():
    if shutil.which("java") is None:
        pytest.skip("no java")
    pytest.importorskip("pycocoevalcap")
    score, note = metrics.meteor(
        ["a dog runs on the grass", "two men talk"],
        [["a dog runs on the grass", "a dog running"], ["a cat sleeps on a sofa"]],
    )
    assert note == "" and 0.3 < score < 0.7  # one perfect caption, one unrelated


# --- a saved run in the documented layout (docs/CONTRACTS.md) ----------------------------------


def write_run(tmp_path: Path, tiny_config, fixtures: Path, features: np.ndarray | None = None):
    """Dataset (captions.csv, captions.json, feature cache) and a finished run with a tiny random
    model, from the first 24 fixture images: 14 train, 4 dev, 6 test. Returns (run_dir, cfg)."""
    import keras

    from captioner.config import ModelConfig
    from captioner.io import write_json
    from captioner.models.merge import build_model
    from captioner.tokenizer import Vocabulary

    cfg = tiny_config(
        **{
            "features.encoder": ENCODER,
            "features.precision": "float32",
            "model.embed_dim": 16,
            "model.units": 16,
            "model.dropout": 0.0,
            "model.normalize_features": False,
        }
    )
    images_dir = fixtures / "Flicker8k_Dataset"
    names = sorted(p.name for p in images_dir.glob("*.jpg"))[:24]
    captions = fixture_captions(fixtures)
    split = {
        name: "train" if i < 14 else "dev" if i < 18 else "test" for i, name in enumerate(names)
    }
    rows = [(name, split[name], caption, caption) for name in names for caption in captions[name]]
    frame = pd.DataFrame(rows, columns=["image", "split", "caption", "raw"])
    cfg.dataset_dir.mkdir(parents=True)
    frame.to_csv(cfg.captions_csv, index=False)
    write_json(cfg.captions_csv.with_name("captions.json"), {"images_dir": str(images_dir)})

    if features is None:
        features = np.random.default_rng(0).normal(size=(len(names), DIM)).astype(np.float32)
    meta = {
        "encoder": ENCODER,
        "weights": "none",
        "seed": cfg.seed,
        "precision": "float32",
        "dtype": "float32",
        "dim": DIM,
        "count": len(names),
    }
    cfg.features_dir.mkdir(parents=True)
    np.save(cfg.features_dir / "features.npy", features)
    (cfg.features_dir / "ids.txt").write_text("".join(f"{n}\n" for n in names))
    (cfg.features_dir / "bad_images.txt").write_text("")
    write_json(cfg.features_dir / "meta.json", meta)

    run_dir = Path(cfg.train.runs_dir) / "tiny"
    vocab = Vocabulary.from_captions(frame.loc[frame["split"] == "train", "caption"])
    keras.utils.set_random_seed(0)
    model = build_model(DIM, vocab.size, ModelConfig(embed_dim=16, units=16, dropout=0.0))
    kernel, bias = model.get_layer("logits").get_weights()
    model.get_layer("logits").set_weights([kernel * 8.0, bias])  # varied, non-trivial captions
    run_dir.mkdir(parents=True)
    model.save(run_dir / "model.keras")
    write_json(run_dir / "config.json", cfg.to_dict())
    write_json(run_dir / "vocab.json", vocab.to_json())
    write_json(run_dir / "features_meta.json", meta)
    write_json(run_dir / "state.json", {"epoch": 1, "epochs": 1, "finished": True})
    return run_dir, cfg


@pytest.mark.slow
def test_evaluate_writes_metrics_and_predictions(tmp_path, tiny_config, flickr8k_like, capsys):
    from captioner import decode, evaluate
    from captioner.caption import load_run

    run_dir, cfg = write_run(tmp_path, tiny_config, flickr8k_like)
    path = evaluate.evaluate(run_dir, split="test", with_meteor=False)
    result = json.loads(path.read_text())
    assert path == run_dir / "metrics-test-beam3.json"
    assert (result["split"], result["images"], result["decoding"]["beam"]) == ("test", 6, 3)
    assert set(result["metrics"]) == {"bleu1", "bleu2", "bleu3", "bleu4", "cider_d", "rouge_l"}
    assert result["bleu_reference_style"]["bleu1"] > result["metrics"]["bleu1"]

    predictions = pd.read_csv(run_dir / "predictions-test-beam3.csv", keep_default_na=False)
    frame = pd.read_csv(cfg.captions_csv, keep_default_na=False)
    test = frame[frame["split"] == "test"]
    assert list(predictions["image"]) == list(dict.fromkeys(test["image"]))
    references = [refs.split(" | ") for refs in predictions["references"]]
    assert references == [
        list(test.loc[test["image"] == i, "caption"]) for i in predictions["image"]
    ]
    # The captions are the beam-3 decoding of those images' cached features.
    run = load_run(run_dir, with_encoder=False)
    ids = (cfg.features_dir / "ids.txt").read_text().split()
    features = np.load(cfg.features_dir / "features.npy")[
        [ids.index(i) for i in predictions["image"]]
    ]
    expected = decode.beam_search(run.model, features, run.vocab.max_length, beam=3)
    assert list(predictions["caption"]) == [run.vocab.decode(words) for words in expected]
    assert len(set(predictions["caption"])) > 1
    scores, _ = metrics.score_all(list(predictions["caption"]), references, with_meteor=False)
    assert scores == pytest.approx(result["metrics"])
    table = capsys.readouterr().out
    assert "split test, 6 images, beam 3" in table and "CIDEr-D" in table

    evaluate.evaluate(run_dir, split="test", with_meteor=False)
    assert "reusing" in capsys.readouterr().err
    greedy = json.loads(
        evaluate.evaluate(run_dir, split="dev", beam=1, with_meteor=False).read_text()
    )
    assert (greedy["split"], greedy["images"], greedy["decoding"]["beam"]) == ("dev", 4, 1)


def test_evaluate_refuses_bad_input(tmp_path, tiny_config, flickr8k_like):
    from captioner import evaluate
    from captioner.io import write_json

    run_dir, cfg = write_run(tmp_path, tiny_config, flickr8k_like)
    with pytest.raises(CaptionerError, match="no images in split 'val'.*dev, test, train"):
        evaluate.evaluate(run_dir, split="val", with_meteor=False)
    with pytest.raises(CaptionerError, match="--data-dir"):
        evaluate.evaluate(run_dir, data_dir=str(tmp_path / "elsewhere"), with_meteor=False)
    with pytest.raises(CaptionerError, match=r"--beam must be in \[1, 100\] \(1 = greedy\)"):
        evaluate.evaluate(run_dir, beam=0, with_meteor=False)
    meta = json.loads((run_dir / "features_meta.json").read_text())
    write_json(run_dir / "features_meta.json", {**meta, "weights": "imagenet"})
    with pytest.raises(CaptionerError, match="weights='none'.*trained on weights='imagenet'"):
        evaluate.evaluate(run_dir, with_meteor=False)
    (run_dir / "model.keras").unlink()
    with pytest.raises(CaptionerError, match="no model.keras"):
        evaluate.evaluate(run_dir, with_meteor=False)
