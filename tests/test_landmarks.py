"""dlib 68-point landmarks (weights from face-recognition-models) and the masks built on them."""
from __future__ import annotations

import importlib.util

import cv2
import numpy as np
import pytest
import skimage.data

from configs import FaceConfig
from data_prep import landmarks as lm
from data_prep.faces import FaceCropCache
from data_prep.manipulations import apply_manipulation
from data_prep.masks import soft_face_mask

FACE = skimage.data.astronaut()  # a real photograph with one frontal face at about (180-272, 87-178)


@pytest.fixture(scope="module")
def points():
    return lm.detect_landmarks(FACE)


def test_detects_68_points_on_the_face(points):
    assert points.shape == (lm.N_POINTS, 2) and points.dtype == np.float32
    x0, y0 = points.min(0)
    x1, y1 = points.max(0)
    assert 150 < x0 < x1 < 300 and 60 < y0 < y1 < 210
    eyes, mouth = points[lm.EYES], points[lm.MOUTH]
    assert eyes[:, 1].mean() < mouth[:, 1].mean()  # eyes above the mouth


def test_no_face_gives_none():
    assert lm.detect_landmarks(np.full((120, 120, 3), 128, np.uint8)) is None


def _spy_on_copies(monkeypatch):
    """The scales `_largest_face` runs the detector at, in call order."""
    scales, search = [], lm._largest_on_copy
    monkeypatch.setattr(lm, "_largest_on_copy",
                        lambda rgb, scale, upsample: scales.append(scale) or search(rgb, scale, upsample))
    return scales


def test_coarse_first_finds_a_close_up_on_the_coarse_copy(monkeypatch):
    close_up = cv2.resize(FACE[72:192, 166:286], (299, 299), interpolation=cv2.INTER_CUBIC)  # face ~ 215 px
    full = lm._largest_face(close_up, 320)
    scales = _spy_on_copies(monkeypatch)
    coarse = lm._largest_face(close_up, 320, coarse_first=True)
    assert scales == [pytest.approx(lm.PYRAMID_STEP ** lm.COARSE_LEVELS)]  # the coarse copy sufficed
    # the coarse copy's pyramid has the full search's coarse scales: the same box, give or take
    # one 8 px HOG cell of the copy where resampling tips a borderline cell (here: 3 px)
    corners = np.array([[b.left(), b.top(), b.right(), b.bottom()] for b in (full, coarse)])
    assert np.abs(corners[0] - corners[1]).max() <= 8 / lm.PYRAMID_STEP ** lm.COARSE_LEVELS


def test_coarse_first_leaves_small_faces_to_the_full_search(monkeypatch):
    scales = _spy_on_copies(monkeypatch)
    box = lm._largest_face(FACE, 320, coarse_first=True)  # a 512 px photograph, face ~ 90 px
    assert scales == [pytest.approx(320 / 512 * lm.PYRAMID_STEP ** lm.COARSE_LEVELS), 320 / 512]
    exact = lm._largest_face(FACE, 320)
    assert [box.left(), box.top(), box.right(), box.bottom()] == \
        [exact.left(), exact.top(), exact.right(), exact.bottom()]


def test_landmark_mask_follows_the_face(points):
    rng = np.random.default_rng(0)
    mask = soft_face_mask(FACE.shape[:2], None, rng, landmarks=points)
    assert mask.shape == FACE.shape[:2] and mask.dtype == np.float32
    assert mask.max() == pytest.approx(1.0) and mask.min() >= 0
    cx, cy = points[lm.NOSE].mean(0).round().astype(int)
    assert mask[cy, cx] > 0.5          # the nose is inside
    assert mask[:40, :].max() == 0 and mask[:, 400:].max() == 0  # far from the face: untouched
    again = soft_face_mask(FACE.shape[:2], None, np.random.default_rng(0), landmarks=points)
    np.testing.assert_array_equal(mask, again)


def test_every_op_accepts_landmarks(points):
    for name in ("self_blend", "splice", "warp", "color_mismatch", "resample", "inpaint", "copy_move"):
        fake, mask = apply_manipulation(name, FACE, 3, landmarks=points)
        assert fake.shape == FACE.shape and fake.dtype == np.uint8 and mask.shape == FACE.shape[:2]
        assert not np.array_equal(fake, FACE), name


def test_cutout_blacks_out_one_facial_part(points):
    """Each part is blacked out where its landmarks are and nowhere far from the face; every
    part is drawn; the same seed erases the same part."""
    seen = set()
    for seed in range(24):
        erased = lm.cutout_face_part(FACE, points, np.random.default_rng(seed))
        assert erased.shape == FACE.shape and erased.dtype == np.uint8
        assert not np.shares_memory(erased, FACE)
        black = (erased == 0).all(axis=2) & (FACE != 0).any(axis=2)
        assert black.sum() > 100                                            # a part, not a speck
        assert not black[:40, :].any() and not black[:, 400:].any()        # far from the face: untouched
        np.testing.assert_array_equal(erased[~black], FACE[~black])        # nothing else changed
        for name, part in (("eyes", lm.EYES), ("nose", lm.NOSE), ("mouth", lm.MOUTH)):
            x, y = points[part].mean(0).round().astype(int)
            if black[y, x]:
                seen.add(name)
        if black.sum() > 0.4 * lm._hull_mask(FACE.shape[:2], points).sum():
            seen.add("half")
    assert seen == {"eyes", "nose", "mouth", "half"}
    np.testing.assert_array_equal(lm.cutout_face_part(FACE, points, np.random.default_rng(5)),
                                  lm.cutout_face_part(FACE, points, np.random.default_rng(5)))


def test_face_crop_cache_keeps_landmarks(tmp_path):
    from PIL import Image

    path = tmp_path / "astronaut.png"
    Image.fromarray(FACE).save(path)
    cache = FaceCropCache(FaceConfig(enabled=False, fallback="full", crop_size=256), tmp_path / "cache")
    first = cache.landmarks(path)
    assert first.shape == (68, 2) and first.max() < 256  # in the crop's pixels
    assert len(list(cache.dir.glob("*.landmarks.npy"))) == 1
    np.testing.assert_array_equal(cache.landmarks(path), first)


def test_missing_model_package_is_one_clear_error(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "face_recognition_models" else real_find_spec(name, *a))
    with pytest.raises(lm.LandmarksUnavailable, match="pip install face-recognition-models"):
        lm._predictor_file()


def test_face_crops_need_no_landmark_model(monkeypatch):
    # inference crops faces with dlib's built-in HOG detector: a machine without the 100 MB
    # face-recognition-models wheel (it is only for the training fakes' landmarks) still scores
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "face_recognition_models" else real_find_spec(name, *a))
    monkeypatch.setattr(lm, "_DETECTOR", None)
    monkeypatch.setattr(lm, "_PREDICTOR", None)
    x, y, w, h = lm.detect_face_box(FACE)
    assert 150 < x < x + w < 300 and 60 < y < y + h < 210
    with pytest.raises(lm.LandmarksUnavailable):
        lm.detect_landmarks(FACE)
