"""End to end: train -> manifest -> stacker -> infer, EMA export, tamper checks, exact resume,
and inference on a folder of valid, odd and broken files."""
import csv
import io
import json
import re
import shutil
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import infer
from ensemble import fit as ensemble_fit
from experts import train as experts_train
from experts.weights import MANIFEST, WeightsError, load_expert, sha256_file
from helpers import tiny_overrides

PREDICTION_LINE = re.compile(r"^Prediction of \[(.+)\] being Deepfake: (\d\.\d{6})$")


@pytest.fixture(scope="module")
def crop_cache(tmp_path_factory):
    """One face-crop cache for the module: keyed by file + settings, so sharing it is safe."""
    return tmp_path_factory.mktemp("crop_cache")


@pytest.fixture(scope="module")
def trained(demo_root, tmp_path_factory, crop_cache):
    """convnext + dae trained for 2 epochs, plus the fitted stacker."""
    tmp = tmp_path_factory.mktemp("roundtrip")
    overrides = tiny_overrides(tmp, epochs=2, experts="convnext,dae", cache_dir=crop_cache)
    assert experts_train.main([str(demo_root)] + overrides) == 0
    manifest_before_fit = json.loads((tmp / "weights" / MANIFEST).read_text())
    assert ensemble_fit.main([str(demo_root)] + overrides) == 0
    return {"tmp": tmp, "weights": tmp / "weights", "runs": tmp / "runs", "overrides": overrides,
            "manifest_before_fit": manifest_before_fit}


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["img_name", "y_pred"]
    return [(name, float(p)) for name, p in rows[1:]]


def copy_weights(trained, tmp_path):
    dst = tmp_path / "weights"
    shutil.copytree(trained["weights"], dst)
    return dst


# ---------------------------------------------------------------- the round trip

def test_manifest_records_each_expert(trained):
    weights = trained["weights"]
    manifest = json.loads((weights / MANIFEST).read_text())
    assert manifest["format"] == 1
    assert set(manifest["experts"]) == {"convnext", "dae"}
    for name, entry in manifest["experts"].items():
        path = weights / entry["file"]
        assert entry["file"] == f"{name}.safetensors" and path.is_file()
        assert entry["sha256"] == sha256_file(path)
        assert entry["kind"] == name
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


def test_run_dir_has_metrics_and_checkpoints(trained):
    for name in ("convnext", "dae"):
        run = trained["runs"] / name
        assert (run / "checkpoint.pt").is_file()
        assert len(json.loads((run / "metrics.json").read_text())) == 2
        assert (run / "metrics.csv").read_text().startswith("epoch,")
        scores = json.loads((run / "val_scores.json").read_text())
        assert len(scores) == 32 and all(0.0 <= v <= 1.0 for v in scores.values())


def test_fit_adds_the_stacker(trained):
    before = trained["manifest_before_fit"]
    assert "ensemble" not in before
    manifest = json.loads((trained["weights"] / MANIFEST).read_text())
    stacker = manifest["ensemble"]["stacker"]
    assert stacker["experts"] == ["convnext", "dae"]
    assert stacker["sha256"] == sha256_file(trained["weights"] / stacker["file"])
    assert stacker["method"] in {"lgbm", "logreg", "mean", "rank_mean"}
    # fitting the stacker keeps the experts' entries untouched
    assert manifest["experts"] == before["experts"]


def test_fit_with_editing_fakes_of_the_validation_reals(trained, demo_root, tmp_path):
    from data_prep.dataset import load_splits
    weights = copy_weights(trained, tmp_path)
    overrides = [o for o in trained["overrides"] if not o.startswith("out=")]
    assert ensemble_fit.main([str(demo_root), *overrides, f"out={weights}", "ensemble.editing_fakes=0.5"]) == 0
    stacker = json.loads((weights / MANIFEST).read_text())["ensemble"]["stacker"]
    val = load_splits(demo_root)["valset"]
    n_reals = sum(s.target == 0 for s in val)
    assert stacker["fitted_on"] == f"valset ({len(val)} images, hold-out) + {round(0.5 * n_reals)} editing fakes of its reals"


