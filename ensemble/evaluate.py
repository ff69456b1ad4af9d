"""Evaluate the trained detector on a labelled split (and optionally a labelled video folder).

    python -m ensemble.evaluate DATA_ROOT [--split valset|testset] [--weights DIR] [--reports DIR]
                               [--videos VIDEO_DIR] [--frames 16] [--max-side 1920] [--detect-side 320]
                               [--precision fp32|bf16|auto] [--gradcam N] [--no-plots]
                               [profile=cpu] [key=value ...]
    python -m ensemble.evaluate [DATA_ROOT] --test LABELLED_DIR [...]     # any labelled folder
    python -m ensemble.evaluate LABELLED_DIR [...]                        # the same, thresholds 0.5

Scores every image of the split with every expert of the full ensemble (the stacker's experts
when the manifest has one), then reports, for each expert, for the ensemble (the fitted
stacker, or the plain mean without one) and for two baselines (plain mean and rank mean of
the expert scores): AUC, AP, EER, accuracy, TPR at 1 % / 5 % FPR, ECE and Brier score.

Decision threshold: chosen per model on the validation split (Youden's J, see
`common.metrics.choose_threshold`) and applied unchanged to the evaluated split, so test
accuracy is honest. With `--split valset` threshold and stacker were both fitted on the
evaluated images: those numbers are optimistic (metrics.json says so).

The rank-mean baseline ranks every expert score among that expert's validation scores, so a
single image gets the same score whatever else is evaluated with it.

Outputs in `--reports` (default cfg.reports; the files are written by `ensemble.reports`, the
figures drawn by `ensemble.visuals`):
  metrics.json   split, image counts, unreadable files, per-model metrics, stacker method,
                 thresholds, and (with --videos) frame- and video-level metrics
  metrics.md     the same as markdown tables (also printed)
  scores.csv     per-image label and scores of every model
  roc.png, score_hist.png, reliability.png, tsne.png, gradcam.png (unless --no-plots); a plot
                 that fails is logged in one line and listed under "plot_errors"; metrics stay.

`--videos DIR` needs DIR/labels.csv (`video_name,target`): `--frames` frames are sampled per
video (decoded resolution capped to `--max-side`), one face is tracked through them (faces
detected on copies of at most `--detect-side` pixels) and scored; frame-level metrics label
each frame with its video's label; video-level metrics aggregate the frame scores with every
frame rule (mean, median, confidence, max, top-k) and, when the weights folder holds a
temporal head (`python -m ensemble.temporal`), with the rule `temporal`: the head's score of
the tracked sequence, cut at 0.5 (a head made stale by a retrained frame expert is skipped
with a warning); a per-video table is printed (ensemble.video_eval).

`--precision bf16` runs the experts' forward passes under bf16 autocast, `auto` where the
device has native bf16 (ensemble.predictor); metrics.json records the precision used.

`--test DIR` evaluates any labelled folder (another data set's testset, say): `X/` with
`X_label.txt` beside it, a data root (its testset/), or `real/` + `fake/`. Thresholds still
come from DATA_ROOT's valset when one is given, else 0.5. Where `X_methods.csv`
(`img_name,method`) lies beside a split, the AUC of every manipulation method against all
the reals is reported too.

Exit status: 0 = done; 2 = usage error, unreadable data layout, testset without labels, or
no usable weights.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import torch

from common.cli import CommandLine, entry_point
from common.errors import UsageError, UserError
from common.metrics import choose_threshold, evaluate_scores, rank_against, roc_auc
from configs import Config, config_from
from data_prep.dataset import Sample, list_images, load_splits, read_labelled_split, read_methods_file
from data_prep.faces import DETECT_SIDE
from data_prep.labels import label_path
from data_prep.video import MAX_SIDE
from ensemble.predictor import DEFAULT_PRECISION, PRECISIONS
from ensemble.reports import markdown_report, write_metrics, write_scores_csv
from experts.weights import WeightsError, read_manifest

log = logging.getLogger("ensemble.evaluate")

SPLIT_CHOICES = ("valset", "testset")
ENSEMBLE = "ensemble"
BASELINES = ("mean", "rank_mean")


class EvaluationError(UserError):
    """Evaluation cannot run; the message says why in one line."""


# ----------------------------------------------------------------------------- data

def labelled_samples(cfg: Config, split: str) -> tuple[list[Sample], list[Sample], dict[str, str] | None]:
    """(samples of `split` with labels, validation samples, the testset's img_name -> method
    or None). Raises EvaluationError when the testset has no labels."""
    if split not in SPLIT_CHOICES:
        raise EvaluationError(f"--split must be one of {SPLIT_CHOICES}, got {split!r}")
    root = Path(cfg.data_root)
    splits = load_splits(root, seed=cfg.seed, methods=cfg.data.methods)
    val = splits["valset"]
    if split == "valset":
        return val, val, None
    if not (root / "testset").is_dir():
        raise EvaluationError(f"{root / 'testset'}: no testset folder to evaluate (try --split valset)")
    if not label_path(root, "testset").is_file():
        raise EvaluationError(f"{label_path(root, 'testset')}: the testset has no labels, so it cannot be "
                              f"evaluated (try --split valset)")
    test, methods = labelled_folder(root / "testset")
    return test, val, methods


def labelled_folder(path) -> tuple[list[Sample], dict[str, str] | None]:
    """(labelled samples, img_name -> method or None) of any labelled image folder:
    a split folder `X/` with `X_label.txt` beside it (and optionally `X_methods.csv`), a data
    root (its testset/), or a folder with `real/` and `fake/`."""
    path = Path(path)
    if not path.is_dir():
        raise EvaluationError(f"{path}: not a directory")
    if (path / "testset").is_dir():
        path = path / "testset"
    root, split = path.parent, path.name
    if label_path(root, split).is_file():
        samples = read_labelled_split(root, split)  # the same checks as for trainset and valset
        methods = read_methods_file(root, split) if (root / f"{split}_methods.csv").is_file() else None
    elif (path / "real").is_dir() and (path / "fake").is_dir():
        samples = [Sample(p, 0) for p in list_images(path / "real")] + \
                  [Sample(p, 1) for p in list_images(path / "fake")]
        methods = None
    else:
        raise EvaluationError(f"{path}: no labels: expected {label_path(root, split)} "
                              f"or the subfolders real/ and fake/")
    if not samples:
        raise EvaluationError(f"{path}: no images to evaluate")
    return samples, methods


def per_method_auc(names: list[str], y: np.ndarray, scores: dict[str, np.ndarray],
                   methods: dict[str, str]) -> dict[str, dict[str, float]]:
    """model -> {method: AUC of that method's fakes against all the reals}."""
    method_of = np.array([methods.get(n, "?") for n in names])
    table = {}
    for model, p in scores.items():
        row = {}
        for method in sorted(set(method_of[y == 1])):
            pick = (y == 0) | (method_of == method)
            if len(set(y[pick])) == 2:
                row[method] = float(roc_auc(y[pick], p[pick]))
        table[model] = row
    return table


# ----------------------------------------------------------------------------- scores

def model_scores(detector, features: np.ndarray, reference: np.ndarray) -> dict[str, np.ndarray]:
    """name -> P(fake) for every expert, the ensemble and the baselines, from the feature
    matrix (rows = samples). `reference`: validation features (for the rank mean)."""
    n_experts = len(detector.experts)
    experts = features[:, :n_experts]
    scores = {name: experts[:, j] for j, name in enumerate(detector.experts)}
    scores[ENSEMBLE] = np.asarray(detector.combine(features), dtype=float) if len(features) else np.zeros(0)
    scores["mean"] = experts.mean(axis=1)
    scores["rank_mean"] = np.mean([rank_against(reference[:, j], experts[:, j]) for j in range(n_experts)],
                                  axis=0) if len(features) else np.zeros(0)
    return scores


def score_split(detector, samples: list[Sample], cfg: Config, what: str):
    """(kept indices, labels of kept, features of kept, [{file, error}]) for one split."""
    from ensemble.predictor import score_samples

    _, features, errors = score_samples(detector, [s.path for s in samples], cfg.train.batch_size,
                                        cfg.data.num_workers, progress=sys.stderr.isatty())
    keep = np.array([i for i in range(len(samples)) if i not in errors], dtype=int)
    unreadable = [{"file": samples[i].name, "error": str(errors[i]).splitlines()[0]} for i in sorted(errors)]
    if unreadable:
        log.warning("%s: %d of %d images could not be read and are excluded from the metrics",
                    what, len(unreadable), len(samples))
    if len(keep) == 0:
        raise EvaluationError(f"{what}: none of the {len(samples)} images could be read")
    y = np.array([samples[i].target for i in keep], dtype=int)
    return keep, y, features[keep], unreadable


def thresholds_from(y_val: np.ndarray, val_scores: dict[str, np.ndarray]) -> dict[str, float]:
    thresholds = {}
    for name, p in val_scores.items():
        try:
            thresholds[name] = choose_threshold(y_val, p)
        except ValueError as err:  # e.g. unreadable files left one class only
            log.warning("%s: no validation threshold (%s); using 0.5", name, err)
            thresholds[name] = 0.5
    return thresholds


def metrics_table(y: np.ndarray, scores: dict[str, np.ndarray], thresholds: dict[str, float]) -> dict:
    return {name: evaluate_scores(y, p, thresholds[name]) for name, p in scores.items()}


def temporal_video_scores(weights: Path, detector) -> dict:
    """{"temporal": scorer of a video's tracked crops, "temporal_stack": the video stacker
    over it and the ensemble's frame scores} when `weights` holds a usable temporal head (and
    video stacker), else what is usable: no head gives {}; one that cannot be used here
    (stale after its frame expert was retrained, or cropping faces unlike the ensemble's
    experts), or a stale video stacker, gives one warning line."""
    from ensemble.temporal_model import load_temporal

    try:
        temporal = load_temporal(weights, detector.device, detector.precision)
    except WeightsError as err:
        log.warning("video rule temporal skipped: %s", " ".join(str(err).split()))
        return {}
    if temporal is None:
        return {}
    if temporal.face != detector.face:  # the scorer sees the ensemble's crops only
        log.warning("video rule temporal skipped: its frame expert %r was trained on face crops made "
                    "with other settings than the ensemble's experts", temporal.expert_name)
        return {}
    scorers = {"temporal": lambda tracked, _frame_scores: temporal.score(tracked.crops)}
    if temporal.video_stacker is None:
        return scorers
    try:
        temporal.check_frame_ensemble(detector, read_manifest(weights))
    except WeightsError as err:
        log.warning("video rule temporal_stack skipped: %s", " ".join(str(err).split()))
        return scorers
    scorers["temporal_stack"] = lambda tracked, frame_scores: temporal.score_stacked(tracked.crops, frame_scores)
    return scorers


# ----------------------------------------------------------------------------- entry points

def evaluate(cfg: Config, split: str = "testset", weights=None, reports=None, videos=None,
             gradcam: int = 4, plots: bool = True, frames: int = 16, test=None,
             max_side: int | None = MAX_SIDE, detect_side: int = DETECT_SIDE, extra_video_scores=None,
             precision: str = DEFAULT_PRECISION) -> dict:
    """Evaluate the detector in `weights` (default cfg.out) on `split` of cfg.data_root, or on
    the labelled folder `test` (see `labelled_folder`); write metrics.json, metrics.md,
    scores.csv and the plots to `reports` (default cfg.reports); return what metrics.json
    holds. Thresholds come from cfg.data_root's valset; with `test` and no data root, 0.5.
    `videos`, `frames`, `max_side`, `detect_side`, `extra_video_scores` (name -> scorer of a
    video's tracked face crops, besides the temporal head of `weights` when it has one): see
    `ensemble.video_eval.evaluate_videos`. `precision`: see ensemble.predictor."""
    from ensemble.predictor import EnsembleDetector

    if not cfg.data_root and test is None:
        raise EvaluationError("no data root: python -m ensemble.evaluate DATA_ROOT [options] "
                              "(or --test LABELLED_DIR)")
    if videos is not None and not Path(videos).is_dir():
        raise EvaluationError(f"{videos}: --videos is not a directory")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    weights = Path(weights or cfg.out)
    reports = Path(reports or cfg.reports)
    if test is not None:
        samples, methods = labelled_folder(test)
        split = str(test)
        val_samples = labelled_samples(cfg, "valset")[1] if cfg.data_root else []
    else:
        samples, val_samples, methods = labelled_samples(cfg, split)

    detector = EnsembleDetector.from_weights(weights, device=cfg.device, precision=precision)
    keep, y, features, unreadable = score_split(detector, samples, cfg, split)
    if split == "valset":
        y_val, val_features, val_unreadable = y, features, unreadable
    elif val_samples:
        _, y_val, val_features, val_unreadable = score_split(detector, val_samples, cfg, "valset")
    else:  # a foreign test folder and no data root: no validation split to set thresholds
        y_val, val_features, val_unreadable = None, features, []

    val_scores = model_scores(detector, val_features, val_features)
    scores = model_scores(detector, features, val_features)
    thresholds = thresholds_from(y_val, val_scores) if y_val is not None else dict.fromkeys(scores, 0.5)
    models = metrics_table(y, scores, thresholds)

    stacker = detector.stacker
    method = stacker.method_ if stacker is not None else "mean (no stacker fitted)"
    note = ""
    if split == "valset":
        note = ("thresholds" + (" and the stacker were" if stacker is not None else " were") +
                " fitted on this same split: these numbers are optimistic")
    result = {
        "split": split, "data_root": str(cfg.data_root), "weights": str(weights),
        "n_images": len(samples), "n_scored": int(len(keep)), "n_fake": int(y.sum()),
        "unreadable": unreadable, "threshold_split": "valset" if y_val is not None else "none (0.5)",
        "n_valset_scored": int(len(y_val)) if y_val is not None else 0,
        "unreadable_valset": val_unreadable if split != "valset" else [],
        "experts": list(detector.experts), "baselines": list(BASELINES), "ensemble_name": ENSEMBLE,
        "tta": list(detector.tta), "precision": detector.precision,
        "stacker": {"method": method, "cv_auc": dict(getattr(stacker, "cv_auc_", {}) or {})},
        "thresholds": thresholds, "note": note, "models": models,
    }
    names = [samples[i].name for i in keep]
    if methods:
        result["per_method_auc"] = per_method_auc(names, y, scores, methods)
    if len(detector.experts) > 1 and len(keep) > 2:
        # How differently the experts see the faces: an ensemble gains only from disagreement.
        corr = np.corrcoef(np.stack([scores[n] for n in detector.experts]))
        result["expert_correlation"] = {a: {b: float(corr[i, j]) for j, b in enumerate(detector.experts)}
                                        for i, a in enumerate(detector.experts)}
    if videos is not None:
        from ensemble.video_eval import evaluate_videos
        video_scorers = {**temporal_video_scores(weights, detector), **(extra_video_scores or {})}
        result["video"] = evaluate_videos(detector, videos, lambda f: model_scores(detector, f, val_features),
                                          thresholds, frames, ENSEMBLE, max_side, detect_side, video_scorers)

    write_scores_csv(reports / "scores.csv", names, y, scores)
    write_metrics(reports, result)
    if plots:  # after the metrics are safely on disk
        from ensemble.visuals import make_plots

        curves = {name: scores[name] for name in [*detector.experts, ENSEMBLE]}
        result["plots"], result["plot_errors"] = make_plots(
            detector, reports, [samples[i].path for i in keep], y, curves, scores[ENSEMBLE], gradcam,
            cfg.seed, cfg.train.batch_size)
        write_metrics(reports, result)
    return result


def parse_args(argv: list[str] | None):
    parser = CommandLine("python -m ensemble.evaluate", __doc__, positional="DATA_ROOT", required=False)
    parser.add_argument("--split", default="testset", choices=SPLIT_CHOICES)
    parser.add_argument("--test", metavar="DIR", help="evaluate any labelled folder instead of a split: "
                        "X/ with X_label.txt beside it, a data root, or real/ + fake/")
    parser.add_argument("--weights", help="trained weights folder (default: cfg.out)")
    parser.add_argument("--reports", help="output folder (default: cfg.reports)")
    parser.add_argument("--videos", help="labelled video folder (labels.csv: video_name,target)")
    parser.add_argument("--frames", type=int, default=16, help="frames sampled per video")
    parser.add_argument("--max-side", type=int, default=MAX_SIDE,
                        help="video frames larger than this (longer side) are downscaled to it; 0 = native")
    parser.add_argument("--detect-side", type=int, default=DETECT_SIDE,
                        help="faces in video frames are detected on a copy of at most this side")
    parser.add_argument("--precision", default=DEFAULT_PRECISION, choices=PRECISIONS,
                        help="of the experts' forward passes: bf16 autocast, or auto = bf16 where the device "
                             "has native bf16 (default %(default)s)")
    parser.add_argument("--gradcam", type=int, default=4, metavar="N",
                        help="Grad-CAM for N real and N fake images (0 = none)")
    parser.add_argument("--no-plots", action="store_true", help="metrics only")
    return parser.parse_args(argv)


@entry_point
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.frames < 1 or args.gradcam < 0 or args.max_side < 0 or args.detect_side < 32:
        raise UsageError("--frames must be >= 1, --gradcam >= 0, --max-side >= 0 and --detect-side >= 32")
    data_root = args.positional
    if data_root and args.test is None and not any(
            (Path(data_root) / sub).is_dir() for sub in ("trainset", "testset", "real")):
        # not a data root but a labelled folder (X/ with X_label.txt beside it): test it
        args.test, data_root = data_root, None
    cfg = config_from(args, data_root=data_root)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    result = evaluate(cfg, args.split, args.weights, args.reports, args.videos,
                      args.gradcam, not args.no_plots, args.frames, args.test, args.max_side, args.detect_side,
                      precision=args.precision)
    print(markdown_report(result), end="")
    if "video" in result:
        from ensemble.video_eval import per_video_table
        print("\n## Videos: per video (the ensemble's score under each rule)\n\n" + per_video_table(result["video"]),
              end="")
    reports = Path(args.reports or cfg.reports)
    print(f"wrote {reports / 'metrics.json'}, {reports / 'metrics.md'}"
          + (f" and {len(result.get('plots', {}))} plot(s)" if "plots" in result else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
