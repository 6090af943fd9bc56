"""The `plot` stage: PNGs that show a dataset and a trained run (optional extra `plots`).

Dataset plots: sample images with their captions, the most frequent words, and the image
features in 2-D (PCA) with k-means clusters and example thumbnails per cluster. Run plots (only
with a run directory): training/validation loss per epoch (history.csv), test images with the
generated caption and one reference (the newest predictions-test-*.csv), and for a run with
attention, test images with where each word of their caption looked (attention_plots.py).

Figures are built with matplotlib's `Figure` directly (no pyplot: no global state, no GUI
backend; PNGs are rendered by Agg) and written atomically.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from captioner.errors import CaptionerError

try:  # the optional extra: one readable line instead of an ImportError traceback
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
except ImportError as error:
    raise CaptionerError(
        f"plots need matplotlib and scikit-learn ({error.name} is not installed); "
        "pip install 'captioner[plots]'"
    ) from None

from captioner import plot_figures as figures
from captioner.config import Config
from captioner.feature_cache import for_decoder
from captioner.io import log

MAX_FEATURE_POINTS = 3000  # PCA/k-means on a seeded sample keeps Flickr30k (31k x 4096) quick


# --- dataset plots -------------------------------------------------------------------------


def sample_grid(
    captions: pd.DataFrame,
    images_dir: Path,
    out: Path,
    count: int = 6,
    per_image: int = 3,
    seed: int = 0,
) -> Path:
    """A grid of `count` random images (seeded), each with up to `per_image` of its captions."""
    names = captions["image"].drop_duplicates()
    chosen = names.sample(n=min(count, len(names)), random_state=seed).tolist()
    text_column = "raw" if "raw" in captions.columns else "caption"
    cells = []
    for name in chosen:
        texts = captions.loc[captions["image"] == name, text_column].head(per_image)
        cells.append((images_dir / name, "\n".join(f"• {figures.wrap(str(t))}" for t in texts)))
    return figures.save(figures.image_grid(cells, "Sample images and their captions"), out)


def word_counts(captions: Iterable[str], top: int = 50) -> list[tuple[str, int]]:
    """The `top` most frequent words of clean captions, most frequent first."""
    counter: Counter[str] = Counter()
    for caption in captions:
        counter.update(str(caption).split())
    return counter.most_common(top)


def word_frequencies(captions: Iterable[str], out: Path, top: int = 50) -> Path:
    """Horizontal bar chart of the `top` most frequent words, the most frequent on top."""
    counts = word_counts(captions, top)
    if not counts:
        raise CaptionerError(f"{out}: no caption words to count; run `captioner clean` first")
    words, values = zip(*reversed(counts), strict=True)
    figure = Figure(figsize=(8, 0.22 * len(words) + 1.2), layout="constrained")
    axes = figure.subplots()
    axes.barh(words, values, color="tab:blue")
    axes.set_xlabel("occurrences in all captions")
    axes.set_title(f"The {len(words)} most frequent words")
    axes.tick_params(axis="y", labelsize=8)
    axes.margins(y=0.005)
    return figures.save(figure, out)


def feature_clusters(
    features: np.ndarray, clusters: int = 5, seed: int = 0, max_points: int = MAX_FEATURE_POINTS
):
    """Seeded sample of feature rows -> (rows, 2-D coordinates, cluster labels, explained ratio).

    PCA to at most 50 dimensions, k-means there (distances mean more than in 2-D), and the first
    two components for display. rows index into `features`.
    """
    count = len(features)
    rows = np.arange(count)
    if count > max_points:
        rows = np.sort(np.random.default_rng(seed).choice(count, max_points, replace=False))
    # (n, D) read from the memory map; a grid cache's rows as their mean over regions
    sample = for_decoder(features[rows], "pooled", "of the feature-space plot")
    pca = PCA(n_components=min(50, *sample.shape), random_state=seed)
    reduced = pca.fit_transform(sample)  # (n, <=50)
    clusters = max(1, min(clusters, len(rows)))
    kmeans = KMeans(n_clusters=clusters, n_init=10, random_state=seed).fit(reduced)
    # The images closest to each cluster centre are its examples: order rows by that distance.
    distance = np.linalg.norm(reduced - kmeans.cluster_centers_[kmeans.labels_], axis=1)
    order = np.argsort(distance)
    return (
        rows[order],
        reduced[order, :2],
        kmeans.labels_[order],
        pca.explained_variance_ratio_[:2],
    )


def feature_space(
    features: np.ndarray,
    ids: Sequence[str],
    images_dir: Path,
    out: Path,
    clusters: int = 5,
    examples: int = 4,
    seed: int = 0,
) -> Path:
    """2-D scatter of the features coloured by k-means cluster, with example images per cluster."""
    if len(features) < 2:
        raise CaptionerError(f"{out}: need at least 2 feature vectors to draw the feature space")
    rows, coords, labels, ratio = feature_clusters(features, clusters, seed)
    clusters = int(labels.max()) + 1
    colors = [f"C{k % 10}" for k in range(clusters)]

    figure = Figure(figsize=(7 + 1.6 * examples, max(6.0, 1.6 * clusters)), layout="constrained")
    left, right = figure.subfigures(1, 2, width_ratios=[7, 1.6 * examples])
    axes = left.subplots()
    for k in range(clusters):
        mine = labels == k
        axes.scatter(
            coords[mine, 0],
            coords[mine, 1],
            s=8,
            alpha=0.6,
            color=colors[k],
            label=f"cluster {k + 1} ({mine.sum()} images)",
        )
        centre = coords[mine].mean(axis=0)
        axes.annotate(
            str(k + 1),
            centre,
            fontsize=14,
            weight="bold",
            ha="center",
            va="center",
            bbox={"boxstyle": "circle", "facecolor": "white", "edgecolor": colors[k]},
        )
    axes.set_xlabel(f"PC1 ({ratio[0]:.0%} of variance)")
    axes.set_ylabel(f"PC2 ({ratio[1]:.0%} of variance)" if len(ratio) > 1 else "PC2")
    axes.set_title(f"Image features in 2-D (PCA), {clusters} k-means clusters")
    axes.legend(fontsize=8, markerscale=2)

    right.suptitle("Images nearest each cluster centre", fontsize=10)
    thumbnails = right.subplots(clusters, examples, squeeze=False)
    for k in range(clusters):
        nearest = rows[labels == k][:examples]  # rows are sorted by distance to their centre
        for column, axes in enumerate(thumbnails[k]):
            if column < len(nearest):
                figures.show(axes, images_dir / ids[nearest[column]])
            else:
                axes.set_axis_off()
        thumbnails[k][0].text(
            -0.1,
            0.5,
            str(k + 1),
            transform=thumbnails[k][0].transAxes,
            color=colors[k],
            fontsize=14,
            weight="bold",
            ha="right",
            va="center",
        )
    return figures.save(figure, out)


# --- run plots -----------------------------------------------------------------------------


def loss_curves(history_csv: Path, out: Path) -> Path:
    """Training and validation loss per epoch from a run's history.csv (epoch,loss,val_loss)."""
    history = figures.read_csv(history_csv)
    if "loss" not in history.columns or history.empty:
        raise CaptionerError(
            f"{history_csv}: no 'loss' column or no epochs; pass a run made by `captioner train`"
        )
    # train.py numbers epochs from 1; a file without the column gets 1..n
    epochs = history["epoch"] if "epoch" in history.columns else history.index + 1
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    axes.plot(epochs, history["loss"], marker="o", label="training loss")
    if "val_loss" in history.columns:
        axes.plot(epochs, history["val_loss"], marker="o", label="validation loss")
        best = int(history["val_loss"].idxmin())
        axes.axvline(
            epochs[best],
            color="0.6",
            linestyle="--",
            label=f"best validation loss {history['val_loss'][best]:.3f} (epoch {epochs[best]})",
        )
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("cross-entropy per word")
    axes.set_title(f"Loss per epoch ({history_csv.parent.name})")
    axes.legend()
    axes.grid(alpha=0.3)
    return figures.save(figure, out)


