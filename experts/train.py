"""The one training loop, for every expert.

    python -m experts.train DATA_ROOT [--profile NAME | profile=NAME] [key=value ...]

For each name in `experts`: build the expert from its config, train it with AdamW, a
warm-up + cosine schedule and EMA weights, validate (AUC) every epoch with both the raw and
the EMA weights, keep the best EMA weights, checkpoint every epoch (`resume=true` continues
to the same result), then bake the best EMA weights into `<out>/<name>.safetensors` and the
manifest. Under `torchrun` it runs data-parallel (DDP); rank 0 logs and writes.

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

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from common.cli import CommandLine, entry_point
from common.errors import UsageError
from common.files import atomic_write
from common.inputs import to_unit_float
from common.metrics import roc_auc
from common.runtime import mixed_precision, sample_seed, seed_everything, select_device
from configs import Config, ExpertConfig, config_from, to_dict
from data_prep.dataset import Sample, load_splits, read_extra_reals, summarize
from data_prep.faces import FaceCropCache
from data_prep.images import ImageDecodeError
from data_prep.transforms import resize_square, to_tensor, train_augmentations
from experts import EXPERTS, create_expert
from experts.weights import save_expert

log = logging.getLogger("train")


# ----------------------------------------------------------------------------- runtime

@dataclasses.dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(cfg: Config) -> Runtime:
    """Pick the device and, under torchrun (WORLD_SIZE > 1), join the process group."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = select_device(cfg.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device.type == "cuda":  # one GPU per process: torchrun's LOCAL_RANK picks it
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, rank, world)


# ----------------------------------------------------------------------------- data

def cache_face_crops(samples: list[Sample], crops: FaceCropCache, num_workers: int, show: bool) -> list[Sample]:
    """Decode and face-crop every image once (filling the cache); broken files are skipped
    with a one-line warning each and counted, never stopping the run."""
    loader = DataLoader(_CropProbe(samples, crops), batch_size=None, num_workers=num_workers)
    kept, broken = [], []
    for index, error in tqdm(loader, total=len(samples), desc="face crops", disable=not show, leave=False):
        if error:
            broken.append(error)
            log.warning("skipped %s", error)
        else:
            kept.append(samples[index])
    if broken:
        log.warning("%d of %d images could not be read and were skipped", len(broken), len(samples))
    return kept


class _CropProbe(Dataset):
    def __init__(self, samples, crops):
        self.samples, self.crops = samples, crops

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        try:
            self.crops.load(self.samples[i].path)
            return i, ""
        except ImageDecodeError as err:
            return i, str(err)


class FaceCropDataset(Dataset):
    """(uint8 tensor 3 x S x S, label). Training: augmentations and, with probability
    `online_fakes`, a real turned into an editing fake (label 1) on the fly."""

    def __init__(self, samples, crops: FaceCropCache, size: int, cfg: Config, train: bool,
                 paired_fakes: bool = False, patch_size: int = 0):
        self.samples, self.crops, self.size, self.train = samples, crops, size, train
        # paired_fakes (evaluation of a reals-only split): after the n samples come n editing
        # fakes, one made from each real with a fixed seed, so every epoch sees the same ones.
        self.paired = paired_fakes
        self.seed, self.epoch = cfg.seed, 0
        self.augment = train_augmentations(cfg.augment, size) if train else None
        self.online_fakes = cfg.data.online_fakes if train else 0.0
        self.fake_ops = cfg.data.online_fake_ops or None
        self.fake_masks = cfg.data.fake_masks
        self.real_indices = [i for i, s in enumerate(samples) if s.target == 0]
        self.margin = cfg.face.margin
        self.patch = patch_size if train and 0 < patch_size < size else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.samples) * (2 if self.paired else 1)

    def __getitem__(self, i):
        if i >= len(self.samples):  # a paired fake
            i -= len(self.samples)
            rng = np.random.default_rng(sample_seed(self.seed, 1 << 21, i))
            image, target = self.make_fake(i, self.crops.load(self.samples[i].path), rng)
            return to_tensor(resize_square(image, self.size)), target
        sample = self.samples[i]
        image, target = self.crops.load(sample.path), sample.target
        if self.train:
            rng = np.random.default_rng(sample_seed(self.seed, self.epoch, i))
            if target == 0 and self.online_fakes > 0 and rng.random() < self.online_fakes:
                image, target = self.make_fake(i, image, rng)
            self.augment.set_random_seed(int(rng.integers(2**31)))
            image = resize_square(self.augment(image=image)["image"], self.size)
            if self.patch:  # a native-resolution patch; evaluation sees the whole input
                y0, x0 = rng.integers(0, self.size - self.patch + 1, size=2)
                image = image[y0:y0 + self.patch, x0:x0 + self.patch]
            return to_tensor(image), target
        return to_tensor(resize_square(image, self.size)), target

    def make_fake(self, i, image, rng):
        from data_prep.manipulations import fake_from_face_crop
        donor = self.crops.load(self.samples[int(rng.choice(self.real_indices))].path)
        points = self.crops.landmarks(self.samples[i].path) if self.fake_masks == "landmarks" else None
        fake, _mask, _name = fake_from_face_crop(image, rng, donor, self.margin, self.fake_ops, points)
        return fake, 1


