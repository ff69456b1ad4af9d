"""What a model's input looks like, wherever it is made: uint8 RGB batches (B, 3, H, W) become
float32 in [0, 1] on the model's device; an expert normalises them itself (its mean/std are
buffers saved with its weights), by default with the ImageNet statistics below."""
from __future__ import annotations

import torch

# The mean and std that torchvision's and most of timm's pretrained backbones were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_unit_float(batch: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> float32 in [0, 1] on `device`."""
    return batch.to(device, non_blocking=True).float().div_(255)
