"""Where an editing fake is edited: the face region, soft face-shaped masks, and blending.

The shared geometry of the editing operations (`data_prep.manipulations`): a face box
(x, y, w, h), clipped to the image or replaced by a centred default face when it is unusable;
a soft mask in [0, 1] (how strongly each pixel is replaced: an ellipse in the face box or the
hull of the 68 facial landmarks, jittered, elastically bent and blurred); and the blend
mask * edited + (1 - mask) * image.
"""
from __future__ import annotations

import cv2
import numpy as np

from data_prep.landmarks import landmark_region

MIN_SIDE = 8                   # smallest image side the ops accept
MIN_FACE_SIDE = 4              # a clipped face box smaller than this falls back to the default
DEFAULT_FACE_FRACTION = 0.6    # face_box=None: centred box of this fraction of width and height

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), end-exclusive, inside the image


# ---------------------------------------------------------------- images and boxes

def check_image(image, what: str = "image", min_side: int = MIN_SIDE) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
            or image.shape[2] != 3:
        got = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) \
            else type(image).__name__
        raise ValueError(f"{what} must be an H x W x 3 uint8 array, got {got}")
    if min(image.shape[:2]) < min_side:
        raise ValueError(f"{what} is {image.shape[1]}x{image.shape[0]}; "
                         f"each side must be at least {min_side} pixels")
    return np.ascontiguousarray(image)


def face_rect(shape_hw, face_box) -> Box:
    """The face box clipped to the image, or the centred default face."""
    h, w = shape_hw
    if face_box is not None:
        x, y, bw, bh = (float(v) for v in face_box)
        x0, y0 = max(0, round(x)), max(0, round(y))
        x1, y1 = min(w, round(x + bw)), min(h, round(y + bh))
        if x1 - x0 >= MIN_FACE_SIDE and y1 - y0 >= MIN_FACE_SIDE:
            return x0, y0, x1, y1
    bw, bh = max(1, round(w * DEFAULT_FACE_FRACTION)), max(1, round(h * DEFAULT_FACE_FRACTION))
    x0, y0 = (w - bw) // 2, (h - bh) // 2
    return x0, y0, x0 + bw, y0 + bh


def shrink_rect(rect: Box, factor: float) -> tuple[float, float, float, float]:
    """(x, y, w, h) of the rect scaled by `factor` about its centre."""
    x0, y0, x1, y1 = rect
    bw, bh = (x1 - x0) * factor, (y1 - y0) * factor
    return (x0 + x1 - bw) / 2, (y0 + y1 - bh) / 2, bw, bh


def box_side(rect: Box) -> int:
    return min(rect[2] - rect[0], rect[3] - rect[1])


def blend(image: np.ndarray, edited: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """mask * edited + (1 - mask) * image, rounded back to uint8."""
    base = image.astype(np.float32)
    out = base + mask[..., None] * (edited.astype(np.float32) - base)
    return to_uint8(out)


def blending_boundary(mask: np.ndarray) -> np.ndarray:
    """Face X-ray's boundary 4 m (1 - m) of a soft blend mask m, scaled to peak at 1 first
    (a self-blend's mask peaks at its blend ratio): 1 where edited and original pixels mix
    half and half, 0 inside the untouched image and inside the fully replaced region."""
    peak = float(mask.max())
    m = mask / peak if peak > 0 else mask
    return (4.0 * m * (1.0 - m)).astype(np.float32)


def to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def normalised(mask: np.ndarray) -> np.ndarray:
    """Scale so the strongest pixel is 1 (blurring lowers the peak of small shapes)."""
    peak = float(mask.max())
    return (mask / peak).astype(np.float32) if peak > 0 else mask.astype(np.float32)


def smooth_field(shape_hw, rng: np.random.Generator, grid: int, amplitude: float) -> np.ndarray:
    """A smooth random H x W field: Gaussian noise on a coarse grid, upsampled bicubically."""
    h, w = shape_hw
    coarse = rng.normal(0.0, amplitude, size=(grid, grid)).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


def pixel_grid(shape_hw) -> tuple[np.ndarray, np.ndarray]:
    h, w = shape_hw
    return np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))


