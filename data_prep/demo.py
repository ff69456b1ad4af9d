"""A small, fully offline, labelled demo data set in the competition layout.

    python -m data_prep.demo OUT [--seed 0] [--n-train 200] [--n-val 80] [--n-test 80] [--size 160]

writes

    OUT/trainset/<hex>.jpg   OUT/trainset_label.txt   (CSV "img_name,target"; 1 = fake, 0 = real)
    OUT/valset/...           OUT/valset_label.txt
    OUT/testset/...          OUT/testset_label.txt

Real images are random crops (position, scale, flip, mild colour jitter) of the colour
photographs that ship inside installed packages: scikit-image's `skimage/data` folder and
matplotlib's `grace_hopper.jpg`; nothing is downloaded. The two portraits (astronaut,
Grace Hopper) are drawn more often and usually cropped around the face, since the toolkit
is about faces. A fake is a fresh real crop edited by `random_manipulation`, with another
real crop as donor. Both classes are then saved the same way (JPEG, random quality 75-95),
so the edit is the only difference between them.

Every split has its own random stream derived from the seed: the same seed gives
byte-identical files. Splits share the source photographs (there are only ten) but not crops.
"""
from __future__ import annotations

import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from common.cli import CommandLine, entry_point
from common.errors import OutputExistsError, UsageError, UserError
from data_prep.dataset import SPLITS
from data_prep.images import JPEG_QUALITY_RANGE, decode_image, encode_jpeg
from data_prep.labels import label_path, write_label_file
from data_prep.manipulations import random_manipulation

MAX_PHOTO_SIDE = 720           # photos are shrunk once at load; crops never need more
FACE_PHOTO_WEIGHT = 3.0        # a portrait is picked this many times as often as another photo
FACE_CROP_PROBABILITY = 0.8    # portraits: how often the crop is built around the face

# Colour photographs in skimage/data (on disk with every install), and where the face is
# ((x, y, w, h) in the original pixels, found once with OpenCV's LBP face cascade).
SKIMAGE_PHOTOS = {
    "astronaut.png": (173, 71, 97, 97),
    "chelsea.png": None,
    "coffee.png": None,
    "rocket.jpg": None,
    "motorcycle_left.png": None,
    "motorcycle_right.png": None,
    "hubble_deep_field.jpg": None,
    "ihc.png": None,
    "retina.jpg": None,
}
GRACE_HOPPER_FACE = (159, 114, 210, 210)

_DEMO_FILE = re.compile(r"^[0-9a-f]{16}\.jpg$")  # names this module writes


@dataclass
class Photo:
    name: str
    pixels: np.ndarray               # H x W x 3 uint8 RGB
    face_box: tuple | None           # (x, y, w, h) in `pixels`, or None


# ---------------------------------------------------------------- source photographs

def load_source_photos() -> list[Photo]:
    """The packaged photographs, decoded with the project decoder and shrunk to MAX_PHOTO_SIDE."""
    import skimage.data
    candidates = [(Path(skimage.data.__file__).parent / name, face)
                  for name, face in SKIMAGE_PHOTOS.items()]
    grace_hopper = _grace_hopper_path()
    if grace_hopper is not None:
        candidates.append((grace_hopper, GRACE_HOPPER_FACE))
    photos = [_load_photo(path, face) for path, face in candidates if path.is_file()]
    if len(photos) < 2:
        raise UserError("demo needs the photographs shipped with scikit-image / matplotlib; "
                           f"found only {[p.name for p in photos]}")
    return photos


def _grace_hopper_path() -> Path | None:
    try:
        import matplotlib
    except ImportError:
        return None
    return Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def _load_photo(path: Path, face_box) -> Photo:
    pixels = decode_image(path)
    scale = min(1.0, MAX_PHOTO_SIDE / max(pixels.shape[:2]))
    if scale < 1.0:
        h, w = pixels.shape[:2]
        pixels = cv2.resize(pixels, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        if face_box is not None:
            face_box = tuple(round(v * scale) for v in face_box)
    return Photo(path.name, np.ascontiguousarray(pixels), face_box)


# ---------------------------------------------------------------- real crops

def random_real_crop(photos: list[Photo], rng: np.random.Generator, size: int):
    """(size x size RGB crop, face box in crop pixels or None) from a random photo."""
    weights = np.array([FACE_PHOTO_WEIGHT if p.face_box else 1.0 for p in photos])
    photo = photos[int(rng.choice(len(photos), p=weights / weights.sum()))]
    if photo.face_box is not None and rng.random() < FACE_CROP_PROBABILITY:
        x0, y0, side = _crop_around_face(photo, rng)
    else:
        x0, y0, side = _crop_anywhere(photo, rng)
    crop = cv2.resize(photo.pixels[y0:y0 + side, x0:x0 + side], (size, size),
                      interpolation=cv2.INTER_AREA if side > size else cv2.INTER_CUBIC)
    face_box = _face_in_crop(photo.face_box, x0, y0, side, size)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
        if face_box is not None:
            face_box = (size - face_box[0] - face_box[2],) + face_box[1:]
    return _mild_colour_jitter(crop, rng), face_box


def _crop_around_face(photo: Photo, rng) -> tuple[int, int, int]:
    h, w = photo.pixels.shape[:2]
    fx, fy, fw, fh = photo.face_box
    face_side = max(fw, fh)
    side = min(h, w, round(face_side * rng.uniform(1.4, 2.4)))
    cx = fx + fw / 2 + rng.uniform(-0.2, 0.2) * face_side
    cy = fy + fh / 2 + rng.uniform(-0.2, 0.2) * face_side
    x0 = int(np.clip(round(cx - side / 2), 0, w - side))
    y0 = int(np.clip(round(cy - side / 2), 0, h - side))
    return x0, y0, side


def _crop_anywhere(photo: Photo, rng) -> tuple[int, int, int]:
    h, w = photo.pixels.shape[:2]
    side = max(16, round(min(h, w) * rng.uniform(0.35, 1.0)))
    side = min(side, h, w)
    return int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1)), side


