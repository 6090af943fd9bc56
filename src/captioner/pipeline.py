"""What `train` needs before it starts: the earlier stages, each reusing its finished output.

download -> clean -> features -> tokenizer. A stage whose complete output exists is not run
again, so a feature cache dropped in from elsewhere (features/<encoder>/ with its meta.json)
trains without the raw images being present.
"""

from __future__ import annotations

from pathlib import Path

from captioner import feature_cache
from captioner.config import Config
from captioner.io import log


def prepare(cfg: Config) -> dict[str, Path]:
    """Run download, clean, features and tokenizer as needed; return their output paths.

    Keys: "raw", "captions" (captions.csv), "features" (the cache folder), "vocab" (vocab.json).
    """
    from captioner import clean, download, tokenizer  # features only when it must run

    captions_json = cfg.captions_csv.with_name("captions.json")
    have_captions = cfg.captions_csv.is_file() and captions_json.is_file()
    have_features = feature_cache.is_finished(cfg.features_dir)
    paths = {"raw": cfg.raw_dir}
    # Raw data is needed to clean, or for the images of a downloadable dataset; a cleaned dataset
    # of your own (nothing to download) goes straight to the features stage.
    if not have_captions or (not have_features and download.downloadable(cfg)):
        paths["raw"] = download.download(cfg)
    if have_captions and not cfg.raw_dir.is_dir() and not cfg.data.captions:
        log(f"reusing {cfg.captions_csv} (no raw data to check it against)")
        paths["captions"] = cfg.captions_csv
    else:
        paths["captions"] = clean.clean(cfg)  # reuses captions.csv while its sources match
    if have_features:
        log(f"reusing {cfg.features_dir}")
        paths["features"] = cfg.features_dir
    else:
        from captioner import features

        paths["features"] = features.extract(cfg)
    paths["vocab"] = tokenizer.build_vocab(cfg)
    return paths
