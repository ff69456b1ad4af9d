"""The one training loop, for every expert.

    python -m experts.train DATA_ROOT [--profile NAME | profile=NAME] [key=value ...]

For each name in `experts`, `train_expert` runs five steps:

    build_run        the expert, its data (data_prep.loaders), AdamW, warm-up + cosine, EMA weights
    resume_run       with resume=true, continue from runs/<name>/checkpoint.pt to the same result
    train_one_epoch  every epoch; then
    validate         AUC with both the raw and the EMA weights, keep the best EMA weights (with
                     swa_fraction: add the raw ones to their running mean), checkpoint
    export           bake the best EMA weights (or that mean) into <out>/<name>.safetensors and the manifest

Under `torchrun` it runs data-parallel (DDP); rank 0 logs and writes.

Determinism: every random choice of epoch e (sample order, augmentations, online fakes,
dropout) is seeded from (seed, e, sample index), so an interrupted run resumed from its last
checkpoint draws exactly what the uninterrupted run drew.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from common.cli import CommandLine, entry_point
from common.errors import ConfigError, UsageError
from common.files import atomic_write
from common.inputs import to_unit_float
from common.metrics import safe_auc
from common.runtime import Runtime, mixed_precision, sample_seed, seed_everything, setup_runtime
from configs import Config, config_from, to_dict
from configs.settings import ExpertSettings, expert_settings
from data_prep.dataset import Sample, load_splits, summarize
from data_prep.faces import FaceCropCache
from data_prep.folds import fold_samples, read_folds
from data_prep.loaders import EpochSampler, FaceCropDataset, cache_face_crops, make_loader
from experts import Expert, create_expert
from experts.base import check_expert_config
from experts.swa import add_to_average, load_average, swa_epochs, warmup_cosine
from experts.weights import save_expert

log = logging.getLogger("train")

# In a data.folds_csv: an image neither trained nor validated on (k-fold stacking, ensemble.oof,
# scores it with this fold's experts afterwards).
HELD_OUT_FOLD = -2


# ----------------------------------------------------------------------------- pieces

class TrainStep(nn.Module):
    """Wraps the expert so that DDP sees the loss computation as one forward pass."""

    def __init__(self, expert, loss_cfg):
        super().__init__()
        self.expert, self.loss_cfg = expert, loss_cfg

    def forward(self, x, y, *boundaries):  # the blending boundaries, for an expert that learns them
        return self.expert.training_loss(x, y, self.loss_cfg, *boundaries)


def to_input(x: torch.Tensor, device, channels_last: bool) -> torch.Tensor:
    x = to_unit_float(x, device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()


@torch.no_grad()
def predict(model, loader, device, channels_last=False, amp_dtype=None, show=False, desc="val"):
    model.eval()
    scores, labels = [], []
    for x, y in tqdm(loader, desc=desc, disable=not show, leave=False):
        with autocast(device, amp_dtype):
            scores.append(model.predict_proba(to_input(x, device, channels_last)).float().cpu())
        labels.append(y)
    return torch.cat(scores).numpy(), torch.cat(labels).numpy()


# ----------------------------------------------------------------------------- one expert

@dataclasses.dataclass
class ExpertRun:
    """One expert's training: its settings, model, data and optimizer, and how far it got."""
    settings: ExpertSettings   # its resolved settings (configs.settings): name, seed, data, train, ...
    export_name: str           # its name in the weights folder and run_dir (<name>_fold<k> for a fold)
    run_dir: Path              # checkpoint.pt, metrics.json / .csv, val_scores.json
    show: bool                 # progress bars
    crops: FaceCropCache
    expert: Expert
    step_module: nn.Module     # the expert's loss as one forward pass (DDP-wrapped under torchrun)
    train_samples: list[Sample]
    train_set: FaceCropDataset
    sampler: EpochSampler
    train_loader: DataLoader
    val_loader: DataLoader
    params: list[nn.Parameter]  # what the optimizer updates
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: object                # torch_ema.ExponentialMovingAverage of `params`
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    swa_epochs: int = 0        # >0: export the mean of the raw weights of the last swa_epochs epochs (swa_fraction)
    start_epoch: int = 0
    history: list[dict] = dataclasses.field(default_factory=list)
    best: dict = dataclasses.field(default_factory=lambda: {"auc": -1.0, "epoch": -1, "state": None})
    swa: dict = dataclasses.field(default_factory=lambda: {"state": None, "count": 0})  # running mean

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def epochs(self) -> int:
        return self.settings.train.epochs

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoint.pt"