def test_infer_csv_on_testset(trained, demo_root, tmp_path):
    out = tmp_path / "sub" / "predictions.csv"
    code = infer.main([str(demo_root / "testset"), "--csv", str(out), "--weights", str(trained["weights"])])
    assert code == 0
    rows = read_csv(out)
    names = sorted(p.name for p in (demo_root / "testset").iterdir())
    assert [n for n, _ in rows] == names and len(rows) == 16
    assert all(0.0 <= p <= 1.0 for _, p in rows)
    assert not (tmp_path / "sub" / "predictions.csv.errors").exists()
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    # the CSV equals the library's own scoring of the same files
    from ensemble.predictor import Detector, score_samples
    detector = Detector.from_weights(trained["weights"], device="cpu")
    assert detector.stacker is not None
    p, _, errors = score_samples(detector, [demo_root / "testset" / n for n in names])
    assert not errors
    np.testing.assert_allclose([s for _, s in rows], p, atol=1e-6)


def test_infer_prints_one_line_per_image(trained, demo_root, capsys):
    images = sorted((demo_root / "testset").iterdir())[:2]
    code = infer.main([str(p) for p in images] + ["--weights", str(trained["weights"])])
    assert code == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 2
    for path, line in zip(images, lines):
        match = PREDICTION_LINE.match(line)
        assert match, line
        assert match.group(1) == str(path)
        assert 0.0 <= float(match.group(2)) <= 1.0


def test_infer_subset_of_experts(trained, demo_root, tmp_path):
    out = tmp_path / "c.csv"
    assert infer.main([str(demo_root / "testset"), "--csv", str(out), "--weights", str(trained["weights"]),
                       "--experts", "convnext"]) == 0
    assert len(read_csv(out)) == 16


# ---------------------------------------------------------------- EMA export

def test_export_is_the_best_ema_weights(trained):
    for name in ("convnext", "dae"):
        ck = torch.load(trained["runs"] / name / "checkpoint.pt", map_location="cpu", weights_only=True)
        exported = load_file(str(trained["weights"] / f"{name}.safetensors"))
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


def test_ema_shadow_matches_export_when_last_epoch_is_best(trained):
    ck = torch.load(trained["runs"] / "convnext" / "checkpoint.pt", map_location="cpu", weights_only=True)
    if ck["best_epoch"] != ck["epoch"] + 1:
        pytest.skip("best EMA epoch is not the last one in this run")
    from experts import create_expert
    from configs import ExpertConfig
    manifest = json.loads((trained["weights"] / MANIFEST).read_text())
    model = create_expert(ExpertConfig(**manifest["experts"]["convnext"]["expert_config"]), 64)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shadow = ck["ema"]["shadow_params"]
    exported = load_file(str(trained["weights"] / "convnext.safetensors"))
    assert len(shadow) == len(names)
    for n, s in zip(names, shadow):
        assert torch.equal(exported[n], s), n


# ---------------------------------------------------------------- refused weights

def flip_one_byte(path, offset=None):
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_tampered_file_is_refused(trained, demo_root, tmp_path, capsys):
    weights = copy_weights(trained, tmp_path)
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


