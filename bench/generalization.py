"""Does the detector generalize? Four protocols on a data set with manipulation methods.

    python -m bench.generalization DATA_ROOT [--cross OTHER_TESTSET ...] [--protocols a,b,c,d]
                                   [--work DIR] [--out FILE.md] [profile=cpu key=value ...]

DATA_ROOT is in the competition layout with `<split>_methods.csv` (`img_name,method`, method
`real` for the reals), as `../shared/data/ffpp` is. Every protocol trains with the same
commands as train.sh (experts.train, ensemble.fit, ensemble.evaluate), each in its own
folder under `--work`, one after the other (two trainings on 2 cores would only slow both):

  a  in distribution: train on everything, test on the testset: AUC overall and per method
     (each method's fakes against all the test reals).
  b  leave one method out: for each method, train and validate on the reals and the other
     methods, test on the held-out method against the test reals; then the mean.
  c  reals only: train on the reals plus the project's editing fakes (data.online_fakes,
     0.5 here unless overridden) with no fake of the data set at all, select the epoch on the
     validation reals and their editing fakes; test on every method (the self-blended-images
     protocol). The stacker is fitted on the same: the validation reals and an editing fake
     of each (ensemble.editing_fakes, 1.0 here unless overridden), so it learns which
     experts catch fakes no one trained them on, from no fake of the data set.
  d  cross-dataset: protocol a's detector on each `--cross` labelled folder (e.g.
     ../shared/data/lfw_faceswap/testset).

Thresholds play no part: every number is an AUC. The table goes to `--out` (markdown) and
`<work>/generalization.json`.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

from common.cli import CommandLine, entry_point
from common.errors import UserError
from configs import config_from_argv

ROOT = Path(__file__).resolve().parent.parent
PROTOCOLS = ("a", "b", "c", "d")
REAL = "real"
C_ONLINE_FAKES = "0.5"  # protocol c: half the training images are editing fakes
C_EDITING_FAKES = "1.0"  # protocol c: the stacker's fakes, one editing fake per validation real


class BenchError(UserError):
    """A protocol that cannot run: a missing methods file, a bad option, a failed command."""


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=ROOT)
    if done.returncode != 0:
        raise BenchError(f"command failed with exit status {done.returncode}: {' '.join(cmd)}")


def methods_of(data_root: Path) -> list[str]:
    path = data_root / "trainset_methods.csv"
    if not path.is_file():
        raise BenchError(f"{path}: missing; the protocols need the manipulation method of every image")
    with open(path, newline="", encoding="utf-8-sig") as f:
        methods = sorted({row["method"] for row in csv.DictReader(f)} - {REAL})
    if len(methods) < 2:
        raise BenchError(f"{path}: needs at least two fake methods besides '{REAL}', has {methods}")
    return methods


def train_and_test(data_root: Path, work: Path, overrides: list[str], train_overrides: list[str],
                   fit: bool, tests: dict[str, Path | None]) -> dict:
    """Train the experts (+ the stacker) into work/weights; evaluate on each test folder
    (None = DATA_ROOT's testset). Returns {test name: metrics.json} plus the wall time."""
    weights = work / "weights"
    common = [*overrides, f"out={weights}"]
    started = time.time()
    run([sys.executable, "-m", "experts.train", str(data_root), *common, *train_overrides,
         f"run_dir={work / 'runs'}"])
    if fit:
        run([sys.executable, "-m", "ensemble.fit", str(data_root), *common, *train_overrides])
    results = {"train_seconds": round(time.time() - started, 1)}
    for name, folder in tests.items():
        reports = work / f"test_{name}"
        extra = ["--test", str(folder)] if folder is not None else ["--split", "testset"]
        run([sys.executable, "-m", "ensemble.evaluate", str(data_root), *extra, "--weights", str(weights),
             "--reports", str(reports), "--no-plots", *common])
        results[name] = json.loads((reports / "metrics.json").read_text())
    return results


def protocol_a(data_root, work, overrides, cross: list[Path], with_d: bool) -> dict:
    tests = {"testset": None, **({f"cross_{i}": c for i, c in enumerate(cross)} if with_d else {})}
    res = train_and_test(data_root, work / "a", overrides, [], True, tests)
    out = {"a": {model: {"all": m["auc"], **res["testset"]["per_method_auc"][model]}
                 for model, m in res["testset"]["models"].items()},
           "seconds": {"a": res["train_seconds"]}}
    if with_d:
        out["d"] = {str(c): {model: m["auc"] for model, m in res[f"cross_{i}"]["models"].items()}
                    for i, c in enumerate(cross)}
    return out


def protocol_b(data_root, work, overrides, methods: list[str], held_out: list[str]) -> dict:
    table, seconds = {}, {}
    for method in held_out:
        keep = [REAL, *(m for m in methods if m != method)]
        res = train_and_test(data_root, work / f"b_{method}", overrides, [f"data.methods=[{','.join(keep)}]"],
                             True, {"testset": None})
        seconds[method] = res["train_seconds"]
        for model, row in res["testset"]["per_method_auc"].items():
            table.setdefault(model, {})[method] = row[method]
    for row in table.values():
        row["mean"] = sum(row[m] for m in held_out) / len(held_out)
    return {"b": table, "seconds": {f"b_{m}": s for m, s in seconds.items()}}


def protocol_c(data_root, work, overrides) -> dict:
    fakes = [f"{key}={value}" for key, value in (("data.online_fakes", C_ONLINE_FAKES),
                                                 ("ensemble.editing_fakes", C_EDITING_FAKES))
             if not any(o.startswith(f"{key}=") for o in overrides)]
    res = train_and_test(data_root, work / "c", overrides, [f"data.methods=[{REAL}]", *fakes], True,
                         {"testset": None})
    table = {}
    for model, row in res["testset"]["per_method_auc"].items():
        table[model] = {**row, "mean": sum(row.values()) / len(row)}
        table[model]["all"] = res["testset"]["models"][model]["auc"]
    return {"c": table, "seconds": {"c": res["train_seconds"]}}


def table(title: str, rows: dict[str, dict[str, float]], columns: list[str]) -> list[str]:
    """A markdown table of AUCs: one row per model, one column per key."""
    return [title, "", "| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns),
            *(f"| {model} | " + " | ".join(f"{row.get(c, float('nan')):.4f}" for c in columns) + " |"
              for model, row in rows.items()), ""]


def markdown(results: dict, methods: list[str]) -> str:
    lines = []
    if "a" in results:
        lines += table("(a) in distribution: testset AUC, overall and per method", results["a"], ["all", *methods])
    if "b" in results:
        held = [x for x in methods if x in next(iter(results["b"].values()))]
        lines += table("(b) leave one method out: AUC on the held-out method", results["b"], [*held, "mean"])
    if "c" in results:
        lines += table("(c) reals + editing fakes only: AUC per method", results["c"], [*methods, "mean"])
    if "d" in results:
        by_model = {}
        for test_set, aucs in results["d"].items():
            for model, auc in aucs.items():
                by_model.setdefault(model, {})[test_set] = auc
        lines += table("(d) cross-dataset: protocol (a)'s detector on other test sets, AUC", by_model,
                       list(results["d"]))
    summary = summary_rows(results, methods)
    if summary:
        lines += ["Summary (the ensemble):", "", "| protocol | AUC |", "|---|---:|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in summary.items()]
        lines.append("")
    return "\n".join(lines)


def summary_rows(results: dict, methods: list[str]) -> dict[str, float]:
    model = "ensemble"
    rows = {}
    if "a" in results:
        row = results["a"][model]
        rows["(a) all methods"] = row["all"]
        weakest = min(methods, key=lambda m: row.get(m, 1.0))
        rows[f"(a) weakest method ({weakest})"] = row[weakest]
    if "b" in results:
        rows["(b) leave-one-method-out mean"] = results["b"][model]["mean"]
    if "c" in results:
        rows["(c) reals + editing fakes, mean over methods"] = results["c"][model]["mean"]
    for name, table in results.get("d", {}).items():
        rows[f"(d) on {name}"] = table[model]
    return rows


@entry_point
def main(argv=None) -> int:
    parser = CommandLine("python -m bench.generalization", __doc__, positional="DATA_ROOT")
    parser.add_argument("--cross", action="append", default=[], metavar="DIR",
                        help="labelled test folder of another data set (protocol d); repeatable")
    parser.add_argument("--protocols", default="a,b,c,d")
    parser.add_argument("--held-out", default="", help="protocol b: only these methods (comma-separated)")
    parser.add_argument("--work", default="reports/generalization")
    parser.add_argument("--out", default="", help="markdown table (default: <work>/generalization.md)")
    args = parser.parse_args(argv)
    overrides = args.config_argv  # passed on to every command the protocols run
    config_from_argv([args.positional, *overrides])  # a bad key stops here, not in the first training
    data_root = Path(args.positional).resolve()
    protocols = [p for p in args.protocols.split(",") if p]
    if not set(protocols) <= set(PROTOCOLS):
        raise BenchError(f"--protocols: choose from {','.join(PROTOCOLS)}, got {args.protocols}")
    if "d" in protocols and not args.cross:
        raise BenchError("protocol d needs --cross LABELLED_DIR")
    if "data.methods" in " ".join(overrides):
        raise BenchError("data.methods is set by the protocols; do not override it")
    methods = methods_of(data_root)
    held_out = [m for m in args.held_out.split(",") if m] or methods
    if not set(held_out) <= set(methods):
        raise BenchError(f"--held-out: methods are {methods}, got {held_out}")
    cross = [Path(c).resolve() for c in args.cross]
    work = Path(args.work).resolve()
    results: dict = {"data_root": str(data_root), "overrides": overrides, "methods": methods, "seconds": {}}
    if "a" in protocols or "d" in protocols:
        part = protocol_a(data_root, work, overrides, cross, "d" in protocols)
        results["seconds"].update(part.pop("seconds"))
        results.update(part if "a" in protocols else {"d": part["d"]})
    if "b" in protocols:
        part = protocol_b(data_root, work, overrides, methods, held_out)
        results["seconds"].update(part.pop("seconds"))
        results.update(part)
    if "c" in protocols:
        part = protocol_c(data_root, work, overrides)
        results["seconds"].update(part.pop("seconds"))
        results.update(part)
    work.mkdir(parents=True, exist_ok=True)
    (work / "generalization.json").write_text(json.dumps(results, indent=2))
    text = markdown(results, methods)
    out = Path(args.out) if args.out else work / "generalization.md"
    out.write_text(text)
    print(text)
    print(f"wrote {out} and {work / 'generalization.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
