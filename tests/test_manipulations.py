"""Editing fakes: deterministic per seed, shape-preserving, with a valid non-empty mask."""
import numpy as np
import pytest

from data_prep.manipulations import MANIPULATIONS, apply_manipulation, random_manipulation, soft_face_mask

EXPECTED_NAMES = {"self_blend", "splice", "copy_move", "resample", "warp", "color_mismatch", "inpaint"}


def textured_image(height=64, width=64, seed=0):
    """Smooth colour gradients plus noise: every op visibly changes something."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width * 200, y / height * 200, (x + y) / (width + height) * 255], axis=2)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


IMAGE = textured_image()
DONOR = textured_image(80, 48, seed=1)


def check_output(image, fake, mask):
    assert fake.dtype == np.uint8 and fake.shape == image.shape
    assert mask.dtype == np.float32 and mask.shape == image.shape[:2]
    assert mask.min() >= 0.0 and mask.max() <= 1.0
    assert mask.max() > 0.0


def test_registry_names():
    assert set(MANIPULATIONS) == EXPECTED_NAMES


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_same_seed_same_bytes(name):
    fake_a, mask_a = apply_manipulation(name, IMAGE, 7, donor=DONOR)
    fake_b, mask_b = apply_manipulation(name, IMAGE, np.random.default_rng(7), donor=DONOR)
    check_output(IMAGE, fake_a, mask_a)
    assert fake_a.tobytes() == fake_b.tobytes()
    assert mask_a.tobytes() == mask_b.tobytes()


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_different_seeds_differ(name):
    fake_a, mask_a = apply_manipulation(name, IMAGE, 1, donor=DONOR)
    fake_b, mask_b = apply_manipulation(name, IMAGE, 2, donor=DONOR)
    assert fake_a.tobytes() != fake_b.tobytes() or mask_a.tobytes() != mask_b.tobytes()


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_image_is_changed_and_input_untouched(name):
    original = IMAGE.copy()
    fake, mask = apply_manipulation(name, IMAGE, 3, donor=DONOR)
    np.testing.assert_array_equal(IMAGE, original)
    assert np.any(fake != IMAGE)
    # Pixels well outside the mask are left alone.
    untouched = mask == 0
    assert untouched.any()
    np.testing.assert_array_equal(fake[untouched], IMAGE[untouched])


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
@pytest.mark.parametrize("face_box", [None, (30, -10, 50, 40), (-20, 20, 40, 30), (500, 500, 10, 10)])
def test_small_non_square_image_and_odd_face_boxes(name, face_box):
    image = textured_image(40, 56, seed=2)
    for seed in range(3):
        fake, mask = apply_manipulation(name, image, seed, face_box=face_box)  # donor=None too
        check_output(image, fake, mask)


@pytest.mark.parametrize("shape", [(32, 32, 3), (33, 200, 3), (150, 34, 3)])
def test_sizes(shape):
    image = textured_image(*shape[:2])
    for name in MANIPULATIONS:
        check_output(image, *apply_manipulation(name, image, 0, donor=DONOR))


def test_soft_face_mask():
    rng = np.random.default_rng(0)
    mask = soft_face_mask((50, 70), (10, 5, 40, 30), rng)
    assert mask.dtype == np.float32 and mask.shape == (50, 70)
    assert mask.max() == pytest.approx(1.0) and mask.min() >= 0.0
    assert mask[25, 30] > 0.9          # inside the face
    assert mask[0, 69] == 0.0 and mask[49, 0] == 0.0  # far corners
    plain = soft_face_mask((50, 70), None, rng, deform=False)
    np.testing.assert_array_equal(plain, soft_face_mask((50, 70), None, rng, deform=False))


def test_random_manipulation():
    fake, mask, name = random_manipulation(IMAGE, np.random.default_rng(5), donor=DONOR)
    assert name in MANIPULATIONS
    check_output(IMAGE, fake, mask)
    again = random_manipulation(IMAGE, np.random.default_rng(5), donor=DONOR)
    assert again[2] == name and again[0].tobytes() == fake.tobytes()
    names = {random_manipulation(IMAGE, np.random.default_rng(s), names=["warp", "inpaint"])[2]
             for s in range(20)}
    assert names == {"warp", "inpaint"}


def test_unknown_name_lists_valid_names():
    with pytest.raises(KeyError, match="self_blend"):
        apply_manipulation("nope", IMAGE, 0)
    with pytest.raises(KeyError, match="nope"):
        random_manipulation(IMAGE, np.random.default_rng(0), names=["warp", "nope"])


def test_bad_image_is_a_clear_error():
    with pytest.raises(ValueError, match="uint8"):
        apply_manipulation("warp", IMAGE.astype(np.float32), 0)
    with pytest.raises(ValueError, match="at least"):
        apply_manipulation("warp", IMAGE[:4, :4], 0)


def test_default_ops_are_every_op_in_the_registry_order():
    """A random draw picks an op by its position in DEFAULT_OPS: this order is part of every
    seeded editing fake."""
    from data_prep.manipulations import DEFAULT_OPS

    assert DEFAULT_OPS == ("self_blend", "splice", "copy_move", "resample", "warp", "color_mismatch", "inpaint")
    drawn = {random_manipulation(IMAGE, np.random.default_rng(s))[2] for s in range(60)}
    assert drawn == set(DEFAULT_OPS)


def test_a_removed_op_is_named_as_removed():
    with pytest.raises(KeyError, match="the editing op 'upsample_artefacts' was removed"):
        apply_manipulation("upsample_artefacts", IMAGE, 0)
