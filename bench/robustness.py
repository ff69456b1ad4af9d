"""Does the detector survive what happens to images on their way to a user? AUC on degraded copies.

    python -m bench.robustness DATA_ROOT [--weights DIR] [--split testset] [--work DIR] [--out FILE.md]
                               [--jpeg 40] [--scale 0.5] [profile=cpu key=value ...]

Takes the labelled split `DATA_ROOT/<split>/` (+ `<split>_label.txt`, and `<split>_methods.csv`
when there is one) and writes degraded copies of every image under `--work` (default
`.cache/robustness/<data root name>/`), one labelled folder per condition, `<work>/<condition>/
<split>/` with copies of the label and methods files beside it, as `ensemble.evaluate --test`
reads it:

  jpeg<Q>       (`--jpeg`, default 40) each image re-encoded as a JPEG of quality Q;
  scale<S>      (`--scale`, default 0.5: `scale0.5`) each image resized with bicubic
                resampling to round(S * side) per side (at least 1 pixel), then saved as a
                JPEG of quality 95.

Each image is decoded first as the models see it (`data_prep.images.decode_image`: EXIF
orientation applied, RGB), then degraded with PIL. The copies keep their file names, also
when the name ends in `.png` and the content is now a JPEG: the label and methods files then
stay valid unchanged, and the project's one image decoder identifies the format by content,
never by extension (the file listing goes by extension only, and every image extension it
knows is kept). A copy already made is reused when it is newer than its source; a copy whose
source has gone is removed. An image that cannot be decoded is copied as it is, so the
evaluator reports it as unreadable (one line) and leaves it out of the metrics; it never
stops the run.

Then, for each condition (clean = the split itself, and the two degraded copies), it runs
`python -m ensemble.evaluate DATA_ROOT --test <folder> --weights W --reports
<work>/reports/<condition> --no-plots [overrides...]` as a subprocess (thresholds play no
part: every number is an AUC) and reads its metrics.json. The table (models: the ensemble,
then every expert; columns: the clean AUC, each degraded AUC and its difference from clean;
and, when the split has a methods file, the ensemble's AUC per manipulation method and
condition) is printed and written to `--out` (default `<work>/robustness.md`), the numbers
to `<work>/robustness.json`.

Exit status: 0 = done; 2 = usage error, a missing split or label file, missing weights, or an
evaluation that failed.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from bench.generalization import BenchError, run  # the same one-line error and command runner
from common.cli import CommandLine, entry_point
from common.files import atomic_write
from configs import config_from_argv
from data_prep.dataset import list_images
from data_prep.images import ImageDecodeError, decode_image, encode_jpeg  # explicit JPEG: names may end in .png
from data_prep.labels import label_path

CLEAN = "clean"
ENSEMBLE = "ensemble"
SCALE_JPEG_QUALITY = 95  # the rescaled copies are saved nearly losslessly: the resize is what is measured
MANIFEST = "manifest.json"  # experts.weights.MANIFEST (not imported: that pulls in torch)


# ----------------------------------------------------------------------------- degraded copies

def jpeg(quality: int):
    """The degradation `jpeg<quality>`: RGB array -> JPEG bytes."""
    def degrade(rgb) -> bytes:
        return encode_jpeg(rgb, quality)
    return degrade


def rescale(scale: float):
    """The degradation `scale<scale>`: RGB array -> bicubic resize, JPEG quality 95 bytes."""
    def degrade(rgb) -> bytes:
        image = Image.fromarray(rgb)
        size = tuple(max(1, round(scale * side)) for side in image.size)
        return encode_jpeg(np.asarray(image.resize(size, Image.Resampling.BICUBIC)), SCALE_JPEG_QUALITY)
    return degrade


def degraded_copy(source_root: Path, split: str, out_root: Path, degrade) -> dict[str, int]:
    """Write `out_root/<split>/` (every image of `source_root/<split>/` through `degrade`) and
    copies of the split's label and methods files; returns counts made / reused / unreadable."""
    source, out = source_root / split, out_root / split
    out.mkdir(parents=True, exist_ok=True)
    counts = {"made": 0, "reused": 0, "unreadable": 0}
    images = list_images(source)
    for path in images:
        target = out / path.name
        if target.is_file() and target.stat().st_mtime_ns >= path.stat().st_mtime_ns:
            counts["reused"] += 1
            continue
        try:
            data = degrade(decode_image(path))
            counts["made"] += 1
        except ImageDecodeError:  # copied as is: the evaluator reports it as unreadable
            data = path.read_bytes()
            counts["unreadable"] += 1
        with atomic_write(target, "wb") as f:
            f.write(data)
    names = {p.name for p in images}
    for stale in list_images(out):  # a source image that has gone would be an unlabelled copy
        if stale.name not in names:
            stale.unlink()
    for name in (label_path(source_root, split).name, f"{split}_methods.csv"):
        if (source_root / name).is_file():
            shutil.copyfile(source_root / name, out_root / name)
        else:
            (out_root / name).unlink(missing_ok=True)
    return counts


