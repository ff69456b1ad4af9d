"""ConvNeXt expert: a timm ConvNeXt classifier (cpu: convnext_atto, gpu: convnext_base)."""
from experts.base import BackboneClassifier, register_expert


@register_expert("convnext")
class ConvNeXtExpert(BackboneClassifier):
    """Plain fine-tuning of every parameter: CE (+ KL + NCE) on the pooled features."""
