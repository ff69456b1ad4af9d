"""Per-expert losses (`expert.<name>.loss`): the config that selects them, its errors, and the
trainer that gives each expert its own."""
import json

import pytest

from common.errors import ConfigError
from configs import load_config
from configs.settings import expert_settings
from experts import train as experts_train
from experts.base import check_expert_config
from experts.weights import MANIFEST
from helpers import tiny_overrides


def test_an_expert_trains_with_its_own_loss_values_over_the_shared_ones():
    cfg = load_config("cpu", ["loss.nce=0.2", "expert.forensic.loss.kl=1", "expert.forensic.loss.kl_noise_std=0.1"])
    own = expert_settings(cfg, "forensic").loss
    assert (own.kl, own.kl_noise_std, own.nce) == (1.0, 0.1, 0.2) and isinstance(own.kl, float)
    assert expert_settings(cfg, "resnet").loss == cfg.loss  # no values of its own
    assert cfg.loss.kl == 0.0 and cfg.loss.kl_noise_std == 0.05  # the shared values are not touched


@pytest.mark.parametrize("override,named", [
    ("expert.forensic.loss.kl_veiw=1", "expert.forensic.loss.kl_veiw"),
    ("expert.forensic.loss.kl=strong", "expert.forensic.loss.kl"),
])
def test_a_bad_expert_loss_is_an_error_naming_it(override, named):
    cfg = load_config("cpu", [override])
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        check_expert_config(cfg.expert["forensic"], "forensic")  # the trainer's check before any data is read


def test_the_trainer_gives_each_expert_its_own_losses(demo_root, tmp_path, crop_cache):
    """expert.forensic.loss: the forensic expert trains with the KL term (its history logs it),
    the resnet beside it with the shared losses (CE alone, no KL logged)."""
    overrides = tiny_overrides(tmp_path, epochs=1, experts="forensic,resnet", cache_dir=crop_cache) + [
        "expert.forensic.epochs=1", "expert.forensic.loss.kl=1"]
    assert experts_train.main([str(demo_root)] + overrides) == 0
    trained = json.loads((tmp_path / "weights" / MANIFEST).read_text())["experts"]
    (forensic_epoch,), (resnet_epoch,) = (trained[name]["training"]["history"] for name in ("forensic", "resnet"))
    assert forensic_epoch["train_kl"] > 0 and "train_kl" not in resnet_epoch
