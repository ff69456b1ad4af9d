"""Residual co-occurrence expert: how neighbouring noise residuals pair up, in the face's
centre and over the whole crop, and a small MLP on top.

Steganalysis measures an image's noise by the joint statistics of neighbouring residuals,
not by their energy: SPAM (Pevny, Bas & Fridrich 2010) and the rich models (Fridrich &
Kodovsky 2012) count how often each pair of quantised, truncated residual values occurs.
A generator, a blend or a re-rendered face leaves its own pairings: co-occurrence matrices
detect GAN images (Nataraj et al. 2019) and were the FaceForensics++ paper's
"steganalysis features" baseline. The forensic expert pools residual *energy* per face
region; this one reads their *texture*, so the two fail on different faces (correlation of
their validation scores 0.33 on FF++, RESULTS.md).

Features, all fixed:
  for the horizontal and the vertical second difference of the grey image, each quantised
  with step q (1 and 3 grey levels) and truncated to [-2, 2]: the 5 x 5 histogram of
  (residual, its right or lower neighbour), as log frequencies over the whole crop, and the
  face centre's (the central half) log frequencies minus the whole crop's. 2 directions x
  2 steps x 2 x 25 = 200 values.
The histograms are counted by scatter_add rather than bincount, so the expert exports to ONNX.
"""
from __future__ import annotations

import torch

from configs import ExpertConfig
from experts.base import FixedStatistics, FixedStatisticsClassifier, register_expert

TRUNCATION = 2                       # residuals quantised to -2..2: 5 values, 25 pairs
QUANTISATION_STEPS = (1.0, 3.0)      # fine steps see sensor/JPEG noise, coarse ones blending and smoothing
LOG_FLOOR = 1e-5                     # a pair never seen in a crop: log of a small frequency, not -inf


class ResidualCooccurrences(FixedStatistics):
    """(B, 3, H, W) in [0, 1] -> (B, 200) log co-occurrence frequencies; no parameters."""

    levels = 2 * TRUNCATION + 1

    @property
    def n_features(self) -> int:
        return 2 * len(QUANTISATION_STEPS) * 2 * self.levels ** 2

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        grey = x.mean(dim=1) * 255
        horizontal = grey[:, :, :-2] - 2 * grey[:, :, 1:-1] + grey[:, :, 2:]
        vertical = grey[:, :-2, :] - 2 * grey[:, 1:-1, :] + grey[:, 2:, :]
        features = []
        for step in QUANTISATION_STEPS:
            for residual, along_rows in ((horizontal, True), (vertical, False)):
                q = (residual / step).round().clamp(-TRUNCATION, TRUNCATION) + TRUNCATION
                first, second = (q[:, :, :-1], q[:, :, 1:]) if along_rows else (q[:, :-1, :], q[:, 1:, :])
                pair = first * self.levels + second                  # 0 .. 24, one code per pair
                h, w = pair.shape[-2:]
                centre = pair[:, h // 4: h // 4 + h // 2, w // 4: w // 4 + w // 2]
                whole_log, centre_log = self.log_histogram(pair), self.log_histogram(centre)
                features += [whole_log, centre_log - whole_log]
        return torch.cat(features, dim=1)

    def log_histogram(self, codes: torch.Tensor) -> torch.Tensor:
        # scatter_add counts in one pass (25 comparisons were 4x slower) and exports to ONNX
        # (ScatterElements with add), which bincount does not
        flat = codes.flatten(1).long()
        counts = torch.zeros(flat.shape[0], self.levels ** 2, device=codes.device)
        counts = counts.scatter_add(1, flat, torch.ones_like(flat, dtype=counts.dtype))
        return (counts / flat.shape[1]).clamp_min(LOG_FLOOR).log()


@register_expert("cooccurrence")
class CooccurrenceExpert(FixedStatisticsClassifier):
    config_fields = frozenset({"embed_dim"})

    def __init__(self, cfg: ExpertConfig, image_size: int):
        super().__init__(cfg, image_size, ResidualCooccurrences())
