"""EnsembleDetector: test-time augmentation views and the feature columns the stacker sees."""
import pytest
import torch

from configs import ExpertConfig, FaceConfig
from ensemble.predictor import EnsembleDetector, tta_views
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
    batch = {32: torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)}
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
