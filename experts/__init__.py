"""Deepfake experts: one file per expert, all behind `experts.base.Expert` and its registry.

Importing this package registers every expert kind, so `create_expert(cfg, size)` finds it.
"""
from experts.base import EXPERTS, Expert, create_expert, register_expert  # noqa: F401
from experts import clip_vit, convnext, dae, efficientnet, forensic, mesonet, resnet  # noqa: F401  (registration)
