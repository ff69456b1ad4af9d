"""Score images and videos with the trained ensemble.

    python infer.py path/to/img.jpg                 # Prediction of [path/to/img.jpg] being Deepfake: 0.123456
    python infer.py DIR "shots/*.png" clip.mp4      # one line per input
    python infer.py DIR --csv out.csv               # img_name,y_pred for every image (and video) in DIR
                                                    # (video_name,y_pred when DIR holds only videos)
    python infer.py DIR --csv out.csv --weights onnx --backend onnx
                                                    # the experts run by onnxruntime, from the export
                                                    # of `python -m experts.export_onnx --out onnx`

Inputs: files, folders and glob patterns. In a folder, every entry named like an image or a
video is an input, whatever it turns out to be (a dangling link, a folder called x.jpg); other
files are ignored; subfolders are scored with `--recursive` (img_name = the path relative to
the folder), else counted in a warning. A video is scored by sampling `--frames` frames
evenly (downscaled when their longer side exceeds `--max-side`), following one face through
them (data_prep.tracking; detected on copies of at most `--detect-side` pixels), scoring each
crop, and aggregating the frame scores (`--video-rule`, see data_prep.video.aggregate_frame_scores).
`--video-rule temporal` instead gives the tracked crops, in frame order, to the temporal head
trained beside the experts (`python -m ensemble.temporal`; torch backend only), which reads how
the face changes from frame to frame; `--video-rule temporal_stack` to the video stacker
trained with it, which combines the head's score with the ensemble's mean frame score.

`--precision bf16` runs the experts' forward passes under bf16 autocast (scores stay float32),
`auto` does so only where the CPU or GPU computes bf16 natively; the default is
ensemble.predictor.DEFAULT_PRECISION (shown below). The ONNX backend runs its fp32 export: it
refuses bf16.

A file that cannot be read gets a warning naming it and the reason; in a CSV it still gets
a row with y_pred 0.5 and a line in `out.csv.errors`, so one broken image never sinks a
submission. `--strict` stops at the first such file instead.

Exit status: 0 = every input scored (or, with --csv, the CSV written); 1 = some input could
not be read (without --csv) or --strict met one; 2 = usage error, no trained weights, or the
CSV cannot be written (a full disk); 130 / 143 = interrupted by SIGINT / SIGTERM. The CSV is
written atomically: complete or not at all, a previous one at that path left as it was.
"""
from __future__ import annotations

import csv
import glob
import os
import signal
import sys
from pathlib import Path

from common.cli import CommandLine, entry_point
from common.files import atomic_write

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

FALLBACK_SCORE = 0.5  # an unreadable file says nothing either way


TEMPORAL_RULE = "temporal"  # --video-rule: the temporal head instead of a rule over frame scores
TEMPORAL_STACK_RULE = "temporal_stack"  # --video-rule: the video stacker over the head and the frame mean
TEMPORAL_RULES = (TEMPORAL_RULE, TEMPORAL_STACK_RULE)


def parse_args(argv):
    from data_prep.faces import DETECT_SIDE
    from data_prep.video import AGGREGATION_RULES, MAX_SIDE
    from ensemble.predictor import DEFAULT_PRECISION, PRECISIONS

    parser = CommandLine("python infer.py", __doc__, config=False)
    parser.add_argument("inputs", nargs="+", help="image/video files, folders or glob patterns")
    parser.add_argument("--csv", type=Path, help="write img_name,y_pred rows here (atomically)")
    parser.add_argument("--weights", type=Path, default=Path(__file__).resolve().parent / "weights")
    parser.add_argument("--experts", help="comma-separated subset of experts (plain mean of them)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--backend", default="torch", choices=["torch", "onnx"],
                        help="onnx: the experts run by onnxruntime on the CPU, from the folder (or manifest "
                             ".json) that `python -m experts.export_onnx` wrote, given as --weights")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int,
                        help="decode/crop worker processes (0 = in the main process; default: all cores "
                             "but one, up to 8, on a GPU; up to 3 on the CPU)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch's CPU threads (default 0: one per core, less one per decode worker "
                             "on 4 or more cores)")
    parser.add_argument("--frames", type=int, default=16, help="frames sampled per video")
    parser.add_argument("--video-rule", default="confidence", choices=[*AGGREGATION_RULES, *TEMPORAL_RULES],
                        help="how frame scores make a video's score (top-k: mean of the top quarter); "
                             "temporal: the temporal head over the frame sequence; temporal_stack: the "
                             "video stacker over the head and the ensemble's mean frame score")
    parser.add_argument("--precision", default=DEFAULT_PRECISION, choices=PRECISIONS,
                        help="of the experts' forward passes: bf16 autocast, or auto = bf16 where the device "
                             "has native bf16 (default %(default)s)")
    parser.add_argument("--max-side", type=int, default=MAX_SIDE,
                        help="video frames larger than this (longer side) are downscaled to it; 0 = native")
    parser.add_argument("--detect-side", type=int, default=DETECT_SIDE,
                        help="faces in video frames are detected on a copy of at most this side")
    parser.add_argument("--tta", help="override test-time augmentation, e.g. 'hflip' or 'none'")
    parser.add_argument("--strict", action="store_true", help="fail on the first unreadable file")
    parser.add_argument("--recursive", action="store_true",
                        help="also score the subfolders of a folder (img_name = path relative to it)")
    args = parser.parse_args(argv)
    if args.backend == "onnx" and args.device == "cuda":
        parser.error("--backend onnx runs on the CPU; leave out --device cuda")
    if args.backend == "onnx" and args.precision == "bf16":
        parser.error("--backend onnx runs its fp32 export; --precision bf16 needs --backend torch")
    if args.backend == "onnx" and args.video_rule in TEMPORAL_RULES:
        parser.error(f"--video-rule {args.video_rule} runs the temporal head in torch; it needs --backend torch")
    if args.frames < 1 or args.max_side < 0 or args.detect_side < 32 or args.threads < 0:
        parser.error("--frames must be >= 1, --max-side >= 0, --detect-side >= 32 and --threads >= 0")
    return args