def build_run(settings: ExpertSettings, splits: dict, rt: Runtime, run_dir: Path, export_name: str) -> ExpertRun:
    """The expert of `settings`, its loaders and its optimizer, before the first epoch."""
    train = settings.train
    show = rt.is_main and (sys.stderr.isatty() or os.environ.get("FORCE_TQDM") == "1")
    seed_everything(settings.seed)  # before the expert is built: its initial weights are seeded too

    crops = FaceCropCache(settings.face, settings.data.cache_dir)
    expert = create_expert(settings.expert, settings.data.image_size).to(rt.device)
    train_samples = expert.training_samples(splits)
    reals_only = expert.trains_on_real_only  # then: no editing fake, no class balance to draw
    if reals_only:  # recorded so in the manifest
        settings = dataclasses.replace(settings, data=dataclasses.replace(settings.data, online_fakes=0.0))
    if settings.expert.train_on == "reals" and settings.data.online_fakes == 0:  # data.online_fakes 0, inherited
        raise ConfigError(f"expert.{settings.name}.train_on: reals needs editing fakes to learn from "
                          "(online_fakes > 0)")
    train_set = FaceCropDataset(train_samples, crops, settings, train=True, boundaries=expert.learns_boundaries)
    # A reals-only valset (training on reals + editing fakes) is validated on its reals and
    # an editing fake of each: model selection never sees a fake of the data set.
    val_real_only = all(s.target == 0 for s in splits["valset"])
    val_set = FaceCropDataset(splits["valset"], crops, settings, train=False, paired_fakes=val_real_only)
    sampler = EpochSampler([s.target for s in train_samples], train.balanced_sampling and not reals_only,
                           settings.seed, rt.rank, rt.world)
    train_loader = make_loader(train_set, settings, sampler)
    val_loader = make_loader(val_set, settings, batch_size=2 * train.batch_size)
    if len(train_loader) == 0:
        raise UsageError(f"{settings.name}: {len(train_samples)} training images are fewer than one batch "
                         f"({train.batch_size} x {rt.world} processes); lower train.batch_size")

    if train.channels_last:
        expert = expert.to(memory_format=torch.channels_last)
    params = expert.trainable_parameters(settings.loss)  # freezes the rest: before DDP registers them
    step_module: nn.Module = TrainStep(expert, settings.loss)
    if rt.world > 1:
        if train.sync_bn and rt.device.type == "cuda":
            step_module = nn.SyncBatchNorm.convert_sync_batchnorm(step_module)
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)

    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    steps_per_epoch = max(1, len(train_loader) // train.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(  # to 0 at the last epoch, SWA or not
        train.epochs * steps_per_epoch, round(train.warmup_epochs * steps_per_epoch)))
    from torch_ema import ExponentialMovingAverage
    ema = ExponentialMovingAverage(params, decay=train.ema_decay)
    amp_dtype, use_scaler = mixed_precision(train.amp, rt.device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    return ExpertRun(settings, export_name, run_dir, show, crops, expert, step_module, train_samples, train_set,
                     sampler, train_loader, val_loader, params, optimizer, scheduler, ema, scaler, amp_dtype,
                     swa_epochs(settings.expert.swa_fraction, train.epochs))


def resume_run(run: ExpertRun, rt: Runtime) -> None:
    """A checkpoint (resume=true): every state as it was after its epoch."""
    if not run.checkpoint.is_file():
        return
    ck = torch.load(run.checkpoint, map_location=rt.device, weights_only=True)
    run.expert.load_state_dict(ck["model"])
    run.optimizer.load_state_dict(ck["optimizer"])
    run.scheduler.load_state_dict(ck["scheduler"])
    run.ema.load_state_dict(ck["ema"])
    run.scaler.load_state_dict(ck["scaler"])
    run.start_epoch, run.history = ck["epoch"] + 1, json.loads(ck["history"])
    run.best = {"auc": ck["best_auc"], "epoch": ck["best_epoch"], "state": ck["best_state"]}
    run.swa = {"state": ck.get("swa_state"), "count": ck.get("swa_count", 0)}
    if rt.is_main:
        log.info("%s: resumed from %s at epoch %d", run.name, run.checkpoint, run.start_epoch)


def train_one_epoch(run: ExpertRun, epoch: int, rt: Runtime) -> dict:
    """One pass over the training loader; the epoch's row of the history (loss terms, lr, speed)."""
    train = run.settings.train
    seed_everything(sample_seed(run.settings.seed, epoch))  # the expert's own seed
    run.sampler.set_epoch(epoch)
    run.train_set.set_epoch(epoch)
    run.expert.train()
    run.optimizer.zero_grad(set_to_none=True)  # a partial accumulation must not leak into this epoch
    epoch_start, sums, n_batches, n_images = time.time(), {}, 0, 0
    bar = tqdm(run.train_loader, desc=f"{run.name} {epoch + 1}/{run.epochs}", disable=not run.show, leave=False)
    for step, (x, y, *boundaries) in enumerate(bar):
        x, y = to_input(x, rt.device, train.channels_last), y.to(rt.device)
        with autocast(rt.device, run.amp_dtype):
            loss, logs = run.step_module(x, y, *(b.to(rt.device) for b in boundaries))
        run.scaler.scale(loss / train.grad_accum).backward()
        if (step + 1) % train.grad_accum == 0:
            run.scaler.unscale_(run.optimizer)
            if train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(run.params, train.grad_clip)
            run.scaler.step(run.optimizer)
            run.scaler.update()
            run.optimizer.zero_grad(set_to_none=True)
            run.scheduler.step()
            run.ema.update()
        logs["loss"] = loss.item()
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + v
        n_batches += 1
        n_images += len(x)
        bar.set_postfix(loss=f"{sums['loss'] / n_batches:.4f}")
    train_seconds = time.time() - epoch_start
    return {"epoch": epoch + 1, "lr": run.optimizer.param_groups[0]["lr"],
            **{f"train_{k}": v / max(1, n_batches) for k, v in sums.items()},
            "train_images_per_s": n_images * rt.world / max(train_seconds, 1e-9)}


def validate(run: ExpertRun, row: dict, epoch_start: float, rt: Runtime) -> None:
    """Validation AUC of the raw and the EMA weights into `row`, appended to the history; the
    EMA weights are kept as the best when their AUC is the best so far (rank 0 only). Only every
    `validate_every`-th epoch and the last are validated: the others log their loss alone."""
    expert, channels_last = run.expert, run.settings.train.channels_last
    if row["epoch"] % run.settings.expert.validate_every == 0 or row["epoch"] == run.epochs:
        p_raw, y_val = predict(expert, run.val_loader, rt.device, channels_last, run.amp_dtype, run.show)
        with torch.no_grad(), run.ema.average_parameters():  # no_grad: torch-ema's state breaks otherwise
            p_ema, _ = predict(expert, run.val_loader, rt.device, channels_last, run.amp_dtype, run.show)
            ema_state = {k: v.detach().cpu().clone() for k, v in expert.state_dict().items()}
        row.update(val_auc=safe_auc(y_val, p_raw), val_auc_ema=safe_auc(y_val, p_ema))
        if run.best["state"] is None or row["val_auc_ema"] > run.best["auc"] or math.isnan(run.best["auc"]):
            run.best = {"auc": row["val_auc_ema"], "epoch": row["epoch"], "state": ema_state}
    row["seconds"] = time.time() - epoch_start
    if row["epoch"] > run.epochs - run.swa_epochs:
        add_to_average(run.swa, expert.state_dict())
    run.history.append(row)
    validated = f"val AUC {row['val_auc']:.4f} (EMA {row['val_auc_ema']:.4f})" if "val_auc" in row else "not validated"
    log.info("%s epoch %d/%d  loss %.4f  %s  %.0f img/s  %.0fs", run.name, row["epoch"], run.epochs,
             row["train_loss"], validated, row["train_images_per_s"], row["seconds"])


def export(run: ExpertRun, rt: Runtime, splits: dict, started: float, cfg: Config) -> dict:
    """Load the best EMA weights (or the SWA mean), let the expert finalize itself, write weights
    + manifest (in cfg.out, with the run's whole config), the history and the validation scores;
    the summary recorded in the manifest."""
    settings, expert = run.settings, run.expert
    train_eval = make_loader(FaceCropDataset(run.train_samples, run.crops, settings, train=False),
                             settings)  # SWA's BatchNorm sees what the expert sees
    if run.swa_epochs:  # experts/swa.py
        load_average(expert, run.swa, run.swa_epochs, (to_input(x, rt.device, False) for x, _ in train_eval),
                     run.export_name)
    else:
        expert.load_state_dict(run.best["state"])
    expert.eval()
    val_batches = ((to_input(x, rt.device, False), y) for x, y in run.val_loader)
    training_batches = ((to_input(x, rt.device, False), y) for x, y in train_eval)
    expert.finalize(training_batches, val_batches)
    p_val, y_val = predict(expert, run.val_loader, rt.device, show=run.show)
    write_history(run.run_dir, run.history)
    summary = {
        "best_epoch": run.best["epoch"], "val_auc": safe_auc(y_val, p_val), "epochs": run.epochs,
        "weights": (f"mean of epochs {run.epochs - run.swa_epochs + 1}-{run.epochs}" if run.swa_epochs
                    else f"EMA weights of the best epoch {run.best['epoch']}"),
        "train_seconds": round(time.time() - started, 1), "image_size": settings.data.image_size,
        # where and how it ran, so a manifest says whether the GPU, AMP and DDP were used
        "hardware": {"device": torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "cpu",
                     "processes": rt.world, "channels_last": settings.train.channels_last,
                     "precision": str(run.amp_dtype).removeprefix("torch.") if run.amp_dtype else "float32"},
        "data": {"trainset": summarize(run.train_samples), "valset": summarize(splits["valset"])},
        "history": run.history,
    }
    save_expert(expert, cfg.out, run.export_name, settings.face, {"training": summary}, config=to_dict(cfg),
                settings=settings)
    (run.run_dir / "val_scores.json").write_text(json.dumps(
        {s.name: float(p) for s, p in zip(splits["valset"], p_val)}))
    log.info("%s: %s, val AUC %.4f -> %s/%s.safetensors", run.export_name, summary["weights"],
             summary["val_auc"], cfg.out, run.export_name)
    return summary


def train_expert(cfg: Config, settings: ExpertSettings, splits: dict, rt: Runtime, export_name: str) -> dict:
    """Train the expert of `settings` (one of `cfg`'s); exported (weights, manifest, run dir) as
    `export_name`. Returns its summary (also written to the manifest); {} on the ranks other than 0."""
    run = build_run(settings, splits, rt, Path(cfg.run_dir) / export_name, export_name)
    if cfg.resume:
        resume_run(run, rt)
    total, trainable = run.expert.parameter_counts()
    if rt.is_main:
        ecfg = settings.expert
        built = ecfg.kind + (f", {ecfg.model}" if "model" in run.expert.config_fields else "")
        log.info("%s (%s): %d train / %d val images, %d epochs, %.2fM params (%.3f%% trainable)",
                 settings.name, built, len(run.train_samples), len(splits["valset"]), run.epochs,
                 total / 1e6, 100 * trainable / total)
    started = time.time()
    for epoch in range(run.start_epoch, run.epochs):
        epoch_start = time.time()
        row = train_one_epoch(run, epoch, rt)
        if rt.is_main:
            validate(run, row, epoch_start, rt)
            save_checkpoint(run, epoch)
        if rt.world > 1:
            dist.barrier()
    return export(run, rt, splits, started, cfg) if rt.is_main else {}


def save_checkpoint(run: ExpertRun, epoch: int) -> None:
    """Everything needed to continue after `epoch`; plain tensors and numbers only (loads
    with weights_only)."""
    with atomic_write(run.checkpoint, "wb") as handle:
        torch.save({"model": run.expert.state_dict(), "optimizer": run.optimizer.state_dict(),
                    "scheduler": run.scheduler.state_dict(), "ema": run.ema.state_dict(),
                    "scaler": run.scaler.state_dict(), "epoch": epoch, "history": json.dumps(run.history),
                    "best_auc": run.best["auc"], "best_epoch": run.best["epoch"],
                    "best_state": run.best["state"], "swa_state": run.swa["state"],
                    "swa_count": run.swa["count"]}, handle)


def write_history(run_dir: Path, history: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps(history, indent=2))
    keys = sorted({k for row in history for k in row}, key=lambda k: (k != "epoch", k))
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)


