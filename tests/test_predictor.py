"""EnsembleDetector: test-time augmentation views, the feature columns the stacker sees, and
the precision of the experts' forward passes."""
import numpy as np
import pytest
import torch

from common.errors import UsageError
from configs import ExpertConfig, FaceConfig
from ensemble import predictor
from ensemble.predictor import EnsembleDetector, resolve_precision, tta_views
from experts import create_expert


def test_tta_views():
    x = torch.rand(2, 3, 32, 32)
    views = tta_views(x, ["hflip", "scale"])
    assert len(views) == 3 and all(v.shape == x.shape for v in views)
    torch.testing.assert_close(views[1], x.flip(3))
    assert not torch.equal(views[2], x)
    assert len(tta_views(x, [])) == 1
    with pytest.raises(ValueError, match="unknown test-time augmentation"):
        tta_views(x, ["rotate"])


def test_features_with_and_without_tta():
    torch.manual_seed(0)
    experts = {"a": create_expert(ExpertConfig(kind="convnext", model="test_convnext"), 32).eval(),
               "b": create_expert(ExpertConfig(kind="resnet", model="test_resnet"), 32).eval()}
    batch = {("face", 32): torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)}
    plain = EnsembleDetector(experts, FaceConfig(), torch.device("cpu"))
    assert plain.feature_names() == ["a", "b"]
    f = plain.expert_features(batch)
    assert f.shape == (3, 2) and ((f >= 0) & (f <= 1)).all()

    tta = EnsembleDetector(experts, FaceConfig(), torch.device("cpu"), tta=["hflip", "scale"])
    assert tta.feature_names() == ["a", "b", "a_tta_spread", "b_tta_spread"]
    g = tta.expert_features(batch)
    assert g.shape == (3, 4) and (g[:, 2:] >= 0).all()
    p, features = tta.score_crops(batch)  # no stacker: plain mean of the expert columns
    torch.testing.assert_close(torch.from_numpy(p), torch.from_numpy(features[:, :2].mean(1)))


def test_bf16_autocast_runs_the_experts_in_bf16_and_keeps_the_scores():
    """The same images in fp32 and bf16: every expert's convolutions really ran in bf16 (their
    outputs' dtype), features stay float32, and no score moves by 0.05 or more."""
    torch.manual_seed(0)
    experts = {"a": create_expert(ExpertConfig(kind="convnext", model="test_convnext"), 32).eval(),
               "dae": create_expert(ExpertConfig(kind="dae", model="test_resnet"), 32).eval()}
    batch = {("face", 32): torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)}
    conv_dtypes = []
    for model in experts.values():
        first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        first_conv.register_forward_hook(lambda _module, _inputs, output: conv_dtypes.append(output.dtype))
    features = {}
    for precision in ("fp32", "bf16"):
        detector = EnsembleDetector(experts, FaceConfig(), torch.device("cpu"), precision=precision)
        conv_dtypes.clear()
        _, features[precision] = detector.score_crops(batch)
        expected = torch.bfloat16 if precision == "bf16" else torch.float32
        assert conv_dtypes and set(conv_dtypes) == {expected}, precision
    assert features["bf16"].dtype == features["fp32"].dtype == np.float32
    assert features["bf16"].shape == (4, 2)
    assert np.abs(features["bf16"] - features["fp32"]).max() < 0.05
    # bf16 on the CPU: weights and inputs channels-last, where oneDNN's bf16 kernels run fastest
    convs = [m for model in experts.values() for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)


def test_precision_auto_follows_native_bf16_and_unknown_is_refused(monkeypatch):
    cpu = torch.device("cpu")
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(predictor, "native_bf16", lambda device, native=native: native)
        assert resolve_precision("auto", cpu) == expected
        assert EnsembleDetector({}, FaceConfig(), cpu, precision="auto").precision == expected
    assert resolve_precision("bf16", cpu) == "bf16" and resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(UsageError, match="precision must be one of"):
        resolve_precision("fp16", cpu)


@pytest.mark.parametrize("device, cores, expected", [
    ("cuda", 16, 8), ("cuda", 4, 3), ("cuda", 1, 0),  # a GPU: every core but one, up to 8
    ("cpu", 16, 3), ("cpu", 2, 1), ("cpu", 1, 0),     # the CPU: its cores also run the experts
])
def test_default_decode_workers_follow_the_device_and_the_cores(monkeypatch, device, cores, expected):
    monkeypatch.setattr(predictor.os, "cpu_count", lambda: cores)
    assert predictor.default_decode_workers(torch.device(device)) == expected


@pytest.mark.parametrize("device, cores, workers, expected", [
    ("cpu", 16, 3, 13), ("cpu", 4, 3, 1),  # 4+ cores: the decode workers get cores of their own
    ("cpu", 2, 1, None), ("cpu", 16, 0, None), ("cuda", 16, 8, None),  # else torch's default
])
def test_default_torch_threads_leave_the_workers_their_cores(monkeypatch, device, cores, workers, expected):
    monkeypatch.setattr(predictor.os, "cpu_count", lambda: cores)
    assert predictor.default_torch_threads(torch.device(device), workers) == expected
