"""Augmentations (albumentations) and the crop -> tensor step shared by training and inference.

Every augmentation here is applied to real and fake images alike: anything applied to one
class only becomes a shortcut the detector learns instead of the manipulation.
"""
from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no version check over the network

import albumentations as A
import cv2
import numpy as np
import torch

from configs import AugmentConfig


def train_augmentations(cfg: AugmentConfig, size: int) -> A.Compose:
    s = cfg.scale
    # scale=0 skips the resized crop: its resampling would blur the very traces (a resampled,
    # blended inner face) that a detector looks for, and evaluation never resamples.
    rescale = [A.RandomResizedCrop(size=(size, size), scale=(1 - 2 * s, 1.0), ratio=(1 - s, 1 + s), p=1.0)] \
        if s > 0 else []
    return A.Compose([
        *rescale,
        A.HorizontalFlip(p=cfg.hflip),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.03, p=cfg.color),
        A.GaussianBlur(blur_limit=(3, 5), p=cfg.blur),
        A.Downscale(scale_range=(0.35, 0.9), p=cfg.downscale,
                    interpolation_pair={"downscale": cv2.INTER_AREA, "upscale": cv2.INTER_CUBIC}),
        A.GaussNoise(std_range=(0.01, 0.04), p=cfg.noise),
        A.ImageCompression(quality_range=(cfg.jpeg_quality_min, 95), p=cfg.jpeg),
    ])


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """The deterministic evaluation-time resize (area filter when shrinking)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    interp = cv2.INTER_AREA if image.shape[0] > size else cv2.INTER_CUBIC
    return cv2.resize(image, (size, size), interpolation=interp)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 -> 3 x H x W uint8 tensor; normalisation happens in the expert, on
    the device, so data loading stays cheap and the mean/std travel with the weights."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()


def crop_to_tensor(crop: np.ndarray, size: int) -> torch.Tensor:
    """A face crop -> the uint8 tensor (3, size, size) an expert of input `size` sees, the same
    in validation, inference, evaluation and embedding (training augments first)."""
    return to_tensor(resize_square(crop, size))
