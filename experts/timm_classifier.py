"""The generic timm classifier expert: any timm model as a backbone, a linear or MLP head.

    expert:
      xception:                      # a new expert is a YAML section, no code:
        kind: timm
        model: xception41            # any timm model name (timm.list_models())
        pretrained: true             # or pretrained_file: PATH
        input_filter: srm            # optional: SRM noise-residual channels beside RGB

The kinds `convnext`, `efficientnet` and `resnet` are aliases of `timm` (they were one class
each, differing only in how the Grad-CAM layer was guessed), so the configs and manifests
that name them build this class. Grad-CAM explains the output of the backbone's last feature
stage, as the model's own `feature_info` names it, whatever the architecture.

The cpu profile's experts are two of these: ImageNet EfficientNet-Lite0 (`pretrained:
efficientnet_lite0`, weights that install offline, experts/pretrained.py), fine-tuned on the
data set's fakes, and on self-blended images of its reals (`train_on: reals`).
"""
from __future__ import annotations

import logging

import torch.nn as nn

from common.errors import ConfigError
from common.inputs import IMAGENET_MEAN, IMAGENET_STD
from configs import ExpertConfig
from experts.base import (
    FeatureClassifier,
    NoiseResiduals,
    check_input_filter,
    create_backbone,
    make_mlp,
    register_expert,
)
from experts.losses import boundary_loss

TIMM_FIELDS = frozenset({"model", "model_args", "pretrained", "pretrained_file", "input_filter", "head_layers",
                         "embed_dim", "drop_rate", "boundary_loss", "trainable"})
# What the optimizer updates (`trainable`): everything, or the normalisation layers' affine
# parameters and the head (the CNN form of the CLIP recipe's LayerNorm + head: the pretrained
# features re-centred, not rewritten). `layernorm_head` is the older name of norm_head.
TRAINABLE = ("all", "norm_head")
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
log = logging.getLogger(__name__)

BOUNDARY_REDUCTION = 8  # the boundary head reads the first feature stage at 1/8 of the input or coarser


@register_expert("timm", aliases=("convnext", "efficientnet", "resnet"))
class TimmClassifier(FeatureClassifier):
    """timm backbone -> pooled features -> linear/MLP head (2 logits), plus a projection
    head whose L2-normalised output feeds the supervised contrastive loss. `trainable` says
    which backbone parameters learn (TRAINABLE). `input_filter: srm` appends 3
    noise-residual channels to the normalised RGB."""

    config_fields = TIMM_FIELDS

    def __init__(self, cfg: ExpertConfig, image_size: int, **backbone_kwargs):
        backbone = create_backbone(cfg, drop_rate=cfg.drop_rate, in_chans=check_input_filter(cfg), **backbone_kwargs)
        data_cfg = backbone.pretrained_cfg or {}
        super().__init__(cfg, image_size, data_cfg.get("mean", IMAGENET_MEAN), data_cfg.get("std", IMAGENET_STD))
        self.residuals = NoiseResiduals() if cfg.input_filter == "srm" else None
        self.backbone = backbone
        width = backbone.num_features
        self.head = make_mlp(width, 2, cfg.head_layers)
        self.projector = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, cfg.embed_dim))
        # Face X-ray (Li et al., 2020): a 1 x 1 convolution on a mid-level feature map learns
        # where an editing fake was blended into the face. A face swap of any method leaves
        # such a boundary; learning to draw it makes the backbone look for it, beside the
        # traces of the training methods. Only training uses the head (its weights travel
        # with the expert's, so the exported file loads strictly), and forward stays as is.
        self.boundary_stage = -1
        if cfg.boundary_loss > 0:
            self.boundary_stage, channels = boundary_stage(backbone, cfg.model)
            self.boundary_head = nn.Conv2d(channels, 1, kernel_size=1)
        self.trainable = "norm_head" if cfg.trainable == "layernorm_head" else cfg.trainable
        if self.trainable not in TRAINABLE:
            raise ConfigError(f"trainable must be one of {list(TRAINABLE)}, got {cfg.trainable!r}")
        if self.trainable == "norm_head":
            for module in backbone.modules():
                for param in module.parameters(recurse=False):
                    param.requires_grad = isinstance(module, NORM_LAYERS)

    def trainable_parameters(self, loss_cfg):
        if self.trainable != "all" and not (self.cfg.pretrained or self.cfg.pretrained_file):
            log.warning("%s expert %r: tuning only the normalisation layers and head of a random backbone "
                        "means little; give it pretrained weights (pretrained: ..., or pretrained_file: PATH)",
                        self.cfg.kind, self.cfg.model)
        return super().trainable_parameters(loss_cfg)

    @property
    def learns_boundaries(self) -> bool:
        return self.boundary_stage >= 0

    def features(self, x):
        return self.backbone(self.network_input(x))

    def training_loss(self, x, y, loss_cfg, boundaries=None):
        if boundaries is None:
            return super().training_loss(x, y, loss_cfg)
        final, (stage,) = self.backbone.forward_intermediates(self.network_input(x), indices=[self.boundary_stage])
        total, logs = self.losses_of_features(x, y, self.backbone.forward_head(final), loss_cfg)
        boundary = boundary_loss(self.boundary_head(stage), boundaries)
        logs["boundary"] = boundary.item()
        return total + self.cfg.boundary_loss * boundary, logs

    def gradcam_layer(self) -> nn.Module | None:
        """The module of the backbone's last feature stage in timm's `feature_info` (e.g.
        `stages.3` of a ConvNeXt, `layer4` of a ResNet, `blocks.6` of an EfficientNet)."""
        return last_feature_stage(self.backbone)


def boundary_stage(backbone: nn.Module, model: str) -> tuple[int, int]:
    """(index, channels) in timm's `feature_info` of the first stage at BOUNDARY_REDUCTION or
    coarser: fine enough to draw a boundary (16 x 16 at 128 px), deep enough to be learned."""
    stages = feature_stages(backbone)
    if not stages or not hasattr(backbone, "forward_intermediates"):
        raise ConfigError(f"boundary_loss: the timm model {model!r} exposes no intermediate feature maps")
    index = next((i for i, s in enumerate(stages) if s["reduction"] >= BOUNDARY_REDUCTION), len(stages) - 1)
    return index, stages[index]["num_chs"]


def feature_stages(backbone: nn.Module) -> list[dict]:
    """timm's `feature_info` of the backbone as a list of dicts (module, num_chs, reduction);
    timm gives a list or a FeatureInfo. Empty for a model without it."""
    info = getattr(backbone, "feature_info", None)
    if not info:
        return []
    return info if isinstance(info, list) else info.get_dicts()


def last_feature_stage(backbone: nn.Module) -> nn.Module | None:
    stages = feature_stages(backbone)
    return backbone.get_submodule(stages[-1]["module"]) if stages else None
