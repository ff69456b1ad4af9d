"""Video input: sample frames, score them with the image model, combine the frame scores.

A video is judged from `n_frames` frames spread evenly over its length (the centres of
n equal segments, so the very first and last frames, often black or a fade, are avoided).
Frames are fetched by seeking (`CAP_PROP_POS_FRAMES`) over long gaps, so a long video is
not decoded in full; short gaps are crossed by decoding forward, which is cheaper than a
seek (see SEEK_MIN_GAP). When the container does not report its frame count or a read
fails, we fall back to counting the frames that really decode and reading the wanted ones
in one sequential pass.

Decoded resolution is capped (`max_side`, default MAX_SIDE = 1920): a frame whose longer
side is larger is downscaled right after decoding, before anything else touches it. 1920
keeps every FaceForensics++ video and the usual 1080p clip at native resolution, so their
crops are the pixels the experts trained on, while a 4K frame (4x the pixels) is halved:
its face is then about as large as in the 1080p footage the detectors know, and the
sampled frames take a quarter of the memory (16 RGB 4K frames are 400 MB).

A labelled video folder holds the videos and a `labels.csv` with header
`video_name,target` (1 = fake, 0 = real).
"""
from __future__ import annotations

import csv
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np

from common.cli import CommandLine, entry_point
from common.errors import UsageError, UserError
from configs import FaceConfig
from data_prep.faces import DETECT_SIDE
from data_prep.labels import label_path, write_label_file
from data_prep.tracking import TrackedCrops, tracked_face_crops

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"})
AGGREGATION_RULES = ("mean", "median", "confidence", "max", "top-k")
MAX_SIDE = 1920  # decoded frames are capped to this longer side (see the module doc)
TOP_K_FRACTION = 0.25  # rule top-k: the mean of the most fake-looking quarter of the frames
LABELS_FILE = "labels.csv"
# A seek decodes again from the keyframe before the target: x264's default keyframe
# interval is 250, so about 125 frames on average. Targets closer than this are cheaper to
# reach by decoding forward (on a 300-frame 1080p clip, seeking every sample was 2-3x
# slower than one forward pass); on long videos the big gaps are still crossed by seeking.
SEEK_MIN_GAP = 128
CONFIDENCE_EPS = 1e-3  # keeps the weights positive when every frame says exactly 0.5


class VideoDecodeError(UserError):
    """A file that cannot be used as a video; `str(e)` is "<path>: <reason>"."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class VideoLabelError(UserError, ValueError):
    """A labelled video folder that cannot be read; the message names the file and the reason."""


def is_video_file(path) -> bool:
    """True when the file name has a video extension (case-insensitive)."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


# ================================================================ frame sampling

def sample_frames(path, n_frames: int = 16, max_side: int | None = MAX_SIDE) -> list[tuple[int, np.ndarray]]:
    """Up to `n_frames` (frame index, H x W x 3 uint8 RGB frame) pairs, in video order.

    Fewer frames come back only when the video is shorter than `n_frames` (each frame is
    returned once). A frame whose longer side exceeds `max_side` is downscaled to it
    (None or 0: native resolution). Raises VideoDecodeError for a missing, unopenable or
    frameless file.
    """
    if n_frames < 1:
        raise UsageError(f"n_frames must be >= 1, got {n_frames}")
    path = Path(path)
    if not path.is_file():
        raise VideoDecodeError(path, "no such file" if not path.exists() else "not a file")

    with _opened(path) as capture:
        reported_count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        if reported_count > 0:
            frames = _read_by_seeking(capture, frame_indices(reported_count, n_frames), max_side)
            if frames is not None:
                return frames

    # No usable frame count, or a seek failed (the header may over-report the count):
    # count the frames that really decode, then read the wanted ones in one pass.
    true_count = _count_decodable_frames(path)
    if true_count == 0:
        raise VideoDecodeError(path, "no decodable frames")
    return _read_sequentially(path, frame_indices(true_count, n_frames), max_side)


