"""`make demo`'s last words: one paragraph on where the run is, its scores, the held-out image's
caption and what to type next.

    python scripts/demo_summary.py RUN_DIR "IMAGE<TAB>MODEL<TAB>CAPTION" [SECONDS]
"""

from __future__ import annotations

import sys
from pathlib import Path

from captioner.runs import read_run


def summary(run_dir: Path, caption_line: str, seconds: float | None = None) -> str:
    run = read_run(run_dir)
    loss = "" if run.best_dev_loss is None else f", best dev loss {run.best_dev_loss:.3f}"
    parts = [
        f"The demo run is in {run_dir}/ ({run.status}, {run.epoch}/{run.epochs} epochs{loss}; "
        f"{run.encoder} features, {run.decoder} decoder)."
    ]
    for evaluation in run.evaluations:
        scores = ", ".join(
            f"{name} {value:.2f}"
            for name, value in (("BLEU-4", evaluation.bleu4), ("CIDEr-D", evaluation.cider_d))
            if value is not None
        )
        parts.append(
            f"On the {evaluation.split} split ({evaluation.images} images, beam "
            f"{evaluation.beam}) it scores {scores or 'nothing readable'}."
        )
    fields = caption_line.strip().split("\t")
    if len(fields) == 3:
        parts.append(f'The held-out image {fields[0]} was captioned "{fields[2]}".')
    if seconds is not None:
        minutes, rest = divmod(round(seconds), 60)
        parts.append(f"make demo took {minutes} min {rest} s (with the install check).")
    parts.append(
        f"Next: read its model card (cat {run_dir}/README.md), list runs (captioner runs), "
        "watch training curves (tensorboard --logdir runs), caption your own picture of coloured "
        f"shapes (captioner caption IMAGE --model {run_dir}), or train on real photos "
        "(captioner train --dataset flickr8k)."
    )
    return " ".join(parts)


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) not in (2, 3):
        sys.exit(__doc__)
    seconds = float(args[2]) if len(args) == 3 else None
    print("\n" + summary(Path(args[0]), args[1], seconds))