# ---------------------------------------------------------------- the soft face mask

def soft_face_mask(shape_hw, face_box, rng: np.random.Generator, deform: bool = True,
                   landmarks=None) -> np.ndarray:
    """Soft face-shaped mask, peak 1, float32 H x W in [0, 1]: the hull of the 68 facial
    `landmarks` when given (data_prep.landmarks), else an ellipse inscribed in the (clipped)
    face box.

    With `deform`, the shape is jittered and bent by a smooth elastic field and blurred by a
    random amount, so blending boundaries do not all look the same.
    """
    h, w = int(shape_hw[0]), int(shape_hw[1])
    if landmarks is not None:
        region, side = landmark_region((h, w), landmarks, rng)
        return _bend_and_blur(region, rng, side, rng.uniform(0.01, 0.08) if deform else 0.04, deform)
    rect = face_rect((h, w), face_box)
    side = box_side(rect)
    x0, y0, x1, y1 = rect
    centre = ((x0 + x1) / 2, (y0 + y1) / 2)
    half_axes = ((x1 - x0) / 2 * 0.9, (y1 - y0) / 2 * 0.9)
    angle, blur_fraction = 0.0, 0.08
    if deform:
        side_jitter = 0.05 * side
        centre = (centre[0] + rng.uniform(-side_jitter, side_jitter),
                  centre[1] + rng.uniform(-side_jitter, side_jitter))
        half_axes = (half_axes[0] * rng.uniform(0.8, 1.1), half_axes[1] * rng.uniform(0.8, 1.1))
        angle = rng.uniform(-15.0, 15.0)
        blur_fraction = rng.uniform(0.04, 0.12)

    ellipse = np.zeros((h, w), np.uint8)
    cv2.ellipse(ellipse, (round(centre[0]), round(centre[1])),
                (max(1, round(half_axes[0])), max(1, round(half_axes[1]))),
                angle, 0, 360, 255, thickness=-1)
    return _bend_and_blur(ellipse.astype(np.float32) / 255.0, rng, side, blur_fraction, deform,
                          amplitude=0.06, min_sigma=1.0)


def _bend_and_blur(mask, rng, side: float, blur_fraction: float, deform: bool,
                   amplitude: float = 0.04, min_sigma: float = 0.5) -> np.ndarray:
    if deform:
        bent = _elastic_deform(mask, rng, amplitude=amplitude * side)
        if bent.max() > 0.5:  # a deformation that (nearly) erased a tiny shape is dropped
            mask = bent
    sigma = max(min_sigma, blur_fraction * side)
    mask = cv2.GaussianBlur(mask, (0, 0), sigma, borderType=cv2.BORDER_CONSTANT)
    return np.clip(normalised(mask), 0.0, 1.0)


def _elastic_deform(mask: np.ndarray, rng: np.random.Generator, amplitude: float) -> np.ndarray:
    grid = int(rng.integers(3, 6))
    dx = smooth_field(mask.shape, rng, grid, amplitude)
    dy = smooth_field(mask.shape, rng, grid, amplitude)
    xs, ys = pixel_grid(mask.shape)
    return cv2.remap(mask, xs + dx, ys + dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def feathered_rect(shape_hw, rect_yxhw) -> np.ndarray:
    """1 inside the rectangle, fading to 0 at its border, exactly 0 outside it."""
    y, x, ph, pw = rect_yxhw
    margin = max(1, round(0.15 * min(ph, pw)))
    inside = np.zeros(shape_hw, np.float32)
    inside[y:y + ph, x:x + pw] = 1.0
    core = np.zeros(shape_hw, np.float32)
    core[y + margin:y + ph - margin, x + margin:x + pw - margin] = 1.0
    if not core.any():
        core = inside.copy()
    mask = cv2.GaussianBlur(core, (0, 0), margin / 2 + 0.5) * inside
    return np.clip(normalised(mask), 0.0, 1.0)
