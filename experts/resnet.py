"""ResNet expert: a timm ResNet classifier, by default on RGB + SRM noise residuals.

The cpu profile's workhorse. Trained from random initialisation on a few thousand faces,
BatchNorm ResNets with the residual channels learn face-swap traces within a few epochs,
where ConvNeXt and EfficientNet from scratch barely move (README, "Choosing the cpu experts").
"""
from experts.base import BackboneClassifier, register_expert


@register_expert("resnet")
class ResNetExpert(BackboneClassifier):
    def gradcam_layer(self):
        return self.backbone.layer4
