"""Where `infer.py DIR --csv` loses time against the bare forward passes: waiting for the
decode workers, or computing slower beside them.

    python -m bench.pipeline_waits IMAGE_DIR [--weights weights] [--copies 1] [--batch-size 32]
                                   [--workers N] [--threads T] [--device auto] [--precision auto|fp32|bf16]

One pass over the images of IMAGE_DIR (each listed --copies times: a fast machine gets
through one folder in a few seconds, too short for its fixed costs to settle), through
the same loader as infer.py (`ensemble.predictor.decode_loader`: decode, face crop and
transforms in --workers processes). Per batch it times the wait for the loader and the
forward passes (`score_crops`: every expert and the stacker). Then it scores the same
batches again with the workers gone: the bare passes. Prints one JSON line:

- `first_wait_s`: the wait for the first batch (the workers start, load the face detector
  and prepare a whole batch each); `wait_s`: every wait, the first included;
- `compute_s` / `bare_s`: the forward passes beside the workers / alone, on the same batches
  (`compute_vs_bare` > 1: the workers slowed them down by sharing the cores);
- `pipeline_img_s` / `bare_img_s` and their `ratio`. Weights load and CSV are not timed
  (bench/speed.py's "scoring only" also leaves them out).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from common.cli import CommandLine, entry_point
from common.errors import UsageError


@entry_point
def main(argv=None) -> int:
    parser = CommandLine("python -m bench.pipeline_waits", __doc__, config=False)
    parser.add_argument("image_dir", type=Path)
    parser.add_argument("--weights", type=Path, default=Path("weights"))
    parser.add_argument("--copies", type=int, default=1, help="list every image this many times")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, help="as infer.py --workers (default: infer.py's for the device)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = infer.py's default)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="", choices=["", "auto", "fp32", "bf16"])
    args = parser.parse_args(argv)
    if args.copies < 1 or args.batch_size < 1 or (args.workers or 0) < 0 or args.threads < 0:
        raise UsageError("--copies and --batch-size must be >= 1; --workers and --threads >= 0")

    import infer
    from data_prep.video import is_video_file
    from ensemble.predictor import EnsembleDetector, decode_loader

    listed, errors, _ = infer.expand_inputs([str(args.image_dir)])
    files = [p for p in listed if not is_video_file(p)]  # images only, as bench/speed.py times them
    if not files:
        raise UsageError(errors[0] if errors else f"{args.image_dir}: no images")
    paths = files * args.copies
    detector = EnsembleDetector.from_weights(args.weights, device=args.device,
                                             **({"precision": args.precision} if args.precision else {}))
    threads = infer.set_cpu_threads(args, detector.device)

    waits, computes, batches = [], [], []
    start = time.perf_counter()
    batch_iter = iter(decode_loader(detector, paths, args.batch_size, args.workers))
    while True:
        asked = time.perf_counter()
        try:
            indices, batch, _failed = next(batch_iter)
        except StopIteration:
            break
        got = time.perf_counter()
        if indices:
            detector.score_crops(batch)
            batches.append(batch)
        waits.append(got - asked)
        computes.append(time.perf_counter() - got)
    pipeline_s = time.perf_counter() - start
    if not batches:
        raise UsageError(f"{args.image_dir}: none of the {len(files)} images could be read")

    bare_start = time.perf_counter()
    for batch in batches:
        detector.score_crops(batch)
    bare_s = time.perf_counter() - bare_start

    n = len(paths)
    print(json.dumps({
        "images": n, "batch_size": args.batch_size, "workers": args.workers, "threads": threads,
        "device": str(detector.device), "precision": detector.precision,
        "first_wait_s": round(waits[0], 3), "wait_s": round(sum(waits), 3),
        "compute_s": round(sum(computes), 3), "bare_s": round(bare_s, 3), "pipeline_s": round(pipeline_s, 3),
        "compute_vs_bare": round(sum(computes) / bare_s, 3),
        "pipeline_img_s": round(n / pipeline_s, 1), "bare_img_s": round(n / bare_s, 1),
        "ratio": round(bare_s / pipeline_s, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
