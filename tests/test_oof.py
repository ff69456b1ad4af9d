"""k-fold stacking (ensemble.oof): fold experts trained through the one trainer, every image of
trainset+valset scored once by experts that never trained on it, and a fit that refuses
otherwise; the folds themselves."""
import copy
import csv
import json
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from configs import ConfigError, load_config
from data_prep.dataset import Sample, load_splits
from data_prep.folds import UNCLUSTERED, read_folds, write_folds
from ensemble import fit as ensemble_fit
from ensemble import oof
from ensemble.predictor import EnsembleDetector, score_samples
from ensemble.stacking import LeakageError, StackingEnsemble
from experts import create_expert
from experts.train import HELD_OUT_FOLD
from experts.weights import MANIFEST, save_expert
from helpers import tiny_overrides

EXPERTS = ["convnext", "dae"]


@pytest.fixture(scope="module")
def oof_run(demo_root, tmp_path_factory, crop_cache):
    """`ensemble.fit` with 2 folds: convnext and dae trained once per fold (one epoch), the
    stacker fitted on their out-of-fold scores. The experts it then combines, trained on all
    the data in a real run, are saved untrained here: the fit only reads their names and
    feature columns."""
    tmp = tmp_path_factory.mktemp("oof")
    overrides = tiny_overrides(tmp, epochs=1, experts=",".join(EXPERTS), cache_dir=crop_cache) + [
        "ensemble.oof_folds=2", "ensemble.editing_fakes=0", "ensemble.method=logreg"]
    cfg = load_config("cpu", overrides + [f"data_root={demo_root}"])
    for name in EXPERTS:
        save_expert(create_expert(cfg.expert_config(name), 64), cfg.out, name, cfg.face, {})
    fitted_on = []  # the (X, y) the stacker is fitted on
    fit = StackingEnsemble.fit

    def recording_fit(self, X, y, **kwargs):
        fitted_on.append((X, y))
        return fit(self, X, y, **kwargs)

    with mock.patch.object(StackingEnsemble, "fit", recording_fit):
        assert ensemble_fit.main([str(demo_root)] + overrides) == 0
    splits = load_splits(demo_root)
    return {"tmp": tmp, "overrides": overrides, "cfg": cfg, "pool": splits["trainset"] + splits["valset"],
            "X": fitted_on[0][0], "y": fitted_on[0][1]}


def test_every_expert_is_trained_once_per_fold_without_that_fold(oof_run):
    outer = read_folds(oof_run["tmp"] / "runs" / "oof" / "folds.csv")
    assert sorted(set(outer.values())) == [0, 1] and set(outer) == {s.name for s in oof_run["pool"]}
    for fold in (0, 1):
        weights = oof_run["tmp"] / "runs" / "oof" / f"fold{fold}" / "weights"
        manifest = json.loads((weights / MANIFEST).read_text())
        assert sorted(manifest["experts"]) == [f"{name}_fold{fold}" for name in EXPERTS]
        assignment = read_folds(manifest["config"]["data"]["folds_csv"])
        scored = {name for name, f in outer.items() if f == fold}
        assert {name for name, f in assignment.items() if f == HELD_OUT_FOLD} == scored
        inner = {name for name, f in assignment.items() if f == fold}  # where it chose its epoch
        assert inner and not inner & scored
        data = manifest["experts"][f"convnext_fold{fold}"]["training"]["data"]
        assert data["valset"]["n"] == len(inner)
        assert data["trainset"]["n"] == len(oof_run["pool"]) - len(scored) - len(inner)