# ----------------------------------------------------------------------------- evaluation and table

def evaluate(data_root: Path, folder: Path, weights: Path, reports: Path, overrides: list[str]) -> dict:
    """Run ensemble.evaluate on the labelled folder; its metrics.json."""
    run([sys.executable, "-m", "ensemble.evaluate", str(data_root), "--test", str(folder),
         "--weights", str(weights), "--reports", str(reports), "--no-plots", *overrides])
    return json.loads((reports / "metrics.json").read_text())


def auc(value) -> float:
    """metrics.json writes a NaN AUC (one class only) as null."""
    return float("nan") if value is None else float(value)


def collect(metrics: dict[str, dict]) -> dict:
    """{"auc": {model: {condition: AUC}}, "per_method_auc": {method: {condition: ensemble AUC}},
    "unreadable": {condition: n}, "n_scored": {condition: n}} from each condition's metrics.json.
    Models: the ensemble, then the experts (of the clean run, in its order)."""
    clean = metrics[CLEAN]
    models = [clean.get("ensemble_name", ENSEMBLE), *clean["experts"]]
    table = {model: {c: auc(m["models"].get(model, {}).get("auc")) for c, m in metrics.items()} for model in models}
    per_method: dict[str, dict[str, float]] = {}
    for condition, m in metrics.items():
        for method, value in m.get("per_method_auc", {}).get(models[0], {}).items():
            per_method.setdefault(method, {})[condition] = auc(value)
    return {"auc": table, "per_method_auc": per_method,
            "unreadable": {c: len(m.get("unreadable", [])) for c, m in metrics.items()},
            "n_scored": {c: m.get("n_scored") for c, m in metrics.items()}}