def sample_face_crops(path, cfg: FaceConfig, n_frames: int = 16, max_side: int | None = MAX_SIDE,
                      detect_side: int = DETECT_SIDE) -> TrackedCrops:
    """The face crops of `n_frames` evenly sampled frames of a video, all of one tracked face
    (data_prep.tracking), from frames capped to `max_side`, with faces detected on copies of
    at most `detect_side` pixels. Raises VideoDecodeError as `sample_frames` does."""
    return tracked_face_crops([rgb for _index, rgb in sample_frames(path, n_frames, max_side)], cfg, detect_side)


def frame_indices(frame_count: int, n_frames: int) -> list[int]:
    """Centres of `n_frames` equal segments of [0, frame_count), without repeats."""
    segment = frame_count / n_frames
    centres = np.linspace(0, frame_count, n_frames, endpoint=False) + segment / 2
    return sorted(set(np.floor(centres).astype(int).clip(0, frame_count - 1).tolist()))


@contextmanager
def _opened(path: Path):
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise VideoDecodeError(path, "cannot open as a video (unsupported format or corrupt file)")
        yield capture
    finally:
        capture.release()


def _read_by_seeking(capture, indices: list[int], max_side: int | None) -> list[tuple[int, np.ndarray]] | None:
    """The frames at sorted `indices`, or None as soon as one seek or read fails.

    Far targets are reached by seeking, near ones by decoding forward: see SEEK_MIN_GAP.
    """
    frames, position = [], 0  # position: index of the frame the next read() returns
    for index in indices:
        if index - position >= SEEK_MIN_GAP:
            if not capture.set(cv2.CAP_PROP_POS_FRAMES, index):
                return None
        else:
            for _ in range(index - position):
                if not capture.grab():
                    return None
        ok, bgr = capture.read()
        if not ok or bgr is None:
            return None
        frames.append((index, _to_rgb(bgr, max_side)))
        position = index + 1
    return frames


def _count_decodable_frames(path: Path) -> int:
    with _opened(path) as capture:
        count = 0
        while capture.grab():  # grab() decodes without the colour conversion of read()
            count += 1
    return count


def _read_sequentially(path: Path, indices: list[int], max_side: int | None) -> list[tuple[int, np.ndarray]]:
    wanted, frames = set(indices), []
    with _opened(path) as capture:
        for index in range(indices[-1] + 1):
            if not capture.grab():
                break
            if index in wanted:
                ok, bgr = capture.retrieve()
                if ok and bgr is not None:
                    frames.append((index, _to_rgb(bgr, max_side)))
    if not frames:
        raise VideoDecodeError(path, "no decodable frames")
    return frames


