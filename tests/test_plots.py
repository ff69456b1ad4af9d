import numpy as np
import pytest
import torch
from torch import nn

from common import plots
from ensemble.gradcam import grad_cam

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_is_png(path):
    assert path.exists() and path.stat().st_size > 100
    assert path.read_bytes()[:8] == PNG_SIGNATURE


@pytest.fixture
def scores():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    return y, {
        "good": np.clip(0.5 + 0.4 * (y - 0.5) + rng.normal(0, 0.15, 60), 0, 1),
        "random": rng.random(60),
    }


# -- score plots ----------------------------------------------------------------

def test_plot_roc(tmp_path, scores):
    y, by_name = scores
    path = plots.plot_roc({name: (y, p) for name, p in by_name.items()}, tmp_path / "roc.png")
    assert_is_png(path)


def test_plot_score_histograms(tmp_path, scores):
    y, by_name = scores
    assert_is_png(plots.plot_score_histograms(y, by_name, tmp_path / "sub" / "hist.png"))


def test_plot_reliability(tmp_path, scores):
    y, by_name = scores
    assert_is_png(plots.plot_reliability(y, by_name, tmp_path / "rel.png", n_bins=5))


def test_plot_embedding_tsne(tmp_path):
    rng = np.random.default_rng(0)
    emb = np.vstack([rng.normal(0, 1, (10, 64)), rng.normal(3, 1, (10, 64))])
    labels = ["real"] * 10 + ["fake"] * 10
    path = plots.plot_embedding_tsne(emb, labels, tmp_path / "tsne.png", "tiny", colour_by_name="class")
    assert_is_png(path)


def test_plot_embedding_tsne_skips_tiny_input(tmp_path):
    with pytest.warns(UserWarning, match="skipped"):
        result = plots.plot_embedding_tsne(np.zeros((3, 4)), [0, 1, 0], tmp_path / "t.png", "too small")
    assert result is None
    assert not (tmp_path / "t.png").exists()


def test_plot_heatmaps(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    heatmaps = [rng.random((32, 32)), rng.random((32, 32)), rng.random((8, 8))]  # last one coarser
    assert_is_png(plots.plot_heatmaps(images, heatmaps, ["a", "b", "c"], tmp_path / "cam.png"))


# -- Grad-CAM ----------------------------------------------------------------------

class TinyCNN(nn.Module):
    def __init__(self, n_outputs=2):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.relu = nn.ReLU(inplace=True)  # in-place after the target layer, on purpose
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, n_outputs)

    def forward(self, x):
        return self.head(self.pool(self.relu(self.conv(x))).flatten(1))


class TinyViT(nn.Module):
    """Patch embedding + class token + one token-mixing block + head on the class token."""

    def __init__(self, patch=4, dim=16):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.block = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.head = nn.Linear(dim, 1)  # single fake logit

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (B, N, C)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1)
        tokens = self.block(tokens)
        mixed = tokens[:, 0] + tokens[:, 1:].mean(dim=1)
        return self.head(mixed)  # (B, 1)


def assert_valid_heatmaps(cam, batch, height, width):
    assert cam.shape == (batch, height, width)
    assert np.all(np.isfinite(cam))
    assert cam.min() >= 0.0 and cam.max() <= 1.0


def test_grad_cam_on_tiny_cnn():
    torch.manual_seed(0)
    model = TinyCNN().train()
    x = torch.randn(2, 3, 16, 16)
    cam = grad_cam(model, model.conv, x, class_index=1)
    assert_valid_heatmaps(cam, 2, 16, 16)
    assert cam.max() == pytest.approx(1.0)  # each map is rescaled to reach 1
    assert len(model.conv._forward_hooks) == 0 and len(model.conv._backward_hooks) == 0
    assert model.training  # original mode restored
    assert all(p.grad is None for p in model.parameters())


def test_grad_cam_restores_mixed_train_eval_modes():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    model.head.train()
    grad_cam(model, model.conv, torch.randn(1, 3, 8, 8))
    assert not model.training and model.head.training


def test_grad_cam_works_under_no_grad_with_frozen_weights():
    torch.manual_seed(0)
    model = TinyCNN()
    model.requires_grad_(False)
    with torch.no_grad():
        cam = grad_cam(model, model.conv, torch.randn(1, 3, 12, 10))
    assert_valid_heatmaps(cam, 1, 12, 10)


def test_grad_cam_on_vit_style_tokens():
    torch.manual_seed(0)
    model = TinyViT().eval()
    x = torch.randn(3, 3, 16, 16)  # 4x4 patch grid + 1 class token
    cam = grad_cam(model, model.block, x, num_prefix_tokens=1)
    assert_valid_heatmaps(cam, 3, 16, 16)
    assert len(model.block._forward_hooks) == 0
    assert not model.training


def test_grad_cam_rejects_non_square_token_grid():
    torch.manual_seed(0)
    model = TinyViT()
    with pytest.raises(ValueError, match="square"):
        grad_cam(model, model.block, torch.randn(1, 3, 16, 16), num_prefix_tokens=0)
    assert len(model.block._forward_hooks) == 0
