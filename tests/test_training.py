"""The trainer beyond the round trip: exact resume, every expert kind through the one loop,
paired fakes, cluster folds, reals-only experts, bf16."""
import json
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from configs import ConfigError
from configs.settings import expert_settings
from data_prep.loaders import FaceCropDataset
from experts import train as experts_train
from experts.weights import MANIFEST, load_expert
from helpers import cpu_run_overrides, settings_of, tiny_overrides

# ---------------------------------------------------------------- resume

@pytest.mark.parametrize("extra", [[], ["train.grad_accum=3"],
                                   ["expert.convnext.swa_fraction=0.7"],
                                   ["expert.convnext.boundary_loss=1", "data.online_fakes=0.5"]],
                         ids=["plain", "grad_accum3", "swa", "boundary"])
def test_resume_equals_uninterrupted(demo_root, tmp_path, crop_cache, extra):
    """4 batches per epoch; with grad_accum=3 an epoch ends inside an accumulation window; with
    swa the run stops inside the averaged epochs (2 and 3); with boundary the expert also learns
    the editing fakes' blending boundaries (its head is part of the exported weights)."""
    common = ["experts=convnext", "train.epochs=3", "data.num_workers=0"] + extra
    run_a = tiny_overrides(tmp_path / "a", epochs=3, cache_dir=crop_cache) + common
    run_b = tiny_overrides(tmp_path / "b", epochs=3, cache_dir=crop_cache) + common
    assert experts_train.main([str(demo_root)] + run_a) == 0

    original = experts_train.save_checkpoint
    calls = []

    def interrupted_after_epoch_2(*args, **kwargs):
        original(*args, **kwargs)
        calls.append(args[1])  # epoch (0-based)
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
    boundary = "expert.convnext.boundary_loss=1" in extra
    assert ("train_boundary" in ha[0]) == boundary and any(k.startswith("boundary_head.") for k in a) == boundary

    # resuming a finished run trains nothing more and exports the same weights again
    with mock.patch.object(experts_train, "save_checkpoint", side_effect=AssertionError("trained again")):
        assert experts_train.main([str(demo_root)] + run_b + ["resume=true"]) == 0
    c = load_file(str(tmp_path / "b" / "weights" / "convnext.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("setting,message", [("expert.resnet.swa_fraction=1.5", "swa_fraction: 1.5 is not a fraction"),
                                             ("expert.resnet.boundary_loss=-1", "boundary_loss: -1.0 is negative"),
                                             ("expert.forensic.boundary_loss=1", "boundary_loss: the 'forensic'")])