class EpochSampler(Sampler):
    """Seeded per epoch, sharded by rank. Class-balanced: draws with replacement so each
    class is seen equally often; else a permutation."""

    def __init__(self, targets, balanced: bool, seed: int, rank=0, world=1):
        self.targets = np.asarray(targets)
        self.balanced, self.seed, self.rank, self.world = balanced, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.targets) // self.world

    def __iter__(self):
        g = np.random.default_rng(sample_seed(self.seed, self.epoch, 1 << 20))
        n = len(self.targets)
        if self.balanced and len(np.unique(self.targets)) > 1:
            counts = np.bincount(self.targets)
            weights = 1.0 / counts[self.targets]
            order = g.choice(n, size=n, replace=True, p=weights / weights.sum())
        else:
            order = g.permutation(n)
        return iter(order[self.rank::self.world][: len(self)].tolist())


def make_loader(dataset, cfg: Config, sampler=None, batch_size=None, shuffle=False):
    return DataLoader(dataset, batch_size=batch_size or cfg.train.batch_size, sampler=sampler,
                      shuffle=shuffle, num_workers=cfg.data.num_workers,
                      pin_memory=torch.cuda.is_available(), drop_last=sampler is not None,
                      persistent_workers=False)


# ----------------------------------------------------------------------------- training

class TrainStep(nn.Module):
    """Wraps the expert so that DDP sees the loss computation as one forward pass."""

    def __init__(self, expert, loss_cfg):
        super().__init__()
        self.expert, self.loss_cfg = expert, loss_cfg

    def forward(self, x, y):
        return self.expert.training_loss(x, y, self.loss_cfg)