def _face_in_crop(face_box, x0, y0, side, size):
    """The face box in resized-crop pixels, if the face lies entirely inside the crop."""
    if face_box is None:
        return None
    fx, fy, fw, fh = face_box
    if fx < x0 or fy < y0 or fx + fw > x0 + side or fy + fh > y0 + side:
        return None  # manipulations then assume a centred face
    scale = size / side
    return (round((fx - x0) * scale), round((fy - y0) * scale), round(fw * scale), round(fh * scale))


def _mild_colour_jitter(rgb: np.ndarray, rng) -> np.ndarray:
    """Small brightness / contrast / saturation change so crops of one photo differ in colour."""
    values = rgb.astype(np.float32)
    gray = values.mean(axis=2, keepdims=True)
    values = gray + (values - gray) * rng.uniform(0.85, 1.15)            # saturation
    values = (values - values.mean()) * rng.uniform(0.9, 1.1) + values.mean()  # contrast
    values += rng.uniform(-12.0, 12.0)                                   # brightness
    return np.ascontiguousarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


# ---------------------------------------------------------------- one split

def build_split(photos, split_dir: Path, n_images: int, size: int, rng) -> list[tuple[str, int]]:
    """Write n_images JPEGs (half fake) into split_dir; returns the (name, target) rows."""
    n_fake = n_images // 2
    targets = rng.permutation([1] * n_fake + [0] * (n_images - n_fake))
    rows, used_names = [], set()
    for target in targets:
        image, face_box = random_real_crop(photos, rng, size)
        if target == 1:
            donor, _ = random_real_crop(photos, rng, size)
            image, _, _ = random_manipulation(image, rng, donor=donor, face_box=face_box)
        name = _unique_hex_name(rng, used_names)
        quality = int(rng.integers(JPEG_QUALITY_RANGE[0], JPEG_QUALITY_RANGE[1] + 1))
        (split_dir / name).write_bytes(encode_jpeg(image, quality))
        rows.append((name, int(target)))
    return rows


def _unique_hex_name(rng, used: set) -> str:
    while True:
        name = rng.bytes(8).hex() + ".jpg"
        if name not in used:
            used.add(name)
            return name


def _prepare_split_dir(split_dir: Path) -> None:
    """Empty a previous demo split (only if every file in it is ours), then create it."""
    if split_dir.exists():
        foreign = [p.name for p in split_dir.iterdir() if not _DEMO_FILE.match(p.name)]
        if foreign:
            raise OutputExistsError(f"{split_dir}: holds files the demo did not write "
                                  f"(e.g. {foreign[0]}); choose another output folder")
        shutil.rmtree(split_dir)
    split_dir.mkdir(parents=True)


# ---------------------------------------------------------------- entry points

def build_demo(out_dir, seed=0, n_train=200, n_val=80, n_test=80, size=160) -> Path:
    """Build the demo data set under out_dir and return it as a Path."""
    if size < 32:
        raise UsageError(f"size must be at least 32 pixels, got {size}")
    counts = {"trainset": n_train, "valset": n_val, "testset": n_test}
    if any(n < 0 for n in counts.values()):
        raise UsageError(f"image counts must be >= 0, got {counts}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    photos = load_source_photos()
    for split_index, split in enumerate(SPLITS):
        rng = np.random.default_rng([seed, split_index])  # a split's stream ignores the others' sizes
        split_dir = out / split
        _prepare_split_dir(split_dir)
        rows = build_split(photos, split_dir, counts[split], size, rng)
        write_label_file(label_path(out, split), rows)
    return out


@entry_point
def main(argv=None) -> int:
    parser = CommandLine("python -m data_prep.demo", __doc__, config=False)
    parser.add_argument("out", help="output folder (the data root)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-val", type=int, default=80)
    parser.add_argument("--n-test", type=int, default=80)
    parser.add_argument("--size", type=int, default=160, help="side of the square images")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = build_demo(args.out, args.seed, args.n_train, args.n_val, args.n_test, args.size)
    counts = ", ".join(f"{s} {n}" for s, n in zip(SPLITS, (args.n_train, args.n_val, args.n_test)))
    print(f"demo data set in {out}: {counts} images (half fake), {args.size}px, "
          f"seed {args.seed}, {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
