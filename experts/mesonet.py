"""MesoNet-4 (Afchar et al., WIFS 2018): the classic from-scratch detector for compressed
video faces, about 28k parameters.

Four conv blocks look at the mesoscopic level, between pixel noise (which compression
destroys) and the semantics of the whole face; the design was made for FaceForensics-style
crops at 256 px and trains from random initialisation. It is cheap enough on a CPU to see
faces at their native resolution for many epochs, where a ResNet at that size is 10x slower.
Two logits (real, fake) instead of the paper's one sigmoid, to share the experts' interface.
With `input_filter: srm` the SRM noise-residual channels are appended to RGB, as for the
timm experts.
"""
from __future__ import annotations

import torch.nn as nn

from configs import ConfigError, ExpertConfig
from experts.base import FeatureClassifier, NoiseResiduals, check_input_filter, register_expert


def _block(cin: int, cout: int, kernel: int, pool: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2), nn.ReLU(inplace=True),
                         nn.BatchNorm2d(cout), nn.MaxPool2d(pool, pool))


@register_expert("mesonet")
class MesoNet4Expert(FeatureClassifier):
    config_fields = frozenset({"input_filter", "embed_dim"})

    def __init__(self, cfg: ExpertConfig, image_size: int):
        super().__init__(cfg, image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        in_chans = check_input_filter(cfg)
        if image_size % 32:
            raise ConfigError(f"mesonet needs an image size divisible by 32, got {image_size}")
        self.residuals = NoiseResiduals() if cfg.input_filter == "srm" else None
        self.features_net = nn.Sequential(
            _block(in_chans, 8, 3, 2), _block(8, 8, 5, 2), _block(8, 16, 5, 2), _block(16, 16, 5, 4))
        side = image_size // 32
        self.hidden = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(16 * side * side, 16),
                                    nn.LeakyReLU(0.1))
        self.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(16, 2))
        self.projector = nn.Linear(16, cfg.embed_dim)

    def features(self, x):
        return self.hidden(self.features_net(self.network_input(x)))

    def gradcam_layer(self):
        return self.features_net[-1]