def _to_rgb(bgr: np.ndarray, max_side: int | None) -> np.ndarray:
    """The decoded frame as RGB, first downscaled (INTER_AREA: no aliasing) when its longer
    side exceeds `max_side`; downscaling first makes the colour conversion cheaper too."""
    h, w = bgr.shape[:2]
    if max_side and max(h, w) > max_side:
        scale = max_side / max(h, w)
        bgr = cv2.resize(bgr, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    if bgr.ndim == 2:
        return np.ascontiguousarray(np.repeat(bgr[..., None], 3, axis=2))
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


# ================================================================ combining frame scores

def aggregate_frame_scores(scores, rule: str = "mean", top_k: int | None = None) -> float:
    """One fake-probability for a video from its frames' fake-probabilities (each in [0, 1]).

    * mean: every frame counts the same; the default, stable.
    * median: robust to a few odd frames (blur, occlusion, a missed face).
    * confidence: weighted mean with weight |p - 0.5| + eps per frame, so frames where the
      model is sure count more than frames it is unsure about (p near 0.5); a manipulation
      visible in only some frames is not averaged away by the undecided ones.
    * max: the most fake-looking frame; catches short manipulations, but one false alarm
      on any frame flags the video, so it raises false positives on real videos.
    * top-k: the mean of the k most fake-looking frames, k = `top_k` or by default a
      quarter of the frames (TOP_K_FRACTION, rounded up, so at least 1: 4 of 16): between
      max and mean, it catches a manipulation visible in a quarter of the clip while one
      odd frame moves the score by only 1/k of its error.
    """
    values = np.asarray(scores, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("aggregate_frame_scores: no frame scores")
    if not np.all(np.isfinite(values)) or values.min() < 0.0 or values.max() > 1.0:
        raise ValueError("aggregate_frame_scores: scores must be probabilities in [0, 1]")
    if rule == "mean":
        return float(values.mean())
    if rule == "median":
        return float(np.median(values))
    if rule == "confidence":
        weights = np.abs(values - 0.5) + CONFIDENCE_EPS
        return float(np.sum(weights * values) / np.sum(weights))
    if rule == "max":
        return float(values.max())
    if rule == "top-k":
        k = top_k if top_k is not None else int(np.ceil(TOP_K_FRACTION * values.size))
        if k < 1:
            raise ValueError(f"aggregate_frame_scores: top_k must be >= 1, got {k}")
        return float(np.sort(values)[::-1][:k].mean())
    raise ValueError(f"aggregate_frame_scores: rule must be one of {AGGREGATION_RULES}, got {rule!r}")


# ================================================================ labelled video folders

def read_video_labels(root) -> list[tuple[str, int]]:
    """(video_name, target) rows of `root/labels.csv`, in file order; every video must exist."""
    root = Path(root)
    label_file = root / LABELS_FILE
    if not label_file.is_file():
        raise VideoLabelError(f"{label_file}: missing label file")
    with open(label_file, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0][:2]] != ["video_name", "target"]:
        raise VideoLabelError(f"{label_file}: first line must be the header 'video_name,target'")

    labels, seen = [], set()
    for line_no, row in enumerate(rows[1:], start=2):
        if not "".join(row).strip():
            continue  # blank line
        if len(row) < 2 or not row[0].strip():
            raise VideoLabelError(f"{label_file}:{line_no}: expected 'video_name,target', got {row!r}")
        name, target = row[0].strip(), row[1].strip()
        if target not in ("0", "1"):
            raise VideoLabelError(f"{label_file}:{line_no}: target of {name!r} must be 0 or 1, "
                                  f"got {target!r}")
        if name in seen:
            raise VideoLabelError(f"{label_file}:{line_no}: {name!r} is listed twice")
        if not (root / name).is_file():
            raise VideoLabelError(f"{label_file}:{line_no}: listed video {root / name} is missing")
        seen.add(name)
        labels.append((name, int(target)))
    return labels


# ================================================================ training on videos

def extract_frames_layout(video_root, out, n_frames: int = 16, val_fraction: float = 0.25,
                          seed: int = 0) -> Path:
    """Turn a labelled video folder into an image data root (competition layout) that the
    trainer reads like any other: `n_frames` frames per video, each with its video's label.

    Frames are written as PNG (lossless: no second compression on top of the video's). The
    validation split is made by *video*, so frames of one video never sit on both sides,
    when each class has at least two videos; otherwise every video trains and the trainer
    holds out frames (documented leak: near-identical frames on both sides).
    """
    from PIL import Image

    video_root, out = Path(video_root), Path(out)
    labels = read_video_labels(video_root)
    by_class = {t: [n for n, target in labels if target == t] for t in (0, 1)}
    rng = np.random.default_rng(seed)
    val_videos: set[str] = set()
    if all(len(names) >= 2 for names in by_class.values()):
        for names in by_class.values():
            n_val = max(1, round(len(names) * val_fraction))
            val_videos.update(rng.permutation(names)[:n_val].tolist())
    rows: dict[str, list[tuple[str, int]]] = {"trainset": [], "valset": []}
    for name, target in labels:
        split = "valset" if name in val_videos else "trainset"
        (out / split).mkdir(parents=True, exist_ok=True)
        for index, frame in sample_frames(video_root / name, n_frames):
            image_name = f"{Path(name).stem}_f{index:06d}.png"
            Image.fromarray(frame).save(out / split / image_name)
            rows[split].append((image_name, target))
    for split, split_rows in rows.items():
        if split_rows:
            write_label_file(label_path(out, split), sorted(split_rows))
    return out


@entry_point
def main(argv=None) -> int:
    parser = CommandLine("python -m data_prep.video", "Extract the frames of a labelled video folder into an "
                         "image data root.\n\n    python -m data_prep.video VIDEO_ROOT OUT [--frames 16] [--seed 0]",
                         config=False)
    parser.add_argument("video_root", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = extract_frames_layout(args.video_root, args.out, args.frames, seed=args.seed)
    print(f"frames of {args.video_root} written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
