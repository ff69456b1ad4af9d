"""One resolved settings object per expert (configs.settings.expert_settings): a global key
reaches every expert that does not set its own, an expert's own value wins, the "unset"
markers of older profiles and manifests read as unset, and the manifest records the settings."""
import dataclasses
import json
from functools import reduce

import pytest

from configs import ExpertConfig, from_dict, load_config, to_dict
from configs.settings import expert_settings
from experts import create_expert
from experts import train as experts_train
from experts.weights import MANIFEST, load_expert, save_expert
from helpers import tiny_overrides

# (global key, its value, the expert's own key, the expert's own value); the settings hold the
# value where the global key names it (`seed`, `train.epochs`, `augment.jpeg`, ...)
KEYS = [
    ("train.epochs", 7, "epochs", 3),
    ("train.lr", 0.01, "lr", 0.002),
    ("data.image_size", 96, "image_size", 160),
    ("data.online_fakes", 0.4, "online_fakes", 0.0),
    ("data.online_fake_ops", ["color_mismatch"], "online_fake_ops", ["splice"]),
    ("seed", 5, "seed", 0),
    ("augment.jpeg", 0.5, "augment.jpeg", 0.0),
    ("loss.kl", 0.3, "loss.kl", 1.0),
]
LEGACY_UNSET = {"image_size": 0, "epochs": 0, "lr": 0.0, "seed": -1, "online_fakes": -1.0, "online_fake_ops": []}


def override(key: str, value) -> str:
    return f"{key}=[{','.join(value)}]" if isinstance(value, list) else f"{key}={value}"


def resolved(settings, key: str):
    return reduce(getattr, key.split("."), settings)


def own_value(ecfg: ExpertConfig, key: str):
    section, _, name = key.rpartition(".")
    return getattr(ecfg, section).get(name) if section else getattr(ecfg, key)


@pytest.mark.parametrize("key,value,own_key,own", KEYS, ids=[k[0] for k in KEYS])
@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_a_global_key_reaches_every_expert_that_does_not_set_its_own(profile, key, value, own_key, own):
    cfg = load_config(profile, [override(key, value)])
    took_global = 0
    for name, ecfg in cfg.expert.items():
        expected = value if own_value(ecfg, own_key) is None else own_value(ecfg, own_key)
        assert resolved(expert_settings(cfg, name), key) == expected, name
        took_global += own_value(ecfg, own_key) is None
    assert took_global


@pytest.mark.parametrize("key,value,own_key,own", KEYS, ids=[k[0] for k in KEYS])
def test_an_experts_own_value_wins(key, value, own_key, own):
    cfg = load_config("cpu", [override(key, value), override(f"expert.convnext.{own_key}", own)])
    assert resolved(expert_settings(cfg, "convnext"), key) == own
    assert resolved(expert_settings(cfg, "efficientnet"), key) == value  # beside it, nothing of its own
    assert resolved(cfg, key) == value  # the global sections are copied, never changed


def test_the_settings_are_the_experts_entry_over_copies_of_the_global_sections():
    cfg = load_config("cpu")
    settings = expert_settings(cfg, "forensic")
    assert settings.name == "forensic" and settings.expert == cfg.expert["forensic"]
    assert (settings.data.image_size, settings.train.epochs, settings.train.lr) == (256, 7, 0.002)
    assert settings.data.online_fake_ops == ["splice"] and settings.augment.jpeg == 0.0
    assert settings.face == cfg.face and settings.train.batch_size == cfg.train.batch_size
    settings.data.methods.append("Deepfakes")
    settings.expert.online_fake_ops.append("blend")
    settings.face.margin = 0.5
    assert cfg.data.methods == [] and cfg.expert["forensic"].online_fake_ops == ["splice"] and cfg.face.margin == 0.3


def test_the_legacy_unset_markers_read_as_unset(tmp_path):
    """0, -1 and [] meant "the global value" in profiles and manifests written before None did."""
    assert all(getattr(ExpertConfig(**LEGACY_UNSET), key) is None for key in LEGACY_UNSET)
    profile = tmp_path / "old.yaml"
    profile.write_text("seed: 4\nexperts: [old]\nexpert:\n  old:\n    kind: resnet\n" +
                       "".join(f"    {key}: {value}\n" for key, value in LEGACY_UNSET.items()))
    from_yaml = load_config(str(profile), ["data.online_fakes=0.3"])
    from_overrides = load_config("cpu", [override(f"expert.convnext.{key}", value) if value != []
                                         else f"expert.convnext.{key}=" for key, value in LEGACY_UNSET.items()])
    for cfg, name in ((from_yaml, "old"), (from_overrides, "convnext")):
        assert all(getattr(cfg.expert[name], key) is None for key in LEGACY_UNSET)
        recorded = to_dict(cfg)  # a manifest's config, as one written before None read "unset"
        recorded["expert"][name].update(LEGACY_UNSET)
        assert from_dict(recorded) == cfg
        settings = expert_settings(cfg, name)
        assert (settings.seed, settings.train.epochs, settings.data.online_fakes) == \
               (cfg.seed, cfg.train.epochs, cfg.data.online_fakes)


@pytest.mark.parametrize("null", ["null", "none", "None"])
def test_null_unsets_an_experts_own_value(null):
    cfg = load_config("cpu", [f"expert.forensic.epochs={null}", f"expert.forensic.online_fake_ops={null}"])
    assert cfg.expert["forensic"].epochs is None and cfg.expert["forensic"].online_fake_ops is None
    assert expert_settings(cfg, "forensic").train.epochs == cfg.train.epochs


def test_an_old_manifest_entry_with_the_legacy_markers_and_no_settings_loads(tmp_path):
    save_expert(create_expert(ExpertConfig(kind="resnet", model="test_resnet"), 64), tmp_path, "old",
                load_config("cpu").face, {})
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert "settings" not in manifest["experts"]["old"]  # saved without: as before
    manifest["experts"]["old"]["expert_config"].update(LEGACY_UNSET)
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    model, _ = load_expert(tmp_path, "old")
    assert all(getattr(model.cfg, key) is None for key in LEGACY_UNSET)


def test_the_manifest_records_each_experts_settings(demo_root, tmp_path, crop_cache):
    overrides = tiny_overrides(tmp_path, epochs=1, experts="convnext,dae", cache_dir=crop_cache) + [
        "seed=4", "expert.convnext.seed=9", "augment.jpeg=0.5", "data.online_fakes=0.25"]
    assert experts_train.main([str(demo_root), *overrides]) == 0
    entries = json.loads((tmp_path / "weights" / MANIFEST).read_text())["experts"]
    cfg = load_config("cpu", overrides)
    assert entries["convnext"]["settings"] == dataclasses.asdict(expert_settings(cfg, "convnext"))
    convnext, dae = entries["convnext"]["settings"], entries["dae"]["settings"]
    assert (convnext["seed"], dae["seed"]) == (9, 4)
    assert convnext["data"]["image_size"] == dae["data"]["image_size"] == 64 and convnext["augment"]["jpeg"] == 0.5
    assert convnext["data"]["online_fakes"] == 0.25
    assert dae["data"]["online_fakes"] == 0.0  # a reals-only expert trains without editing fakes