def expand_inputs(inputs: list[str], recursive: bool = False) -> tuple[list[Path], list[str], dict[Path, str]]:
    """(files to score, error messages for inputs that match nothing, {file: CSV name}).

    In a folder, every entry *named* like an image or video is an input, whatever it turns
    out to be (a dangling link, a directory, an unreadable file): it gets a row and a named
    error rather than vanishing from the submission. Subfolders are scored with `recursive`
    (CSV name: the path relative to the folder, so two x.jpg stay distinct), else counted
    and reported as skipped."""
    from data_prep.images import is_image_file
    from data_prep.video import is_video_file

    def looks_like_media(p: Path) -> bool:
        return is_image_file(p) or is_video_file(p)

    files, problems, names = [], [], {}

    def add_folder(folder: Path, base: Path) -> None:
        try:
            entries = sorted(folder.iterdir(), key=lambda p: p.name)
        except OSError as err:
            problems.append(f"{folder}: cannot list this folder ({err.strerror or err})")
            return
        skipped = 0
        for entry in entries:
            if looks_like_media(entry):
                files.append(entry)
                names[entry] = entry.relative_to(base).as_posix()
            elif entry.is_dir():
                if recursive:
                    add_folder(entry, base)
                else:
                    skipped += 1
        if skipped:
            problems.append(f"{folder}: {skipped} subfolder(s) not scored (use --recursive)")

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            add_folder(path, path)
        elif path.exists():
            files.append(path)  # named explicitly: try it whatever its extension
        elif any(ch in item for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            files += [m for m in matches if looks_like_media(m)]
            if not matches:
                problems.append(f"{item}: no file matches this pattern")
        elif path.is_symlink():
            files.append(path)  # a dangling link named explicitly: its row says so
        else:
            problems.append(f"{item}: no such file or directory")
    return files, problems, {f: names.get(f, f.name) for f in files}


def score_images(detector, paths, args, on_error) -> dict[Path, float]:
    from ensemble.predictor import score_files

    scores: dict[Path, float] = {}
    show = args.csv is not None and len(paths) > 1
    for indices, p, _features, failed in score_files(detector, paths, args.batch_size, args.workers, show):
        for i, message in failed:
            on_error(paths[i], message)
        scores.update({paths[i]: float(s) for i, s in zip(indices, p)})
    return scores


def score_video(detector, path: Path, args, temporal=None) -> float:
    """P(fake) of one video: by the temporal head when one is given (--video-rule temporal),
    or by the video stacker over it and the ensemble's frame scores (temporal_stack), else by
    `args.video_rule` over the ensemble's frame scores."""
    from data_prep.video import aggregate_frame_scores, sample_face_crops

    face = temporal.face if temporal is not None else detector.face
    tracked = sample_face_crops(path, face, args.frames, args.max_side, args.detect_side)
    if args.video_rule == TEMPORAL_RULE:
        return temporal.score(tracked.crops)
    p, _ = detector.score_crops(detector.batch_of_crops(tracked.crops))
    if args.video_rule == TEMPORAL_STACK_RULE:
        return temporal.score_stacked(tracked.crops, p)
    return aggregate_frame_scores(p.tolist(), args.video_rule)


def write_csv_atomically(path: Path, rows: list[tuple[str, float]], name_column: str = "img_name") -> None:
    with atomic_write(path, newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")  # quotes a name holding a comma or quote
        writer.writerow([name_column, "y_pred"])
        writer.writerows((name, f"{score:.6f}") for name, score in rows)


class StrictStop(Exception):
    pass


def set_cpu_threads(args, device) -> int:
    """Fill in --workers and --threads for `device` where they were left out (defaults:
    ensemble.predictor's), set torch's CPU threads, and return them."""
    import torch

    from ensemble.predictor import default_decode_workers, default_torch_threads
    if args.workers is None:
        args.workers = default_decode_workers(device)
    threads = args.threads or default_torch_threads(device, args.workers)
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


@entry_point
def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from data_prep.video import VideoDecodeError, is_video_file
    from ensemble.predictor import EnsembleDetector

    tta = None if args.tta is None else [t for t in args.tta.split(",") if t and t != "none"]
    experts = args.experts.split(",") if args.experts else None
    if args.backend == "onnx":  # fp32: parse_args refused --precision bf16, and auto means fp32 here
        import torch

        from ensemble.onnx_backend import onnx_detector
        detector = onnx_detector(args.weights, experts, tta, threads=set_cpu_threads(args, torch.device("cpu")))
    else:
        detector = EnsembleDetector.from_weights(args.weights, experts, args.device, tta,
                                                 precision=args.precision)
        set_cpu_threads(args, detector.device)
    temporal = None
    if args.video_rule in TEMPORAL_RULES:  # loaded once, before any input, so no head fails at once
        from ensemble.temporal_model import require_temporal
        from experts.weights import read_manifest
        temporal = require_temporal(args.weights, detector.device, args.precision)
        if args.video_rule == TEMPORAL_STACK_RULE:
            temporal.check_frame_ensemble(detector, read_manifest(args.weights))

    files, problems, names = expand_inputs(args.inputs, args.recursive)
    for message in problems:
        print(f"warning: {message}", file=sys.stderr)
    errors: dict[Path, str] = {}

    def on_error(path: Path, message: str):
        errors[path] = message
        print(f"warning: {message}", file=sys.stderr)
        if args.strict:
            raise StrictStop(message)

    try:
        images = [p for p in files if not is_video_file(p)]
        scores = score_images(detector, images, args, on_error) if images else {}
        for video in (p for p in files if is_video_file(p)):
            try:
                scores[video] = score_video(detector, video, args, temporal)
            except VideoDecodeError as err:
                on_error(video, str(err))
            except OSError as err:  # a dangling link, a folder named like a video, ...
                on_error(video, f"{video}: cannot read ({err.strerror or err})")
    except StrictStop:
        print("error: stopped (--strict); no CSV written", file=sys.stderr)
        return 1

    counts = f"{len(files)} input(s): {len(scores)} scored, {len(files) - len(scores)} failed"
    if args.csv is None:
        for path in files:
            if path in scores:
                print(f"Prediction of [{path}] being Deepfake: {scores[path]:.6f}")
        print(counts, file=sys.stderr)
        return 1 if errors or problems or not files else 0

    rows = [(names[p], scores.get(p, FALLBACK_SCORE)) for p in files]
    rows.sort(key=lambda r: r[0])
    only_videos = bool(files) and all(is_video_file(p) for p in files)
    write_csv_atomically(args.csv, rows, "video_name" if only_videos else "img_name")
    error_file = args.csv.with_name(args.csv.name + ".errors")
    if errors:
        with atomic_write(error_file, encoding="utf-8") as f:
            f.write("".join(f"{m.splitlines()[0]}\n" for m in errors.values()))
    elif error_file.exists():
        error_file.unlink()  # a stale list from an earlier run would mislead
    print(f"wrote {len(rows)} rows to {args.csv}; {counts}" +
          (f" (listed in {error_file}, scored {FALLBACK_SCORE})" if errors else ""), file=sys.stderr)
    return 0


def stop_like_ctrl_c(signum, _frame):
    """SIGTERM (`kill`, a job scheduler's stop) unwinds like Ctrl-C instead of ending the
    process on the spot, so `atomic_write` still removes its temp file."""
    # Sent to the whole process group (`timeout`, a scheduler), the signal also stops the
    # decoding DataLoader's workers; torch's SIGCHLD check would then print their deaths as a
    # traceback while this unwinds. They are meant to stop: ignore it from here on.
    if hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, lambda *_: None)
    raise KeyboardInterrupt(signal.Signals(signum).name)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, stop_like_ctrl_c)
    try:
        sys.exit(main())
    except KeyboardInterrupt as stop:
        stopped_by = signal.SIGTERM if str(stop) == "SIGTERM" else signal.SIGINT
        print(f"interrupted ({stopped_by.name}): the --csv file is untouched or complete, never partial",
              file=sys.stderr)
        sys.exit(128 + stopped_by)