def _first_reference(references: str) -> str:
    """predictions.csv joins an image's references with " | " (evaluate.py)."""
    return str(references).split(" | ")[0]


def prediction_grid(predictions_csv: Path, images_dir: Path, out: Path, count: int = 6) -> Path:
    """Test images with the generated caption and one reference caption each."""
    predictions = figures.read_csv(predictions_csv)
    missing = {"image", "caption", "references"} - set(predictions.columns)
    if missing:
        raise CaptionerError(
            f"{predictions_csv}: missing columns {sorted(missing)}; run `captioner evaluate` again"
        )
    cells = [
        (
            images_dir / row.image,
            f"model: {figures.wrap(row.caption)}\n"
            f"reference: {figures.wrap(_first_reference(row.references))}",
        )
        for row in predictions.head(count).itertuples()
    ]
    return figures.save(
        figures.image_grid(cells, f"Generated captions ({predictions_csv.parent.name})"), out
    )


# --- the stage -----------------------------------------------------------------------------

Job = Callable[[Path], Path] | str  # draws the plot into the given path, or why it is skipped


def _dataset_jobs(cfg: Config, captions: pd.DataFrame, images_dir: Path) -> dict[str, Job]:
    def draw_features(path: Path) -> Path:
        from captioner.feature_cache import load_cache

        cache = load_cache(cfg.features_dir)
        return feature_space(cache.features, cache.ids, images_dir, path, seed=cfg.seed)

    from captioner.feature_cache import is_finished

    has_cache = is_finished(cfg.features_dir)
    return {
        "samples.png": lambda path: sample_grid(captions, images_dir, path, seed=cfg.seed),
        "word_frequencies.png": lambda path: word_frequencies(captions["caption"], path),
        "feature_space.png": draw_features
        if has_cache
        else f"no finished feature cache in {cfg.features_dir} (run `captioner features` first)",
    }


