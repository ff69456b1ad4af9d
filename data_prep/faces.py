"""Face crop, identical in training and inference.

Detectors (`face.detector`):
* `lbp`: OpenCV's LBP frontal-face cascade. OpenCV 5's Python wheel no longer ships
  `CascadeClassifier` nor the cascade files, so we run the same OpenCV cascade through
  scikit-image's `Cascade`, which ships the XML file (nothing is downloaded).
* `dlib`: dlib's HOG frontal-face detector (data_prep.landmarks; the `dlib-bin` wheel),
  the detector the 68-point landmarks of the editing fakes are fitted with.

Crop rule: the largest detected face, grown by `margin` of its size on every side, made
square, shifted inside the image (never padded), resized to `crop_size`; with
`shrink: center` a box larger than `crop_size` is not shrunk: its central `crop_size`
window is kept at native resolution. When no face is
found, `fallback="center"` takes a centred square of `fallback_fraction` of the short side
(photographs of people are usually centred); `fallback="full"` resizes the whole image.
With `enabled=false` every image goes through the fallback rule.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np

from common.files import atomic_write
from configs import ConfigError, FaceConfig
from data_prep.images import decode_image

_DETECTOR = None  # one cascade per process; skimage's Cascade is not picklable across workers
# Faces are detected on a copy whose longer side is at most this: the cascade's cost grows
# with the pixels, and a face that fills min_face of the short side is still >= 36 px there.
DETECT_SIDE = 320


def _detector():
    global _DETECTOR
    if _DETECTOR is None:
        import skimage.data
        import skimage.feature
        _DETECTOR = skimage.feature.Cascade(skimage.data.lbp_frontal_face_cascade_filename())
    return _DETECTOR


def detect_largest_face(rgb: np.ndarray, min_face: float = 0.2) -> tuple[int, int, int, int] | None:
    """(x, y, w, h) of the largest face, or None. Runs on a <=320 px grayscale copy for speed."""
    faces = _lbp_faces(rgb, min_face, DETECT_SIDE)
    return faces[0] if faces else None


def _lbp_faces(rgb: np.ndarray, min_face: float, max_side: int) -> list[tuple[int, int, int, int]]:
    """Every face the LBP cascade finds on a grayscale copy of at most `max_side` pixels,
    largest first, as (x, y, w, h) in `rgb`'s pixels."""
    h, w = rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    if scale < 1.0:
        gray = cv2.resize(gray, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    side = min(gray.shape)
    min_px = max(24, int(min_face * side))
    if side < min_px:
        return []
    found = _detector().detect_multi_scale(img=gray, scale_factor=1.2, step_ratio=1,
                                           min_size=(min_px, min_px), max_size=(side, side))
    found = sorted(found, key=lambda d: d["width"] * d["height"], reverse=True)
    return [(round(d["c"] / scale), round(d["r"] / scale), round(d["width"] / scale), round(d["height"] / scale))
            for d in found]


def _dlib_faces(rgb: np.ndarray, min_face: float, max_side: int) -> list[tuple[int, int, int, int]]:
    """Every face dlib's HOG detector finds, as `landmarks.detect_face_box` looks for the
    largest one (a copy of at most `max_side` pixels, one upsampling pass when a small copy
    shows none), largest first, as (x, y, w, h) in `rgb`'s pixels, smaller than
    `min_face` of the short side dropped as `detect_face` does."""
    from data_prep.landmarks import faces_on_copy

    h, w = rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    found = sorted(faces_on_copy(rgb, scale), key=lambda r: r.width() * r.height(), reverse=True)
    boxes = []
    for r in found:  # corners mapped back as landmarks does; dlib's width counts both edges (+1)
        left, top, right, bottom = (round(v / scale) for v in (r.left(), r.top(), r.right(), r.bottom()))
        boxes.append((left, top, right - left + 1, bottom - top + 1))
    return [b for b in boxes if min(b[2], b[3]) >= min_face * min(h, w)]


def detect_faces(rgb: np.ndarray, cfg: FaceConfig, detect_side: int = DETECT_SIDE) -> list[tuple[int, int, int, int]]:
    """Every face the configured detector finds, largest first, as (x, y, w, h) in `rgb`'s
    pixels. Detection runs on a copy whose longer side is at most `detect_side`; the
    default is the resolution `detect_face` uses, so the largest face here is the face the
    image pipeline (training) crops. Video face tracking (data_prep.tracking) needs them all."""
    if cfg.detector == "lbp":
        return _lbp_faces(rgb, cfg.min_face, detect_side)
    if cfg.detector == "dlib":
        return _dlib_faces(rgb, cfg.min_face, detect_side)
    raise ConfigError(f"face.detector must be 'lbp' or 'dlib', got {cfg.detector!r}")


def square_crop_box(shape_hw, face_box, cfg: FaceConfig) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the square crop for a face box (or the fallback when None)."""
    h, w = shape_hw
    if face_box is None:
        if cfg.fallback == "full":
            return 0, 0, w, h
        side = max(1, round(min(h, w) * cfg.fallback_fraction))
        cx, cy = w / 2, h / 2
    else:
        x, y, bw, bh = face_box
        side = round(max(bw, bh) * (1 + 2 * cfg.margin))
        cx, cy = x + bw / 2, y + bh / 2
    side = min(side, h, w)
    x0 = int(np.clip(round(cx - side / 2), 0, w - side))
    y0 = int(np.clip(round(cy - side / 2), 0, h - side))
    return x0, y0, x0 + side, y0 + side


def detect_face(rgb: np.ndarray, cfg: FaceConfig) -> tuple[int, int, int, int] | None:
    """(x, y, w, h) of the largest face by the configured detector, or None."""
    if cfg.detector == "lbp":
        return detect_largest_face(rgb, cfg.min_face)
    if cfg.detector == "dlib":
        from data_prep.landmarks import detect_face_box
        box = detect_face_box(rgb)
        if box is not None and min(box[2], box[3]) >= cfg.min_face * min(rgb.shape[:2]):
            return box
        return None
    raise ConfigError(f"face.detector must be 'lbp' or 'dlib', got {cfg.detector!r}")


def crop_face(rgb: np.ndarray, cfg: FaceConfig) -> tuple[np.ndarray, bool]:
    """Return (crop_size x crop_size RGB crop, whether a face was found)."""
    box = detect_face(rgb, cfg) if cfg.enabled else None
    return crop_at_face(rgb, box, cfg), box is not None


def crop_at_face(rgb: np.ndarray, face_box, cfg: FaceConfig) -> np.ndarray:
    """The crop_size x crop_size RGB crop around the face box (x, y, w, h) by the crop rule,
    or the fallback crop when `face_box` is None."""
    x0, y0, x1, y1 = square_crop_box(rgb.shape[:2], face_box, cfg)
    size = cfg.crop_size
    if cfg.shrink == "center" and y1 - y0 > size:
        # keep the pixels: the central crop_size window of a larger face box, not a shrunk copy
        # (resampling blurs the noise and JPEG-grid traces the detectors look for)
        x0, y0 = x0 + (x1 - x0 - size) // 2, y0 + (y1 - y0 - size) // 2
        x1, y1 = x0 + size, y0 + size
    elif cfg.shrink not in ("resize", "center"):
        raise ConfigError(f"face.shrink must be 'resize' or 'center', got {cfg.shrink!r}")
    crop = rgb[y0:y1, x0:x1]
    interp = cv2.INTER_AREA if crop.shape[0] > size else cv2.INTER_CUBIC
    return np.ascontiguousarray(cv2.resize(crop, (size, size), interpolation=interp))


class FaceCropCache:
    """Disk cache of face crops: decode and detect once, reuse every epoch and every run.

    Keyed by the file's absolute path, size and mtime plus the face settings, so an edited
    file or a changed setting is recomputed rather than served stale.
    """

    def __init__(self, cfg: FaceConfig, cache_dir: str | os.PathLike | None):
        self.cfg = cfg
        settings = json.dumps(asdict(cfg), sort_keys=True)
        self.dir = None
        if cache_dir:
            tag = hashlib.sha1(settings.encode()).hexdigest()[:10]
            self.dir = Path(cache_dir) / f"faces_{tag}"
            self.dir.mkdir(parents=True, exist_ok=True)

    def _key(self, path: Path) -> str:
        st = path.stat()
        return hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()

    def load(self, path) -> np.ndarray:
        """Face crop of an image file; raises ImageDecodeError for a broken file."""
        path = Path(path)
        return self._cached(path, ".npy", lambda: crop_face(decode_image(path), self.cfg)[0])

    def landmarks(self, path) -> np.ndarray | None:
        """68 facial landmarks (x, y) in the face crop's pixels, or None when dlib finds no
        face there; cached beside the crop (an empty array stands for None)."""
        from data_prep.landmarks import detect_landmarks

        def fit():
            points = detect_landmarks(self.load(path))
            return np.zeros((0, 2), np.float32) if points is None else points

        path = Path(path)
        points = self._cached(path, ".landmarks.npy", fit)
        return points if len(points) else None

    def _cached(self, path: Path, suffix: str, compute) -> np.ndarray:
        """The array cached for `path` under `suffix`, else `compute()`, cached atomically."""
        if self.dir is None:
            return compute()
        cached = self.dir / (self._key(path) + suffix)
        if cached.exists():
            try:
                return np.load(cached, allow_pickle=False)
            except (OSError, ValueError):
                pass  # a half-written cache file from a killed run: recompute it
        array = compute()
        with atomic_write(cached, "wb") as handle:  # parallel workers never read a partial file
            np.save(handle, array, allow_pickle=False)
        return array
