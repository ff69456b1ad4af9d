"""The three training losses, each switchable and weighted in `LossConfig`.

* CE:  cross-entropy on real/fake, optional label smoothing.
* KL:  consistency KL(p(x) || p(x + noise)): the prediction should not change under small
       noise, so the model cannot lean on fragile pixel-exact cues. On residual cues (SRM,
       the forensic statistics) the noise is the signal, and it fights them.
* NCE: supervised contrastive InfoNCE (Khosla et al., 2020) on L2-normalised projections;
       every other sample with the same label is a positive.
And, for an expert with a boundary head (`expert.<name>.boundary_loss`, weighted there):
* boundary: per-pixel BCE of the predicted blending boundary (Face X-ray, Li et al., 2020).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from configs import LossConfig


def kl_consistency(clean_logits: torch.Tensor, noisy_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_clean || p_noisy), batch mean. The clean prediction is the target, without
    gradient, so the model moves its noisy prediction towards the clean one."""
    target = clean_logits.detach().float().log_softmax(dim=1)
    return F.kl_div(noisy_logits.float().log_softmax(dim=1), target, log_target=True,
                    reduction="batchmean")


def supervised_nce(z: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """SupCon loss: mean over anchors with >= 1 positive of
    -mean_{p in P(i)} log( exp(z_i.z_p / t) / sum_{a != i} exp(z_i.z_a / t) )."""
    z = z.float()
    n = z.shape[0]
    sim = z @ z.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    positives = (y[:, None] == y[None, :]) & ~self_mask
    n_pos = positives.sum(dim=1)
    has_pos = n_pos > 0
    if not has_pos.any():
        return z.sum() * 0.0
    pos_log_prob = log_prob.masked_fill(~positives, 0.0).sum(dim=1)
    return -(pos_log_prob[has_pos] / n_pos[has_pos]).mean()


def classification_losses(logits, y, cfg: LossConfig, second_logits=None, projected=None):
    """Weighted sum of the enabled losses, and each term's value for the logs. `second_logits`
    are those of the KL term's second view, x + noise."""
    logs: dict[str, float] = {}
    total = logits.new_zeros((), dtype=torch.float32)
    if cfg.ce > 0:
        ce = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        total = total + cfg.ce * ce
        logs["ce"] = ce.item()
    if cfg.kl > 0 and second_logits is not None:
        kl = kl_consistency(logits, second_logits)
        total = total + cfg.kl * kl
        logs["kl"] = kl.item()
    if cfg.nce > 0 and projected is not None:
        nce = supervised_nce(projected, y, cfg.nce_temperature)
        total = total + cfg.nce * nce
        logs["nce"] = nce.item()
    return total, logs


def boundary_loss(logits_map: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
    """BCE between a predicted blending-boundary map (B, 1, h, w logits) and the images'
    boundary maps (B, 1, H, W in [0, 1], area-pooled to h x w), mean over the pixels of the
    images whose boundary is known. A data set's own fake has no known boundary (its map is
    negative): it is left out, so the head never learns to call its boundary absent."""
    target = F.adaptive_avg_pool2d(boundaries.float(), logits_map.shape[-2:])
    known = (boundaries.flatten(1)[:, 0] >= 0).float()
    per_image = F.binary_cross_entropy_with_logits(logits_map.float(), target.clamp(min=0),
                                                   reduction="none").flatten(1).mean(1)
    return (per_image * known).sum() / known.sum().clamp(min=1)  # 0 with a gradient when none is known
