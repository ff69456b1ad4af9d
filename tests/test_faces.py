"""Face crop: box rules, detection on a real portrait, and the disk cache."""
import os

import numpy as np
import pytest
from PIL import Image

from configs import FaceConfig
from data_prep import faces
from data_prep.faces import FaceCropCache, crop_face, detect_largest_face, square_crop_box
from data_prep.images import ImageDecodeError


@pytest.fixture(scope="module")
def astronaut():
    import skimage.data
    return skimage.data.astronaut()  # 512 x 512 RGB portrait, face near x 170-280, y 60-170


def gradient(h=120, w=160, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------- square_crop_box

def test_box_grows_by_margin_and_is_square():
    cfg = FaceConfig(margin=0.3)
    x0, y0, x1, y1 = square_crop_box((400, 400), (100, 100, 50, 50), cfg)
    assert (x0, y0, x1, y1) == (85, 85, 165, 165)  # side 50 * 1.6 = 80, same centre (125, 125)


def test_box_uses_the_longer_face_side():
    cfg = FaceConfig(margin=0.5)
    x0, y0, x1, y1 = square_crop_box((400, 400), (100, 100, 40, 60), cfg)
    assert x1 - x0 == y1 - y0 == 120
    assert ((x0 + x1) / 2, (y0 + y1) / 2) == (120, 130)


def test_zero_margin_is_the_face_box():
    assert square_crop_box((100, 100), (10, 20, 30, 30), FaceConfig(margin=0.0)) == (10, 20, 40, 50)


@pytest.mark.parametrize("face,shape,expected", [
    ((0, 0, 50, 50), (400, 400), (0, 0, 80, 80)),                # top-left corner: shifted right/down
    ((270, 170, 30, 30), (200, 300), (252, 152, 300, 200)),      # bottom-right: shifted left/up
    ((0, 90, 20, 20), (200, 100), (0, 84, 32, 116)),             # left edge, tall image
])
def test_box_is_shifted_inside_never_padded(face, shape, expected):
    box = square_crop_box(shape, face, FaceConfig(margin=0.3))
    assert box == expected
    x0, y0, x1, y1 = box
    assert 0 <= x0 < x1 <= shape[1] and 0 <= y0 < y1 <= shape[0]
    assert x1 - x0 == y1 - y0


def test_box_larger_than_image_is_clamped_to_short_side():
    x0, y0, x1, y1 = square_crop_box((100, 150), (20, 10, 90, 90), FaceConfig(margin=0.3))
    assert x1 - x0 == y1 - y0 == 100
    assert y0 == 0 and 0 <= x0 and x1 <= 150


def test_fallback_center():
    cfg = FaceConfig(fallback="center", fallback_fraction=0.7)
    assert square_crop_box((100, 200), None, cfg) == (65, 15, 135, 85)
    assert square_crop_box((300, 300), None, FaceConfig(fallback_fraction=1.0)) == (0, 0, 300, 300)


def test_fallback_full_is_the_whole_image():
    assert square_crop_box((100, 200), None, FaceConfig(fallback="full")) == (0, 0, 200, 100)


# ---------------------------------------------------------------- crop_face / detection

@pytest.mark.parametrize("shape", [(120, 160), (300, 90), (33, 33), (640, 480)])
@pytest.mark.parametrize("fallback", ["center", "full"])
def test_crop_face_output_shape(shape, fallback):
    cfg = FaceConfig(enabled=False, crop_size=72, fallback=fallback)
    crop, found = crop_face(gradient(*shape), cfg)
    assert crop.shape == (72, 72, 3) and crop.dtype == np.uint8 and crop.flags["C_CONTIGUOUS"]
    assert found is False


def test_shrink_center_keeps_native_pixels():
    image = gradient(120, 120)
    cfg = FaceConfig(enabled=False, fallback="full", crop_size=50, shrink="center")
    crop, _ = crop_face(image, cfg)
    np.testing.assert_array_equal(crop, image[35:85, 35:85])  # the central window, not resized
    small = FaceConfig(enabled=False, fallback="full", crop_size=200, shrink="center")
    assert crop_face(image, small)[0].shape == (200, 200, 3)  # smaller boxes are still enlarged
    with pytest.raises(ValueError, match="face.shrink"):
        crop_face(image, FaceConfig(enabled=False, shrink="squash"))


def test_crop_face_disabled_uses_center_rule():
    image = gradient(100, 100)
    crop, _ = crop_face(image, FaceConfig(enabled=False, crop_size=50, fallback_fraction=0.5))
    np.testing.assert_array_equal(crop, image[25:75, 25:75])  # same size: no resampling


def test_detects_astronaut_face(astronaut):
    box = detect_largest_face(astronaut)
    assert box is not None
    x, y, w, h = box
    # The face (checked by eye) spans about x 170-280, y 60-170 of the 512 px image.
    assert 140 <= x <= 200 and 40 <= y <= 100, box
    assert 80 <= w <= 150 and 80 <= h <= 150, box
    cx, cy = x + w / 2, y + h / 2
    assert 150 <= cx <= 300 and 50 <= cy <= 200


def test_crop_face_on_astronaut_is_centred_on_face(astronaut):
    cfg = FaceConfig(crop_size=96)
    crop, found = crop_face(astronaut, cfg)
    assert found and crop.shape == (96, 96, 3)
    x, y, w, h = detect_largest_face(astronaut)
    x0, y0, x1, y1 = square_crop_box(astronaut.shape[:2], (x, y, w, h), cfg)
    assert x0 <= x and y0 <= y and x1 >= x + w and y1 >= y + h


def test_dlib_detector_finds_the_same_face(astronaut):
    from data_prep.faces import detect_face
    lbp = detect_largest_face(astronaut)
    box = detect_face(astronaut, FaceConfig(detector="dlib"))
    assert box is not None
    # the two detectors agree on where the face is (centres within a quarter face)
    assert abs((box[0] + box[2] / 2) - (lbp[0] + lbp[2] / 2)) < lbp[2] / 4
    assert abs((box[1] + box[3] / 2) - (lbp[1] + lbp[3] / 2)) < lbp[3] / 4
    crop, found = crop_face(astronaut, FaceConfig(detector="dlib", crop_size=64))
    assert found and crop.shape == (64, 64, 3)
    assert detect_face(np.zeros((100, 100, 3), np.uint8), FaceConfig(detector="dlib")) is None
    with pytest.raises(ValueError, match="face.detector"):
        detect_face(astronaut, FaceConfig(detector="yolo"))


def test_no_face_in_noise_or_tiny_image():
    assert detect_largest_face(np.zeros((100, 100, 3), np.uint8)) is None
    assert detect_largest_face(np.full((16, 16, 3), 128, np.uint8)) is None


# ---------------------------------------------------------------- FaceCropCache

@pytest.fixture
def image_file(tmp_path, astronaut):
    path = tmp_path / "img" / "astronaut.png"
    path.parent.mkdir()
    Image.fromarray(astronaut[::2, ::2]).save(path)
    return path


def test_cache_writes_and_reuses(tmp_path, image_file, monkeypatch):
    cfg = FaceConfig(crop_size=64)
    cache = FaceCropCache(cfg, tmp_path / "cache")
    first = cache.load(image_file)
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    files = list((tmp_path / "cache").rglob("*.npy"))
    assert len(files) == 1
    np.testing.assert_array_equal(np.load(files[0]), first)

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded although the crop is cached")

    monkeypatch.setattr(faces, "decode_image", no_decode)
    again = FaceCropCache(cfg, tmp_path / "cache").load(image_file)  # a new instance: from disk
    np.testing.assert_array_equal(again, first)
    # no stray temporary files left behind
    assert [p.name for p in files[0].parent.iterdir()] == [files[0].name]


def test_cache_matches_uncached_crop(tmp_path, image_file):
    cfg = FaceConfig(crop_size=64)
    cached = FaceCropCache(cfg, tmp_path / "cache").load(image_file)
    uncached = FaceCropCache(cfg, None).load(image_file)
    np.testing.assert_array_equal(cached, uncached)
    assert not (tmp_path / ".cache").exists()


def test_modified_file_is_recomputed(tmp_path, image_file, monkeypatch):
    cache = FaceCropCache(FaceConfig(crop_size=48), tmp_path / "cache")
    first = cache.load(image_file)
    Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(image_file)
    stat = image_file.stat()
    os.utime(image_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    calls = []
    real_decode = faces.decode_image
    monkeypatch.setattr(faces, "decode_image", lambda p: calls.append(p) or real_decode(p))
    second = cache.load(image_file)
    assert calls == [image_file]
    assert not np.array_equal(first, second)
    assert (second == 0).all()
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 2


def test_same_size_new_mtime_is_recomputed(tmp_path, image_file, monkeypatch):
    cache = FaceCropCache(FaceConfig(crop_size=48), tmp_path / "cache")
    cache.load(image_file)
    stat = image_file.stat()
    os.utime(image_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    calls = []
    real_decode = faces.decode_image
    monkeypatch.setattr(faces, "decode_image", lambda p: calls.append(p) or real_decode(p))
    cache.load(image_file)
    assert len(calls) == 1


def test_changed_settings_use_another_cache_folder(tmp_path, image_file):
    a = FaceCropCache(FaceConfig(crop_size=48), tmp_path / "cache")
    b = FaceCropCache(FaceConfig(crop_size=64), tmp_path / "cache")
    assert a.dir != b.dir
    assert a.load(image_file).shape == (48, 48, 3)
    assert b.load(image_file).shape == (64, 64, 3)


def test_corrupt_cache_file_is_recomputed(tmp_path, image_file):
    cache = FaceCropCache(FaceConfig(crop_size=48), tmp_path / "cache")
    first = cache.load(image_file)
    (npy,) = list((tmp_path / "cache").rglob("*.npy"))
    npy.write_bytes(b"garbage")
    np.testing.assert_array_equal(cache.load(image_file), first)


@pytest.mark.parametrize("content", [b"", b"this is not an image", None])
def test_broken_file_raises_decode_error(tmp_path, content, image_file):
    path = tmp_path / "broken.jpg"
    if content is None:  # a truncated PNG
        data = image_file.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    cache = FaceCropCache(FaceConfig(crop_size=48), tmp_path / "cache")
    with pytest.raises(ImageDecodeError) as err:
        cache.load(path)
    assert str(path) in str(err.value)
    assert not list((tmp_path / "cache").rglob("*.npy"))


def test_face_detector_bench(tmp_path, astronaut, capsys):
    from bench import face_detectors

    Image.fromarray(astronaut).save(tmp_path / "a_face.png")
    Image.fromarray(gradient(200, 200)).save(tmp_path / "b_noise.png")
    assert face_detectors.main([str(tmp_path), "--limit", "2"]) == 0
    out = capsys.readouterr().out
    for name in ("lbp", "dlib", "dlib + 68 landmarks"):
        assert f"| {name} | 50.0 % |" in out
    assert face_detectors.main([str(tmp_path / "missing")]) == 2
