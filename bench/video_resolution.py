"""Video preprocessing on a 4K clip: the resolution cap and the face stage, before and after.

    python -m bench.video_resolution [--frames 16] [--clip-frames 60] [--repeats 5] [--detector lbp]

Writes a synthetic 3840 x 2160 clip (`--clip-frames` frames, mp4v, a face moving across a
noisy background) into a temporary folder, then times, per video:

* before: `--frames` frames decoded at native resolution, each cropped around its own
  largest face (`faces.crop_face`, what infer.py and ensemble.evaluate did);
* after: the same frames capped to MAX_SIDE right after decoding, one face tracked through
  them, detected on copies of at most DETECT_SIDE pixels (`video.sample_face_crops`);

* the decoding alone (native frames, no face stage), which neither changes;

and the detection time per frame (`faces.detect_faces`) on the 4K frame and on the capped
frame at several detection sides. The runs take turns after a warm-up, `--repeats` times
each (detection: 4 x `--repeats`), and are reported as the fastest and the median: on a
shared machine the fastest is the least disturbed. Only the preprocessing is timed: the
experts' forward passes see the same number of crops of the same size either way. Other
processes' CPU use over the run is reported (in cores), as bench/speed.py measures it.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from bench.speed import ContentionMonitor
from common.cli import CommandLine, entry_point
from common.errors import UsageError
from configs import FaceConfig
from data_prep.faces import DETECT_SIDE, crop_face, detect_faces
from data_prep.video import MAX_SIDE, sample_face_crops, sample_frames

UHD = (3840, 2160)


def write_uhd_clip(path: Path, n_frames: int, seed: int = 0) -> Path:
    """A 4K clip of a face (skimage's astronaut's) drifting right over a noisy background."""
    import skimage.data

    rng = np.random.default_rng(seed)
    # her face with a margin, enlarged so that the face is about a third of the frame height
    face = cv2.resize(skimage.data.astronaut()[20:220, 120:320], (1400, 1400), interpolation=cv2.INTER_CUBIC)
    background = rng.integers(60, 140, (UHD[1], UHD[0], 3), dtype=np.uint8)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30, UHD)
    if not writer.isOpened():
        raise UsageError(f"{path}: OpenCV cannot write an mp4v video here")
    for i in range(n_frames):
        frame = background.copy()
        x = 900 + 10 * i
        frame[380:1780, x:x + 1400] = face
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def alternate_seconds(runs: dict, repeats: int) -> dict[str, list[float]]:
    """name -> seconds of each of `repeats` runs, the runs taking turns (after one warm-up
    each: the detector's first load, the decoder's first open)."""
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def before(path: Path, n_frames: int, cfg: FaceConfig) -> list[np.ndarray]:
    return [crop_face(rgb, cfg)[0] for _index, rgb in sample_frames(path, n_frames, max_side=None)]


def after(path: Path, n_frames: int, cfg: FaceConfig) -> list[np.ndarray]:
    return sample_face_crops(path, cfg, n_frames, MAX_SIDE, DETECT_SIDE).crops


@entry_point
def main(argv=None) -> int:
    parser = CommandLine("python -m bench.video_resolution", __doc__, config=False)
    parser.add_argument("--frames", type=int, default=16, help="frames sampled per video")
    parser.add_argument("--clip-frames", type=int, default=60, help="length of the synthetic 4K clip")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--detector", default="lbp", choices=["lbp", "dlib"])
    args = parser.parse_args(argv)
    if min(args.frames, args.clip_frames, args.repeats) < 1:
        raise UsageError("--frames, --clip-frames and --repeats must be >= 1")
    cfg = FaceConfig(detector=args.detector)

    with ContentionMonitor() as monitor, tempfile.TemporaryDirectory(prefix="bench_video_") as tmp:
        clip = write_uhd_clip(Path(tmp) / "uhd.mp4", args.clip_frames)
        seconds = alternate_seconds({"before": lambda: before(clip, args.frames, cfg),
                                     "after": lambda: after(clip, args.frames, cfg),
                                     "decoding": lambda: sample_frames(clip, args.frames, max_side=None)},
                                    args.repeats)
        held_mb = {"before": sum(rgb.nbytes for _, rgb in sample_frames(clip, args.frames, max_side=None)) / 2**20,
                   "after": sum(rgb.nbytes for _, rgb in sample_frames(clip, args.frames, MAX_SIDE)) / 2**20}
        held_mb["decoding"] = held_mb["before"]
        uhd = sample_frames(clip, 1, max_side=None)[0][1]
        capped = sample_frames(clip, 1, max_side=MAX_SIDE)[0][1]
        detection = {f"4K frame | {DETECT_SIDE}": (uhd, DETECT_SIDE)}
        detection.update({f"capped frame | {side}": (capped, side) for side in (DETECT_SIDE, 640, MAX_SIDE)})
        detect_runs = {key: (lambda frame=frame, side=side: detect_faces(frame, cfg, side))
                       for key, (frame, side) in detection.items()}
        detection_seconds = alternate_seconds(detect_runs, args.repeats * 4)  # one frame: cheap, noisier
        faces_found = {key: len(detect_faces(frame, cfg, side)) for key, (frame, side) in detection.items()}

    print(f"4K clip: {UHD[0]} x {UHD[1]}, {args.clip_frames} frames (mp4v); {args.frames} sampled; "
          f"detector {args.detector}; cap {MAX_SIDE}, detection side {DETECT_SIDE}\n")
    print("| per video | s, fastest | s, median | ms / sampled frame (fastest) | decoded frames held |\n"
          "|---|---:|---:|---:|---:|")
    labels = {"before": "before: native 4K frames, largest face per frame",
              "after": f"after: capped to {MAX_SIDE}, tracked, detected at {DETECT_SIDE}",
              "decoding": "of which decoding alone (native frames, no face stage)"}
    for key, label in labels.items():
        fastest, median = min(seconds[key]), statistics.median(seconds[key])
        print(f"| {label} | {fastest:.2f} | {median:.2f} | {1000 * fastest / args.frames:.0f} | "
              f"{held_mb[key]:.0f} MB |")
    print("\n| face detection on | copy's longer side | ms / frame, fastest | ms, median | faces |\n"
          "|---|---:|---:|---:|---:|")
    for key, times in detection_seconds.items():
        print(f"| {key} | {1000 * min(times):.1f} | {1000 * statistics.median(times):.1f} | {faces_found[key]} |")
    others = monitor.mean
    print(f"\nother processes' CPU use during the run: {'n/a' if others is None else f'{others:.2f} cores'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