def _number(value: float, signed: bool = False) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def table(first: str, rows: dict[str, dict[str, float]], conditions: list[str]) -> list[str]:
    """One row per key of `rows`: the clean AUC, then each degraded AUC and its difference."""
    degraded = [c for c in conditions if c != CLEAN]
    header = [first, CLEAN] + [x for c in degraded for x in (c, f"Δ {c}")]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, row in rows.items():
        clean = row.get(CLEAN, float("nan"))
        cells = [_number(clean)]
        for c in degraded:
            value = row.get(c, float("nan"))
            cells += [_number(value), _number(value - clean, signed=True)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict) -> str:
    conditions = list(results["conditions"])
    lines = [f"Robustness of the detector in {results['weights']} on {results['data_root']}/"
             f"{results['split']}: AUC on the clean images and on degraded copies "
             f"({', '.join(f'{c}: {d}' for c, d in results['conditions'].items() if c != CLEAN)}).",
             "", *table("model", results["auc"], conditions), ""]
    if results["per_method_auc"]:
        lines += ["The ensemble's AUC per manipulation method (its fakes against all the reals):", "",
                  *table("method", results["per_method_auc"], conditions), ""]
    unreadable = {c: n for c, n in results["unreadable"].items() if n}
    if unreadable:
        lines += ["Unreadable images, left out of the metrics: "
                  + ", ".join(f"{c} {n}" for c, n in unreadable.items()) + ".", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command

def parse_args(argv):
    parser = CommandLine("python -m bench.robustness", __doc__, positional="DATA_ROOT")
    parser.add_argument("--weights", help="trained weights folder (default: cfg.out, `weights`)")
    parser.add_argument("--split", default="testset", help="the labelled split to degrade (default %(default)s)")
    parser.add_argument("--work", help="degraded copies and reports (default: .cache/robustness/<data root name>)")
    parser.add_argument("--out", help="markdown table (default: <work>/robustness.md)")
    parser.add_argument("--jpeg", type=int, default=40, metavar="Q", help="JPEG quality (default %(default)s)")
    parser.add_argument("--scale", type=float, default=0.5, metavar="S",
                        help="resize factor per side (default %(default)s)")
    return parser.parse_args(argv)


@entry_point
def main(argv=None) -> int:
    args = parse_args(argv)
    if not 1 <= args.jpeg <= 100:
        raise BenchError(f"--jpeg: a quality from 1 to 100, got {args.jpeg}")
    if not 0 < args.scale < math.inf:
        raise BenchError(f"--scale: a factor above 0, got {args.scale}")
    overrides = args.config_argv  # passed on to every evaluation
    cfg = config_from_argv([args.positional, *overrides])  # a bad key stops here, before any copy
    data_root = Path(args.positional).resolve()
    split = args.split
    if not (data_root / split).is_dir():
        raise BenchError(f"{data_root / split}: missing split folder")
    if not label_path(data_root, split).is_file():
        raise BenchError(f"{label_path(data_root, split)}: missing label file; the split must be labelled")
    weights = Path(args.weights or cfg.out).resolve()
    if not (weights / MANIFEST).is_file():
        raise BenchError(f"{weights}: no trained weights ({MANIFEST} missing); train first or give --weights")
    work = Path(args.work or Path(".cache") / "robustness" / data_root.name).resolve()

    degradations = {f"jpeg{args.jpeg}": (jpeg(args.jpeg), f"JPEG quality {args.jpeg}"),
                    f"scale{args.scale:g}": (rescale(args.scale),
                                             f"bicubic resize by {args.scale:g} per side, "
                                             f"then JPEG quality {SCALE_JPEG_QUALITY}")}
    folders = {CLEAN: data_root / split}
    conditions = {CLEAN: "the split as it is"}
    for name, (degrade, description) in degradations.items():
        counts = degraded_copy(data_root, split, work / name, degrade)
        print(f"{name}: {counts['made']} copies made, {counts['reused']} reused, "
              f"{counts['unreadable']} unreadable copied as is, in {work / name / split}", flush=True)
        folders[name], conditions[name] = work / name / split, description

    metrics = {name: evaluate(data_root, folder, weights, work / "reports" / name, overrides)
               for name, folder in folders.items()}
    results = {"data_root": str(data_root), "split": split, "weights": str(weights), "overrides": overrides,
               "conditions": conditions, "folders": {c: str(f) for c, f in folders.items()}, **collect(metrics)}
    text = markdown(results)
    out = Path(args.out) if args.out else work / "robustness.md"
    with atomic_write(work / "robustness.json") as f:
        f.write(json.dumps({**results, "auc": _json_safe(results["auc"]),
                            "per_method_auc": _json_safe(results["per_method_auc"])}, indent=2))
    with atomic_write(out) as f:
        f.write(text)
    print(text)
    print(f"wrote {out} and {work / 'robustness.json'}", file=sys.stderr)
    return 0


def _json_safe(rows: dict[str, dict[str, float]]) -> dict:
    return {k: {c: (v if math.isfinite(v) else None) for c, v in row.items()} for k, row in rows.items()}


if __name__ == "__main__":
    sys.exit(main())
