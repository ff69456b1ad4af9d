"""An expert's own share of editing fakes (`expert.<name>.online_fakes`), else `data.online_fakes`."""
import pytest

from common.errors import ConfigError
from configs import ExpertConfig, load_config, online_fakes_of
from experts import train as experts_train
from experts.base import check_expert_config
from helpers import tiny_overrides


def test_an_expert_takes_its_own_share_or_else_the_datas():
    cfg = load_config("cpu", ["data.online_fakes=0.2"])
    assert online_fakes_of(cfg, ExpertConfig()) == 0.2
    assert online_fakes_of(cfg, ExpertConfig(online_fakes=0.0)) == 0.0
    assert online_fakes_of(cfg, ExpertConfig(online_fakes=0.5)) == 0.5


@pytest.mark.parametrize("share", [1.5, -0.5])
def test_a_share_outside_0_to_1_is_an_error_naming_the_key(share):
    with pytest.raises(ConfigError, match=rf"expert\.mouth\.online_fakes: {share}"):
        check_expert_config(ExpertConfig(kind="resnet", online_fakes=share), "mouth")


def test_the_trainer_makes_each_expert_its_own_share(demo_root, tmp_path, crop_cache, monkeypatch):
    shares = []
    build = experts_train.FaceCropDataset

    def recording(samples, crops, size, cfg, train, **kwargs):
        if train:
            shares.append(kwargs.get("online_fakes"))
        return build(samples, crops, size, cfg, train, **kwargs)

    monkeypatch.setattr(experts_train, "FaceCropDataset", recording)
    args = tiny_overrides(tmp_path, epochs=1, experts="convnext,resnet", cache_dir=crop_cache) + [
        "data.online_fakes=0.5", "expert.resnet.online_fakes=0"]
    assert experts_train.main([str(demo_root)] + args) == 0
    assert shares == [0.5, 0.0]
