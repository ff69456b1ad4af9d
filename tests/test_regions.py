"""The part of the face crop an expert sees (`expert.<name>.region`): the box, and the same
cut in training, in the predictor and in the other inference paths."""
import json

import cv2
import numpy as np
import pytest
import skimage.data
import torch

from common.errors import ConfigError
from configs import Config, ExpertConfig
from data_prep import landmarks as lm
from data_prep.dataset import Sample
from data_prep.faces import FaceCropCache
from data_prep.loaders import FaceCropDataset
from data_prep.regions import FALLBACK_SIDE, MOUTH_SIDE, crop_region, region_box, region_tensor
from data_prep.transforms import crop_to_tensor
from ensemble.onnx_backend import onnx_detector
from ensemble.predictor import EnsembleDetector, crop_to_inputs, score_samples
from experts import export_onnx
from experts import train as experts_train
from experts.base import check_expert_config
from experts.weights import MANIFEST
from helpers import settings_of, tiny_overrides


def mouth_points(cx: float, cy: float, width: float) -> np.ndarray:
    """68 points, all at the mouth's centre but the corners (48, 54) `width` apart."""
    points = np.tile(np.float32([cx, cy]), (lm.N_POINTS, 1))
    points[48], points[54] = (cx - width / 2, cy), (cx + width / 2, cy)
    return points


def test_the_face_region_is_the_whole_crop():
    crop = np.zeros((256, 256, 3), np.uint8)
    assert region_box(crop.shape, None, "face") == (0, 0, 256, 256)
    assert crop_region(crop, None, "face") is crop


def test_the_mouth_is_a_square_of_its_width_around_it():
    x0, y0, x1, y1 = region_box((256, 256), mouth_points(100, 150, 40), "mouth")
    side = round(MOUTH_SIDE * 40)
    assert x1 - x0 == y1 - y0 == side
    assert (x0 + x1) / 2 == pytest.approx(100, abs=1) and (y0 + y1) / 2 == pytest.approx(150, abs=1)


def test_a_mouth_at_the_edge_keeps_its_size_inside_the_crop():
    # FF++'s crops keep their central 256 px and cut chins: mouths sit near the bottom
    x0, y0, x1, y1 = region_box((256, 256), mouth_points(128, 240, 80), "mouth")
    assert y1 == 256 and y1 - y0 == x1 - x0 == round(MOUTH_SIDE * 80)


def test_without_landmarks_the_mouth_is_where_it_sits_on_average():
    x0, y0, x1, y1 = region_box((200, 200), None, "mouth")
    assert x1 - x0 == y1 - y0 == round(FALLBACK_SIDE * 200)
    assert y0 > 100 and (x0 + x1) / 2 == pytest.approx(100, abs=1)  # low in the crop, centred


def test_on_a_real_face_the_box_holds_the_mouth():
    face = skimage.data.astronaut()
    points = lm.detect_landmarks(face)
    x0, y0, x1, y1 = region_box(face.shape, points, "mouth")
    mouth = points[lm.MOUTH]
    assert (mouth >= [x0, y0]).all() and (mouth <= [x1, y1]).all()
    eyes = points[lm.EYES]
    assert (eyes[:, 1] < y0).all()  # a mouth expert does not see the eyes


def test_an_unknown_region_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"expert\.lips\.region: unknown region 'lips'"):
        check_expert_config(ExpertConfig(kind="resnet", region="lips"), "lips")


@pytest.fixture()
def face_file(tmp_path):
    path = tmp_path / "astronaut.png"
    cv2.imwrite(str(path), cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR))
    return path


def test_training_and_validation_cut_the_region_by_the_crops_landmarks(face_file, tmp_path):
    cfg = Config()
    crops = FaceCropCache(cfg.face, tmp_path / "cache")
    samples = [Sample(face_file, 0)]
    crop, points = crops.load(face_file), crops.landmarks(face_file)
    assert points is not None
    val = FaceCropDataset(samples, crops, settings_of(cfg, 48, region="mouth"), train=False)
    x, _ = val[0]
    assert torch.equal(x, crop_to_tensor(crop_region(crop, points, "mouth"), 48))
    assert not torch.equal(x, crop_to_tensor(crop, 48))  # not the whole face
    cfg.data.online_fakes = 1.0  # an editing fake is made of the whole crop, then cut
    train = FaceCropDataset(samples * 2, crops, settings_of(cfg, 48, region="mouth"), train=True)
    assert train[0][0].shape == (3, 48, 48) and train[0][1] == 1


def test_the_predictor_gives_each_expert_its_region(face_file, tmp_path):
    crop = FaceCropCache(Config().face, tmp_path / "cache").load(face_file)
    keys = [("face", 32), ("mouth", 32), ("mouth", 48)]
    inputs = crop_to_inputs(crop, keys)
    assert set(inputs) == set(keys)
    assert torch.equal(inputs[("face", 32)], crop_to_tensor(crop, 32))
    assert torch.equal(inputs[("mouth", 48)], region_tensor(crop, "mouth", 48))
    assert torch.equal(inputs[("mouth", 48)], region_tensor(crop, "mouth", 48, lm.detect_landmarks(crop)))


def test_a_mouth_expert_trains_exports_and_scores(demo_root, tmp_path, crop_cache):
    args = tiny_overrides(tmp_path, epochs=1, experts="mouth", cache_dir=crop_cache) + [
        "expert.mouth.kind=resnet", "expert.mouth.model=test_resnet", "expert.mouth.region=mouth",
        "expert.mouth.image_size=48"]
    assert experts_train.main([str(demo_root)] + args) == 0
    manifest = json.loads((tmp_path / "weights" / MANIFEST).read_text())
    assert manifest["experts"]["mouth"]["expert_config"]["region"] == "mouth"
    detector = EnsembleDetector.from_weights(tmp_path / "weights", device="cpu", precision="fp32")  # as ONNX
    assert detector.input_keys == [("mouth", 48)]
    paths = sorted((demo_root / "testset").iterdir())[:4]
    p_fake, _, errors = score_samples(detector, paths, batch_size=2)
    assert not errors and p_fake.shape == (4,) and ((p_fake >= 0) & (p_fake <= 1)).all()
    # the ONNX export records the region, and its detector cuts the same mouth
    assert export_onnx.main(["--weights", str(tmp_path / "weights"), "--out", str(tmp_path / "onnx")]) == 0
    exported = onnx_detector(tmp_path / "onnx")
    assert exported.input_keys == [("mouth", 48)]
    p_onnx, _, _ = score_samples(exported, paths, batch_size=2)
    assert np.abs(p_onnx - p_fake).max() < 1e-3


def test_every_crop_the_trainer_gives_a_mouth_expert_is_its_mouth(demo_root, tmp_path, crop_cache, monkeypatch):
    """Training, validation, and the training crops that re-measure BatchNorm for the SWA mean
    (and that a DAE finalizes on): all cut to the expert's region."""
    regions = []
    build = experts_train.FaceCropDataset

    def recording(samples, crops, settings, *args, **kwargs):
        regions.append(settings.expert.region)
        return build(samples, crops, settings, *args, **kwargs)

    monkeypatch.setattr(experts_train, "FaceCropDataset", recording)
    args = tiny_overrides(tmp_path, epochs=2, experts="mouth", cache_dir=crop_cache) + [
        "expert.mouth.kind=resnet", "expert.mouth.model=test_resnet", "expert.mouth.region=mouth",
        "expert.mouth.image_size=48", "expert.mouth.swa_fraction=0.5"]
    assert experts_train.main([str(demo_root)] + args) == 0
    assert len(regions) == 3 and set(regions) == {"mouth"}
