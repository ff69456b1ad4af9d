"""CLIP ViT expert, tuned parameter-efficiently: the backbone is frozen except for the affine
parameters of its LayerNorms; a 1- or 2-layer MLP head is trained on the pooled features.

With pretrained CLIP weights (gpu profile: vit_base_patch16_clip_224.openai) this is the
recipe that generalises best across generators: CLIP's features already separate natural
from synthetic images and only need re-centring (LayerNorm) and a read-out (head).
Without pretrained weights the frozen backbone is random, so tuning only LayerNorms means
little: the cpu profile (no hub here) therefore sets `trainable: all` and trains a small
CLIP-architecture ViT from scratch; with `layernorm_head` and a random backbone the log warns.
"""
import logging

import torch.nn as nn

from configs import ConfigError, ExpertConfig
from experts.base import register_expert
from experts.timm_classifier import TIMM_FIELDS, TimmClassifier

log = logging.getLogger(__name__)


@register_expert("clip")
class ClipViTExpert(TimmClassifier):
    config_fields = TIMM_FIELDS | {"trainable"}

    def __init__(self, cfg: ExpertConfig, image_size: int):
        super().__init__(cfg, image_size, img_size=image_size)  # mean/std: CLIP's own, from timm's pretrained_cfg
        if cfg.trainable == "layernorm_head":
            for name, param in self.backbone.named_parameters():
                param.requires_grad = is_layernorm_param(self.backbone, name)
        elif cfg.trainable != "all":
            raise ConfigError(f"clip expert: trainable must be 'layernorm_head' or 'all', got {cfg.trainable!r}")
        if cfg.trainable == "layernorm_head" and not (cfg.pretrained or cfg.pretrained_file):
            log.warning("clip expert %r has a random backbone: parameter-efficient tuning (LayerNorm + "
                        "head) of random features is nearly meaningless; give pretrained_file= for real use",
                        cfg.model)

    def gradcam_layer(self):
        return self.backbone.blocks[-1].norm1

    @property
    def num_prefix_tokens(self) -> int:
        return getattr(self.backbone, "num_prefix_tokens", 1)


def is_layernorm_param(model: nn.Module, param_name: str) -> bool:
    module_name = param_name.rpartition(".")[0]  # "" = the model itself (cls_token, pos_embed)
    return isinstance(model.get_submodule(module_name), nn.LayerNorm)
