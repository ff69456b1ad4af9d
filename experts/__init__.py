"""Deepfake experts: the detectors, and what trains, stores and exports them.

The expert kinds, one file each, all behind `experts.base.Expert` and its registry
(`create_expert(cfg, size)` builds one by its `kind`; add a kind as a new file here):

    timm_classifier  any timm model as a backbone + a head (kind `timm`; convnext, efficientnet
                     and resnet are older names of it)
    clip_vit         CLIP ViT tuned parameter-efficiently (LayerNorms + an MLP head)
    forensic         fixed residual / colour / spectrum statistics per face region + an MLP
    dae              denoising autoencoder trained on real faces only: an anomaly score
    mesonet          MesoNet-4

The machinery around them:

    base             the Expert interface, the registry, the config checks, the backbone builder
    pretrained       ImageNet weights that install offline, mapped onto timm models
    train, losses, swa   the one training loop, its losses, weight averaging and the schedule
    weights          safetensors + manifest: saving and strict, hash-checked loading
    export_onnx      the ONNX export
    check_pretrained, cluster_split   commands that need models (weights check, cluster re-split)

Importing this package registers every expert kind.
"""
from experts import clip_vit, dae, forensic, mesonet, timm_classifier  # noqa: F401  (registration)
from experts.base import EXPERT_ALIASES, EXPERTS, Expert, create_expert, expert_class, register_expert  # noqa: F401
