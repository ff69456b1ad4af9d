"""The figures of `ensemble.evaluate`: ROC, score histograms, reliability, t-SNE and Grad-CAM.

    made, failed = make_plots(detector, reports, paths, y, curves, ensemble_p, n_gradcam=4, seed=0, batch_size=32)

t-SNE shows the embeddings of the first expert that has them; Grad-CAM explains the first
expert with a `gradcam_layer`, on the same face crops the detector scores.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError
from common.inputs import to_unit_float
from ensemble.predictor import crop_to_inputs, input_key

log = logging.getLogger("ensemble.evaluate")

TSNE_MAX_IMAGES = 1000
PLOT_FILES = {"roc": "roc.png", "score_hist": "score_hist.png", "reliability": "reliability.png",
              "tsne": "tsne.png", "gradcam": "gradcam.png"}


class PlotError(UserError):
    """A plot that cannot be made from what was evaluated; the message says why."""


def _first_expert(detector, has):
    for name, model in detector.experts.items():
        if has(model):
            return name, model
    return None, None


def _implements_embed(model) -> bool:
    from experts.base import Expert
    return type(model).embed is not Expert.embed


def _load_crops(detector, paths: list[Path], model):
    """[(display crop HxWx3 uint8, uint8 tensor (3, size, size))]: the face crop, and what
    `model` reads of it (its region at its size), cropped as the detector crops."""
    from data_prep.images import decode_image

    key = input_key(model)
    crops = [detector.face_crop(decode_image(path)) for path in paths]
    return [(crop, crop_to_inputs(crop, [key])[key]) for crop in crops]


@torch.no_grad()
def plot_tsne(detector, paths: list[Path], y: np.ndarray, path: Path, seed: int, batch_size: int):
    from common.plots import plot_embedding_tsne

    name, model = _first_expert(detector, _implements_embed)
    if model is None:
        raise PlotError("no expert implements embed()")
    chosen = np.arange(len(paths))
    if len(chosen) > TSNE_MAX_IMAGES:
        chosen = np.sort(np.random.default_rng(seed).choice(len(paths), TSNE_MAX_IMAGES, replace=False))
    embeddings = []
    for start in range(0, len(chosen), batch_size):
        crops = _load_crops(detector, [paths[i] for i in chosen[start:start + batch_size]], model)
        x = to_unit_float(torch.stack([t for _, t in crops]), detector.device)
        embeddings.append(model.embed(x).float().flatten(1).cpu().numpy())
    labels = np.where(y[chosen] == 1, "1 fake", "0 real")  # sorted: real first, as in the other plots
    result = plot_embedding_tsne(np.concatenate(embeddings), labels, path,
                                 title=f"t-SNE of {name} embeddings ({len(chosen)} images)")
    if result is None:
        raise PlotError(f"too few images for t-SNE ({len(chosen)})")
    return result


def plot_gradcam(detector, paths: list[Path], y: np.ndarray, p: np.ndarray, path: Path, n: int, seed: int):
    from common.plots import plot_heatmaps
    from ensemble.gradcam import grad_cam

    name, model = _first_expert(detector, lambda m: m.gradcam_layer() is not None)
    if model is None:
        raise PlotError("no expert has a gradcam_layer()")
    rng = np.random.default_rng(seed)
    chosen = []
    for target in (0, 1):
        pool = np.flatnonzero(y == target)
        chosen += sorted(rng.choice(pool, min(n, len(pool)), replace=False).tolist())
    if not chosen:
        raise PlotError("no images for Grad-CAM")
    crops = _load_crops(detector, [paths[i] for i in chosen], model)
    x = to_unit_float(torch.stack([t for _, t in crops]), detector.device)
    prefix = getattr(model, "num_prefix_tokens", None)
    if prefix is None:
        prefix = getattr(getattr(model, "backbone", None), "num_prefix_tokens", 0)
    heatmaps = grad_cam(model, model.gradcam_layer(), x, class_index=1, num_prefix_tokens=int(prefix))
    titles = [f"{name}: {'fake' if y[i] else 'real'}, ensemble p={p[i]:.2f}" for i in chosen]
    figure_path = plot_heatmaps([c for c, _ in crops], list(heatmaps), titles, path)
    log.info("Grad-CAM of expert %s (%s)", name, type(model.gradcam_layer()).__name__)
    return figure_path


def make_plots(detector, reports: Path, paths, y, curves: dict[str, np.ndarray], ensemble_p: np.ndarray,
               n_gradcam: int, seed: int, batch_size: int) -> tuple[dict, dict]:
    """The plots of `curves` (model -> P(fake) of each image), t-SNE of the first expert that
    embeds, and Grad-CAM of `n_gradcam` real and fake images (titled with `ensemble_p`).
    Returns ({plot: file name} made, {plot: one-line error} failed): a plot that fails is
    logged and listed, never worth the metrics."""
    from common import plots

    jobs = {
        "roc": lambda f: plots.plot_roc({k: (y, v) for k, v in curves.items()}, f),
        "score_hist": lambda f: plots.plot_score_histograms(y, curves, f),
        "reliability": lambda f: plots.plot_reliability(y, {k: np.clip(v, 0, 1) for k, v in curves.items()}, f),
        "tsne": lambda f: plot_tsne(detector, paths, y, f, seed, batch_size),
    }
    if n_gradcam > 0:
        jobs["gradcam"] = lambda f: plot_gradcam(detector, paths, y, ensemble_p, f, n_gradcam, seed)
    made, failed = {}, {}
    for key, job in jobs.items():
        target = reports / PLOT_FILES[key]
        try:
            job(target)
            made[key] = target.name
        except Exception as err:  # a plot is never worth the metrics
            message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            log.warning("plot %s failed: %s", target.name, message)
            failed[key] = message
    return made, failed