def _run_jobs(run_dir: Path | None, images_dir: Path, data_dir: str) -> dict[str, Job]:
    if run_dir is None:
        return dict.fromkeys(("loss.png", "predictions.png", "attention.png"), "no --run given")
    if not run_dir.is_dir():
        raise CaptionerError(
            f"{run_dir}: run directory not found; pass a folder made by `captioner train`"
        )
    from captioner.run_data import find_predictions

    history, predictions = run_dir / "history.csv", find_predictions(run_dir, "test")
    return {
        "loss.png": (lambda path: loss_curves(history, path))
        if history.is_file()
        else f"{history} not found (train the run first)",
        "predictions.png": (lambda path: prediction_grid(predictions, images_dir, path))
        if predictions is not None
        else f"no test predictions in {run_dir} (run `captioner evaluate --run {run_dir}` first)",
        "attention.png": _attention_job(run_dir, images_dir, data_dir),
    }


def _attention_job(run_dir: Path, images_dir: Path, data_dir: str) -> Job:
    """The page of test images with each word's attention map, for a decoder with attention."""
    from captioner.limits import DECODER_FEATURES
    from captioner.runs import read_run

    decoder = read_run(run_dir).decoder
    if DECODER_FEATURES.get(decoder) != "grid":
        return f"{run_dir} is a {decoder or 'broken'} run: no attention maps"

    def draw(path: Path) -> Path:
        from captioner.attention_plots import attention_examples

        return attention_examples(run_dir, images_dir, path, data_dir)

    return draw


def plot(cfg: Config, out_dir: Path, run_dir: Path | None = None) -> list[Path]:
    """Write every plot whose inputs exist into `out_dir`; log what is skipped and why.

    Test images of a run are looked up in `cfg`'s dataset, so pass the run's --dataset.
    """
    from captioner.captions import load_captions

    captions, images_dir = load_captions(cfg)
    jobs = _dataset_jobs(cfg, captions, images_dir) | _run_jobs(
        run_dir, images_dir, cfg.data.data_dir
    )
    written = []
    for name, job in tqdm(jobs.items(), desc="plots", unit="plot"):
        if isinstance(job, str):
            log(f"skipping {name}: {job}")
        else:
            written.append(job(Path(out_dir) / name))
    return written
