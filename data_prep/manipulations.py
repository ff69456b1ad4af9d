"""Named, seeded image-editing fakes; each returns the edited image AND where it was edited.

Every operation has the same signature

    op(image, rng, donor=None, face_box=None, landmarks=None) -> (fake uint8 H x W x 3, mask float32 H x W)

- `image`: H x W x 3 uint8 RGB (a real photograph); the fake has the same shape.
- `rng`: a numpy Generator, the only source of randomness (same seed -> same bytes).
- `donor`: another real image (used by `splice`; other ops ignore it).
- `face_box`: (x, y, w, h) of the face. None = a centred face covering the middle 60 %.
  A box partly outside the image is clipped; one (almost) entirely outside falls back to
  the centred default, so an op never fails because of a bad box.
- `landmarks`: (68, 2) facial landmarks (data_prep.landmarks) or None; when given, the
  blending ops (self_blend, splice, warp, color_mismatch) follow the face's outline.
- `mask`: in [0, 1], how strongly each pixel was replaced (0 = untouched).

The edits mimic the traces face-swap / face-editing pipelines leave: a blending boundary
(self_blend, splice), resampling blur (resample), geometric warping (warp), colour
inconsistency (color_mismatch), duplicated texture (copy_move) and filled-in texture
(inpaint). Training a detector on them teaches it those traces rather than one generator.
"""
from __future__ import annotations

import cv2
import numpy as np

from common.errors import UnknownNameError
from configs import check_removed_names
from data_prep.masks import (
    Box,
    blend,
    box_side,
    check_image,
    face_rect,
    feathered_rect,
    normalised,
    pixel_grid,
    shrink_rect,
    smooth_field,
    soft_face_mask,
)

SBI_BLEND_RATIOS = (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)  # as in the SBI paper's code


# ---------------------------------------------------------------- colour

def _rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """Float Lab (L in 0..100) without 8-bit quantisation."""
    return cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)


def _lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(lab.astype(np.float32), cv2.COLOR_LAB2RGB) * 255.0


# ---------------------------------------------------------------- self_blend (SBI)

def self_blend(image, rng, donor=None, face_box=None, landmarks=None):
    """Self-Blended Images (Shiohara & Yamasaki, CVPR 2022).

    The face of a slightly altered copy of the image (colour jitter, sharpen or blur, a
    small shift and scale) is blended back into the original through a deformed soft
    mask: a fake whose only evidence is the blending boundary and statistics mismatch.
    """
    image = check_image(image)
    rect = face_rect(image.shape[:2], face_box)
    target = _jitter_colour(image, rng)
    target = _sharpen_or_blur(target, rng)
    target = _small_shift_and_scale(target, rng, rect)
    mask = soft_face_mask(image.shape[:2], face_box, rng, landmarks=landmarks) * float(rng.choice(SBI_BLEND_RATIOS))
    return blend(image, target, mask), mask.astype(np.float32)


