"""Fit the stacking meta-learner on expert scores of images the experts did not train on.

    python -m ensemble.fit DATA_ROOT [--reuse-fold-experts] [--profile NAME | profile=NAME] [key=value ...]

Hold-out blending (`ensemble.oof_folds=0`, the default): every expert scores the validation
split, which none of them trained on (it only chose each expert's best epoch), and the
meta-learner is fitted on those scores. k-fold stacking (`ensemble.oof_folds=K`, see
`ensemble.oof`): every expert is first trained K more times, each time without one fold of
trainset+valset, and the meta-learner is fitted on each image's score by the experts that
never saw it (K + 1 trainings in all; `--reuse-fold-experts` refits on the fold experts
already trained). Either way it then combines the experts of `out` (trained on all the data).

`ensemble.method=auto` compares LightGBM, logistic regression, the plain mean and the rank
mean by the meta-learner's own cross-validated AUC and keeps the best. With
`ensemble.editing_fakes=F`, a fraction F of the scored reals also enters the fit as an
editing fake of itself: fakes of no method the experts were trained on, so that the
meta-learner rewards the experts that catch unseen manipulations; with them, a valset of
reals only will do (protocol c: no fake of the data set anywhere). Its inputs are the
experts' scores (and, with `train.tta`, their spreads between the views). With
`ensemble.calibrate` (the default) the stacker's output is then Platt-scaled on the scored
images alone, so that editing fakes, which double the fakes of a hold-out fit, do not
inflate every P(fake) (where the scored images are all reals, on the editing fakes too).
The result goes to `<out>/ensemble.json` (JSON, no pickle) and the manifest.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np

from common.cli import CommandLine, entry_point
from common.errors import ConfigError, DataLayoutError, UsageError
from common.files import write_files_atomically
from common.runtime import sample_seed
from configs import Config, config_from
from data_prep.dataset import Sample, load_splits
from data_prep.faces import FaceCropCache
from data_prep.images import ImageDecodeError
from data_prep.manipulations import fake_from_face_crop
from ensemble.combiners import COMBINERS
from ensemble.oof import StackingRows, check_oof_config, content_id, out_of_fold_rows, train_fold_experts
from ensemble.predictor import ENSEMBLE_FILE, EnsembleDetector, score_samples
from ensemble.stacking import LeakageError, StackingEnsemble, assemble_oof_matrix
from experts.weights import WeightsError, read_manifest, sha256_file, update_manifest

log = logging.getLogger("ensemble.fit")


def editing_fake_features(detector: EnsembleDetector, reals: list[Sample], cfg: Config) -> np.ndarray:
    """Expert features of one seeded editing fake per real (as training makes them, from the
    same cached face crops): fakes of no method of the data set, so that the meta-learner
    does not learn to trust only the expert that knows the data set's own methods."""
    crops = FaceCropCache(detector.face, cfg.data.cache_dir)
    rows = []
    for start in range(0, len(reals), cfg.train.batch_size):
        fakes = []
        for index in range(start, min(start + cfg.train.batch_size, len(reals))):
            rng = np.random.default_rng(sample_seed(cfg.seed, 1 << 22, index))
            try:
                crop = crops.load(reals[index].path)
                donor = crops.load(reals[int(rng.integers(len(reals)))].path)
            except ImageDecodeError:
                continue  # already reported when the real itself was scored
            points = crops.landmarks(reals[index].path) if cfg.data.fake_masks == "landmarks" else None
            fakes.append(fake_from_face_crop(crop, rng, donor, detector.face.margin,
                                             cfg.data.online_fake_ops or None, points)[0])
        if fakes:
            rows.append(detector.expert_features(detector.batch_of_crops(fakes)))
    return np.concatenate(rows) if rows else np.zeros((0, len(detector.feature_names())))


REMOVE_COPIES = "Remove them (python -m data_prep.audit lists every duplicate)"


def check_no_trainset_copies(samples: list[Sample], trained: dict[str, str], where, rows: str = "valset",
                             remedy: str = REMOVE_COPIES) -> list[str | None]:
    """The content ids of the samples; LeakageError naming them when some are byte-identical
    copies of images the experts scoring them trained on (`trained`: content id -> where it
    was trained on, e.g. `trainset/x.png`)."""
    ids = [content_id(s.path) for s in samples]
    copies = [f"{s.name} = {trained[h]}" for s, h in zip(samples, ids) if h in trained]
    if copies:
        raise LeakageError(f"{where}: {len(copies)} {rows} image(s) are copies of images the experts scoring "
                           f"them trained on, e.g. {copies[:3]}; the stacker must not be fitted on their "
                           f"scores. {remedy}")
    return ids


