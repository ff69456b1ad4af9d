"""An expert's own share of editing fakes (`expert.<name>.online_fakes`), else `data.online_fakes`."""
import pytest

from common.errors import ConfigError
from configs import ExpertConfig, load_config
from configs.settings import expert_settings
from experts import train as experts_train
from experts.base import check_expert_config
from helpers import tiny_overrides


def test_an_expert_takes_its_own_share_or_else_the_datas():
    cfg = load_config("cpu", ["data.online_fakes=0.2", "expert.a.kind=timm", "expert.none.online_fakes=0",
                              "expert.half.online_fakes=0.5"])
    assert [expert_settings(cfg, name).data.online_fakes for name in ("a", "none", "half")] == [0.2, 0.0, 0.5]


@pytest.mark.parametrize("share", [1.5, -0.5])
def test_a_share_outside_0_to_1_is_an_error_naming_the_key(share):
    with pytest.raises(ConfigError, match=rf"expert\.mouth\.online_fakes: {share}"):
        check_expert_config(ExpertConfig(kind="resnet", online_fakes=share), "mouth")


def test_the_trainer_makes_each_expert_its_own_share(demo_root, tmp_path, crop_cache, monkeypatch):
    shares = []
    build = experts_train.FaceCropDataset

    def recording(samples, crops, settings, train, **kwargs):
        if train:
            shares.append(settings.data.online_fakes)
        return build(samples, crops, settings, train, **kwargs)

    monkeypatch.setattr(experts_train, "FaceCropDataset", recording)
    args = tiny_overrides(tmp_path, epochs=1, experts="convnext,resnet", cache_dir=crop_cache) + [
        "data.online_fakes=0.5", "expert.resnet.online_fakes=0"]
    assert experts_train.main([str(demo_root)] + args) == 0
    assert shares == [0.5, 0.0]


def test_train_on_reals_learns_from_the_reals_and_their_editing_fakes_only(demo_root, tmp_path, crop_cache,
                                                                            monkeypatch):
    """`train_on: reals` (self-blended images): the expert's training samples are the trainset's
    reals, drawn as a permutation (one class), and a share of them becomes editing fakes."""
    seen = {}
    build = experts_train.FaceCropDataset

    def recording(samples, crops, settings, train, **kwargs):
        if train:
            seen.setdefault("targets", []).append(sorted({s.target for s in samples}))
            seen.setdefault("shares", []).append(settings.data.online_fakes)
        return build(samples, crops, settings, train, **kwargs)

    monkeypatch.setattr(experts_train, "FaceCropDataset", recording)
    args = tiny_overrides(tmp_path, epochs=1, experts="convnext,resnet", cache_dir=crop_cache) + [
        "expert.resnet.train_on=reals", "expert.resnet.online_fakes=0.5"]
    assert experts_train.main([str(demo_root)] + args) == 0
    assert seen["targets"] == [[0, 1], [0]] and seen["shares"][1] == 0.5


@pytest.mark.parametrize("settings,message", [
    ({"train_on": "fakes"}, "train_on: .fakes. is not one of"),
    ({"train_on": "reals", "online_fakes": 0.0}, "train_on: reals needs editing"),
])
def test_train_on_errors_name_the_key(settings, message):
    with pytest.raises(ConfigError, match=rf"expert\.sbi\.{message}"):
        check_expert_config(ExpertConfig(kind="timm", **settings), "sbi")


def test_train_on_reals_without_any_editing_fakes_is_one_line(demo_root, tmp_path, crop_cache, capsys):
    args = tiny_overrides(tmp_path, epochs=1, experts="resnet", cache_dir=crop_cache) + [
        "data.online_fakes=0", "expert.resnet.train_on=reals"]  # the share inherited from data.online_fakes
    assert experts_train.main([str(demo_root)] + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: expert.resnet.train_on: reals needs editing fakes") and err.count("\n") == 1