def test_tampered_file_with_updated_hash_fails_to_load(trained, tmp_path):
    weights = copy_weights(trained, tmp_path)
    path = weights / "convnext.safetensors"
    path.write_bytes(path.read_bytes()[:-100])  # truncated, and the manifest "agrees"
    manifest = json.loads((weights / MANIFEST).read_text())
    manifest["experts"]["convnext"]["sha256"] = sha256_file(path)
    (weights / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(WeightsError, match="cannot load"):
        load_expert(weights, "convnext")


def test_tampered_stacker_is_refused(trained, demo_root, tmp_path, capsys):
    weights = copy_weights(trained, tmp_path)
    with open(weights / "ensemble.json", "a") as f:
        f.write(" ")
    code = infer.main([str(demo_root / "testset"), "--csv", str(tmp_path / "o.csv"), "--weights", str(weights)])
    assert code == 2
    assert "sha256" in capsys.readouterr().err


def test_missing_weight_file(trained, demo_root, tmp_path, capsys):
    weights = copy_weights(trained, tmp_path)
    (weights / "dae.safetensors").unlink()
    with pytest.raises(WeightsError, match="missing") as err:
        load_expert(weights, "dae")
    assert "dae.safetensors" in str(err.value)
    code = infer.main([str(demo_root / "testset"), "--csv", str(tmp_path / "o.csv"), "--weights", str(weights)])
    assert code == 2
    assert "missing" in capsys.readouterr().err


def test_unknown_expert_name(trained):
    with pytest.raises(WeightsError, match="available"):
        load_expert(trained["weights"], "efficientnet")


def test_missing_manifest(demo_root, tmp_path, capsys):
    empty = tmp_path / "no_weights"
    empty.mkdir()
    code = infer.main([str(demo_root / "testset"), "--csv", str(tmp_path / "o.csv"), "--weights", str(empty)])
    assert code == 2
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err_lines) == 1 and "bash train.sh" in err_lines[0]
    assert not (tmp_path / "o.csv").exists()


def test_broken_manifest(trained, tmp_path):
    weights = copy_weights(trained, tmp_path)
    (weights / MANIFEST).write_text("{not json")
    with pytest.raises(WeightsError, match="JSON"):
        load_expert(weights, "convnext")


# ---------------------------------------------------------------- resume

