"""Caption metrics: BLEU-1..4 (nltk), CIDEr-D, ROUGE-L, and METEOR when Java is present.

Inputs are clean captions (text.normalize: lower-case words separated by single spaces), without
special tokens: one hypothesis per image and a list of references per image. CIDEr-D and ROUGE-L
follow the coco-caption code (pycocoevalcap) line by line, so scores compare with published ones;
tests/test_evaluate.py checks BLEU and CIDEr-D against pycocoevalcap on real Flickr8k captions.
"""

from __future__ import annotations

import shutil
import warnings
from collections import Counter
from collections.abc import Sequence

import numpy as np

START_WORD, END_WORD = "startseq", "endseq"  # how the old notebook wrapped captions


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-1..4 (nltk corpus_bleu, no smoothing) on word lists."""
    from nltk.translate.bleu_score import corpus_bleu

    hyps = [h.split() for h in hypotheses]
    refs = [[r.split() for r in rs] for rs in references]
    scores = {}
    with warnings.catch_warnings():  # nltk warns when an n-gram order has no match (score 0)
        warnings.simplefilter("ignore")
        for n in range(1, 5):
            scores[f"bleu{n}"] = float(corpus_bleu(refs, hyps, weights=(1.0 / n,) * n))
    return scores


def bleu_reference_style(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, float]:
    """BLEU as the old notebook computed it: startseq/endseq counted as words (inflated)."""

    def wrap(caption: str) -> str:
        return f"{START_WORD} {caption} {END_WORD}"

    return bleu([wrap(h) for h in hypotheses], [[wrap(r) for r in rs] for rs in references])


def _ngrams(words: Sequence[str], n: int = 4) -> Counter:
    return Counter(
        tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1)
    )


def cider_d(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0
) -> float:
    """CIDEr-D (Vedantam et al. 2015) as in coco-caption: tf-idf n-gram vectors with idf from the
    references of this set, clipped cosine similarity, Gaussian length penalty, times 10."""
    hyp_counts = [_ngrams(h.split(), n) for h in hypotheses]
    ref_counts = [[_ngrams(r.split(), n) for r in refs] for refs in references]
    document_frequency: Counter = Counter()
    for refs in ref_counts:  # an n-gram counts once per image, however many references use it
        document_frequency.update(set().union(*refs))
    log_images = np.log(float(len(references)))

    def vectorize(counts: Counter) -> tuple[list[dict], np.ndarray, int]:
        vectors: list[dict] = [{} for _ in range(n)]
        for gram, term_frequency in counts.items():
            idf = log_images - np.log(max(1.0, document_frequency[gram]))
            vectors[len(gram) - 1][gram] = term_frequency * idf
        norms = np.array([np.sqrt(sum(v * v for v in vector.values())) for vector in vectors])
        # coco-caption measures length as the number of bigrams; kept for identical scores.
        length = sum(c for gram, c in counts.items() if len(gram) == 2)
        return vectors, norms, length

    scores = []
    for hyp, refs in zip(hyp_counts, ref_counts, strict=True):
        vec_h, norm_h, len_h = vectorize(hyp)
        total = np.zeros(n)
        for ref in refs:
            vec_r, norm_r, len_r = vectorize(ref)
            for k in range(n):
                # clipped: a hypothesis gains nothing by repeating an n-gram more than the reference
                dot = sum(
                    min(v, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, v in vec_h[k].items()
                )
                if norm_h[k] != 0 and norm_r[k] != 0:
                    dot /= norm_h[k] * norm_r[k]
                total[k] += dot * np.exp(-((len_h - len_r) ** 2) / (2 * sigma**2))
        scores.append(np.mean(total) / len(refs) * 10.0)
    return float(np.mean(scores)) if scores else 0.0


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], beta: float = 1.2
) -> float:
    """ROUGE-L as in coco-caption: F-measure of the best LCS precision and recall among the
    references."""
    scores = []
    for hyp, refs in zip(hypotheses, references, strict=True):
        words = hyp.split()
        if not words:
            scores.append(0.0)
            continue
        lcs = [_lcs(r.split(), words) for r in refs]
        precision = max(c / len(words) for c in lcs)
        recall = max(c / max(1, len(r.split())) for c, r in zip(lcs, refs, strict=True))
        if precision == 0 or recall == 0:
            scores.append(0.0)
        else:
            scores.append((1 + beta**2) * precision * recall / (recall + beta**2 * precision))
    return float(np.mean(scores)) if scores else 0.0


def meteor(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[float | None, str]:
    """(METEOR 1.5, "") via pycocoevalcap's jar, or (None, why it was skipped)."""
    if shutil.which("java") is None:
        return None, "METEOR skipped: no `java` on PATH"
    try:
        from pycocoevalcap.meteor.meteor import Meteor
    except ImportError:
        return None, "METEOR skipped: pip install 'captioner[eval]' (pycocoevalcap)"
    keys = [str(i) for i in range(len(hypotheses))]
    scorer = None
    try:
        scorer = Meteor()
        score, _ = scorer.compute_score(
            dict(zip(keys, map(list, references), strict=True)),
            {k: [h] for k, h in zip(keys, hypotheses, strict=True)},
        )
    except (OSError, ValueError) as error:  # e.g. the JVM died: a broken pipe or an empty reply
        if scorer is not None and scorer.lock.locked():
            scorer.lock.release()  # else Meteor.__del__ would wait for this lock forever
        return None, f"METEOR skipped: the METEOR jar failed ({error})"
    return float(score), ""


def score_all(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], with_meteor: bool = True
) -> tuple[dict[str, float], list[str]]:
    """Every metric: ({"bleu1".."bleu4", "cider_d", "rouge_l"[, "meteor"]}, notes)."""
    scores = {
        **bleu(hypotheses, references),
        "cider_d": cider_d(hypotheses, references),
        "rouge_l": rouge_l(hypotheses, references),
    }
    notes = []
    if with_meteor:
        value, note = meteor(hypotheses, references)
        if value is None:
            notes.append(note)
        else:
            scores["meteor"] = value
    return scores, notes
