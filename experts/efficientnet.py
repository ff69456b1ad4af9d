"""EfficientNet expert: a timm EfficientNet classifier (cpu: efficientnet_b0, gpu: tf_efficientnet_b4)."""
from experts.base import BackboneClassifier, register_expert


@register_expert("efficientnet")
class EfficientNetExpert(BackboneClassifier):
    """Same recipe as ConvNeXt; a different inductive bias (depthwise MBConv, BatchNorm),
    which makes its errors less correlated with ConvNeXt's: that is what a blend needs."""

    def gradcam_layer(self):
        return self.backbone.conv_head
