"""An expert's own seed (`expert.<name>.seed`): the same settings trained again under another
seed, a second member of a seed ensemble, exactly as a whole run under that seed trains it."""
import dataclasses
import json

import pytest
from safetensors.torch import load_file

from common.errors import ConfigError
from configs import ExpertConfig, load_config
from configs.settings import expert_settings
from experts import train as experts_train
from experts.base import check_expert_config
from experts.weights import MANIFEST
from helpers import tiny_overrides

# a second resnet-kind expert, defined entirely on the command line
SECOND = ["expert.second.kind=resnet", "expert.second.model=test_resnet", "expert.second.epochs=1",
          "expert.second.image_size=64"]


def test_an_expert_trains_under_its_own_seed_or_else_the_runs():
    cfg = load_config("cpu", ["seed=3", "expert.net.kind=resnet", "expert.zero.seed=0", "expert.seven.seed=7"])
    assert [expert_settings(cfg, name).seed for name in ("net", "zero", "seven")] == [3, 0, 7]


def test_a_negative_seed_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"expert\.second\.seed: -2"):
        check_expert_config(ExpertConfig(kind="resnet", seed=-2), "second")


def trained_weights(demo_root, tmp_path, crop_cache, overrides):
    args = tiny_overrides(tmp_path, epochs=1, experts="second", cache_dir=crop_cache) + SECOND + overrides
    assert experts_train.main([str(demo_root)] + args) == 0
    manifest = json.loads((tmp_path / "weights" / MANIFEST).read_text())
    return load_file(tmp_path / "weights" / "second.safetensors"), manifest


def test_its_own_seed_trains_what_a_run_under_that_seed_trains(demo_root, tmp_path, crop_cache):
    own, manifest = trained_weights(demo_root, tmp_path / "own", crop_cache, ["expert.second.seed=1"])
    whole_run, _ = trained_weights(demo_root, tmp_path / "run", crop_cache, ["seed=1"])
    default, _ = trained_weights(demo_root, tmp_path / "default", crop_cache, [])
    assert own.keys() == whole_run.keys() == default.keys()
    assert all((own[k] == whole_run[k]).all() for k in own)  # initial weights, sample order, augmentations
    assert any((own[k] != default[k]).any() for k in own)
    # the manifest records the expert's seed in its settings, the run's seed in the run's config
    assert manifest["experts"]["second"]["expert_config"]["seed"] == 1
    assert manifest["config"]["seed"] == 0


def test_a_yaml_anchor_makes_a_section_a_seed_twin_of_another(tmp_path):
    """The README's recipe for a seed ensemble in a profile: `<<: *anchor` plus its own seed."""
    profile = tmp_path / "twin.yaml"
    profile.write_text("experts: [net, net_seed1]\nexpert:\n  net: &net\n    kind: resnet\n"
                       "    model: test_resnet\n    epochs: 3\n    model_args: {channels: [8, 8, 8, 8]}\n"
                       "  net_seed1:\n    <<: *net\n    seed: 1\n")
    cfg = load_config(str(profile))
    assert cfg.expert_config("net_seed1") == dataclasses.replace(cfg.expert_config("net"), seed=1)
    assert cfg.expert_config("net").seed is None
