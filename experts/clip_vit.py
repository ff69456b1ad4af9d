"""CLIP ViT expert, tuned parameter-efficiently: the backbone is frozen except for the affine
parameters of its LayerNorms (`trainable: norm_head`, or its older name `layernorm_head`); a
1- or 2-layer MLP head is trained on the pooled features.

With pretrained CLIP weights (gpu profile: vit_base_patch16_clip_224.openai) this is the
recipe that generalises best across generators: CLIP's features already separate natural
from synthetic images and only need re-centring (LayerNorm) and a read-out (head).
Without pretrained weights the frozen backbone is random, so tuning only LayerNorms means
little (the log warns); `trainable: all` trains a CLIP-architecture ViT whole.
"""
from configs import ExpertConfig
from experts.base import register_expert
from experts.timm_classifier import TimmClassifier


@register_expert("clip")
class ClipViTExpert(TimmClassifier):

    def __init__(self, cfg: ExpertConfig, image_size: int):
        super().__init__(cfg, image_size, img_size=image_size)  # mean/std: CLIP's own, from timm's pretrained_cfg

    def gradcam_layer(self):
        return self.backbone.blocks[-1].norm1

    @property
    def num_prefix_tokens(self) -> int:
        return getattr(self.backbone, "num_prefix_tokens", 1)

