#!/usr/bin/env bash
# The whole recipe, from a labelled folder to a submission:
#
#   bash train.sh [DATA_ROOT] [profile=cpu|gpu | --profile cpu|gpu] [key=value ...]
#
# With no DATA_ROOT it builds the demo data set (data_prep.demo) and trains on it.
# Writes inference-ready weights into weights/ (or out=DIR), reports into reports/ (or
# reports=DIR) and, when DATA_ROOT has a testset/, reports/submission.csv.
# With more than one GPU visible it trains with torchrun (DDP); NPROC=N overrides.
# FOLDS=K first trains the first expert on K leave-one-cluster-out folds (see step 1b).
# ensemble.oof_folds=K fits the stacker on out-of-fold scores (k-fold stacking, see step 3).
set -euo pipefail
cd "$(dirname "$0")"
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1

DATA_ROOT=""
if [[ $# -gt 0 && "$1" != *=* && "$1" != -* ]]; then DATA_ROOT="$1"; shift; fi
ARGS=("$@")
setting() {  # the value of key=VALUE (or --key VALUE, --key=VALUE) among the arguments, else the default
  local key="$1" default="$2" previous="" arg
  for arg in "${ARGS[@]}"; do
    [[ "$arg" == "$key="* || "$arg" == "--$key="* ]] && default="${arg#*=}"
    [[ "$previous" == "--$key" ]] && default="$arg"
    previous="$arg"
  done
  echo "$default"
}
OUT=$(setting out weights)
REPORTS=$(setting reports reports)
mkdir -p "$REPORTS"
START=$(date +%s)

# 0. The gpu profile starts from pretrained backbones: learn now, not hours into the run,
# if any expert's weights are neither in the hub cache nor in its pretrained_file.
if [[ "$(setting profile cpu)" == gpu ]]; then
  echo "== checking the pretrained weights of the gpu experts"
  python -m experts.check_pretrained "${ARGS[@]}"
fi

# 1. Data: the demo set when no data root is given.
if [[ -z "$DATA_ROOT" ]]; then
  DATA_ROOT=demo_data
  echo "== no DATA_ROOT given: building the demo data set in $DATA_ROOT/"
  python -m data_prep.demo "$DATA_ROOT" --seed "$(setting seed 0)"
fi

# A labelled video folder (labels.csv: video_name,target) trains on sampled frames.
if [[ -f "$DATA_ROOT/labels.csv" ]] && head -1 "$DATA_ROOT/labels.csv" | grep -q '^video_name'; then
  FRAMES_ROOT=".cache/video_frames/$(basename "$(cd "$DATA_ROOT" && pwd)")"
  echo "== $DATA_ROOT is a video folder: extracting frames into $FRAMES_ROOT/"
  python -m data_prep.video "$DATA_ROOT" "$FRAMES_ROOT" --frames "${FRAMES:-16}" --seed "$(setting seed 0)"
  DATA_ROOT="$FRAMES_ROOT"
fi

# 1a. Audit: exact and near duplicates across (and within) the splits, and images labelled
# both real and fake. A warning, never a stop; everything found goes to reports/audit.json.
echo "== auditing $DATA_ROOT for duplicates and leakage"
python -m data_prep.audit "$DATA_ROOT" --json "$REPORTS/audit.json" ||
  echo "warning: the data audit could not run (above); training goes on" >&2

# 1b. Optional (FOLDS=K): the winning solution's out-of-distribution check. Re-split
# train+val by k-means clusters of face embeddings and train the first expert once per fold
# (fold k validates on cluster k); reports/folds/ gets the clusters, t-SNE and per-fold AUC.
if [[ -n "${FOLDS:-}" ]]; then
  FIRST_EXPERT=$(python -c "import sys; from configs import config_from_argv; print(config_from_argv(sys.argv[1:]).experts[0])" "$DATA_ROOT" "${ARGS[@]}")
  echo "== cluster re-split into $FOLDS folds; training $FIRST_EXPERT per fold"
  # the same profile and face.* / data.* overrides as training, so the clusters are of its crops
  python -m experts.cluster_split "$DATA_ROOT" --out "$REPORTS/folds" --k "$FOLDS" "${ARGS[@]}"
  for ((k = 0; k < FOLDS; k++)); do
    python -m experts.train "$DATA_ROOT" "${ARGS[@]}" experts="$FIRST_EXPERT" \
      data.folds_csv="$REPORTS/folds/folds.csv" data.fold="$k" out="$REPORTS/folds/weights" run_dir="$REPORTS/folds/runs"
  done
fi

# 2. Experts: one training loop for all (data-parallel under torchrun when GPUs allow).
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
NPROC=${NPROC:-$GPUS}
echo "== training experts on $DATA_ROOT"
if [[ "$NPROC" -gt 1 ]]; then
  torchrun --standalone --nproc_per_node="$NPROC" -m experts.train "$DATA_ROOT" "${ARGS[@]}"
else
  python -m experts.train "$DATA_ROOT" "${ARGS[@]}"
fi

# 3. Ensemble: the stacking meta-learner, fitted on scores of images the experts did not
# train on: the valset (hold-out), or with ensemble.oof_folds=K every trainset+valset image,
# scored by fold experts that ensemble.fit first trains K more times, each without its fold
# (k-fold stacking, ensemble/oof.py: K + 1 trainings of every expert in all, in one process).
OOF_FOLDS=$(python -c "import sys; from configs import config_from_argv; print(config_from_argv(sys.argv[1:]).ensemble.oof_folds)" "$DATA_ROOT" "${ARGS[@]}")
if [[ "$OOF_FOLDS" -gt 0 ]]; then
  echo "== k-fold stacking: training every expert $OOF_FOLDS more times, then fitting the ensemble"
else
  echo "== fitting the ensemble"
fi
python -m ensemble.fit "$DATA_ROOT" "${ARGS[@]}"

# 4. Reports: metrics and plots on validation (and on the testset when it has labels).
echo "== evaluating"
python -m ensemble.evaluate "$DATA_ROOT" --split valset --reports "$REPORTS/valset" "${ARGS[@]}"
if [[ -f "$DATA_ROOT/testset_label.txt" ]]; then
  python -m ensemble.evaluate "$DATA_ROOT" --split testset --reports "$REPORTS/testset" "${ARGS[@]}"
fi

# 5. Submission.
if [[ -d "$DATA_ROOT/testset" ]]; then
  echo "== scoring $DATA_ROOT/testset"
  python infer.py "$DATA_ROOT/testset" --csv "$REPORTS/submission.csv" --weights "$OUT"
fi
echo "== done in $(( $(date +%s) - START )) s: weights in $OUT/, reports in $REPORTS/"