@entry_point
def main(argv=None) -> int:
    args = CommandLine("python -m experts.train", __doc__, positional="DATA_ROOT", required=False).parse_args(argv)
    cfg = config_from(args, data_root=args.positional)
    if not cfg.data_root:
        raise UsageError("no data root: python -m experts.train DATA_ROOT [key=value ...]")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    train_experts(cfg)
    return 0


def train_experts(cfg: Config) -> None:
    """Train every expert of `cfg.experts` (with data.folds_csv: on fold data.fold's split)."""
    # Every expert's settings before any is trained: a bad key must not surface hours in.
    for name in cfg.experts:
        check_expert_config(cfg.expert_config(name), name)
    every = [expert_settings(cfg, name) for name in cfg.experts]
    rt = setup_runtime(cfg.device, cfg.threads)
    splits = load_splits(cfg.data_root, seed=cfg.seed, methods=cfg.data.methods,
                         allow_real_only=any(settings.data.online_fakes > 0 for settings in every))
    suffix = ""
    if cfg.data.folds_csv:  # leave-one-cluster-out: fold k validates on cluster k
        pool = splits["trainset"] + splits["valset"]
        held_out = {name for name, fold in read_folds(cfg.data.folds_csv).items() if fold == HELD_OUT_FOLD}
        splits["trainset"], splits["valset"] = fold_samples([s for s in pool if s.name not in held_out],
                                                            cfg.data.folds_csv, cfg.data.fold)
        suffix = f"_fold{cfg.data.fold}"
    cached = ["trainset", "valset"]
    crops = FaceCropCache(cfg.face, cfg.data.cache_dir)
    for split in cached:
        if rt.is_main:
            splits[split] = cache_face_crops(splits[split], crops, cfg.data.num_workers, sys.stderr.isatty())
    if rt.world > 1:  # the other ranks read the crops rank 0 just cached
        dist.barrier()
        if not rt.is_main:
            for split in cached:
                splits[split] = cache_face_crops(splits[split], crops, 0, show=False)
    for settings in every:
        train_expert(cfg, settings, splits, rt, export_name=settings.name + suffix)
    if rt.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
