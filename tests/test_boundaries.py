"""Blending-boundary supervision (Face X-ray): the editing fakes' boundary maps from the data
loader, the loss that leaves the data set's own fakes out, and the timm expert's head. The
trainer's resume test covers a run with the head (tests/test_training.py)."""
import pytest
import torch
import torch.nn.functional as F

from configs import ExpertConfig, LossConfig, load_config
from data_prep.dataset import load_splits
from data_prep.faces import FaceCropCache
from data_prep.loaders import FaceCropDataset
from experts import create_expert
from experts.losses import boundary_loss
from helpers import settings_of

SIZE = 64


def make(model, **kw):
    torch.manual_seed(0)
    return create_expert(ExpertConfig(kind="timm", model=model, **kw), SIZE)


def batch(n=4):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, SIZE, SIZE, generator=g), torch.tensor([0, 1] * (n // 2))


def test_boundary_loss_is_the_bce_of_the_known_images_only():
    """Targets are area-pooled to the map; an image with an unknown boundary (-1: a data set's
    fake) changes nothing, whatever its prediction; none known: 0, with a gradient."""
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 4, 4, requires_grad=True)
    boundaries = torch.zeros(3, 1, 8, 8)
    boundaries[1, :, 2:6, 2:6] = 1.0
    boundaries[2] = -1.0
    target = F.avg_pool2d(boundaries[:2], 2)
    expected = F.binary_cross_entropy_with_logits(logits[:2], target)
    torch.testing.assert_close(boundary_loss(logits, boundaries), expected)
    other = logits.detach().clone()
    other[2] = 50.0
    torch.testing.assert_close(boundary_loss(other, boundaries), expected.detach())
    none_known = boundary_loss(logits, torch.full((3, 1, 8, 8), -1.0))
    none_known.backward()
    assert none_known.item() == 0 and logits.grad is not None


def test_boundary_maps_follow_the_image_and_say_unknown_for_the_data_sets_fakes(demo_root):
    """With boundaries, a training item also carries its blending boundary: 0 for a real,
    -1 for a fake of the data set, and an editing fake's ring (peak near 1, 0 far outside the
    face), flipped with the image. Without, the item is the same pair as always."""
    cfg = load_config("cpu", ["face.crop_size=48", "data.cache_dir=", "data.fake_masks=ellipse", "augment.hflip=1",
                              "augment.color=0"])
    samples = load_splits(demo_root)["trainset"][:12]
    crops = FaceCropCache(cfg.face, None)
    plain = FaceCropDataset(samples, crops, settings_of(cfg, 40, online_fakes=0.5), train=True)
    ds = FaceCropDataset(samples, crops, settings_of(cfg, 40, online_fakes=0.5), train=True, boundaries=True)
    kinds = set()
    for i, sample in enumerate(samples):
        x, y, boundary = ds[i]
        assert torch.equal(x, plain[i][0]) and y == plain[i][1] and len(plain[i]) == 2
        assert boundary.shape == (1, 40, 40) and boundary.dtype == torch.float32
        if sample.target == 1:
            assert (boundary == -1).all()
            kinds.add("data set fake")
        elif y == 0:
            assert (boundary == 0).all()
            kinds.add("real")
        else:  # an editing fake: a ring inside the crop, mirrored as the image was
            assert boundary.max() > 0.5 and boundary.min() >= 0 and boundary[0, :, :2].max() < 0.05
            kinds.add("editing fake")
    assert kinds == {"real", "data set fake", "editing fake"}
    cfg.augment.hflip = 0.0
    unflipped = FaceCropDataset(samples, crops, settings_of(cfg, 40, online_fakes=0.5), train=True, boundaries=True)
    fake = next(i for i in range(len(samples)) if ds[i][1] == 1 and samples[i].target == 0)
    torch.testing.assert_close(ds[fake][2], unflipped[fake][2].flip(-1))


@pytest.mark.parametrize("model", ["test_resnet", "test_convnext", "test_efficientnet"])
def test_a_boundary_head_learns_from_a_mid_level_map_and_leaves_the_scores_alone(model):
    """boundary_loss > 0: a 1 x 1 head on the first stage at 1/8 of the input; training_loss with
    boundaries adds its weighted BCE and trains it; without them, and forward, are unchanged."""
    plain, expert = make(model), make(model, boundary_loss=2.0)
    assert expert.learns_boundaries and not plain.learns_boundaries
    assert set(expert.state_dict()) - set(plain.state_dict()) == {"boundary_head.weight", "boundary_head.bias"}
    expert.load_state_dict({**plain.state_dict(), **{k: v for k, v in expert.state_dict().items()
                                                     if k.startswith("boundary_head.")}})
    expert.eval(), plain.eval()
    x, y = batch()
    torch.testing.assert_close(expert(x), plain(x))
    boundaries = torch.zeros(4, 1, SIZE, SIZE)
    boundaries[1, :, 16:48, 16:48] = 1.0
    with torch.no_grad():
        ce, _ = expert.training_loss(x, y, LossConfig(ce=1.0))
    loss, logs = expert.training_loss(x, y, LossConfig(ce=1.0), boundaries)
    assert set(logs) == {"ce", "boundary"}
    torch.testing.assert_close(loss, ce + 2.0 * logs["boundary"], rtol=1e-5, atol=1e-6)
    loss.backward()
    assert expert.boundary_head.weight.grad.abs().sum() > 0
    assert expert.boundary_head.in_channels == expert.backbone.feature_info[expert.boundary_stage]["num_chs"]
    assert expert.backbone.feature_info[expert.boundary_stage]["reduction"] == 8
