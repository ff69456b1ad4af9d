"""Deepfake experts: one file per expert kind, all behind `experts.base.Expert` and its registry.

Importing this package registers every expert kind, so `create_expert(cfg, size)` finds it.
"""
from experts import clip_vit, dae, forensic, mesonet, timm_classifier  # noqa: F401  (registration)
from experts.base import EXPERT_ALIASES, EXPERTS, Expert, create_expert, expert_class, register_expert  # noqa: F401
