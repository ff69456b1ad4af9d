"""What the trainer feeds the experts: torch datasets, the epoch sampler and the loaders of face crops.

    settings = expert_settings(cfg, "convnext")   # one expert's resolved settings (configs.settings)
    crops = FaceCropCache(settings.face, settings.data.cache_dir)
    samples = cache_face_crops(samples, crops, num_workers=0, show=False)   # drops unreadable files
    train_set = FaceCropDataset(samples, crops, settings, train=True)
    sampler = EpochSampler([s.target for s in samples], balanced=True, seed=settings.seed)
    loader = make_loader(train_set, settings, sampler)

Determinism: every random choice about sample i of epoch e (sample order, augmentations,
online editing fakes) is drawn from its own stream seeded from (seed, e, i), so a
resumed run, or one with another worker count, draws exactly what the uninterrupted run drew.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from common.runtime import sample_seed
from configs.settings import ExpertSettings
from data_prep.dataset import Sample
from data_prep.faces import FaceCropCache
from data_prep.images import ImageDecodeError
from data_prep.landmarks import cutout_face_part
from data_prep.masks import blending_boundary
from data_prep.regions import check_region, crop_region
from data_prep.transforms import crop_to_tensor, resize_square, to_tensor, train_augmentations

log = logging.getLogger("train")

# Seed-stream tags, apart from any epoch number: the sampler's order and the paired fakes.
SAMPLER_STREAM = 1 << 20
PAIRED_FAKE_STREAM = 1 << 21


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
    """(index, error message or "") per sample, loading its face crop into the cache."""

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
    """(uint8 tensor 3 x S x S, label) for one expert, as its `settings` say: S is its
    image_size, the crop cut to its `region` (data_prep/regions.py), the random draws seeded
    from its seed. Training: its augmentations and, with probability data.online_fakes, a
    real turned into an editing fake (label 1) of its online_fake_ops on the fly, made from
    the whole crop before the region is cut.
    With `boundaries` (training only), also each image's blending boundary, 1 x S x S float:
    an editing fake's (`masks.blending_boundary`), 0 for a real, -1 (unknown) for a fake of
    the data set, transformed with the image."""

    def __init__(self, samples, crops: FaceCropCache, settings: ExpertSettings, train: bool,
                 paired_fakes: bool = False, boundaries: bool = False):
        self.samples, self.crops, self.size, self.train = samples, crops, settings.data.image_size, train
        self.boundaries = boundaries and train
        # paired_fakes (evaluation of a reals-only split): after the n samples come n editing
        # fakes, one made from each real with a fixed seed, so every epoch sees the same ones.
        self.paired = paired_fakes
        self.seed, self.epoch = settings.seed, 0
        self.augment = train_augmentations(settings.augment, self.size) if train else None
        self.cutout = settings.augment.cutout if train else 0.0
        self.online_fakes = settings.data.online_fakes if train else 0.0
        # The editing ops of the fakes ([]: every default op); a wrong name fails here, not in the first batch.
        self.fake_ops = settings.data.online_fake_ops or None
        if self.fake_ops:
            from data_prep.manipulations import check_names
            check_names(self.fake_ops)
        self.fake_masks = settings.data.fake_masks
        self.real_indices = [i for i, s in enumerate(samples) if s.target == 0]
        self.margin = settings.face.margin
        self.region = check_region(settings.expert.region)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.samples) * (2 if self.paired else 1)

    def __getitem__(self, i):
        if i >= len(self.samples):  # a paired fake
            i -= len(self.samples)
            rng = np.random.default_rng(sample_seed(self.seed, PAIRED_FAKE_STREAM, i))
            image, _ = self.make_fake(i, self.crops.load(self.samples[i].path), rng)
            return crop_to_tensor(self.in_region(i, image), self.size), 1
        sample = self.samples[i]
        image, target = self.crops.load(sample.path), sample.target
        if not self.train:
            return crop_to_tensor(self.in_region(i, image), self.size), target
        rng = np.random.default_rng(sample_seed(self.seed, self.epoch, i))
        # -1: a data set fake's boundary is unknown; a real has none
        boundary = np.full(image.shape[:2], -1.0 if target else 0.0, np.float32) if self.boundaries else None
        if target == 0 and self.online_fakes > 0 and rng.random() < self.online_fakes:
            image, mask = self.make_fake(i, image, rng)
            target, boundary = 1, (blending_boundary(mask) if self.boundaries else None)
        if self.cutout > 0 and rng.random() < self.cutout:
            image = self.cut_out(sample.path, image, rng)
        if self.region != "face":  # the crop's landmarks read once for the image and its boundary map
            points = self.crops.landmarks(sample.path)
            image = crop_region(image, points, self.region)
            boundary = None if boundary is None else crop_region(boundary, points, self.region)
        self.augment.set_random_seed(int(rng.integers(2**31)))
        augmented = self.augment(image=image) if boundary is None else self.augment(image=image, mask=boundary)
        image = resize_square(augmented["image"], self.size)
        boundary = None if boundary is None else resize_square(augmented["mask"], self.size)
        if boundary is None:
            return to_tensor(image), target
        return to_tensor(image), target, torch.from_numpy(np.ascontiguousarray(boundary))[None]

    def in_region(self, i, image):
        """`image` (the face crop) cut to the expert's region, by the landmarks of sample i's
        crop (an editing fake keeps its real's)."""
        if self.region == "face":
            return image
        return crop_region(image, self.crops.landmarks(self.samples[i].path), self.region)

    def cut_out(self, path, image, rng):
        """`image` with one facial part blacked out (augment.cutout), located by the crop's
        68 landmarks; as it is when dlib finds no face in the crop."""
        points = self.crops.landmarks(path)
        return image if points is None else cutout_face_part(image, points, rng)

    def make_fake(self, i, image, rng):
        """(editing fake of `image`, its blend mask)."""
        from data_prep.manipulations import fake_from_face_crop
        donor = self.crops.load(self.samples[int(rng.choice(self.real_indices))].path)
        points = self.crops.landmarks(self.samples[i].path) if self.fake_masks == "landmarks" else None
        fake, mask, _name = fake_from_face_crop(image, rng, donor, self.margin, self.fake_ops, points)
        return fake, mask


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
        g = np.random.default_rng(sample_seed(self.seed, self.epoch, SAMPLER_STREAM))
        n = len(self.targets)
        if self.balanced and len(np.unique(self.targets)) > 1:
            counts = np.bincount(self.targets)
            weights = 1.0 / counts[self.targets]
            order = g.choice(n, size=n, replace=True, p=weights / weights.sum())
        else:
            order = g.permutation(n)
        return iter(order[self.rank::self.world][: len(self)].tolist())


def make_loader(dataset, settings: ExpertSettings, sampler=None, batch_size=None):
    """A DataLoader with the expert's batch size and workers; with a sampler (training) the
    last, incomplete batch is dropped."""
    return DataLoader(dataset, batch_size=batch_size or settings.train.batch_size, sampler=sampler,
                      num_workers=settings.data.num_workers,
                      pin_memory=torch.cuda.is_available(), drop_last=sampler is not None,
                      persistent_workers=False)