def test_each_image_is_scored_once_by_experts_that_never_trained_on_it(oof_run):
    pool = oof_run["pool"]
    rows = oof.out_of_fold_rows(oof_run["cfg"], pool, {s.name: oof.content_id(s.path) for s in pool})
    scored = [s.name for r in rows for s in r.samples]
    assert sorted(scored) == sorted(s.name for s in oof_run["pool"])  # every image, once
    for fold, r in enumerate(rows):
        assert r.experts == [f"{name}_fold{fold}" for name in EXPERTS]
        ids = {oof.content_id(s.path) for s in r.samples}
        assert not ids & set(r.trained)
        assert len(r.trained) == len(oof_run["pool"]) - len(r.samples)  # all the other images
    # One row per image, fold by fold, each holding the scores of that fold's own experts.
    X, y = oof_run["X"], oof_run["y"]
    assert X.shape == (len(pool), 2) and y.tolist() == [s.target for r in rows for s in r.samples]
    convnext_fold0 = EnsembleDetector.from_weights(rows[0].weights, ["convnext_fold0"], device="cpu")
    p_fold0 = score_samples(convnext_fold0, [s.path for s in rows[0].samples])[0]
    np.testing.assert_allclose(X[: len(rows[0].samples), 0], p_fold0, atol=1e-6)
    stacker = json.loads((oof_run["tmp"] / "weights" / MANIFEST).read_text())["ensemble"]["stacker"]
    assert stacker["fitted_on"] == f"out-of-fold scores of trainset+valset ({len(pool)} images, 2 folds)"