def holdout_rows(cfg: Config, splits: dict) -> StackingRows:
    """The valset, scored by the experts of `out`, which trained on trainset."""
    trained = {h: f"trainset/{s.name}" for s in splits["trainset"] if (h := content_id(s.path))}
    return StackingRows("valset", Path(cfg.out), list(cfg.experts), splits["valset"], trained,
                        str(cfg.data_root), REMOVE_COPIES)


def stacking_matrix(cfg: Config, row_sets: list[StackingRows], final: EnsembleDetector
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, y, which rows are editing fakes): the experts' features of every readable image
    of every row set, then of the editing fakes of some of its reals.
    `final`: the experts of `out` the stacker will combine (its columns; it scores the
    hold-out rows itself rather than being loaded twice).
    Checked twice that no row is scored by an expert that trained on it: by content before
    the scoring, and by `assemble_oof_matrix` on the scores themselves."""
    columns = final.feature_names()
    # The guard: no expert may be stacked on a score of an image it was trained on. Compared
    # by content, not by name: a training image copied under a new name is caught, and two
    # different images that share a name are not confused. Every set before any scoring.
    row_ids = [check_no_trainset_copies(rows.samples, rows.trained, rows.where, rows.name, rows.remedy)
               for rows in row_sets]
    blocks, targets, editing = [], [], []
    rng = np.random.default_rng(cfg.seed)
    for rows, ids in zip(row_sets, row_ids):
        if rows.weights == Path(cfg.out) and rows.experts == list(final.experts):
            detector = final
        else:
            detector = EnsembleDetector.from_weights(rows.weights, rows.experts, cfg.device, tta=cfg.train.tta,
                                                     use_stacker=False)
        _, features, errors = score_samples(detector, [s.path for s in rows.samples], cfg.train.batch_size,
                                            cfg.data.num_workers, progress=sys.stderr.isatty())
        keep = [i for i in range(len(rows.samples)) if i not in errors]
        own = detector.feature_names()  # the columns under these experts' names (<name>_fold<j>...)
        if len(own) != len(columns):
            raise ConfigError(f"{rows.weights}: its experts give the features {own}, the experts of "
                              f"{cfg.out} {columns}: were they trained with other settings?")
        scores = {col: dict(zip([ids[i] for i in keep], features[keep, j])) for j, col in enumerate(own)}
        blocks.append(assemble_oof_matrix(scores, {col: set(rows.trained) for col in own}, [ids[i] for i in keep]))
        targets.append(np.array([rows.samples[i].target for i in keep], dtype=int))
        editing.append(np.zeros(len(keep), dtype=bool))
        if cfg.ensemble.editing_fakes > 0:
            reals = [rows.samples[i] for i in keep if rows.samples[i].target == 0]
            chosen = sorted(rng.permutation(len(reals))[: round(cfg.ensemble.editing_fakes * len(reals))])
            fakes = editing_fake_features(detector, [reals[i] for i in chosen], cfg)
            blocks.append(fakes)
            targets.append(np.ones(len(fakes), dtype=int))
            editing.append(np.ones(len(fakes), dtype=bool))
    return np.vstack(blocks), np.concatenate(targets), np.concatenate(editing)


def read_splits(cfg: Config) -> dict:
    """The data root's splits as the stacker reads them: with editing fakes to fit on, a
    valset of reals only will do."""
    return load_splits(cfg.data_root, seed=cfg.seed, methods=cfg.data.methods,
                       allow_real_only=cfg.ensemble.editing_fakes > 0)


def fit_ensemble(cfg: Config, splits: dict | None = None) -> dict:
    """Fit the stacker (k-fold: on the fold experts already trained) and record it in `out`;
    `splits`: the data root's, when the caller has already read them."""
    if cfg.ensemble.method != "auto" and cfg.ensemble.method not in COMBINERS:  # now, not after the scoring
        raise ConfigError(f"ensemble.method must be auto or one of {sorted(COMBINERS)}, got {cfg.ensemble.method!r}")
    k = check_oof_config(cfg)
    if splits is None:
        splits = read_splits(cfg)
    # The experts the stacker combines at test time: the ones trained on all the data.
    detector = EnsembleDetector.from_weights(cfg.out, cfg.experts, cfg.device, tta=cfg.train.tta, use_stacker=False)
    columns = detector.feature_names()
    if k:
        pool = splits["trainset"] + splits["valset"]
        row_sets = out_of_fold_rows(cfg, pool, {s.name: content_id(s.path) for s in pool})
    else:
        row_sets = [holdout_rows(cfg, splits)]
    X, y, editing = stacking_matrix(cfg, row_sets, detector)
    n_editing = int(editing.sum())

    counts = np.bincount(y, minlength=2)
    if counts.min() < 2:
        scored = " + ".join(rows.name for rows in row_sets)
        raise DataLayoutError(f"{cfg.data_root}: the stacker is fitted on the scored {scored} images, which hold "
                              f"{counts[0]} real(s) and {counts[1]} fake(s); it needs at least 2 of each")
    # Every expert score means "higher is faker"; the TTA spreads may point either way.
    monotone = [int(cfg.ensemble.monotone and col in detector.experts) for col in columns]
    # Calibrated on the scored images alone; where they are all reals (a data set of reals
    # whose only fakes are editing fakes), on the editing fakes too: one class has no curve.
    both_classes = len(np.unique(y[~editing])) == 2
    calibrated_on = ("the scored images, not the editing fakes" if both_classes
                     else "the scored images (all real) and the editing fakes")
    stacker = StackingEnsemble(method=cfg.ensemble.method, cv=cfg.ensemble.cv, random_state=cfg.seed,
                               feature_names=columns, monotone=monotone,
                               n_scores=len(detector.experts), calibrate=cfg.ensemble.calibrate
                               ).fit(X, y, calibration_rows=~editing if both_classes else None)
    out = Path(cfg.out)
    path = out / ENSEMBLE_FILE
    write_files_atomically({path: json.dumps(stacker.to_state()).encode()})  # a full disk: one line
    n_scored = len(y) - n_editing
    fitted_on = (f"out-of-fold scores of trainset+valset ({n_scored} images, {k} folds)" if k
                 else f"valset ({n_scored} images, hold-out)")
    entry = {"file": path.name, "sha256": sha256_file(path), "experts": list(detector.experts),
             "tta": detector.tta, "method": stacker.method_,
             "feature_names": columns, "cv_auc": stacker.cv_auc_,
             "calibration": {"slope": stacker.calibration_[0], "intercept": stacker.calibration_[1],
                             "fitted_on": calibrated_on}
             if cfg.ensemble.calibrate else None,
             "fitted_on": fitted_on + (f" + {n_editing} editing fakes of its reals" if n_editing else "")}
    update_manifest(out, "ensemble", "stacker", entry)
    log.info("stacker: %s (cross-validated AUC %s) -> %s", stacker.method_,
             {name: round(auc, 4) for name, auc in stacker.cv_auc_.items()}, path)
    return entry


@entry_point
def main(argv=None) -> int:
    parser = CommandLine("python -m ensemble.fit", __doc__, positional="DATA_ROOT", required=False)
    parser.add_argument("--reuse-fold-experts", action="store_true",
                        help="k-fold stacking: fit on the fold experts already in <run_dir>/oof, train none")
    args = parser.parse_args(argv)
    cfg = config_from(args, data_root=args.positional)
    if not cfg.data_root:
        raise UsageError("no data root: python -m ensemble.fit DATA_ROOT [key=value ...]")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    splits = None  # read here only when the fold trainings need them first
    if check_oof_config(cfg) and not args.reuse_fold_experts:
        splits = read_splits(cfg)
        # The experts the stacker will combine must be there before K trainings, not after.
        missing = [n for n in cfg.experts if n not in read_manifest(cfg.out).get("experts", {})]
        if missing:
            raise WeightsError(f"{cfg.out}: no expert(s) {missing} trained on all the data "
                               f"(python -m experts.train) for the stacker to combine")
        train_fold_experts(cfg, splits["trainset"] + splits["valset"])
    fit_ensemble(cfg, splits)
    return 0


if __name__ == "__main__":
    sys.exit(main())
