"""The part of the face crop an expert sees (`expert.<name>.region`), the same in training and
in every inference path.

  face   the whole face crop (the default)
  mouth  the square of MOUTH_SIDE mouth widths around the mouth, found by dlib's 68 landmarks
         on the face crop; the mouth's native pixels for an expert of about that input size.
         NeuralTextures and Face2Face change the mouth and the expression only, and a swap
         blends around mouth and chin: a mouth expert beside the cpu profile's three lifted
         FF++ -> lfw_faceswap from 0.780 to 0.805, FF++ itself level (RESULTS.md).

    points = detect_landmarks(crop)                     # or FaceCropCache.landmarks(path)
    x0, y0, x1, y1 = region_box(crop.shape[:2], points, "mouth")
    tensor = region_tensor(crop, "mouth", 80)           # the landmarks found here unless given
"""
from __future__ import annotations

import numpy as np
import torch

from common.errors import ConfigError
from data_prep.landmarks import MOUTH
from data_prep.transforms import crop_to_tensor

REGIONS = ("face", "mouth")
MOUTH_SIDE = 1.3        # the mouth crop's side, in mouth widths (corner to corner)
# No landmarks (dlib finds no face in about 1 % of FF++ crops): where a mouth sits on average
# in a centred face crop, a square of this share of the crop's side.
FALLBACK_CENTRE, FALLBACK_SIDE = (0.5, 0.75), 0.4


def check_region(region: str, key: str = "region") -> str:
    if region not in REGIONS:
        raise ConfigError(f"{key}: unknown region {region!r}; known: {list(REGIONS)}")
    return region


def region_box(shape_hw, points: np.ndarray | None, region: str) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of `region` in a face crop of shape `shape_hw`: a square, moved (not
    cut) to lie inside the crop, so a mouth at the crop's edge keeps its pixels."""
    h, w = shape_hw[:2]
    if check_region(region) == "face":
        return 0, 0, w, h
    if points is None:
        cx, cy, side = FALLBACK_CENTRE[0] * w, FALLBACK_CENTRE[1] * h, FALLBACK_SIDE * min(h, w)
    else:
        mouth = points[MOUTH]
        cx, cy = mouth.mean(axis=0)
        side = MOUTH_SIDE * float(np.linalg.norm(points[54] - points[48]))  # corners 48, 54
    side = int(round(min(max(side, 8.0), h, w)))
    x0 = int(round(min(max(cx - side / 2, 0), w - side)))
    y0 = int(round(min(max(cy - side / 2, 0), h - side)))
    return x0, y0, x0 + side, y0 + side


def crop_region(image: np.ndarray, points: np.ndarray | None, region: str) -> np.ndarray:
    """`image` (H x W [x C], a face crop or a map aligned with it) cut to `region`."""
    x0, y0, x1, y1 = region_box(image.shape, points, region)
    return image if (x0, y0, x1, y1) == (0, 0, image.shape[1], image.shape[0]) else image[y0:y1, x0:x1]


FIND = "find"  # region_tensor's points: find the landmarks on the crop (None: none were found)


def region_tensor(crop: np.ndarray, region: str, size: int, points: np.ndarray | str | None = FIND) -> torch.Tensor:
    """A face crop -> the uint8 tensor (3, size, size) an expert of this region and input size
    sees; the crop's landmarks are found here unless given (or the region needs none)."""
    if isinstance(points, str):
        from data_prep.landmarks import detect_landmarks
        points = detect_landmarks(crop) if region != "face" else None
    return crop_to_tensor(crop_region(crop, points, region), size)