@pytest.mark.parametrize("extra", [[], ["train.grad_accum=3"]], ids=["plain", "grad_accum3"])
def test_resume_equals_uninterrupted(demo_root, tmp_path, crop_cache, extra):
    """4 batches per epoch; with grad_accum=3 an epoch ends inside an accumulation window."""
    common = ["experts=convnext", "train.epochs=3", "data.num_workers=0"] + extra
    run_a = tiny_overrides(tmp_path / "a", epochs=3, cache_dir=crop_cache) + common
    run_b = tiny_overrides(tmp_path / "b", epochs=3, cache_dir=crop_cache) + common
    assert experts_train.main([str(demo_root)] + run_a) == 0

    original = experts_train.save_checkpoint
    calls = []

    def interrupted_after_epoch_2(*args, **kwargs):
        original(*args, **kwargs)
        calls.append(args[6])  # epoch (0-based)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption after epoch 2")

    with mock.patch.object(experts_train, "save_checkpoint", side_effect=interrupted_after_epoch_2):
        with pytest.raises(KeyboardInterrupt):
            experts_train.main([str(demo_root)] + run_b)
    assert calls == [0, 1]
    assert not (tmp_path / "b" / "weights" / "convnext.safetensors").exists()
    ck = torch.load(tmp_path / "b" / "runs" / "convnext" / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 1

    assert experts_train.main([str(demo_root)] + run_b + ["resume=true"]) == 0
    a = load_file(str(tmp_path / "a" / "weights" / "convnext.safetensors"))
    b = load_file(str(tmp_path / "b" / "weights" / "convnext.safetensors"))
    assert set(a) == set(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed run exports different weights: {different[:5]}"
    # the whole state after the last epoch, not only the (possibly earlier) best EMA weights
    ck_a = torch.load(tmp_path / "a" / "runs" / "convnext" / "checkpoint.pt", weights_only=True)
    ck_b = torch.load(tmp_path / "b" / "runs" / "convnext" / "checkpoint.pt", weights_only=True)
    raw_diff = [k for k in ck_a["model"] if not torch.equal(ck_a["model"][k], ck_b["model"][k])]
    assert not raw_diff, f"resumed run ends with different raw weights: {raw_diff[:5]}"
    shadow_a, shadow_b = ck_a["ema"]["shadow_params"], ck_b["ema"]["shadow_params"]
    assert all(torch.equal(x, y) for x, y in zip(shadow_a, shadow_b)), "EMA weights differ"
    ha = json.loads((tmp_path / "a" / "runs" / "convnext" / "metrics.json").read_text())
    hb = json.loads((tmp_path / "b" / "runs" / "convnext" / "metrics.json").read_text())
    assert [r["epoch"] for r in hb] == [1, 2, 3]
    for ra, rb in zip(ha, hb):
        for key in ("train_loss", "val_auc", "val_auc_ema", "lr"):
            assert ra[key] == rb[key], (ra["epoch"], key)

    # resuming a finished run trains nothing more and exports the same weights again
    with mock.patch.object(experts_train, "save_checkpoint", side_effect=AssertionError("trained again")):
        assert experts_train.main([str(demo_root)] + run_b + ["resume=true"]) == 0
    c = load_file(str(tmp_path / "b" / "weights" / "convnext.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_other_experts_train_export_and_reload(demo_root, tmp_path, crop_cache):
    """efficientnet and clip (cpu recipe: trainable=all) through the same trainer, one epoch;
    the reloaded expert predicts exactly what the trainer validated."""
    overrides = tiny_overrides(tmp_path, epochs=1, experts="efficientnet,clip", cache_dir=crop_cache)
    assert experts_train.main([str(demo_root)] + overrides) == 0
    manifest = json.loads((tmp_path / "weights" / MANIFEST).read_text())
    assert set(manifest["experts"]) == {"efficientnet", "clip"}
    from ensemble.predictor import Detector, score_samples
    from data_prep.dataset import load_splits
    val = load_splits(demo_root)["valset"]
    for name in ("efficientnet", "clip"):
        detector = Detector.from_weights(tmp_path / "weights", [name], device="cpu")
        p, _, errors = score_samples(detector, [s.path for s in val])
        assert not errors
        saved = json.loads((tmp_path / "runs" / name / "val_scores.json").read_text())
        np.testing.assert_allclose(p, [saved[s.name] for s in val], atol=1e-5)


def test_native_resolution_experts_patches_and_landmark_fakes(demo_root, tmp_path, crop_cache):
    """mesonet and forensic, a resnet trained on patches and evaluated on whole crops, and
    editing fakes blended along dlib landmarks: all through the one trainer, reloaded exact."""
    overrides = tiny_overrides(tmp_path, epochs=1, experts="mesonet,forensic,resnet", cache_dir=crop_cache)
    overrides += ["expert.resnet.patch_size=32", "data.online_fakes=0.5", "data.fake_masks=landmarks"]
    assert experts_train.main([str(demo_root)] + overrides) == 0
    from ensemble.predictor import Detector, score_samples
    from data_prep.dataset import load_splits
    val = load_splits(demo_root)["valset"]
    for name in ("mesonet", "forensic", "resnet"):
        detector = Detector.from_weights(tmp_path / "weights", [name], device="cpu")
        p, _, errors = score_samples(detector, [s.path for s in val])
        assert not errors
        saved = json.loads((tmp_path / "runs" / name / "val_scores.json").read_text())
        np.testing.assert_allclose(p, [saved[s.name] for s in val], atol=1e-5)
    assert list(crop_cache.glob("faces_*/*.landmarks.npy"))  # landmarks were fitted and cached


def test_patch_dataset_crops_only_in_training(demo_root):
    from configs import load_config
    from data_prep.dataset import load_splits
    from data_prep.faces import FaceCropCache

    cfg = load_config("cpu", ["face.crop_size=48", "data.cache_dir="])
    samples = load_splits(demo_root)["trainset"][:4]
    crops = FaceCropCache(cfg.face, None)
    train = experts_train.FaceCropDataset(samples, crops, 40, cfg, train=True, patch_size=24)
    val = experts_train.FaceCropDataset(samples, crops, 40, cfg, train=False)
    assert train[0][0].shape == (3, 24, 24) and val[0][0].shape == (3, 40, 40)


def test_reals_only_valset_is_paired_with_fixed_editing_fakes(demo_root):
    from configs import load_config
    from data_prep.dataset import load_splits
    from data_prep.faces import FaceCropCache

    cfg = load_config("cpu", ["face.crop_size=48", "data.cache_dir="])
    reals = [s for s in load_splits(demo_root)["valset"] if s.target == 0][:3]
    ds = experts_train.FaceCropDataset(reals, FaceCropCache(cfg.face, None), 48, cfg, train=False,
                                       paired_fakes=True)
    assert len(ds) == 6 and [ds[i][1] for i in range(6)] == [0, 0, 0, 1, 1, 1]
    assert torch.equal(ds[4][0], ds[4][0]) and not torch.equal(ds[1][0], ds[4][0])


# ---------------------------------------------------------------- odd and broken inputs

def make_mixed_folder(folder, demo_root):
    folder.mkdir()
    rgb = np.asarray(Image.open(sorted((demo_root / "testset").iterdir())[0]).convert("RGB"))
    jpeg = io.BytesIO()
    Image.fromarray(rgb).save(jpeg, format="JPEG", quality=90)
    (folder / "valid.jpg").write_bytes(jpeg.getvalue())
    rgba = np.dstack([rgb, np.tile(np.linspace(0, 255, rgb.shape[1], dtype=np.uint8), (rgb.shape[0], 1))])
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    Image.fromarray(rgb).convert("L").save(folder / "gray.png")
    deep = (rgb.mean(axis=2) * 257).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep16.png")
    assert Image.open(folder / "deep16.png").mode.startswith("I")
    (folder / "UPPER.JPG").write_bytes(jpeg.getvalue())
    (folder / "gesicht_äöü_日本.jpg").write_bytes(jpeg.getvalue())
    broken = {
        "truncated.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
        "empty.png": b"",
        "text.jpg": b"this is a text file, not a JPEG\n",
    }
    for name, data in broken.items():
        (folder / name).write_bytes(data)
    (folder / "notes.txt").write_text("ignored: not an image\n")
    valid = ["valid.jpg", "alpha.png", "gray.png", "deep16.png", "UPPER.JPG", "gesicht_äöü_日本.jpg"]
    return valid, sorted(broken)


def test_infer_never_drops_an_input_silently(trained, demo_root, tmp_path, capsys):
    """A dangling link, a folder named like an image and a video that is not one each get a
    row and a named error; subfolders are reported as skipped, or scored with --recursive
    under their relative names; the closing line counts inputs, scored and failed."""
    folder = tmp_path / "in"
    valid, broken = make_mixed_folder(folder, demo_root)
    (folder / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    (folder / "dir.png").mkdir()
    (folder / "fake.mp4").write_bytes(b"not a video")
    for sub in ("a", "b"):
        (folder / sub).mkdir()
        shutil.copy(folder / "valid.jpg", folder / sub / "valid.jpg")
    odd = ["dir.png", "fake.mp4", "gone.jpg"]
    out = tmp_path / "sub.csv"
    assert infer.main([str(folder), "--csv", str(out), "--weights", str(trained["weights"])]) == 0
    err = capsys.readouterr().err
    names = [n for n, _ in read_csv(out)]
    assert sorted(names) == sorted(valid + broken + odd)
    errors = (tmp_path / "sub.csv.errors").read_text()
    for name in odd:
        assert name in errors
    assert "2 subfolder(s) not scored (use --recursive)" in err
    n = len(valid + broken + odd)
    assert f"{n} input(s): {len(valid)} scored, {len(broken + odd)} failed" in err
    assert infer.main([str(folder), "--csv", str(out), "--recursive", "--weights", str(trained["weights"])]) == 0
    names = [n for n, _ in read_csv(out)]
    assert "a/valid.jpg" in names and "b/valid.jpg" in names and "valid.jpg" in names


@pytest.mark.parametrize("loader_args", [[], ["--batch-size", "2", "--workers", "1"]],
                         ids=["default", "batch2-worker"])
def test_infer_mixed_folder(trained, demo_root, tmp_path, capsys, loader_args):
    valid, broken = make_mixed_folder(tmp_path / "mixed", demo_root)
    out = tmp_path / "out.csv"
    code = infer.main([str(tmp_path / "mixed"), "--csv", str(out), "--weights", str(trained["weights"])]
                      + loader_args)
    assert code == 0
    rows = read_csv(out)
    names = [n for n, _ in rows]
    assert names == sorted(valid + broken)
    assert "notes.txt" not in names
    scores = dict(rows)
    for name in broken:
        assert scores[name] == 0.5, name
    for name in valid:
        assert 0.0 <= scores[name] <= 1.0
    errors = (tmp_path / "out.csv.errors").read_text(encoding="utf-8").splitlines()
    assert len(errors) == len(broken)
    for name in broken:
        (line,) = [e for e in errors if name in e]
        assert line.split(": ", 1)[1].strip()  # a reason after the name
    assert any("empty" in e for e in errors if "empty.png" in e)
    assert any("truncated" in e for e in errors if "truncated.jpg" in e)
    err = capsys.readouterr().err
    for name in broken:
        assert name in err


def test_infer_mixed_folder_strict(trained, demo_root, tmp_path, capsys):
    make_mixed_folder(tmp_path / "mixed", demo_root)
    out = tmp_path / "strict.csv"
    code = infer.main([str(tmp_path / "mixed"), "--csv", str(out), "--weights", str(trained["weights"]),
                       "--strict"])
    assert code == 1
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".strict.csv")]
    assert "strict" in capsys.readouterr().err


def test_infer_stale_error_file_removed(trained, demo_root, tmp_path):
    out = tmp_path / "o.csv"
    (tmp_path / "o.csv.errors").write_text("old\n")
    assert infer.main([str(demo_root / "testset"), "--csv", str(out), "--weights", str(trained["weights"])]) == 0
    assert not (tmp_path / "o.csv.errors").exists()


def test_infer_print_mode_broken_and_missing(trained, demo_root, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    good = sorted((demo_root / "testset").iterdir())[0]
    code = infer.main([str(good), str(bad), str(tmp_path / "absent.jpg"), "--weights", str(trained["weights"])])
    assert code == 1
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.strip()]
    assert len(lines) == 1 and PREDICTION_LINE.match(lines[0])
    assert "bad.png" in captured.err and "absent.jpg" in captured.err


def test_infer_csv_names_with_comma_stay_one_column(trained, demo_root, tmp_path):
    folder = tmp_path / "odd_names"
    folder.mkdir()
    source = sorted((demo_root / "testset").iterdir())[0]
    shutil.copy(source, folder / "face, left.jpg")
    shutil.copy(source, folder / "plain.jpg")
    out = tmp_path / "o.csv"
    assert infer.main([str(folder), "--csv", str(out), "--weights", str(trained["weights"])]) == 0
    rows = read_csv(out)  # every row must parse as exactly img_name,y_pred
    assert [n for n, _ in rows] == ["face, left.jpg", "plain.jpg"]
    assert rows[0][1] == rows[1][1]


def test_training_on_a_cluster_fold(demo_root, tmp_path, crop_cache):
    from data_prep.cluster_split import fold_samples, random_folds, write_folds
    from data_prep.dataset import load_splits

    splits = load_splits(demo_root)
    pool = splits["trainset"] + splits["valset"]
    names, targets = [s.name for s in pool], np.array([s.target for s in pool])
    folds_csv = write_folds(tmp_path / "folds", names, targets, random_folds(names, targets, 3, seed=0))
    overrides = tiny_overrides(tmp_path, epochs=1, experts="convnext", cache_dir=crop_cache)
    assert experts_train.main([str(demo_root), *overrides, f"data.folds_csv={folds_csv}", "data.fold=1"]) == 0

    manifest = json.loads((tmp_path / "weights" / MANIFEST).read_text())
    assert list(manifest["experts"]) == ["convnext_fold1"]
    train, val = fold_samples(pool, folds_csv, 1)
    data = manifest["experts"]["convnext_fold1"]["training"]["data"]
    assert data["valset"]["n"] == len(val) and data["trainset"]["n"] == len(train)
    assert not {s.name for s in train} & {s.name for s in val}


def test_real_only_expert_never_sees_an_editing_fake(demo_root, tmp_path, crop_cache, monkeypatch):
    from experts.dae import DenoisingAutoencoderExpert

    seen = []
    original = DenoisingAutoencoderExpert.training_loss

    def recording(self, x, y, loss_cfg):
        seen.extend(y.tolist())
        return original(self, x, y, loss_cfg)

    monkeypatch.setattr(DenoisingAutoencoderExpert, "training_loss", recording)
    overrides = tiny_overrides(tmp_path, epochs=1, experts="dae", cache_dir=crop_cache)
    assert experts_train.main([str(demo_root), *overrides, "data.online_fakes=1.0"]) == 0
    assert seen and set(seen) == {0}


def test_real_only_expert_also_trains_on_extra_reals(demo_root, tmp_path, crop_cache, monkeypatch):
    from experts.dae import DenoisingAutoencoderExpert

    extra = tmp_path / "more_reals"
    extra.mkdir()
    for i, path in enumerate(sorted((demo_root / "valset").iterdir())[:12]):
        (extra / f"extra_{i}{path.suffix}").write_bytes(path.read_bytes())
    seen = []
    original = DenoisingAutoencoderExpert.training_loss

    def recording(self, x, y, loss_cfg):
        seen.append(len(y))
        return original(self, x, y, loss_cfg)

    monkeypatch.setattr(DenoisingAutoencoderExpert, "training_loss", recording)
    overrides = tiny_overrides(tmp_path, epochs=1, experts="dae", cache_dir=crop_cache)
    assert experts_train.main([str(demo_root), *overrides]) == 0
    alone = sum(seen)
    seen.clear()
    assert experts_train.main([str(demo_root), *overrides, f"data.extra_reals=[{extra}]"]) == 0
    batch_size = int(next(o for o in overrides if o.startswith("train.batch_size=")).split("=")[1])
    assert sum(seen) >= alone + 12 - batch_size  # every extra real, up to the dropped last batch


def test_extra_reals_entry_must_hold_reals(tmp_path):
    from data_prep.dataset import DataLayoutError, read_extra_reals

    with pytest.raises(DataLayoutError, match="not a directory"):
        read_extra_reals(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataLayoutError, match="no real images"):
        read_extra_reals(tmp_path / "empty")


def test_infer_scores_a_folder_of_videos(trained, tmp_path, capsys):
    import cv2

    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("a.mp4", "b.mp4"):
        writer = cv2.VideoWriter(str(folder / name), cv2.VideoWriter_fourcc(*"mp4v"), 10, (96, 96))
        rng = np.random.default_rng(len(name))
        for _ in range(12):
            writer.write(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
        writer.release()
    out = tmp_path / "videos.csv"
    assert infer.main([str(folder), "--csv", str(out), "--weights", str(trained["weights"]), "--frames", "4"]) == 0
    header, *rows = out.read_text().splitlines()
    assert header == "video_name,y_pred" and [r.split(",")[0] for r in rows] == ["a.mp4", "b.mp4"]
    assert all(0 <= float(r.split(",")[1]) <= 1 for r in rows)

    assert infer.main([str(folder / "a.mp4"), "--weights", str(trained["weights"]), "--frames", "4"]) == 0
    assert re.fullmatch(r"Prediction of \[.*a\.mp4\] being Deepfake: \d\.\d{6}\n", capsys.readouterr().out)


def test_training_with_bf16_autocast_on_cpu(demo_root, tmp_path, crop_cache):
    overrides = tiny_overrides(tmp_path, epochs=1, experts="convnext", cache_dir=crop_cache)
    assert experts_train.main([str(demo_root), *overrides, "train.amp=bf16"]) == 0
    state = load_file(str(tmp_path / "weights" / "convnext.safetensors"))
    assert all(torch.isfinite(t.float()).all() for t in state.values())
