"""End to end: train -> manifest -> stacker -> infer, the EMA export, and refused weights.
The trainer's other paths are in test_training.py, infer.py on odd inputs in test_infer.py."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import infer
from ensemble import fit as ensemble_fit
from experts.weights import MANIFEST, WeightsError, load_expert, sha256_file
from helpers import PREDICTION_LINE, read_prediction_csv


def copy_weights(trained_ensemble, tmp_path):
    dst = tmp_path / "weights"
    shutil.copytree(trained_ensemble["weights"], dst)
    return dst


# ---------------------------------------------------------------- the round trip

def test_manifest_records_each_expert(trained_ensemble):
    weights = trained_ensemble["weights"]
    manifest = json.loads((weights / MANIFEST).read_text())
    assert manifest["format"] == 1
    assert set(manifest["experts"]) == {"convnext", "dae"}
    for name, entry in manifest["experts"].items():
        path = weights / entry["file"]
        assert entry["file"] == f"{name}.safetensors" and path.is_file()
        assert entry["sha256"] == sha256_file(path)
        # the kind that built it; the config's own name for it (convnext: an alias of timm) is kept
        assert entry["kind"] == {"convnext": "timm", "dae": "dae"}[name]
        assert entry["expert_config"]["kind"] == name
        assert entry["expert_config"]["model"] == {"convnext": "test_convnext", "dae": "test_resnet"}[name]
        assert entry["input_size"] == 64
        assert len(entry["normalization"]["mean"]) == 3 and len(entry["normalization"]["std"]) == 3
        assert entry["face"]["crop_size"] == 80 and entry["face"]["enabled"] is True
        assert 0 < entry["trainable_parameters"] <= entry["parameters"]
        training = entry["training"]
        assert training["epochs"] == 2 and training["best_epoch"] in (1, 2)
        assert 0.0 <= training["val_auc"] <= 1.0
        assert [row["epoch"] for row in training["history"]] == [1, 2]
        for row in training["history"]:
            assert {"train_loss", "val_auc", "val_auc_ema", "lr"} <= set(row)
        assert training["data"]["valset"]["n"] == 32
    assert manifest["experts"]["convnext"]["training"]["data"]["trainset"] == {"n": 64, "n_fake": 32, "n_real": 32}
    # the DAE learns real faces only
    assert manifest["experts"]["dae"]["training"]["data"]["trainset"]["n_fake"] == 0
    assert {"python", "torch", "timm", "numpy"} <= set(manifest["versions"])
    config = manifest["config"]
    assert config["experts"] == ["convnext", "dae"] and config["train"]["epochs"] == 2
    assert config["expert"]["convnext"]["model"] == "test_convnext"


def test_run_dir_has_metrics_and_checkpoints(trained_ensemble):
    for name in ("convnext", "dae"):
        run = trained_ensemble["runs"] / name
        assert (run / "checkpoint.pt").is_file()
        assert len(json.loads((run / "metrics.json").read_text())) == 2
        assert (run / "metrics.csv").read_text().startswith("epoch,")
        scores = json.loads((run / "val_scores.json").read_text())
        assert len(scores) == 32 and all(0.0 <= v <= 1.0 for v in scores.values())


def test_fit_adds_the_stacker(trained_ensemble):
    before = trained_ensemble["manifest_before_fit"]
    assert "ensemble" not in before
    manifest = json.loads((trained_ensemble["weights"] / MANIFEST).read_text())
    stacker = manifest["ensemble"]["stacker"]
    assert stacker["experts"] == ["convnext", "dae"]
    assert stacker["sha256"] == sha256_file(trained_ensemble["weights"] / stacker["file"])
    assert stacker["method"] in {"lgbm", "logreg", "mean", "rank_mean"}
    # fitting the stacker keeps the experts' entries untouched
    assert manifest["experts"] == before["experts"]


def test_fit_with_editing_fakes_of_the_validation_reals(trained_ensemble, demo_root, tmp_path):
    from data_prep.dataset import load_splits
    weights = copy_weights(trained_ensemble, tmp_path)
    overrides = [o for o in trained_ensemble["overrides"] if not o.startswith("out=")]
    assert ensemble_fit.main([str(demo_root), *overrides, f"out={weights}", "ensemble.editing_fakes=0.5"]) == 0
    stacker = json.loads((weights / MANIFEST).read_text())["ensemble"]["stacker"]
    val = load_splits(demo_root)["valset"]
    n_reals = sum(s.target == 0 for s in val)
    assert stacker["fitted_on"] == (f"valset ({len(val)} images, hold-out) + {round(0.5 * n_reals)} "
                                    f"editing fakes of its reals")
    assert stacker["calibration"]["fitted_on"] == "the scored images, not the editing fakes"
    assert stacker["calibration"]["slope"] >= 0


def test_the_stacker_is_calibrated_on_the_scored_images_only(trained_ensemble, demo_root, tmp_path):
    """The editing fakes enter the combiner's fit but not its calibration: they would tilt
    every P(fake) towards fake."""
    from unittest import mock

    from data_prep.dataset import load_splits
    from ensemble.stacking import StackingEnsemble
    weights = copy_weights(trained_ensemble, tmp_path)
    overrides = [o for o in trained_ensemble["overrides"] if not o.startswith("out=")]
    calls, fit = [], StackingEnsemble.fit

    def recording_fit(self, X, y, calibration_rows=None):
        calls.append((y, calibration_rows))
        return fit(self, X, y, calibration_rows=calibration_rows)

    with mock.patch.object(StackingEnsemble, "fit", recording_fit):
        assert ensemble_fit.main([str(demo_root), *overrides, f"out={weights}", "ensemble.editing_fakes=1.0"]) == 0
    (y, rows), = calls
    val = load_splits(demo_root)["valset"]
    n_reals = sum(s.target == 0 for s in val)
    assert len(y) == len(val) + n_reals and rows.sum() == len(val)
    assert np.array_equal(y[rows], [s.target for s in val]) and y[~rows].tolist() == [1] * n_reals


def test_a_valset_of_reals_only_is_fitted_and_calibrated_with_its_editing_fakes(trained_ensemble, demo_root,
                                                                                 tmp_path):
    """A data set of reals only (protocol c, or a user with no fakes): the stacker learns from
    the editing fakes of the validation reals, and is calibrated on them too."""
    from data_prep.dataset import load_splits
    from data_prep.labels import write_label_file
    root = tmp_path / "reals_only"
    shutil.copytree(demo_root / "trainset", root / "trainset")
    shutil.copy(demo_root / "trainset_label.txt", root / "trainset_label.txt")
    reals = [s for s in load_splits(demo_root)["valset"] if s.target == 0]
    (root / "valset").mkdir()
    for s in reals:
        shutil.copy(s.path, root / "valset" / s.path.name)
    write_label_file(root / "valset_label.txt", [(s.path.name, 0) for s in reals])
    weights = copy_weights(trained_ensemble, tmp_path)
    overrides = [o for o in trained_ensemble["overrides"] if not o.startswith("out=")]
    assert ensemble_fit.main([str(root), *overrides, f"out={weights}", "ensemble.editing_fakes=1.0"]) == 0
    stacker = json.loads((weights / MANIFEST).read_text())["ensemble"]["stacker"]
    assert stacker["fitted_on"] == f"valset ({len(reals)} images, hold-out) + {len(reals)} editing fakes of its reals"
    assert stacker["calibration"]["fitted_on"] == "the scored images (all real) and the editing fakes"


def test_infer_csv_on_testset(trained_ensemble, demo_root, tmp_path):
    out = tmp_path / "sub" / "predictions.csv"
    code = infer.main([str(demo_root / "testset"), "--csv", str(out), "--weights", str(trained_ensemble["weights"])])
    assert code == 0
    rows = read_prediction_csv(out)
    names = sorted(p.name for p in (demo_root / "testset").iterdir())
    assert [n for n, _ in rows] == names and len(rows) == 16
    assert all(0.0 <= p <= 1.0 for _, p in rows)
    assert not (tmp_path / "sub" / "predictions.csv.errors").exists()
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    # the CSV equals the library's own scoring of the same files
    from ensemble.predictor import EnsembleDetector, score_samples
    detector = EnsembleDetector.from_weights(trained_ensemble["weights"], device="cpu")
    assert detector.stacker is not None
    p, _, errors = score_samples(detector, [demo_root / "testset" / n for n in names])
    assert not errors
    np.testing.assert_allclose([s for _, s in rows], p, atol=1e-6)


def test_infer_prints_one_line_per_image(trained_ensemble, demo_root, capsys):
    images = sorted((demo_root / "testset").iterdir())[:2]
    code = infer.main([str(p) for p in images] + ["--weights", str(trained_ensemble["weights"])])
    assert code == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 2
    for path, line in zip(images, lines):
        match = PREDICTION_LINE.match(line)
        assert match, line
        assert match.group(1) == str(path)
        assert 0.0 <= float(match.group(2)) <= 1.0


def test_infer_subset_of_experts(trained_ensemble, demo_root, tmp_path):
    out = tmp_path / "c.csv"
    assert infer.main([str(demo_root / "testset"), "--csv", str(out), "--weights", str(trained_ensemble["weights"]),
                       "--experts", "convnext"]) == 0
    assert len(read_prediction_csv(out)) == 16


# ---------------------------------------------------------------- EMA export

def test_export_is_the_best_ema_weights(trained_ensemble):
    for name in ("convnext", "dae"):
        ck = torch.load(trained_ensemble["runs"] / name / "checkpoint.pt", map_location="cpu", weights_only=True)
        exported = load_file(str(trained_ensemble["weights"] / f"{name}.safetensors"))
        best, raw = ck["best_state"], ck["model"]
        assert set(exported) == set(best) == set(raw)
        finalized = {"term_scale", "calibration"} if name == "dae" else set()  # set after training
        for key in set(best) - finalized:
            assert torch.equal(exported[key], best[key]), f"{name}: {key} is not the best EMA weight"
        # ... and not the raw weights of the last step
        params = [k for k in raw if raw[k].is_floating_point() and k not in finalized
                  and "running" not in k and k not in ("mean", "std")]
        assert any(not torch.equal(exported[k], raw[k]) for k in params), f"{name}: raw weights exported"
        if name == "dae":
            assert not torch.equal(exported["term_scale"], torch.ones(3))


def test_ema_shadow_matches_export_when_last_epoch_is_best(trained_ensemble):
    ck = torch.load(trained_ensemble["runs"] / "convnext" / "checkpoint.pt", map_location="cpu", weights_only=True)
    if ck["best_epoch"] != ck["epoch"] + 1:
        pytest.skip("best EMA epoch is not the last one in this run")
    from configs import ExpertConfig, LossConfig
    from experts import create_expert
    manifest = json.loads((trained_ensemble["weights"] / MANIFEST).read_text())
    model = create_expert(ExpertConfig(**manifest["experts"]["convnext"]["expert_config"]), 64)
    trained = {id(p) for p in model.trainable_parameters(LossConfig())}  # as the trainer's EMA tracks them
    names = [n for n, p in model.named_parameters() if id(p) in trained]
    shadow = ck["ema"]["shadow_params"]
    exported = load_file(str(trained_ensemble["weights"] / "convnext.safetensors"))
    assert len(shadow) == len(names)
    for n, s in zip(names, shadow):
        assert torch.equal(exported[n], s), n


# ---------------------------------------------------------------- refused weights

def flip_one_byte(path, offset=None):
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_tampered_file_is_refused(trained_ensemble, demo_root, tmp_path, capsys):
    weights = copy_weights(trained_ensemble, tmp_path)
    flip_one_byte(weights / "convnext.safetensors")
    with pytest.raises(WeightsError, match="sha256") as err:
        load_expert(weights, "convnext")
    assert "convnext.safetensors" in str(err.value)
    load_expert(weights, "dae")  # the other expert is untouched
    capsys.readouterr()
    code = infer.main([str(demo_root / "testset"), "--csv", str(tmp_path / "o.csv"), "--weights", str(weights)])
    assert code == 2
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err_lines) == 1 and err_lines[0].startswith("error:") and "sha256" in err_lines[0]
    assert not (tmp_path / "o.csv").exists()


def test_tampered_file_with_updated_hash_fails_to_load(trained_ensemble, tmp_path):
    weights = copy_weights(trained_ensemble, tmp_path)
    path = weights / "convnext.safetensors"
    path.write_bytes(path.read_bytes()[:-100])  # truncated, and the manifest "agrees"
    manifest = json.loads((weights / MANIFEST).read_text())
    manifest["experts"]["convnext"]["sha256"] = sha256_file(path)
    (weights / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(WeightsError, match="cannot load"):
        load_expert(weights, "convnext")


def test_tampered_stacker_is_refused(trained_ensemble, demo_root, tmp_path, capsys):
    weights = copy_weights(trained_ensemble, tmp_path)
    with open(weights / "ensemble.json", "a") as f:
        f.write(" ")
    code = infer.main([str(demo_root / "testset"), "--csv", str(tmp_path / "o.csv"), "--weights", str(weights)])
    assert code == 2
    assert "sha256" in capsys.readouterr().err


def test_missing_weight_file(trained_ensemble, demo_root, tmp_path, capsys):
    weights = copy_weights(trained_ensemble, tmp_path)
    (weights / "dae.safetensors").unlink()
    with pytest.raises(WeightsError, match="missing") as err:
        load_expert(weights, "dae")
    assert "dae.safetensors" in str(err.value)
    code = infer.main([str(demo_root / "testset"), "--csv", str(tmp_path / "o.csv"), "--weights", str(weights)])
    assert code == 2
    assert "missing" in capsys.readouterr().err


def test_unknown_expert_name(trained_ensemble):
    with pytest.raises(WeightsError, match="available"):
        load_expert(trained_ensemble["weights"], "efficientnet")


def test_missing_manifest(demo_root, tmp_path, capsys):
    empty = tmp_path / "no_weights"
    empty.mkdir()
    code = infer.main([str(demo_root / "testset"), "--csv", str(tmp_path / "o.csv"), "--weights", str(empty)])
    assert code == 2
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err_lines) == 1 and "bash train.sh" in err_lines[0]
    assert not (tmp_path / "o.csv").exists()


def test_broken_manifest(trained_ensemble, tmp_path):
    weights = copy_weights(trained_ensemble, tmp_path)
    (weights / MANIFEST).write_text("{not json")
    with pytest.raises(WeightsError, match="JSON"):
        load_expert(weights, "convnext")
