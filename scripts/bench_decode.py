"""Decoding speed: our compiled greedy and beam-3 against the reference word-by-word decoder.

    python scripts/bench.py decode [--json] [--images 1000] [--reference-images 2]
    python scripts/bench.py decode --quality runs/demo [--split dev] [--json]

Same model and weights for both (random, reference sizes: 4096-d features, 256 units, a vocabulary
of 8,000, max_length 34). The <end> logit is pushed far down so that every caption runs to
max_length: the full-length worst case, the same number of words for ours and the reference.
The reference (one model.predict per word, re-tokenizing the text so far, pre-padding, scanning
the word index) is timed on a few images and reported per caption; ours on a batch of 1,000.
For scale, beam3_floor_ms is the matmul work of a beam-3 caption (vocabulary projection, LSTM
recurrence, decoder dense) at the float32 matmul peak measured in the same run (the best of a
measurement before and after, as the machine's speed drifts).

--quality RUN scores decoding settings (beam width, length penalty, n-gram blocking) on a split of
a trained run, to decide which become defaults (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench_common import best_time, machine, matmul_peak_gflops, report  # noqa: E402

# (beam, length_penalty, no_repeat_ngram) compared by --quality
SETTINGS = [
    (1, 0.0, 0),
    (3, 0.0, 0),
    (5, 0.0, 0),
    (3, 0.5, 0),
    (3, 1.0, 0),
    (3, 0.0, 2),
    (3, 0.0, 3),
    (3, 1.0, 3),
]


def build(vocab_size: int, feature_dim: int, seed: int = 0):
    """The merge model at reference sizes, random weights, <end> never chosen."""
    import keras

    from captioner.config import ModelConfig
    from captioner.models.merge import build_model
    from captioner.text import END_ID

    keras.utils.set_random_seed(seed)
    model = build_model(feature_dim, vocab_size, ModelConfig(embed_dim=256, units=256))
    kernel, bias = model.get_layer("logits").get_weights()
    bias[END_ID] = -1e4  # full-length captions: the worst case for both decoders
    model.get_layer("logits").set_weights([kernel, bias])
    return model


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="bench.py decode")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--reference-images", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--max-length", type=int, default=34)
    parser.add_argument("--feature-dim", type=int, default=4096)
    parser.add_argument("--quality", metavar="RUN", help="score decoding settings on a run")
    parser.add_argument("--split", default="dev", help="split for --quality")
    args = parser.parse_args(argv)
    if args.quality:
        return report(quality(args.quality, args.split), args.json)

    import numpy as np

    from captioner import decode, decode_loops, reference
    from captioner.models import decoder_for
    from captioner.tokenizer import Vocabulary

    model = build(args.vocab, args.feature_dim)
    rng = np.random.default_rng(0)
    # VGG16 fc2 outputs are non-negative (after relu)
    features = np.maximum(rng.normal(size=(args.images, args.feature_dim)), 0).astype(np.float32)

    peak = matmul_peak_gflops()
    timings = {}
    for name, run in (
        ("greedy", lambda: decode.greedy(model, features, args.max_length)),
        ("beam3", lambda: decode.beam_search(model, features, args.max_length, 3)),
    ):
        start = time.perf_counter()
        captions = run()  # traces and compiles, then runs once
        timings[f"{name}_first_call_s"] = time.perf_counter() - start
        if any(len(c) != args.max_length for c in captions):
            raise SystemExit("a caption ended early: the bench must time full-length captions")
        timings[f"{name}_ms"] = best_time(run, repeats=2) / args.images * 1000

    vocab = Vocabulary(
        tokens=("<pad>", "<unk>", "<start>", "<end>")
        + tuple(f"w{i}" for i in range(4, args.vocab)),
        counts=(0,) * args.vocab,
        max_length=args.max_length,
        settings={},
    )
    prefix_model = reference.reference_prefix_model(model, args.max_length)
    word_index = reference.reference_word_index(vocab)
    photos = features[: args.reference_images]
    prefix_model.predict([photos[:1], np.zeros((1, args.max_length))], verbose=0)  # warm up
    start = time.perf_counter()
    texts = [
        reference.generate_desc(prefix_model, word_index, photo[None], args.max_length)
        for photo in photos
    ]
    reference_ms = (time.perf_counter() - start) / len(photos) * 1000
    ours = decode.greedy(model, photos, args.max_length)
    same = [t.split()[1:] for t in texts] == [[vocab.tokens[i] for i in c] for c in ours]

    peak = max(peak, matmul_peak_gflops())
    decoder = decoder_for(model)
    units, columns = decoder.hidden_size, decode_loops._allowed_projection(decoder)[0].shape[1]
    flops_per_word = 2 * units * (columns + 4 * units + units)  # projection, recurrence, dense
    beam3_floor_ms = 3 * args.max_length * flops_per_word / (peak * 1e9) * 1000

    result = {
        "images": args.images,
        "vocab": args.vocab,
        "max_length": args.max_length,
        "feature_dim": args.feature_dim,
        "words_per_caption": args.max_length,
        "greedy_ms": timings["greedy_ms"],
        "beam3_ms": timings["beam3_ms"],
        "reference_ms": reference_ms,
        "reference_images": len(photos),
        "reference_ms_per_word": reference_ms / args.max_length,
        "ratio": reference_ms / timings["greedy_ms"],
        "beam3_ratio": reference_ms / timings["beam3_ms"],
        "peak_gflops": peak,
        "beam3_floor_ms": beam3_floor_ms,
        "same_captions_as_reference": same,
        "greedy_first_call_s": timings["greedy_first_call_s"],
        "beam3_first_call_s": timings["beam3_first_call_s"],
        **machine(),
    }
    return report(result, args.json)


def quality(run_dir: str, split: str) -> dict:
    """Scores of every decoding setting in SETTINGS on `split` of a trained run."""
    import numpy as np

    from captioner import evaluate, metrics
    from captioner.caption import load_run
    from captioner.config import replace

    run = load_run(run_dir, with_encoder=False)
    base = run.cfg
    references = evaluate.split_references(run, split)
    images, features = evaluate.split_features(run, references)
    refs = [references[image] for image in images]
    result: dict = {"run": run_dir, "split": split, "images": len(images)}
    for beam, length_penalty, ngram in SETTINGS:
        run.cfg = replace(
            base, **{"decode.length_penalty": length_penalty, "decode.no_repeat_ngram": ngram}
        )
        captions = run.caption_features(features, run.decode_settings(beam))
        scores, _ = metrics.score_all(captions, refs, with_meteor=False)
        words = [caption.split() for caption in captions]
        bigrams = [list(zip(w[:-1], w[1:], strict=True)) for w in words]
        repeats = sum(len(set(b)) < len(b) for b in bigrams)  # captions repeating a bigram
        name = f"beam{beam}_lp{length_penalty:g}_ngram{ngram}"
        result[name] = (
            f"B1 {scores['bleu1']:.3f} B4 {scores['bleu4']:.3f} CIDEr-D "
            f"{scores['cider_d']:.3f} ROUGE-L {scores['rouge_l']:.3f} words "
            f"{np.mean([len(w) for w in words]):.1f} repeats {repeats}"
        )
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
