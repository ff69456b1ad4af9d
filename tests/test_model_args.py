"""`expert.<name>.model_args`: more keyword arguments of timm.create_model (a narrower
network, stochastic depth, ...), typed as YAML reads them, recorded in the manifest so the
weights load back into the same architecture."""
import pytest
import torch

from common.errors import ConfigError
from configs import ExpertConfig, FaceConfig, load_config
from experts import create_expert
from experts.base import check_expert_config
from experts.weights import load_expert, save_expert

NARROW = [16, 16, 24, 40]  # test_resnet's own stage widths are 32, 48, 48, 96


def test_model_args_overrides_keep_yaml_types():
    cfg = load_config("cpu", ["expert.resnet.model_args.drop_path_rate=0.1",
                              "expert.resnet.model_args.channels=[16,16,24,40]",
                              "expert.resnet.model_args.zero_init_last=false"])
    assert cfg.expert_config("resnet").model_args == {"drop_path_rate": 0.1, "channels": NARROW,
                                                      "zero_init_last": False}
    cpu = load_config("cpu")
    assert cpu.expert_config("resnet").model_args == {}  # the profile's resnet10t at its full width
    assert cpu.expert_config("dae").model_args == {}


def test_narrower_backbone_exports_and_loads_back_strictly(tmp_path):
    torch.manual_seed(0)
    ecfg = ExpertConfig(kind="resnet", model="test_resnet", input_filter="srm", model_args={"channels": NARROW})
    expert = create_expert(ecfg, 64)
    assert expert.backbone.num_features == NARROW[-1]
    assert expert.parameter_counts()[0] < create_expert(ExpertConfig(kind="resnet", model="test_resnet"),
                                                        64).parameter_counts()[0]
    save_expert(expert.eval(), tmp_path, "narrow", FaceConfig(), {})
    loaded, entry = load_expert(tmp_path, "narrow")
    assert entry["expert_config"]["model_args"] == {"channels": NARROW}
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), expert(x))


@pytest.mark.parametrize("model_args, message", [
    ({"no_such_argument": 1}, "not accepted by timm model 'test_resnet'"),
    ({"in_chans": 3}, r"model_args \['in_chans'\]: set by the expert itself"),
])
def test_bad_model_args_are_one_line_config_errors(model_args, message):
    with pytest.raises(ConfigError, match=message) as err:
        create_expert(ExpertConfig(kind="resnet", model="test_resnet", model_args=model_args), 64)
    assert "\n" not in str(err.value)


def test_a_kind_without_a_timm_backbone_refuses_model_args():
    cfg = load_config("cpu", ["expert.forensic.model_args.channels=[8]"])
    with pytest.raises(ConfigError, match="expert.forensic.model_args: the 'forensic' expert kind does not use"):
        check_expert_config(cfg.expert_config("forensic"), "forensic")  # the trainer's check, before any data
