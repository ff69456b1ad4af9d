"""PNG plots for evaluation reports.

Figures are built with matplotlib's object API (``Figure`` rendered by the
Agg backend) instead of pyplot: no GUI backend is touched, no global figure
state is kept, and nothing leaks memory when many plots are made. Every
function writes one PNG (creating parent folders) and returns its path.
"""

import warnings
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from common.metrics import expected_calibration_error


def _new_figure(width, height):
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)  # attach the Agg (PNG) renderer
    return figure


def _save(figure, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def _panel_grid(figure, n_panels, max_columns=4):
    """List of n_panels axes laid out row by row, at most max_columns wide."""
    n_columns = min(max_columns, n_panels)
    n_rows = int(np.ceil(n_panels / n_columns))
    return [figure.add_subplot(n_rows, n_columns, i + 1) for i in range(n_panels)]


def _grid_size(n_panels, panel_inches, max_columns=4):
    if n_panels == 0:
        raise ValueError("nothing to plot: no panels given")
    n_columns = min(max_columns, n_panels)
    n_rows = int(np.ceil(n_panels / n_columns))
    return panel_inches * n_columns, panel_inches * n_rows


# --------------------------------------------------------------------------
# Score plots
# --------------------------------------------------------------------------

def plot_roc(curves, path):
    """ROC curves, one line per name; curves maps name -> (y, p)."""
    figure = _new_figure(5, 5)
    axes = figure.add_subplot(1, 1, 1)
    for name, (y, p) in curves.items():
        fpr, tpr, _ = roc_curve(y, p)
        axes.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y, p):.3f})")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    axes.set(xlabel="false positive rate (real called fake)",
             ylabel="true positive rate (fake caught)", xlim=(0, 1), ylim=(0, 1.01))
    axes.legend(loc="lower right", fontsize="small")
    return _save(figure, path)


def plot_score_histograms(y, scores, path):
    """One panel per name: histogram of scores for real vs fake samples."""
    y = np.asarray(y)
    figure = _new_figure(*_grid_size(len(scores), 3.5))
    for axes, (name, p) in zip(_panel_grid(figure, len(scores)), scores.items()):
        p = np.asarray(p, dtype=float)
        is_probability = p.min() >= 0 and p.max() <= 1
        bins = np.linspace(0, 1, 31) if is_probability else 30
        axes.hist(p[y == 0], bins=bins, alpha=0.6, color="tab:blue", label="real")
        axes.hist(p[y == 1], bins=bins, alpha=0.6, color="tab:red", label="fake")
        axes.set(title=name, xlabel="score (P(fake))", ylabel="count")
        axes.legend(fontsize="small")
    return _save(figure, path)


def _reliability_points(y, p, n_bins):
    """(mean score, fraction fake) for each non-empty equal-width bin."""
    bin_of = np.minimum((p * n_bins).astype(int), n_bins - 1)
    bins = np.unique(bin_of)
    confidence = [p[bin_of == b].mean() for b in bins]
    fraction_fake = [y[bin_of == b].mean() for b in bins]
    return confidence, fraction_fake


def plot_reliability(y, scores, path, n_bins=10):
    """Reliability diagram: fraction of fakes vs mean P(fake) per bin, one line per name."""
    y = np.asarray(y)
    figure = _new_figure(5, 5)
    axes = figure.add_subplot(1, 1, 1)
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfectly calibrated")
    for name, p in scores.items():
        p = np.asarray(p, dtype=float)
        ece = expected_calibration_error(y, p, n_bins=n_bins)
        confidence, fraction_fake = _reliability_points(y, p, n_bins)
        axes.plot(confidence, fraction_fake, marker="o", label=f"{name} (ECE {ece:.3f})")
    axes.set(xlabel="mean predicted P(fake)", ylabel="fraction fake", xlim=(0, 1), ylim=(0, 1))
    axes.legend(loc="upper left", fontsize="small")
    return _save(figure, path)


# --------------------------------------------------------------------------
# Embeddings and heatmaps
# --------------------------------------------------------------------------

def _tsne_2d(emb):
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    n = len(emb)
    if emb.shape[1] > 50:
        # Standard t-SNE practice: PCA to 50 dims first removes noise and is much faster.
        emb = PCA(n_components=min(50, n), random_state=0).fit_transform(emb)
    # sklearn needs perplexity < n; (n - 1) / 3 keeps ~3 neighbourhoods' worth of points.
    perplexity = min(30.0, (n - 1) / 3.0)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=0).fit_transform(emb)


def plot_embedding_tsne(emb, labels, path, title, colour_by_name="label"):
    """2-D t-SNE of embeddings, points coloured by label (legend titled colour_by_name).

    Returns None and warns instead of plotting when there are fewer than 5
    samples (t-SNE is meaningless there).
    """
    emb = np.asarray(emb, dtype=float).reshape(len(emb), -1)
    labels = np.asarray(labels)
    if len(emb) < 5:
        warnings.warn(f"t-SNE skipped for {title!r}: only {len(emb)} samples (need 5)", stacklevel=2)
        return None
    points = _tsne_2d(emb)
    figure = _new_figure(6, 5)
    axes = figure.add_subplot(1, 1, 1)
    for value in np.unique(labels):
        chosen = labels == value
        axes.scatter(points[chosen, 0], points[chosen, 1], s=12, alpha=0.8, label=str(value))
    axes.set(title=title, xticks=[], yticks=[])
    axes.legend(title=colour_by_name, fontsize="small", markerscale=1.5)
    return _save(figure, path)


def plot_heatmaps(images, heatmaps, titles, path):
    """Grid of images with their heatmaps (e.g. Grad-CAM, values in [0, 1]) overlaid.

    A heatmap of a different size than its image is stretched over it.
    """
    if not len(images) == len(heatmaps) == len(titles):
        raise ValueError(f"got {len(images)} images, {len(heatmaps)} heatmaps, {len(titles)} titles")
    figure = _new_figure(*_grid_size(len(images), 3.0))
    panels = _panel_grid(figure, len(images))
    for axes, image, heatmap, title in zip(panels, images, heatmaps, titles):
        height, width = np.asarray(image).shape[:2]
        axes.imshow(image)
        axes.imshow(heatmap, cmap="jet", alpha=0.4, vmin=0.0, vmax=1.0,
                    extent=(0, width, height, 0), interpolation="bilinear")
        axes.set(title=title, xticks=[], yticks=[])
    return _save(figure, path)
