"""Stochastic weight averaging (Izmailov et al. 2018) and the learning-rate schedule for the one trainer.

With `expert.<name>.swa_fraction: f` the trainer keeps the running mean of the raw weights
after each of the last round(f * epochs) epochs and exports that mean instead of the EMA
weights of the best-validated epoch. The mean of the weights a decaying learning rate visits
lies in a flatter region than any one of them, and no epoch is picked on a validation set of
the training methods, which favours what memorises them. The averaged weights never ran
forward, so BatchNorm's statistics are measured again for them on the training crops.
The learning rate follows the same warm-up and cosine to 0 at the last epoch with or
without SWA (`warmup_cosine`).
"""
from __future__ import annotations

import math

import torch

from common.errors import UsageError


def warmup_cosine(total_steps: int, warmup_steps: int):
    """Linear warm-up, then a cosine from 1 down to 0 at `total_steps`, held after."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def swa_epochs(fraction: float, epochs: int) -> int:
    """How many last epochs `swa_fraction` (checked by experts.base.check_expert_config)
    averages: 0 when off, else at least one."""
    return max(1, round(fraction * epochs)) if fraction > 0 else 0


def add_to_average(average: dict, state: dict) -> None:
    """Fold one epoch's weights into the running mean `average` ({"state", "count"}).
    Integer buffers (BatchNorm's batch counter) keep the latest value."""
    average["count"] += 1
    if average["state"] is None:
        average["state"] = {k: v.detach().cpu().clone() for k, v in state.items()}
        return
    for key, value in state.items():
        mean = average["state"][key]
        if mean.is_floating_point():
            mean += (value.detach().cpu().to(mean.dtype) - mean) / average["count"]
        else:
            mean.copy_(value.detach().cpu())


def load_average(expert: torch.nn.Module, average: dict, epochs: int, training_inputs, name: str) -> None:
    """Load the mean of the last `epochs` epochs' weights into `expert` and measure its
    BatchNorm statistics again on `training_inputs` (float batches, no augmentation)."""
    if average["count"] != epochs:  # resumed from a checkpoint written without the average
        raise UsageError(f"{name}: {average['count']} of the last {epochs} epochs' weights were averaged; "
                         f"train again without resume=true")
    expert.load_state_dict(average["state"])
    torch.optim.swa_utils.update_bn(training_inputs, expert)
