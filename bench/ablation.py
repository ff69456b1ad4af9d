"""Ablations for one expert: losses, editing fakes, cluster vs random validation split.

    python -m bench.ablation DATA_ROOT [--expert resnet] [--study losses|fakes|split|all]
                             [--out BENCHMARKS_ablation.md] [--profile NAME | profile=NAME] [key=value ...]

Each variant trains the expert from scratch in its own folder under `--work` with the same
seed and settings but the one thing studied, then measures testset AUC (losses, fakes) or
the fold's validation AUC (split). Runs one variant at a time: timings on a 2-core machine
mean nothing when two trainings compete.

* losses: CE alone, CE+KL, CE+NCE, CE+KL+NCE (weights `--kl`, `--nce`).
* fakes: `data.online_fakes` at the profile's value versus 0 (no editing fakes).
* split: validation AUC on a leave-one-cluster-out fold (k-means on the trained expert's
  embeddings) versus a stratified random fold of the same train+val pool.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from common.cli import CommandLine, entry_point
from common.errors import UserError
from configs import config_from_argv

ROOT = Path(__file__).resolve().parent.parent  # the repository


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=ROOT)
    if done.returncode != 0:  # the command has said why on stderr
        raise UserError(f"command failed with exit status {done.returncode}: {' '.join(cmd)}")


def train(data_root, expert, work: Path, overrides: list[str]) -> dict:
    """Train one variant; returns its manifest entry (val AUC, timings)."""
    out = work / "weights"
    started = time.time()
    run([sys.executable, "-m", "experts.train", str(data_root), *overrides, f"experts={expert}",
         f"out={out}", f"run_dir={work / 'runs'}"])
    manifest = json.loads((out / "manifest.json").read_text())
    entry = next(iter(manifest["experts"].values()))
    entry["wall_seconds"] = round(time.time() - started, 1)
    return entry


def test_auc(data_root, expert_name: str, work: Path, overrides: list[str]) -> float:
    from ensemble.evaluate import evaluate

    cfg = config_from_argv([str(data_root), *overrides, f"experts={expert_name}", f"out={work / 'weights'}"])
    result = evaluate(cfg, split="testset", weights=work / "weights", reports=work / "reports", plots=False,
                      gradcam=0)
    return result["models"][expert_name]["auc"]


def study_losses(args, overrides) -> list[dict]:
    variants = {"CE": [], "CE+KL": [f"loss.kl={args.kl}"], "CE+NCE": [f"loss.nce={args.nce}"],
                "CE+KL+NCE": [f"loss.kl={args.kl}", f"loss.nce={args.nce}"]}
    rows = []
    for label, extra in variants.items():
        work = args.work / "losses" / label.replace("+", "_")
        entry = train(args.data_root, args.expert, work, overrides + ["loss.kl=0", "loss.nce=0"] + extra)
        rows.append({"variant": label, "test_auc": test_auc(args.data_root, args.expert, work, overrides),
                     "val_auc": entry["training"]["val_auc"], "train_s": entry["training"]["train_seconds"]})
    return rows


def study_fakes(args, overrides) -> list[dict]:
    profile_rate = config_from_argv([str(args.data_root), *overrides]).data.online_fakes
    rows = []
    for label, rate in ((f"editing fakes (online_fakes={profile_rate})", profile_rate), ("no editing fakes", 0.0)):
        work = args.work / "fakes" / str(rate)
        entry = train(args.data_root, args.expert, work, overrides + [f"data.online_fakes={rate}"])
        rows.append({"variant": label, "test_auc": test_auc(args.data_root, args.expert, work, overrides),
                     "val_auc": entry["training"]["val_auc"], "train_s": entry["training"]["train_seconds"]})
    return rows


def study_split(args, overrides) -> list[dict]:
    """Fold 0 of a cluster split vs fold 0 of a random split: the validation AUC each reports."""
    base = args.work / "split"
    embed_weights = args.embed_weights
    if embed_weights is None:  # train the expert whose embeddings are clustered
        train(args.data_root, args.expert, base / "embedder", overrides)
        embed_weights = base / "embedder" / "weights"
    rows = []
    for label, mode in (("cluster (k-means) fold", []), ("random stratified fold", ["--random"])):
        folds = base / ("random" if mode else "cluster")
        run([sys.executable, "-m", "experts.cluster_split", str(args.data_root), *overrides, "--out", str(folds),
             "--k", str(args.k), "--expert", args.expert, "--weights", str(embed_weights), *mode])
        aucs = []
        for fold in range(args.folds_trained):
            entry = train(args.data_root, args.expert, folds / f"fold{fold}",
                          overrides + [f"data.folds_csv={folds / 'folds.csv'}", f"data.fold={fold}"])
            aucs.append(entry["training"]["val_auc"])
        rows.append({"variant": label, "val_auc_per_fold": [round(a, 4) for a in aucs],
                     "val_auc_mean": round(sum(aucs) / len(aucs), 4)})
    return rows


def markdown(title: str, rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = [f"### {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    return "\n".join(lines) + "\n"


@entry_point
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = CommandLine("python -m bench.ablation", __doc__, positional="DATA_ROOT")
    parser.add_argument("--expert", default="resnet")
    parser.add_argument("--study", default="all", choices=["losses", "fakes", "split", "all"])
    parser.add_argument("--kl", type=float, default=1.0)
    parser.add_argument("--nce", type=float, default=0.1)
    parser.add_argument("--k", type=int, default=4, help="clusters for the split study")
    parser.add_argument("--folds-trained", type=int, default=2, help="folds trained per split kind")
    parser.add_argument("--embed-weights", type=Path, help="split study: weights folder of an already "
                                                               "trained --expert to embed with")
    parser.add_argument("--work", type=Path, default=Path("/tmp/dfd_ablation"))
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS_ablation.md")
    args = parser.parse_args(argv)
    args.data_root, overrides = Path(args.positional), args.config_argv  # passed on to every command
    config_from_argv([str(args.data_root), *overrides])  # a bad key stops here, not in the first training
    studies = ["losses", "fakes", "split"] if args.study == "all" else [args.study]
    sections = [f"Ablations of expert `{args.expert}` on `{args.data_root}` "
                f"(overrides: {' '.join(overrides) or 'none'}); command: "
                f"`python -m bench.ablation {' '.join(argv)}`\n"]
    for study in studies:
        rows = {"losses": study_losses, "fakes": study_fakes, "split": study_split}[study](args, overrides)
        sections.append(markdown(study, rows))
        args.out.write_text("\n".join(sections))  # after each study: a crash keeps what finished
        print(sections[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
