"""Fit the stacking meta-learner on out-of-fold expert scores.

    python -m ensemble.fit DATA_ROOT [--profile NAME | profile=NAME] [key=value ...]

Hold-out blending: every expert scores the validation split, which none of them trained on
(it only chose each expert's best epoch), and the meta-learner is fitted on those scores.
`ensemble.method=auto` compares LightGBM, logistic regression, the plain mean and the rank
mean by the meta-learner's own cross-validated AUC and keeps the best. With
`ensemble.editing_fakes=F`, a fraction F of the validation reals also enters the fit as an
editing fake of itself: fakes of no method the experts were trained on, so that the
meta-learner rewards the experts that catch unseen manipulations. The result goes to
`<out>/ensemble.json` (JSON, no pickle) and the manifest.
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
from data_prep.dataset import Sample, load_splits, read_extra_reals
from data_prep.faces import FaceCropCache
from data_prep.images import ImageDecodeError
from data_prep.manipulations import fake_from_face_crop
from ensemble.combiners import COMBINERS
from ensemble.predictor import ENSEMBLE_FILE, EnsembleDetector, score_samples
from ensemble.stacking import LeakageError, StackingEnsemble, assemble_oof_matrix
from experts.weights import sha256_file, update_manifest

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


def content_id(path) -> str | None:
    """sha256 of a file's bytes; None when it cannot be read (nothing trained or scored on it)."""
    try:
        return sha256_file(path)
    except OSError:
        return None


def check_no_trainset_copies(val: list[Sample], trained: dict[str, str], where) -> list[str | None]:
    """The content ids of the validation samples; LeakageError naming them when some are
    byte-identical copies of training images (`trained`: content id -> where it was trained
    on, e.g. `trainset/x.png`)."""
    ids = [content_id(s.path) for s in val]
    copies = [f"{s.name} = {trained[h]}" for s, h in zip(val, ids) if h in trained]
    if copies:
        raise LeakageError(f"{where}: {len(copies)} valset image(s) are copies of trainset images the "
                           f"experts trained on, e.g. {copies[:3]}; the stacker must not be fitted on "
                           f"their scores. Remove them (python -m data_prep.audit lists every duplicate)")
    return ids


def fit_ensemble(cfg: Config) -> dict:
    if cfg.ensemble.method != "auto" and cfg.ensemble.method not in COMBINERS:  # now, not after the scoring
        raise ConfigError(f"ensemble.method must be auto or one of {sorted(COMBINERS)}, got {cfg.ensemble.method!r}")
    splits = load_splits(cfg.data_root, seed=cfg.seed, methods=cfg.data.methods)
    # The guard: no expert may be stacked on a score of an image it was trained on. Compared
    # by content, not by name: a trainset image copied into valset under a new name is caught,
    # and two different images that share a name are not confused. Checked before scoring.
    # The reals-only experts also trained on data.extra_reals: a validation image copied
    # from there is leakage too.
    extra = [s for folder in cfg.data.extra_reals for s in read_extra_reals(folder)]
    trained = {h: f"trainset/{s.name}" for s in splits["trainset"] if (h := content_id(s.path))}
    trained.update({h: str(s.path) for s in extra if (h := content_id(s.path))})
    val = splits["valset"]
    val_ids = check_no_trainset_copies(val, trained, cfg.data_root)
    detector = EnsembleDetector.from_weights(cfg.out, cfg.experts, cfg.device, tta=cfg.train.tta, use_stacker=False)
    _, features, errors = score_samples(detector, [s.path for s in val], cfg.train.batch_size,
                                        cfg.data.num_workers, progress=sys.stderr.isatty())
    keep = [i for i in range(len(val)) if i not in errors]
    ids = [val_ids[i] for i in keep]
    y = np.array([val[i].target for i in keep])
    columns = detector.feature_names()
    expert_scores = {col: dict(zip(ids, features[keep, j])) for j, col in enumerate(columns)}
    X = assemble_oof_matrix(expert_scores, {col: set(trained) for col in columns}, ids)
    n_editing = 0
    if cfg.ensemble.editing_fakes > 0:
        reals = [val[i] for i in keep if val[i].target == 0]
        rng = np.random.default_rng(cfg.seed)
        chosen = sorted(rng.permutation(len(reals))[: round(cfg.ensemble.editing_fakes * len(reals))])
        extra = editing_fake_features(detector, [reals[i] for i in chosen], cfg)
        X, y, n_editing = np.vstack([X, extra]), np.concatenate([y, np.ones(len(extra), int)]), len(extra)

    counts = np.bincount(y, minlength=2)
    if counts.min() < 2:
        raise DataLayoutError(f"{cfg.data_root}: the stacker is fitted on the scored valset images, which hold "
                              f"{counts[0]} real(s) and {counts[1]} fake(s); it needs at least 2 of each")
    # Every expert score means "higher is faker"; the TTA spreads may point either way.
    monotone = [int(cfg.ensemble.monotone and col in detector.experts) for col in columns]
    stacker = StackingEnsemble(method=cfg.ensemble.method, cv=cfg.ensemble.cv, random_state=cfg.seed,
                               feature_names=columns, monotone=monotone).fit(X, y)
    out = Path(cfg.out)
    path = out / ENSEMBLE_FILE
    write_files_atomically({path: json.dumps(stacker.to_state()).encode()})  # a full disk: one line
    entry = {"file": path.name, "sha256": sha256_file(path), "experts": list(detector.experts),
             "tta": detector.tta, "method": stacker.method_, "feature_names": columns,
             "cv_auc": stacker.cv_auc_,
             "fitted_on": f"valset ({len(y) - n_editing} images, hold-out)"
                          + (f" + {n_editing} editing fakes of its reals" if n_editing else "")}
    update_manifest(out, "ensemble", "stacker", entry)
    log.info("stacker: %s (cross-validated AUC %s) -> %s", stacker.method_,
             {k: round(v, 4) for k, v in stacker.cv_auc_.items()}, path)
    return entry


@entry_point
def main(argv=None) -> int:
    args = CommandLine("python -m ensemble.fit", __doc__, positional="DATA_ROOT", required=False).parse_args(argv)
    cfg = config_from(args, data_root=args.positional)
    if not cfg.data_root:
        raise UsageError("no data root: python -m ensemble.fit DATA_ROOT [key=value ...]")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    fit_ensemble(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
