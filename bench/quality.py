"""Quality benchmark: the evaluation table of the trained detector as a Markdown file.

    python -m bench.quality DATA_ROOT [--split testset] [--weights DIR] [--reports DIR]
                            [--out BENCHMARKS_quality.md] [--profile NAME | profile=NAME] [key=value ...]

Runs `ensemble.evaluate.evaluate` (no plots) on the split, into a temp reports folder (or
--reports, which then keeps metrics.json, metrics.md and scores.csv), and writes one table
row per expert, the ensemble, and the plain-mean and rank-mean baselines: AUC, AP, EER,
accuracy, TPR at 1 % / 5 % FPR, ECE, Brier (plus the threshold and counts), under a header
that names the data root, split, weights, machine, date, commit and command. --weights
defaults to cfg.out (`weights`, or out=DIR). Overrides are as for `python -m ensemble.evaluate`.

Exit status: 0 = written; 2 = usage error, unreadable data, unlabelled split or no usable weights.
"""
from __future__ import annotations

import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from common.cli import CommandLine, entry_point
from common.files import atomic_write
from configs import config_from

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

COLUMNS = ["auc", "ap", "eer", "acc", "tpr@fpr1", "tpr@fpr5", "ece", "brier", "threshold", "n", "n_fake"]


def parse_args(argv):
    parser = CommandLine("python -m bench.quality", __doc__, positional="DATA_ROOT")
    parser.add_argument("--split", default="testset", choices=["valset", "testset"])
    parser.add_argument("--weights", help="trained weights folder (default: cfg.out)")
    parser.add_argument("--reports", help="keep evaluate's outputs here (default: a temp folder)")
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS_quality.md"))
    return parser.parse_args(argv)


def quality_markdown(result: dict, *, command: str, machine: dict, git: dict, date: str, seconds: float) -> str:
    from common.metrics import markdown_table

    models = result["models"]
    experts = result["experts"]
    order = [*experts, result.get("ensemble_name", "ensemble"), *result.get("baselines", ["mean", "rank_mean"])]
    rows = {name: models[name] for name in order if name in models}
    rows.update({k: v for k, v in models.items() if k not in rows})
    device = machine.get("gpu") or f"{machine.get('cpu_model')}, {machine.get('cpus_usable')} CPUs"
    commit = str(git.get("commit"))[:10] + (" (dirty)" if git.get("dirty") else "")
    lines = [
        f"# Quality benchmark: {result['split']}", "",
        f"- data root: `{result['data_root']}`",
        f"- split: {result['split']}, {result['n_scored']} of {result['n_images']} images scored "
        f"({result['n_fake']} fake); thresholds chosen on {result['threshold_split']} "
        f"({result['n_valset_scored']} images)",
        f"- weights: `{result['weights']}`; experts: {', '.join(experts)}; ensemble: {result['stacker']['method']}"
        + (f"; TTA: {'+'.join(result['tta'])}" if result.get("tta") else ""),
        f"- machine: {device}; {machine.get('platform')}",
        f"- date: {date}; commit {commit}; evaluation took {seconds:.1f} s",
        f"- command: `{command}`",
    ]
    if result.get("note"):
        lines.append(f"- note: {result['note']}")
    if result.get("unreadable"):
        lines.append(f"- unreadable (excluded): {len(result['unreadable'])} file(s)")
    lines += ["", markdown_table(rows, COLUMNS).rstrip("\n"), "",
              "Rows: each expert; `ensemble` (the fitted stacker, or the plain mean when none is fitted); "
              "baselines `mean` and `rank_mean` of the expert scores (rank mean: each score ranked among that "
              "expert's validation scores). `acc` at each model's `threshold`, chosen on the validation split "
              "(Youden's J). `tpr@fpr1` / `tpr@fpr5`: true-positive rate at 1 % / 5 % false-positive rate. "
              "EER: equal error rate. ECE: expected calibration error of P(fake). Brier: mean squared error "
              "of P(fake). Lower is better for EER, ECE and Brier."]
    return "\n".join(lines) + "\n"


@entry_point
def main(argv=None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    import logging

    from bench.speed import git_state, machine_info
    from ensemble.evaluate import evaluate

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    command = " ".join(shlex.quote(a) for a in ["python", "-m", "bench.quality", *raw])
    date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    start = time.perf_counter()
    cfg = config_from(args, data_root=args.positional)
    with tempfile.TemporaryDirectory(prefix="bench_quality_") as tmp:
        result = evaluate(cfg, args.split, args.weights, args.reports or tmp, gradcam=0, plots=False)
    seconds = time.perf_counter() - start
    text = quality_markdown(result, command=command, machine=machine_info(), git=git_state(), date=date,
                            seconds=seconds)
    print(text, end="")
    with atomic_write(args.out) as f:
        f.write(text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
