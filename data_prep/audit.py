"""Leakage and duplicate audit of a data root.

    python -m data_prep.audit DATA_ROOT [--max-distance 4] [--json audit.json]

Reads the same folders and label files as training (`data_prep.dataset`), then reports:

* exact duplicates: images with the same decoded pixels (sha256 of the RGB array, so a
  re-saved PNG of the same pixels counts; how many are also byte-identical is shown);
* near duplicates: a 64-bit perceptual hash (pHash: the signs of the lowest 8 x 8 DCT
  frequencies of a 32 x 32 grey thumbnail) at Hamming distance <= `--max-distance`, which
  catches re-encoded, slightly resized or recoloured copies and neighbouring video frames
  (distances come out even: each hash has 32 bits set, those above the median);
* label conflicts: the same pixels labelled real in one place and fake in another.

Pairs are counted per pair of splits (`trainset~valset`, `trainset~trainset`, ...): a pair
across trainset and valset inflates validation, one across trainset and testset inflates
the test score. Unreadable files are listed, not fatal. Exit status: 0 when the audit ran
(whatever it found: `train.sh` only warns), 2 when the data root cannot be read.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from common.cli import CommandLine, entry_point
from common.files import atomic_write
from data_prep.dataset import SPLITS, DataLayoutError, list_images
from data_prep.images import ImageDecodeError, decode_image
from data_prep.labels import label_path, read_label_file

# Of 64 bits. On the FF++ crops, pairs this close were frames of one video (a real and its
# fakes, or neighbouring frames); at 8 about half of the pairs looked at were different people.
DEFAULT_MAX_DISTANCE = 4
HASH_SIZE = 8             # 8 x 8 DCT coefficients -> 64 bits
THUMBNAIL = 32            # the grey thumbnail the DCT is taken of
EXAMPLES = 5              # pairs or files shown per finding in the printed report


@dataclass
class Fingerprint:
    split: str
    path: Path
    target: int | None                   # 1 = fake, 0 = real, None = unlabelled
    file_sha256: str | None = None       # None: the bytes could not be read
    pixel_sha256: str | None = None      # None: not a decodable image
    phash: int | None = None
    error: str = ""

    @property
    def label(self) -> str:
        return f"{self.split}/{self.path.name}"


# ----------------------------------------------------------------------------- hashing

def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)
    return np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n))


_DCT = _dct_matrix(THUMBNAIL)


def perceptual_hash(rgb: np.ndarray) -> int:
    """64-bit pHash of an RGB image: bit set where a low DCT frequency of its 32 x 32 grey
    thumbnail is above their median (the DC term, the mean brightness, is left out of the
    median so that a brightness change moves no bit)."""
    grey = Image.fromarray(rgb).convert("L").resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BOX)
    coefficients = _DCT @ np.asarray(grey, np.float64) @ _DCT.T
    low = coefficients[:HASH_SIZE, :HASH_SIZE].ravel()
    bits = low > np.median(low[1:])
    return int(np.packbits(bits).view(">u8")[0])


def fingerprint(split: str, path: Path, target: int | None) -> Fingerprint:
    result = Fingerprint(split, path, target)
    try:
        data = path.read_bytes()
    except OSError as err:
        result.error = f"{path}: cannot read ({err.strerror or err})"
        return result
    result.file_sha256 = hashlib.sha256(data).hexdigest()
    try:
        rgb = decode_image(data)
    except ImageDecodeError as err:
        result.error = f"{path}: {err.reason}"
        return result
    result.pixel_sha256 = hashlib.sha256(f"{rgb.shape}".encode() + rgb.tobytes()).hexdigest()
    result.phash = perceptual_hash(rgb)
    return result


# ----------------------------------------------------------------------------- the data root

def labelled_images(root: Path) -> list[tuple[str, Path, int | None]]:
    """(split, image path, target or None) of every image under the data root, read as
    training reads it: `<split>/` + `<split>_label.txt` (testset labels when present), or
    `real/` + `fake/` (reported as one split, `real+fake`, which training splits at random)."""
    if not root.is_dir():
        raise DataLayoutError(f"{root}: data root is not a directory")
    images = []
    if any((root / split).is_dir() for split in SPLITS):
        for split in SPLITS:
            folder, label_file = root / split, label_path(root, split)
            if not folder.is_dir():
                continue
            labels = read_label_file(label_file) if label_file.exists() else {}
            images += [(split, p, labels.get(p.name)) for p in list_images(folder)]
    elif (root / "real").is_dir() and (root / "fake").is_dir():
        images += [("real+fake", p, 0) for p in list_images(root / "real")]
        images += [("real+fake", p, 1) for p in list_images(root / "fake")]
    else:
        raise DataLayoutError(f"{root}: expected trainset/ (valset/, testset/), or real/ + fake/")
    return images


# ----------------------------------------------------------------------------- findings

def split_pair(a: Fingerprint, b: Fingerprint) -> str:
    first, second = sorted((a.split, b.split), key=lambda s: (SPLITS + (s,)).index(s))
    return f"{first}~{second}"


def exact_duplicate_groups(prints: list[Fingerprint]) -> list[list[Fingerprint]]:
    """Groups of two or more images with the same decoded pixels (or, for files that do not
    decode, the same bytes)."""
    groups: dict[str, list[Fingerprint]] = {}
    for p in prints:
        key = p.pixel_sha256 or (p.file_sha256 and "bytes:" + p.file_sha256)
        if key:
            groups.setdefault(key, []).append(p)
    return [g for g in groups.values() if len(g) > 1]


def near_duplicate_pairs(hashes: np.ndarray, max_distance: int) -> list[tuple[int, int, int]]:
    """(i, j, distance), i < j, of the 64-bit hashes at most `max_distance` bits apart:
    all pairs in blocks of rows (about 4M comparisons each, so memory stays small)."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    n = len(hashes)
    rows = max(1, (1 << 22) // max(n, 1))
    pairs = []
    for start in range(0, n, rows):
        block = hashes[start:start + rows]
        distance = np.bitwise_count(block[:, None] ^ hashes[None, :])
        i, j = np.nonzero(distance <= max_distance)
        i += start
        later = j > i
        pairs += zip(i[later].tolist(), j[later].tolist(), distance[i[later] - start, j[later]].tolist())
    return pairs


def audit(root, max_distance: int = DEFAULT_MAX_DISTANCE, show_progress: bool = False) -> dict:
    """The findings as a JSON-ready dict (see the module docstring)."""
    started = time.time()
    images = labelled_images(Path(root))
    prints = [fingerprint(split, path, target)
              for split, path, target in tqdm(images, desc="audit", disable=not show_progress, leave=False)]

    exact = exact_duplicate_groups(prints)
    exact_pairs = Counter(split_pair(g[a], g[b]) for g in exact
                          for a in range(len(g)) for b in range(a + 1, len(g)))
    conflicts = [g for g in exact if {p.target for p in g} >= {0, 1}]

    hashed = [p for p in prints if p.phash is not None]
    near = [(hashed[i], hashed[j], d) for i, j, d in
            near_duplicate_pairs(np.array([p.phash for p in hashed], dtype=np.uint64), max_distance)
            if hashed[i].pixel_sha256 != hashed[j].pixel_sha256]  # exact copies are counted above
    near.sort(key=lambda pair: (pair[0].split == pair[1].split, pair[2]))  # leaks across splits first
    exact.sort(key=lambda group: len({p.split for p in group}) == 1)
    near_pairs = Counter(split_pair(a, b) for a, b, _ in near)

    return {
        "root": str(root), "seconds": round(time.time() - started, 1),
        "images": dict(Counter(p.split for p in prints)),
        "max_distance": max_distance,
        "exact_duplicates": {
            "groups": [{"files": [p.label for p in g], "targets": [p.target for p in g],
                        "same_bytes": len({p.file_sha256 for p in g}) == 1} for g in exact],
            "pairs": dict(exact_pairs)},
        "near_duplicates": {
            "pairs": dict(near_pairs),
            "labelled_differently": sum(1 for a, b, _ in near if {a.target, b.target} == {0, 1}),
            "list": [{"a": a.label, "b": b.label, "distance": d, "targets": [a.target, b.target]}
                     for a, b, d in near]},
        "label_conflicts": [[f"{p.label} ({p.target})" for p in g] for g in conflicts],
        "unreadable": [p.error for p in prints if p.error],
    }


# ----------------------------------------------------------------------------- report

def _counts(pairs: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(pairs.items())) or "none"


def format_report(result: dict) -> str:
    images = result["images"]
    exact, near = result["exact_duplicates"], result["near_duplicates"]
    lines = [
        f"audit of {result['root']}: {sum(images.values())} images "
        f"({', '.join(f'{k} {v}' for k, v in images.items())}) in {result['seconds']} s",
        f"exact duplicates (same pixels): {len(exact['groups'])} group(s), "
        f"{sum(1 for g in exact['groups'] if g['same_bytes'])} of them byte-identical; "
        f"pairs: {_counts(exact['pairs'])}",
    ]
    lines += [f"  e.g. {' = '.join(g['files'])}" for g in exact["groups"][:EXAMPLES]]
    lines.append(f"near duplicates (perceptual hash within {result['max_distance']} of 64 bits): "
                 f"{sum(near['pairs'].values())} pair(s), {near['labelled_differently']} labelled "
                 f"differently; pairs: {_counts(near['pairs'])}")
    lines += [f"  e.g. {p['a']} ~ {p['b']} (distance {p['distance']})" for p in near["list"][:EXAMPLES]]
    lines.append(f"label conflicts (same pixels labelled real and fake): {len(result['label_conflicts'])}")
    lines += [f"  e.g. {' = '.join(g)}" for g in result["label_conflicts"][:EXAMPLES]]
    lines.append(f"unreadable: {len(result['unreadable'])}")
    lines += [f"  {e}" for e in result["unreadable"][:EXAMPLES]]
    leaks = {k: v for k, v in {**exact["pairs"], **near["pairs"]}.items() if k.split("~")[0] != k.split("~")[1]}
    if leaks or result["label_conflicts"]:
        lines.append("warning: duplicates across splits inflate validation/test scores, and label "
                     "conflicts teach both answers; remove them before trusting the metrics")
    return "\n".join(lines)


def _write_json(path: Path, result: dict) -> None:
    with atomic_write(path) as f:
        f.write(json.dumps(result, indent=1))


@entry_point
def main(argv=None) -> int:
    parser = CommandLine("python -m data_prep.audit", __doc__, config=False)
    parser.add_argument("data_root", type=Path)
    parser.add_argument("--max-distance", type=int, default=DEFAULT_MAX_DISTANCE,
                        help="largest Hamming distance (of 64 bits) between near duplicates")
    parser.add_argument("--json", type=Path, help="also write every finding here")
    args = parser.parse_args(argv)
    result = audit(args.data_root, args.max_distance, show_progress=sys.stderr.isatty())
    print(format_report(result))
    if args.json:
        _write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