def test_a_bad_weighting_setting_stops_before_reading_any_data(tmp_path, capsys, setting, message):
    assert experts_train.main([str(tmp_path / "no_data"), "experts=[resnet,forensic]", setting]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: expert.{setting.split('.')[1]}.{message}") and err.count("\n") == 1


def test_other_experts_train_export_and_reload(demo_root, tmp_path, crop_cache):
    """efficientnet and clip (cpu recipe: trainable=all) through the same trainer, one epoch;
    the reloaded expert predicts exactly what the trainer validated (in float32, as it trained:
    `auto` inference precision may be bf16 on this machine)."""
    overrides = tiny_overrides(tmp_path, epochs=1, experts="efficientnet,clip", cache_dir=crop_cache)
    assert experts_train.main([str(demo_root)] + overrides) == 0
    manifest = json.loads((tmp_path / "weights" / MANIFEST).read_text())
    assert set(manifest["experts"]) == {"efficientnet", "clip"}
    from data_prep.dataset import load_splits
    from ensemble.predictor import EnsembleDetector, score_samples
    val = load_splits(demo_root)["valset"]
    for name in ("efficientnet", "clip"):
        detector = EnsembleDetector.from_weights(tmp_path / "weights", [name], device="cpu", precision="fp32")
        p, _, errors = score_samples(detector, [s.path for s in val])
        assert not errors
        saved = json.loads((tmp_path / "runs" / name / "val_scores.json").read_text())
        np.testing.assert_allclose(p, [saved[s.name] for s in val], atol=1e-5)


def test_native_resolution_experts_and_landmark_fakes(demo_root, tmp_path, crop_cache):
    """mesonet, forensic and a resnet, and editing fakes blended along dlib landmarks: all
    through the one trainer, reloaded exact."""
    overrides = tiny_overrides(tmp_path, epochs=1, experts="mesonet,forensic,resnet", cache_dir=crop_cache)
    overrides += ["data.online_fakes=0.5", "data.fake_masks=landmarks"]
    assert experts_train.main([str(demo_root)] + overrides) == 0
    from data_prep.dataset import load_splits
    from ensemble.predictor import EnsembleDetector, score_samples
    val = load_splits(demo_root)["valset"]
    for name in ("mesonet", "forensic", "resnet"):
        detector = EnsembleDetector.from_weights(tmp_path / "weights", [name], device="cpu", precision="fp32")
        p, _, errors = score_samples(detector, [s.path for s in val])
        assert not errors
        saved = json.loads((tmp_path / "runs" / name / "val_scores.json").read_text())
        np.testing.assert_allclose(p, [saved[s.name] for s in val], atol=1e-5)
    assert list(crop_cache.glob("faces_*/*.landmarks.npy"))  # landmarks were fitted and cached


def test_reals_only_valset_is_paired_with_fixed_editing_fakes(demo_root):
    from configs import load_config
    from data_prep.dataset import load_splits
    from data_prep.faces import FaceCropCache

    cfg = load_config("cpu", ["face.crop_size=48", "data.cache_dir="])
    reals = [s for s in load_splits(demo_root)["valset"] if s.target == 0][:3]
    ds = FaceCropDataset(reals, FaceCropCache(cfg.face, None), settings_of(cfg, 48), train=False, paired_fakes=True)
    assert len(ds) == 6 and [ds[i][1] for i in range(6)] == [0, 0, 0, 1, 1, 1]
    assert torch.equal(ds[4][0], ds[4][0]) and not torch.equal(ds[1][0], ds[4][0])


def test_an_expert_makes_its_own_editing_fakes(demo_root, tmp_path, crop_cache, monkeypatch):
    """expert.<name>.online_fake_ops replaces data.online_fake_ops for that expert's training
    (and its reals-only validation fakes), and the other experts keep the data's ops."""
    import data_prep.manipulations as manipulations
    from common.errors import UnknownNameError
    from configs import load_config
    from data_prep.dataset import load_splits
    from data_prep.faces import FaceCropCache

    asked = []
    original = manipulations.fake_from_face_crop

    def recording(crop, rng, donor, margin, names=None, landmarks=None):
        asked.append(names)
        return original(crop, rng, donor, margin, names, landmarks)

    monkeypatch.setattr(manipulations, "fake_from_face_crop", recording)
    overrides = tiny_overrides(tmp_path, epochs=1, experts="forensic,mesonet", cache_dir=crop_cache) + [
        "data.online_fakes=1.0", "data.online_fake_ops=[color_mismatch]", "expert.forensic.online_fake_ops=[splice]",
        "expert.forensic.epochs=1", "expert.mesonet.epochs=1", "data.fake_masks=ellipse"]
    assert experts_train.main([str(demo_root), *overrides]) == 0
    assert ["splice"] in asked and ["color_mismatch"] in asked and all(a in (["splice"], ["color_mismatch"])
                                                                      for a in asked)
    cfg = load_config("cpu", ["face.crop_size=48", "data.cache_dir=", "expert.forensic.online_fake_ops=[splce]"])
    with pytest.raises(UnknownNameError, match="splce"):
        FaceCropDataset(load_splits(demo_root)["trainset"], FaceCropCache(cfg.face, None),
                        expert_settings(cfg, "forensic"), train=True)


def test_an_expert_trains_with_its_own_augmentations(demo_root, tmp_path, crop_cache, monkeypatch):
    """expert.<name>.augment values replace the shared augment.* ones for that expert's
    training crops; the other experts keep the shared ones."""
    import data_prep.loaders as loaders
    from configs import load_config
    from data_prep.dataset import load_splits
    from data_prep.faces import FaceCropCache

    cfg = load_config("cpu", ["face.crop_size=48", "data.cache_dir=", "data.online_fakes=0", "augment.hflip=0",
                              "augment.color=0"])
    samples, crops = load_splits(demo_root)["trainset"][:2], FaceCropCache(cfg.face, None)
    plain = FaceCropDataset(samples, crops, settings_of(cfg, 48), train=True)
    flipped = FaceCropDataset(samples, crops, settings_of(cfg, 48, augment={"hflip": 1.0}), train=True)
    assert torch.equal(flipped[0][0], plain[0][0].flip(-1))

    used, original = [], loaders.train_augmentations

    def recording(augment, size):
        used.append(augment)
        return original(augment, size)

    monkeypatch.setattr(loaders, "train_augmentations", recording)
    overrides = tiny_overrides(tmp_path, epochs=1, experts="forensic,mesonet", cache_dir=crop_cache) + [
        "expert.forensic.epochs=1", "expert.mesonet.epochs=1", "data.fake_masks=ellipse", "augment.jpeg=0",
        "expert.mesonet.augment.jpeg=1.0", "expert.mesonet.augment.jpeg_quality_min=80"]
    assert experts_train.main([str(demo_root), *overrides]) == 0
    shared = load_config("cpu").augment.jpeg_quality_min
    assert [(a.jpeg, a.jpeg_quality_min) for a in used] == [(0.0, shared), (1.0, 80)]  # forensic's, then mesonet's


def test_cutout_reaches_the_training_crops(tmp_path):
    """augment.cutout: 1 blacks out a facial part of every training crop (found by the crop's
    landmarks), never of a validation crop; 0 leaves the crops as they were."""
    import skimage.data
    from PIL import Image

    from configs import load_config
    from data_prep.dataset import Sample
    from data_prep.faces import FaceCropCache

    path = tmp_path / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(path)
    samples = [Sample(path, 0)]

    def crop(cutout: float, train: bool = True):
        cfg = load_config("cpu", ["face.enabled=false", "face.fallback=full", "face.crop_size=256",
                                  "face.shrink=resize", "data.cache_dir=", "data.online_fakes=0", "augment.hflip=0",
                                  "augment.color=0", f"augment.cutout={cutout}"])
        return FaceCropDataset(samples, FaceCropCache(cfg.face, None), settings_of(cfg, 256), train=train)[0][0]

    plain, erased = crop(0.0), crop(1.0)
    black = (erased == 0).all(dim=0) & (plain != 0).any(dim=0)
    assert black.sum() > 100
    assert torch.equal(erased[:, ~black], plain[:, ~black])
    assert torch.equal(crop(1.0, train=False), crop(0.0, train=False))


def test_training_on_a_cluster_fold(demo_root, tmp_path, crop_cache):
    from data_prep.dataset import load_splits
    from data_prep.folds import fold_samples, random_folds, write_folds

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


def test_training_with_bf16_autocast_on_cpu(demo_root, tmp_path, crop_cache):
    overrides = tiny_overrides(tmp_path, epochs=1, experts="convnext", cache_dir=crop_cache)
    assert experts_train.main([str(demo_root), *overrides, "train.amp=bf16"]) == 0
    state = load_file(str(tmp_path / "weights" / "convnext.safetensors"))
    assert all(torch.isfinite(t.float()).all() for t in state.values())
    manifest = json.loads((tmp_path / "weights" / MANIFEST).read_text())
    assert manifest["experts"]["convnext"]["training"]["hardware"]["precision"] == "bfloat16"


def test_a_new_timm_backbone_is_a_yaml_change(demo_root, tmp_path, crop_cache):
    """An expert the code has never heard of, defined in a profile file alone (kind `timm`,
    any timm model: here timm's tiny ByobNet), trains, exports, reloads to the scores the
    trainer validated, and has its Grad-CAM layer, looked up in timm's feature_info."""
    from data_prep.dataset import load_splits
    from ensemble.gradcam import grad_cam
    from ensemble.predictor import EnsembleDetector, score_samples

    profile = tmp_path / "mine.yaml"
    profile.write_text("experts: [byob]\n"
                       "expert:\n"
                       "  byob:\n"
                       "    kind: timm\n"
                       "    model: test_byobnet\n"
                       "    input_filter: srm\n")
    overrides = cpu_run_overrides(tmp_path, crop_cache) + ["data.image_size=64", "face.crop_size=80",
                                                          "train.batch_size=16", "train.epochs=1"]
    assert experts_train.main([str(demo_root), f"profile={profile}", *overrides]) == 0

    manifest = json.loads((tmp_path / "weights" / MANIFEST).read_text())
    assert manifest["experts"]["byob"]["kind"] == "timm"
    val = load_splits(demo_root)["valset"]
    detector = EnsembleDetector.from_weights(tmp_path / "weights", ["byob"], device="cpu", precision="fp32")
    p, _, errors = score_samples(detector, [s.path for s in val])
    saved = json.loads((tmp_path / "runs" / "byob" / "val_scores.json").read_text())
    assert not errors
    np.testing.assert_allclose(p, [saved[s.name] for s in val], atol=1e-5)

    expert, _ = load_expert(tmp_path / "weights", "byob")
    layer = expert.gradcam_layer()
    assert layer is expert.backbone.get_submodule(expert.backbone.feature_info[-1]["module"])
    heatmaps = grad_cam(expert, layer, torch.rand(2, 3, 64, 64), class_index=1)
    assert heatmaps.shape == (2, 64, 64) and np.isfinite(heatmaps).all()


def test_amp_auto_is_bf16_only_where_native(monkeypatch):
    """train.amp=auto: bf16 on a CPU with bf16 units, fp32 on one without (emulated bf16 is
    slower than fp32); off and an explicit bf16 mean what they say."""
    from common import runtime

    cpu = torch.device("cpu")
    for native, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(runtime, "native_bf16", lambda device, native=native: native)
        assert runtime.mixed_precision("auto", cpu) == (expected, False)
        assert runtime.mixed_precision("off", cpu) == (None, False)
        assert runtime.mixed_precision("bf16", cpu) == (torch.bfloat16, False)
    with pytest.raises(ConfigError, match="train.amp"):
        runtime.mixed_precision("fp8", cpu)