def warmup_cosine(total_steps: int, warmup_steps: int):
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def to_input(x: torch.Tensor, device, channels_last: bool) -> torch.Tensor:
    x = to_unit_float(x, device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def predict(model, loader, device, channels_last=False, amp_dtype=None, show=False, desc="val"):
    model.eval()
    scores, labels = [], []
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    for x, y in tqdm(loader, desc=desc, disable=not show, leave=False):
        with autocast:
            scores.append(model.predict_proba(to_input(x, device, channels_last)).float().cpu())
        labels.append(y)
    return torch.cat(scores).numpy(), torch.cat(labels).numpy()


def safe_auc(y, p) -> float:
    try:
        return float(roc_auc(y, p))
    except ValueError:
        return float("nan")


def train_expert(cfg: Config, name: str, splits: dict, rt: Runtime, export_name: str | None = None) -> dict:
    """Train expert `name` of the config; exported (weights, manifest, run dir) as
    `export_name` (default: the same). Returns its summary (also written to the manifest)."""
    ecfg: ExpertConfig = cfg.expert_config(name)
    export_name = export_name or name
    size = ecfg.image_size or cfg.data.image_size
    epochs = ecfg.epochs or cfg.train.epochs
    lr = ecfg.lr or cfg.train.lr
    run_dir = Path(cfg.run_dir) / export_name
    show = rt.is_main and (sys.stderr.isatty() or os.environ.get("FORCE_TQDM") == "1")
    seed_everything(cfg.seed)

    crops = FaceCropCache(cfg.face, cfg.data.cache_dir)
    expert = create_expert(ecfg, size).to(rt.device)
    train_samples = splits["trainset"]
    if expert.trains_on_real_only:
        train_samples = [s for s in train_samples if s.target == 0] + splits.get("extra_reals", [])
    train_set = FaceCropDataset(train_samples, crops, size, cfg, train=True, patch_size=ecfg.patch_size)
    if expert.trains_on_real_only:
        train_set.online_fakes = 0.0  # a real-only model must never see an editing fake
    # A reals-only valset (training on reals + editing fakes) is validated on its reals and
    # an editing fake of each: model selection never sees a fake of the data set.
    val_real_only = all(s.target == 0 for s in splits["valset"])
    val_set = FaceCropDataset(splits["valset"], crops, size, cfg, train=False, paired_fakes=val_real_only)
    sampler = EpochSampler([s.target for s in train_samples], cfg.train.balanced_sampling and
                           not expert.trains_on_real_only, cfg.seed, rt.rank, rt.world)
    train_loader = make_loader(train_set, cfg, sampler)
    val_loader = make_loader(val_set, cfg, batch_size=2 * cfg.train.batch_size)
    if len(train_loader) == 0:
        raise UsageError(f"{name}: {len(train_samples)} training images are fewer than one batch "
                         f"({cfg.train.batch_size} x {rt.world} processes); lower train.batch_size")

    if cfg.loss.nce == 0 and hasattr(expert, "projector"):
        # Only the NCE loss uses the projection head: without it, freeze it, so it neither
        # counts as trainable nor leaves DDP waiting for gradients that never come.
        expert.projector.requires_grad_(False)
    if cfg.train.channels_last:
        expert = expert.to(memory_format=torch.channels_last)
    step_module: nn.Module = TrainStep(expert, cfg.loss)
    if rt.world > 1:
        if cfg.train.sync_bn and rt.device.type == "cuda":
            step_module = nn.SyncBatchNorm.convert_sync_batchnorm(step_module)
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)

    params = [p for p in expert.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.train.weight_decay)
    steps_per_epoch = max(1, len(train_loader) // cfg.train.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
        epochs * steps_per_epoch, round(cfg.train.warmup_epochs * steps_per_epoch)))
    from torch_ema import ExponentialMovingAverage
    ema = ExponentialMovingAverage(params, decay=cfg.train.ema_decay)
    amp_dtype, use_scaler = mixed_precision(cfg.train.amp, rt.device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    start_epoch, best = 0, {"auc": -1.0, "epoch": -1, "state": None}
    history: list[dict] = []
    checkpoint = run_dir / "checkpoint.pt"
    if cfg.resume and checkpoint.is_file():
        ck = torch.load(checkpoint, map_location=rt.device, weights_only=True)
        expert.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        ema.load_state_dict(ck["ema"])
        scaler.load_state_dict(ck["scaler"])
        start_epoch, history = ck["epoch"] + 1, json.loads(ck["history"])
        best = {"auc": ck["best_auc"], "epoch": ck["best_epoch"], "state": ck["best_state"]}
        if rt.is_main:
            log.info("%s: resumed from %s at epoch %d", name, checkpoint, start_epoch)

    total, trainable = expert.parameter_counts()
    if rt.is_main:
        log.info("%s (%s, %s): %d train / %d val images, %d epochs, %.2fM params (%.3f%% trainable)",
                 name, ecfg.kind, ecfg.model, len(train_samples), len(splits["valset"]), epochs,
                 total / 1e6, 100 * trainable / total)
    started = time.time()
    for epoch in range(start_epoch, epochs):
        seed_everything(sample_seed(cfg.seed, epoch))
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        expert.train()
        optimizer.zero_grad(set_to_none=True)  # a partial accumulation must not leak into this epoch
        epoch_start, sums, n_batches, n_images = time.time(), {}, 0, 0
        bar = tqdm(train_loader, desc=f"{name} {epoch + 1}/{epochs}", disable=not show, leave=False)
        for step, (x, y) in enumerate(bar):
            x, y = to_input(x, rt.device, cfg.train.channels_last), y.to(rt.device)
            with torch.autocast(rt.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
                loss, logs = step_module(x, y)
            scaler.scale(loss / cfg.train.grad_accum).backward()
            if (step + 1) % cfg.train.grad_accum == 0:
                scaler.unscale_(optimizer)
                if cfg.train.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                ema.update()
            logs["loss"] = loss.item()
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            n_batches += 1
            n_images += len(x)
            bar.set_postfix(loss=f"{sums['loss'] / n_batches:.4f}")
        train_seconds = time.time() - epoch_start

        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
               **{f"train_{k}": v / max(1, n_batches) for k, v in sums.items()},
               "train_images_per_s": n_images * rt.world / max(train_seconds, 1e-9)}
        if rt.is_main:
            p_raw, y_val = predict(expert, val_loader, rt.device, cfg.train.channels_last, amp_dtype, show)
            with torch.no_grad(), ema.average_parameters():  # no_grad: torch-ema's state breaks otherwise
                p_ema, _ = predict(expert, val_loader, rt.device, cfg.train.channels_last, amp_dtype, show)
                ema_state = {k: v.detach().cpu().clone() for k, v in expert.state_dict().items()}
            row.update(val_auc=safe_auc(y_val, p_raw), val_auc_ema=safe_auc(y_val, p_ema),
                       seconds=time.time() - epoch_start)
            if best["state"] is None or row["val_auc_ema"] > best["auc"] or math.isnan(best["auc"]):
                best = {"auc": row["val_auc_ema"], "epoch": epoch + 1, "state": ema_state}
            history.append(row)
            log.info("%s epoch %d/%d  loss %.4f  val AUC %.4f (EMA %.4f)  %.0f img/s  %.0fs", name, epoch + 1,
                     epochs, row["train_loss"], row["val_auc"], row["val_auc_ema"],
                     row["train_images_per_s"], row["seconds"])
            save_checkpoint(checkpoint, expert, optimizer, scheduler, ema, scaler, epoch, history, best)
        if rt.world > 1:
            dist.barrier()

    if not rt.is_main:
        return {}
    expert.load_state_dict(best["state"])
    if hasattr(expert, "finalize"):
        real_batches = ((to_input(x, rt.device, False), y) for x, y in
                        make_loader(FaceCropDataset(train_samples, crops, size, cfg, train=False), cfg))
        val_batches = ((to_input(x, rt.device, False), y) for x, y in val_loader)
        expert.eval()
        expert.finalize(real_batches, val_batches)
    p_val, y_val = predict(expert, val_loader, rt.device, show=show)
    write_history(run_dir, history)
    summary = {
        "best_epoch": best["epoch"], "val_auc": safe_auc(y_val, p_val), "epochs": epochs,
        "train_seconds": round(time.time() - started, 1), "image_size": size,
        "data": {"trainset": summarize(train_samples), "valset": summarize(splits["valset"])},
        "history": history,
    }
    save_expert(expert, cfg.out, export_name, cfg.face, {"training": summary}, config=to_dict(cfg))
    (run_dir / "val_scores.json").write_text(json.dumps(
        {s.name: float(p) for s, p in zip(splits["valset"], p_val)}))
    log.info("%s: best epoch %d, val AUC %.4f -> %s/%s.safetensors", export_name, best["epoch"],
             summary["val_auc"], cfg.out, export_name)
    return summary


def save_checkpoint(path: Path, expert, optimizer, scheduler, ema, scaler, epoch, history, best) -> None:
    """Everything needed to continue; plain tensors and numbers only (loads with weights_only)."""
    with atomic_write(path, "wb") as handle:
        torch.save({"model": expert.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "ema": ema.state_dict(), "scaler": scaler.state_dict(),
                    "epoch": epoch, "history": json.dumps(history), "best_auc": best["auc"],
                    "best_epoch": best["epoch"], "best_state": best["state"]}, handle)


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
    rt = setup_runtime(cfg)
    splits = load_splits(cfg.data_root, seed=cfg.seed, methods=cfg.data.methods,
                         allow_real_only=cfg.data.online_fakes > 0)
    suffix = ""
    if cfg.data.folds_csv:  # leave-one-cluster-out: fold k validates on cluster k
        from data_prep.cluster_split import fold_samples
        splits["trainset"], splits["valset"] = fold_samples(splits["trainset"] + splits["valset"],
                                                            cfg.data.folds_csv, cfg.data.fold)
        suffix = f"_fold{cfg.data.fold}"
    if cfg.data.extra_reals and any(EXPERTS[cfg.expert_config(n).kind].trains_on_real_only
                                    for n in cfg.experts):
        splits["extra_reals"] = [s for folder in cfg.data.extra_reals for s in read_extra_reals(folder)]
    cached = [split for split in ("trainset", "valset", "extra_reals") if split in splits]
    crops = FaceCropCache(cfg.face, cfg.data.cache_dir)
    for split in cached:
        if rt.is_main:
            splits[split] = cache_face_crops(splits[split], crops, cfg.data.num_workers, sys.stderr.isatty())
    if rt.world > 1:  # the other ranks read the crops rank 0 just cached
        dist.barrier()
        if not rt.is_main:
            for split in cached:
                splits[split] = cache_face_crops(splits[split], crops, 0, show=False)
    for name in cfg.experts:
        train_expert(cfg, name, splits, rt, export_name=name + suffix)
    if rt.world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