def _jitter_colour(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random hue / saturation / brightness / contrast change, float32 RGB 0..255."""
    hsv = cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2HSV)  # H in degrees
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-10.0, 10.0)) % 360.0
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.8, 1.2), 0.0, 1.0)
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255.0
    contrast, brightness = rng.uniform(0.8, 1.2), rng.uniform(-20.0, 20.0)
    mean = rgb.mean()
    return np.clip((rgb - mean) * contrast + mean + brightness, 0.0, 255.0)


def _sharpen_or_blur(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    choice = rng.choice(["none", "sharpen", "blur"], p=[0.3, 0.35, 0.35])
    if choice == "none":
        return rgb
    smooth = cv2.GaussianBlur(rgb, (0, 0), rng.uniform(0.5, 1.5))
    if choice == "blur":
        return smooth
    return np.clip(rgb + rng.uniform(0.3, 1.0) * (rgb - smooth), 0.0, 255.0)  # unsharp mask


def _small_shift_and_scale(rgb: np.ndarray, rng: np.random.Generator, rect: Box) -> np.ndarray:
    """SBI's target misalignment: up to 3 % shift and 5 % scale about the face centre."""
    h, w = rgb.shape[:2]
    side = box_side(rect)
    centre = ((rect[0] + rect[2]) / 2, (rect[1] + rect[3]) / 2)
    matrix = cv2.getRotationMatrix2D(centre, 0.0, rng.uniform(0.95, 1.05))
    matrix[:, 2] += rng.uniform(-0.03, 0.03, size=2) * side
    return cv2.warpAffine(rgb, matrix, (w, h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT_101)


# ---------------------------------------------------------------- splice

def splice(image, rng, donor=None, face_box=None, landmarks=None):
    """Paste the donor's face region (same place; faces assumed roughly aligned) through a
    soft mask, after matching its Lab colour statistics to this face, like a face swap."""
    image = check_image(image)
    h, w = image.shape[:2]
    if donor is None:
        donor = _shifted_mirror(image, rng)
    else:
        donor = check_image(donor, "donor", min_side=1)
        if donor.shape[:2] != (h, w):
            shrinking = donor.shape[0] * donor.shape[1] > h * w
            donor = cv2.resize(donor, (w, h), interpolation=cv2.INTER_AREA if shrinking
                               else cv2.INTER_LINEAR)
    mask = soft_face_mask((h, w), face_box, rng, landmarks=landmarks)
    matched = _match_colour(donor, image, mask)
    return blend(image, matched, mask), mask


def _shifted_mirror(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Stand-in donor: the image flipped left-right and shifted by 5-10 %."""
    h, w = image.shape[:2]
    shift = rng.uniform(0.05, 0.10, size=2) * rng.choice([-1.0, 1.0], size=2) * (w, h)
    matrix = np.float32([[1, 0, shift[0]], [0, 1, shift[1]]])
    return cv2.warpAffine(image[:, ::-1].copy(), matrix, (w, h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT_101)


def _match_colour(source: np.ndarray, reference: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Shift/scale source's Lab channels so their weighted mean/std match the reference's."""
    source_lab, reference_lab = _rgb_to_lab(source), _rgb_to_lab(reference)
    wsum = float(weights.sum())
    if wsum <= 0:
        return source.astype(np.float32)
    matched = np.empty_like(source_lab)
    for c in range(3):
        mu_s, sd_s = _weighted_stats(source_lab[..., c], weights, wsum)
        mu_r, sd_r = _weighted_stats(reference_lab[..., c], weights, wsum)
        gain = np.clip(sd_r / max(sd_s, 1e-3), 0.5, 2.0)  # "roughly": no extreme stretching
        matched[..., c] = (source_lab[..., c] - mu_s) * gain + mu_r
    matched[..., 0] = np.clip(matched[..., 0], 0.0, 100.0)
    return np.clip(_lab_to_rgb(matched), 0.0, 255.0)


def _weighted_stats(channel: np.ndarray, weights: np.ndarray, wsum: float) -> tuple[float, float]:
    mean = float((channel * weights).sum() / wsum)
    var = float((((channel - mean) ** 2) * weights).sum() / wsum)
    return mean, var ** 0.5


# ---------------------------------------------------------------- copy_move

def copy_move(image, rng, donor=None, face_box=None, landmarks=None):
    """Copy a random patch of the image onto another place, with feathered edges."""
    image = check_image(image)
    h, w = image.shape[:2]
    ph = max(2, round(h * rng.uniform(0.15, 0.35)))
    pw = max(2, round(w * rng.uniform(0.15, 0.35)))
    sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    dy, dx = _distant_position(rng, (h, w), (ph, pw), (sy, sx))

    edited = image.copy()
    edited[dy:dy + ph, dx:dx + pw] = image[sy:sy + ph, sx:sx + pw]
    mask = feathered_rect((h, w), (dy, dx, ph, pw))
    return blend(image, edited, mask), mask


def _distant_position(rng, shape_hw, patch_hw, source_yx, tries: int = 10) -> tuple[int, int]:
    """A destination at least half a patch away from the source, if one turns up in `tries`."""
    (h, w), (ph, pw), (sy, sx) = shape_hw, patch_hw, source_yx
    for _ in range(tries):
        dy, dx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        if max(abs(dy - sy) / ph, abs(dx - sx) / pw) >= 0.5:
            break
    return dy, dx


# ---------------------------------------------------------------- resample

def resample(image, rng, donor=None, face_box=None, landmarks=None):
    """Inner face downscaled by 0.3-0.7 and upscaled back: the blur of a low-res face swap."""
    image = check_image(image)
    h, w = image.shape[:2]
    factor = rng.uniform(0.3, 0.7)
    small_size = (max(1, round(w * factor)), max(1, round(h * factor)))
    down = cv2.INTER_AREA if rng.random() < 0.5 else cv2.INTER_LINEAR
    up = cv2.INTER_LINEAR if rng.random() < 0.5 else cv2.INTER_CUBIC
    blurred = cv2.resize(cv2.resize(image, small_size, interpolation=down), (w, h), interpolation=up)
    inner_face = shrink_rect(face_rect((h, w), face_box), 0.8)
    mask = soft_face_mask((h, w), inner_face, rng)
    return blend(image, blurred, mask), mask


# ---------------------------------------------------------------- warp

def warp(image, rng, donor=None, face_box=None, landmarks=None):
    """Smooth random displacement (2-7 % of the face size) that fades out at the face edge."""
    image = check_image(image)
    h, w = image.shape[:2]
    mask = soft_face_mask((h, w), face_box, rng, landmarks=landmarks)
    side = box_side(face_rect((h, w), face_box))
    amplitude = max(1.5, rng.uniform(0.02, 0.07) * side)
    grid = int(rng.integers(3, 6))
    dx = smooth_field((h, w), rng, grid, amplitude) * mask
    dy = smooth_field((h, w), rng, grid, amplitude) * mask
    xs, ys = pixel_grid((h, w))
    warped = cv2.remap(image, xs + dx, ys + dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    # The displacement is weighted by `mask`, so `mask` is where (and how much) pixels moved.
    return warped, mask


# ---------------------------------------------------------------- color_mismatch

def color_mismatch(image, rng, donor=None, face_box=None, landmarks=None):
    """Face lighter/darker and tinted relative to the rest: a colour-correction failure."""
    image = check_image(image)
    lab = _rgb_to_lab(image)
    sign = rng.choice([-1.0, 1.0], size=3)
    lab[..., 0] = lab[..., 0] * rng.uniform(0.9, 1.1) + sign[0] * rng.uniform(6.0, 18.0)
    lab[..., 1] += sign[1] * rng.uniform(2.0, 10.0)
    lab[..., 2] += sign[2] * rng.uniform(2.0, 10.0)
    lab[..., 0] = np.clip(lab[..., 0], 0.0, 100.0)
    shifted = np.clip(_lab_to_rgb(lab), 0.0, 255.0)
    mask = soft_face_mask(image.shape[:2], face_box, rng, landmarks=landmarks)
    return blend(image, shifted, mask), mask


# ---------------------------------------------------------------- inpaint

def inpaint(image, rng, donor=None, face_box=None, landmarks=None):
    """Erase 1-3 random blobs inside the face and let OpenCV fill them (TELEA or NS)."""
    image = check_image(image)
    h, w = image.shape[:2]
    rect = face_rect((h, w), face_box)
    hole = _random_blobs((h, w), rect, rng)
    method = cv2.INPAINT_TELEA if rng.random() < 0.5 else cv2.INPAINT_NS
    filled = cv2.inpaint(image, hole, float(rng.integers(2, 6)), method)
    # The filled pixels plus a soft rim: inpainting also smooths the hole's surroundings' look.
    rim = cv2.dilate(hole, np.ones((3, 3), np.uint8)).astype(np.float32) / 255.0
    mask = np.maximum(cv2.GaussianBlur(rim, (0, 0), 1.5), hole.astype(np.float32) / 255.0)
    return filled, np.clip(normalised(mask), 0.0, 1.0)


def _random_blobs(shape_hw, rect: Box, rng: np.random.Generator) -> np.ndarray:
    """uint8 mask (255 = hole) of 1-3 random ellipses centred in the inner face."""
    hole = np.zeros(shape_hw, np.uint8)
    side = box_side(rect)
    x, y, bw, bh = shrink_rect(rect, 0.8)
    for _ in range(int(rng.integers(1, 4))):
        centre = (round(x + rng.uniform(0, bw)), round(y + rng.uniform(0, bh)))
        axes = tuple(max(1, round(side * rng.uniform(0.08, 0.2))) for _ in range(2))
        cv2.ellipse(hole, centre, axes, rng.uniform(0, 180), 0, 360, 255, thickness=-1)
    return hole


# ---------------------------------------------------------------- registry and entry points

MANIPULATIONS = {
    "self_blend": self_blend,
    "splice": splice,
    "copy_move": copy_move,
    "resample": resample,
    "warp": warp,
    "color_mismatch": color_mismatch,
    "inpaint": inpaint,
}

# The ops used when none are named (training's online fakes, the stacker's editing fakes,
# make_fakes, the demo): all of them, in this order (a random draw picks by position).
DEFAULT_OPS = tuple(MANIPULATIONS)


def check_names(names) -> list[str]:
    """The names as a list, or KeyError naming the unknown ones and the valid ones (or the
    removed one)."""
    names = [names] if isinstance(names, str) else list(names)
    check_removed_names("online_fake_ops", names, error=UnknownNameError)
    unknown = [n for n in names if n not in MANIPULATIONS]
    if unknown or not names:
        raise UnknownNameError(f"unknown manipulation(s) {unknown or '(none given)'}; "
                       f"valid names: {', '.join(MANIPULATIONS)}")
    return names


def as_rng(seed_or_rng) -> np.random.Generator:
    if isinstance(seed_or_rng, np.random.Generator):
        return seed_or_rng
    if isinstance(seed_or_rng, (int, np.integer)) and not isinstance(seed_or_rng, bool):
        return np.random.default_rng(int(seed_or_rng))
    raise TypeError(f"expected an int seed or a numpy Generator, got {type(seed_or_rng).__name__}")


def apply_manipulation(name, image, seed_or_rng, donor=None, face_box=None, landmarks=None):
    """Run one named op; returns (fake, mask)."""
    (name,) = check_names([name])
    return MANIPULATIONS[name](image, as_rng(seed_or_rng), donor=donor, face_box=face_box, landmarks=landmarks)


def fake_from_face_crop(crop, rng, donor, margin: float, names=None, landmarks=None):
    """An editing fake of a square face crop made by `data_prep.faces` (the face box grown by
    `margin` on every side, centred), as training and the stacker's fitting make them;
    returns (fake, mask, op name)."""
    side = crop.shape[0]
    face = round(side / (1 + 2 * margin))
    box = ((side - face) // 2, (side - face) // 2, face, face)
    return random_manipulation(crop, rng, donor=donor, face_box=box, names=names, landmarks=landmarks)


def random_manipulation(image, rng, donor=None, face_box=None, names=None, landmarks=None):
    """Pick an op uniformly from `names` (default: DEFAULT_OPS); returns (fake, mask, name)."""
    rng = as_rng(rng)
    names = check_names(DEFAULT_OPS if names is None else names)
    name = names[int(rng.integers(len(names)))]
    fake, mask = MANIPULATIONS[name](image, rng, donor=donor, face_box=face_box, landmarks=landmarks)
    return fake, mask, name
