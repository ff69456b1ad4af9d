"""Face detectors compared: detection rate and milliseconds per image.

    python -m bench.face_detectors IMAGE_DIR [IMAGE_DIR ...] [--limit 200] [--threads 1]

For each folder, the first `--limit` images (by name) are decoded once, then each detector
(`face.detector`: lbp, dlib) runs on every image; the table gives the share of images with a
face found and the mean detection time (decoding excluded), plus the time of dlib's 68-point
landmarks on the found faces (what the editing fakes use). One thread by default, as in a
DataLoader worker.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from common.cli import CommandLine, entry_point
from common.errors import UserError
from configs import FaceConfig
from data_prep.dataset import list_images
from data_prep.faces import detect_face
from data_prep.images import ImageDecodeError, decode_image

DETECTORS = ("lbp", "dlib")


def measure(images: list[np.ndarray]) -> dict[str, dict[str, float]]:
    from data_prep.landmarks import detect_landmarks

    rows = {}
    for name in DETECTORS:
        cfg = FaceConfig(detector=name)
        detect_face(images[0], cfg)  # load the model outside the timing
        start = time.perf_counter()
        found = sum(detect_face(img, cfg) is not None for img in images)
        rows[name] = {"found": found / len(images), "ms": 1000 * (time.perf_counter() - start) / len(images)}
    start = time.perf_counter()
    points = sum(detect_landmarks(img) is not None for img in images)
    rows["dlib + 68 landmarks"] = {"found": points / len(images),
                                   "ms": 1000 * (time.perf_counter() - start) / len(images)}
    return rows


@entry_point
def main(argv=None) -> int:
    parser = CommandLine("python -m bench.face_detectors", __doc__, config=False)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import cv2
    import torch
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    print("| images | detector | faces found | ms / image |\n|---|---|---:|---:|")
    for folder in args.folders:
        if not folder.is_dir():
            raise UserError(f"{folder}: not a directory")
        images = []
        for path in list_images(folder)[: args.limit]:
            try:
                images.append(decode_image(path))
            except ImageDecodeError as err:
                print(f"warning: skipped {err}", file=sys.stderr)
        if not images:
            raise UserError(f"{folder}: no readable images")
        side = int(np.median([max(img.shape[:2]) for img in images]))
        for name, row in measure(images).items():
            print(f"| {folder} ({len(images)}, {side} px) | {name} | {100 * row['found']:.1f} % | {row['ms']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
