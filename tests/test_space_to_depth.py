"""`space_to_depth` (timm experts): the crop at s times the input size, each s x s block of
pixels and SRM residuals folded into channels instead of resized away."""
import pytest
import torch

from common.errors import ConfigError
from configs import ExpertConfig
from experts import create_expert

SIZE = 64


def make(**kw):
    torch.manual_seed(0)
    return create_expert(ExpertConfig(kind="resnet", model="test_resnet", **kw), SIZE).eval()


def crops(n=4):
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_space_to_depth_folds_native_pixels_into_channels():
    """space_to_depth: 2 gives the backbone every native pixel and residual, at half the side."""
    expert = make(input_filter="srm", space_to_depth=2)
    plain = make(input_filter="srm")
    x = crops()
    with torch.no_grad():
        folded = expert.network_input(x)
        assert folded.shape == (4, 6 * 4, SIZE // 2, SIZE // 2)
        # lossless: unfolding gives back the RGB + residual input of the plain expert
        assert torch.equal(torch.nn.functional.pixel_shuffle(folded, 2), plain.network_input(x))
        assert expert(x).shape == (4, 2)
    with pytest.raises(ConfigError, match="space_to_depth"):
        make(space_to_depth=3)  # 64 px is not made of 3 x 3 blocks


def test_space_to_depth_expert_exports_to_onnx():
    pytest.importorskip("onnxruntime")
    from experts.export_onnx import largest_difference, onnx_bytes
    expert = make(input_filter="srm", space_to_depth=2)
    assert largest_difference(expert, onnx_bytes(expert)) < 1e-4