def test_fit_refuses_an_image_scored_by_experts_that_trained_on_it(oof_run, tmp_path, capsys):
    """Fold 0's first image moved into fold 1 after training: fold 1's experts trained on it."""
    runs = tmp_path / "runs"
    shutil.copytree(oof_run["tmp"] / "runs" / "oof", runs / "oof")
    folds_csv = runs / "oof" / "folds.csv"
    with open(folds_csv, newline="") as f:
        rows = list(csv.reader(f))
    moved = next(row for row in rows[1:] if row[2] == "0")
    moved[2] = "1"
    with open(folds_csv, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    overrides = oof_run["overrides"] + [f"run_dir={runs}"]
    cfg = load_config("cpu", overrides + [f"data_root={oof_run['cfg'].data_root}"])
    with pytest.raises(LeakageError, match=f"{moved[0]} = {moved[0]} \\(fold 1's experts trained on it\\)"):
        ensemble_fit.fit_ensemble(cfg)
    capsys.readouterr()
    assert ensemble_fit.main([cfg.data_root, *overrides, "--reuse-fold-experts"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 fold-1 image(s) are copies of images the experts scoring them" in err


def test_manifests_written_before_options_were_removed(oof_run, tmp_path):
    """A manifest written before `ensemble.meta_features` and `data.extra_reals` were removed
    holds them empty: the stacker and the fold experts load as before. A stacker fitted on
    the DAE's error terms, fold experts trained on extra reals: a one-line error each."""
    runs, weights = tmp_path / "runs", tmp_path / "weights"
    shutil.copytree(oof_run["tmp"] / "runs" / "oof", runs / "oof")
    shutil.copytree(oof_run["tmp"] / "weights", weights)

    def rewrite(path, edit):
        manifest = json.loads(path.read_text())
        edit(manifest)
        path.write_text(json.dumps(manifest))

    rewrite(weights / MANIFEST, lambda m: m["ensemble"]["stacker"].update(meta_features=[]))
    assert EnsembleDetector.from_weights(weights, device="cpu").stacker is not None
    fold0 = runs / "oof" / "fold0" / "weights" / MANIFEST
    rewrite(fold0, lambda m: m["config"]["data"].update(extra_reals=[]))
    cfg = copy.deepcopy(oof_run["cfg"])
    cfg.run_dir = str(runs)
    pool = oof_run["pool"]
    assert len(oof.out_of_fold_rows(cfg, pool, {s.name: oof.content_id(s.path) for s in pool})) == 2

    rewrite(weights / MANIFEST, lambda m: m["ensemble"]["stacker"].update(meta_features=["dae_terms"]))
    with pytest.raises(ConfigError, match=r"manifest\.json: ensemble\.meta_features was removed \(measured and not"):
        EnsembleDetector.from_weights(weights, device="cpu")
    rewrite(fold0, lambda m: m["config"]["data"].update(extra_reals=[str(tmp_path)]))
    with pytest.raises(ConfigError, match=r"fold0.weights.manifest\.json: data\.extra_reals was removed"):
        oof.out_of_fold_rows(cfg, pool, {s.name: oof.content_id(s.path) for s in pool})


# ---------------------------------------------------------------- the folds (no training)

def test_near_duplicates_are_one_group(tmp_path):
    rng = np.random.default_rng(0)
    smooth = lambda: np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # noqa: E731
    first, other = smooth(), smooth()
    Image.fromarray(first).save(tmp_path / "a.png")
    Image.fromarray(first).save(tmp_path / "a_resaved.jpg", quality=90)  # a re-encoded copy
    Image.fromarray(other).save(tmp_path / "b.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    samples = [Sample(tmp_path / n, 0) for n in ("a.png", "a_resaved.jpg", "b.png", "broken.png")]
    groups = oof.near_duplicate_groups(samples, max_distance=4)
    assert groups[0] == groups[1] and len({groups[0], groups[2], groups[3]}) == 3
    assert len(set(oof.near_duplicate_groups(samples, max_distance=-1))) == 4


def test_grouped_folds_keep_groups_together_stratified_and_seeded():
    targets = np.array([0, 1] * 30)
    groups = np.arange(60) // 3  # threes of near duplicates
    folds = oof.grouped_folds(targets, groups, k=3, seed=0)
    assert all(len(set(folds[groups == g])) == 1 for g in range(20))
    assert sorted(np.bincount(folds)) == [18, 21, 21]  # 7, 7 and 6 groups
    assert all(abs(targets[folds == k].mean() - 0.5) < 0.1 for k in range(3))
    np.testing.assert_array_equal(folds, oof.grouped_folds(targets, groups, k=3, seed=0))
    assert not np.array_equal(folds, oof.grouped_folds(targets, groups, k=3, seed=1))
    with pytest.raises(ValueError, match="20 groups of near duplicates cannot be dealt into 30 folds"):
        oof.grouped_folds(targets, groups, k=30, seed=0)


def test_fold_training_assignment_holds_out_the_fold_and_validates_on_the_others():
    pool = [Sample(Path(f"{i:03d}.png"), i % 2) for i in range(140)]
    outer = {s.name: (i // 2) % 2 for i, s in enumerate(pool)}  # both classes in both folds
    outer["000.png"] = UNCLUSTERED  # could not be clustered: trained on in every fold, never scored
    assignment = oof.fold_training_assignment(pool, np.arange(140), outer, fold=1, seed=0)
    assert {n for n, f in assignment.items() if f == HELD_OUT_FOLD} == {n for n, f in outer.items() if f == 1}
    inner = [s for s in pool if assignment[s.name] == 1]
    assert 8 <= len(inner) <= 12 and {s.target for s in inner} == {0, 1}  # about 1/7 of fold 0's 69
    assert all(outer[s.name] == 0 for s in inner) and assignment["000.png"] == UNCLUSTERED


def test_cluster_folds_are_taken_as_given_and_must_match_the_fold_count(demo_root, tmp_path):
    pool = sorted(load_splits(demo_root)["trainset"] + load_splits(demo_root)["valset"], key=lambda s: s.name)
    names, targets = [s.name for s in pool], [s.target for s in pool]
    clusters = np.arange(len(pool)) % 3
    given = write_folds(tmp_path / "clusters", names, targets, clusters)
    cfg = load_config("cpu", [f"run_dir={tmp_path / 'runs'}", "ensemble.oof_folds=3",
                              f"ensemble.oof_folds_csv={given}"])
    assert oof.outer_folds(cfg, pool, np.arange(len(pool))) == dict(zip(names, clusters.tolist()))
    assert read_folds(tmp_path / "runs" / "oof" / "folds.csv") == dict(zip(names, clusters.tolist()))
    cfg.ensemble.oof_folds = 2
    with pytest.raises(ConfigError, match=r"folds \[0, 1, 2\], but ensemble.oof_folds=2"):
        oof.outer_folds(cfg, pool, np.arange(len(pool)))
    for bad in (1, -1):
        cfg.ensemble.oof_folds = bad
        with pytest.raises(ConfigError, match="ensemble.oof_folds must be 0 .* or at least 2"):
            oof.check_oof_config(cfg)


def test_fit_on_fold_experts_never_trained_is_one_line(demo_root, tmp_path, capsys):
    overrides = tiny_overrides(tmp_path, experts="convnext") + ["ensemble.oof_folds=2"]
    cfg = load_config("cpu", overrides)
    save_expert(create_expert(cfg.expert_config("convnext"), 64), cfg.out, "convnext", cfg.face, {})
    assert ensemble_fit.main([str(demo_root), *overrides, "--reuse-fold-experts"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "oof/folds.csv: missing: ensemble.oof_folds=2 needs the fold experts" in err
